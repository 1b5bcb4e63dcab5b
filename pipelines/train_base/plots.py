"""The loss-curve figure of a base-training run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curve(curve: dict[str, Any], path: Path) -> bool:
    """The loss per step and, when probed, per source the held-out PSNR of the clean-image
    estimates, and the sharpness of those made from the LQ (1: as much detail as the truth)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import numpy as np

    probes = [p for p in curve.get("probes", []) if len(p) > 1]
    groups = sorted({k.split("/")[0] + "/" if "/" in k else "" for p in probes for k in p if "psnr" in k})
    sharp = sorted({k for p in probes for k in p if "sharpness" in k})
    panels = 1 + len(groups) + (1 if sharp else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.5), dpi=100, squeeze=False)
    ax = axes[0][0]
    y = np.asarray(curve["loss"], dtype=float)
    k = max(1, len(y) // 50)
    smooth = np.convolve(y, np.ones(k) / k, mode="valid")
    ax.plot(np.arange(1, len(y) + 1), y, lw=0.5, alpha=0.35, label="per step")
    ax.plot(np.arange(k, len(y) + 1), smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss ({curve['config'].get('loss', 'mse')})")
    ax.set_yscale("log")
    ax.set_title(f"{curve['preset']} base training ({curve['device']})", fontsize=9)
    ax.legend()
    steps = [p["step"] for p in probes]
    for ax, prefix in zip(axes[0][1:], groups):
        names = sorted({k for p in probes for k in p if k.startswith(prefix + "x0_psnr")})
        for name in names:
            ax.plot(steps, [p.get(name, np.nan) for p in probes], marker=".",
                    label=name.removeprefix(prefix + "x0_psnr_"))
        for level, style in (("heavy", ":"), ("light", "--")):
            ax.axhline(probes[-1][f"{prefix}input_psnr_{level}"], color="k", ls=style, lw=1, label=f"input ({level})")
        ax.set_xlabel("step")
        ax.set_ylabel("held-out PSNR of x0 estimate (dB)")
        first = Path(str(curve["data"][0]["data"]).rstrip("/")).name if curve.get("data") else "first source"
        ax.set_title(f"{prefix.rstrip('/') or first}: x0 estimate at fixed t (lq_t: from the LQ)", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    if sharp:
        ax = axes[0][-1]
        for name in sharp:
            ax.plot(steps, [p.get(name, np.nan) for p in probes], marker=".", label=name.replace("x0_sharpness_", ""))
        ax.axhline(1.0, color="k", lw=1, label="the truth")
        ax.set_xlabel("step")
        ax.set_ylabel("sharpness (Laplacian variance / truth's)")
        ax.set_yscale("log")
        ax.set_title("detail of the x0 estimate from the LQ", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
