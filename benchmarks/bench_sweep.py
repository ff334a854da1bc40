"""sweep: splitsteer.sweep.sweep_losses vs the naive loop, 21 factors, pairs of power-seeking/test.

The naive loop: for each factor, for each batch, one full forward of the steered model via
``update.apply(model, factor)``, full-vocabulary logits at every position, then the mean
cross-entropy over each row's answer tokens.

The naive loop costs several of ours, so within the time budget it runs once, split by factor
into ROUNDS parts that alternate with ROUNDS whole runs of ours (ours, naive part 0, naive
part 1, ours); its time is the sum of its parts. Both use batches of 8 pairs (16 rows).
A sweep of more pairs repeats exactly this work per batch of 8 pairs (one prefix capture,
then the tail for every factor), so the ratio does not depend on the number of pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from common import alternate, diffmean_vector, log, median, model_and_tokenizer, pairs, timed

TARGET_RATIO = 5.0
TOLERANCE = 1e-4
BATCH_PAIRS = 8
ROUNDS = 2


def naive_sweep(model: Any, tokenizer: Any, update: Any, chunk: Sequence[Any],
                factors: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    from authors_baseline import answer_losses

    from splitsteer.render import context_length, pad_id, pair_batch, render_pairs

    rendered = render_pairs(tokenizer, chunk, max_length=context_length(model))
    batches = [pair_batch(rendered[i : i + BATCH_PAIRS], pad_id(tokenizer))
               for i in range(0, len(rendered), BATCH_PAIRS)]
    lp = np.zeros((len(factors), len(chunk)))
    ln = np.zeros_like(lp)
    for f_index, factor in enumerate(factors):
        done = 0
        for batch in batches:
            with torch.no_grad(), update.apply(model, factor):
                logits = model(**batch.model_inputs(), use_cache=False).logits
            losses = answer_losses(logits, batch.labels)
            n = len(batch) // 2
            lp[f_index, done : done + n] = losses[0::2].numpy()
            ln[f_index, done : done + n] = losses[1::2].numpy()
            done += n
    return lp, ln


def run(quick: bool = False) -> dict[str, Any]:
    from splitsteer.sweep import parse_factors, sweep_losses

    n_pairs, spec = (4, "-20:20:5") if quick else (8, "-20:20:21")
    factors = parse_factors(spec)
    model, tokenizer = model_and_tokenizer()
    update = diffmean_vector()
    data = pairs("test", n_pairs)
    # The naive loop costs several of ours, so it runs once, split by factors into as many
    # parts as ours runs, and the parts alternate with ours' runs: ours, naive[0], naive[1], ours.
    parts = [list(range(i, len(factors), ROUNDS)) for i in range(ROUNDS)]

    def ours() -> Any:
        return sweep_losses(model, tokenizer, [update], data, factors, batch_size=BATCH_PAIRS)

    # Warm-up, not measured.
    sweep_losses(model, tokenizer, [update], data[:1], factors[:2], batch_size=BATCH_PAIRS)
    naive_sweep(model, tokenizer, update, data[:1], factors[:1])

    runs: list[dict[str, Any]] = []
    lp_b = np.zeros((len(factors), len(data)))
    ln_b = np.zeros_like(lp_b)
    ours_out: Any = None
    for r in range(ROUNDS):
        for which in alternate(r, ["ours", "baseline"]):
            if which == "ours":
                seconds, ours_out = timed(ours)
            else:
                subset = [factors[i] for i in parts[r]]
                seconds, (lp, ln) = timed(lambda sub=subset: naive_sweep(model, tokenizer, update, data, sub))
                lp_b[parts[r]], ln_b[parts[r]] = lp, ln
            runs.append({"round": r, "which": which, "seconds": seconds,
                         "factors": len(factors) if which == "ours" else len(parts[r])})
            log(f"sweep round {r} {which}: {seconds:.1f}s")
    lp_a, ln_a = ours_out
    max_diff = float(max(np.abs(lp_a - lp_b).max(), np.abs(ln_a - ln_b).max()))
    ours_t = [x["seconds"] for x in runs if x["which"] == "ours"]
    ours_s = median(ours_t)
    base_s = sum(x["seconds"] for x in runs if x["which"] == "baseline")
    ratio = base_s / ours_s
    return {
        "ours_s": ours_s,
        "baseline_s": base_s,
        "ratio": ratio,
        "target": f">= {TARGET_RATIO}x faster; Lp/Ln equal to {TOLERANCE:g}",
        "met": bool(ratio >= TARGET_RATIO and max_diff <= TOLERANCE),
        "speed_met": bool(ratio >= TARGET_RATIO),
        "values_met": bool(max_diff <= TOLERANCE),
        "runs": runs,
        "times_are": (f"ours: median of {ROUNDS} whole sweeps; baseline: one whole naive sweep, "
                      f"run in {ROUNDS} parts (factor subsets) interleaved with ours' runs, summed"),
        "max_abs_diff_lp_ln": max_diff,
        "lp_mean_by_factor": lp_a.mean(1).tolist(),
        "ln_mean_by_factor": ln_a.mean(1).tolist(),
        "model": "smollm2-135m-instruct (30 layers, hidden 576, float32, CPU)",
        "sizes": {"pairs": n_pairs, "dataset": "power-seeking/test (first pairs)", "factors": len(factors),
                  "factor_spec": spec, "batch_pairs": BATCH_PAIRS, "rounds": ROUNDS,
                  "tokens_per_factor": int(sum(len(a.ids) + len(b.ids) for a, b in _rendered(tokenizer, data))),
                  "update": "DiffMean vector from 16 power-seeking/train pairs, layer 15",
                  "sweep_losses_options": "defaults (batch_size=8, max_rows=128, positions='all', mean)"},
        "summary_extra": f"max |dLp|,|dLn| {max_diff:.1e}",
    }


def _rendered(tokenizer: Any, data: Sequence[Any]) -> Any:
    from splitsteer.render import render_pairs

    return render_pairs(tokenizer, data)
