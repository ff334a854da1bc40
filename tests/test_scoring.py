"""The shared scoring core: prefix capture + tail must equal the model's own forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import FAMILIES, tiny_model
from splitsteer.render import IGNORE, Rendered, collate, pair_batch
from splitsteer.scoring import capture_prefix, pair_losses, row_nll, run_tail, steered_tail, sweep_factors
from test_updates import random_update


def rows(seed: int = 0) -> list[Rendered]:
    g = torch.Generator().manual_seed(seed)
    lengths = [(5, 3), (7, 2), (4, 5), (6, 4)]  # (prompt, answer): mixed lengths
    return [Rendered(tuple(torch.randint(3, 90, (p + a,), generator=g).tolist()), p) for p, a in lengths]


def reference_nll(model: torch.nn.Module, row: Rendered, factor: float = 0.0, update=None) -> float:
    """Mean answer NLL from the model's own full forward on the unpadded row."""
    ids = torch.tensor([row.ids])
    labels = ids.clone()
    labels[:, : row.prompt_len] = IGNORE
    with torch.no_grad():
        if update is None:
            out = model(ids).logits
        else:
            with update.apply(model, factor):
                out = model(ids).logits
    return float(F.cross_entropy(out[0, :-1], labels[0, 1:], ignore_index=IGNORE))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_tail_equals_full_forward(family: str, side: str) -> None:
    model = tiny_model(family)
    batch = collate(rows(), pad_id=0, padding_side=side)
    for start in (0, 2, 3):
        prefix = capture_prefix(model, batch, start)
        with torch.no_grad():
            nll = row_nll(model, run_tail(model, prefix), batch.labels)
        expected = torch.tensor([reference_nll(model, r) for r in rows()])
        torch.testing.assert_close(nll, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("form", ["vector", "lora", "local_weight"])
def test_steered_tail_over_factors_equals_separate_steered_forwards(family: str, form: str) -> None:
    model = tiny_model(family)
    update = random_update(model, form, layer=2)
    rendered = [(rows()[0], rows()[1]), (rows()[2], rows()[3])]
    batch = pair_batch(rendered, pad_id=0)
    prefix = capture_prefix(model, batch, update.layer)
    factors = [-3.0, 0.0, 2.0]
    with torch.no_grad():
        lp, ln = pair_losses(model, prefix, [update], sweep_factors(2, factors))
    assert lp.shape == ln.shape == (3, 2)
    for fi, f in enumerate(factors):
        for pi, (pos, neg) in enumerate(rendered):
            assert abs(float(lp[fi, pi]) - reference_nll(model, pos, f, update)) < 5e-5
            assert abs(float(ln[fi, pi]) - reference_nll(model, neg, f, update)) < 5e-5


def test_sum_reduction_and_gradients_reach_only_the_update(llama: torch.nn.Module) -> None:
    update = random_update(llama, "vector", layer=1).requires_grad_()
    batch = pair_batch([(rows()[0], rows()[1])], pad_id=0)
    prefix = capture_prefix(llama, batch, 1)
    assert not prefix.hidden.requires_grad
    lp, ln = pair_losses(llama, prefix, [update], torch.tensor([1.0, 1.0]), reduction="sum")
    mean_lp, _ = pair_losses(llama, prefix, [update], torch.tensor([1.0, 1.0]))
    assert abs(float(lp[0].detach()) - float(mean_lp[0].detach()) * rows()[0].answer_len) < 1e-4
    (lp.sum() + ln.sum()).backward()
    assert update.params["delta_b"].grad is not None and update.params["delta_b"].grad.abs().sum() > 0
    assert all(p.grad is None for p in llama.parameters())


def test_until_returns_the_site_output(llama: torch.nn.Module) -> None:
    batch = collate(rows(), pad_id=0)
    prefix = capture_prefix(llama, batch, 1)
    with torch.no_grad():
        out = run_tail(llama, prefix, until=2)
        full = llama(**batch.model_inputs(), output_hidden_states=True).hidden_states[3]
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)


def test_answer_positions_mask_leaves_prompt_untouched(llama: torch.nn.Module) -> None:
    update = random_update(llama, "vector", layer=0)
    batch = collate(rows(), pad_id=0)
    prefix = capture_prefix(llama, batch, 0)
    with torch.no_grad():
        steered = steered_tail(llama, prefix, [update], torch.full((4,), 5.0), positions="answer", until=3)
        plain = run_tail(llama, prefix, until=3)
    prompt = batch.attention_mask.bool() & ~batch.answer_mask
    assert torch.equal(steered[prompt], plain[prompt])
    assert not torch.allclose(steered[batch.answer_mask], plain[batch.answer_mask])
