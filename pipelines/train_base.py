"""``pfstorer train-base``: train a restoration base model (paper section 3.3) with Ray Train.

The way the paper trains its base, on our data:

- **data**: one split of one or more ``index.csv`` sources (``identity,path,split``) such as
  ``../shared/data/lfw128`` and ``../shared/data/faces1024``, each with its typical face width
  (``--face-px``) and share of the draws (``--source-weights``); ``split=bench`` is refused and
  training stops if any training identity is also a bench identity (benchmarks must never have
  seen their people). Every photo is decoded **once** and put in the Ray object store, so workers
  on one node share it (10.5 k lfw128 photos = 500 MB; ``--limit`` takes a seeded subset);
- **inputs** (:mod:`pipelines.base_data`): a random square crop (no alignment) of a random photo,
  either a fraction of the photo resized to the crop or, with ``--face-scale``, a native-scale tile
  of the photo rescaled so its face has a random width (faces of every size a photo has); its LQ
  from :func:`pfstorer.degradations.synthesize_lq` (``light``/``heavy`` mixed, the clean crop
  itself with ``p_HQ = 0.03``) or, with ``--p-sr``, a x4 super-resolution input; drawn on the fly
  inside each worker from a generator seeded by ``(seed, worker rank, step)`` — so a resumed run
  sees exactly the batches an uninterrupted one would;
- **loss**: the distance (``--loss mse`` or ``l1``) of the denoiser's output to its target at
  random timesteps of ``[0, train_t_max)``, the range the preset samples: the noise for epsilon
  presets, the clean image for ``x0_residual`` ones. For presets that sample from the LQ diffused
  to ``t_start``, a share ``--p-lq-start`` of the rows is drawn exactly so (the LQ, not the clean
  image, diffused to ``t_start``), so the first sampling step is trained on what it will see.
  ``--loss-weighting trunc-snr`` multiplies the per-row loss by ``max(1, 1/SNR(t))`` (Salimans &
  Ho's truncated SNR weighting: for epsilon presets, the image-space error where noise dominates).
  AdamW, linear warm-up then cosine decay to 10 %, gradient clipping, optional EMA of the weights
  (what gets shipped; warmed up), optional bf16 autocast on CUDA;
- **detail** (``--adv-weight``, :mod:`pfstorer.adversarial`): a patch discriminator trained beside
  the model; the x0 estimates of the rows drawn as sampling starts must look real to it (from
  ``--adv-start``, ramped over ``--adv-ramp`` steps), so one-step sampling returns texture, not the
  posterior mean's blur;
- **probe**: ``--holdout N`` keeps N photos (whole people; at most a tenth) of every source out of
  training; every ``--probe-every`` steps their clean-image-estimate PSNR at fixed timesteps (fixed
  degradations and noise; for LQ-started presets also from the LQ diffused to ``t_start``, with its
  sharpness) is logged next to the inputs' own PSNR and kept in the loss curve;
- **throughput**: ``--loader-workers N`` synthesizes batches ahead in N processes per worker (a
  DataLoader over step indices, so batches do not depend on N); a GPU needs several;
- **Ray Train**: a :class:`ray.train.torch.TorchTrainer`; with several workers the model is wrapped
  in DDP by :func:`ray.train.torch.prepare_model` (gloo on CPU, NCCL on GPU) and ``--batch-size`` is
  the global batch, split evenly;
- **checkpoints**: every ``--checkpoint-every`` steps rank 0 reports a checkpoint
  (``config.json`` + ``model.safetensors`` of the raw weights, so ``load_base(ckpt)`` reads it;
  ``ema.safetensors``; ``optimizer.pt``; the discriminator and its optimizer; ``state.json`` with
  the step and loss history) with
  ``ray.train.report(..., checkpoint=Checkpoint.from_directory(...))`` to the store
  (``--store``, default ``OUT/checkpoints``; any URL Ray Train accepts). ``--resume`` re-runs the
  last run of that store under the same name, so Ray hands the latest checkpoint back and training
  continues from its step, weights, optimizer state and loss history;
- **output**: ``OUT/config.json`` + ``OUT/model.safetensors`` (``RestorationModel.save``; the EMA
  weights when EMA is on), ``OUT/loss_curve.json`` with the probes (+ ``loss_curve.png`` when
  matplotlib is there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipelines.base_data import Source, draw_batch, holdout_people, load_split, probe_holdout

__all__ = ["Source", "TrainBaseConfig", "TrainBaseResult", "blend_weights", "holdout_people", "load_split",
           "register_cli", "train_base"]

RUN_FILE = "train_run.json"  # in OUT: the store and run name of the last run (for --resume)


class TrainBaseConfig(BaseModel):
    """Everything that decides what a base-training run computes."""

    model_config = ConfigDict(frozen=True)

    base: str = Field("compact", description="preset to train")
    steps: int = Field(1000, ge=1, description="total optimisation steps (including resumed ones)")
    batch_size: int = Field(32, ge=1, description="global batch (split evenly across workers)")
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup: int | None = Field(None, ge=0, description="linear warm-up steps (default: 5 % of steps, <= 500)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay ends at lr * this")
    grad_clip: float = Field(1.0, gt=0)
    ema: float = Field(0.0, ge=0, lt=1, description="EMA decay of the shipped weights (0: off; warm-up "
                       "min(ema, (1 + n) / (10 + n)) over the n EMA updates of this run)")
    loss: Literal["mse", "l1"] = Field("mse", description="distance between prediction and target "
                                       "(l1 for x0-predicting presets: sharper, higher PSNR)")
    p_lq_start: float = Field(0.5, ge=0, le=1, description="share of rows drawn as sampling starts (the LQ "
                              "diffused to the preset's t_start) for presets that start from the LQ")
    holdout: int = Field(0, ge=0, description="photos of people held out of training for the probe")
    probe_every: int = Field(250, ge=1, description="held-out clean-image-estimate PSNR every N steps")
    loss_weighting: Literal["eps", "trunc-snr"] = Field(
        "eps", description="eps: unweighted (the paper's plain diffusion loss); trunc-snr: x max(1, 1/SNR(t)), "
                           "Salimans & Ho's truncated-SNR weighting (x0 error where noise dominates)")
    crop: int | None = Field(None, ge=8, description="training crop in pixels (default: the preset's tile)")
    crop_scale: tuple[float, float] = Field((0.6, 1.0), description="crop side as a fraction of the short side")
    face_scale: tuple[float, float] | None = Field(
        None, description="face width range in pixels (log-uniform) of native-scale crops of photos rescaled "
                          "at random (None: crop_scale fractions resized to the crop)")
    p_sr: float = Field(0.0, ge=0, le=1, description="share of LQs made as x4 super-resolution inputs "
                        "(shrunk 4x, degraded light, enlarged bicubically)")
    adv_weight: float = Field(0.0, ge=0, description="weight of the adversarial loss on the x0 estimates "
                              "of rows drawn as sampling starts (0: off; pfstorer.adversarial)")
    fm_weight: float = Field(1.0, ge=0, description="feature-matching weight inside the adversarial loss")
    adv_start: int = Field(0, ge=0, description="step at which the adversarial loss starts acting on the restorer "
                           "(the discriminator trains from step 0, so it is informative by then)")
    adv_ramp: int = Field(0, ge=0, description="steps over which the adversarial weight rises linearly to adv_weight")
    disc_lr: float = Field(2e-4, gt=0, description="learning rate of the discriminator (AdamW, 0.5/0.99)")
    disc_width: int = Field(32, ge=4, description="channels of the discriminator's first stage")
    levels: tuple[str, ...] = ("light", "heavy")
    p_hq: float = Field(0.03, ge=0, le=1, description="probability of a clean LQ (paper: 0.03)")
    seed: int = 0
    workers: int = Field(1, ge=1)
    use_gpu: bool = False
    bf16: bool = Field(False, description="bf16 autocast (CUDA only)")
    threads: int | None = Field(None, ge=1, description="torch threads per worker (default: Ray's)")
    loader_workers: int = Field(0, ge=0, description="processes per worker that synthesize batches ahead "
                                "(0: in the training process; a GPU needs several to keep up)")
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    init: str | None = Field(None, description="start from these weights (a checkpoint folder) instead of random")


class TrainBaseResult(BaseModel):
    out: str
    store: str
    run_name: str
    steps: int
    resumed_from: int
    final_loss: float
    wall_s: float
    samples_per_s: float
    checkpoint: str | None
    fingerprint: str


# -- the worker ----------------------------------------------------------------------------------
class _Denoiser:
    """nn.Module wrapper whose forward is ``denoise`` (DDP syncs gradients through forward)."""

    @staticmethod
    def build(model):
        from torch import nn

        class Denoiser(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, z_t, t, lq):
                return self.m.denoise(z_t, t, lq)

        return Denoiser(model)


def _lr_at(step: int, c: TrainBaseConfig) -> float:
    warm = c.warmup if c.warmup is not None else min(500, c.steps // 20)
    if step < warm:
        return c.lr * (step + 1) / warm
    frac = (step - warm) / max(1, c.steps - warm)
    return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


class _StepBatches:
    """Map-style dataset: item ``step`` is that step's (HQ, LQ) batch, so a DataLoader with worker
    processes prefetches batches and the result does not depend on how many there are."""

    def __init__(self, sources, n: int, crop: int, c: TrainBaseConfig, rank: int, start: int) -> None:
        self.sources, self.n, self.crop, self.c, self.rank, self.start = sources, n, crop, c, rank, start

    def __len__(self) -> int:
        return max(0, self.c.steps - self.start)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)  # ends plain iteration (no DataLoader) at the last step
        return draw_batch(self.sources, self.n, self.crop, self.c, self.rank, self.start + i)


PROBE_FACE_PX = 160  # held-out photos of large-face sources are probed with faces of this size
PROBE_MAX_SIDE = 256


class _Probe:
    """Clean-image-estimate PSNR on held-out photos at fixed timesteps (rank 0, between steps).

    Each photo gets a fixed degradation (alternately ``heavy`` and ``light``) and fixed noise; the
    estimate is the denoiser's x0 at ``t`` (noised HQ), and at ``t_start`` from the LQ diffused there
    (where sampling starts, for presets that start from the LQ). The LQ's own PSNR is the baseline.
    From the LQ start it also logs sharpness: the Laplacian variance of the estimate over the
    truth's (1: as much fine detail as the truth; an L1 restorer sits far below).

    Every source gives its own group of held-out photos; keys of groups after the first are
    prefixed ``NAME/``. Photos of sources with large faces are shrunk so the face is
    ``PROBE_FACE_PX`` wide and centre-cropped to at most ``PROBE_MAX_SIDE``.
    """

    def __init__(self, groups: list[tuple[str, Any, float]], model, c: TrainBaseConfig) -> None:
        import ray
        import torch

        from pfstorer.degradations import degrade
        from pfstorer.images import resize
        from pfstorer.sampling import alphas_cumprod

        cfg = model.config
        g = cfg.granularity
        self.groups = []
        for k, (name, ref, face_px) in enumerate(groups):
            photos = ray.get(ref)
            hqs = []
            for ph in photos:
                x = torch.from_numpy(ph.copy()).permute(2, 0, 1).float() / 255.0
                s = min(1.0, PROBE_FACE_PX / face_px)
                if s < 1:
                    x = resize(x, (round(x.shape[1] * s), round(x.shape[2] * s)))
                side = (min(*x.shape[1:], PROBE_MAX_SIDE) // g) * g
                top, left = (x.shape[1] - side) // 2, (x.shape[2] - side) // 2
                hqs.append(x[:, top:top + side, left:left + side])
            hq = torch.stack(hqs).contiguous()
            lq = torch.stack([degrade(x, ("heavy", "light")[i % 2], 7000 + i) for i, x in enumerate(hq)])
            noise = torch.randn(hq.shape, generator=torch.Generator().manual_seed(c.seed + 99))
            self.groups.append(("" if k == 0 else f"{name}/", hq, lq, noise))
        self.t_start = cfg.sampling.t_start if cfg.sampling.t_start < cfg.num_train_timesteps else None
        self.ts = [int(cfg.train_t_max * f) for f in (0.1, 0.5, 0.9)]
        self.ac = alphas_cumprod(model)

    @staticmethod
    def _psnr(x, y) -> float:
        """Mean over the images of each one's PSNR (dB; images in [0, 1])."""
        per_image_mse = (x.clamp(0, 1) - y).pow(2).flatten(1).mean(1).clamp(min=1e-10)
        return float(-10 * per_image_mse.log10().mean())

    @staticmethod
    def _sharpness(x, y) -> float:
        """Mean over the images of Laplacian variance of ``x`` over that of ``y`` (grey levels)."""
        from pfstorer.metrics.sharpness import laplacian_variance

        return float(sum(laplacian_variance(a) / max(laplacian_variance(b), 1e-12) for a, b in zip(x, y)) / len(x))

    def measure(self, model, step: int) -> dict[str, Any]:
        import torch

        from pfstorer.sampling import diffuse

        out: dict[str, Any] = {"step": step}
        was_training = model.training
        model.eval()
        dev = model.device
        with torch.no_grad():
            for prefix, hq, lq_img, noise in self.groups:
                z0, lq = model.to_latent(hq.to(dev)), model.to_latent(lq_img.to(dev))
                noise = noise.to(dev)
                cases = [(f"x0_psnr_t{t}", t, z0) for t in self.ts]
                if self.t_start is not None:
                    cases.append((f"x0_psnr_lq_t{self.t_start}", self.t_start, lq))
                for name, t, start in cases:
                    a = self.ac[t].to(dev)
                    tt = torch.full((len(z0),), t, device=dev, dtype=torch.long)
                    z_t = diffuse(model, start, noise, tt)
                    pred = torch.cat([model.denoise(z_t[i:i + 8], tt[i:i + 8], lq[i:i + 8])
                                      for i in range(0, len(z0), 8)])
                    x0 = pred if model.config.prediction == "x0_residual" else (z_t - (1 - a).sqrt() * pred) / a.sqrt()
                    est = model.from_latent(x0).float().cpu()
                    for j, level in enumerate(("heavy", "light")):
                        out[f"{prefix}{name}_{level}"] = round(self._psnr(est[j::2], hq[j::2]), 3)
                        if start is lq:
                            sharp = name.replace("psnr", "sharpness")
                            out[f"{prefix}{sharp}_{level}"] = round(self._sharpness(est[j::2], hq[j::2]), 3)
                for j, level in enumerate(("heavy", "light")):
                    out[f"{prefix}input_psnr_{level}"] = round(self._psnr(lq_img[j::2], hq[j::2]), 3)
        model.train(was_training)
        return out


