"""The detail objective of base training: a patch discriminator trained beside the restorer.

Why: an L1 (or L2) loss at one sampling step is minimised by the posterior mean, a blur wherever
the degraded input does not pin the answer down (skin, hair, eyelashes of a face seen small or
blurred). One-step diffusion restorers (OSEDiff, SinSR, ADD) and GAN face restorers (GFPGAN,
Real-ESRGAN) get sharp, plausible texture from an adversarial loss: a discriminator learns to tell
restored patches from real ones and the restorer learns to make patches it cannot tell apart.

This one is small on purpose (the base trains on 2 CPU cores): a spectral-normalised patch
discriminator whose logits each see about 30 px of the image, i.e. local texture, not the whole
face (identity and layout stay with the pixel loss). Hinge loss (SAGAN, BigGAN) and a feature-
matching term (pix2pixHD) that steadies the restorer's gradient. No pretrained network is used,
so nothing that scores the benchmarks (FaceNet, dlib, ST-LPIPS, NIQE, BRISQUE) enters training.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm

__all__ = ["PatchDiscriminator", "discriminator_loss", "restorer_adversarial_loss"]


class PatchDiscriminator(nn.Module):
    """Logits per patch for images in the denoiser's space ([-1, 1] pixels), plus the features
    each stage saw (for feature matching). About 0.22 GFLOP per 64 px crop forward at width 32."""

    def __init__(self, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stages = nn.ModuleList([
            spectral_norm(nn.Conv2d(in_channels, w, 3, 1, 1)),
            spectral_norm(nn.Conv2d(w, 2 * w, 4, 2, 1)),
            spectral_norm(nn.Conv2d(2 * w, 4 * w, 4, 2, 1)),
            spectral_norm(nn.Conv2d(4 * w, 4 * w, 3, 1, 1)),
        ])
        self.head = spectral_norm(nn.Conv2d(4 * w, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = []
        for conv in self.stages:
            x = F.leaky_relu(conv(x), 0.2)
            feats.append(x)
        return self.head(x), feats


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: real patches above +1, restored ones below -1."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def restorer_adversarial_loss(
    disc: PatchDiscriminator, fake: torch.Tensor, real: torch.Tensor, feature_matching: float = 1.0
) -> torch.Tensor:
    """The restorer's side: raise the discriminator's logits on its output, and (feature
    matching) make the discriminator's features of the output match those of the truth."""
    fake_logits, fake_feats = disc(fake)
    loss = -fake_logits.mean()
    if feature_matching > 0:
        with torch.no_grad():
            _, real_feats = disc(real)
        fm = sum(F.l1_loss(f, r) for f, r in zip(fake_feats, real_feats, strict=True)) / len(fake_feats)
        loss = loss + feature_matching * fm
    return loss
