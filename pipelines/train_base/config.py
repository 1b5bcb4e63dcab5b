"""What a base-training run computes (:class:`TrainBaseConfig`) and what it returns."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.base_data import input_kinds

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
    detail_weight: float = Field(0.0, ge=0, description="weight of the detail-energy loss on the x0 estimates "
                                 "of rows drawn as sampling starts (0: off; pfstorer.base_objective.detail_loss)")
    structure_weight: float = Field(0.0, ge=0, description="weight of the structure loss on the same rows as "
                                    "the detail objectives: their low-pass must be the truth's (0: off; "
                                    "pfstorer.base_objective.structure_loss)")
    detail_inputs: tuple[str, ...] | None = Field(
        None, min_length=1,
        description="kinds of training input the detail objectives (adversarial, detail energy) act on: "
                    "'clean', 'x4' and the degradation levels; the others learn fidelity (L1) alone "
                    "(None: every kind)")
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

    @model_validator(mode="after")
    def _known_detail_inputs(self) -> TrainBaseConfig:
        known = input_kinds(self.levels)
        if unknown := [k for k in self.detail_inputs or () if k not in known]:
            raise ValueError(f"detail_inputs {unknown} are not kinds of training input; choose from {list(known)}")
        return self


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
