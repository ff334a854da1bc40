"""Each objective against a hand computation on a tiny batch."""

from __future__ import annotations

import math

import torch

from splitsteer.objectives import SplitWeights, diffmean, reps_loss, sft_loss, split_loss

LP = torch.tensor([1.0, 2.0])
LN = torch.tensor([1.2, 1.5])


def test_split_loss_by_hand() -> None:
    w = SplitWeights(lp=1.0, ln=0.5, gamma=5.0, theta=0.4)
    loss, terms = split_loss(LP, LN, w)
    # pair 1: 1 + 0.6 + 5*relu(0.4-0.2)=1 -> 2.6 ; pair 2: 2 + 0.75 + 5*relu(0.4+0.5)=4.5 -> 7.25
    assert math.isclose(float(loss), (2.6 + 7.25) / 2, rel_tol=1e-6)
    assert math.isclose(float(terms["hinge"]), (0.2 + 0.9) / 2, rel_tol=1e-6)
    assert math.isclose(float(terms["margin"]), (0.2 - 0.5) / 2, rel_tol=1e-6)


def test_split_margin_satisfied_has_no_hinge() -> None:
    loss, terms = split_loss(torch.tensor([1.0]), torch.tensor([3.0]), SplitWeights())
    assert float(terms["hinge"]) == 0.0
    assert math.isclose(float(loss), 1.0 + 0.5 * 3.0, rel_tol=1e-6)


def test_sft_loss_by_hand() -> None:
    loss, _ = sft_loss(LP)
    assert math.isclose(float(loss), 1.5)
    loss, terms = sft_loss(LP, LN)
    assert math.isclose(float(loss), 1.5 + 1.35, rel_tol=1e-6)
    assert "ln_neg_factor" in terms


def test_reps_loss_by_hand() -> None:
    ref_lp, ref_ln = torch.tensor([3.0]), torch.tensor([1.0])
    lp_plus, ln_plus, lp_minus, ln_minus = (torch.tensor([v]) for v in (2.0, 1.5, 3.5, 0.8))
    loss, _ = reps_loss(lp_plus, ln_plus, lp_minus, ln_minus, ref_lp, ref_ln)
    # β+ = max(-1 - (-3), 1) = 2 ; Δ+ = 2*(-2) - (-1.5) = -2.5
    # β- = max(-3 - (-1), 1) = 1 ; Δ- = 1*(-0.8) - (-3.5) = 2.7
    softplus = lambda x: math.log1p(math.exp(-x))
    assert math.isclose(float(loss), softplus(-2.5) + softplus(2.7), rel_tol=1e-6)


def test_diffmean_by_hand() -> None:
    pos = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    neg = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    assert torch.equal(diffmean(pos, neg), torch.tensor([1.5, 0.0]))