def _save_checkpoint(d: Path, model, ema, opt, state: dict[str, Any], disc=None, disc_opt=None) -> None:
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


def _export(model, ema: dict | None, d: Path) -> str:
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


def _train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import numpy as np
    import ray
    import ray.train
    import ray.train.torch
    import torch
    from safetensors.torch import load_file

    from pfstorer.model import load_base
    from pfstorer.sampling import alphas_cumprod, diffuse

    c = TrainBaseConfig.model_validate(loop_config["config"])
    if c.threads:
        torch.set_num_threads(c.threads)
    sources = [(ray.get(ref), Source.model_validate(src)) for ref, src in loop_config["sources"]]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    torch.manual_seed(c.seed)
    model = load_base(c.init) if c.init else load_base(c.base, random_weights=True)
    model.requires_grad_(True)
    if model.vae is not None:  # latent presets: the VAE is trained elsewhere; encode only
        model.vae.requires_grad_(False)
    model.train()
    init_fp = model.fingerprint
    crop = c.crop or model.config.sample_size
    g = model.config.granularity
    if crop % g:
        raise ValueError(f"crop {crop} must be a multiple of {g} for preset {model.config.name}")
    per_worker = c.batch_size // world

    state: dict[str, Any] = {"step": 0, "losses": [], "resumed_from": 0, "wall_s": 0.0, "samples": 0}
    ema = None
    opt_state = disc_state = disc_opt_state = None
    ckpt = ray.train.get_checkpoint()
    start_fp = init_fp
    if ckpt is not None:
        with ckpt.as_directory() as d:
            d = Path(d)
            sd = load_file(str(d / "model.safetensors"))
            model.load_state_dict(sd)
            if (d / "ema.safetensors").exists() and c.ema > 0:
                ema = load_file(str(d / "ema.safetensors"))
            opt_state = torch.load(d / "optimizer.pt", map_location="cpu", weights_only=True)
            if (d / "discriminator.safetensors").exists():
                disc_state = load_file(str(d / "discriminator.safetensors"))
                disc_opt_state = torch.load(d / "disc_optimizer.pt", map_location="cpu", weights_only=True)
            state = json.loads((d / "state.json").read_text())
        model.invalidate_fingerprint()
        start_fp = model.fingerprint
        state["resumed_from"] = state["step"]
    state["start_fingerprint"] = start_fp
    state["init_fingerprint"] = init_fp

    net = ray.train.torch.prepare_model(_Denoiser.build(model))
    model = (net.module if hasattr(net, "module") else net).m
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay, betas=(0.9, 0.99))
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    disc = disc_opt = None
    if c.adv_weight > 0:
        from pfstorer.adversarial import PatchDiscriminator, discriminator_loss, restorer_adversarial_loss

        disc = PatchDiscriminator(model.config.latent_channels, c.disc_width).to(device)
        if disc_state is not None:
            disc.load_state_dict(disc_state)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=c.disc_lr, weight_decay=0.0, betas=(0.5, 0.99))
        if disc_opt_state is not None:
            disc_opt.load_state_dict(disc_opt_state)
    if c.ema > 0 and ema is None:
        ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()}  # on the device
    elif ema is not None:
        ema = {k: v.to(device, torch.float32) for k, v in ema.items()}
    ac = alphas_cumprod(model).to(device)
    t_max = model.config.train_t_max
    t_start = model.config.sampling.t_start
    # Rows drawn as sampling starts: the LQ diffused to t_start (only for presets that start there).
    p_start = c.p_lq_start if t_start < model.config.num_train_timesteps else 0.0
    probe_groups = loop_config.get("probes") or []
    probe = _Probe(probe_groups, model, c) if rank == 0 and probe_groups else None
    use_bf16 = c.bf16 and device.type == "cuda"
    if c.bf16 and not use_bf16 and rank == 0:
        print("train-base: --bf16 ignored (bf16 autocast is used on CUDA only)", flush=True)

    t0 = time.perf_counter()
    wall0 = float(state.get("wall_s", 0.0))
    window: list[float] = []
    seen = 0
    step = int(state["step"])
    batches = _StepBatches(sources, per_worker, crop, c, rank, step)
    if c.loader_workers > 0:
        from torch.utils.data import DataLoader

        batches = DataLoader(batches, batch_size=None, shuffle=False, num_workers=c.loader_workers,
                             prefetch_factor=4, persistent_workers=False)
    for hq, lq in batches:
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([c.seed, rank, step, 1]).generate_state(1)[0]))
        with torch.no_grad():
            z0 = model.to_latent(hq.to(device))
            lq_lat = model.to_latent(lq.to(device))
        t = torch.randint(0, t_max, (per_worker,), generator=gen).to(device)
        noise = torch.randn(z0.shape, generator=gen).to(device)
        start = (torch.rand(per_worker, generator=gen) < p_start).to(device)  # rows as sampling starts
        t = torch.where(start, torch.full_like(t, t_start), t)
        a = ac[t].view(-1, 1, 1, 1)
        z_t = diffuse(model, torch.where(start.view(-1, 1, 1, 1), lq_lat, z0).float(), noise, t)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, c)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            pred = net(z_t.to(model.dtype), t, lq_lat)
        err = pred.float() - model.target(z0.float(), noise)
        per_row = (err.abs() if c.loss == "l1" else err.pow(2)).flatten(1).mean(1)
        if c.loss_weighting == "trunc-snr":  # max(1, 1/SNR) = max(1, (1 - a) / a)
            weight = ((1 - a) / a).clamp(min=1.0).view(-1)
            loss = (per_row * weight).mean()
        else:
            loss = per_row.mean()
        # The detail objective: on the rows drawn as sampling starts, what sampling returns
        # (the x0 estimate) must look real to the discriminator (pfstorer.adversarial).
        adv_rows = start if p_start > 0 else torch.ones_like(start)
        fake = None
        if disc is not None and bool(adv_rows.any()):
            x0_hat = pred.float() if model.config.prediction == "x0_residual" else \
                (z_t - (1 - a).sqrt() * pred.float()) / a.sqrt()
            fake, real = x0_hat[adv_rows], z0.float()[adv_rows]
            w_adv = c.adv_weight * min(1.0, max(0.0, (step - c.adv_start + 1) / max(1, c.adv_ramp)))
            if w_adv > 0:
                disc.requires_grad_(False)
                g_adv = restorer_adversarial_loss(disc, fake, real, c.fm_weight)
                disc.requires_grad_(True)
                loss = loss + w_adv * g_adv
                state.setdefault("adv_losses", []).append(round(float(g_adv.detach()), 5))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        opt.step()
        if fake is not None:
            real_logits, _ = disc(real)
            fake_logits, _ = disc(fake.detach())
            d_loss = discriminator_loss(real_logits, fake_logits)
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
            state.setdefault("disc_losses", []).append(round(float(d_loss.detach()), 5))
        if ema is not None:
            n_ema = int(state.get("ema_updates", 0))
            decay = min(c.ema, (1 + n_ema) / (10 + n_ema))
            state["ema_updates"] = n_ema + 1
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    if v.is_floating_point():
                        ema[k].mul_(decay).add_(v.detach().float(), alpha=1 - decay)
        step += 1
        seen += per_worker * world
        lv = float(per_row.detach().mean())  # the curve is the unweighted loss
        state["losses"].append(lv)
        if probe is not None and (step % c.probe_every == 0 or step == c.steps):
            state.setdefault("probes", []).append(probe.measure(model, step))
            print(json.dumps(state["probes"][-1]), flush=True)
        window.append(lv)
        elapsed = time.perf_counter() - t0
        state.update(step=step, wall_s=wall0 + elapsed, samples=int(state.get("samples", 0)) + per_worker * world)
        if rank == 0 and (step % c.log_every == 0 or step == c.steps):
            print(json.dumps({"step": step, "loss": round(sum(window) / len(window), 5), "lr": _lr_at(step - 1, c),
                              "samples_per_s": round(seen / elapsed, 2), "wall_s": round(state["wall_s"], 1)}),
                  flush=True)
            window = []
        last = step == c.steps
        if step % c.checkpoint_every == 0 or last:
            metrics = {"step": step, "loss": lv, "resumed_from": state["resumed_from"],
                       "start_fingerprint": start_fp, "samples_per_s": seen / max(elapsed, 1e-9)}
            if rank == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    d = Path(tmp)
                    _save_checkpoint(d, model, ema, opt, state, disc, disc_opt)
                    if last:
                        exp = d / "export"
                        metrics["fingerprint"] = _export(model, ema, exp)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                     checkpoint_dir_name=f"checkpoint_{step:08d}")
            else:
                ray.train.report(metrics, checkpoint=None)


