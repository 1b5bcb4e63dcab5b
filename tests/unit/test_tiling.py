"""Tiled restoration: seams, tile sizes, every stage tiled.

What is checked, and which bug each check catches:
- the CLI turns a 1024x707 wild photo with ``--scale 2`` into a 2048x1414 PNG, placed right
  (crop/padding/tile-placement bugs) and computed on tiles only (untiled stages);
- with a tile larger than the image the tiled path equals a plain untiled sampling loop bit for bit
  (``tiny`` and ``tiny-latent``): no blending arithmetic, VAE tiling or seeding drift sneaks in;
- no seams: along tile borders the output's gradient is no larger than inside the tiles, a check
  that a naive stitch (hard-edged box tiles) fails;
- ``tile_starts``/``tile_grid`` cover the image exactly, stay inside it and honour the overlap;
  ``gaussian_weights`` are symmetric in x *and* y (StableSR's are off-centre in y), peak at the
  centre, are positive everywhere and small at the border;
- the colour fix runs once, on the stitched image: ``restore(color_fix=m)`` equals
  ``color_fix(restore(color_fix="none"), upscaled input, m)``; with AdaIN the output's channel
  means and stds are the upscaled input's;
- the tile batch size changes nothing but speed.

Cost: the real ``tiny`` network runs on small images only (1-2 steps); the two checks on big or
structured images replace the network by a stand-in denoiser (documented where used), so the
whole file stays well under a minute on two CPU cores.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pfstorer.model as pf_model
import pfstorer.tiling as tiling
from pfstorer.colorfix import color_fix
from pfstorer.images import load_image
from pfstorer.model import load_base, pad_to_multiple
from pfstorer.sampling import make_scheduler, restore, sampler_updates, upscale
from pfstorer.tiling import gaussian_weights, tile_grid, tile_starts

from _torch import reassociation_atol


# --- fixtures and helpers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return load_base("tiny")


@pytest.fixture(scope="module")
def tiny_latent():
    return load_base("tiny-latent")


@pytest.fixture(scope="module")
def photo(shared_data: Path) -> torch.Tensor:
    """A real photo (wild/person1/img4.jpg, 1024x707), [3,H,W] in [0,1]."""
    return load_image(shared_data / "wild" / "person1" / "img4.jpg")


def _resized(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.interpolate(img[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / F.mse_loss(a.float(), b.float())))


def _oracle(model, x0_fn):
    """A stand-in denoiser that predicts the noise of ``z_t`` as if the clean image were
    ``x0_fn(lq_tile)``: DDIM then returns the Gaussian blend of the tiles' ``x0_fn`` outputs, so
    what tiling does to a model's per-tile answers shows in the output without sampling noise."""
    ac = make_scheduler(model, "ddim").alphas_cumprod

    def denoise(z_t, t, lq, pb=None):
        a = ac[t.long().cpu()].to(z_t.device, z_t.dtype).view(-1, 1, 1, 1)
        return (z_t - a.sqrt() * x0_fn(lq)) / (1 - a).sqrt()

    return denoise


def _untiled_restore(model, image, *, seed, scale, steps, color_fix_method):
    """The plain sampling loop on the whole image: no tiles, no blending, no VAE tiling."""
    g = model.config.granularity
    lq_img = upscale(image[None], scale)
    padded, (h, w) = pad_to_multiple(lq_img, g)
    with torch.no_grad():
        lq = model.to_latent(padded)
        z = torch.randn((1, *lq.shape[1:]), generator=torch.Generator("cpu").manual_seed(seed))
        for u in sampler_updates(model, "ddim", steps):
            eps = model.denoise(z, torch.tensor([u.t]), lq)
            z = z.mul(u.a).add(eps, alpha=u.b)  # the update of sampler_updates
        out = model.from_latent(z)[..., :h, :w]
    return color_fix(out, lq_img, color_fix_method).float().cpu()[0]


