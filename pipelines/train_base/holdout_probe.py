"""The held-out probe of base training: clean-image-estimate PSNR (and sharpness) on photos of
people kept out of training, at fixed timesteps, so the curves show what the loss hides."""

from __future__ import annotations

from typing import Any

from pfstorer.base_objective import x0_estimate
from pipelines.train_base.config import TrainBaseConfig

# Held-out photos of large-face sources are shrunk so the face is PROBE_FACE_TILES of the preset's
# tile wide (compact: 160 px), and every probe photo is centre-cropped to PROBE_MAX_TILES tiles a
# side (compact: 256 px): a probe costs a few steps whatever the preset, since attention is
# quadratic in the side.
PROBE_FACE_TILES = 1.25
PROBE_MAX_TILES = 2


class HeldOutProbe:
    """Clean-image-estimate PSNR on held-out photos at fixed timesteps (rank 0, between steps).

    Each photo gets a fixed degradation (alternately ``heavy`` and ``light``) and fixed noise; the
    estimate is the denoiser's x0 at ``t`` (noised HQ), and at ``t_start`` from the LQ diffused there
    (where sampling starts, for presets that start from the LQ). The LQ's own PSNR is the baseline.
    From the LQ start it also logs sharpness: the Laplacian variance of the estimate over the
    truth's (1: as much fine detail as the truth; an L1 restorer sits far below).

    Every source gives its own group of held-out photos; keys of groups after the first are
    prefixed ``NAME/``. Photos of sources with large faces are shrunk so the face is
    ``PROBE_FACE_TILES`` of the preset's tile wide, and all are centre-cropped to at most
    ``PROBE_MAX_TILES`` tiles a side.
    """

    def __init__(self, groups: list[tuple[str, Any, float]], model, c: TrainBaseConfig) -> None:
        import ray
        import torch

        from pfstorer.degradations import degrade
        from pfstorer.images import resize
        from pfstorer.sampling import alphas_cumprod

        cfg = model.config
        g = cfg.granularity
        probe_face_px, max_side = PROBE_FACE_TILES * cfg.sample_size, PROBE_MAX_TILES * cfg.sample_size
        self.groups = []
        for k, (name, ref, face_px) in enumerate(groups):
            photos = ray.get(ref)
            hqs = []
            for ph in photos:
                x = torch.from_numpy(ph.copy()).permute(2, 0, 1).float() / 255.0
                s = min(1.0, probe_face_px / face_px)
                if s < 1:
                    x = resize(x, (round(x.shape[1] * s), round(x.shape[2] * s)))
                side = (min(*x.shape[1:], max_side) // g) * g
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
                    x0 = x0_estimate(model, z_t, pred, a)
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
