"""The base model's training objective (paper section 3.3): how a restoration base learns.

- **inputs** (:func:`noised_batch`): random timesteps of ``[0, train_t_max)``, the range the
  preset samples; for presets that sample from the LQ diffused to ``t_start``, a share of the rows
  is drawn exactly so (the LQ, not the clean image, diffused to ``t_start``), so the first sampling
  step is trained on what it will see;
- **denoising loss** (:func:`denoising_loss`): the distance (MSE or L1) of the denoiser's output
  to its target, the noise for epsilon presets and the clean image for ``x0_residual`` ones;
  optionally weighted per row by ``max(1, 1/SNR(t))`` (Salimans & Ho's truncated-SNR weighting);
- **detail** (:func:`adversarial_weight`, :mod:`pfstorer.adversarial`): the clean-image estimates
  (:func:`x0_estimate`) of the rows drawn as sampling starts must look real to a patch
  discriminator, so one-step sampling returns texture, not the posterior mean's blur;
- **detail energy** (:func:`detail_loss`): the same estimates must carry as much fine detail,
  window by window, as the truth: a loss on the local energy of their Laplacian, blind to where
  each ripple sits, so the L1 loss's mean (a blur) is no longer its optimum. Both act on the
  rows :func:`detail_rows` picks: sampling starts of the kinds of input they are asked for;
- **structure** (:func:`structure_loss`): on the same rows, the estimate's low-pass must be the
  truth's, so the detail terms redraw texture without moving what sits below it (the face's
  shapes and shading, which fidelity and identity rest on).

The same forward noising as sampling and personalization (:func:`pfstorer.sampling.diffuse`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from .sampling import diffuse

if TYPE_CHECKING:
    from .model import RestorationModel


@dataclass
class NoisedBatch:
    """One step's noisy inputs: ``z_t``, their timesteps ``t``, the ``noise`` added, which rows
    ``start`` from the LQ, and ``a`` = alpha-bar at each row's ``t`` ([n, 1, 1, 1])."""

    z_t: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    start: torch.Tensor
    a: torch.Tensor


def noised_batch(model: RestorationModel, z0: torch.Tensor, lq: torch.Tensor, gen: torch.Generator,
                 p_start: float, alphas_cumprod: torch.Tensor) -> NoisedBatch:
    """Draw timesteps, noise and sampling-start rows from ``gen`` (in that order) and diffuse.

    A row drawn as a sampling start (probability ``p_start``) is the LQ diffused to the preset's
    ``t_start``; every other row is the clean image at a random ``t``."""
    n, dev = len(z0), z0.device
    t = torch.randint(0, model.config.train_t_max, (n,), generator=gen).to(dev)
    noise = torch.randn(z0.shape, generator=gen).to(dev)
    start = (torch.rand(n, generator=gen) < p_start).to(dev)
    t = torch.where(start, torch.full_like(t, model.config.sampling.t_start), t)
    z_t = diffuse(model, torch.where(start.view(-1, 1, 1, 1), lq, z0).float(), noise, t)
    return NoisedBatch(z_t, t, noise, start, alphas_cumprod[t].view(-1, 1, 1, 1))


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, a: torch.Tensor,
                   distance: Literal["mse", "l1"] = "mse",
                   weighting: Literal["eps", "trunc-snr"] = "eps") -> tuple[torch.Tensor, torch.Tensor]:
    """The diffusion loss of a base and its unweighted value per row (the curve that is logged).

    ``trunc-snr`` multiplies each row by ``max(1, 1/SNR(t)) = max(1, (1 - a) / a)``: for epsilon
    presets, the image-space error where noise dominates."""
    err = pred.float() - target
    per_row = (err.abs() if distance == "l1" else err.pow(2)).flatten(1).mean(1)
    if weighting == "trunc-snr":
        return (per_row * ((1 - a) / a).clamp(min=1.0).view(-1)).mean(), per_row
    return per_row.mean(), per_row


def x0_estimate(model: RestorationModel, z_t: torch.Tensor, pred: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The clean image the denoiser's output implies: the output itself for ``x0_residual``
    presets, ``(z_t - sqrt(1 - a) eps) / sqrt(a)`` for epsilon ones."""
    return pred if model.config.prediction == "x0_residual" else (z_t - (1 - a).sqrt() * pred) / a.sqrt()


def adversarial_weight(step: int, weight: float, start: int, ramp: int) -> float:
    """Weight of the adversarial term at ``step``: 0 before ``start``, then rising linearly to
    ``weight`` over ``ramp`` steps (the discriminator trains from step 0, so it is informative)."""
    return weight * min(1.0, max(0.0, (step - start + 1) / max(1, ramp)))


def detail_rows(start: torch.Tensor, kinds: Sequence[str], inputs: Sequence[str] | None) -> torch.Tensor:
    """Which rows the detail objectives act on: those drawn as sampling starts (``start``, bool
    [n]; their x0 estimate is what one-step sampling returns) whose kind of input (``kinds``:
    ``clean``, a level, ``x4``) is one of ``inputs`` (None: any). An input that already holds its
    detail is better copied (L1) than redrawn."""
    if inputs is None:
        return start
    asked = torch.tensor([k in inputs for k in kinds], dtype=torch.bool, device=start.device)
    return start & asked


DETAIL_WINDOW = 8  # pixels per side of the windows whose detail energy is matched
DETAIL_SCALES = 2  # full resolution and half: skin and hair texture, then eyelids and brows


def _detail_energy(x: torch.Tensor) -> torch.Tensor:
    """Root mean square per window of the grey image's Laplacian, taken as each pixel minus its
    3x3 mean (the 8-neighbour kernel over 9; the sharpness metric uses the 4-neighbour one)."""
    y = x.mean(1, keepdim=True)
    lap = y - F.avg_pool2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), 3, 1)
    return F.avg_pool2d(lap.pow(2), DETAIL_WINDOW, ceil_mode=True).add(1e-6).sqrt()


def detail_loss(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """How far the estimate's local detail energy is from the truth's, per window and scale.

    It matches the *amount* of fine detail, not its phase: texture placed a pixel off costs
    nothing here, whereas the L1 loss makes the blur of all plausible placements its optimum.
    Being per window, the target follows each photo's own face scale (a 500 px face has skin
    pores; a 60 px face has none to add)."""
    total = fake.new_zeros(())
    for s in range(DETAIL_SCALES):
        if s:
            fake, real = F.avg_pool2d(fake, 2), F.avg_pool2d(real, 2)
        total = total + (_detail_energy(fake) - _detail_energy(real)).abs().mean()
    return total / DETAIL_SCALES


STRUCTURE_FACTOR = 4  # pixels per side averaged: what is left is the face's shapes and shading


def structure_loss(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """L1 distance of the estimate's and the truth's means over ``STRUCTURE_FACTOR`` px blocks.

    Blind to texture inside a block (the detail terms' business), it weighs the errors the L1
    loss spreads over every frequency onto the low ones alone."""
    return (F.avg_pool2d(fake, STRUCTURE_FACTOR, ceil_mode=True)
            - F.avg_pool2d(real, STRUCTURE_FACTOR, ceil_mode=True)).abs().mean()