# --- acceptance 1: 1024x707 photo, --scale 2 -> 2048x1414 via the CLI ---------------------------
def _wild_1024x707(shared_data: Path, tmp_path: Path) -> Path:
    from PIL import Image

    for p in sorted((shared_data / "wild").glob("person*/*")):
        with Image.open(p) as im:
            if im.size == (1024, 707):
                return p
    # none of exactly that size: resize the first photo in memory and hand the CLI a PNG
    first = sorted((shared_data / "wild").glob("person*/*"))[0]
    with Image.open(first) as im:
        out = tmp_path / "wild_1024x707.png"
        im.convert("RGB").resize((1024, 707), Image.BICUBIC).save(out)
    return out


def test_cli_scale2_restores_1024x707_wild_photo_to_2048x1414(shared_data, tmp_path, monkeypatch):
    """Acceptance: ``pfstorer restore --scale 2`` of a 1024x707 wild photo returns 2048x1414.

    Everything runs for real (decode, upscale, pad, tile grid, per-step blending, crop, colour
    fix, PNG) except the network: ``tiny`` on 15 tiles of 512 px costs minutes on a CPU and
    decides nothing about geometry, so its ``denoise`` is replaced by an oracle whose clean image is
    the LQ tile. The blend of those is the upscaled photo itself, which makes misplaced tiles,
    shifts, flips or a wrong crop visible as a PSNR drop. The stand-in also records what the model
    is shown: only 512x512 tiles, never the whole image.
    """
    from PIL import Image

    from pfstorer.cli import main

    src = _wild_1024x707(shared_data, tmp_path)
    seen: list[tuple[int, ...]] = []
    real_load_base = pf_model.load_base

    def load_base_with_oracle(*args, **kwargs):
        model = real_load_base(*args, **kwargs)
        oracle = _oracle(model, lambda lq: lq)

        def denoise(z_t, t, lq, pb=None):
            seen.append(tuple(z_t.shape))
            return oracle(z_t, t, lq)

        monkeypatch.setattr(model, "denoise", denoise)
        return model

    monkeypatch.setattr(pf_model, "load_base", load_base_with_oracle)
    out = tmp_path / "restored.png"
    tile, overlap = 512, 32
    rc = main(["restore", "--base", "tiny", "--input", str(src), "--out", str(out), "--scale", "2",
               "--steps", "1", "--tile", str(tile), "--overlap", str(overlap), "--quiet",
               "--color-fix", "adain"])  # wavelet is tested below; at 2.9 Mpx it costs ~10 s of CPU
    assert rc == 0
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == (2048, 1414)
        assert im.mode == "RGB"
    # the model saw tiles only: 2048 x 1416 (padded to the granularity) in 512 px tiles, 32 px overlap
    n_tiles = len(tile_grid(1416, 2048, tile, overlap))
    assert n_tiles == len(tile_starts(1416, tile, overlap)) * len(tile_starts(2048, tile, overlap)) == 15
    assert all(s[-2:] == (tile, tile) for s in seen), seen
    assert sum(s[0] for s in seen) == n_tiles  # one step, every tile once
    # ...and every tile landed where it belongs
    restored = load_image(out)
    expected = upscale(load_image(src)[None], 2)[0]
    assert _psnr(restored, expected) > 30


# --- acceptance 2a: a tile larger than the image == untiled, bit for bit ------------------------
@pytest.mark.parametrize("preset", ["tiny", "tiny-latent"])
def test_tile_larger_than_image_equals_untiled_bit_for_bit(preset, tiny, tiny_latent, photo):
    model = tiny if preset == "tiny" else tiny_latent
    img = _resized(photo, 37, 51)  # x2 -> 74x102: not a multiple of the granularity, so padded
    kwargs = dict(seed=3, scale=2, steps=2)
    expected = _untiled_restore(model, img, color_fix_method="wavelet", **kwargs)
    tiled = restore(model, img, tile=256, overlap=32, color_fix="wavelet", **kwargs)
    assert tiled.shape == (3, 74, 102)
    assert torch.equal(tiled, expected)
    # a different tile size that still exceeds the image changes nothing either
    assert torch.equal(restore(model, img, tile=128, overlap=0, color_fix="wavelet", **kwargs), expected)
    # while small tiles really are a different computation (the check above is not vacuous)
    assert not torch.equal(restore(model, img, tile=32, overlap=8, color_fix="wavelet", **kwargs), expected)


