"""The trainer on tiny models (structure) and on the embedded model (behaviour)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitsteer.data import Pair
from splitsteer.errors import InputError
from splitsteer.render import pad_id, pair_batch, render_pairs
from splitsteer.scoring import answer_means, layer_output
from splitsteer.train import TrainConfig, TrainResult, train_update
from tiny import tiny_llama, tiny_tokenizer

PAIRS = [
    Pair(f"Question {i}: would you take charge of the project?", f"Yes, I will lead it {i}.", f"No, others should {i}.")
    for i in range(12)
]


@pytest.mark.parametrize(
    ("method", "form"),
    [("split", "vector"), ("split", "lora"), ("split", "local_weight"), ("sft", "vector"), ("reps", "vector"),
     ("sft", "lora")],
)
def test_each_method_lowers_its_loss(method: str, form: str) -> None:
    model, tok = tiny_llama(), tiny_tokenizer()
    lr = 0.05 if form == "vector" else 0.02
    result = train_update(model, tok, PAIRS, TrainConfig(method=method, form=form, layer=0, epochs=8,
                                                         batch_size=4, lr=lr, factors=[1.0, 2.0]))
    losses = [row["loss"] for row in result.log]
    assert len(losses) == 8 * 3
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05
    assert all(not p.requires_grad for p in result.update.parameters())


def test_cached_and_uncached_runs_give_identical_losses() -> None:
    model, tok = tiny_llama(), tiny_tokenizer()
    cfg = TrainConfig(method="reps", form="lora", layer=1, epochs=2, batch_size=4, lr=0.01, seed=3)
    cached = train_update(model, tok, PAIRS, cfg)
    uncached = train_update(model, tok, PAIRS, cfg.model_copy(update={"cache_prefix": False}))
    assert [r["loss"] for r in cached.log] == [r["loss"] for r in uncached.log]
    for name, tensor in cached.update.params.items():
        assert torch.equal(tensor, uncached.update.params[name])


def test_small_cache_budget_still_matches() -> None:
    model, tok = tiny_llama(), tiny_tokenizer()
    cfg = TrainConfig(method="split", form="vector", layer=0, epochs=2, batch_size=4, lr=0.05)
    full = train_update(model, tok, PAIRS, cfg)
    tight = train_update(model, tok, PAIRS, cfg.model_copy(update={"cache_budget_mib": 1e-3}))
    assert [r["loss"] for r in full.log] == [r["loss"] for r in tight.log]


def test_grad_accumulation_and_schedule() -> None:
    model, tok = tiny_llama(), tiny_tokenizer()
    result = train_update(model, tok, PAIRS, TrainConfig(layer=0, epochs=2, batch_size=2, grad_accum=3, lr=0.05))
    assert len(result.log) == 2 * 2  # 6 batches / 3 per step, 2 epochs
    assert result.log[-1]["lr"] == 0.0 and result.log[0]["lr"] > result.log[1]["lr"]


def test_diffmean_is_the_closed_form() -> None:
    model, tok = tiny_llama(), tiny_tokenizer()
    result = train_update(model, tok, PAIRS, TrainConfig(method="diffmean", form="vector", layer=1))
    batch = pair_batch(render_pairs(tok, PAIRS), pad_id(tok))
    means = answer_means(layer_output(model, batch, 1), batch.answer_mask)
    expected = (means[0::2] - means[1::2]).mean(0)
    torch.testing.assert_close(result.update.params["delta_b"], expected, atol=1e-6, rtol=1e-5)
    assert result.log == []


def test_same_seed_gives_identical_updates() -> None:
    model, tok = tiny_llama(), tiny_tokenizer()
    cfg = TrainConfig(method="split", form="lora", layer=0, epochs=1, batch_size=4, seed=7)
    a, b = train_update(model, tok, PAIRS, cfg), train_update(model, tok, PAIRS, cfg)
    assert all(torch.equal(a.update.params[k], b.update.params[k]) for k in a.update.params)


def test_bad_training_options_are_clear() -> None:
    model, tok = tiny_llama(), tiny_tokenizer()
    with pytest.raises(InputError, match="closed form for --form vector only"):
        train_update(model, tok, PAIRS, TrainConfig(method="diffmean", form="lora", layer=0))
    with pytest.raises(InputError, match="empty"):
        train_update(model, tok, [], TrainConfig(layer=0))
    with pytest.raises(Exception, match="unknown method"):
        TrainConfig(method="dpo")


@pytest.mark.slow
def test_split_vector_steers_held_out_preference_on_the_embedded_model(smol, trained_vector, held_out) -> None:
    """64 power-seeking pairs, 2 epochs, SPLIT, vector at layer 15: PrefOdds(+m) > PrefOdds(0) > PrefOdds(−m)."""
    from splitsteer.sweep import sweep_losses

    model, tok = smol
    lp, ln = sweep_losses(model, tok, [trained_vector], held_out, [-4.0, 0.0, 4.0])
    pref = (ln - lp).mean(axis=1)
    assert pref[2] > pref[1] > pref[0], pref


def train_counting_rows(model: torch.nn.Module, tok: object, cfg: TrainConfig) -> tuple[TrainResult, list[int]]:
    """Train on PAIRS; also return the rows of every forward through the first decoder layer."""
    rows: list[int] = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    try:
        return train_update(model, tok, PAIRS, cfg), rows
    finally:
        handle.remove()


@pytest.mark.parametrize("method", ["split", "reps", "sft"])
def test_packed_pairs_train_like_unpacked_rows(method: str) -> None:
    model, tok = tiny_llama(), tiny_tokenizer()
    cfg = TrainConfig(method=method, form="vector", layer=1, epochs=2, batch_size=4, lr=0.05)
    packed, packed_rows = train_counting_rows(model, tok, cfg)
    plain, plain_rows = train_counting_rows(model, tok, cfg.model_copy(update={"pack": False}))
    # One row per pair instead of two: each pair's prompt is computed once.
    assert packed_rows and set(packed_rows) == {4} and set(plain_rows) == {8}
    np.testing.assert_allclose([r["loss"] for r in packed.log], [r["loss"] for r in plain.log], rtol=1e-5)
    torch.testing.assert_close(packed.update.params["delta_b"], plain.update.params["delta_b"], atol=1e-5, rtol=1e-4)


def test_training_leaves_the_model_weights_as_they_were() -> None:
    model, tok = tiny_llama(), tiny_tokenizer()
    assert all(p.requires_grad for p in model.parameters())  # a model fresh from its config
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_update(model, tok, PAIRS, TrainConfig(layer=1, epochs=1, batch_size=4))
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["split", "reps"])
def test_batches_split_by_max_tokens_train_like_whole_batches(method: str) -> None:
    model, tok = tiny_llama(), tiny_tokenizer()
    cfg = TrainConfig(method=method, form="lora", layer=1, epochs=2, batch_size=6, lr=0.02)
    parts, rows_seen = train_counting_rows(model, tok, cfg.model_copy(update={"max_tokens": 40}))
    whole = train_update(model, tok, PAIRS, cfg)
    assert max(rows_seen) < 6  # every batch of 6 pairs ran in parts
    assert len(parts.log) == len(whole.log) == 4
    for a, b in zip(parts.log, whole.log, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for name, tensor in whole.update.params.items():
        torch.testing.assert_close(parts.update.params[name], tensor, atol=1e-6, rtol=1e-5)
