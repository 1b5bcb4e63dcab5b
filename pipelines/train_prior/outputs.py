"""What a reference-prior run writes: checkpoints ``--resume`` reads back, the prior file, the
loss curve (JSON, and a figure when matplotlib is there)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pfstorer.errors import InputError

CHECKPOINT = "checkpoint"


def save_checkpoint(out: Path, trainer, state: dict[str, Any]) -> None:
    """The slot's weights, its AdamW moments and step count, and ``state`` (step, curves,
    settings), written to a fresh folder that then replaces ``OUT/checkpoint`` whole."""
    from safetensors.torch import save_file

    params, m, v, adam_t = trainer.trainer.opt.slot_state(0)
    tensors = {f"param.{i}": x for i, x in enumerate(params)}
    tensors |= {f"exp_avg.{i}": x for i, x in enumerate(m)} | {f"exp_avg_sq.{i}": x for i, x in enumerate(v)}
    tmp = out / (CHECKPOINT + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: x.contiguous() for k, x in tensors.items()}, tmp / "state.safetensors")
    (tmp / "state.json").write_text(json.dumps(state | {"adam_t": adam_t}))
    old = out / (CHECKPOINT + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if (out / CHECKPOINT).exists():
        (out / CHECKPOINT).rename(old)
    tmp.rename(out / CHECKPOINT)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, trainer, config: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    """Put ``OUT/checkpoint`` back into ``trainer``; its state. Refused if it was made with other
    settings (the number of steps aside) or on another base."""
    from safetensors.torch import load_file

    d = out / CHECKPOINT
    if not (d / "state.json").exists():
        raise InputError(f"--resume: no checkpoint in {out}")
    state = json.loads((d / "state.json").read_text())
    if state["base_fingerprint"] != fingerprint:
        raise InputError(f"--resume: the checkpoint in {out} was made on base {state['base_fingerprint']}, "
                         f"the loaded base is {fingerprint}")
    differ = sorted(k for k in config if k != "steps" and state["config"].get(k) != config[k])
    if differ:
        raise InputError(f"--resume: the checkpoint in {out} was made with other settings ({', '.join(differ)})")
    tensors = load_file(d / "state.safetensors")
    n = len(trainer.trainer.opt.params)
    trainer.trainer.opt.load_slot(0, [tensors[f"param.{i}"] for i in range(n)], [tensors[f"exp_avg.{i}"] for i in range(n)],
                                  [tensors[f"exp_avg_sq.{i}"] for i in range(n)], int(state["adam_t"]))
    trainer.step = int(state["step"])
    return state


def write_curve(out: Path, curve: dict[str, Any]) -> None:
    """``loss_curve.json`` and, with matplotlib, ``loss_curve.png``: the training loss per step and
    the probe's held-out loss."""
    (out / "loss_curve.json").write_text(json.dumps(curve, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    y = np.asarray(curve["loss"], dtype=float)
    if len(y):
        k = max(1, len(y) // 30)
        ax.plot(np.arange(1, len(y) + 1), y, lw=0.5, alpha=0.35, label="training loss per step")
        ax.plot(np.arange(k, len(y) + 1), np.convolve(y, np.ones(k) / k, mode="valid"), lw=1.5, label=f"mean of {k}")
    probes = [p for p in curve["probes"] if "probe_loss" in p]
    if probes:
        ax.plot([p["step"] for p in probes], [p["probe_loss"] for p in probes], marker="o", label="held-out people")
        other = [p for p in probes if "probe_loss_other_refs" in p]
        if other:
            ax.plot([p["step"] for p in other], [p["probe_loss_other_refs"] for p in other], marker="x", ls="--",
                    label="held-out, another person's references")
    ax.set_xlabel("step")
    ax.set_ylabel("eq. 5 loss")
    ax.set_title(f"reference prior on {curve['preset']} ({curve['device']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png")
    plt.close(fig)
