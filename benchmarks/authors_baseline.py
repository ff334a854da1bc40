"""The SPLIT authors' training pass structure, re-implemented with plain torch + Hugging Face.

This is the baseline of the ``train`` benchmark. It reproduces how the authors' code spends
compute, not a shortcut of it. Per minibatch:

1. two *reference* forwards of the unsteered model, one over the positive answers and one
   over the negative answers (no grad), every minibatch;
2. a steered forward over the positive answers and a separate steered forward over the
   negative answers, each a full forward of the whole model;
3. the steering intervention is a generic hook on the MLP of the site layer that recomputes
   the down-projection's input ``act(gate(x)) * up(x)`` from the MLP input, as the authors'
   intervention module does for every form; the vector form then adds ``m·v`` to the output
   of the site layer (LoRA / local weight add ``m·(z·ΔWᵀ + Δb)`` to the MLP output, ``z``
   being the recomputed input of the down-projection);
4. full-vocabulary logits at every position, then the cross-entropy on answer tokens only;
5. the SPLIT loss, backward, gradient clipping, AdamW, linear decay.

Everything that decides the numbers is made identical to splitsteer's trainer so that the
final losses can be compared: the same token ids (the rows come from
``splitsteer.render.render_pairs``, the only splitsteer code used here, and its cost is paid
on both sides), the same initialisation, and the same random stream consumed in the same
order (``torch.Generator`` seeded with ``seed``: LoRA's A (LoRA only), the pair permutation
that composes the batches (then grouped by length, as splitsteer does), a batch order per
epoch, and per batch one factor index per pair; both answers of a pair share the factor, as
in splitsteer), the same SPLIT weights, AdamW
(``weight_decay=0``), learning rate, linear schedule and clipping.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


@dataclass
class BaselineResult:
    params: dict[str, torch.Tensor]
    log: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    forwards: int = 0

    @property
    def final_loss(self) -> float:
        return self.log[-1]["loss"] if self.log else float("nan")


def _collate(rows: Sequence[Any], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and labels on the answer tokens only."""
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.ids)] = torch.tensor(r.ids)
        mask[i, : len(r.ids)] = 1
        labels[i, r.prompt_len : len(r.ids)] = torch.tensor(r.ids[r.prompt_len :])
    return ids, mask, labels


def answer_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over each row's answer tokens, from full logits at every position."""
    shifted, targets = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                          ignore_index=IGNORE, reduction="none").view(targets.shape)
    counts = (targets != IGNORE).sum(1).clamp(min=1)
    return nll.sum(1) / counts


