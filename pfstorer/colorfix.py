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
from pfstorer.images import from_unit, to_unit

__all__ = ["METHODS", "color_fix", "wavelet_decompose", "wavelet_lowpass"]

METHODS = ("wavelet", "adain", "none")
LEVELS = 5  # a-trous levels: dilations 1..16, a receptive radius of 31 px
BAND = 256  # rows per band: memory beyond input and output is a band, not an image
_EPS = 1e-5


def _blur_axis(x: torch.Tensor, d: int, dim: int) -> torch.Tensor:
    """``[1, 2, 1] / 4`` along ``dim`` with taps ``d`` apart, replicate borders."""
    n = x.shape[dim]
    edge = [d if i == dim else s for i, s in enumerate(x.shape)]
    xp = torch.cat([x.narrow(dim, 0, 1).expand(edge), x, x.narrow(dim, n - 1, 1).expand(edge)], dim)
    return (xp.narrow(dim, 0, n) + xp.narrow(dim, 2 * d, n)).add_(xp.narrow(dim, d, n), alpha=2).mul_(0.25)


def _dilated_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """3x3 binomial blur with holes (``dilation``), replicate borders: one a-trous level.

    Separable, by shifted slices: the same numbers as a dilated depthwise ``conv2d`` on a
    replicate-padded image (up to float rounding), without the CPU's im2col buffer of 9x the input.
    """
    return _blur_axis(_blur_axis(x, dilation, x.ndim - 2), dilation, x.ndim - 1)


def wavelet_lowpass(x: torch.Tensor, levels: int = LEVELS) -> torch.Tensor:
    """The low-frequency residual of a ``levels``-level a-trous decomposition (linear in ``x``)."""
    for i in range(levels):
        x = _dilated_blur(x, 2**i)
    return x


def wavelet_decompose(x: torch.Tensor, levels: int = LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``[B,C,H,W]`` into (high, low) with ``high + low == x`` (up to float rounding)."""
    low = wavelet_lowpass(x, levels)
    return x - low, low


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (image, channel) mean and population std of ``[B,C,H,W]`` (uint8 or float), streamed
    over row bands in float64 so a huge image needs no float copy of itself."""
    b, c, h, w = x.shape
    s1 = torch.zeros((b, c), dtype=torch.float64, device=x.device)
    s2 = torch.zeros_like(s1)
    for y0 in range(0, h, BAND):
        band = to_unit(x[:, :, y0 : y0 + BAND]).double()
        s1 += band.sum(dim=(-2, -1))
        s2 += band.square().sum(dim=(-2, -1))
    mean = s1 / (h * w)
    std = (s2 / (h * w) - mean.square()).clamp_(min=0).sqrt()
    return mean.float().view(b, c, 1, 1), std.float().view(b, c, 1, 1)


def color_fix(
    restored: torch.Tensor,
    source: torch.Tensor,
    method: Literal["wavelet", "adain", "none"] = "wavelet",
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Correct the colours of ``restored`` with ``source`` (the LQ input); ``[3,H,W]`` or
    ``[B,3,H,W]``, uint8 or float in [0,1], any size; the result is clamped to [0, 1] (or 0..255),
    in ``restored``'s dtype or written into ``out`` (which may be ``restored`` itself: in place).

    Works through the image in row bands (with a halo of 2^levels - 1 rows for the wavelet, so the
    bands are exact): memory beyond the inputs and the output is one band, whatever the size. The
    wavelet fix uses linearity, ``high(r) + low(s) = r + low(s - r)``: one decomposition, not two.
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
    batched = restored.ndim == 4
    r = restored if batched else restored[None]
    s = source if batched else source[None]
    if s.shape[-2:] != r.shape[-2:]:
        s = F.interpolate(to_unit(s).to(r.device), size=r.shape[-2:], mode="bicubic", align_corners=False, antialias=True)
    dst = torch.empty(r.shape, dtype=r.dtype, device=r.device) if out is None else out
    if dst.ndim == 3:
        dst = dst[None]
    h = r.shape[-2]
    if method == "adain":
        mr, sr = _moments(r)
        ms, ss = _moments(s)
        mr, ms = mr.to(r.device), ms.to(r.device)
        gain = (ss / (sr + _EPS)).to(r.device)
    halo = 2**LEVELS - 1 if method == "wavelet" else 0
    carry = to_unit(r[:, :, :0])  # the original rows above this band: ``out`` may be ``restored``
    for y0 in range(0, h, BAND):
        y1 = min(h, y0 + BAND)
        a, b = max(0, y0 - halo), min(h, y1 + halo)
        band = torch.cat([carry, to_unit(r[:, :, y0:b])], dim=2)  # rows [a, b), as they were
        carry = band[:, :, max(0, y1 - halo) - a : y1 - a].clone()
        if method == "wavelet":
            src = to_unit(s[:, :, a:b].to(r.device))
            band += wavelet_lowpass(src - band)
        elif method == "adain":
            band = (band - mr) * gain + ms
        dst[:, :, y0:y1] = from_unit(band[:, :, y0 - a : y1 - a], dst.dtype)
    return dst if batched else dst[0]
