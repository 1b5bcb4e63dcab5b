"""What one ``pfstorer train-prior`` run computes: its settings, torch-free."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pfstorer.config import PersonalizeConfig

_P = PersonalizeConfig()


class TrainPriorConfig(BaseModel):
    """Settings of a reference-prior run. The data and loss per person are personalization's
    (:class:`~pfstorer.config.PersonalizeConfig`: crops, light/heavy degradations, eq. 5), so the
    prior learns what fine-tuning would, shared across people."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base: str = "compact"
    steps: int = Field(600, ge=0, description="optimisation steps")
    people_per_step: int = Field(8, ge=1, description="people in one step's batch, one shared set of block weights")
    targets_per_person: int = Field(1, ge=1, description="degraded targets per person per step")
    photos_per_person: int = Field(3, ge=2, description="photos of a person drawn per step: each target is one of "
                                   "them and attends to the reference features of another")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the projections and the token")
    alpha_lr: float = Field(1e-2, gt=0, description="AdamW learning rate of the gates alpha")
    weight_decay: float = Field(0.0, ge=0)
    lambda_gen: float = Field(_P.lambda_gen, ge=0, description="weight of L_gen (eq. 4), as in personalization")
    lambda_pers: float = Field(_P.lambda_pers, ge=0, description="weight of L_pers, as in personalization")
    probe_people: int = Field(16, ge=0, description="train people held out for the probe (validation loss)")
    probe_every: int = Field(50, ge=1, description="probe every N steps (and at the first and last)")
    checkpoint_every: int = Field(50, ge=1, description="checkpoint (and prior file) every N steps")
    log_every: int = Field(10, ge=1)
    limit_people: int | None = Field(None, ge=2, description="train on a seeded subset of this many people")
    seed: int = 0

    def personalize(self) -> PersonalizeConfig:
        """Personalization's settings with this run's batch, rates and loss weights (no prior:
        the prior trains from zero)."""
        return PersonalizeConfig(
            batch_size=self.targets_per_person, lr=self.lr, alpha_lr=self.alpha_lr, weight_decay=self.weight_decay,
            lambda_gen=self.lambda_gen, lambda_pers=self.lambda_pers, seed=self.seed, prior="none", min_refs=1,
        )
