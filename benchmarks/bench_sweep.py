"""sweep: splitsteer.sweep.sweep_losses vs the naive loop, 21 factors × 100 pairs of power-seeking/test.

The naive loop: for each factor, for each batch, one full forward of the steered model via
``update.apply(model, factor)``, full-vocabulary logits at every position, then the mean
cross-entropy over each row's answer tokens.

The naive sweep of 100 pairs takes about 40 minutes on one thread, so it runs once: the 100
pairs are split into CHUNKS chunks, and on each chunk ours and the naive loop run back to
back, the order reversed every other chunk (ours, naive, naive, ours, ...). Each side's time
is the sum over chunks; the ratio of sums is the figure (the median of per-chunk ratios is
recorded too). Both use batches of 8 pairs.
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
N_PAIRS = 100
CHUNKS = 5


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

    n_pairs, spec = (4, "-20:20:5") if quick else (N_PAIRS, "-20:20:21")
    factors = parse_factors(spec)
    model, tokenizer = model_and_tokenizer()
    update = diffmean_vector()
    data = pairs("test", n_pairs)
    size = -(-n_pairs // (2 if quick else CHUNKS))
    chunk_list = [data[i : i + size] for i in range(0, n_pairs, size)]

    # Warm-up, not measured.
    sweep_losses(model, tokenizer, [update], data[:1], factors[:2], batch_size=BATCH_PAIRS)
    naive_sweep(model, tokenizer, update, data[:1], factors[:1])

    runs: list[dict[str, Any]] = []
    outputs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"ours": [], "baseline": []}
    for c, chunk in enumerate(chunk_list):
        for which in alternate(c, ["ours", "baseline"]):
            if which == "ours":
                seconds, out = timed(lambda chunk=chunk: sweep_losses(model, tokenizer, [update], chunk, factors,
                                                                      batch_size=BATCH_PAIRS))
            else:
                seconds, out = timed(lambda chunk=chunk: naive_sweep(model, tokenizer, update, chunk, factors))
            outputs[which].append(out)
            runs.append({"chunk": c, "which": which, "pairs": len(chunk), "seconds": seconds})
            log(f"sweep chunk {c} ({len(chunk)} pairs) {which}: {seconds:.1f}s")
    lp_a, ln_a = (np.concatenate([o[k] for o in outputs["ours"]], axis=1) for k in (0, 1))
    lp_b, ln_b = (np.concatenate([o[k] for o in outputs["baseline"]], axis=1) for k in (0, 1))
    max_diff = float(max(np.abs(lp_a - lp_b).max(), np.abs(ln_a - ln_b).max()))
    ours_s = sum(x["seconds"] for x in runs if x["which"] == "ours")
    base_s = sum(x["seconds"] for x in runs if x["which"] == "baseline")
    per_chunk = [b["seconds"] / a["seconds"] for a, b in zip(
        [x for x in runs if x["which"] == "ours"], [x for x in runs if x["which"] == "baseline"], strict=True)]
    ratio = base_s / ours_s
    return {
        "ours_s": ours_s,
        "baseline_s": base_s,
        "ratio": ratio,
        "ratio_median_of_chunk_ratios": median(per_chunk),
        "target": f">= {TARGET_RATIO}x faster; Lp/Ln equal to {TOLERANCE:g}",
        "met": bool(ratio >= TARGET_RATIO and max_diff <= TOLERANCE),
        "speed_met": bool(ratio >= TARGET_RATIO),
        "values_met": bool(max_diff <= TOLERANCE),
        "runs": runs,
        "times_are": (f"seconds for the whole sweep of {n_pairs} pairs x {len(factors)} factors on each side: "
                      f"the sum over {len(chunk_list)} chunks of pairs, the two sides back to back on each chunk"),
        "max_abs_diff_lp_ln": max_diff,
        "lp_mean_by_factor": lp_a.mean(1).tolist(),
        "ln_mean_by_factor": ln_a.mean(1).tolist(),
        "model": "smollm2-135m-instruct (30 layers, hidden 576, float32, CPU)",
        "sizes": {"pairs": n_pairs, "dataset": "power-seeking/test (first pairs)", "factors": len(factors),
                  "factor_spec": spec, "batch_pairs": BATCH_PAIRS, "chunks": len(chunk_list),
                  "tokens_per_factor_unpacked": int(sum(len(a.ids) + len(b.ids)
                                                        for a, b in _rendered(tokenizer, data))),
                  "update": "DiffMean vector from 16 power-seeking/train pairs, layer 15",
                  "sweep_losses_options": "defaults (batch_size=8, max_rows=128, positions='all', mean, pack)"},
        "summary_extra": f"max |dLp|,|dLn| {max_diff:.1e}",
    }


def _rendered(tokenizer: Any, data: Sequence[Any]) -> Any:
    from splitsteer.render import render_pairs

    return render_pairs(tokenizer, data)