# -- the driver ----------------------------------------------------------------------------------
def _plot(curve: dict[str, Any], path: Path) -> bool:
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


def _device_name(use_gpu: bool) -> str:
    if use_gpu:
        try:
            import torch

            if torch.cuda.is_available():
                return torch.cuda.get_device_name(0)
        except Exception:
            pass
    return f"CPU ({os.cpu_count()} cores visible), no GPU"


def train_base(
    *,
    data: str | Sequence[Source],
    out: str | Path,
    config: TrainBaseConfig = TrainBaseConfig(),
    split: str = "train",
    limit: int | None = None,
    store: str | None = None,
    resume: bool = False,
    verbose: bool = True,
) -> TrainBaseResult:
    """Train (or ``resume``) a base model; writes the final weights and the loss curve to ``out``."""
    from pfstorer.ray_env import prepare_ray
    from pipelines.cluster import cluster_address

    prepare_ray(local=not cluster_address())
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pfstorer.errors import InputError
    from pfstorer.presets import get_preset

    get_preset(config.base)  # unknown preset: a clear error before anything starts
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / RUN_FILE
    if resume:
        if not run_file.exists():
            raise InputError(f"--resume: no earlier run recorded in {run_file}")
        prev = json.loads(run_file.read_text())
        store, run_name = prev["store"], prev["run_name"]
    else:
        store = store or str((out / "checkpoints").resolve())
        run_name = f"train-base-{config.base}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    if config.batch_size % config.workers:
        raise InputError(f"--batch-size {config.batch_size} must be a multiple of --workers {config.workers}")

    sources = [Source(data=data)] if isinstance(data, str) else [Source.model_validate(x) for x in data]
    if not sources:
        raise InputError("train-base needs at least one data source")
    run_file.write_text(json.dumps({"store": store, "run_name": run_name, "config": config.model_dump(mode="json"),
                                    "data": [x.model_dump() for x in sources], "split": split, "limit": limit},
                                   indent=2))
    if not ray.is_initialized():
        ray.init(address=cluster_address() or "local", include_dashboard=False,
                 configure_logging=False, log_to_driver=verbose)
    source_refs, probes, identities = [], [], []
    for src in sources:
        t0 = time.perf_counter()
        images, ids = load_split(src.data, split, limit=limit, seed=config.seed)
        if verbose:
            mib = sum(x.nbytes for x in images) / 2**20
            print(f"train-base: {len(images)} photos of {len(set(ids))} people from {src.data} split={split} "
                  f"decoded in {time.perf_counter() - t0:.1f}s ({mib:.0f} MiB)", file=sys.stderr)
        if config.holdout:
            held = probe_holdout(ids, config.holdout, config.seed)
            if held:
                keep = sorted(set(range(len(ids))) - set(held))
                probes.append((Path(src.data.rstrip("/")).name, ray.put([images[i] for i in held]), src.face_px))
                images, ids = [images[i] for i in keep], [ids[i] for i in keep]
                if verbose:
                    print(f"train-base: {len(held)} photos of their own people held out for the probe",
                          file=sys.stderr)
        source_refs.append((ray.put(images), src.model_dump()))
        identities += ids
        del images
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"config": config.model_dump(mode="json"), "sources": source_refs, "probes": probes},
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=store,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError("training reported no checkpoint")
    with ckpt.as_directory() as d:
        d = Path(d)
        state = json.loads((d / "state.json").read_text())
        exp = d / "export"
        if not exp.exists():  # resumed a run that had already finished: export its weights
            from pfstorer.model import load_base

            m = load_base(str(d))
            fp = m.fingerprint
            m.save(out)
        else:
            for name in ("config.json", "model.safetensors"):
                (out / name).write_bytes((exp / name).read_bytes())
            fp = result.metrics.get("fingerprint", "")
    curve = {
        "preset": config.base, "device": _device_name(config.use_gpu), "workers": config.workers,
        "data": [x.model_dump() for x in sources], "split": split, "photos": len(identities), "people": len(set(identities)),
        "steps": state["step"], "resumed_from": state["resumed_from"],
        "start_fingerprint": state.get("start_fingerprint"), "init_fingerprint": state.get("init_fingerprint"),
        "fingerprint": fp, "wall_s": state["wall_s"], "samples": state.get("samples"),
        "config": config.model_dump(mode="json"), "loss": state["losses"], "probes": state.get("probes", []),
        "adv_loss": state.get("adv_losses", []), "disc_loss": state.get("disc_losses", []),
    }
    (out / "loss_curve.json").write_text(json.dumps(curve))
    _plot(curve, out / "loss_curve.png")
    tail = state["losses"][-50:]
    return TrainBaseResult(
        out=str(out), store=store, run_name=run_name, steps=state["step"], resumed_from=state["resumed_from"],
        final_loss=float(sum(tail) / len(tail)) if tail else float("nan"), wall_s=state["wall_s"],
        samples_per_s=float(state.get("samples", 0)) / max(state["wall_s"], 1e-9),
        checkpoint=ckpt.path, fingerprint=fp,
    )


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


