"""The Ray Train worker of base training: the step loop around :mod:`pfstorer.base_objective`."""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines.base_data import Source, draw_batch
from pipelines.train_base.checkpoints import (
    export_weights,
    load_checkpoint,
    save_checkpoint,
)
from pipelines.train_base.config import TrainBaseConfig
from pipelines.train_base.holdout_probe import HeldOutProbe


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


def train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import numpy as np
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from pfstorer.base_objective import (
        adversarial_weight,
        denoising_loss,
        detail_loss,
        detail_rows,
        noised_batch,
        structure_loss,
        x0_estimate,
    )
    from pfstorer.model import load_base
    from pfstorer.sampling import alphas_cumprod

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
            back = load_checkpoint(Path(d), model, use_ema=c.ema > 0)
        state, ema, opt_state, disc_state, disc_opt_state = back.state, back.ema, back.opt, back.disc, back.disc_opt
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
        from pfstorer.adversarial import (
            PatchDiscriminator,
            discriminator_loss,
            restorer_adversarial_loss,
        )

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
    t_start = model.config.sampling.t_start
    # Rows drawn as sampling starts: the LQ diffused to t_start (only for presets that start there).
    p_start = c.p_lq_start if t_start < model.config.num_train_timesteps else 0.0
    probe_groups = loop_config.get("probes") or []
    probe = HeldOutProbe(probe_groups, model, c) if rank == 0 and probe_groups else None
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
    for hq, lq, kinds in batches:
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([c.seed, rank, step, 1]).generate_state(1)[0]))
        with torch.no_grad():
            z0 = model.to_latent(hq.to(device))
            lq_lat = model.to_latent(lq.to(device))
        x = noised_batch(model, z0, lq_lat, gen, p_start, ac)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, c)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            pred = net(x.z_t.to(model.dtype), x.t, lq_lat)
        loss, per_row = denoising_loss(pred, model.target(z0.float(), x.noise), x.a, c.loss, c.loss_weighting)
        # The detail objectives: on the rows drawn as sampling starts, what sampling returns
        # (the x0 estimate) must look real to the discriminator (pfstorer.adversarial) and carry
        # the truth's amount of fine detail (detail_loss); only on the kinds of input they are asked
        # for (--detail-inputs), the others learn fidelity alone; on the same rows the structure
        # term keeps the estimate's low-pass on the truth's.
        adv_rows = detail_rows(x.start if p_start > 0 else torch.ones_like(x.start), kinds, c.detail_inputs)
        fake = None
        if (disc is not None or c.detail_weight > 0 or c.structure_weight > 0) and bool(adv_rows.any()):
            fake, real = x0_estimate(model, x.z_t, pred.float(), x.a)[adv_rows], z0.float()[adv_rows]
            for name, weight, term in (("detail", c.detail_weight, detail_loss),
                                       ("structure", c.structure_weight, structure_loss)):
                if weight > 0:
                    value = term(fake, real)
                    loss = loss + weight * value
                    state.setdefault(f"{name}_losses", []).append(round(float(value.detach()), 5))
            w_adv = adversarial_weight(step, c.adv_weight, c.adv_start, c.adv_ramp) if disc is not None else 0.0
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
        if fake is not None and disc is not None:
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
                    save_checkpoint(d, model, ema, opt, state, disc, disc_opt)
                    if last:
                        exp = d / "export"
                        metrics["fingerprint"] = export_weights(model, ema, exp)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                     checkpoint_dir_name=f"checkpoint_{step:08d}")
            else:
                ray.train.report(metrics, checkpoint=None)
