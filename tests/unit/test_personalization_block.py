"""The personalization block (eq. 3) on its own, and the one interface of both adapter forms."""

from __future__ import annotations

import torch

from pfstorer.model import load_base
from pfstorer.personalization import (
    AdapterSlots,
    AdapterWeights,
    BlockSpec,
    BlockTensors,
    PBRun,
    PersonalizationBlock,
    block_specs,
)


def _tensors(n: int, spec: BlockSpec, tokens: int, refs: int, alpha: torch.Tensor) -> BlockTensors:
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    c, d = spec.channels, spec.inner
    return BlockTensors(rnd(n, c, d), rnd(n, tokens, d), rnd(n, tokens, d), rnd(n, refs, d), rnd(n, refs, d),
                        rnd(n, d, c), alpha)


def test_alpha_zero_returns_the_features_exactly() -> None:
    spec = BlockSpec(channels=8, inner=16, heads=2)
    features = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    block = PersonalizationBlock(spec)
    out = block(features, _tensors(3, spec, 5, 6, torch.zeros(3, 8)))
    assert torch.equal(out, features)  # bit for bit: F + 0 * PB(F, F_ref) = F
    moved = block(features, _tensors(3, spec, 5, 6, torch.ones(3, 8)))
    assert not torch.equal(moved, features)


def test_attention_maps_for_l_pers_are_collected_per_block() -> None:
    spec = BlockSpec(channels=8, inner=16, heads=2)
    maps: list = []
    PersonalizationBlock(spec)(torch.randn(2, 8, 4, 4), _tensors(2, spec, 5, 6, torch.ones(2, 8)), maps)
    (tok, last_prompt), = maps
    assert tok.shape == last_prompt.shape == (2, 16)
    assert not last_prompt.requires_grad


def test_trained_and_cached_adapters_give_the_block_the_same_tensors() -> None:
    model = load_base("tiny")
    specs = block_specs(model)
    weights = AdapterWeights(specs, model.config.cross_attention_dim, 1)
    weights.init_slot(0, torch.Generator().manual_seed(3), model.prompt)
    with torch.no_grad():
        for a in weights.alpha:
            a.fill_(0.5)
    slots = AdapterSlots.for_model(model, 1)
    refs = [torch.randn(n, s.channels) for n, s in zip(
        (b.shape[1] for b in (slots.buffer("ref_k", i) for i in range(len(specs)))), specs)]
    slots.load(0, weights.export_slot(0, model.prompt, refs))
    row = torch.tensor([0])
    for i in range(len(specs)):
        a = weights.block_tensors(i, row, model.prompt, refs[i].unsqueeze(0))
        b = slots.block_tensors(i, row, model.prompt)
        for name, x, y in zip(BlockTensors._fields, a, b):
            assert torch.allclose(x, y), name
    # and the whole base with either form restores the same
    z, lq = torch.randn(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    t = torch.tensor([10])
    with torch.no_grad():
        pw = PBRun(weights, row, model.prompt, model.config.adapter.ref_pool,
                   ref_tokens=[r.unsqueeze(0) for r in refs])
        ps = PBRun(slots, row, model.prompt, model.config.adapter.ref_pool)
        assert torch.allclose(model.denoise(z, t, lq, pw), model.denoise(z, t, lq, ps), atol=1e-5)
