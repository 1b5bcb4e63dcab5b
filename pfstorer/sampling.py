"""Restoration: sample a clean image conditioned on the LQ image, tiled for any size.

``restore`` upsamples the input by ``scale`` (super-resolution = upsample, then restore), pads it to
the model's granularity, encodes it (tiled VAE for latent presets), runs DDIM or DDPM from seeded
noise, or from the LQ diffused to the preset's ``t_start`` (its sampling defaults), with the
predictions of overlapping tiles blended every step (:mod:`pfstorer.tiling`), decodes (tiled),
crops and applies the colour fix once after stitching. The same seed gives the same
output bit for bit. A batch may mix identities: each row has its own adapter slot and seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .adapter import Adapter
from .colorfix import BAND
from .deadline import Checkpoint
from .errors import InputError, TooLargeError
from .images import from_unit, to_unit
from .model import RestorationModel
from .personalization import AdapterSlots, PBRun
from .presets import BaseConfig
from .restore_options import ColorFix, RestoreOptions, Sampler
from .tiling import blend_rows, tile_grid

MAX_OUTPUT_PIXELS = 8192 * 8192


def make_scheduler(model: RestorationModel, sampler: Sampler):
    from diffusers import DDIMScheduler, DDPMScheduler

    c = model.config
    kwargs = dict(
        num_train_timesteps=c.num_train_timesteps,
        beta_start=c.beta_start,
        beta_end=c.beta_end,
        beta_schedule=c.beta_schedule,
        prediction_type="epsilon",
        clip_sample=False,
    )
    if sampler == "ddim":
        return DDIMScheduler(**kwargs, set_alpha_to_one=False, timestep_spacing="trailing")
    if sampler == "ddpm":
        return DDPMScheduler(**kwargs, timestep_spacing="trailing")
    raise InputError(f"unknown sampler {sampler!r}; use ddim or ddpm")


def alphas_cumprod(model: RestorationModel) -> torch.Tensor:
    """The base's noise schedule, alpha-bar_t for every training timestep (float32, CPU; shared:
    index it, never write it)."""
    c = model.config
    key = (c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule)
    if key not in _ALPHAS_CUMPROD:
        _ALPHAS_CUMPROD[key] = make_scheduler(model, "ddpm").alphas_cumprod.float()
    return _ALPHAS_CUMPROD[key]


_ALPHAS_CUMPROD: dict[tuple, torch.Tensor] = {}


def diffuse(model: RestorationModel, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Forward noising, z_t = sqrt(alpha-bar_t) z0 + sqrt(1 - alpha-bar_t) noise, one timestep per
    row (DDPM's closed form of q(z_t | z0), which the paper's eqs. 2 and 4 train against). The one
    place it is written; :func:`restore_batch` applies the same map in place, band by band, to
    start from the LQ diffused to ``t_start``."""
    a = alphas_cumprod(model)[t.cpu()].to(z0.device, z0.dtype).view(-1, *[1] * (z0.ndim - 1))
    return a.sqrt() * z0 + (1 - a).sqrt() * noise.to(z0.device, z0.dtype)


@dataclass(frozen=True)
class Update:
    """One sampler step as a per-pixel linear map: ``x_prev = a * x_t + b * pred + c * noise``.

    ``pred`` is what the denoiser predicts (the noise, or the clean image for ``x0_residual``
    presets). DDIM (eta = 0) and DDPM steps are linear in ``x_t`` and the prediction, so a row band
    of the image can be stepped *in place* as soon as its blended prediction is known (no
    full-size temporaries, no scheduler state per call). For noise-predicting presets the
    coefficients replicate diffusers' ``DDIMScheduler.step`` / ``DDPMScheduler.step`` (checked in
    tests/unit/test_sampling.py).
    """

    t: int
    a: float
    b: float
    c: float


