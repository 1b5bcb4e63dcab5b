"""Tiles for restoring images of any size with a model of fixed native size.

Overlapping tiles cover the image; every denoising step the tiles' noise predictions are averaged
with *symmetric* Gaussian weights centred on each tile (StableSR's weights sit off-centre in y:
we do not copy that), so no tile border is ever a hard edge.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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


def gaussian_weights(height: int, width: int, sigma_ratio: float = 0.15) -> torch.Tensor:
    """Symmetric 2-D Gaussian over a tile, peak at the exact centre, never zero at the border.

    ``sigma_ratio`` 0.15 (of the tile side) puts 0.4% of the peak weight on a tile's border pixels,
    where a network lacks context (zero padding), while the neighbour tile, centred a quarter
    tile away at the default overlap, covers them with ~50x the weight: border artefacts do not
    leak into the blend. 0.3 left 26% there and seams showed (tests/unit/test_tiling.py); 0.1
    (StableSR) makes the hand-over between tiles abrupt when tiles disagree, and its corner weight
    (1e-11) underflows in float16.
    """

    def axis(n: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        return torch.exp(-(pos**2) / (2 * (sigma_ratio * n) ** 2))

    return (axis(height)[:, None] * axis(width)[None, :]).float()


Tile = tuple[int, int, int, int]
TileFn = Callable[[list[tuple[int, Tile]]], torch.Tensor]
FlushFn = Callable[[int, int, torch.Tensor], None]


def blend_rows(
    tiles: Sequence[Tile],
    run: TileFn,
    flush: FlushFn,
    *,
    batch: int,
    channels: int,
    out_height: int,
    out_width: int,
    factor: float = 1.0,
    tile_batch: int = 8,
    device: torch.device | str = "cpu",
) -> None:
    """Run ``run`` over every (batch row, tile), blend the outputs, and stream them out by rows.

    Tiles are visited one row of tiles at a time; ``run`` gets up to ``tile_batch`` jobs
    ``(batch index, tile)`` of one row and returns ``[n, channels, h*factor, w*factor]`` (``factor``
    maps tile coordinates to output coordinates: 1 for the denoiser, the VAE factor for decoding,
    its inverse for encoding). Outputs are weighted with :func:`gaussian_weights` (a lone tile gets
    weight 1, so an untiled run is exact) and accumulated in float32 in a *band* only as tall as the
    rows still open. As soon as no later tile row can touch a row, ``flush(y0, y1, blended)`` gets
    rows ``[y0, y1)`` normalised, ``[batch, channels, y1 - y0, out_width]``, and the band drops them.

    Why rows: the caller can then update its full-size state *in place* (the sampler's DDIM step,
    the decoder's output), so memory beyond the caller's own buffers is one band plus one batch of
    tiles, whatever the image size.
    """
    ys = sorted({t[0] for t in tiles})
    single = len(tiles) == 1
    acc = torch.zeros((batch, channels, 0, out_width), device=device)
    wsum = torch.zeros((1, 1, 0, out_width), device=device)
    top = 0  # the output row that acc[..., 0, :] holds
    for r, y in enumerate(ys):
        row = [t for t in tiles if t[0] == y]
        oy, oh = round(y * factor) - top, round(row[0][2] * factor)
        if acc.shape[-2] < oy + oh:  # open the rows this tile row reaches
            grow = oy + oh - acc.shape[-2]
            acc = torch.cat([acc, acc.new_zeros((batch, channels, grow, out_width))], dim=2)
            wsum = torch.cat([wsum, wsum.new_zeros((1, 1, grow, out_width))], dim=2)
        ow = round(row[0][3] * factor)
        weight = torch.ones((oh, ow), device=device) if single else gaussian_weights(oh, ow).to(device)
        for _, x, _, _ in row:
            ox = round(x * factor)
            wsum[0, 0, oy : oy + oh, ox : ox + ow] += weight
        jobs = [(i, t) for t in row for i in range(batch)]
        for start in range(0, len(jobs), tile_batch):
            chunk = jobs[start : start + tile_batch]
            out = run(chunk)
            if tuple(out.shape[-3:]) != (channels, oh, ow):
                raise ValueError(f"tile function returned {tuple(out.shape)}, expected [n, {channels}, {oh}, {ow}]")
            for k, (i, (_, x, _, _)) in enumerate(chunk):
                ox = round(x * factor)
                acc[i, :, oy : oy + oh, ox : ox + ow].addcmul_(out[k].float(), weight)
        done = round(ys[r + 1] * factor) if r + 1 < len(ys) else out_height
        n = done - top
        flush(top, done, acc[:, :, :n] / wsum[:, :, :n])
        acc, wsum, top = acc[:, :, n:], wsum[:, :, n:], done
