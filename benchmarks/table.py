"""Print the figures in benchmarks/results/*.json as the Markdown table of README.md.

    .venv/bin/python benchmarks/table.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ORDER = ["train", "sweep", "decode", "diffmean", "load", "memory-vector", "memory-lora", "memory-local_weight"]


def _row(d: dict[str, Any]) -> str:
    name = d["name"]
    met = ("**met**" if d.get("met") else "missed") + (" (quick run)" if d.get("quick") else "")
    if "peak_rss_mib" in d:
        return (f"| {name} | peak RSS {d['peak_rss_mib']:.0f} MiB (first {d['sizes']['pairs']} pairs); "
                f"{d['longest_pairs_peak_rss_mib']:.0f} MiB (8 longest pairs) | – | – | {d['target']} | {met} |")
    ours, base, ratio = d["ours_s"], d["baseline_s"], d["ratio"]
    if name == "train":
        detail = (f"final loss {d['ours_final_loss']:.4f} vs {d['baseline_final_loss']:.4f} "
                  f"({d['final_loss_rel_diff']:.1e} rel.), vector max diff {d['vector_max_abs_diff']:.1e}")
        figure = f"{ratio:.2f}× faster"
    elif name == "sweep":
        detail = f"max \\|ΔLp\\|, \\|ΔLn\\| {d['max_abs_diff_lp_ln']:.1e}"
        figure = f"{ratio:.2f}× faster"
    elif name == "decode":
        peers = d.get("peers", {})
        abs_rp = peers.get("repeng", {}).get("ours_vector_over_peer_steered_abs", float("nan"))
        abs_sv = peers.get("steering_vectors", {}).get("ours_vector_over_peer_steered_abs", float("nan"))
        detail = (f"local_weight {d['local_weight_ratio']:.3f}×; overhead repeng "
                  f"{peers.get('repeng', {}).get('overhead', float('nan')):.3f}×, steering-vectors "
                  f"{peers.get('steering_vectors', {}).get('overhead', float('nan')):.3f}×; ours steered / "
                  f"peers steered (absolute) {abs_rp:.2f}, {abs_sv:.2f}; "
                  "same greedy text")
        figure = f"steered/unsteered {ratio:.3f}×"
    elif name == "diffmean":
        peer = d.get("peer", {})
        detail = (f"vector max diff {d['max_abs_diff_vs_plain_hf']:.1e} vs plain HF; steering-vectors "
                  f"{peer.get('seconds', float('nan')):.1f} s → {peer.get('ratio', float('nan')):.2f}× "
                  f"(its last-token vector = plain-HF last-token to "
                  f"{peer.get('max_abs_diff_vs_plain_hf_last_token', float('nan')):.0e})")
        figure = f"{ratio:.2f}× faster than plain HF"
    else:
        detail = ""
        figure = f"{ratio:.2f}× faster"
    return f"| {name} | {figure} | {ours:.2f} s | {base:.2f} s | {d['target']}; {detail} | {met} |"


def main() -> None:
    print("| benchmark | figure | ours | baseline | target; agreement | |")
    print("|---|---|---|---|---|---|")
    for name in ORDER:
        path = RESULTS / f"{name}.json"
        if path.exists():
            print(_row(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
