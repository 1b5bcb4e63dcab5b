"""Base model presets: one :class:`BaseConfig` per named architecture.

A preset fixes everything that makes two bases interchangeable or not (and so enters the base
fingerprint): the denoiser's UNet shape, pixel or latent space, the LQ encoder, the noise schedule
and the personalization-block shapes. Its sampling defaults ride along but are not part of the
fingerprint: they change how a base is used, not what an adapter trained on it means. Weights come
separately (random for ``tiny``, shipped for ``compact``, user-supplied for ``sd21``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .restore_options import ColorFix


class AdapterShape(BaseModel):
    """Shapes of the personalization blocks; identical for every identity of one base."""

    model_config = ConfigDict(frozen=True)

    head_dim: int = Field(64, description="channels per attention head inside a block")
    inner_ratio: float = Field(1.0, description="attention width as a fraction of the block's channels")
    ref_pool: int = Field(8, description="reference features are pooled to ref_pool x ref_pool tokens")
    cache_refs: int = Field(5, description="references whose keys/values the adapter caches")
    resnet_levels: tuple[int, ...] = Field(
        (), description="UNet levels (0: the finest) whose decoder ResNets also get a personalization block. "
        "The paper's blocks follow every transformer block; a base designed by its FLOPs has transformer "
        "blocks only at coarse levels, while the detail that carries identity is formed at the fine ones.",
    )


class SamplingDefaults(BaseModel):
    """How a preset restores when the caller names nothing: what ``restore``, the CLI, serving and
    batch restore use. ``t_start`` below ``num_train_timesteps`` starts from the LQ diffused to
    ``t_start`` (StableSR, SDEdit, DifFace); ``t_start = num_train_timesteps`` from pure noise."""

    model_config = ConfigDict(frozen=True)

    sampler: Literal["ddim", "ddpm"] = "ddim"
    steps: int = Field(50, ge=1, description="denoising steps")
    t_start: int = Field(1000, ge=1, description="timestep sampling starts from (1000: pure noise)")
    overlap: float = Field(0.25, ge=0, lt=1, description="tile overlap as a fraction of the tile: each pixel "
                           "blends the predictions of the tiles that cover it, so more overlap averages "
                           "more views of it, at more tiles per photo")
    color_fix: ColorFix = Field("wavelet", description="colour correction against the input after stitching: "
                                "a base that drifts in colour needs one; for one that does not, the input's "
                                "low frequencies bring back its noise and compression")

    def override(self, *, sampler: str | None = None, steps: int | None = None,
                 t_start: int | None = None, color_fix: ColorFix | None = None) -> SamplingDefaults:
        """These defaults with what a caller named (``None``: keep the default)."""
        given = {"sampler": sampler, "steps": steps, "t_start": t_start, "color_fix": color_fix}
        return self.model_copy(update={k: v for k, v in given.items() if v is not None})


class BaseConfig(BaseModel):
    """Architecture of a restoration base model (StableSR-like: SFT-conditioned UNet)."""

    model_config = ConfigDict(frozen=True)

    name: str
    space: Literal["pixel", "latent"]
    sample_size: int = Field(description="native tile size in pixels")
    latent_channels: int = 3
    concat_lq: bool = Field(True, description="also feed the LQ latent as extra UNet input channels")
    unshuffle: int = Field(1, ge=1, description="pixel-unshuffle factor of the UNet's stem (pixel presets): "
                           "the UNet's first level runs at 1/unshuffle of the tile's side")
    prediction: Literal["epsilon", "x0_residual"] = Field(
        "epsilon", description="what the denoiser predicts: the noise (DDPM/StableSR), or the clean image "
                               "as a residual on the LQ (zero-initialised output: an untrained model is the identity)")
    sft_kernel: int = Field(3, description="kernel size of the SFT convolutions (1 or 3)")
    sampling: SamplingDefaults = SamplingDefaults()
    unet: dict[str, Any]
    lq_encoder_channels: tuple[int, ...] = Field(description="time-aware LQ encoder width per UNet level")
    prompt_tokens: int = Field(description="length of the fixed base prompt embedding")
    vae: dict[str, Any] | None = None
    scaling_factor: float = 1.0
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    adapter: AdapterShape = AdapterShape()
    license: str = "Apache-2.0 (pfstorer code); weights: see the preset's model card"
    init_seed: int = 0

    @property
    def levels(self) -> int:
        return len(self.unet["block_out_channels"])

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet["cross_attention_dim"])

    @property
    def vae_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def unet_stride(self) -> int:
        """Image pixels per cell of the UNet's first level (VAE factor x pixel-unshuffle factor)."""
        return self.vae_factor * self.unshuffle

    @property
    def granularity(self) -> int:
        """Image sides must be a multiple of this many pixels (UNet downsampling x stem stride)."""
        return self.unet_stride * 2 ** (self.levels - 1)

    @property
    def train_t_max(self) -> int:
        """Training timesteps are drawn from ``[0, train_t_max)``: the range the preset samples."""
        return min(self.num_train_timesteps, self.sampling.t_start + 1)