# -- command line --------------------------------------------------------------------------------
def _sources(data: list[str], face_px: list[float] | None, weights: list[float] | None) -> list[Source]:
    """``--data`` folders with their ``--face-px`` and ``--source-weights`` (one each, or none)."""
    from pfstorer.errors import InputError

    for name, vals in (("--face-px", face_px), ("--source-weights", weights)):
        if vals is not None and len(vals) != len(data):
            raise InputError(f"{name} needs one value per --data source ({len(data)}), got {len(vals)}")
    return [Source(data=d, **({"face_px": face_px[i]} if face_px else {}),
                   **({"weight": weights[i]} if weights else {})) for i, d in enumerate(data)]


def _cmd(args: argparse.Namespace) -> int:
    fields = {
        "base": args.base, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "workers": args.workers, "use_gpu": args.use_gpu, "bf16": args.bf16, "checkpoint_every": args.checkpoint_every,
        "init": args.init, "seed": args.seed, "loss_weighting": args.loss_weighting, "ema": args.ema, "crop": args.crop, "threads": args.threads,
        "log_every": args.log_every, "loader_workers": args.loader_workers, "weight_decay": args.weight_decay, "warmup": args.warmup,
        "crop_scale": tuple(args.crop_scale), "keep_checkpoints": args.keep_checkpoints, "loss": args.loss,
        "p_lq_start": args.p_lq_start, "holdout": args.holdout, "probe_every": args.probe_every,
        "face_scale": tuple(args.face_scale) if args.face_scale else None, "p_sr": args.p_sr,
        "adv_weight": args.adv_weight, "fm_weight": args.fm_weight, "disc_lr": args.disc_lr,
        "disc_width": args.disc_width, "adv_start": args.adv_start, "adv_ramp": args.adv_ramp,
    }
    if args.init and "://" not in args.init and Path(args.init).exists():  # workers run elsewhere
        fields["init"] = str(Path(args.init).resolve())
    config = TrainBaseConfig(**{k: v for k, v in fields.items() if v is not None})
    sources = _sources(args.data, args.face_px, args.source_weights)
    res = train_base(data=sources, out=args.out, config=config, split=args.split, limit=args.limit,
                     store=args.store, resume=args.resume, verbose=not args.quiet)
    print(json.dumps(res.model_dump(), indent=2))
    return 0


