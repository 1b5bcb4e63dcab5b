"""The base model's training objective, by hand on tiny tensors."""

from __future__ import annotations

import pytest
import torch

from pfstorer.base_objective import (
    adversarial_weight,
    denoising_loss,
    detail_loss,
    detail_rows,
    noised_batch,
    structure_loss,
    x0_estimate,
)
from pfstorer.model import load_base
from pfstorer.sampling import alphas_cumprod, diffuse


def test_denoising_loss_distance_and_truncated_snr_weighting() -> None:
    pred = torch.tensor([[1.0, -1.0], [2.0, 0.0]])
    target = torch.zeros(2, 2)
    a = torch.tensor([0.8, 0.2]).view(-1, 1, 1, 1)  # 1/SNR = 0.25 (-> 1) and 4
    loss, per_row = denoising_loss(pred, target, a, "mse", "eps")
    assert per_row.tolist() == [1.0, 2.0] and loss.item() == pytest.approx(1.5)
    loss, per_row = denoising_loss(pred, target, a, "l1", "eps")
    assert per_row.tolist() == [1.0, 1.0] and loss.item() == pytest.approx(1.0)
    loss, per_row = denoising_loss(pred, target, a, "mse", "trunc-snr")
    assert per_row.tolist() == [1.0, 2.0]  # the logged curve stays unweighted
    assert loss.item() == pytest.approx((1.0 * 1 + 2.0 * 4) / 2)


def test_adversarial_weight_starts_then_ramps() -> None:
    assert adversarial_weight(4, 0.1, start=5, ramp=0) == 0.0
    assert adversarial_weight(5, 0.1, start=5, ramp=0) == pytest.approx(0.1)
    assert [adversarial_weight(s, 1.0, start=2, ramp=4) for s in (1, 2, 3, 5, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]


def test_noised_batch_is_diffuse_and_x0_estimate_inverts_it() -> None:
    model = load_base("tiny")  # an epsilon preset: sampling starts from noise, no LQ-start rows
    ac = alphas_cumprod(model)
    z0, lq = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    x = noised_batch(model, z0, lq, torch.Generator().manual_seed(0), 0.0, ac)
    assert not x.start.any()
    assert torch.equal(x.z_t, diffuse(model, z0, x.noise, x.t))
    assert torch.equal(x.a.view(-1), ac[x.t])
    assert torch.allclose(x0_estimate(model, x.z_t, x.noise, x.a), z0, atol=1e-4)


def test_detail_loss_asks_for_the_truths_amount_of_detail_not_its_placement() -> None:
    g = torch.Generator().manual_seed(0)
    texture = torch.rand(2, 3, 32, 32, generator=g) * 0.4 - 0.2
    blur = torch.nn.functional.avg_pool2d(texture, 5, 1, 2, count_include_pad=False)
    shifted = texture.roll(1, dims=-1)  # the same texture, a pixel off: L1 calls it as wrong as a blur
    assert detail_loss(texture, texture).item() == 0.0
    assert (shifted - texture).abs().mean() > (blur - texture).abs().mean()
    assert detail_loss(shifted, texture).item() < 0.1 * detail_loss(blur, texture).item()
    assert detail_loss(2 * texture, texture).item() > detail_loss(blur, texture).item() / 2  # too much costs too
    flat = torch.zeros_like(texture)
    both = torch.cat([flat[..., :16], texture[..., 16:]], -1)  # detail only where the truth has it
    assert detail_loss(both, both).item() == 0.0 and detail_loss(texture, both).item() > 0
    blur.requires_grad_(True)
    detail_loss(blur, texture).backward()
    assert torch.isfinite(blur.grad).all() and blur.grad.abs().sum() > 0


def test_structure_loss_sees_shapes_and_shading_not_texture() -> None:
    g = torch.Generator().manual_seed(0)
    face = torch.rand(2, 3, 32, 32, generator=g)
    checker = (torch.arange(32).view(-1, 1) + torch.arange(32)).remainder(2).float() * 0.2 - 0.1
    assert structure_loss(face + checker, face).item() == pytest.approx(0.0, abs=1e-6)  # texture in 4x4 blocks
    assert (face + checker - face).abs().mean().item() == pytest.approx(0.1)  # which L1 charges in full
    assert structure_loss(face + 0.1, face).item() == pytest.approx(0.1, abs=1e-6)  # shading is charged
    moved = face.roll(4, dims=-1)  # shapes moved by a block
    assert structure_loss(moved, face).item() > 0.05
    odd = torch.rand(1, 3, 30, 30, generator=g)  # sides not a multiple of the block: the edge counts too
    assert structure_loss(odd.clone().index_fill_(-1, torch.tensor([29]), 0.0), odd).item() > 0


def test_detail_rows_are_sampling_starts_of_the_kinds_asked_for() -> None:
    start = torch.tensor([True, True, True, True, False])
    kinds = ("clean", "light", "heavy", "x4", "heavy")
    got = detail_rows(start, kinds, ("heavy", "x4"))
    assert got.tolist() == [False, False, True, True, False]  # not a row that is no sampling start
    assert detail_rows(start, kinds, ("clean", "light", "heavy", "x4")).tolist() == start.tolist()
    assert detail_rows(start, kinds, None).tolist() == start.tolist()  # None: every kind
