"""Evaluating steering updates: A/B accuracy, steered generations and factor selection.

* **A/B accuracy**: teacher-forced log-probabilities of each answer option after the prompt, under
  the updates at a factor. A plain pair is correct when the positive answer is more likely than the
  negative one; a multiple-choice item (``Pair.choices``) when the positive answer is the most
  likely of all options. ``mean_pref_odds`` is the mean of ``logp(pos) − logp(neg)`` (``Ln − Lp``
  in losses), the PrefOdds of the analysis.
* **Generations**: steered continuations of a prompt set, written as JSONL, and judge-free
  metrics (n-gram entropy, perplexity under the unsteered model).
* **Factor selection** following AxBench: the item indices are split in two with a seeded
  permutation, the factor is chosen on one half and reported on the other, so the reported score
  is not inflated by the choice.

A/B scoring reuses the shared core of :mod:`splitsteer.scoring`: one unsteered capture of the
layers below the first steered one per batch, then every factor in as few tail forwards as memory
allows (per-row factors), so a baseline or a factor sweep costs little more than one forward.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from . import atomic
from .data import Pair
from .errors import InputError
from .generation import generate
from .judges import fluency_entropy, perplexity
from .render import TruncationPolicy, answers_batch, context_length, pad_id, render
from .scoring import Reduction, can_pack, capture_prefix, chunks, row_factors, row_nll, steered_tail
from .updates import SteeringUpdate

__all__ = [
    "ab_accuracy",
    "ab_eval",
    "ab_factor_selection",
    "generate_eval",
    "generation_metrics",
    "item_options",
    "judge_factor_selection",
    "option_logprobs",
    "select_factor",
    "split_indices",
    "write_jsonl",
]

REDUCTIONS: tuple[str, ...] = ("sum", "mean")
#: Rows (options × factors) per tail forward when sweeping factors; bounds activation memory.
MAX_ROWS = 128


# ---------------------------------------------------------------------------------------------
# A/B accuracy
# ---------------------------------------------------------------------------------------------


def item_options(pair: Pair) -> tuple[tuple[str, ...], int, int]:
    """The answers to score for ``pair`` and the indices of its positive and negative answer.

    A plain pair has two options (positive, negative); a multiple-choice item has all its
    ``choices``, which must include both answers, otherwise "most likely option" is undefined.
    """
    if not pair.choices:
        return (pair.positive, pair.negative), 0, 1
    options = tuple(pair.choices)
    if pair.positive not in options or pair.negative not in options:
        raise InputError(f"multiple-choice item {pair.prompt[:40]!r}: its answers are not among its choices")
    return options, options.index(pair.positive), options.index(pair.negative)


def _check_reduction(reduction: str) -> Reduction:
    if reduction not in REDUCTIONS:
        raise InputError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


def _check_factors(factors: Iterable[float]) -> list[float]:
    values = [float(f) for f in factors]
    if not values:
        raise InputError("no steering factors given")
    if any(not math.isfinite(f) for f in values):
        raise InputError(f"steering factors must be finite, got {values}")
    return values


def option_logprobs(
    model: nn.Module,
    tokenizer: Any,
    updates: Sequence[SteeringUpdate],
    items: Sequence[Pair],
    factors: Sequence[float],
    *,
    batch_size: int = 8,
    reduction: Reduction = "sum",
    max_rows: int = MAX_ROWS,
    truncation: TruncationPolicy = "error",
    pack: bool = True,
) -> list[np.ndarray]:
    """Per item, the log-probability of each option at each factor: arrays (factors, options).

    ``reduction="sum"`` gives the log-probability of the whole answer; ``"mean"`` the mean per
    answer token (for options of different lengths). Per batch of ``batch_size`` items there is one
    unsteered capture below the first steered layer; all factors then run as per-row factors in
    tail forwards of at most ``max_rows`` rows (at least one factor each). Factor 0, or no updates,
    is the unsteered model. ``truncation`` is the policy for items longer than the model context
    (see :func:`splitsteer.render.render`). With ``pack``, an item's options share one row where
    the model allows it, so its prompt is computed once (see :class:`splitsteer.render.Packing`).
    """
    reduction = _check_reduction(reduction)
    factor_list = _check_factors(factors)
    if not len(items):
        raise InputError("A/B evaluation needs at least one item")
    if batch_size < 1 or max_rows < 1:
        raise InputError(f"batch_size and max_rows must be >= 1, got {batch_size} and {max_rows}")
    options = [item_options(item)[0] for item in items]
    start = min(u.layer for u in updates) if updates else 0
    limit = context_length(model)
    pad = pad_id(tokenizer)
    results: list[np.ndarray] = []
    for group_index in chunks(range(len(items)), batch_size):
        groups = [
            [render(tokenizer, items[i].prompt, option, max_length=limit, truncation=truncation)
             for option in options[i]]
            for i in group_index
        ]
        batch = answers_batch(groups, pad, pack=pack and can_pack(model, groups))
        rows = batch.n_slots  # one per option, in item order
        prefix = capture_prefix(model, batch, start)
        logp = np.zeros((len(factor_list), rows))
        per_call = max(1, max_rows // len(batch))
        for offset in range(0, len(factor_list), per_call):
            chunk = factor_list[offset : offset + per_call]
            with torch.no_grad():
                normed = steered_tail(model, prefix, updates, row_factors(prefix.batch, chunk))
                nll = row_nll(model, normed, prefix.batch, len(chunk), reduction)
            logp[offset : offset + len(chunk)] = -nll.view(len(chunk), rows).double().cpu().numpy()
        column = 0
        for i in group_index:
            width = len(options[i])
            results.append(logp[:, column : column + width])
            column += width
    return results


def _ab_summary(
    logps: Sequence[np.ndarray], keys: Sequence[tuple[int, int]], factor_index: int, indices: Iterable[int]
) -> dict[str, float | int]:
    """Accuracy and mean PrefOdds of the items ``indices`` at one factor.

    Correct means strictly more likely than every other option: a tie is not a preference.
    """
    correct: list[bool] = []
    odds: list[float] = []
    for i in indices:
        row = logps[i][factor_index]
        pos, neg = keys[i]
        others = np.delete(row, pos)
        correct.append(bool(row[pos] > others.max()))
        odds.append(float(row[pos] - row[neg]))
    n = len(correct)
    return {
        "accuracy": sum(correct) / n if n else math.nan,
        "mean_pref_odds": sum(odds) / n if n else math.nan,
        "n": n,
    }


def _keys(items: Sequence[Pair]) -> list[tuple[int, int]]:
    return [(pos, neg) for _, pos, neg in map(item_options, items)]


def ab_accuracy(
    model: nn.Module,
    tokenizer: Any,
    updates: Sequence[SteeringUpdate],
    items: Sequence[Pair],
    factor: float,
    *,
    batch_size: int = 8,
    reduction: Reduction = "sum",
    truncation: TruncationPolicy = "error",
) -> dict[str, Any]:
    """A/B accuracy of ``items`` under ``updates`` at ``factor``: accuracy, mean_pref_odds, n.

    Summed log-probabilities are the default because A/B answers such as ``" (A)"`` have equal
    token counts, so the sum is the probability of the answer itself; use ``"mean"`` when options
    differ in length. With no updates or factor 0 this is the unsteered baseline.
    """
    logps = option_logprobs(model, tokenizer, updates, items, [factor], batch_size=batch_size, reduction=reduction,
                           truncation=truncation)
    return {**_ab_summary(logps, _keys(items), 0, range(len(items))), "reduction": reduction}


def ab_eval(
    model: nn.Module,
    tokenizer: Any,
    updates: Sequence[SteeringUpdate],
    items: Sequence[Pair],
    factor: float,
    *,
    batch_size: int = 8,
    reduction: Reduction = "sum",
    truncation: TruncationPolicy = "error",
) -> dict[str, Any]:
    """The unsteered baseline beside the steered figure: {"factor", "baseline", "steered"}.

    Both come from one capture per batch (the baseline is the tail at factor 0, run in the same
    tail forward as the steered rows), so they differ only by the steering.
    """
    factor = _check_factors([factor])[0]
    factors = [0.0] if factor == 0 else [0.0, factor]
    logps = option_logprobs(model, tokenizer, updates, items, factors, batch_size=batch_size, reduction=reduction,
                           truncation=truncation)
    keys = _keys(items)
    baseline = {**_ab_summary(logps, keys, 0, range(len(items))), "reduction": reduction}
    steered = {**_ab_summary(logps, keys, len(factors) - 1, range(len(items))), "reduction": reduction}
    return {"factor": factor, "baseline": baseline, "steered": steered}


# ---------------------------------------------------------------------------------------------
# Factor selection (AxBench protocol)
# ---------------------------------------------------------------------------------------------


def split_indices(n_items: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Two disjoint halves of ``range(n_items)`` from a seeded permutation (each sorted).

    The selection half has ``n_items // 2`` items, the held-out half the rest, so the reported
    number never rests on fewer items than the choice.
    """
    if n_items < 2:
        raise InputError(f"factor selection needs at least 2 items to split in halves, got {n_items}")
    order = np.random.default_rng(seed).permutation(n_items)
    half = n_items // 2
    return sorted(int(i) for i in order[:half]), sorted(int(i) for i in order[half:])


