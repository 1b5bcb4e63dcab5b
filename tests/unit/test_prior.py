"""The reference prior: its file, where adapters start from it, and ``pfstorer train-prior``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from pfstorer.errors import AdapterError, PriorError, PriorMismatchError
from pfstorer.images import load_image
from pfstorer.model import load_base
from pfstorer.personalization import AdapterWeights, block_specs
from pfstorer.prior import PRIOR_FILE, Prior, planned_prior_sha256, resolve_prior
from pfstorer.sampling import restore
from pfstorer.training import PackedTrainer, PersonalizeConfig, personalize

FAST = {"steps": 2, "color_fix": "none"}
EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> tuple[object, Prior]:
    """A tiny base saved to a folder with a prior beside it (alpha and projections non-zero)."""
    d = tmp_path_factory.mktemp("base")
    load_base("tiny").save(d)
    model = load_base(str(d))
    weights = AdapterWeights(block_specs(model), model.config.cross_attention_dim, 1)
    weights.init_slot(0, torch.Generator().manual_seed(7), model.prompt)
    tensors = weights.slot_tensors(0)
    for name in tensors:
        if name.endswith("alpha"):
            tensors[name] = torch.full_like(tensors[name], 0.5)
    prior = Prior(tensors, model.fingerprint, model.config.name, {"note": "test"})
    prior.save(d / PRIOR_FILE)
    return model, prior


@pytest.fixture(scope="module")
def refs(lfw_bench) -> list[torch.Tensor]:
    return [load_image(p) for p in next(iter(lfw_bench.values()))[:3]]


def test_prior_roundtrips_with_its_base_and_record(shipped):
    model, prior = shipped
    back = Prior.load(Path(model.weights_location) / PRIOR_FILE)
    assert back.base_fingerprint == model.fingerprint and back.info == {"note": "test"}
    assert back.sha256 == prior.sha256
    assert set(back.tensors) == set(prior.tensors)
    assert all(torch.equal(back.tensors[k], prior.tensors[k]) for k in prior.tensors)
    back.check_base(model)


def test_a_prior_of_another_base_is_refused_naming_both_fingerprints(shipped, tmp_path):
    model, prior = shipped
    other = load_base("tiny-latent")
    with pytest.raises(PriorMismatchError) as err:
        prior.check_base(other)
    assert prior.base_fingerprint in str(err.value) and other.fingerprint in str(err.value)
    with pytest.raises(PriorMismatchError):  # named explicitly: an error
        resolve_prior(other, str(Path(model.weights_location) / PRIOR_FILE))
    stale = Prior(prior.tensors, "0" * 32, "tiny")
    d = tmp_path / "base"
    load_base("tiny").save(d)
    stale.save(d / PRIOR_FILE)
    with pytest.warns(UserWarning, match="0" * 32):  # found beside the base: skipped, loudly
        assert resolve_prior(load_base(str(d)), "base") is None


def test_a_run_keys_jobs_by_the_prior_that_resolve_would_give(shipped, tmp_path):
    """The planner never loads the base, yet names the same prior as personalization will."""
    model, prior = shipped
    folder, fp = str(model.weights_location), model.fingerprint
    assert planned_prior_sha256(folder, None, fp, "base") == prior.sha256 == resolve_prior(model, "base").sha256
    assert planned_prior_sha256(folder, None, fp, "none") is None
    moved = tmp_path / "elsewhere.safetensors"
    moved.write_bytes((Path(folder) / PRIOR_FILE).read_bytes())
    assert planned_prior_sha256("tiny", None, fp, str(moved)) == prior.sha256  # by content, not by path
    retrained = Prior({k: v + 1 for k, v in prior.tensors.items()}, fp, "tiny")
    retrained.save(tmp_path / "retrained.safetensors")
    assert planned_prior_sha256(folder, None, fp, str(tmp_path / "retrained.safetensors")) not in (None, prior.sha256)
    # a stale prior beside the weights is skipped, as resolve_prior skips it; no folder: no prior
    assert planned_prior_sha256(folder, None, "0" * 32, "base") is None
    assert planned_prior_sha256("tiny", None, load_base("tiny").fingerprint, "base") is None


def test_missing_or_broken_priors_are_clear_errors(shipped, tmp_path):
    model, _ = shipped
    with pytest.raises(PriorError, match="no reference prior"):
        resolve_prior(model, str(tmp_path / "nope.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(PriorError, match="not a valid safetensors"):
        Prior.load(bad)
    assert resolve_prior(model, "none") is None
    assert resolve_prior(load_base("tiny"), "base") is None  # seeded weights: no folder, no prior


def test_zero_step_adapter_is_the_prior_with_the_persons_cached_references(shipped, refs):
    model, prior = shipped
    adapter = personalize(model, refs, identity="p", config=PersonalizeConfig(steps=0))  # the base's prior
    assert adapter.metadata.config["prior_sha256"] == prior.sha256
    t, p = adapter.tensors, prior.tensors
    assert torch.equal(t["token"], p["token"])
    trainer = PackedTrainer(model, PersonalizeConfig(prior="none"))
    cached = trainer.reference_tokens(trainer.reference_features(trainer.prepare_references(refs)))
    text = torch.cat([model.prompt.detach(), p["token"][None]])
    for i in range(len(block_specs(model))):
        for name in ("alpha", "to_q", "to_out"):
            assert torch.equal(t[f"blocks.{i}.{name}"], p[f"blocks.{i}.{name}"])
        for got, x, w in (("txt_k", text, "txt_k"), ("txt_v", text, "txt_v"),
                          ("ref_k", cached[i], "img_k"), ("ref_v", cached[i], "img_v")):
            want = x @ p[f"blocks.{i}.{w}"]
            # float32 matmul error bound: K * eps * (|x| @ |w|), whatever the summation order
            bound = x.shape[-1] * EPS * (x.abs() @ p[f"blocks.{i}.{w}"].abs())
            assert ((t[f"blocks.{i}.{got}"] - want).abs() <= bound).all(), (i, got)
    # and it uses the references: the restore differs from the base's
    assert not torch.equal(restore(model, refs[0], seed=5, **FAST), restore(model, refs[0], adapter=adapter, seed=5, **FAST))


def test_without_a_prior_a_fresh_adapter_is_the_base_bit_for_bit(shipped, refs):
    model, _ = shipped
    fresh = personalize(model, refs, identity="p", config=PersonalizeConfig(steps=0, prior="none"))
    assert fresh.metadata.config["prior_sha256"] is None
    assert all(float(v.abs().max()) == 0 for k, v in fresh.tensors.items() if k.endswith("alpha"))
    assert torch.equal(restore(model, refs[0], seed=5, **FAST), restore(model, refs[0], adapter=fresh, seed=5, **FAST))


def test_fine_tuning_starts_from_the_prior(shipped, refs):
    model, prior = shipped
    a = personalize(model, refs, identity="p", config=PersonalizeConfig(steps=2))
    b = personalize(model, refs, identity="p", config=PersonalizeConfig(steps=2, prior="none"))
    assert a.metadata.config["prior_sha256"] == prior.sha256
    assert not torch.equal(a.tensors["blocks.0.alpha"], b.tensors["blocks.0.alpha"])
    # alpha starts at the prior's 0.5: an Adam step moves it at most lr (1 - b1) / sqrt(1 - b2) = 3.17 lr
    assert (a.tensors["blocks.0.alpha"] - 0.5).abs().max() <= 2 * 3.17 * PersonalizeConfig().alpha_lr


def test_slot_tensors_of_another_layout_are_refused(shipped):
    model, prior = shipped
    weights = AdapterWeights(block_specs(model), model.config.cross_attention_dim, 1)
    fewer = {k: v for k, v in prior.tensors.items() if k != "blocks.0.img_k"}
    with pytest.raises(AdapterError, match="do not fit"):
        weights.init_slot(0, torch.Generator(), model.prompt, fewer)
    wider = prior.tensors | {"blocks.0.img_k": torch.zeros(3, 3)}
    with pytest.raises(AdapterError, match="blocks.0.img_k has shape"):
        weights.init_slot(0, torch.Generator(), model.prompt, wider)


def _train(data: Path, out: Path, steps: int, resume: bool = False) -> dict:
    from pipelines.train_prior.config import TrainPriorConfig
    from pipelines.train_prior.driver import train_prior

    config = TrainPriorConfig(base="tiny", steps=steps, people_per_step=2, limit_people=12, probe_people=1,
                              checkpoint_every=2, log_every=1)
    return train_prior(str(data / "lfw128"), out, config, resume=resume, verbose=False)


def test_train_prior_writes_a_loadable_prior_and_resumes_as_if_never_stopped(shared_data, tmp_path):
    whole = _train(shared_data, tmp_path / "whole", 3)
    _train(shared_data, tmp_path / "cut", 2)
    resumed = _train(shared_data, tmp_path / "cut", 3, resume=True)
    assert whole["steps"] == resumed["steps"] == 3
    a, b = Prior.load(whole["prior"]), Prior.load(resumed["prior"])
    model = load_base("tiny")
    a.check_base(model)
    assert a.info["steps"] == 3 and a.info["config"]["people_per_step"] == 2
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    curve = json.loads((tmp_path / "cut" / "loss_curve.json").read_text())
    assert len(curve["loss"]) == 3 and [p["step"] for p in curve["probes"]] == [0, 2, 3]
    assert max(float(v.abs().max()) for k, v in a.tensors.items() if k.endswith("alpha")) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights = AdapterWeights(block_specs(model), model.config.cross_attention_dim, 1)
        weights.init_slot(0, torch.Generator(), model.prompt, a.tensors)


def test_train_prior_frames_each_photo_once_and_keeps_it_within_its_budget(lfw_bench, monkeypatch):
    import pipelines.train_prior.loop as loop
    from pipelines.train_prior.loop import PreparedPhotos

    trainer = PackedTrainer(load_base("tiny"), PersonalizeConfig(prior="none"), capacity=1)
    paths = [str(p) for p in next(iter(lfw_bench.values()))[:3]]
    decoded: list[str] = []
    monkeypatch.setattr(loop, "load_image", lambda p: decoded.append(p) or load_image(p))
    photos = PreparedPhotos(trainer)
    first, again = photos(paths), photos(paths)
    assert decoded == paths  # the second visit decodes nothing
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    fresh = trainer.prepare_references([load_image(p) for p in paths])
    assert all((a - f.clamp(0, 1)).abs().max() <= 0.5 / 255 + EPS for a, f in zip(first, fresh))  # 8-bit rounding
    one = first[0].numel()
    small = PreparedPhotos(trainer, max_bytes=2 * one)
    small(paths)
    assert small.bytes <= 2 * one and list(small.kept) == paths[1:]  # the oldest went first


def test_personalize_command_chooses_the_start(shipped, lfw_bench, tmp_path, capsys):
    from pfstorer.adapter import Adapter
    from pfstorer.cli import main

    model, prior = shipped
    photos = [str(p) for p in next(iter(lfw_bench.values()))[:3]]
    common = ["personalize", "--base", str(model.weights_location), "--refs", *photos, "--steps", "0", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert Adapter.load(tmp_path / "a").metadata.config["prior_sha256"] == prior.sha256
    assert main([*common, "--out", str(tmp_path / "b"), "--no-prior"]) == 0
    zero = Adapter.load(tmp_path / "b")
    assert zero.metadata.config["prior_sha256"] is None
    assert all(float(v.abs().max()) == 0 for k, v in zero.tensors.items() if k.endswith("alpha"))
    stale = Prior(prior.tensors, "f" * 32, "tiny")
    stale.save(tmp_path / "stale.safetensors")
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "c"), "--prior", str(tmp_path / "stale.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "f" * 32 in err and model.fingerprint in err


@pytest.mark.parametrize("folder", sorted(p.parent for p in (Path(__file__).resolve().parents[2] / "pfstorer" / "weights").glob(
    f"*/{PRIOR_FILE}")) or [pytest.param(None, marks=pytest.mark.skip(reason="no base ships a prior yet"))])
def test_a_shipped_prior_fits_its_base_and_the_size_limit(folder):
    from pfstorer.model import base_fingerprint

    assert (folder / PRIOR_FILE).stat().st_size <= 20 * 2**20  # ships inside the package
    _, fingerprint = base_fingerprint(folder.name)  # shipped folders are named after their preset
    assert Prior.load(folder / PRIOR_FILE).base_fingerprint == fingerprint
    assert PRIOR_FILE in (folder / "MODEL_CARD.md").read_text()
