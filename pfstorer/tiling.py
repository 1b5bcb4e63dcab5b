"""Tiles for restoring images of any size with a model of fixed native size.

Overlapping tiles cover the image; every denoising step the tiles' noise predictions are averaged
with *symmetric* Gaussian weights centred on each tile (StableSR's weights sit off-centre in y:
we do not copy that), so no tile border is ever a hard edge.
"""

from __future__ import annotations

import math

import torch


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one axis: first at 0, last flush with the end, stride tile - overlap."""
    if size <= tile:
        return [0]
    stride = max(1, tile - overlap)
    n = math.ceil((size - tile) / stride) + 1
    return [min(i * stride, size - tile) for i in range(n)]


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """``(y, x, h, w)`` of every tile; a tile never exceeds the image."""
    th, tw = min(tile, height), min(tile, width)
    return [(y, x, th, tw) for y in tile_starts(height, th, overlap) for x in tile_starts(width, tw, overlap)]


def gaussian_weights(height: int, width: int, sigma_ratio: float = 0.3) -> torch.Tensor:
    """Symmetric 2-D Gaussian over a tile, peak at the exact centre, never zero at the border."""

    def axis(n: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        return torch.exp(-(pos**2) / (2 * (sigma_ratio * n) ** 2))

    return (axis(height)[:, None] * axis(width)[None, :]).float()
