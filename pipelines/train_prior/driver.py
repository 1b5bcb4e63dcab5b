"""``pfstorer train-prior``'s run: data, the step loop with probes and checkpoints, the outputs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.train_prior.config import TrainPriorConfig


def train_prior(data: str, out: str | Path, config: TrainPriorConfig = TrainPriorConfig(), *, split: str = "train",
                weights: str | None = None, device: str = "cpu", threads: int | None = None, resume: bool = False,
                verbose: bool = True) -> dict[str, Any]:
    """Train a reference prior for ``config.base`` on the pairs of ``split`` of ``data``; write
    ``OUT/prior.safetensors`` (also at every checkpoint), ``OUT/loss_curve.json`` (+ ``.png``),
    ``OUT/train_log.jsonl`` and ``OUT/checkpoint/``. Returns a summary."""
    import torch

    from pfstorer.model import load_base
    from pfstorer.prior import PRIOR_FILE, Prior
    from pipelines.train_prior.data import pair_people, split_probe
    from pipelines.train_prior.loop import PriorTrainer
    from pipelines.train_prior.outputs import (
        load_checkpoint,
        save_checkpoint,
        write_curve,
    )

    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    c = config
    people = pair_people(data, split, c.limit_people, c.seed)
    train, probe = split_probe(people, c.probe_people, c.seed)
    model = load_base(c.base, weights=weights, device=device)
    trainer = PriorTrainer(model, c)
    settings = c.model_dump(mode="json")
    curve: dict[str, Any] = {"preset": model.config.name, "device": str(model.device), "loss": [], "probes": []}
    seconds = 0.0
    if resume:
        state = load_checkpoint(out, trainer, settings, model.fingerprint)
        curve["loss"], curve["probes"], seconds = state["loss"], state["probes"], state["seconds"]
        _log(verbose, f"resumed at step {trainer.step} of {c.steps}")
    record = {"config": settings, "data": str(data), "split": split, "people": len(train), "photos":
              sum(len(v) for v in train.values()), "probe_people": sorted(probe)}
    _log(verbose, f"{len(train)} people ({record['photos']} photos) to train on, {len(probe)} held out; "
                  f"base {model.config.name} {model.fingerprint}")

    def probe_now() -> None:
        p = trainer.probe(probe)
        if p:
            curve["probes"].append({"step": trainer.step, **p})
            other = f", with another person's references {p['probe_loss_other_refs']:.5f}" if len(p) > 2 else ""
            _log(verbose, f"step {trainer.step}: probe loss {p['probe_loss']:.5f} (L_diff {p['probe_diff']:.5f}){other}")

    def save() -> None:
        info = record | {"steps": trainer.step, "seconds": round(seconds, 1),
                         "probes": curve["probes"][:1] + curve["probes"][-1:]}
        Prior(trainer.slot_tensors(), model.fingerprint, model.config.name, info).save(out / PRIOR_FILE)
        save_checkpoint(out, trainer, {"step": trainer.step, "config": settings, "base_fingerprint": model.fingerprint,
                                       "loss": curve["loss"], "probes": curve["probes"], "seconds": seconds})
        write_curve(out, curve | {"config": settings})

    if not curve["probes"]:
        probe_now()  # step 0: alpha = 0, the base's own loss
    log = (out / "train_log.jsonl").open("a")
    t0 = time.perf_counter()
    while trainer.step < c.steps:
        curve["loss"].append(trainer.train_step(train))
        seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        s = trainer.step
        if s % c.log_every == 0 or s == c.steps:
            window = curve["loss"][-c.log_every:]
            line = {"step": s, "loss": sum(window) / len(window), "s_per_step": seconds / max(1, len(curve["loss"]))}
            log.write(json.dumps(line) + "\n")
            log.flush()
            _log(verbose, f"step {s}/{c.steps}: loss {line['loss']:.5f} (mean of {len(window)}), "
                          f"{line['s_per_step']:.2f} s/step")
        if s % c.probe_every == 0 or s == c.steps:
            probe_now()
        if s % c.checkpoint_every == 0 or s == c.steps:
            save()
        t0 = time.perf_counter()
    log.close()
    if not (out / PRIOR_FILE).exists():
        save()
    first, last = (curve["probes"][0], curve["probes"][-1]) if curve["probes"] else ({}, {})
    return {"prior": str(out / PRIOR_FILE), "base_fingerprint": model.fingerprint, "steps": trainer.step,
            "seconds": round(seconds, 1), "people": len(train), "probe_people": len(probe),
            "probe_start": first.get("probe_loss"), "probe_end": last.get("probe_loss")}


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(f"[train-prior] {msg}", file=sys.stderr, flush=True)