def sampling_timesteps(model: RestorationModel, sampler: Sampler, steps: int, t_start: int | None = None) -> list[int]:
    """The timesteps visited, noisiest first: diffusers' trailing spacing from pure noise, or
    ``steps`` evenly spaced ones from ``t_start`` down (``t_start`` below the schedule's length:
    sampling starts from the LQ diffused to ``t_start``)."""
    total = model.config.num_train_timesteps
    if t_start is None or t_start >= total:
        sched = make_scheduler(model, sampler)
        sched.set_timesteps(steps)
        return [int(t) for t in sched.timesteps]
    if not 1 <= steps <= t_start:
        raise InputError(f"steps must be in [1, t_start] = [1, {t_start}], got {steps}")
    return [round(t_start * (steps - k) / steps) for k in range(steps)]


def sampler_updates(model: RestorationModel, sampler: Sampler, steps: int, t_start: int | None = None) -> list[Update]:
    """The ``steps`` updates of ``sampler`` (from ``t_start``, see :func:`sampling_timesteps`)."""
    sched = make_scheduler(model, sampler)
    ac = sched.alphas_cumprod.double()
    x0_pred = model.config.prediction == "x0_residual"
    ts = sampling_timesteps(model, sampler, steps, t_start)
    total = model.config.num_train_timesteps
    # The last step lands on the clean image. diffusers' DDIM (set_alpha_to_one=False) stops at
    # alphas_cumprod[0] instead; noise-predicting presets keep that, x0-predicting ones return x0.
    final = 1.0 if x0_pred or sampler == "ddpm" else float(sched.final_alpha_cumprod)
    from_noise = t_start is None or t_start >= total
    out = []
    for k, t in enumerate(ts):
        a_t = float(ac[t])
        if sampler == "ddim" and from_noise:
            prev = t - total // steps  # diffusers' DDIM previous timestep
        else:
            prev = ts[k + 1] if k + 1 < len(ts) else -1
        a_prev = float(ac[prev]) if prev >= 0 else final
        if sampler == "ddim":  # x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps
            if x0_pred:
                a = math.sqrt(1 - a_prev) / math.sqrt(1 - a_t)
                out.append(Update(t, a, math.sqrt(a_prev) - a * math.sqrt(a_t), 0.0))
            else:
                a = math.sqrt(a_prev / a_t)
                out.append(Update(t, a, math.sqrt(1 - a_prev) - math.sqrt(a_prev) * math.sqrt(1 - a_t) / math.sqrt(a_t),
                                  0.0))
            continue
        beta_t, beta_prev = 1 - a_t, 1 - a_prev  # DDPM posterior: mean c_x0 x0 + c_xt x_t
        cur_beta = 1 - a_t / a_prev
        c_x0 = math.sqrt(a_prev) * cur_beta / beta_t
        c_xt = math.sqrt(a_t / a_prev) * beta_prev / beta_t
        c = math.sqrt(max(beta_prev / beta_t * cur_beta, 1e-20)) if prev >= 0 else 0.0
        if x0_pred:
            out.append(Update(t, c_xt, c_x0, c))
        else:
            out.append(Update(t, c_x0 / math.sqrt(a_t) + c_xt, -c_x0 * math.sqrt(beta_t) / math.sqrt(a_t), c))
    return out


def _row_noise(seed: int, step: int, y0: int, y1: int, shape: tuple[int, int]) -> torch.Tensor:
    """DDPM noise for rows ``[y0, y1)``: one generator seed per (image seed, step, row), so the noise
    of a pixel does not depend on how the image was cut into tiles or bands."""
    g = torch.Generator("cpu")
    rows = []
    for y in range(y0, y1):
        g.manual_seed(((int(seed) & 0xFFFFFFFF) << 32) | (step << 20) | y)
        rows.append(torch.randn(shape, generator=g))
    return torch.stack(rows, dim=1)  # [C, rows, W]


