"""The fast serving path on CPU: the compiled denoiser never recompiles on adapter swaps."""

from __future__ import annotations

import pytest
import torch

from pfstorer.images import load_image
from pfstorer.model import load_base
from pfstorer.personalization import AdapterSlots
from pfstorer.sampling import restore_batch
from pfstorer.training import PersonalizeConfig, personalize

from _torch import reassociation_atol


@pytest.fixture(scope="module")
def adapters(lfw_bench):
    model = load_base("tiny")
    names = list(lfw_bench)[:3]
    return [personalize(model, [load_image(p) for p in lfw_bench[n][:3]], identity=n,
                        config=PersonalizeConfig(steps=1, seed=i)) for i, n in enumerate(names)]


def _eager_and_compiled() -> tuple[dict, torch.nn.Module, torch.nn.Module]:
    """dynamo's counters (reset), an eager tiny base and a compiled one (the eager backend: dynamo's
    guards and graph counts are what these tests check, not the generated code)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    return counters, load_base("tiny"), load_base("tiny").compile_denoiser(backend="eager")


def test_swapping_adapters_on_compiled_denoiser_never_recompiles(adapters, lfw_bench, monkeypatch):
    counters, eager, compiled = _eager_and_compiled()
    slots_e, slots_c = AdapterSlots.for_model(eager, 2), AdapterSlots.for_model(compiled, 2)
    img = load_image(lfw_bench[next(iter(lfw_bench))][5])[:, 40:88, 40:88].unsqueeze(0).expand(2, -1, -1, -1)
    kw = dict(steps=2, color_fix="none", seeds=[1, 2])
    outputs = []
    for round_, (a, b) in enumerate([(0, 1), (2, 0), (1, 2)]):
        for slots in (slots_e, slots_c):
            slots.load(0, adapters[a].tensors)
            slots.load(1, adapters[b].tensors)
        ours = restore_batch(compiled, img, adapters=slots_c, slots=[0, 1], **kw)
        ref = restore_batch(eager, img, adapters=slots_e, slots=[0, 1], **kw)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
        outputs.append(ours)
        if round_ == 0:  # graphs for the tile-batch shapes exist now; nothing may compile again
            graphs = counters["stats"]["unique_graphs"]
            monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not torch.equal(outputs[0], outputs[1]), "the swap really changed the identities"


def _packed(model, lfw_bench, speed, steps: int = 2):
    from pfstorer.config import TrainingSpeed
    from pfstorer.training import PersonalizeJob, personalize_many

    names = list(lfw_bench)[:2]
    jobs = [PersonalizeJob(n, [load_image(p) for p in lfw_bench[n][:3]], seed=i) for i, n in enumerate(names)]
    return personalize_many(model, jobs, config=PersonalizeConfig(steps=steps), capacity=2, speed=TrainingSpeed(**speed))


def test_gradient_checkpointing_recomputes_and_gives_the_same_adapters(lfw_bench):
    runs = {}
    for flag in (False, True):
        model = load_base("tiny")
        calls: list[int] = []  # a pre-hook: backward's recomputation stops early, before forward hooks
        block = model.unet.up_blocks[-1].resnets[0]  # after the adapters: backward needs its activations
        block.register_forward_pre_hook(lambda _m, _i: calls.append(1))
        runs[flag] = (_packed(model, lfw_bench, {"gradient_checkpointing": flag}), len(calls))
    (plain, n_plain), (ckpt, n_ckpt) = runs[False], runs[True]
    assert n_ckpt == n_plain + 2  # each of the 2 training steps ran the block again in backward
    for a, b in zip(plain, ckpt, strict=True):
        for key, value in a.tensors.items():  # SFT and personalization hooks saw the same conditioning
            rel = (b.tensors[key] - value).norm() / value.norm().clamp_min(1e-12)
            assert rel < 1e-5, (key, float(rel))


def test_bf16_autocast_runs_the_base_in_bf16_and_keeps_adapters_fp32(lfw_bench):
    outs = {}
    for flag in (False, True):
        model = load_base("tiny")
        calls: list[torch.dtype] = []
        model.unet.down_blocks[0].resnets[0].conv1.register_forward_hook(lambda _m, _i, out: calls.append(out.dtype))
        outs[flag] = (_packed(model, lfw_bench, {"autocast_bf16": flag}), set(calls))
    (fp32, seen32), (bf16, seen16) = outs[False], outs[True]
    assert seen32 == {torch.float32} and torch.bfloat16 in seen16  # training steps in bf16 ...
    assert torch.float32 in seen16  # ... while inference (probe, reference cache) stays float32
    prompt = model.prompt.float()  # the frozen base's prompt: the same in both runs
    cfg = PersonalizeConfig()
    step = 2 * 2 * cfg.lr  # Adam moves an element by about lr per step: 2 runs x 2 steps
    for a, b in zip(fp32, bf16, strict=True):
        for key, value in b.tensors.items():
            assert value.dtype == torch.float32 and torch.isfinite(value).all(), key
        # rounding differs, the method does not: both runs start from the same weights, so the
        # trained tensors differ by at most `step` per element (alpha: by 2 x 2 x alpha_lr)
        kind = {k: k.rsplit(".", 1)[-1] for k in a.tensors}
        diff = {k: float((b.tensors[k] - a.tensors[k]).abs().max()) for k in a.tensors}
        trained = [k for k in a.tensors if not kind[k].startswith(("ref_", "txt_"))]
        alpha = max(diff[k] for k in trained if kind[k] == "alpha")
        rest = max(diff[k] for k in trained if kind[k] != "alpha")
        assert 0 < rest <= step and alpha <= 2 * 2 * cfg.alpha_lr, (rest, alpha)
        # the cached keys/values are those projections applied to fixed float32 features:
        # reference tokens are layer-normed (L2 norm sqrt(C) over C channels), so an element of
        # tokens @ W moves by at most sqrt(C) * sqrt(C) * step; a prompt row p of the text
        # keys/values by at most |p| * sqrt(D) * step (D: the text width; the token row is trained)
        for key in a.tensors:
            if kind[key].startswith("ref_"):
                channels = a.tensors[key.rsplit(".", 1)[0] + ".to_q"].shape[0]
                assert diff[key] <= channels * step * 1.001, (key, diff[key])
            elif kind[key].startswith("txt_"):
                rows = (b.tensors[key] - a.tensors[key])[:-1].abs().amax(-1)  # the prompt's rows
                bound = prompt.norm(dim=-1) * prompt.shape[-1] ** 0.5 * step * 1.001
                assert (rows <= bound).all(), (key, rows.max(), bound.min())


def test_compiled_restore_pads_tile_batches_to_one_graph(lfw_bench):
    counters, eager, compiled = _eager_and_compiled()
    img = load_image(lfw_bench[next(iter(lfw_bench))][5]).unsqueeze(0)  # 128 px: 3 x 3 tiles of 64
    kw = dict(steps=2, color_fix="none", seeds=[3], tile=64, tile_batch=2)  # rows of 3 tiles: batches of 2, 1
    ours = restore_batch(compiled, img, **kw)
    assert counters["stats"]["unique_graphs"] == 1  # the batches of 1 were padded to 2: no second graph
    ref = restore_batch(eager, img, **kw)
    atol = reassociation_atol(ref, restore_batch(load_base("tiny", dtype=torch.float64), img, **kw))
    assert atol < 1e-3
    torch.testing.assert_close(ours, ref, rtol=0, atol=atol)


def test_compiled_restore_of_small_photos_of_any_size_reuses_one_graph():
    counters, eager, compiled = _eager_and_compiled()
    kw = dict(steps=1, color_fix="none", seeds=[0], tile=64)
    for size in [(40, 48), (56, 60), (64, 33)]:  # each smaller than one 64 px tile
        img = torch.rand((1, 3, *size), generator=torch.Generator().manual_seed(size[0]))
        ours = restore_batch(compiled, img, **kw)  # padded up to one whole tile
        assert ours.shape == img.shape
        # the same restore as eager with the same padding (a batch of 8 rows vs 1: float rounding)
        torch.testing.assert_close(ours, restore_batch(eager, img, pad_to_tile=True, **kw), rtol=0, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1
