"""memory-FORM: peak RSS of one SPLIT training epoch on the embedded model, per form.

A fresh process per form (benchmarks/child.py memory FORM PAIRS): load the model, train one
epoch (batch 8 pairs, layer 15, defaults otherwise), and read the process's peak RSS (VmHWM;
ru_maxrss is recorded too, but Linux passes the parent's peak on to a child: see child.py).
Absolute: no baseline.
The peak is set by the largest batch (its rows x tokens, through the activations the tail keeps
for the backward pass), so a second fresh process trains on the 8 longest pairs of the split:
the batch that sets the peak of an epoch over the whole split.
"""

from __future__ import annotations

from typing import Any

from common import log, run_child

TARGET_MIB = 3 * 1024


def run(quick: bool = False, form: str = "vector") -> dict[str, Any]:
    n_pairs = 8 if quick else 32
    out = run_child("memory", form, str(n_pairs))
    log(f"memory {form}: peak {out['peak_rss_mib']:.0f} MiB, after load {out['rss_after_load_mib']:.0f} MiB")
    # The peak follows the largest batch (rows x tokens), so also the worst batch of the split.
    worst = run_child("memory", form, str(-8))
    log(f"memory {form}, the 8 longest pairs: peak {worst['peak_rss_mib']:.0f} MiB")
    return {
        "peak_rss_mib": out["peak_rss_mib"],
        "target": f"<= {TARGET_MIB} MiB (3 GiB)",
        # Met only if the worst batch of the split fits too: an epoch over the whole split reaches it.
        "met": bool(out["peak_rss_mib"] <= TARGET_MIB and worst["peak_rss_mib"] <= TARGET_MIB),
        "first_pairs_met": bool(out["peak_rss_mib"] <= TARGET_MIB),
        "runs": [out, worst],
        "longest_pairs_peak_rss_mib": worst["peak_rss_mib"],
        "longest_pairs_met": bool(worst["peak_rss_mib"] <= TARGET_MIB),
        "longest_pairs": {"pairs": worst["pairs"], "longest_row_tokens": worst["longest_row_tokens"],
                          "what": "one epoch on the 8 longest pairs of power-seeking/train (one batch)"},
        "form": form,
        "rss_after_load_mib": out["rss_after_load_mib"],
        "training_increment_mib": out["peak_rss_mib"] - out["rss_after_load_mib"],
        "model": "smollm2-135m-instruct (30 layers, hidden 576, float32, CPU)",
        "sizes": {"pairs": n_pairs, "dataset": "power-seeking/train (first pairs)", "epochs": 1,
                  "batch_pairs": 8, "layer": 15, "method": "split", "process": "fresh; whole-process peak RSS (VmHWM)",
                  "longest_row_tokens": out["longest_row_tokens"], "mean_row_tokens": out["mean_row_tokens"]},
        "summary_extra": f"8 longest pairs: {worst['peak_rss_mib']:.0f} MiB",
    }
