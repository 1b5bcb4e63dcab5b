"""The shipped `compact` weights: they load on the CPU, and at the CLI's defaults they restore
`heavy`-degraded bench photos and leave `light`-degraded ones no worse (the base gates of
:mod:`pfstorer.gates`, on a few photos; ``benchmarks/bench_base.py`` measures them on 40).

Bench people are never trained on (`pipelines.train_base` refuses them), so these are unseen faces.
Fixed photos (each person's 6th and 7th: the first 5 are the benchmark's references), fixed
degradation seeds, fixed sampling seed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

PEOPLE, PER_PERSON = 4, 2


@pytest.fixture(scope="module")
def compact():
    from pfstorer.model import WEIGHTS_DIR, load_base

    if not (WEIGHTS_DIR / "compact" / "model.safetensors").exists():
        pytest.fail("pfstorer/weights/compact/model.safetensors is missing from the checkout")
    return load_base("compact", device="cpu")


def test_compact_weights_load_on_cpu(compact):
    import json

    from pfstorer.model import WEIGHTS_DIR, base_fingerprint, load_base
    from pfstorer.presets import get_preset

    assert compact.config == get_preset("compact")
    assert compact.device.type == "cpu"
    shipped = WEIGHTS_DIR / "compact"
    assert (shipped / "model.safetensors").stat().st_size <= 40 * 2**20
    assert (shipped / "MODEL_CARD.md").exists()
    assert json.loads((shipped / "config.json").read_text())["name"] == "compact"
    # the shipped weights are trained, not the seeded random init (which is the identity map)
    assert compact.fingerprint != load_base("compact", random_weights=True).fingerprint
    # by name or by folder, one base: the folder's config is the preset's (adapter shape included),
    # and the fingerprint in the file's header is the one loading computes
    by_folder = load_base(str(shipped))
    assert by_folder.config == compact.config and by_folder.fingerprint == compact.fingerprint
    assert base_fingerprint(str(shipped))[1] == base_fingerprint("compact")[1] == compact.fingerprint


@pytest.mark.parametrize("level", ["heavy", "light"])
def test_compact_passes_the_base_gates_on_bench_photos(compact, lfw_bench: dict[str, list[Path]], level):
    import torch

    from pfstorer.degradations import degrade
    from pfstorer.gates import base_gates
    from pfstorer.images import load_image
    from pfstorer.metrics import compute_metrics
    from pfstorer.sampling import restore_batch

    people = [name for name, photos in lfw_bench.items() if len(photos) >= 5 + PER_PERSON][:PEOPLE]
    assert len(people) == PEOPLE
    gt = torch.stack([load_image(lfw_bench[p][5 + k]) for p in people for k in range(PER_PERSON)])
    lq = torch.stack([degrade(img, level, 1000 + i) for i, img in enumerate(gt)]).mul(255).round().to(torch.uint8)
    out = restore_batch(compact, lq, seeds=[0] * len(gt))  # the preset's sampling defaults, as the CLI
    assert out.shape == lq.shape and out.dtype == torch.uint8

    def means(images: torch.Tensor) -> dict[str, float]:
        scores = [compute_metrics(x.float() / 255, g, names=("psnr", "st_lpips", "id_facenet"))
                  for x, g in zip(images, gt, strict=True)]
        mean = {m: sum(s[m].value for s in scores) / len(scores) for m in ("psnr", "st_lpips", "id_facenet")}
        return {**mean, "id_facenet": 100 * mean["id_facenet"]}

    inp, res = means(lq), means(out)
    checks = base_gates(level, inp, res)
    msg = f"{level}: input {inp} -> restored {res}; gates {checks}"
    print(msg)
    assert all(ok for _, ok in checks), msg


@pytest.mark.parametrize("p_lq_start", [0.0, 1.0])
def test_personalization_rows_can_start_where_restore_starts(compact, lfw_bench, monkeypatch, p_lq_start):
    # p_lq_start = 1: every L_diff row is what restore feeds the base (the LQ diffused to t_start)

    from pfstorer.images import load_image
    from pfstorer.sampling import alphas_cumprod
    from pfstorer.training import PackedTrainer, PersonalizeConfig, PersonalizeJob

    refs = [load_image(p) for p in next(iter(lfw_bench.values()))[:3]]
    cfg = PersonalizeConfig(steps=1, batch_size=2, p_lq_start=p_lq_start, loss="l1", lambda_gen=0.1)
    trainer = PackedTrainer(compact, cfg, capacity=1)
    trainer.add(PersonalizeJob("p", refs, seed=0))
    seen = []
    real = compact.denoise
    monkeypatch.setattr(compact, "denoise", lambda x, t, lq, pb=None: seen.append((x, t, lq)) or real(x, t, lq, pb))
    trainer.step()
    x, t, lq = seen[0]
    assert len(t) == 4  # the L_diff rows, then the L_gen rows; references come as cached features
    main = t[:2]
    t_start = compact.config.sampling.t_start
    if p_lq_start:
        assert main.tolist() == [t_start, t_start]
        a = float(alphas_cumprod(compact)[t_start])
        noise = (x[:2] - a**0.5 * lq[:2]) / (1 - a) ** 0.5  # x_t = sqrt(a) LQ + sqrt(1 - a) noise
        assert abs(float(noise.std()) - 1.0) < 0.1
    else:
        assert bool((main < compact.config.train_t_max).all())
