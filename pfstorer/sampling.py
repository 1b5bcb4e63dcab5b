"""Restoration: sample a clean image conditioned on the LQ image, tiled for any size.

``restore`` upsamples the input by ``scale`` (super-resolution = upsample, then restore), pads it to
the model's granularity, encodes it (tiled VAE for latent presets), runs DDIM or DDPM from seeded
noise with the noise predictions of overlapping tiles blended every step (:mod:`pfstorer.tiling`),
decodes (tiled), crops and applies the colour fix once after stitching. The same seed gives the same
output bit for bit. A batch may mix identities: each row has its own adapter slot and seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from .adapter import Adapter
from .errors import InputError, TooLargeError
from .model import RestorationModel, pad_to_multiple
from .personalization import AdapterSlots, PBRun
from .tiling import gaussian_weights, tile_grid

Sampler = Literal["ddim", "ddpm"]
ColorFix = Literal["wavelet", "adain", "none"]
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


def upscale(image: torch.Tensor, scale: float) -> torch.Tensor:
    """Resize [B,3,H,W] by ``scale`` (bicubic; antialiased when shrinking)."""
    if scale == 1:
        return image
    h, w = image.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=scale < 1).clamp(0, 1)


def _set_vae_tiling(model: RestorationModel, tile_px: int, overlap_px: int) -> None:
    vae = model.vae
    if vae is None:
        return
    vae.enable_tiling()
    vae.tile_sample_min_size = tile_px
    vae.tile_latent_min_size = tile_px // model.config.vae_factor
    vae.tile_overlap_factor = overlap_px / tile_px


def _tiled_eps(
    model: RestorationModel,
    z: torch.Tensor,
    lq: torch.Tensor,
    t: torch.Tensor,
    tiles: list[tuple[int, int, int, int]],
    weight: torch.Tensor,
    pb: PBRun | None,
    tile_batch: int,
    buffers: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Noise prediction for the whole latent ``z`` from overlapping tiles, Gaussian-blended.

    The float32 accumulator and weight sum live in ``buffers`` and are reused every step (the
    weight sum never changes): no full-size temporaries per step, and bf16/fp16 models blend
    without rounding the weights or underflowing where they are small.
    """
    b = z.shape[0]
    if len(tiles) == 1:  # untiled: exactly one model call per batch, no blending arithmetic
        return model.denoise(z, t.expand(b), lq, pb)
    buffers = {} if buffers is None else buffers
    if "wsum" not in buffers:
        wsum = torch.zeros((1, 1, *z.shape[-2:]), device=z.device, dtype=torch.float32)
        for y, x, h, w in tiles:
            wsum[0, :, y : y + h, x : x + w] += weight
        buffers["wsum"] = wsum
        buffers["eps"] = torch.empty(z.shape, device=z.device, dtype=torch.float32)
    eps = buffers["eps"].zero_()
    jobs = [(i, tile) for tile in tiles for i in range(b)]
    for start in range(0, len(jobs), tile_batch):
        chunk = jobs[start : start + tile_batch]
        zc = torch.stack([z[i, :, y : y + h, x : x + w] for i, (y, x, h, w) in chunk])
        lc = torch.stack([lq[i, :, y : y + h, x : x + w] for i, (y, x, h, w) in chunk])
        rows = None if pb is None else pb.rows(pb.slots[[i for i, _ in chunk]])
        out = model.denoise(zc, t.expand(len(chunk)), lc, rows)
        for k, (i, (y, x, h, w)) in enumerate(chunk):
            eps[i, :, y : y + h, x : x + w] += out[k].float() * weight
    return eps.div_(buffers["wsum"]).to(z.dtype)


@torch.no_grad()
def restore_batch(
    model: RestorationModel,
    images: torch.Tensor,
    *,
    adapters: AdapterSlots | None = None,
    slots: Sequence[int] | None = None,
    seeds: Sequence[int] = (0,),
    scale: float = 1.0,
    steps: int = 50,
    sampler: Sampler = "ddim",
    tile: int | None = None,
    overlap: int | None = None,
    tile_batch: int = 8,
    color_fix: ColorFix = "wavelet",
    progress: bool = False,
) -> torch.Tensor:
    """Restore a batch [B,3,H,W] in [0,1]; row i uses adapter ``slots[i]`` and seed ``seeds[i]``.

    ``tile``/``overlap`` are in output pixels (defaults: the model's native size, 1/4 of it).
    """
    from .colorfix import color_fix as apply_color_fix

    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"expected images of shape [B,3,H,W], got {tuple(images.shape)}")
    if steps < 1:
        raise InputError("steps must be >= 1")
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
    g = cfg.granularity
    tile_px = max(g, ((tile or cfg.sample_size) // g) * g)
    overlap_px = cfg.sample_size // 4 if overlap is None else overlap
    if not 0 <= overlap_px < tile_px:
        raise InputError(f"overlap must be in [0, tile) = [0, {tile_px}), got {overlap_px}")

    lq_img = upscale(images.to(model.device, model.dtype), scale)
    padded, (h, w) = pad_to_multiple(lq_img, g)
    _set_vae_tiling(model, tile_px, overlap_px)
    lq = model.to_latent(padded)
    f = cfg.vae_factor
    tiles = tile_grid(lq.shape[-2], lq.shape[-1], tile_px // f, overlap_px // f)
    weight = gaussian_weights(tiles[0][2], tiles[0][3]).to(lq.device)  # float32: blended in float32
    del padded  # a padded copy (if any) is not needed past the encoder

    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    z = torch.cat([torch.randn((1, *lq.shape[1:]), generator=gen) for gen in gens]).to(lq.device, lq.dtype)
    sched = make_scheduler(model, sampler)
    sched.set_timesteps(steps)
    z = z * sched.init_noise_sigma

    pb = None
    if adapters is not None:
        slot_t = torch.tensor(list(slots) if slots is not None else [0] * b, device=lq.device)
        pb = PBRun(adapters=adapters, slots=slot_t, prompt=model.prompt, ref_pool=cfg.adapter.ref_pool)
    timesteps = sched.timesteps
    if progress:
        from tqdm.auto import tqdm

        timesteps = tqdm(timesteps, desc="restore", unit="step", leave=False)
    buffers: dict[str, torch.Tensor] = {}
    for t in timesteps:
        eps = _tiled_eps(model, z, lq, t.to(lq.device), tiles, weight, pb, tile_batch, buffers)
        z = sched.step(eps, t, z, generator=gens if sampler == "ddpm" else None).prev_sample
    del eps, buffers, lq  # full-size buffers the decoder and the colour fix do not need
    out = model.from_latent(z)[..., :h, :w]
    del z
    return apply_color_fix(out, lq_img, color_fix).float().cpu()


def restore(
    model: RestorationModel,
    image: torch.Tensor,
    *,
    adapter: Adapter | None = None,
    seed: int = 0,
    **kwargs,
) -> torch.Tensor:
    """Restore one image [3,H,W] in [0,1], optionally with one identity's adapter."""
    slots = None
    if adapter is not None:
        adapter.check_base(model)
        slots = AdapterSlots.for_model(model, 1)
        slots.load(0, adapter.tensors)
    return restore_batch(model, image.unsqueeze(0), adapters=slots, slots=[0], seeds=[seed], **kwargs)[0]
