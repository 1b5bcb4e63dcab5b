"""Personalization blocks (paper section 3.2, eq. 3): ``F_hat_i = F_i + alpha_i * PB(F_i, F_ref_i)``.

After every transformer block i of the frozen base sits a :class:`PersonalizationBlock`:
- text cross-attention from the block's features to the base prompt plus a learnable token ``*``
  (textual-inversion style; one token per identity, shared by all blocks),
- image cross-attention from the same queries to reference features ``F_ref_i``: the frozen base's
  own output of block i for a reference photo, computed once per identity and cached
  (:class:`ReferenceCapture`, :func:`pool_reference`),
- an output projection, gated by ``alpha_i`` (a vector over channels, initialised to 0, so a fresh
  adapter reproduces the base exactly).

Every tensor carries a leading *slot* axis: one frozen base runs many identities in one batch, each
row using its own slot (packed personalization, mixed-identity serving). One identity alone is
simply one slot.

Two forms of the same adapter, one interface (``block_tensors`` -> :class:`BlockTensors`):
- :class:`AdapterWeights` — trainable. Keys/values are projected at every call from the token and
  from each row's cached reference tokens.
- :class:`AdapterSlots` — inference. No reference photos are needed: at the end of
  personalization the frozen base is run once on up to ``cache_refs`` references (t = 0, the
  reference as its own LQ), their block features are pooled to ``ref_pool x ref_pool`` tokens and
  projected to keys/values, which the adapter stores; the text keys/values of the prompt + ``*`` are
  stored the same way. Fixed shapes for every identity make a swap an in-place copy.

Deviations, stated: reference features are computed at t = 0 (timestep-independent, hence
cacheable) and average-pooled to a fixed token count; training samples one reference per row, as
the paper does, while inference attends to the cached tokens of all cached references. Query
projections are shared between the text and image attention of a block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterError

INFERENCE_KEYS = ("alpha", "to_q", "to_out", "txt_k", "txt_v", "ref_k", "ref_v")
TRAINABLE_KEYS = ("alpha", "to_q", "to_out", "txt_k", "txt_v", "img_k", "img_v")
"""The trainable tensors of one block of one slot (with the slot's ``token``): what a reference
prior holds (:mod:`pfstorer.prior`)."""


@dataclass(frozen=True)
class BlockSpec:
    channels: int
    inner: int
    heads: int


def block_specs(model) -> list[BlockSpec]:
    """Shapes of the personalization block after each transformer block of ``model``."""
    shape = model.config.adapter
    specs = []
    for _, _, ch in model.pb_blocks:
        inner = max(shape.head_dim, int(round(ch * shape.inner_ratio / shape.head_dim)) * shape.head_dim)
        specs.append(BlockSpec(ch, inner, inner // shape.head_dim))
    return specs


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:  # [n, L, d] -> [n, h, L, d/h]
    n, L, d = x.shape
    return x.view(n, L, h, d // h).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:  # [n, h, L, dh] -> [n, L, h*dh]
    n, h, L, dh = x.shape
    return x.transpose(1, 2).reshape(n, L, h * dh)


def _norm_tokens(f: torch.Tensor) -> torch.Tensor:
    """[n, C, H, W] -> [n, HW, C], normalised per token (no learnable affine: the base is frozen)."""
    tokens = f.flatten(2).transpose(1, 2)
    return F.layer_norm(tokens, tokens.shape[-1:])


def pool_reference(f: torch.Tensor, ref_pool: int) -> torch.Tensor:
    """Reference block features [n, C, H, W] -> [n, P, C] normalised tokens (P <= ref_pool^2)."""
    side_h, side_w = min(f.shape[-2], ref_pool), min(f.shape[-1], ref_pool)
    return _norm_tokens(F.adaptive_avg_pool2d(f, (side_h, side_w)))


class BlockTensors(NamedTuple):
    """One block's adapter tensors, one row per batch row; keys/values already projected."""

    to_q: torch.Tensor  # [n, C, inner]
    txt_k: torch.Tensor  # [n, T+1, inner]: the prompt followed by the token *
    txt_v: torch.Tensor
    ref_k: torch.Tensor  # [n, P, inner]: the reference features F_ref
    ref_v: torch.Tensor
    to_out: torch.Tensor  # [n, inner, C]
    alpha: torch.Tensor  # [n, C]


class PersonalizationBlock(nn.Module):
    """``F_hat = F + alpha * PB(F, F_ref)`` (eq. 3) for the features ``F`` of one base block.

    PB attends from ``F`` to the prompt + token ``*`` (text) and to the reference features
    (image), shares the query between the two, and projects the sum back to ``C`` channels. It
    holds no weights: they come per row in :class:`BlockTensors`, so one base serves many slots.
    """

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, features: torch.Tensor, w: BlockTensors,
                maps: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        h = self.spec.heads
        qh = _heads(torch.bmm(_norm_tokens(features), w.to_q), h)  # [n, h, HW, d]
        scores = torch.matmul(qh, _heads(w.txt_k, h).transpose(-1, -2)) / math.sqrt(self.spec.inner // h)
        probs = scores.softmax(-1)  # [n, h, HW, T+1]: explicit, L_pers reads the token's map
        if maps is not None:
            # the last prompt token's map is the target, not a variable: detached, as ViCo does
            maps.append((probs[..., -1].mean(1), probs[..., -2].mean(1).detach()))
        txt = torch.matmul(probs, _heads(w.txt_v, h))
        img = F.scaled_dot_product_attention(qh, _heads(w.ref_k, h), _heads(w.ref_v, h))
        pb = torch.bmm(_merge(txt + img), w.to_out).transpose(1, 2).reshape(features.shape)
        return features + w.alpha[:, :, None, None] * pb  # eq. 3


class AdapterWeights(nn.Module):
    """Trainable personalization blocks for ``slots`` identities of one base (keys/values are
    projected from the token and the reference tokens at every call, so both learn)."""

    def __init__(self, specs: list[BlockSpec], token_dim: int, slots: int) -> None:
        super().__init__()
        self.specs = specs
        self.slots = slots
        self.token = nn.Parameter(torch.zeros(slots, token_dim))
        self.alpha = nn.ParameterList(nn.Parameter(torch.zeros(slots, s.channels)) for s in specs)
        self.to_q = nn.ParameterList(nn.Parameter(torch.zeros(slots, s.channels, s.inner)) for s in specs)
        self.to_out = nn.ParameterList(nn.Parameter(torch.zeros(slots, s.inner, s.channels)) for s in specs)
        self.txt_k = nn.ParameterList(nn.Parameter(torch.zeros(slots, token_dim, s.inner)) for s in specs)
        self.txt_v = nn.ParameterList(nn.Parameter(torch.zeros(slots, token_dim, s.inner)) for s in specs)
        self.img_k = nn.ParameterList(nn.Parameter(torch.zeros(slots, s.channels, s.inner)) for s in specs)
        self.img_v = nn.ParameterList(nn.Parameter(torch.zeros(slots, s.channels, s.inner)) for s in specs)
        self.blocks = tuple(PersonalizationBlock(s) for s in specs)  # a tuple: no state-dict entries

    @torch.no_grad()
    def init_slot(self, slot: int, generator: torch.Generator, prompt: torch.Tensor,
                  prior: dict[str, torch.Tensor] | None = None) -> None:
        """Fresh adapter in ``slot``: alpha = 0, projections Xavier-like, token near the prompt;
        or, given a reference ``prior`` (:meth:`slot_tensors` of a slot trained across many
        people), a copy of it, so the adapter uses references before its first step.

        Drawn only from ``generator`` so an identity starts the same whichever slot it lands in.
        """
        if prior is not None:
            self.load_slot(slot, prior)
            return

        def rnd(shape: tuple[int, ...], std: float) -> torch.Tensor:
            return torch.randn(shape, generator=generator) * std

        dev = self.token.device
        self.token[slot] = (prompt.detach().float().mean(0).cpu() + rnd(self.token.shape[1:], float(prompt.std()) * 0.1)).to(dev)
        for i, s in enumerate(self.specs):
            self.alpha[i][slot].zero_()
            for plist, fan_in in (
                (self.to_q, s.channels),
                (self.txt_k, self.token.shape[1]),
                (self.txt_v, self.token.shape[1]),
                (self.img_k, s.channels),
                (self.img_v, s.channels),
                (self.to_out, s.inner),
            ):
                plist[i][slot] = rnd(plist[i].shape[1:], 1 / math.sqrt(fan_in)).to(dev)

    def _named(self) -> dict[str, torch.nn.Parameter]:
        """Every trainable tensor by its slot-tensor name (``token``, ``blocks.{i}.{key}``)."""
        out = {"token": self.token}
        for i in range(len(self.specs)):
            for key in TRAINABLE_KEYS:
                out[f"blocks.{i}.{key}"] = getattr(self, key)[i]
        return out

    @torch.no_grad()
    def slot_tensors(self, slot: int) -> dict[str, torch.Tensor]:
        """CPU copies of one slot's trainable tensors, by name (see :data:`TRAINABLE_KEYS`)."""
        return {name: p[slot].detach().to("cpu", copy=True).contiguous() for name, p in self._named().items()}

    @torch.no_grad()
    def load_slot(self, slot: int, tensors: dict[str, torch.Tensor]) -> None:
        """Copy :meth:`slot_tensors` (of this or another adapter of the same base) into ``slot``."""
        named = self._named()
        if set(tensors) != set(named):
            missing, extra = sorted(set(named) - set(tensors)), sorted(set(tensors) - set(named))
            raise AdapterError(f"block tensors do not fit this base: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, p in named.items():
            if tuple(tensors[name].shape) != tuple(p.shape[1:]):
                raise AdapterError(f"block tensor {name} has shape {tuple(tensors[name].shape)}, "
                                   f"base expects {tuple(p.shape[1:])}")
            p[slot] = tensors[name].to(p.device, p.dtype)

    def text_kv(self, block: int, slots: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the prompt followed by each row's token ``*``: [n, T+1, inner]."""
        text = torch.cat([prompt.unsqueeze(0).expand(len(slots), -1, -1), self.token[slots].unsqueeze(1)], dim=1)
        text = text.to(self.to_q[block].dtype)
        return torch.bmm(text, self.txt_k[block][slots]), torch.bmm(text, self.txt_v[block][slots])

    def image_kv(self, block: int, slots: torch.Tensor, ref_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the reference tokens ``[n, P, C]``: [n, P, inner]."""
        return torch.bmm(ref_tokens, self.img_k[block][slots]), torch.bmm(ref_tokens, self.img_v[block][slots])

    def block_tensors(self, block: int, slots: torch.Tensor, prompt: torch.Tensor,
                      ref_tokens: torch.Tensor | None) -> BlockTensors:
        """Block ``block``'s tensors of each row, keys/values projected now (they are trained)."""
        if ref_tokens is None:
            raise ValueError("trainable adapters need each row's reference tokens")
        tk, tv = self.text_kv(block, slots, prompt)
        rk, rv = self.image_kv(block, slots, ref_tokens.to(self.to_q[block].dtype))
        return BlockTensors(self.to_q[block][slots], tk, tv, rk, rv, self.to_out[block][slots], self.alpha[block][slots])

    @torch.no_grad()
    def export_slot(self, slot: int, prompt: torch.Tensor, ref_tokens: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inference tensors of one identity; ``ref_tokens[i]``: [M, C] cached reference tokens of block i."""
        idx = torch.tensor([slot], device=self.token.device)
        out: dict[str, torch.Tensor] = {"token": self.token[slot].detach().clone()}
        for i in range(len(self.specs)):
            tk, tv = self.text_kv(i, idx, prompt)
            rk, rv = self.image_kv(i, idx, ref_tokens[i].unsqueeze(0).to(self.to_q[i].dtype))
            out[f"blocks.{i}.alpha"] = self.alpha[i][slot].detach().clone()
            out[f"blocks.{i}.to_q"] = self.to_q[i][slot].detach().clone()
            out[f"blocks.{i}.to_out"] = self.to_out[i][slot].detach().clone()
            out[f"blocks.{i}.txt_k"], out[f"blocks.{i}.txt_v"] = tk[0].clone(), tv[0].clone()
            out[f"blocks.{i}.ref_k"], out[f"blocks.{i}.ref_v"] = rk[0].clone(), rv[0].clone()
        return {k: v.to("cpu").contiguous() for k, v in out.items()}


class AdapterSlots(nn.Module):
    """Inference adapters in fixed buffers: ``slots`` identities, same shapes for all of them."""

    def __init__(self, specs: list[BlockSpec], token_dim: int, prompt_tokens: int, ref_tokens: list[int], slots: int) -> None:
        super().__init__()
        self.specs = specs
        self.slots = slots
        self.register_buffer("token", torch.zeros(slots, token_dim))
        for i, s in enumerate(specs):
            self.register_buffer(f"alpha_{i}", torch.zeros(slots, s.channels))
            self.register_buffer(f"to_q_{i}", torch.zeros(slots, s.channels, s.inner))
            self.register_buffer(f"to_out_{i}", torch.zeros(slots, s.inner, s.channels))
            self.register_buffer(f"txt_k_{i}", torch.zeros(slots, prompt_tokens + 1, s.inner))
            self.register_buffer(f"txt_v_{i}", torch.zeros(slots, prompt_tokens + 1, s.inner))
            self.register_buffer(f"ref_k_{i}", torch.zeros(slots, ref_tokens[i], s.inner))
            self.register_buffer(f"ref_v_{i}", torch.zeros(slots, ref_tokens[i], s.inner))
        self.blocks = tuple(PersonalizationBlock(s) for s in specs)  # a tuple: no state-dict entries

    @classmethod
    def for_model(cls, model, slots: int = 1) -> AdapterSlots:
        shape = model.config.adapter
        specs = block_specs(model)
        sides = _block_sides(model)
        ref_tokens = [shape.cache_refs * min(side, shape.ref_pool) ** 2 for side in sides]
        return cls(specs, model.config.cross_attention_dim, model.config.prompt_tokens, ref_tokens, slots).to(
            model.device, model.dtype
        )

    def buffer(self, name: str, block: int) -> torch.Tensor:
        return getattr(self, f"{name}_{block}")

    def block_tensors(self, block: int, slots: torch.Tensor, prompt: torch.Tensor,
                      ref_tokens: torch.Tensor | None = None) -> BlockTensors:
        """Block ``block``'s tensors of each row, read from the cache (``prompt`` and
        ``ref_tokens`` were projected when the adapter was exported)."""
        return BlockTensors(*(self.buffer(name, block)[slots] for name in BlockTensors._fields))

    @torch.no_grad()
    def load(self, slot: int, tensors: dict[str, torch.Tensor]) -> None:
        """Copy one identity's tensors into ``slot`` in place (no new tensors, no recompilation)."""
        if tensors["token"].shape != self.token.shape[1:]:
            raise AdapterError(f"adapter token has shape {tuple(tensors['token'].shape)}, base expects {tuple(self.token.shape[1:])}")
        self.token[slot].copy_(tensors["token"])
        for i in range(len(self.specs)):
            for name in INFERENCE_KEYS:
                dst, src = self.buffer(name, i)[slot], tensors.get(f"blocks.{i}.{name}")
                if src is None or src.shape != dst.shape:
                    got = None if src is None else tuple(src.shape)
                    raise AdapterError(f"adapter tensor blocks.{i}.{name} has shape {got}, base expects {tuple(dst.shape)}")
                dst.copy_(src)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        """Wipe ``slot``: every tensor zeroed, so it is the identity map (alpha = 0) and nothing
        derived from a person's photos (cached reference keys/values) stays in memory."""
        self.token[slot].zero_()
        for i in range(len(self.specs)):
            for name in INFERENCE_KEYS:
                self.buffer(name, i)[slot].zero_()


def _block_sides(model) -> list[int]:
    """Spatial side (in latent pixels) of each transformer block at the native tile size."""
    side = model.config.sample_size // model.config.unet_stride
    return [side // 2**level for _, level, _ in model.pb_blocks]


class BlockHook(Protocol):
    """What the base's transformer-block hooks call with each block's output (see
    :meth:`~pfstorer.model.RestorationModel.denoise`)."""

    def apply(self, block: int, sample: torch.Tensor) -> torch.Tensor: ...


@dataclass
class ReferenceCapture:
    """Keeps each block's output unchanged: the frozen base's features ``F_ref_i`` of a reference."""

    features: dict[int, torch.Tensor] = field(default_factory=dict)

    def apply(self, block: int, sample: torch.Tensor) -> torch.Tensor:
        self.features[block] = sample.detach()
        return sample


@dataclass
class PBRun:
    """The personalization blocks of one UNet call: eq. 3 after every transformer block.

    Row r of the batch is personalized with adapter ``slots[r]``. ``ref_tokens[i]`` holds each
    row's reference tokens at block i for trainable adapters (``[n, P, C]``, see
    :func:`pool_reference`); cached adapters ignore it. With ``maps`` a list, the token's and the
    last prompt token's attention maps are collected for L_pers (eq. 5). ``strength`` (per row)
    scales alpha at inference: 0 is the base exactly, 1 the adapter as trained.
    """

    adapters: AdapterWeights | AdapterSlots
    slots: torch.Tensor
    prompt: torch.Tensor
    ref_pool: int
    ref_tokens: list[torch.Tensor] | None = None
    maps: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    strength: torch.Tensor | None = None

    def rows(self, index: list[int]) -> PBRun:
        """The same run for a batch made of rows ``index`` of this one (tiles of several images)."""
        return replace(self, slots=self.slots[index],
                       strength=None if self.strength is None else self.strength[index],
                       ref_tokens=None if self.ref_tokens is None else [r[index] for r in self.ref_tokens])

    def apply(self, block: int, sample: torch.Tensor) -> torch.Tensor:
        ref = None if self.ref_tokens is None else self.ref_tokens[block]
        tensors = self.adapters.block_tensors(block, self.slots, self.prompt, ref)
        if self.strength is not None:
            tensors = tensors._replace(alpha=tensors.alpha * self.strength[:, None].to(tensors.alpha.dtype))
        return self.adapters.blocks[block](sample, tensors, self.maps)
