"""decode: steered generation vs unsteered generation, and vs repeng / steering-vectors.

Ours: ``splitsteer.generation.generate`` with one vector (DiffMean, layer 15, factor 4) and
with a local_weight update (layer 15 down-projection, factor 1), against the same function
with no steering: same prompts, same batch, greedy, and EOS disabled so every run generates
exactly ``max_new_tokens`` tokens per prompt (otherwise a steered run that stops earlier or
later would be timed on a different amount of work).

Peers: repeng 0.4.0 and steering-vectors 0.12.2 pin transformers<5, so they run in
benchmarks/.peer-venv, in a worker process that keeps its own copy of the same model and
generates the same prompts the same way (same vector, same layer, same factor). The worker
and this process take turns command by command, so the rounds interleave:
ours unsteered / vector / local_weight, then the peer's unsteered / repeng / steering-vectors,
with the order inside each group and of the two groups reversed every other round.

Absolute times across the two environments mix in the difference between transformers 5
and 4 generation loops, so each library is compared to its own unsteered run: the overhead
ratio steered/unsteered. Both comparisons are recorded.
"""

from __future__ import annotations

from typing import Any

import torch
from common import (
    PeerWorker,
    alternate,
    diffmean_vector,
    ensure_peer_venv,
    log,
    median,
    model_and_tokenizer,
    model_dir,
    pairs,
    timed,
)

TARGET_OVERHEAD = 1.03
FACTOR = 4.0
LAYER = 15


def local_weight_update(model: Any) -> Any:
    from splitsteer.updates import SteeringUpdate

    update = SteeringUpdate.zeros(model, "local_weight", LAYER)
    g = torch.Generator().manual_seed(0)
    update.params["delta_w"] = torch.randn(update.params["delta_w"].shape, generator=g) * 0.01
    update.params["delta_b"] = torch.randn(update.params["delta_b"].shape, generator=g) * 0.01
    return update


