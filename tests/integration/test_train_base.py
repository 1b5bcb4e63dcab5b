"""Base training (`pfstorer train-base`): the real Ray Train TorchTrainer with `tiny` on the CPU.

One short run (4 steps, checkpoint every 2) and its resumption to 6 steps are shared by the tests:
two sources (lfw128 and faces1024 at random face scales), x4 SR inputs, the adversarial, detail-energy and structure losses on.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

STEPS, RESUMED_STEPS = 4, 6


def _config(steps: int):
    from pipelines.train_base import TrainBaseConfig

    return TrainBaseConfig(base="tiny", steps=steps, batch_size=2, lr=1e-3, checkpoint_every=2, warmup=1,
                           log_every=100, threads=1, ema=0.9, loss_weighting="trunc-snr", holdout=4, probe_every=2,
                           face_scale=(24, 300), p_sr=0.5, adv_weight=0.1, adv_start=1,
                           detail_weight=0.5, structure_weight=1.0)


@pytest.fixture(scope="module")
def runs(ray_session, shared_data: Path, tmp_path_factory):
    """The first run, the fingerprint of its last checkpoint, then the resumed run."""
    from pfstorer.model import load_base
    from pipelines.train_base import Source, holdout_people, load_split, train_base

    out = tmp_path_factory.mktemp("train_base")
    data = [Source(data=str(shared_data / "lfw128")), Source(data=str(shared_data / "faces1024"), face_px=450)]
    first = train_base(data=data, out=out, config=_config(STEPS), limit=16, verbose=False)
    held = [holdout_people(load_split(src.data, "train", limit=16)[1], 2) for src in data]  # a tenth, at least 2
    first_curve = json.loads((out / "loss_curve.json").read_text())
    ckpt = Path(first.checkpoint)
    ckpt_files = sorted(p.name for p in ckpt.iterdir())
    ckpt_fp = load_base(str(ckpt)).fingerprint
    reported = sorted(p.name for p in (Path(first.store) / first.run_name).glob("checkpoint_*") if p.is_dir())
    first_model_fp = load_base(str(out)).fingerprint
    second = train_base(data=data, out=out, config=_config(RESUMED_STEPS), limit=16, resume=True, verbose=False)
    second_curve = json.loads((out / "loss_curve.json").read_text())
    return {"out": out, "first": first, "first_curve": first_curve, "ckpt_files": ckpt_files, "ckpt_fp": ckpt_fp,
            "first_model_fp": first_model_fp, "reported": reported, "second": second, "second_curve": second_curve,
            "held": held}


def test_training_records_loss_and_writes_checkpoints(runs):
    first, curve = runs["first"], runs["first_curve"]
    assert first.steps == STEPS and first.resumed_from == 0
    assert len(curve["loss"]) == STEPS and all(math.isfinite(v) and v > 0 for v in curve["loss"])
    # 16 photos of each source, less their held-out people
    assert curve["split"] == "train" and curve["photos"] == 32 - sum(len(h) for h in runs["held"])
    assert {"config.json", "model.safetensors", "optimizer.pt", "state.json", "discriminator.safetensors",
            "disc_optimizer.pt"} <= set(runs["ckpt_files"])
    assert runs["reported"] == ["checkpoint_00000002", "checkpoint_00000004"]  # every --checkpoint-every steps
    assert Path(first.checkpoint).name == "checkpoint_00000004"


def test_held_out_photos_are_probed_at_fixed_timesteps(runs):
    probes = runs["second_curve"]["probes"]
    assert [p["step"] for p in probes] == [2, 4, 6]  # every probe_every steps, kept across the resume
    for p in probes:
        for prefix in ("", "faces1024/"):  # each source's held-out people, the first unprefixed
            psnrs = {k: v for k, v in p.items() if "psnr" in k and k.startswith(prefix) and ("/" in k) == bool(prefix)}
            assert len(psnrs) == 8 and all(math.isfinite(v) for v in psnrs.values()), p  # 3 t's + input, 2 levels
    # the degraded inputs are fixed, so their PSNR is the same at every probe
    assert len({(p["input_psnr_heavy"], p["input_psnr_light"]) for p in probes}) == 1


def test_holdout_takes_whole_people():
    from pipelines.train_base import holdout_people

    ids = ["a", "a", "b", "c", "c", "c", "d"]
    held = holdout_people(ids, 3, seed=0)
    people = {ids[i] for i in held}
    assert len(held) >= 3 and held == [i for i, x in enumerate(ids) if x in people]  # every photo of each
    assert holdout_people(ids, 3, seed=0) == held and holdout_people(ids, 0) == []


def test_resume_continues_from_the_checkpoint(runs):
    second, curve, first_curve = runs["second"], runs["second_curve"], runs["first_curve"]
    assert second.run_name == runs["first"].run_name  # same run in the same store: Ray hands back its checkpoint
    assert second.resumed_from == STEPS and second.steps == RESUMED_STEPS
    assert curve["resumed_from"] == STEPS
    assert curve["loss"][:STEPS] == first_curve["loss"]  # history carried over, counter continues
    assert len(curve["loss"]) == RESUMED_STEPS
    # the discriminator trained at every step and the adversarial term acted from adv_start on
    assert len(curve["disc_loss"]) == RESUMED_STEPS and len(curve["adv_loss"]) == RESUMED_STEPS - 1
    for term in ("detail_loss", "structure_loss"):
        assert len(curve[term]) == RESUMED_STEPS and all(v > 0 for v in curve[term])
    # the weights at the start of the resumed run are exactly those of the checkpoint
    assert curve["start_fingerprint"] == runs["ckpt_fp"]
    assert Path(second.checkpoint).name == f"checkpoint_{RESUMED_STEPS:08d}"


def test_saved_weights_load_and_differ_from_random_init(runs):
    from pfstorer.model import load_base

    out = runs["out"]
    trained = load_base(str(out))
    assert trained.config.name == "tiny"
    assert trained.fingerprint == runs["second"].fingerprint
    assert trained.fingerprint != load_base("tiny").fingerprint
    assert runs["first_model_fp"] != load_base("tiny").fingerprint
    assert trained.fingerprint != runs["first_model_fp"]  # the resumed steps changed the weights
    assert (out / "loss_curve.json").exists()


def test_bench_is_refused(shared_data: Path, tmp_path: Path):
    from pfstorer.errors import InputError
    from pipelines.train_base import TrainBaseConfig, load_split, train_base

    with pytest.raises(InputError, match="bench"):
        train_base(data=str(shared_data / "lfw128"), out=tmp_path / "o", split="bench",
                   config=TrainBaseConfig(base="tiny", steps=1))
    # a training split that shares a person with bench is refused too
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "index.csv").write_text("identity,path,split\nAnna,a.jpg,train\nAnna,b.jpg,bench\n")
    with pytest.raises(InputError, match="shares 1 identities with bench"):
        load_split(str(tmp_path / "d"), "train")


def test_cli_parses_train_base():
    from pipelines.train_base import register_cli

    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-base", "--base", "tiny", "--data", "d", "--steps", "7", "--batch-size", "4",
                              "--lr", "1e-4", "--out", "o", "--resume", "--workers", "2", "--use-gpu", "--bf16",
                              "--checkpoint-every", "3", "--init", "w"])
    assert (args.steps, args.batch_size, args.workers, args.checkpoint_every) == (7, 4, 2, 3)
    assert args.resume and args.use_gpu and args.bf16 and args.init == "w"
