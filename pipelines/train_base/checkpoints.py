"""Checkpoints of base training: what rank 0 reports to the store, what ``--resume`` reads
back, and the exported weights that ship (the EMA ones when EMA is on)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def save_checkpoint(d: Path, model, ema, opt, state: dict[str, Any], disc=None, disc_opt=None) -> None:
    """Weights (raw, so ``load_base(d)`` reads them), EMA, optimizer, discriminator, state.json."""
    import torch
    from safetensors.torch import save_file

    model.invalidate_fingerprint()
    model.save(d)
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, d / "ema.safetensors")
    torch.save(opt.state_dict(), d / "optimizer.pt")
    if disc is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in disc.state_dict().items()},
                  d / "discriminator.safetensors")
        torch.save(disc_opt.state_dict(), d / "disc_optimizer.pt")
    (d / "state.json").write_text(json.dumps(state))


def export_weights(model, ema: dict | None, d: Path) -> str:
    """Write the shipped weights (EMA when on) as config.json + model.safetensors; fingerprint."""
    import torch

    if ema is None:
        model.invalidate_fingerprint()
        model.save(d)
        return model.fingerprint
    raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.load_state_dict({k: ema[k].to(v.device, v.dtype) for k, v in raw.items()})
    model.invalidate_fingerprint()
    model.save(d)
    fp = model.fingerprint
    with torch.no_grad():
        model.load_state_dict(raw)
    model.invalidate_fingerprint()
    return fp


@dataclass
class Resumed:
    """What a checkpoint hands back to a resumed worker (beside the weights, loaded in place)."""

    state: dict[str, Any]
    ema: dict | None
    opt: dict
    disc: dict | None
    disc_opt: dict | None


def load_checkpoint(d: Path, model, use_ema: bool) -> Resumed:
    """Load checkpoint folder ``d`` (:func:`save_checkpoint`) into ``model``; the rest is returned."""
    import torch
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(d / "model.safetensors")))
    ema = load_file(str(d / "ema.safetensors")) if (d / "ema.safetensors").exists() and use_ema else None
    opt = torch.load(d / "optimizer.pt", map_location="cpu", weights_only=True)
    disc = disc_opt = None
    if (d / "discriminator.safetensors").exists():
        disc = load_file(str(d / "discriminator.safetensors"))
        disc_opt = torch.load(d / "disc_optimizer.pt", map_location="cpu", weights_only=True)
    return Resumed(json.loads((d / "state.json").read_text()), ema, opt, disc, disc_opt)
