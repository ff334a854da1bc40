"""diffmean: splitsteer's DiffMean vs steering-vectors 0.12.2 and a plain-HF implementation.

What each computes, at the output of decoder layer 15 on 200 power-seeking/train pairs:

- ours: ``train_update(method="diffmean")``: per pair, the mean activation over the positive
  answer's tokens minus the mean over the negative answer's tokens; the vector is the mean
  over pairs. The forward stops after layer 15.
- plain HF (the baseline for equal vectors): the same math written the usual way: for each
  batch of 8 pairs, one forward over the positive texts and one over the negative texts
  (as steering-vectors batches them), ``output_hidden_states=True``, the answer-token means
  taken from ``hidden_states[16]``. Same token ids as ours.
- steering-vectors: ``train_steering_vector`` with its ``mean_aggregator`` on
  (positive_str, negative_str) pairs, ``layers=[15]``, ``batch_size=8``. It reads one token
  per text (``read_token_index``), no mean over a span, so its vector cannot equal ours; it
  reads the last token here (the end-of-turn token that closes the answer). Reading a
  different position costs the same, so the timing compares like with like; its vector is
  checked against the plain-HF pass's last-token vector instead, and the answer-mean math is
  checked in the peer environment with steering-vectors' own ``record_activations`` hook.

The 200 pairs run as chunks of 40; per chunk the three run back to back on the same pairs,
in an order that reverses every chunk. The chunk vectors are averaged (equal sizes, so this is
the 200-pair vector).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from common import (
    PeerWorker,
    alternate,
    ensure_peer_venv,
    log,
    median,
    model_and_tokenizer,
    model_dir,
    pairs,
    timed,
)

TARGET_RATIO = 1.5
TOLERANCE = 1e-4
LAYER = 15
BATCH_PAIRS = 8


def _collate(rows: Sequence[Any], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    answer = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r.ids)] = torch.tensor(r.ids)
        mask[i, : len(r.ids)] = 1
        answer[i, r.prompt_len : len(r.ids)] = True
    return ids, mask, answer


@torch.no_grad()
def plain_hf_diffmean(model: Any, tokenizer: Any, chunk: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer-mean DiffMean, last-token DiffMean) at the output of layer LAYER."""
    from splitsteer.render import render_pairs  # the same token ids as ours

    rendered = render_pairs(tokenizer, chunk, max_length=model.config.max_position_embeddings)
    pad = tokenizer.pad_token_id
    diffs, last_diffs = [], []
    for i in range(0, len(rendered), BATCH_PAIRS):
        group = rendered[i : i + BATCH_PAIRS]
        sides = []
        for k in (0, 1):
            ids, mask, answer = _collate([pair[k] for pair in group], pad)
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[LAYER + 1]
            a = answer.unsqueeze(-1).to(hidden.dtype)
            means = (hidden * a).sum(1) / a.sum(1)
            last = hidden[torch.arange(len(group)), mask.sum(1) - 1]
            sides.append((means, last))
        diffs.append(sides[0][0] - sides[1][0])
        last_diffs.append(sides[0][1] - sides[1][1])
    return torch.cat(diffs).mean(0), torch.cat(last_diffs).mean(0)