def _cubic_rows(y0: int, y1: int, in_size: int, out_size: int) -> tuple[torch.Tensor, int, int]:
    """Weights ``[y1 - y0, r1 - r0]`` of torch's bicubic upsampling (A = -0.75, half-pixel centres,
    clamped borders) for output rows ``[y0, y1)``, and the input rows ``[r0, r1)`` they read."""
    A = -0.75
    ratio = in_size / out_size
    src = [(y + 0.5) * ratio - 0.5 for y in range(y0, y1)]
    r0 = max(0, math.floor(src[0]) - 1)
    r1 = min(in_size, math.floor(src[-1]) + 3)
    m = torch.zeros((y1 - y0, r1 - r0), dtype=torch.float32)
    for k, s in enumerate(src):
        base = math.floor(s)
        t = s - base
        w = [((A * (t + 1) - 5 * A) * (t + 1) + 8 * A) * (t + 1) - 4 * A,
             ((A + 2) * t - (A + 3)) * t * t + 1,
             ((A + 2) * (1 - t) - (A + 3)) * (1 - t) * (1 - t) + 1,
             ((A * (2 - t) - 5 * A) * (2 - t) + 8 * A) * (2 - t) - 4 * A]
        for j in range(4):
            m[k, min(max(base - 1 + j, 0), in_size - 1) - r0] += w[j]
    return m, r0, r1


def upscale(image: torch.Tensor, scale: float) -> torch.Tensor:
    """Resize ``[B,3,H,W]`` (uint8, or float in [0,1]) by ``scale``, keeping its dtype.

    Enlarging (super-resolution) is bicubic, computed in row bands (rows by a weight matrix,
    columns by ``F.interpolate``) so a large output never exists as a float copy; shrinking is
    antialiased bicubic on the whole image (the input is the larger of the two there).
    """
    if scale == 1:
        return image
    h, w = image.shape[-2:]
    oh, ow = max(1, round(h * scale)), max(1, round(w * scale))
    if scale < 1:
        small = F.interpolate(to_unit(image), size=(oh, ow), mode="bicubic", align_corners=False, antialias=True)
        return from_unit(small, image.dtype)
    out = torch.empty((*image.shape[:2], oh, ow), dtype=image.dtype, device=image.device)
    for y0 in range(0, oh, BAND):
        y1 = min(oh, y0 + BAND)
        m, r0, r1 = _cubic_rows(y0, y1, h, oh)
        rows = torch.einsum("yr,bcrw->bcyw", m.to(image.device), to_unit(image[:, :, r0:r1]))
        band = F.interpolate(rows, size=(y1 - y0, ow), mode="bicubic", align_corners=False)
        out[:, :, y0:y1] = from_unit(band, image.dtype)
    return out


def _pad_index(size: int, padded: int, reflect: bool, device: torch.device) -> torch.Tensor:
    """Source index of each padded row/column: bottom/right padding by reflection (as
    :func:`pfstorer.model.pad_to_multiple`), or by replication where the image is too small."""
    idx = torch.arange(padded)
    over = idx >= size
    idx[over] = (2 * (size - 1) - idx[over]) if reflect else size - 1
    return idx.to(device)