def _cmd_blend(args: argparse.Namespace) -> int:
    fp = blend_weights(args.fidelity, args.detail, args.weight, args.out)
    print(f"blended {args.fidelity} (x{1 - args.weight:g}) and {args.detail} (x{args.weight:g}) -> {args.out} "
          f"(fingerprint {fp})")
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train-base", help="train a base restoration model (Ray Train)",
        description="Train a base model of a preset on the photos of one split of an index.csv "
                    "(identity,path,split): random crops, synthetic light/heavy degradations "
                    "(clean input with p=0.03), the preset's diffusion loss (noise or x0 target) at the "
                    "timesteps it samples; --holdout probes held-out PSNR. Ray Train TorchTrainer "
                    "(DDP with several workers); checkpoints to --store; --resume continues. Writes "
                    "OUT/config.json + model.safetensors (load with --base OUT) and OUT/loss_curve.json.",
    )
    p.add_argument("--base", default="compact", help="preset to train (default: compact)")
    p.add_argument("--data", required=True, nargs="+",
                   help="folders or URLs holding index.csv and the photos (several: mixed by --source-weights)")
    p.add_argument("--face-px", type=float, nargs="+",
                   help="typical face width in pixels of each --data source's photos (default 90: lfw128)")
    p.add_argument("--source-weights", type=float, nargs="+", help="relative share of draws per source (default equal)")
    p.add_argument("--face-scale", type=float, nargs=2, metavar=("LO", "HI"),
                   help="train on native-scale crops of photos rescaled so faces are LO-HI px wide (log-uniform); "
                        "default: --crop-scale fractions resized to the crop")
    p.add_argument("--p-sr", type=float, help="share of x4 super-resolution inputs (default 0)")
    p.add_argument("--adv-weight", type=float,
                   help="weight of the adversarial (detail) loss against a patch discriminator (default 0: off)")
    p.add_argument("--fm-weight", type=float, help="feature-matching weight in the adversarial loss (default 1)")
    p.add_argument("--adv-start", type=int, help="step the adversarial loss starts acting (default 0)")
    p.add_argument("--adv-ramp", type=int, help="steps over which its weight rises to --adv-weight (default 0)")
    p.add_argument("--disc-lr", type=float, help="discriminator learning rate (default 2e-4)")
    p.add_argument("--disc-width", type=int, help="discriminator width (default 32)")
    p.add_argument("--split", default="train", help="split of index.csv to train on (bench is refused)")
    p.add_argument("--limit", type=int, help="train on a seeded subset of this many photos")
    p.add_argument("--steps", type=int, default=1000, help="total optimisation steps")
    p.add_argument("--batch-size", type=int, default=32, help="global batch size")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup", type=int, help="warm-up steps (default: 5%% of steps, at most 500)")
    p.add_argument("--ema", type=float, help="EMA decay of the saved weights (default 0: off)")
    p.add_argument("--loss-weighting", choices=["eps", "trunc-snr"],
                   help="eps: unweighted (the paper, default); trunc-snr: x max(1, 1/SNR(t))")
    p.add_argument("--loss", choices=["mse", "l1"], help="distance to the target (default mse)")
    p.add_argument("--p-lq-start", type=float,
                   help="share of rows drawn as sampling starts, the LQ diffused to the preset's t_start (default 0.5)")
    p.add_argument("--holdout", type=int,
                   help="hold this many photos (whole people) out of training for the PSNR probe (default 0)")
    p.add_argument("--probe-every", type=int, help="probe the held-out photos every N steps (default 250)")
    p.add_argument("--crop", type=int, help="training crop size in pixels (default: the preset's tile)")
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.6, 1.0), metavar=("LO", "HI"),
                   help="crop side as a fraction of the photo's short side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (weights, loss curve, run record)")
    p.add_argument("--store", help="checkpoint store: folder or URL (default: OUT/checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue the last run recorded in OUT")
    p.add_argument("--workers", type=int, default=1, help="data-parallel workers (DDP when > 1)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--threads", type=int, help="torch threads per worker")
    p.add_argument("--loader-workers", type=int,
                   help="processes per worker synthesizing batches ahead (default 0; use several on a GPU)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="report a checkpoint every N steps")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--init", help="initial weights: a checkpoint folder of the same preset")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd)

    b = subparsers.add_parser(
        "blend-base", help="interpolate two checkpoints of a base: the fidelity <-> detail knob",
        description="Network interpolation of two checkpoints of one preset (EMA weights when present): "
                    "(1 - W) x FIDELITY + W x DETAIL, saved as a base folder (float16). Made for an "
                    "adversarial fine-tune (train-base --adv-weight) and the checkpoint it started from: W = 0 "
                    "is the faithful, smoother one, W = 1 the sharper one.")
    b.add_argument("--fidelity", required=True, help="checkpoint folder of the faithful end (W = 0)")
    b.add_argument("--detail", required=True, help="checkpoint folder of the detailed end (W = 1)")
    b.add_argument("--weight", type=float, required=True, help="W in [0, 1]")
    b.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    b.set_defaults(func=_cmd_blend)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.train_base")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train-base", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