def run(quick: bool = False) -> dict[str, Any]:
    from splitsteer.render import render_pairs
    from splitsteer.train import train_update

    n_pairs, chunk_size = (16, 8) if quick else (200, 40)
    model, tokenizer = model_and_tokenizer()
    data = pairs("train", n_pairs)
    rendered = render_pairs(tokenizer, data)
    texts = [[tokenizer.decode(pos.ids), tokenizer.decode(neg.ids)] for pos, neg in rendered]
    # steering-vectors tokenises the texts itself: check that they give back our ids.
    same_ids = sum(tokenizer(t, add_special_tokens=False)["input_ids"] == list(r.ids)
                   for pair, rs in zip(texts, rendered) for t, r in zip(pair, rs))
    check_pairs = rendered[:8]
    check = [[{"ids": list(r.ids), "answer_mask": [0] * r.prompt_len + [1] * r.answer_len} for r in pair]
             for pair in check_pairs]

    def ours(chunk: Sequence[Any]) -> torch.Tensor:
        return train_update(model, tokenizer, chunk, method="diffmean", layer=LAYER,
                            batch_size=BATCH_PAIRS).update.params["delta_b"]

    peer_error = ensure_peer_venv()
    worker: PeerWorker | None = None
    if peer_error is None:
        try:
            worker = PeerWorker("peer_diffmean.py", {"model_dir": model_dir(), "layer": LAYER,
                                                     "batch_pairs": BATCH_PAIRS, "samples": texts,
                                                     "check": check})
        except RuntimeError as exc:
            peer_error = str(exc)
    chunks = [(i, min(i + chunk_size, n_pairs)) for i in range(0, n_pairs, chunk_size)]
    runs: list[dict[str, Any]] = []
    vectors: dict[str, list[torch.Tensor]] = {"ours": [], "plain_hf": [], "plain_hf_last": [], "peer": []}
    peer_check: dict[str, Any] = {}
    try:
        # Warm-up on one pair each, not measured.
        ours(data[:1])
        plain_hf_diffmean(model, tokenizer, data[:1])
        if worker is not None:
            worker.call(op="train", start=0, stop=1)
        names = ["ours", "plain_hf"] + (["peer"] if worker is not None else [])
        for c, (start, stop) in enumerate(chunks):
            chunk = data[start:stop]
            for which in alternate(c, names):
                if which == "ours":
                    seconds, vec = timed(lambda ch=chunk: ours(ch))
                    vectors["ours"].append(vec)
                elif which == "plain_hf":
                    seconds, (vec, last) = timed(lambda ch=chunk: plain_hf_diffmean(model, tokenizer, ch))
                    vectors["plain_hf"].append(vec)
                    vectors["plain_hf_last"].append(last)
                else:
                    assert worker is not None
                    reply = worker.call(op="train", start=start, stop=stop)
                    seconds = reply["seconds"]
                    vectors["peer"].append(torch.tensor(reply["vector"]))
                runs.append({"chunk": c, "pairs": stop - start, "which": which, "seconds": seconds})
            log(f"diffmean chunk {c}: " + ", ".join(f"{x['which']} {x['seconds']:.1f}s"
                                                      for x in runs if x["chunk"] == c))
        if worker is not None:
            ours_check = ours([data[i] for i in range(len(check_pairs))])
            peer_vec = torch.tensor(worker.call(op="answer_mean_check")["vector"])
            peer_check = {"pairs": len(check_pairs),
                          "max_abs_diff_vs_ours": float((peer_vec - ours_check).abs().max())}
            peer_info = worker.info
    finally:
        if worker is not None:
            worker.close()

    def times(which: str) -> list[float]:
        return [x["seconds"] for x in runs if x["which"] == which]

    def chunk_ratio(which: str) -> float:
        return median([b / a for a, b in zip(times("ours"), times(which))])

    full = {k: torch.stack(v).mean(0) for k, v in vectors.items() if v}
    ours_s, hf_s = median(times("ours")), median(times("plain_hf"))
    ratio = hf_s / ours_s
    diff = float((full["ours"] - full["plain_hf"]).abs().max())
    payload: dict[str, Any] = {
        "ours_s": ours_s,
        "baseline_s": hf_s,
        "baseline": "plain HF, same math (answer-token means), full forward with output_hidden_states",
        "ratio": ratio,
        "ratio_median_of_chunk_ratios": chunk_ratio("plain_hf"),
        "times_are": f"seconds per chunk of {chunk_size} pairs, median over {len(chunks)} chunks",
        "ours_total_s": sum(times("ours")),
        "baseline_total_s": sum(times("plain_hf")),
        "max_abs_diff_vs_plain_hf": diff,
        "vector_norm": float(full["ours"].norm()),
        "runs": runs,
        "model": "smollm2-135m-instruct (30 layers, hidden 576, float32, CPU)",
        "sizes": {"pairs": n_pairs, "dataset": "power-seeking/train (first pairs)", "layer": LAYER,
                  "batch_pairs": BATCH_PAIRS, "chunk_pairs": chunk_size, "chunks": len(chunks)},
        "retokenised_texts_equal_ids": f"{same_ids}/{2 * n_pairs}",
    }
    met = ratio >= TARGET_RATIO and diff <= TOLERANCE
    target = f">= {TARGET_RATIO}x faster; equal vectors to {TOLERANCE:g}"
    if worker is None:
        payload.update({"peer_error": peer_error, "target": target, "met": bool(met),
                        "summary_extra": f"max|dv| {diff:.1e}; steering-vectors not measured"})
        return payload
    peer_s = median(times("peer"))
    cos = float(torch.nn.functional.cosine_similarity(full["ours"], full["peer"], dim=0))
    last_diff = float((full["peer"] - full["plain_hf_last"]).abs().max())
    peer_ratio = peer_s / ours_s
    payload.update({
        "target": target + " (vs plain HF for equality; vs both for speed)",
        "met": bool(met and peer_ratio >= TARGET_RATIO and peer_check["max_abs_diff_vs_ours"] <= TOLERANCE),
        "peer": {
            "name": "steering-vectors 0.12.2 train_steering_vector(mean_aggregator, read_token_index=-1)",
            "seconds": peer_s,
            "total_s": sum(times("peer")),
            "ratio": peer_ratio,
            "ratio_median_of_chunk_ratios": chunk_ratio("peer"),
            "cosine_vs_ours": cos,
            "why_not_equal": "it reads one token per text (here the last); ours averages the answer tokens",
            "max_abs_diff_vs_plain_hf_last_token": last_diff,
            "answer_mean_via_its_record_activations": peer_check,
            "versions": peer_info.get("versions"),
        },
        "summary_extra": (f"max|dv| {diff:.1e}; steering-vectors {peer_s:.2f}s ratio {peer_ratio:.2f}x "
                          f"(cos {cos:.3f}, last-token check {last_diff:.1e})"),
    })
    return payload