# --- acceptance 2b: no seams with small tiles --------------------------------------------------
def _gradient_profile(out: torch.Tensor, axis: int) -> torch.Tensor:
    """Mean |difference| between neighbouring columns (axis -1) or rows (axis -2): entry j is
    the step between j and j+1."""
    d = out.diff(dim=axis).abs()
    return d.mean(dim=(0, 1)) if axis == -1 else d.mean(dim=(0, 2))


def _borders(size: int, tile: int, overlap: int) -> list[int]:
    """Profile indices of every tile edge inside the image (tile starts and ends)."""
    starts = tile_starts(size, min(tile, size), overlap)
    return sorted({s - 1 for s in starts if s > 0} | {s + tile - 1 for s in starts if s + tile < size})


def _seam_ratios(out: torch.Tensor, tile: int, overlap: int, untiled: torch.Tensor, margin: int = 4):
    """Per axis (x, y): (largest gradient across a tile border / median gradient of the image,
    largest gradient across a tile border / the untiled output's gradient at the same place)."""
    res = []
    for axis in (-1, -2):
        prof, ref = _gradient_profile(out, axis), _gradient_profile(untiled, axis)
        b = _borders(out.shape[axis], tile, overlap)
        inside = prof[margin:-margin].median()  # the image's own outer border is no tile border
        res.append((float(prof[b].max() / inside), float((prof[b] / ref[b]).max())))
    return res


def test_small_tiles_leave_no_seam_that_a_naive_stitch_leaves(tiny, photo, monkeypatch):
    """Along tile borders the output's gradient is no larger than inside tiles.

    A random-weight network's output is noise, whose gradient would hide any seam. So the network
    is replaced by a stand-in with the two faults that make real tiles disagree: a zero-padded
    7x7 blur (a CNN's darkened tile borders) and a per-tile colour offset (a tile's own colour
    drift). Input: a real photo, degraded to 48x64 and super-resolved x4 through ``restore``.
    Two measures per axis: border gradient / median gradient of the image (the photo's own edges
    reach ~1.35 there, hence the limit 1.5), and border gradient / the untiled output's gradient
    at the same columns (content-free; 1 = no seam). A naive stitch - box weights, no overlap -
    fails both; so does a too-wide Gaussian (sigma = 0.3 tile, border weight 0.26).
    """
    box7 = torch.ones(3, 1, 7, 7) / 49

    def tile_answer(lq):
        return F.conv2d(lq, box7.to(lq), padding=3, groups=3) + 0.5 * lq.mean(dim=(1, 2, 3), keepdim=True)

    monkeypatch.setattr(tiny, "denoise", _oracle(tiny, tile_answer))
    lq = _resized(photo, 48, 64)
    tile, overlap = 64, 16
    run = dict(scale=4, steps=1, color_fix="none")

    untiled = restore(tiny, lq, tile=512, **run)
    blended = restore(tiny, lq, tile=tile, overlap=overlap, **run)
    with monkeypatch.context() as m:  # the naive stitch: hard-edged tiles side by side
        m.setattr(tiling, "gaussian_weights", lambda h, w, *a, **k: torch.ones(h, w))
        naive = restore(tiny, lq, tile=tile, overlap=0, **run)
    with monkeypatch.context() as m:  # blending, but tile borders keep a quarter of the weight
        m.setattr(tiling, "gaussian_weights", lambda h, w, *a, **k: gaussian_weights(h, w, sigma_ratio=0.3))
        wide = restore(tiny, lq, tile=tile, overlap=overlap, **run)

    limits = (1.5, 1.15)

    def seamless(ratios) -> bool:
        return all(r[0] < limits[0] and r[1] < limits[1] for r in ratios)

    assert seamless(_seam_ratios(untiled, tile, overlap, untiled))  # the photo itself passes
    got = _seam_ratios(blended, tile, overlap, untiled)
    assert seamless(got), f"seams: (border/median, border/untiled) for x, y: {got}"
    bad = _seam_ratios(naive, tile, 0, untiled)
    assert all(r[0] > 2 * limits[0] and r[1] > 2 * limits[1] for r in bad), f"check is blind to a naive stitch: {bad}"
    assert not seamless(_seam_ratios(wide, tile, overlap, untiled))


