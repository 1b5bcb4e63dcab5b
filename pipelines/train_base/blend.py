"""``pfstorer blend-base``: interpolate two checkpoints of one base (fidelity <-> detail)."""

from __future__ import annotations

from pathlib import Path


def blend_weights(fidelity: str | Path, detail: str | Path, weight: float, out: str | Path,
                  dtype: str = "float16") -> str:
    """Network interpolation (Wang et al., ESRGAN): ``(1 - weight) * fidelity + weight * detail``,
    parameter by parameter, of two checkpoints of one preset (their EMA weights when they have
    them), saved to ``out``; returns the fingerprint.

    Why: the adversarial fine-tune trades fidelity (PSNR, identity on lightly degraded faces) for
    detail; interpolating it with the checkpoint it started from moves smoothly between the two,
    and ``weight`` is the knob. It is chosen once, when a base is made: a knob per request would
    change the base that adapters are trained against and bound to (its fingerprint)."""
    import torch
    from safetensors.torch import load_file

    from pfstorer.errors import InputError
    from pfstorer.model import load_base

    if not 0.0 <= weight <= 1.0:
        raise InputError(f"blend weight must be in [0, 1], got {weight}")

    def state(d: Path) -> dict[str, torch.Tensor]:
        return load_file(str(d / ("ema.safetensors" if (d / "ema.safetensors").exists() else "model.safetensors")))

    a_dir, b_dir = Path(fidelity), Path(detail)
    model = load_base(str(a_dir if (a_dir / "model.safetensors").exists() else b_dir))
    a, b = state(a_dir), state(b_dir)
    if set(a) != set(b) or set(a) != set(model.state_dict()):
        raise InputError(f"{a_dir} and {b_dir} are not checkpoints of the same preset ({model.config.name})")
    with torch.no_grad():
        model.load_state_dict({k: (a[k].double() * (1 - weight) + b[k].double() * weight).to(v.dtype)
                               for k, v in model.state_dict().items()})
    model.invalidate_fingerprint()
    model.save(out, dtype=getattr(torch, dtype))
    return load_base(str(out)).fingerprint