def _finite_or_worst(value: float) -> float:
    """NaN scores sort below everything, so a broken factor is never chosen over a real one."""
    return value if not math.isnan(value) else -math.inf


def select_factor(
    score_fn: Callable[[float, Sequence[int]], float],
    factors: Sequence[float],
    n_items: int,
    seed: int = 0,
    *,
    tiebreak: Callable[[float, Sequence[int]], float] | None = None,
) -> dict[str, Any]:
    """Choose the factor maximising ``score_fn`` on one half of the items, report it on the other.

    ``score_fn(factor, indices)`` scores a factor on a subset of items. Ties on the selection half
    go to the larger ``tiebreak`` (if given), then to the smaller ``|factor|`` (the gentler
    intervention), then to the earlier factor. ``selection_scores`` lists every factor's score on
    the selection half; held-out scores are computed for the chosen factor only.
    """
    factor_list = _check_factors(factors)
    selection, held_out = split_indices(n_items, seed)
    scores = [float(score_fn(f, selection)) for f in factor_list]
    ties = [float(tiebreak(f, selection)) if tiebreak is not None else 0.0 for f in factor_list]
    best = max(
        range(len(factor_list)),
        key=lambda k: (_finite_or_worst(scores[k]), _finite_or_worst(ties[k]), -abs(factor_list[k])),
    )
    chosen = factor_list[best]
    return {
        "factor": chosen,
        "selection_score": scores[best],
        "held_out_score": float(score_fn(chosen, held_out)),
        "selection_indices": selection,
        "held_out_indices": held_out,
        "factors": factor_list,
        "selection_scores": scores,
    }


