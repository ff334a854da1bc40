"""train: one SPLIT epoch with splitsteer's trainer vs the authors' pass structure.

Both train a vector at layer 15 on the same pairs, with the same seed, factors, optimiser
and schedule (see authors_baseline.py). Runs alternate ours/baseline, baseline/ours, ...
"""

from __future__ import annotations

from typing import Any

import torch
from common import alternate, log, median, model_and_tokenizer, pairs, timed

TARGET_RATIO = 4.0
LOSS_TOLERANCE = 0.05


def _breakdown(model: Any, tokenizer: Any, data: list[Any], layer: int, repeats: int) -> dict[str, Any]:
    """Where one minibatch's time goes: each piece timed ``repeats`` times, pieces interleaved."""
    from authors_baseline import answer_losses

    from splitsteer.render import context_length, pad_id, pair_batch, render_pairs
    from splitsteer.scoring import capture_prefix, pair_losses
    from splitsteer.updates import SteeringUpdate

    rendered = render_pairs(tokenizer, data[:8], max_length=context_length(model))
    batch = pair_batch(rendered, pad_id(tokenizer))
    packed = pair_batch(rendered, pad_id(tokenizer), pack=True)
    inputs = batch.model_inputs()
    update = SteeringUpdate.zeros(model, "vector", layer)
    update.requires_grad_(True)
    factors = torch.full((len(batch),), 4.0)
    prefix = capture_prefix(model, batch, layer)
    packed_prefix = capture_prefix(model, packed, layer)

    def tail(prefix: Any = prefix, factors: torch.Tensor = factors) -> None:
        lp, ln = pair_losses(model, prefix, [update], factors)
        (lp.mean() + ln.mean()).backward()

    def full_with_logits() -> None:
        with torch.no_grad():
            answer_losses(model(**inputs, use_cache=False).logits, batch.labels)

    def full_layers_only() -> None:
        with torch.no_grad():
            model.model(**inputs, use_cache=False)

    def steered_full_backward() -> None:
        with update.apply(model, factors):
            losses = answer_losses(model(**inputs, use_cache=False).logits, batch.labels)
        losses.mean().backward()

    pieces = {
        "ours: capture_prefix, packed (layers 0..14, one row per pair)": lambda: capture_prefix(model, packed, layer),
        "ours: tail 15..29 forward+backward, packed, answer-only head":
            lambda: tail(packed_prefix, factors[: len(packed)]),
        "capture_prefix, unpacked (layers 0..14, two rows per pair)": lambda: capture_prefix(model, batch, layer),
        "tail 15..29 forward+backward, unpacked, answer-only head": tail,
        "full forward, full-vocab logits + answer loss (baseline reference pass)": full_with_logits,
        "full forward, no LM head": full_layers_only,
        "steered full forward + backward, full logits (baseline steered pass)": steered_full_backward,
    }
    times: dict[str, list[float]] = {name: [] for name in pieces}
    for r in range(repeats):
        for name in alternate(r, list(pieces)):
            times[name].append(timed(pieces[name])[0])
    return {"rows": len(batch), "width": int(batch.input_ids.shape[1]),
            "packed_rows": len(packed), "packed_width": int(packed.input_ids.shape[1]),
            "answer_token_share": float(batch.answer_mask.sum() / batch.attention_mask.sum()),
            "median_s": {name: median(v) for name, v in times.items()}, "runs": times}


def run(quick: bool = False) -> dict[str, Any]:
    from authors_baseline import train_split_authors

    from splitsteer.train import TrainConfig, train_update

    n_pairs, rounds = (8, 1) if quick else (32, 3)
    model, tokenizer = model_and_tokenizer()
    data = pairs("train", n_pairs)
    cfg = TrainConfig(method="split", form="vector", layer=15, epochs=1, batch_size=8, seed=0)
    w = cfg.weights

    def ours() -> Any:
        return train_update(model, tokenizer, data, cfg)

    def baseline() -> Any:
        return train_split_authors(model, tokenizer, data, form=cfg.form, layer=cfg.layer, epochs=cfg.epochs,
                                   batch_size=cfg.batch_size, lr=cfg.resolved_lr(),
                                   factors=cfg.resolved_factors(), rank=cfg.rank, seed=cfg.seed,
                                   weights=(w.lp, w.ln, w.gamma, w.theta), max_grad_norm=cfg.max_grad_norm)

    # Warm-up on two pairs (first-call costs: allocator, autograd, kernels), not measured.
    train_update(model, tokenizer, data[:2], cfg)
    train_split_authors(model, tokenizer, data[:2], lr=cfg.resolved_lr(), factors=cfg.resolved_factors())

    runs: list[dict[str, Any]] = []
    last: dict[str, Any] = {}
    for r in range(rounds):
        for which in alternate(r, ["ours", "baseline"]):
            seconds, out = timed(ours if which == "ours" else baseline)
            last[which] = out
            runs.append({"round": r, "which": which, "seconds": seconds})
            log(f"train round {r} {which}: {seconds:.1f}s final loss {out.final_loss:.4f}")
    ours_s = median([x["seconds"] for x in runs if x["which"] == "ours"])
    base_s = median([x["seconds"] for x in runs if x["which"] == "baseline"])
    ours_res, base_res = last["ours"], last["baseline"]
    ours_losses = [row["loss"] for row in ours_res.log]
    base_losses = [row["loss"] for row in base_res.log]
    rel = abs(ours_res.final_loss - base_res.final_loss) / abs(base_res.final_loss)
    vec_diff = float((ours_res.update.params["delta_b"] - base_res.params["delta_b"]).abs().max())
    ratio = base_s / ours_s
    breakdown = _breakdown(model, tokenizer, data, cfg.layer, 1 if quick else 3)
    return {
        "ours_s": ours_s,
        "baseline_s": base_s,
        "ratio": ratio,
        "target": f">= {TARGET_RATIO}x faster per epoch; final loss within {LOSS_TOLERANCE:.0%}",
        "met": bool(ratio >= TARGET_RATIO and rel <= LOSS_TOLERANCE),
        "speed_met": bool(ratio >= TARGET_RATIO),
        "loss_met": bool(rel <= LOSS_TOLERANCE),
        "runs": runs,
        "model": "smollm2-135m-instruct (30 layers, hidden 576, float32, CPU)",
        "sizes": {"pairs": n_pairs, "dataset": "power-seeking/train (first pairs)", "batch_pairs": cfg.batch_size,
                  "minibatches": len(ours_res.log), "epochs": 1, "rounds": rounds, "form": cfg.form,
                  "layer": cfg.layer, "method": "split"},
        "ours_final_loss": ours_res.final_loss,
        "baseline_final_loss": base_res.final_loss,
        "final_loss_rel_diff": rel,
        "ours_step_losses": ours_losses,
        "baseline_step_losses": base_losses,
        "max_abs_step_loss_diff": max(abs(a - b) for a, b in zip(ours_losses, base_losses)),
        "vector_max_abs_diff": vec_diff,
        "baseline_forwards_per_epoch": base_res.forwards,
        "breakdown_one_minibatch_16_rows": breakdown,
        "summary_extra": f"final loss {ours_res.final_loss:.4f} vs {base_res.final_loss:.4f} ({rel:.2%})",
    }
