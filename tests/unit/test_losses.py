"""The personalization objective (eqs. 2, 4, 5) against values computed by hand on tiny tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pfstorer.losses import LossTerms, diffusion_loss, generative_loss, pers_loss


def test_diffusion_and_generative_losses_are_the_distance_to_the_target() -> None:
    pred, target = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    # errors 1, 0, 2, 1: MSE (1 + 0 + 4 + 1) / 4, L1 (1 + 0 + 2 + 1) / 4
    assert diffusion_loss(F.mse_loss, pred, target).item() == pytest.approx(1.5)
    assert diffusion_loss(F.l1_loss, pred, target).item() == pytest.approx(1.0)
    assert generative_loss(F.mse_loss, pred, target).item() == pytest.approx(1.5)


def test_pers_loss_compares_max_normalised_maps_per_row() -> None:
    # one block, two rows, two positions; the token's map vs the last prompt token's map
    tok = torch.tensor([[0.2, 0.4], [0.5, 0.5]])
    ref = torch.tensor([[0.3, 0.3], [0.1, 0.4]])
    # row 0: [0.5, 1] vs [1, 1] -> (0.25 + 0) / 2; row 1: [1, 1] vs [0.25, 1] -> (0.5625 + 0) / 2
    got = pers_loss([(tok, ref)])
    assert torch.allclose(got, torch.tensor([0.125, 0.28125]))
    # averaged over blocks: a second block with identical maps halves it
    assert torch.allclose(pers_loss([(tok, ref), (ref, ref)]), torch.tensor([0.0625, 0.140625]))


def test_total_is_eq_5_with_every_term_and_weight() -> None:
    terms = LossTerms(diff=torch.tensor(2.0), gen=torch.tensor(3.0), pers=torch.tensor(5.0))
    assert terms.total(0.1, 0.01).item() == pytest.approx(2.0 + 0.1 * 3.0 + 0.01 * 5.0)
    # each term counts, with its own weight
    assert terms.total(0.0, 0.0).item() == pytest.approx(2.0)
    assert terms.total(1.0, 0.0).item() == pytest.approx(5.0)
    assert terms.total(0.0, 1.0).item() == pytest.approx(7.0)
    # a term that is off is neither added nor recorded
    only_diff = LossTerms(diff=torch.tensor(2.0))
    assert only_diff.total(0.1, 0.01).item() == pytest.approx(2.0)
    assert only_diff.as_floats() == {"diff": 2.0}
    assert terms.as_floats() == {"diff": 2.0, "gen": 3.0, "pers": 5.0}


def test_total_carries_gradients_to_every_term() -> None:
    diff, gen, pers = (torch.tensor(v, requires_grad=True) for v in (1.0, 1.0, 1.0))
    LossTerms(diff, gen, pers).total(0.1, 5e-4).backward()
    assert (diff.grad.item(), gen.grad.item(), pers.grad.item()) == pytest.approx((1.0, 0.1, 5e-4))