def ab_factor_selection(
    model: nn.Module,
    tokenizer: Any,
    updates: Sequence[SteeringUpdate],
    items: Sequence[Pair],
    factors: Sequence[float],
    seed: int = 0,
    *,
    batch_size: int = 8,
    reduction: Reduction = "sum",
    max_rows: int = MAX_ROWS,
    truncation: TruncationPolicy = "error",
) -> dict[str, Any]:
    """:func:`select_factor` with A/B accuracy as the score (ties: mean_pref_odds, then |factor|).

    All factors are scored in one pass (one capture per batch, per-row factors in tail forwards of
    at most ``max_rows`` rows); both halves are then read from the same log-probabilities. Also
    reports the chosen factor's mean_pref_odds on each half.
    """
    factor_list = list(dict.fromkeys(_check_factors(factors)))
    logps = option_logprobs(
        model, tokenizer, updates, items, factor_list, batch_size=batch_size, reduction=reduction, max_rows=max_rows,
        truncation=truncation,
    )
    keys = _keys(items)
    position = {f: k for k, f in enumerate(factor_list)}

    def summary(factor: float, indices: Sequence[int]) -> dict[str, float | int]:
        return _ab_summary(logps, keys, position[factor], indices)

    result = select_factor(
        lambda f, idx: float(summary(f, idx)["accuracy"]),
        factor_list,
        len(items),
        seed,
        tiebreak=lambda f, idx: float(summary(f, idx)["mean_pref_odds"]),
    )
    result["selection_mean_pref_odds"] = summary(result["factor"], result["selection_indices"])["mean_pref_odds"]
    result["held_out_mean_pref_odds"] = summary(result["factor"], result["held_out_indices"])["mean_pref_odds"]
    result["reduction"] = reduction
    return result


