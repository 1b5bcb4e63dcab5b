"""The restoration base model: a diffusers UNet conditioned on the LQ image through SFT layers.

Structure (paper section 3, Fig. 3; StableSR): a time-aware LQ encoder turns the LQ image (its
latent for latent presets) and the timestep into feature maps at every UNet resolution; after each
UNet ResNet block an SFT layer modulates the features, ``F * (1 + gamma) + beta``, with
``(gamma, beta)`` predicted from the encoder features of that resolution. The UNet keeps its text
cross-attention, fed with a fixed base prompt embedding (we ship no text encoder: the prompt is a
frozen tensor of the base, the stand-in for "a photo of").

SFT layers and personalization blocks are attached with forward hooks, so the UNet's own modules
and state-dict keys stay exactly those of ``UNet2DConditionModel`` (SD/StableSR weights load as they
are) and attaching or swapping an adapter never changes the base's structure.

Deviation from StableSR, stated: pixel-space presets (``tiny``, ``compact``) also concatenate the
LQ image to the UNet input (``concat_lq``); ``sd21`` keeps StableSR's SFT-only conditioning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError, WeightsUnavailableError
from .presets import BaseConfig, get_preset

if TYPE_CHECKING:
    from .personalization import BlockHook

WEIGHTS_DIR = Path(__file__).parent / "weights"


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class TimeAwareLQEncoder(nn.Module):
    """StableSR's time-aware encoder: LQ latent + timestep -> one feature map per UNet level."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], groups: int = 8) -> None:
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        temb = channels[0] * 4
        self.time_proj = Timesteps(channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(channels[0], temb)
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        prev = channels[0]
        for i, c in enumerate(channels):
            self.blocks.append(_ResBlock(prev, c, temb, groups))
            prev = c
            if i < len(channels) - 1:
                self.downs.append(nn.Conv2d(c, c, 3, stride=2, padding=1))

    def forward(self, lq: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        temb = self.time_embed(self.time_proj(t).to(lq.dtype))
        h = self.conv_in(lq)
        feats = []
        for i, block in enumerate(self.blocks):
            h = block(h, temb)
            feats.append(h)
            if i < len(self.downs):
                h = self.downs[i](h)
        return feats


@dataclass
class _Conditioning:
    lq_feats: list[torch.Tensor]
    pb: BlockHook | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _diffusers_without_scipy() -> None:
    """Tell diffusers that scipy is absent before its model modules load.

    Importing diffusers' UNet pulls in all its schedulers, and those import ``scipy.stats`` for
    samplers this project never uses (DDIM and DDPM need no scipy): 1-2 s of every cold
    ``pfstorer restore`` on 2 cores. Only diffusers' own check is changed; scipy stays usable.
    """
    import diffusers.utils.import_utils as diffusers_imports

    diffusers_imports._scipy_available = False


class RestorationModel(nn.Module):
    """Base restoration model of one preset; frozen during personalization."""

    def __init__(self, config: BaseConfig) -> None:
        super().__init__()
        _diffusers_without_scipy()
        from diffusers import UNet2DConditionModel

        self.config = config
        lat = config.latent_channels * config.unshuffle**2  # channels the UNet's stem sees
        self.unet = UNet2DConditionModel(
            sample_size=config.sample_size // config.unet_stride,
            in_channels=lat * (2 if config.concat_lq else 1),
            out_channels=lat,
            **config.unet,
        )
        if config.prediction == "x0_residual":  # predicts x0 - LQ: zero at init, so x0_hat = LQ
            nn.init.zeros_(self.unet.conv_out.weight)
            nn.init.zeros_(self.unet.conv_out.bias)
        self.lq_encoder = TimeAwareLQEncoder(lat, config.lq_encoder_channels)
        self.prompt = nn.Parameter(torch.randn(config.prompt_tokens, config.cross_attention_dim) * 0.5)
        self.vae = None
        if config.vae is not None:
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL(**config.vae)
        # One SFT layer per UNet ResNet, in a fixed order.
        self._resnets = self._collect_resnets()
        self.sft = nn.ModuleList(
            nn.Conv2d(config.lq_encoder_channels[level], 2 * ch, config.sft_kernel, padding=config.sft_kernel // 2)
            for _, level, ch in self._resnets
        )
        for conv in self.sft:  # identity at init: the LQ encoder learns to steer the UNet
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.transformer_blocks = self._collect_transformers()
        # where personalization blocks attach: after every transformer block, then after the
        # decoder ResNets of config.adapter.resnet_levels (their SFT applied first)
        n = config.levels
        self.pb_blocks = self.transformer_blocks + [
            (r, n - 1 - i, r.out_channels) for i, block in enumerate(self.unet.up_blocks)
            if n - 1 - i in config.adapter.resnet_levels for r in block.resnets
        ]
        self._cond: _Conditioning | None = None
        for i, (module, level, _) in enumerate(self._resnets):
            module.register_forward_hook(self._sft_hook(i, level))
        for i, (module, _level, _ch) in enumerate(self.pb_blocks):
            module.register_forward_hook(self._pb_hook(i))
        self._fingerprint: str | None = None
        self._compiled = None
        # where load_base read the weights (folder or URL; None: seeded random weights): files
        # shipped beside them, such as the reference prior, are found from here
        self.weights_location: str | None = None

    # -- structure -------------------------------------------------------------------------
    def _collect_resnets(self) -> list[tuple[nn.Module, int, int]]:
        n = self.config.levels
        out = []
        for i, block in enumerate(self.unet.down_blocks):
            out += [(r, i, r.out_channels) for r in block.resnets]
        out += [(r, n - 1, r.out_channels) for r in self.unet.mid_block.resnets]
        for i, block in enumerate(self.unet.up_blocks):
            out += [(r, n - 1 - i, r.out_channels) for r in block.resnets]
        return out

    def _collect_transformers(self) -> list[tuple[nn.Module, int, int]]:
        """Every Transformer2DModel of the UNet: the base blocks that get a personalization block."""
        n = self.config.levels
        out = []
        for i, block in enumerate(self.unet.down_blocks):
            out += [(a, i, a.config.in_channels) for a in getattr(block, "attentions", [])]
        out += [(a, n - 1, a.config.in_channels) for a in getattr(self.unet.mid_block, "attentions", [])]
        for i, block in enumerate(self.unet.up_blocks):
            out += [(a, n - 1 - i, a.config.in_channels) for a in getattr(block, "attentions", [])]
        return out

    def _sft_hook(self, index: int, level: int):
        def hook(_module: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
            cond = self._cond
            if cond is None:
                raise RuntimeError("call RestorationModel.denoise(), not the UNet directly")
            gamma, beta = self.sft[index](cond.lq_feats[level]).chunk(2, dim=1)
            return out * (1 + gamma) + beta

        return hook

    def _pb_hook(self, index: int):
        def hook(_module: nn.Module, _inp: Any, out: Any) -> Any:
            cond = self._cond
            if cond is None or cond.pb is None:
                return out
            if isinstance(out, torch.Tensor):  # a ResNet
                return cond.pb.apply(index, out)
            sample = out[0] if isinstance(out, tuple) else out.sample
            sample = cond.pb.apply(index, sample)
            return (sample, *out[1:]) if isinstance(out, tuple) else type(out)(sample=sample)

        return hook

    # -- spaces -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.prompt.device

    @property
    def dtype(self) -> torch.dtype:
        return self.prompt.dtype

    def to_latent(self, img: torch.Tensor) -> torch.Tensor:
        """Image batch in [0,1] -> the denoiser's space (pixels in [-1,1] or scaled VAE latents)."""
        x = img.to(self.device, self.dtype) * 2 - 1
        if self.vae is None:
            return x
        return self.vae.encode(x).latent_dist.mode() * self.config.scaling_factor

    def from_latent(self, z: torch.Tensor) -> torch.Tensor:
        if self.vae is not None:
            z = self.vae.decode(z / self.config.scaling_factor).sample
        return ((z + 1) / 2).clamp(0, 1)

    def null_lq(self, like: torch.Tensor) -> torch.Tensor:
        """The paper's null LQ input (L_gen): zeros in the denoiser's space."""
        return torch.zeros_like(like)

    # -- denoising ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def conditioned(self, lq_feats: list[torch.Tensor], pb: BlockHook | None = None) -> Iterator[_Conditioning]:
        prev = self._cond
        self._cond = _Conditioning(lq_feats=lq_feats, pb=pb)
        try:
            yield self._cond
        finally:
            self._cond = prev

    def denoise(
        self, z_t: torch.Tensor, t: torch.Tensor, lq: torch.Tensor, pb: BlockHook | None = None
    ) -> torch.Tensor:
        """The denoiser's prediction for ``z_t`` at timesteps ``t`` (one per row) given the LQ latent:
        the noise (``prediction="epsilon"``) or the clean image (``"x0_residual"``), as
        :meth:`target` says."""
        impl = self._compiled if self._compiled is not None else self._denoise
        return impl(z_t, t, lq, pb)

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def compile_denoiser(self, *, backend: str = "inductor", mode: str | None = None) -> RestorationModel:
        """Compile the whole denoiser (LQ encoder, UNet, SFT and personalization hooks) once.

        ``mode="reduce-overhead"`` captures CUDA graphs. Adapters live in fixed buffers
        (:class:`~pfstorer.personalization.AdapterSlots`) and rows pick theirs by index, so swapping
        or mixing identities is an in-place copy that never triggers a recompilation. Compiled,
        ``restore_batch`` pads every tile batch to ``tile_batch`` rows and photos smaller than a
        tile to a whole tile, so one graph serves every photo.
        """
        self._compiled = torch.compile(self._denoise, backend=backend, mode=mode, dynamic=False)
        return self

    def gradient_checkpointing(self, enabled: bool = True) -> RestorationModel:
        """Recompute the UNet's ResNet and transformer blocks in backward instead of storing
        their activations (large packs K on one GPU). Only acts while gradients are on, so
        inference on the same base is untouched; gradients are the same as without it.

        Why not diffusers' default: the SFT and personalization hooks read the conditioning of
        the current :meth:`denoise` call, which has ended when backward recomputes a block, so
        each checkpointed call carries its own conditioning into the recomputation.
        """
        from torch.utils.checkpoint import checkpoint

        if not enabled:
            self.unet.disable_gradient_checkpointing()
            return self

        def checkpointed(module: nn.Module, *args: Any) -> Any:
            cond = self._cond

            def run(*inner: Any) -> Any:
                prev, self._cond = self._cond, cond
                try:
                    return module(*inner)
                finally:
                    self._cond = prev

            return checkpoint(run, *args, use_reentrant=False)

        self.unet.enable_gradient_checkpointing(checkpointed)
        return self

    def target(self, z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What :meth:`denoise` is trained to output for ``z_t`` made from clean ``z0`` and ``noise``."""
        return z0 if self.config.prediction == "x0_residual" else noise

    def _denoise(self, z_t: torch.Tensor, t: torch.Tensor, lq: torch.Tensor, pb: BlockHook | None) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(z_t.shape[0])
        t = t.to(z_t.device)
        r = self.config.unshuffle
        lq_in = F.pixel_unshuffle(lq, r) if r > 1 else lq
        feats = self.lq_encoder(lq_in, t)
        x = F.pixel_unshuffle(z_t, r) if r > 1 else z_t
        x = torch.cat([x, lq_in], dim=1) if self.config.concat_lq else x
        prompt = self.prompt.unsqueeze(0).expand(z_t.shape[0], -1, -1)
        with self.conditioned(feats, pb):
            out = self.unet(x, t, encoder_hidden_states=prompt, return_dict=False)[0]
        out = F.pixel_shuffle(out, r) if r > 1 else out
        return lq + out if self.config.prediction == "x0_residual" else out

    # -- identity of the base ----------------------------------------------------------------
    def freeze(self) -> RestorationModel:
        self.requires_grad_(False)
        self.eval()
        return self

    @property
    def fingerprint(self) -> str:
        """sha256 of the architecture config and every weight: names a base for adapters."""
        if self._fingerprint is None:
            self._fingerprint = _fingerprint(self.config, self.state_dict())
        return self._fingerprint

    def invalidate_fingerprint(self) -> None:
        """Call after changing weights (base training)."""
        self._fingerprint = None

    def save(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors``; ``load_base(directory)`` reads them back.

        ``dtype`` stores the floating-point weights rounded to it (``torch.float16`` halves the
        file); the fingerprint in the header is then that of the rounded weights, which is what
        loading them gives.
        """
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(self.config.model_dump(mode="json"), indent=2))
        tensors = {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype)
                   .contiguous() for k, v in self.state_dict().items()}
        fp = self.fingerprint if dtype is None else _fingerprint(self.config, tensors)
        save_file(tensors, d / "model.safetensors", metadata={"fingerprint": fp})
        return d


def _fingerprint(config: BaseConfig, state: dict[str, torch.Tensor]) -> str:
    """Architecture + weights; not the sampling defaults, which change no adapter's meaning."""
    described = config.model_dump(mode="json", exclude={"sampling"})
    if not described["adapter"]["resnet_levels"]:  # bases without ResNet blocks keep their fingerprint
        del described["adapter"]["resnet_levels"]
    h = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _random_model(config: BaseConfig) -> RestorationModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        return RestorationModel(config)


def _read_config(location: str) -> BaseConfig | None:
    """config.json of a checkpoint folder (local or any fsspec URL); None if it has none."""
    import fsspec

    from .presets import BaseConfig

    fs, path = fsspec.core.url_to_fs(location.rstrip("/"))
    if not fs.exists(f"{path}/model.safetensors"):
        raise WeightsUnavailableError(f"no model.safetensors under {location}")
    if not fs.exists(f"{path}/config.json"):
        return None
    return BaseConfig.model_validate_json(fs.cat_file(f"{path}/config.json"))


def _read_weights(location: str) -> dict[str, torch.Tensor]:
    import fsspec
    from safetensors.torch import load

    fs, path = fsspec.core.url_to_fs(location.rstrip("/"))
    return load(fs.cat_file(f"{path}/model.safetensors"))


def _header_fingerprint(location: str) -> str | None:
    """The fingerprint :meth:`RestorationModel.save` writes into the safetensors header, read
    without the tensors (8 bytes of length, then the JSON header); None if absent."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(location.rstrip("/"))
    with fs.open(f"{path}/model.safetensors", "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 0 < size <= 100 * 2**20:
            return None
        try:
            header = json.loads(fh.read(size))
        except ValueError:
            return None
    fingerprint = (header.get("__metadata__") or {}).get("fingerprint")
    return fingerprint if isinstance(fingerprint, str) and fingerprint else None


def _resolve(base: str, weights: str | None, random_weights: bool) -> tuple[BaseConfig, str | None]:
    """The config of ``base`` and where its weights are (None: seeded random weights)."""
    if "/" in base or base.startswith(".") or Path(base).exists():
        config = _read_config(base)
        if config is None:
            raise WeightsUnavailableError(f"{base} has no config.json: cannot tell which preset it is")
        return config, base
    config = get_preset(base)
    if weights is not None:
        file_config = _read_config(weights)
        if file_config is not None and file_config.model_copy(update={"sampling": config.sampling}) != config:
            raise InputError(f"weights at {weights} are for preset {file_config.name!r}, not {base!r}")
        return config, weights
    if base in ("compact",) and not random_weights:
        shipped = WEIGHTS_DIR / base
        if not (shipped / "model.safetensors").exists():
            raise WeightsUnavailableError(
                f"the {base} weights are not in this checkout ({shipped}); "
                "train them with `pfstorer train-base` or use --base tiny"
            )
        return config, str(shipped)
    if base == "sd21" and not random_weights:
        raise WeightsUnavailableError(
            "sd21 needs weights: pass --weights DIR_OR_URL holding config.json + model.safetensors "
            "(SD-2.1-base UNet/VAE + StableSR SFT/encoder converted to pfstorer's layout); "
            "nothing is downloaded"
        )
    return config, None


def resolve_device(name: str | torch.device) -> str | torch.device:
    """``auto`` is ``cuda`` where a GPU is visible, else ``cpu``; anything else as given."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_base(
    base: str = "tiny",
    *,
    weights: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    random_weights: bool = False,
) -> RestorationModel:
    """Load a frozen base: a preset name (``tiny``, ``compact``, ``sd21``) or a checkpoint folder/URL.

    ``weights`` points at a checkpoint folder (local or fsspec URL) holding ``model.safetensors``
    for the preset; ``random_weights`` builds the preset's shapes with seeded random weights
    (benchmarks of ``sd21`` shapes). Nothing is ever downloaded.
    """
    config, location = _resolve(base, weights, random_weights)
    state = None if location is None else _read_weights(location)
    model = _random_model(config)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InputError(
                f"checkpoint does not match preset {config.name!r}: "
                f"{len(missing)} missing, {len(unexpected)} unexpected tensors"
            )
    model.weights_location = location
    return model.to(device=resolve_device(device), dtype=dtype).freeze()


def base_weights_location(base: str = "tiny", *, weights: str | None = None) -> str | None:
    """Where :func:`load_base` would read the weights of ``base`` from (None: seeded random
    weights), without reading them."""
    return _resolve(base, weights, False)[1]


def base_fingerprint(base: str = "tiny", *, weights: str | None = None) -> tuple[BaseConfig, str]:
    """The config and :attr:`~RestorationModel.fingerprint` of the base :func:`load_base` would
    give, from the weights' header where :meth:`~RestorationModel.save` wrote it: a driver that
    only plans never loads the weights (several GB for ``sd21``). Workers that load them check it.
    """
    config, location = _resolve(base, weights, False)
    if location is None:  # seeded random weights: small presets only
        return config, load_base(base).fingerprint
    written = _read_config(location)  # the header's fingerprint is of the config saved beside it
    if written is not None and written.model_copy(update={"sampling": config.sampling}) == config:
        if (fingerprint := _header_fingerprint(location)) is not None:
            return config, fingerprint
    return config, _fingerprint(config, _read_weights(location))


def timestep_grid(n: int, total: int) -> list[int]:
    """``n`` evenly spread timesteps in [0, total) (probe losses use them)."""
    return [int(round((i + 0.5) * total / n)) for i in range(n)] if n > 0 else []


def pad_to_multiple(x: torch.Tensor, multiple: int, min_size: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad an image batch on the bottom/right so each side is a multiple (and >= min_size)."""
    h, w = x.shape[-2:]
    th = max(math.ceil(h / multiple) * multiple, min_size)
    tw = max(math.ceil(w / multiple) * multiple, min_size)
    if (th, tw) == (h, w):
        return x, (h, w)
    ph, pw = th - h, tw - w
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)