def _sd_vae(block_out: tuple[int, ...], latent: int = 4, groups: int = 32) -> dict[str, Any]:
    n = len(block_out)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": latent,
        "block_out_channels": list(block_out),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": 2 if groups >= 32 else 1,
        "norm_num_groups": groups,
        "sample_size": 512,
    }


# Attention only at 1/4 resolution: CPU-cheap at any tile size.
_TINY_UNET: dict[str, Any] = {
    "block_out_channels": [16, 32, 64],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 16,
    "norm_num_groups": 8,
}

PRESETS: dict[str, BaseConfig] = {
    # Random weights, seconds on a CPU: for tests of every code path.
    "tiny": BaseConfig(
        name="tiny",
        space="pixel",
        sample_size=32,
        unet=_TINY_UNET,
        lq_encoder_channels=(8, 16, 32),
        prompt_tokens=4,
        adapter=AdapterShape(head_dim=16, ref_pool=4, cache_refs=5),
        license="random weights (no licence restrictions)",
    ),
    # The tiny structure in latent space with a small random VAE: tests the VAE code path.
    "tiny-latent": BaseConfig(
        name="tiny-latent",
        space="latent",
        sample_size=32,
        latent_channels=4,
        unet=_TINY_UNET,
        lq_encoder_channels=(8, 16, 32),
        prompt_tokens=4,
        vae=_sd_vae((16, 32), groups=8),
        scaling_factor=1.0,
        adapter=AdapterShape(head_dim=16, ref_pool=4, cache_refs=5),
        license="random weights (no licence restrictions)",
    ),
    # Our own small face restoration base, designed by its FLOPs for 2 CPU cores (weights trained
    # by `pfstorer train-base`; see pfstorer/weights/compact/MODEL_CARD.md): a 4x pixel-unshuffle
    # stem, attention only at 1/16 and 1/32 of the tile, 1x1 SFT convolutions, x0 predicted as a
    # residual on the LQ, sampling from the LQ diffused to t = 200 in one DDIM step (measured better
    # than 2 or 4 steps on PSNR, SSIM and ST-LPIPS: benchmarks/results/base_compact_cpu*.md), tiles
    # overlapping by half (more identity than a quarter at the same PSNR, 2.25x the tiles:
    # benchmarks/results/base_compact_tune.md).
    # Cost: 2.10 GFLOP per 128 px tile forward, 1.55 GFLOP per 64 px training sample (forward +
    # backward), 10.2 M parameters (benchmarks/results/base_speed_cpu.md).
    "compact": BaseConfig(
        name="compact",
        space="pixel",
        sample_size=128,
        unshuffle=4,
        prediction="x0_residual",
        sft_kernel=1,
        sampling=SamplingDefaults(sampler="ddim", steps=1, t_start=200, overlap=0.5, color_fix="none"),
        unet={
            "block_out_channels": [64, 96, 128, 160],
            "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
            "layers_per_block": 1,
            "cross_attention_dim": 128,
            "attention_head_dim": 32,
            "norm_num_groups": 16,
        },
        lq_encoder_channels=(32, 48, 64, 64),
        prompt_tokens=8,
        # blocks after the two level-1 decoder ResNets too (1/8 of the tile, 16 x 16 tokens): the
        # transformer blocks sit at 1/16 and 1/32 only, too coarse to carry identity (docs/model.md)
        adapter=AdapterShape(head_dim=32, ref_pool=16, cache_refs=5, resnet_levels=(1,)),
        license="weights: pfstorer model card (trained on LFW, research use)",
    ),
    # Stable Diffusion 2.1-base UNet + StableSR-style SFT / time-aware encoder, latent space.
    "sd21": BaseConfig(
        name="sd21",
        space="latent",
        sample_size=512,
        latent_channels=4,
        concat_lq=False,
        unet={
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "layers_per_block": 2,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
            "norm_num_groups": 32,
        },
        lq_encoder_channels=(128, 256, 512, 512),
        prompt_tokens=77,
        vae=_sd_vae((128, 256, 512, 512)),
        scaling_factor=0.18215,
        adapter=AdapterShape(head_dim=64, ref_pool=8, cache_refs=5),
        license="CreativeML Open RAIL++-M (SD 2.1) + StableSR S-Lab licence: bring your own weights",
    ),
}


def get_preset(name: str) -> BaseConfig:
    """The preset called ``name``; a clear error lists the known ones."""
    from .errors import InputError

    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(f"unknown base preset {name!r}; known presets: {', '.join(PRESETS)}") from None