def judge_factor_selection(scores: Any, factors: Sequence[float], seed: int = 0) -> dict[str, Any]:
    """:func:`select_factor` on precomputed per-sample judge scores, shape (factors, items).

    Typically the harmonic mean of the three AxBench judges per generation; a factor's score on a
    half is the mean over its items.
    """
    table = np.asarray(scores, dtype=float)
    if table.ndim != 2 or table.shape[0] != len(factors):
        raise InputError(f"judge scores must have shape ({len(factors)} factors, items), got {table.shape}")
    row = {float(f): k for k, f in enumerate(factors)}
    return select_factor(lambda f, idx: float(table[row[f], list(idx)].mean()), factors, table.shape[1], seed)


# ---------------------------------------------------------------------------------------------
# Generations and judge-free metrics
# ---------------------------------------------------------------------------------------------


def generate_eval(
    model: nn.Module,
    tokenizer: Any,
    updates: Sequence[SteeringUpdate],
    prompts: Sequence[str],
    factor: float,
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """One record {"prompt", "factor", "output"} per prompt, generated with every update at ``factor``."""
    factor = _check_factors([factor])[0]
    outputs = generate(
        model,
        tokenizer,
        prompts,
        steering=[(u, factor) for u in updates],
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
    )
    return [{"prompt": p, "factor": factor, "output": o} for p, o in zip(prompts, outputs, strict=True)]


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write one JSON object per line, atomically: readers see the old file or the whole new one."""
    return atomic.write_jsonl(path, records)


def _steering_hook_active(model: nn.Module) -> bool:
    """True while a :class:`SteeringUpdate` hook is registered anywhere in ``model``."""
    marker = f"{SteeringUpdate.__name__}._make_hook."
    return any(
        getattr(hook, "__qualname__", "").startswith(marker)
        for module in model.modules()
        for hook in module._forward_hooks.values()
    )


def generation_metrics(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], outputs: Sequence[str], *, batch_size: int = 8
) -> dict[str, float | int]:
    """Judge-free quality of one output set: fluency_entropy, perplexity, n (and n_perplexity).

    Perplexity is the mean over outputs of their perplexity under the *unsteered* model (steered
    outputs the base model finds unlikely are broken language); outputs with no scorable token
    are left out of the mean and ``n_perplexity`` counts the rest. Raises if a steering hook is
    still active, since the number would then measure the steered model.
    """
    if len(prompts) != len(outputs):
        raise InputError(f"generation metrics need one prompt per output, got {len(prompts)} and {len(outputs)}")
    if _steering_hook_active(model):
        raise InputError("a steering update is still applied to the model; perplexity needs the unsteered model")
    scored = perplexity(cast(Any, model), tokenizer, prompts, outputs, batch_size=batch_size)
    values = [v for v in scored if not math.isnan(v)]
    return {
        "fluency_entropy": fluency_entropy(outputs),
        "perplexity": sum(values) / len(values) if values else math.nan,
        "n": len(outputs),
        "n_perplexity": len(values),
    }
