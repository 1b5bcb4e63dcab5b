"""The personalization objective (paper section 3.2): ``L = L_diff + lambda_gen * L_gen +
lambda_pers * L_pers`` (eq. 5).

- ``L_diff`` (eq. 2): the distance of the denoiser's output, given the LQ and a reference, to the
  preset's target (the noise, or the clean image for ``x0_residual`` presets);
- ``L_gen`` (eq. 4): the same with the null LQ input, so the adapter must carry the identity;
- ``L_pers``: ViCo's attention regulariser on the token ``*`` (:func:`pers_loss`).

The distance is the one the base was trained with (:func:`distance`); the base's own training
loss is :mod:`pfstorer.base_objective`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .config import PersonalizeConfig
    from .model import RestorationModel

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def distance(config: PersonalizeConfig, model: RestorationModel) -> Distance:
    """The distance of L_diff and L_gen: ``config.loss``, ``auto`` choosing by the base's
    prediction (l1 for ``x0_residual`` bases, which were trained with it)."""
    loss = config.loss
    if loss == "auto":
        loss = "l1" if model.config.prediction == "x0_residual" else "mse"
    return F.l1_loss if loss == "l1" else F.mse_loss


def diffusion_loss(dist: Distance, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_diff (eq. 2): ``pred`` made from the LQ and a reference photo of the person."""
    return dist(pred, target)


def generative_loss(dist: Distance, pred_null: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_gen (eq. 4): ``pred_null`` made from the null LQ input, so only the adapter knows the face."""
    return dist(pred_null, target)


def pers_loss(maps: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """L_pers, ViCo's attention regulariser: the token's map should match the last prompt token's.

    ``maps`` holds one (token map, prompt map) pair per block, each ``[n, HW]``. Each map is
    normalised by its maximum over positions; squared differences are averaged over positions and
    blocks. Returns one value per row.
    """
    losses = []
    for tok, ref in maps:
        tok = tok / tok.amax(-1, keepdim=True).clamp_min(1e-8)
        ref = ref / ref.amax(-1, keepdim=True).clamp_min(1e-8)
        losses.append(((tok - ref) ** 2).mean(-1))
    return torch.stack(losses).mean(0)


@dataclass
class LossTerms:
    """One identity's terms of eq. 5; a term that is off (its lambda is 0) is None."""

    diff: torch.Tensor
    gen: torch.Tensor | None = None
    pers: torch.Tensor | None = None

    def total(self, lambda_gen: float, lambda_pers: float) -> torch.Tensor:
        """Eq. 5: ``L_diff + lambda_gen * L_gen + lambda_pers * L_pers``."""
        loss = self.diff
        if self.gen is not None:
            loss = loss + lambda_gen * self.gen
        if self.pers is not None:
            loss = loss + lambda_pers * self.pers
        return loss

    def as_floats(self) -> dict[str, float]:
        """The terms that are on, as numbers (the adapter's recorded losses)."""
        terms = {"diff": self.diff, "gen": self.gen, "pers": self.pers}
        return {name: float(v.detach()) for name, v in terms.items() if v is not None}
