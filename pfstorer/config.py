"""Personalization settings: torch-free, so :mod:`pfstorer.settings` can hold them as they are."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class PersonalizeConfig(BaseModel):
    """Training settings; part of every job key, so any change retrains."""

    model_config = ConfigDict(frozen=True)

    steps: int = Field(150, ge=0, description="optimisation steps (paper: 500; 150 of 8 samples keep one "
                       "identity under 2 minutes on 2 CPU cores with the compact base)")
    batch_size: int = Field(8, ge=1, description="LQ samples per identity per step (2 and 4 kept less "
                            "identity on heavy degradations: docs/personalization.md)")
    lr: float = Field(3e-3, gt=0, description="learning rate of the projections and the token")
    alpha_lr: float = Field(3e-2, gt=0, description="learning rate of the gates alpha: Adam moves a parameter by "
                            "about its lr per step, so at 1e-3 the gates would stay below 0.04 after 40 steps")
    weight_decay: float = Field(0.0, ge=0)
    lambda_gen: float = Field(0.1, ge=0, description="weight of the generative regulariser (paper: 0.1)")
    gen_rows: int | None = Field(
        2, ge=1, description="rows per identity and step that estimate L_gen (eq. 4): the first of the step's "
        "batch_size crops; None: all of them, as the paper. Each costs a pass of the base, as an L_diff row does: "
        "2 of 8 kept the identity of 8 of 8 on the tune people in under two thirds of the time (docs/personalization.md)")
    lambda_pers: float = Field(5e-4, ge=0, description="weight of the token attention regulariser")
    p_hq: float = Field(0.03, ge=0, le=1, description="probability of a clean input (paper: 0.03)")
    p_lq_start: float = Field(1.0, ge=0, le=1, description="share of L_diff rows drawn as sampling starts: the LQ "
                              "diffused to the preset's t_start, as restore begins (presets that start from the LQ)")
    loss: Literal["auto", "mse", "l1"] = Field(
        "auto", description="distance of L_diff and L_gen to the preset's target; auto: l1 for x0_residual "
        "bases (what compact was trained with), the paper's mse for noise-predicting ones")
    levels: tuple[str, ...] = ("light", "heavy")
    crop_scale: tuple[float, float] = Field(
        (0.85, 1.0), description="side of the random training crops as a fraction of a reference's short side: "
        "near the whole photo, the scale faces have in the photos restored later (0.6-1.0 kept less identity)")
    min_refs: int = Field(3, ge=1, description="fewer good reference photos: the person is quarantined")
    max_refs: int = Field(20, ge=1, description="more reference photos: the extra ones are quarantined")
    seed: int = 0
    learn_alpha: bool = Field(True, description="False freezes alpha at 1: the 'Base + ViCo' ablation")
    prior: str = Field("base", min_length=1, description="where each adapter starts: 'base', the reference prior "
                       "shipped beside the base's weights when it has one (else zero); 'none', zero (random "
                       "projections, alpha = 0); or the path of a prior.safetensors (pfstorer.prior)")

    @model_validator(mode="after")
    def _check_refs(self) -> PersonalizeConfig:
        if self.min_refs > self.max_refs:
            raise ValueError(f"min_refs ({self.min_refs}) must be <= max_refs ({self.max_refs})")
        return self


class TrainingSpeed(BaseModel):
    """How personalization uses the hardware, not what it learns: kept out of job keys.

    bf16 autocast changes float rounding only (the frozen base's matmuls and convolutions run in
    bfloat16; adapters, optimizer state and losses stay float32); checkpointing and prefetching
    change nothing but memory and time.
    """

    model_config = ConfigDict(frozen=True)

    autocast_bf16: bool = Field(
        False, description="run the frozen base under bf16 autocast (GPUs with bf16: A100, H100)"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute UNet blocks in backward: less memory for large packs, one more forward per block"
    )
    prefetch: Literal["auto", "on", "off"] = Field(
        "auto", description="draw each identity's next batch (crops, degradations) in a background thread while "
        "the current step trains; the draws are the same, so the adapters are too. auto: on when training on "
        "a GPU; off on a CPU, where the thread takes cores from the step (measured: 0.79 -> 0.94 s per step "
        "on 2 cores, benchmarks/results/prefetch_cpu_compact.md)"
    )
