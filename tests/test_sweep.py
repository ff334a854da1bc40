"""Sweeps: the --factors parser, exactness at factor 0, the output contract, real behaviour."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from splitsteer.data import Pair
from splitsteer.errors import InputError
from splitsteer.render import IGNORE, render
from splitsteer.sweep import parse_factors, sweep, sweep_losses
from splitsteer.updates import SteeringUpdate
from tiny import tiny_llama, tiny_tokenizer

PAIRS = [Pair(f"Would you run project {i}{'!' * i}?", f"Yes, I take {i}.", f"No thanks {'really ' * (i % 3)}.")
         for i in range(7)]


def test_factor_parser() -> None:
    assert parse_factors("-4,-2,2,4") == [-4.0, -2.0, 0.0, 2.0, 4.0]
    assert parse_factors("-20:20:5") == [-20.0, -10.0, 0.0, 10.0, 20.0]
    assert parse_factors("1:3:3") == [0.0, 1.0, 2.0, 3.0]
    assert parse_factors("2,2,1", include_zero=False) == [1.0, 2.0]
    for bad in ("", "a,b", "1:2", "1:2:0", "inf", "nan,1", "1:2:3:4"):
        with pytest.raises(InputError, match="--factors"):
            parse_factors(bad)


def unsteered_nll(model: torch.nn.Module, tok, prompt: str, answer: str) -> float:
    row = render(tok, prompt, answer)
    ids = torch.tensor([row.ids])
    labels = ids.clone()
    labels[:, : row.prompt_len] = IGNORE
    with torch.no_grad():
        logits = model(ids).logits
    return float(F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE))


def test_factor_zero_gives_the_unsteered_losses_in_input_order() -> None:
    model, tok = tiny_llama(), tiny_tokenizer()
    update = SteeringUpdate.zeros(model, "vector", 1)
    update.params["delta_b"] = torch.randn(32)
    lp, ln = sweep_losses(model, tok, [update], PAIRS, [0.0], batch_size=3)
    expected_lp = [unsteered_nll(model, tok, p.prompt, p.positive) for p in PAIRS]
    expected_ln = [unsteered_nll(model, tok, p.prompt, p.negative) for p in PAIRS]
    np.testing.assert_allclose(lp[0], expected_lp, atol=1e-5)
    np.testing.assert_allclose(ln[0], expected_ln, atol=1e-5)


def test_sweep_payload_contract() -> None:
    model, tok = tiny_llama(), tiny_tokenizer()
    update = SteeringUpdate.zeros(model, "lora", 0)
    update.params["lora_b"] = torch.randn_like(update.params["lora_b"]) * 0.1
    result = sweep(model, tok, update, PAIRS, "-3:3:4", batch_size=4, max_rows=10)
    assert result["factors"] == [-3.0, -1.0, 0.0, 1.0, 3.0]
    for key in ("factors", "pref_odds", "util_odds", "lp", "ln", "per_pair", "n_pairs", "n_util_undefined"):
        assert key in result
    assert result["n_pairs"] == 7 and len(result["per_pair"]["lp"]) == 5 and len(result["per_pair"]["lp"][0]) == 7
    json.dumps(result, allow_nan=False)
    summed = sweep(model, tok, update, PAIRS, [0.0], reduction="sum")
    assert summed["lp"][0] > result["lp"][2]  # summed NLL exceeds the per-token mean


@pytest.mark.slow
def test_trained_vector_preference_and_utility_on_the_embedded_model(smol, trained_vector, held_out) -> None:
    """PrefOdds rises with m around 0; UtilOdds at both ends of ±20 is below its value at 0."""
    model, tok = smol
    result = sweep(model, tok, trained_vector, held_out, [-20.0, -2.0, 0.0, 2.0, 20.0])
    pref, util = result["pref_odds"], result["util_odds"]
    assert pref[1] < pref[2] < pref[3], pref
    assert util[0] < util[2] and util[4] < util[2], util
