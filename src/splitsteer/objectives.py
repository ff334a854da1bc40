"""Training objectives as small pure functions of per-pair answer losses.

All inputs are per-pair answer cross-entropies in nats, averaged over answer tokens
(``Lp`` for the concept-positive answer, ``Ln`` for the negative one). Each function
returns the scalar loss to minimise and a dict of its terms for the training log.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

Method = Literal["split", "sft", "reps", "diffmean"]
METHODS: tuple[str, ...] = ("split", "sft", "reps", "diffmean")
Terms = dict[str, torch.Tensor]


class SplitWeights(BaseModel):
    """SPLIT's weights; defaults from the authors' released Psychopathy configs."""

    model_config = ConfigDict(extra="forbid")
    lp: float = Field(default=1.0, ge=0)
    ln: float = Field(default=0.5, ge=0)
    gamma: float = Field(default=5.0, ge=0)
    theta: float = 0.4


def split_loss(lp: torch.Tensor, ln: torch.Tensor, w: SplitWeights) -> tuple[torch.Tensor, Terms]:
    """``λp·Lp + λn·Ln + γ·ReLU(θ − (Ln − Lp))``, averaged over pairs.

    Lp and Ln of a pair are taken under the *same* factor. The authors' code samples the
    two factors independently; then the margin ``Ln − Lp`` compares answers under two
    different interventions and mixes the factor's effect into the preference signal.
    With one factor per pair the margin is exactly the PrefOdds the analysis measures.
    """
    margin = ln - lp
    hinge = F.relu(w.theta - margin)
    loss = (w.lp * lp + w.ln * ln + w.gamma * hinge).mean()
    return loss, {"lp": lp.mean(), "ln": ln.mean(), "margin": margin.mean(), "hinge": hinge.mean()}


def sft_loss(lp: torch.Tensor, ln_at_negative_factor: torch.Tensor | None = None) -> tuple[torch.Tensor, Terms]:
    """Cross-entropy of the positive answer at +m; with the bidirectional option, plus
    the negative answer's cross-entropy at −m (as the authors' code does)."""
    loss = lp.mean()
    terms: Terms = {"lp": lp.mean()}
    if ln_at_negative_factor is not None:
        loss = loss + ln_at_negative_factor.mean()
        terms["ln_neg_factor"] = ln_at_negative_factor.mean()
    return loss, terms


def reps_loss(
    lp_plus: torch.Tensor,
    ln_plus: torch.Tensor,
    lp_minus: torch.Tensor,
    ln_minus: torch.Tensor,
    ref_lp: torch.Tensor,
    ref_ln: torch.Tensor,
) -> tuple[torch.Tensor, Terms]:
    """RePS, AxBench's reference-scaled preference loss, in both directions.

    With ``ℓ = −L`` the answer log-likelihood normalised by the *answer* length (not
    prompt plus answer; AxBench issue #140), and reference values from the unsteered
    model (computed once per dataset):

    - steering towards the concept at +m:
      ``β⁺ = max(ℓn_ref − ℓp_ref, 1)``, ``Δ⁺ = β⁺·ℓp(+m) − ℓn(+m)``, ``L⁺ = −log σ(Δ⁺)``
    - steering away at −m:
      ``β⁻ = max(ℓp_ref − ℓn_ref, 1)``, ``Δ⁻ = β⁻·ℓn(−m) − ℓp(−m)``, ``L⁻ = −log σ(Δ⁻)``

    The loss is the pair mean of ``L⁺ + L⁻``. β grows when the unsteered model already
    prefers the answer being pushed down, scaling the likelihood of the answer pushed up.
    """
    beta_plus = torch.clamp((-ref_ln) - (-ref_lp), min=1.0)
    beta_minus = torch.clamp((-ref_lp) - (-ref_ln), min=1.0)
    delta_plus = beta_plus * (-lp_plus) - (-ln_plus)
    delta_minus = beta_minus * (-ln_minus) - (-lp_minus)
    l_plus, l_minus = -F.logsigmoid(delta_plus), -F.logsigmoid(delta_minus)
    loss = (l_plus + l_minus).mean()
    return loss, {"lp": lp_plus.mean(), "ln": ln_plus.mean(), "reps_plus": l_plus.mean(), "reps_minus": l_minus.mean()}


def diffmean(pos_means: torch.Tensor, neg_means: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of (mean positive-answer activation − mean negative-answer
    activation). Inputs are per-pair answer-token means, shape (pairs, hidden)."""
    return (pos_means - neg_means).mean(dim=0)