# --- item 1 unit tests: the tile grid ------------------------------------------------------------
CASES = [(size, tile, ov) for size in (1, 7, 63, 64, 65, 100, 257, 1000) for tile in (8, 64, 96)
         for ov in (0, 1, 16, 7) if ov < tile]


@pytest.mark.parametrize(("size", "tile", "overlap"), CASES)
def test_tile_starts_cover_flush_inside_and_overlapping(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    if size <= tile:
        assert starts == [0]
        return
    assert starts[0] == 0
    assert starts[-1] == size - tile  # last tile flush with the end
    assert all(0 <= s <= size - tile for s in starts)  # no tile outside
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(0 < g <= tile - overlap for g in gaps)  # increasing, and overlap honoured
    covered = torch.zeros(size, dtype=torch.int32)
    for s in starts:
        covered[s : s + tile] += 1
    assert bool((covered > 0).all())
    # no wasted tiles: one fewer could not cover with this stride
    assert len(starts) == math.ceil((size - tile) / (tile - overlap)) + 1


@pytest.mark.parametrize(("h", "w", "tile", "overlap"),
                         [(64, 64, 64, 16), (70, 200, 64, 16), (200, 70, 32, 0), (130, 129, 48, 47), (10, 500, 64, 8)])
def test_tile_grid_covers_every_pixel_with_equal_tiles_inside_the_image(h, w, tile, overlap):
    tiles = tile_grid(h, w, tile, overlap)
    count = torch.zeros(h, w, dtype=torch.int32)
    shapes = {(th, tw) for _, _, th, tw in tiles}
    assert shapes == {(min(tile, h), min(tile, w))}  # one shape: tiles batch together
    for y, x, th, tw in tiles:
        assert 0 <= y and y + th <= h and 0 <= x and x + tw <= w
        count[y : y + th, x : x + tw] += 1
    assert bool((count >= 1).all())
    assert len(set(tiles)) == len(tiles)
    # neighbours overlap by at least `overlap` px where the image is larger than a tile
    ys = sorted({y for y, _, _, _ in tiles})
    xs = sorted({x for _, x, _, _ in tiles})
    for starts, side in ((ys, min(tile, h)), (xs, min(tile, w))):
        assert all(side - (b - a) >= min(overlap, side) for a, b in zip(starts, starts[1:]))


# --- item 1 unit tests: the blending weights ----------------------------------------------------
def _stablesr_weights(tile_height: int, tile_width: int) -> torch.Tensor:
    """StableSR's ``_gaussian_weights`` (ddpm.py): the y midpoint is ``h / 2``, not ``(h - 1) / 2``."""
    var = 0.01
    mx, my = (tile_width - 1) / 2, tile_height / 2
    x = torch.tensor([math.exp(-((i - mx) ** 2) / tile_width**2 / (2 * var)) for i in range(tile_width)])
    y = torch.tensor([math.exp(-((i - my) ** 2) / tile_height**2 / (2 * var)) for i in range(tile_height)])
    return (y[:, None] * x[None, :]).float()


def _symmetric(w: torch.Tensor) -> bool:
    return torch.equal(w, w.flip(0)) and torch.equal(w, w.flip(1))


@pytest.mark.parametrize(("h", "w"), [(64, 64), (32, 32), (63, 63), (48, 80), (1, 5), (2, 2)])
def test_gaussian_weights_symmetric_peaked_positive(h, w):
    wt = gaussian_weights(h, w)
    assert wt.shape == (h, w) and wt.dtype == torch.float32
    assert _symmetric(wt)  # in x and in y
    # the peak is the centre pixel (odd) or the four centre pixels (even)
    cy, cx = [(n // 2,) if n % 2 else (n // 2 - 1, n // 2) for n in (h, w)]
    peak = wt.max()
    centre = torch.stack([wt[i, j] for i in cy for j in cx])
    assert bool((centre == peak).all())
    assert int((wt == peak).sum()) == len(cy) * len(cx)
    # monotone falling away from the centre along both axes
    for line in (wt[cy[0]], wt[:, cx[0]]):
        half = line[: (len(line) + 1) // 2]
        assert bool((half[1:] >= half[:-1]).all())
    # positive everywhere: every pixel of the image gets a finite, defined blend
    assert float(wt.min()) > 0


def test_gaussian_weights_border_is_small_so_tile_borders_do_not_leak():
    """A tile's border pixels (zero padding, missing context) must weigh little against the
    neighbour tile, whose centre region covers them at the default quarter-tile overlap."""
    n = 64
    wt = gaussian_weights(n, n)
    edge = float(wt[n // 2, 0] / wt.max())
    assert 0 < edge < 0.05
    # at the default overlap (n/4) the neighbour's weight on that pixel dominates 10:1 or more
    neighbour = float(wt[n // 2, n - n // 4] / wt.max())
    assert neighbour > 10 * edge


def test_stablesr_off_centre_weights_fail_the_symmetry_check():
    """The symmetry check catches StableSR's bug (symmetric in x, off by half a pixel in y)."""
    w = _stablesr_weights(64, 64)
    assert torch.equal(w, w.flip(1))
    assert not _symmetric(w)


# --- colour fix once, after stitching -----------------------------------------------------------
@pytest.mark.parametrize("method", ["adain", "wavelet"])
def test_color_fix_is_applied_once_after_stitching(tiny, photo, method):
    lq = _resized(photo, 48, 64)
    run = dict(seed=5, scale=2, steps=1, tile=64, overlap=16)  # 96x128 in 2x3 tiles
    assert len(tile_grid(96, 128, 64, 16)) == 6
    raw = restore(tiny, lq, color_fix="none", **run)
    fixed = restore(tiny, lq, color_fix=method, **run)
    source = upscale(lq[None], 2)
    assert torch.equal(fixed, color_fix(raw[None], source, method)[0])
    if method == "adain":  # the stitched output takes the (upscaled) input's colour statistics
        assert torch.allclose(fixed.mean(dim=(1, 2)), source[0].mean(dim=(1, 2)), atol=2e-3)
        assert torch.allclose(fixed.std(dim=(1, 2)), source[0].std(dim=(1, 2)), atol=5e-3)


# --- tiles are batched: batch size changes nothing but speed -------------------------------------
def test_tile_batch_size_does_not_change_the_result(tiny, photo):
    img = _resized(photo, 96, 128)
    run = dict(seed=1, steps=1, tile=64, overlap=16, color_fix="none")
    one = restore(tiny, img, tile_batch=1, **run)
    many = restore(tiny, img, tile_batch=8, **run)
    exact = restore(load_base("tiny", dtype=torch.float64), img, tile_batch=1, **run)  # float64 network
    atol = reassociation_atol(one, exact)
    assert atol < 1e-3  # float32 rounding stays far below an 8-bit level (a wrong tile would not)
    torch.testing.assert_close(one, many, rtol=0, atol=atol)


# --- every stage tiled: the networks only ever see tiles ------------------------------------------
def test_latent_preset_runs_vae_and_unet_on_tiles_only(tiny_latent, photo):
    model = tiny_latent
    img = _resized(photo, 160, 192)
    tile = 64
    sides: dict[str, list[tuple[int, int]]] = {"encoder": [], "decoder": [], "unet": [], "lq_encoder": []}

    def record(name):
        def hook(_module, args):
            sides[name].append(tuple(args[0].shape[-2:]))
        return hook

    handles = [model.vae.encoder.register_forward_pre_hook(record("encoder")),
               model.vae.decoder.register_forward_pre_hook(record("decoder")),
               model.unet.register_forward_pre_hook(record("unet")),
               model.lq_encoder.register_forward_pre_hook(record("lq_encoder"))]
    try:
        out = restore(model, img, steps=1, tile=tile, overlap=16, color_fix="none")
    finally:
        for h in handles:
            h.remove()
    assert out.shape == (3, 160, 192)
    f = model.config.vae_factor
    assert sides["encoder"] and max(max(s) for s in sides["encoder"]) <= tile
    assert sides["decoder"] and max(max(s) for s in sides["decoder"]) <= tile // f
    for name in ("unet", "lq_encoder"):
        assert sides[name] and set(sides[name]) == {(tile // f, tile // f)}, sides[name]
