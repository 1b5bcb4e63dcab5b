"""The shipped `compact` weights (issue 7 acceptance): they load on the CPU and restore
`heavy`-degraded bench photos better than the degraded input on ST-LPIPS and NIQE.

Bench people are never trained on (`pipelines.train_base` refuses them), so these are unseen faces.
Fixed photos (each person's 6th photo: the first 5 are the benchmark's references), fixed
degradation seeds, fixed sampling seed, few DDIM steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest

PEOPLE = 3
STEPS = 10


@pytest.fixture(scope="module")
def compact():
    from pfstorer.model import WEIGHTS_DIR, load_base

    if not (WEIGHTS_DIR / "compact" / "model.safetensors").exists():
        pytest.fail("pfstorer/weights/compact/model.safetensors is missing from the checkout")
    return load_base("compact", device="cpu")


def test_compact_weights_load_on_cpu(compact):
    import json

    from pfstorer.model import WEIGHTS_DIR
    from pfstorer.presets import get_preset

    assert compact.config == get_preset("compact")
    assert compact.device.type == "cpu"
    shipped = WEIGHTS_DIR / "compact"
    assert (shipped / "model.safetensors").stat().st_size <= 40 * 2**20
    assert (shipped / "MODEL_CARD.md").exists()
    card = json.loads((shipped / "config.json").read_text())
    assert card["name"] == "compact"
    # the shipped weights are trained, not the seeded random init
    from pfstorer.model import load_base

    assert compact.fingerprint != load_base("compact", random_weights=True).fingerprint


def test_compact_restores_heavy_bench_photos_better_than_input(compact, lfw_bench: dict[str, list[Path]]):
    import torch

    from pfstorer.degradations import degrade
    from pfstorer.images import load_image
    from pfstorer.metrics import niqe, stlpips
    from pfstorer.sampling import restore_batch

    people = [name for name, photos in lfw_bench.items() if len(photos) > 5][:PEOPLE]
    assert len(people) == PEOPLE
    gt = torch.stack([load_image(lfw_bench[p][5]) for p in people])
    lq = torch.stack([degrade(img, "heavy", 1000 + i) for i, img in enumerate(gt)])
    out = restore_batch(compact, lq, seeds=list(range(PEOPLE)), steps=STEPS, sampler="ddim")
    assert out.shape == gt.shape and torch.isfinite(out).all()

    lp_in = [stlpips(x, g) for x, g in zip(lq, gt, strict=True)]
    lp_out = [stlpips(x, g) for x, g in zip(out, gt, strict=True)]
    nq_in = [niqe(x) for x in lq]
    nq_out = [niqe(x) for x in out]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    msg = (f"ST-LPIPS input {mean(lp_in):.4f} -> restored {mean(lp_out):.4f} (per photo {lp_in} -> {lp_out}); "
           f"NIQE input {mean(nq_in):.3f} -> restored {mean(nq_out):.3f} (per photo {nq_in} -> {nq_out})")
    print(msg)
    assert mean(lp_out) < mean(lp_in), msg
    assert mean(nq_out) < mean(nq_in), msg
