"""Run splitsteer's benchmarks: side-by-side speed ratios and peak memory.

    .venv/bin/python benchmarks/run.py                 # all of them (make bench)
    .venv/bin/python benchmarks/run.py sweep decode    # some
    .venv/bin/python benchmarks/run.py --quick         # small sizes, a smoke run
    .venv/bin/python benchmarks/run.py --threads 2     # torch threads per process (default 1)

Each benchmark writes benchmarks/results/NAME.json and prints one summary line.
See benchmarks/README.md for the method and the figures.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log, setup_env, summary_line, write_result

#: name -> (module, extra keyword arguments for its run()).
BENCHMARKS: dict[str, tuple[str, dict[str, str]]] = {
    "train": ("bench_train", {}),
    "sweep": ("bench_sweep", {}),
    "decode": ("bench_decode", {}),
    "diffmean": ("bench_diffmean", {}),
    "load": ("bench_load", {}),
    "memory-vector": ("bench_memory", {"form": "vector"}),
    "memory-lora": ("bench_memory", {"form": "lora"}),
    "memory-local_weight": ("bench_memory", {"form": "local_weight"}),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="shrink every workload for a smoke run")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "1")),
                        help="torch threads in every benchmark process (default 1, or $BENCH_THREADS); "
                             "see README: two threads on a shared 2-core machine make timings erratic")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    # Before torch is imported anywhere; child processes and peer workers inherit it.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    setup_env()
    names = args.names or list(BENCHMARKS)
    failures = 0
    started = time.perf_counter()
    for name in names:
        module_name, kwargs = BENCHMARKS[name]
        log(f"{name}: running{' (quick)' if args.quick else ''}")
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(module_name)
            payload = module.run(quick=args.quick, **kwargs)
        except Exception as exc:  # noqa: BLE001 - one failure must not hide the other figures
            failures += 1
            traceback.print_exc()
            print(f"[FAIL] {name:<20} {type(exc).__name__}: {exc}", flush=True)
            continue
        payload["quick"] = args.quick
        payload["threads"] = args.threads
        payload["bench_wall_s"] = round(time.perf_counter() - t0, 1)
        path = write_result(name, payload)
        shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
        print(summary_line(name, payload) + f"  -> {shown}", flush=True)
        gc.collect()
    log(f"done in {time.perf_counter() - started:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