def run(quick: bool = False) -> dict[str, Any]:
    from splitsteer.generation import generate
    from splitsteer.render import prompt_text

    n_prompts, new_tokens, rounds = (2, 8, 2) if quick else (8, 32, 5)
    model, tokenizer = model_and_tokenizer()
    vector = diffmean_vector(LAYER)
    local = local_weight_update(model)
    prompts = [p.prompt for p in pairs("test", n_prompts)]
    saved_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # fixed-length generations on every side

    def ours(steering: list[Any]) -> Any:
        def call() -> list[str]:
            return generate(model, tokenizer, prompts, steering=steering, max_new_tokens=new_tokens,
                            batch_size=n_prompts)
        return call

    variants = {"unsteered": ours([]), "vector": ours([(vector, FACTOR)]), "local_weight": ours([(local, 1.0)])}
    peer_error = ensure_peer_venv()
    worker: PeerWorker | None = None
    if peer_error is None:
        try:
            worker = PeerWorker("peer_decode.py", {
                "model_dir": model_dir(), "prompts": [prompt_text(tokenizer, p) for p in prompts],
                "vector": vector.params["delta_b"].tolist(), "layer": LAYER, "factor": FACTOR,
                "max_new_tokens": new_tokens, "batch_size": n_prompts})
        except RuntimeError as exc:
            peer_error = str(exc)
    peer_ops = ["unsteered", "repeng", "steering_vectors"]
    runs: list[dict[str, Any]] = []
    texts: dict[str, str] = {}
    try:
        for fn in variants.values():  # warm-up, not measured
            fn()
        if worker is not None:
            for op in peer_ops:
                worker.call(op=op)
        for r in range(rounds):
            groups = ["ours", "peer"] if worker is not None else ["ours"]
            for group in alternate(r, groups):
                if group == "ours":
                    for name in alternate(r, list(variants)):
                        seconds, out = timed(variants[name])
                        texts[f"ours_{name}"] = out[0]
                        runs.append({"round": r, "which": f"ours_{name}", "seconds": seconds})
                else:
                    assert worker is not None
                    for op in alternate(r, peer_ops):
                        reply = worker.call(op=op)
                        texts[f"peer_{op}"] = reply["first"]
                        runs.append({"round": r, "which": f"peer_{op}", "seconds": reply["seconds"],
                                     "tokens": reply["tokens"]})
            log(f"decode round {r}: " + ", ".join(f"{x['which']} {x['seconds']:.2f}s"
                                                    for x in runs if x["round"] == r))
        peer_info = worker.info if worker is not None else None
    finally:
        model.generation_config.eos_token_id = saved_eos
        if worker is not None:
            worker.close()

    def med(which: str) -> float:
        values = [x["seconds"] for x in runs if x["which"] == which]
        return median(values) if values else float("nan")

    def per_round_ratio(a: str, b: str) -> float:
        """Median over rounds of a/b, each pair measured in the same round."""
        by_round = {}
        for x in runs:
            by_round.setdefault(x["round"], {})[x["which"]] = x["seconds"]
        values = [v[a] / v[b] for v in by_round.values() if a in v and b in v]
        return median(values) if values else float("nan")

    ours_un, ours_vec, ours_lw = med("ours_unsteered"), med("ours_vector"), med("ours_local_weight")
    overhead_vec = per_round_ratio("ours_vector", "ours_unsteered")
    overhead_lw = per_round_ratio("ours_local_weight", "ours_unsteered")
    payload: dict[str, Any] = {
        "ours_s": ours_vec,
        "baseline_s": ours_un,
        "ratio": overhead_vec,
        "ratio_is": "steered (vector) / unsteered time, median of per-round ratios (1.00 = no cost)",
        "local_weight_s": ours_lw,
        "local_weight_ratio": overhead_lw,
        "runs": runs,
        "sizes": {"prompts": n_prompts, "batch": n_prompts, "max_new_tokens": new_tokens, "rounds": rounds,
                  "greedy": True, "eos": "disabled (fixed length)", "layer": LAYER, "factor": FACTOR,
                  "vector": "DiffMean from 16 power-seeking/train pairs",
                  "local_weight": "random N(0, 0.01^2) delta_w and delta_b at layer 15 down_proj, factor 1",
                  "prompts_from": "power-seeking/test (first prompts), chat template"},
        "model": "smollm2-135m-instruct (30 layers, hidden 576, float32, CPU)",
        "first_outputs": texts,
    }
    met = overhead_vec <= TARGET_OVERHEAD and overhead_lw <= TARGET_OVERHEAD
    if worker is None:
        payload["peer_error"] = peer_error
        payload["target"] = f"<= {TARGET_OVERHEAD:.2f}x unsteered; no slower than repeng / steering-vectors"
        payload["met"] = bool(met)
        payload["summary_extra"] = f"local_weight {overhead_lw:.3f}x; peers not measured: {peer_error}"
        return payload
    peer_un = med("peer_unsteered")
    peers = {}
    for op in ("repeng", "steering_vectors"):
        steered = med(f"peer_{op}")
        peers[op] = {"steered_s": steered, "unsteered_s": peer_un,
                     "overhead": per_round_ratio(f"peer_{op}", "peer_unsteered"),
                     "ours_vector_over_peer_steered_abs": per_round_ratio("ours_vector", f"peer_{op}"),
                     "same_first_output_as_ours_vector": texts.get(f"peer_{op}") == texts.get("ours_vector")}
    # Overheads are compared with a 1% allowance: below that the shared machine's noise decides.
    no_slower = all(overhead_vec <= p["overhead"] + 0.01 for p in peers.values())
    payload.update({
        "target": (f"<= {TARGET_OVERHEAD:.2f}x unsteered (vector and local_weight); steering overhead no "
                   "larger than repeng's or steering-vectors' (+0.01 noise allowance)"),
        "met": bool(met and no_slower),
        "peers": peers,
        "peer_unsteered_s": peer_un,
        "ours_unsteered_over_peer_unsteered_abs": per_round_ratio("ours_unsteered", "peer_unsteered"),
        "peer_versions": peer_info.get("versions") if peer_info else None,
        "summary_extra": (f"local_weight {overhead_lw:.3f}x; overhead repeng {peers['repeng']['overhead']:.3f}x, "
                          f"steering-vectors {peers['steering_vectors']['overhead']:.3f}x"),
    })
    return payload
