"""Colour correction of restored images against their low-quality input.

Diffusion restorers drift in colour (a slightly different skin tone or white balance) while the
LQ input, however blurry, has the right colours. So after restoration (once, after stitching the
tiles) we keep the restored image's detail and take the colour from the input:

- ``adain``: per-channel mean and standard deviation of the source (global; cheap, robust).
- ``wavelet``: the restored image's high frequencies plus the source's low frequencies, split
  with a 5-level a-trous (dilated 3x3 binomial blur) decomposition, as StableSR's
  ``wavelet_color_fix`` does; local, so it also corrects colour that drifts across the photo.
- ``none``: the restored image as it is.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from pfstorer.errors import InputError

__all__ = ["METHODS", "adain", "color_fix", "wavelet_decompose"]

METHODS = ("wavelet", "adain", "none")
_EPS = 1e-5
_KERNEL = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0


def _dilated_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """3x3 binomial blur with holes (``dilation``), replicate borders: one a-trous level."""
    c = x.shape[1]
    k = _KERNEL.to(x).expand(c, 1, 3, 3)
    xp = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(xp, k, groups=c, dilation=dilation)


def wavelet_decompose(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``[B,C,H,W]`` into (high, low) with ``high + low == x`` (up to float rounding)."""
    high = torch.zeros_like(x)
    low = x
    for i in range(levels):
        blurred = _dilated_blur(low, 2**i)
        high = high + (low - blurred)
        low = blurred
    return high, low


def adain(restored: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Give ``restored`` (``[B,C,H,W]``) the per-channel mean and std of ``source`` (no clamp)."""
    mr = restored.mean(dim=(-2, -1), keepdim=True)
    sr = restored.std(dim=(-2, -1), keepdim=True, unbiased=False)
    ms = source.mean(dim=(-2, -1), keepdim=True)
    ss = source.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (restored - mr) / (sr + _EPS) * ss + ms


def color_fix(
    restored: torch.Tensor,
    source: torch.Tensor,
    method: Literal["wavelet", "adain", "none"] = "wavelet",
) -> torch.Tensor:
    """Correct the colours of ``restored`` with ``source`` (the LQ input); ``[3,H,W]`` or
    ``[B,3,H,W]``, any size, result clamped to [0, 1].

    A source of another spatial size (an LQ before super-resolution) is resized to the restored
    size first, bicubically, since only its low frequencies are used.
    """
    if method not in METHODS:
        raise InputError(f"unknown colour fix {method!r} (known: {', '.join(METHODS)})")
    if restored.ndim not in (3, 4) or restored.shape[-3] != 3:
        raise InputError(f"expected restored images [3,H,W] or [B,3,H,W], got {tuple(restored.shape)}")
    if source.ndim != restored.ndim or source.shape[:-2] != restored.shape[:-2]:
        raise InputError(
            f"colour fix source {tuple(source.shape)} does not match restored {tuple(restored.shape)}"
        )
    if method == "none":
        return restored.clamp(0, 1)
    batched = restored.ndim == 4
    dtype = restored.dtype
    r = (restored if batched else restored[None]).float()
    s = (source if batched else source[None]).to(device=r.device, dtype=torch.float32)
    if s.shape[-2:] != r.shape[-2:]:
        s = F.interpolate(s, size=r.shape[-2:], mode="bicubic", align_corners=False, antialias=True)
    if method == "adain":
        out = adain(r, s)
    else:
        high, _ = wavelet_decompose(r)
        _, low = wavelet_decompose(s)
        out = high + low
    out = out.clamp_(0, 1).to(dtype)
    return out if batched else out[0]