def tile_layout(config: BaseConfig, tile: int | None = None, overlap: int | None = None) -> tuple[int, int]:
    """The tile side and overlap (output pixels) a restore uses: ``tile`` rounded down to the
    model's granularity (unset: the native tile), ``overlap`` (unset: the preset's fraction of
    the tile)."""
    g = config.granularity
    tile_px = max(g, ((tile or config.sample_size) // g) * g)
    overlap_px = int(tile_px * config.sampling.overlap) if overlap is None else overlap
    if not 0 <= overlap_px < tile_px:
        raise InputError(f"overlap must be in [0, tile) = [0, {tile_px}), got {overlap_px}")
    return tile_px, overlap_px


@torch.no_grad()
def restore_batch(
    model: RestorationModel,
    images: torch.Tensor,
    *,
    adapters: AdapterSlots | None = None,
    slots: Sequence[int] | None = None,
    seeds: Sequence[int] = (0,),
    strength: float | Sequence[float] = 1.0,
    scale: float = 1.0,
    steps: int | None = None,
    sampler: Sampler | None = None,
    t_start: int | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    tile_batch: int = 8,
    color_fix: ColorFix | None = None,
    pad_to_tile: bool | None = None,
    progress: bool = False,
    deadline: Checkpoint | None = None,
) -> torch.Tensor:
    """Restore a batch ``[B,3,H,W]`` (uint8, or float in [0,1]); row i uses adapter ``slots[i]`` and
    seed ``seeds[i]``. The result has the input's dtype (float32 for float inputs), on the CPU.

    ``strength`` (one for all rows, or one per row) in [0, 1] scales each adapter's gates alpha:
    0 is the base model bit for bit, 1 the adapter as trained.

    ``steps``, ``sampler``, ``t_start`` and ``color_fix`` default to the preset's
    :class:`~pfstorer.presets.SamplingDefaults`;
    ``t_start`` below the schedule's length starts from the LQ diffused to that timestep, at or
    above it from pure noise.

    ``deadline`` is checked before every batch of tiles that goes through a network: past it, or
    once cancelled, the restore stops with :class:`~pfstorer.deadline.DeadlineExceededError` or
    :class:`~pfstorer.deadline.CancelledError`. A server passes its fair share of the model here
    instead (:class:`~pfstorer.deadline.Checkpoint`): the check may then wait while another
    request's tiles run.

    ``tile``/``overlap`` are in output pixels (defaults: the model's native size, and the preset's
    fraction of the tile, :attr:`~pfstorer.presets.SamplingDefaults.overlap`).
    ``pad_to_tile`` pads a photo smaller than a tile up to a whole tile (cropped again at the end;
    default: when the model is compiled, so photos of every size reuse one graph per tile shape;
    the extra border context changes the result slightly against an unpadded restore).

    Memory: the networks only ever see tiles, and every full-size stage streams in row bands (the
    upscale, the per-tile LQ crops and padding, the VAE encode/decode, the in-place sampler step
    of :func:`pfstorer.tiling.blend_rows`, the colour fix). What grows with the image is the input,
    the output and the sampler state ``z`` (float32: pixel presets 12 bytes/px, latent presets
    1/12 to 1/48 of that). Pass uint8 images for large photos: float32 input and output cost 24 more bytes
    per pixel. Latent presets decode into the output buffer and colour-fix it in place, so with
    uint8 photos the decoded image is rounded to 8 bits before the colour fix (at most a level or
    two of difference from a float32 run).
    """
    from .colorfix import color_fix as apply_color_fix

    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"expected images of shape [B,3,H,W], got {tuple(images.shape)}")
    chosen = model.config.sampling.override(sampler=sampler, steps=steps, t_start=t_start, color_fix=color_fix)
    sampler, steps, t_start, color_fix = chosen.sampler, chosen.steps, chosen.t_start, chosen.color_fix
    if steps < 1:
        raise InputError("steps must be >= 1")
    if t_start < 1:
        raise InputError(f"t_start must be >= 1, got {t_start}")
    updates = sampler_updates(model, sampler, steps, t_start)  # checks steps against t_start
    if scale <= 0 or scale > 32:
        raise InputError(f"scale must be in (0, 32], got {scale}")
    b = images.shape[0]
    if len(seeds) != b:
        raise InputError(f"{b} images need {b} seeds, got {len(seeds)}")
    h0, w0 = images.shape[-2:]
    out_h, out_w = max(1, round(h0 * scale)), max(1, round(w0 * scale))
    if out_h * out_w > MAX_OUTPUT_PIXELS:
        raise TooLargeError(f"output would be {out_w}x{out_h} pixels, over the limit of {MAX_OUTPUT_PIXELS}")
    cfg = model.config
    g, f = cfg.granularity, cfg.vae_factor
    tile_px, overlap_px = tile_layout(cfg, tile, overlap)
    dev = model.device
    check = deadline.check if deadline is not None else (lambda: None)
    out_dtype = torch.uint8 if images.dtype == torch.uint8 else torch.float32
    if images.dtype != torch.uint8:
        images = images.float()

    lq = upscale(images.to(dev), scale)  # [B,3,h,w], the input's dtype
    h, w = lq.shape[-2:]
    hp, wp = -(-h // g) * g, -(-w // g) * g
    if model.compiled if pad_to_tile is None else pad_to_tile:
        hp, wp = max(hp, tile_px), max(wp, tile_px)
    reflect = hp - h < h and wp - w < w
    rows_idx, cols_idx = _pad_index(h, hp, reflect, dev), _pad_index(w, wp, reflect, dev)

    def lq_pixels(i: int, y: int, x: int, th: int, tw: int) -> torch.Tensor:
        """LQ tile ``[3,th,tw]`` in [0,1] of the padded image, gathered from the unpadded one."""
        crop = lq[i].index_select(1, rows_idx[y : y + th]).index_select(2, cols_idx[x : x + tw])
        return to_unit(crop)

    hz, wz = hp // f, wp // f
    tiles = tile_grid(hz, wz, tile_px // f, overlap_px // f)
    if model.vae is None:  # pixel space: the denoiser's LQ tile is the pixel tile, in [-1,1]

        def lq_tile(i: int, y: int, x: int, th: int, tw: int) -> torch.Tensor:
            return model.to_latent(lq_pixels(i, y, x, th, tw)[None])[0]

    else:  # latent space: encode the LQ once, tile by tile, into a (small) latent
        cond = torch.empty((b, cfg.latent_channels, hz, wz), device=dev, dtype=torch.float32)
        ptiles = [(y * f, x * f, th * f, tw * f) for y, x, th, tw in tiles]  # the latent grid, in pixels

        def encode(chunk: list) -> torch.Tensor:
            check()
            return model.to_latent(torch.stack([lq_pixels(i, *t) for i, t in chunk]))

        def keep(y0: int, y1: int, rows: torch.Tensor) -> None:
            cond[:, :, y0:y1] = rows

        blend_rows(ptiles, encode, keep, batch=b, channels=cfg.latent_channels, out_height=hz, out_width=wz,
                   factor=1 / f, tile_batch=tile_batch, device=dev)

        def lq_tile(i: int, y: int, x: int, th: int, tw: int) -> torch.Tensor:
            return cond[i, :, y : y + th, x : x + tw].to(model.dtype)

    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    z = torch.empty((b, cfg.latent_channels, hz, wz), device=dev, dtype=torch.float32)
    for i, gen in enumerate(gens):  # in place: the same numbers as torch.randn(shape, generator=gen)
        if dev.type == "cpu":
            z[i].normal_(generator=gen)
        else:
            z[i].copy_(torch.randn(z.shape[1:], generator=gen))

    if t_start < cfg.num_train_timesteps:  # start from the LQ diffused to t_start: z = sqrt(a) lq + sqrt(1-a) z
        a_start = float(alphas_cumprod(model)[t_start])  # diffuse(), in place and in bands
        z.mul_(math.sqrt(1 - a_start))
        for y0 in range(0, hz, BAND):
            y1 = min(hz, y0 + BAND)
            for i in range(b):
                z[i, :, y0:y1].add_(lq_tile(i, y0, 0, y1 - y0, wz).float(), alpha=math.sqrt(a_start))

    def z_tiles(chunk: list) -> torch.Tensor:
        return torch.stack([z[i, :, y : y + th, x : x + tw] for i, (y, x, th, tw) in chunk]).to(model.dtype)

    strengths = [float(strength)] * b if isinstance(strength, (int, float)) else [float(s) for s in strength]
    if len(strengths) != b or not all(0.0 <= s <= 1.0 for s in strengths):
        raise InputError(f"strength must be one value or {b} values, each in [0, 1]; got {strength}")
    pb = None
    if adapters is not None:
        slot_t = torch.tensor(list(slots) if slots is not None else [0] * b, device=dev)
        pb = PBRun(adapters=adapters, slots=slot_t, prompt=model.prompt, ref_pool=cfg.adapter.ref_pool,
                   # compiled: always a tensor (x 1.0 is exact), so every strength runs one graph
                   strength=None if all(s == 1.0 for s in strengths) and not model.compiled
                   else torch.tensor(strengths, device=dev))
    if progress:
        from tqdm.auto import tqdm

        updates = tqdm(updates, desc="restore", unit="step", leave=False)
    for k, u in enumerate(updates):
        t = torch.full((tile_batch,), u.t, device=dev, dtype=torch.long)

        def predict(chunk: list) -> torch.Tensor:
            check()
            n = len(chunk)
            if model.compiled:  # every call the same batch size: one graph (CUDA graph) per tile shape
                chunk = chunk + chunk[-1:] * (tile_batch - n)
            zc = z_tiles(chunk)
            lc = torch.stack([lq_tile(i, *tl) for i, tl in chunk])
            rows = None if pb is None else pb.rows([i for i, _ in chunk])
            return model.denoise(zc, t[: len(chunk)], lc, rows)[:n]

        def step(y0: int, y1: int, eps: torch.Tensor, u: Update = u, k: int = k) -> None:
            band = z[:, :, y0:y1]
            band.mul_(u.a).add_(eps, alpha=u.b)
            if u.c:
                for i, s in enumerate(seeds):
                    band[i].add_(_row_noise(s, k, y0, y1, (z.shape[1], wz)).to(dev), alpha=u.c)

        blend_rows(tiles, predict, step, batch=b, channels=cfg.latent_channels, out_height=hz, out_width=wz,
                   tile_batch=tile_batch, device=dev)

    out = torch.empty((b, 3, h, w), dtype=out_dtype, device=dev)
    if model.vae is None:
        restored = z.add_(1).div_(2).clamp_(0, 1)[..., :h, :w]  # in place: z is the image now
    else:  # decode straight into the output buffer; the colour fix then runs on it in place

        def decode(chunk: list) -> torch.Tensor:
            check()
            return model.from_latent(z_tiles(chunk))

        def put(y0: int, y1: int, rows: torch.Tensor) -> None:
            if y0 < h:
                out[:, :, y0 : min(y1, h)] = from_unit(rows[:, :, : min(y1, h) - y0, :w], out_dtype)

        blend_rows(tiles, decode, put, batch=b, channels=3, out_height=hp, out_width=wp, factor=f,
                   tile_batch=tile_batch, device=dev)
        del z
        restored = out
    apply_color_fix(restored, lq, color_fix, out=out)
    return out.cpu()


def restore(
    model: RestorationModel,
    image: torch.Tensor,
    *,
    adapter: Adapter | None = None,
    options: RestoreOptions | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Restore one image [3,H,W] in [0,1], optionally with one identity's adapter.

    ``options`` (default :class:`~pfstorer.restore_options.RestoreOptions`) says how; any of its
    fields may also be given as a keyword (``scale=2, seed=1``), which wins. Other keywords
    (``progress``, ``deadline``, ``tile_batch``, ``pad_to_tile``) go to :func:`restore_batch`.
    """
    given = {k: kwargs.pop(k) for k in list(kwargs) if k in RestoreOptions.model_fields}
    opts = RestoreOptions.merged(options, **given)
    slots = None
    if adapter is not None:
        adapter.check_base(model)
        slots = AdapterSlots.for_model(model, 1)
        slots.load(0, adapter.tensors)
    return restore_batch(
        model, image.unsqueeze(0), adapters=slots, slots=[0], seeds=[opts.seed], **opts.sampling_kwargs(), **kwargs
    )[0]