class Intervention:
    """The authors' generic intervention at layer ``layer``: hooks live for the whole run and
    steer whenever a per-row factor is set."""

    def __init__(self, model: nn.Module, layer: int, form: str, params: dict[str, torch.Tensor]) -> None:
        self.form, self.params = form, params
        self.factor: torch.Tensor | None = None
        block = model.model.layers[layer]
        self.mlp = block.mlp
        self.handles = [self.mlp.register_forward_hook(self._on_mlp)]
        if form == "vector":
            self.handles.append(block.register_forward_hook(self._on_layer))

    def _m(self, like: torch.Tensor) -> torch.Tensor:
        assert self.factor is not None
        return self.factor.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def _on_mlp(self, _module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        if self.factor is None:
            return None
        x = args[0]
        mlp = self.mlp
        z = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # the down-projection's input, again
        if self.form == "vector":
            self.last_site_input = z  # the vector form steers at the layer output instead
            return None
        p = self.params
        if self.form == "lora":
            delta = (z @ p["lora_a"].T) @ p["lora_b"].T
        else:
            delta = z @ p["delta_w"].T + p["delta_b"]
        return output + self._m(output) * delta

    def _on_layer(self, _module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
        if self.factor is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        steered = hidden + self._m(hidden) * self.params["delta_b"]
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _init_params(model: nn.Module, form: str, layer: int, rank: int,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
    hidden = model.get_input_embeddings().weight.shape[1]
    down = model.model.layers[layer].mlp.down_proj
    out_f, in_f = down.weight.shape
    if form == "vector":
        return {"delta_b": torch.zeros(hidden)}
    if form == "lora":
        a = torch.randn(rank, in_f, generator=generator) * in_f**-0.5
        return {"lora_a": a, "lora_b": torch.zeros(out_f, rank)}
    return {"delta_w": torch.zeros(out_f, in_f), "delta_b": torch.zeros(out_f)}


def train_split_authors(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[Any],
    *,
    form: str = "vector",
    layer: int = 15,
    epochs: int = 1,
    batch_size: int = 8,
    lr: float,
    factors: Sequence[float],
    rank: int = 4,
    seed: int = 0,
    weights: tuple[float, float, float, float] = (1.0, 0.5, 5.0, 0.4),
    max_grad_norm: float = 1.0,
) -> BaselineResult:
    """SPLIT with the authors' pass structure; ``weights`` = (λp, λn, γ, θ)."""
    from splitsteer.render import render_pairs, row_width  # identical token ids and batches on both sides

    started = time.perf_counter()
    lam_p, lam_n, gamma, theta = weights
    generator = torch.Generator().manual_seed(seed)
    params = _init_params(model, form, layer, rank, generator)
    for tensor in params.values():
        tensor.requires_grad_(True)
    order = torch.randperm(len(pairs), generator=generator).tolist()
    limit = getattr(model.config, "max_position_embeddings", None)
    rendered = render_pairs(tokenizer, pairs, max_length=limit)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # splitsteer groups pairs of similar length after the seeded shuffle (a stable sort on the
    # width of the row holding the prompt and both answers); the same composition here, so the
    # same pairs meet the same factors. This is the only place where the baseline follows a
    # splitsteer convention that the authors' code does not have: without it the two runs
    # would not see the same batches.
    order = sorted(order, key=lambda i: row_width(rendered[i], packed=True))
    batches = []
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        batches.append((_collate([rendered[j][0] for j in idx], pad), _collate([rendered[j][1] for j in idx], pad)))
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    steps = len(batches) * epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / max(steps, 1)))
    factor_set = torch.tensor(list(factors))
    intervention = Intervention(model, layer, form, params)
    result = BaselineResult(params={})
    step = 0
    try:
        for epoch in range(epochs):
            batch_order = torch.randperm(len(batches), generator=generator).tolist()
            for index in batch_order:
                (pos_ids, pos_mask, pos_labels), (neg_ids, neg_mask, neg_labels) = batches[index]
                m = factor_set[torch.randint(len(factor_set), (pos_ids.shape[0],), generator=generator)]
                # 1. unsteered references, every minibatch (no grad)
                intervention.factor = None
                with torch.no_grad():
                    ref_lp = answer_losses(model(input_ids=pos_ids, attention_mask=pos_mask,
                                                 use_cache=False).logits, pos_labels)
                    ref_ln = answer_losses(model(input_ids=neg_ids, attention_mask=neg_mask,
                                                 use_cache=False).logits, neg_labels)
                # 2. steered positive and negative forwards, separately, full model, full logits
                intervention.factor = m
                lp = answer_losses(model(input_ids=pos_ids, attention_mask=pos_mask, use_cache=False).logits,
                                   pos_labels)
                ln = answer_losses(model(input_ids=neg_ids, attention_mask=neg_mask, use_cache=False).logits,
                                   neg_labels)
                intervention.factor = None
                result.forwards += 4
                margin = ln - lp
                loss = (lam_p * lp + lam_n * ln + gamma * F.relu(theta - margin)).mean()
                if not math.isfinite(float(loss.detach())):
                    raise RuntimeError(f"baseline loss became {float(loss)}")
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                result.log.append({"step": step, "epoch": epoch + 1, "loss": float(loss.detach()),
                                   "lp": float(lp.detach().mean()), "ln": float(ln.detach().mean()),
                                   "ref_lp": float(ref_lp.mean()), "ref_ln": float(ref_ln.mean()),
                                   "grad_norm": float(grad_norm), "lr": schedule.get_last_lr()[0]})
    finally:
        intervention.remove()
    result.params = {k: v.detach().clone() for k, v in params.items()}
    result.seconds = time.perf_counter() - started
    return result
