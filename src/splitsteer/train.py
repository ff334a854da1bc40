"""The trainer: one loop for SPLIT, SFT and RePS, a closed form for DiffMean.

Batches are composed once from a seeded permutation and their order is reshuffled each
epoch. Fixing the composition lets the activations below the site (see
:mod:`splitsteer.scoring`) be captured once and reused across epochs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from .errors import InputError, RuntimeFailure
from .models import check_layer, final_norm, hidden_size, model_id, num_layers
from .objectives import METHODS, SplitWeights, diffmean, reps_loss, sft_loss, split_loss
from .render import Batch, context_length, pad_id, pair_batch, render_pairs
from .scoring import (
    Positions,
    Prefix,
    answer_means,
    capture_prefix,
    chunks,
    layer_output,
    pair_losses,
    row_nll,
)
from .updates import FORMS, SteeringUpdate

DEFAULT_FACTORS = {
    "vector": [2.0 * i for i in range(1, 11)],  # 2, 4, ..., 20
    "lora": [0.2 * i for i in range(1, 11)],  # 0.2, ..., 2.0
    "local_weight": [0.2 * i for i in range(1, 11)],
}
DEFAULT_LR = {"vector": 0.08, "lora": 0.01, "local_weight": 0.01}


class TrainConfig(BaseModel):
    """Everything that determines a training run (recorded in the artifact)."""

    model_config = ConfigDict(extra="forbid")
    method: str = "split"
    form: str = "vector"
    layer: int = 15
    epochs: int = Field(2, ge=1)
    lr: float | None = Field(None, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    factors: list[float] | None = None
    rank: int = Field(4, ge=1)
    seed: int = 0
    weights: SplitWeights = SplitWeights()
    bidirectional: bool = False
    positions: Positions = "all"
    max_grad_norm: float = 1.0
    cache_prefix: bool = True
    cache_budget_mib: float = 2048.0

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method '{v}' (choose from {', '.join(METHODS)})")
        return v

    @field_validator("form")
    @classmethod
    def _form(cls, v: str) -> str:
        if v not in FORMS:
            raise ValueError(f"unknown form '{v}' (choose from {', '.join(FORMS)})")
        return v

    @field_validator("factors")
    @classmethod
    def _factors(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(not math.isfinite(f) for f in v)):
            raise ValueError("factors must be a non-empty list of finite numbers")
        return v

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.form]

    def resolved_factors(self) -> list[float]:
        return self.factors if self.factors is not None else DEFAULT_FACTORS[self.form]


@dataclass
class TrainResult:
    update: SteeringUpdate
    log: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    examples: int = 0

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else float("nan")

    @property
    def final_loss(self) -> float:
        return self.log[-1]["loss"] if self.log else float("nan")


@dataclass
class _PreparedBatch:
    batch: Batch
    prefix: Prefix | None = None
    ref: tuple[torch.Tensor, torch.Tensor] | None = None


ProgressFn = Callable[[int, int, dict[str, float]], None]


def _prepare(model: nn.Module, tokenizer: Any, pairs: Sequence[Any], cfg: TrainConfig, order: list[int]) -> list[_PreparedBatch]:
    rendered = render_pairs(tokenizer, pairs, max_length=context_length(model))
    # Group pairs of similar length (after the seeded shuffle, which breaks ties) so batches
    # carry little padding; batch order is still reshuffled every epoch.
    order = sorted(order, key=lambda i: max(len(r.ids) for r in rendered[i]))
    return [
        _PreparedBatch(pair_batch([rendered[i] for i in idx], pad_id(tokenizer)))
        for idx in chunks(order, cfg.batch_size)
    ]


def _prefix_for(model: nn.Module, prepared: _PreparedBatch, cfg: TrainConfig, budget: list[float]) -> Prefix:
    """The batch's captured prefix, kept while it fits in the cache budget (MiB)."""
    if prepared.prefix is not None:
        return prepared.prefix
    prefix = capture_prefix(model, prepared.batch, cfg.layer, keep_base=cfg.method == "reps" and prepared.ref is None)
    if prefix.base_final is not None:
        with torch.no_grad():
            ref = row_nll(model, final_norm(model)(prefix.base_final), prepared.batch.labels)
        prepared.ref = (ref[0::2].detach(), ref[1::2].detach())  # reference losses never change
        prefix.base_final = None
    size = prefix.nbytes() / 2**20
    if cfg.cache_prefix and size <= budget[0]:
        budget[0] -= size
        prepared.prefix = prefix
    return prefix


def _step_loss(model: nn.Module, update: SteeringUpdate, prefix: Prefix, prepared: _PreparedBatch,
               m: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective for one batch given per-pair factors ``m``."""
    rows = m.repeat_interleave(2)  # both answers of a pair under the same factor
    if cfg.method == "split":
        lp, ln = pair_losses(model, prefix, [update], rows, positions=cfg.positions)
        return split_loss(lp[0], ln[0], cfg.weights)
    if cfg.method == "sft":
        if cfg.bidirectional:
            signed = torch.stack([m, -m], dim=1).flatten()  # positive at +m, negative at −m
            lp, ln = pair_losses(model, prefix, [update], signed, positions=cfg.positions)
            return sft_loss(lp[0], ln[0])
        lp, _ = pair_losses(model, prefix, [update], rows, positions=cfg.positions)
        return sft_loss(lp[0])
    assert prepared.ref is not None
    both = torch.cat([rows, -rows])  # one forward for +m and −m
    lp, ln = pair_losses(model, prefix, [update], both, positions=cfg.positions)
    return reps_loss(lp[0], ln[0], lp[1], ln[1], *prepared.ref)


def train_update(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[Any],
    config: TrainConfig | None = None,
    *,
    progress: ProgressFn | None = None,
    data_fingerprint: str | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train a steering update on polarity pairs; see :class:`TrainConfig` for options."""
    cfg = (config or TrainConfig()).model_copy(update=overrides) if overrides else (config or TrainConfig())
    cfg = TrainConfig.model_validate(cfg.model_dump())
    if not len(pairs):
        raise InputError("training data is empty")
    cfg.layer = check_layer(model, cfg.layer)
    if cfg.method == "diffmean" and cfg.form != "vector":
        raise InputError(f"--method diffmean has a closed form for --form vector only, not {cfg.form}")
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(cfg.seed)
    update = SteeringUpdate.zeros(model, cfg.form, cfg.layer, rank=cfg.rank, generator=generator)
    update.meta.update(
        base_model=model_id(model),
        hidden_size=hidden_size(model),
        num_layers=num_layers(model),
        method=cfg.method,
        hyperparameters=cfg.model_dump(),
        data_fingerprint=data_fingerprint,
        n_pairs=len(pairs),
    )
    order = torch.randperm(len(pairs), generator=generator).tolist()
    prepared = _prepare(model, tokenizer, pairs, cfg, order)
    if cfg.method == "diffmean":
        update.params["delta_b"] = _diffmean_vector(model, prepared, cfg.layer)
        seconds = time.perf_counter() - started
        return TrainResult(update, [], seconds, len(pairs))
    return _optimise(model, update, prepared, cfg, generator, started, progress)


def _diffmean_vector(model: nn.Module, prepared: list[_PreparedBatch], layer: int) -> torch.Tensor:
    pos, neg = [], []
    for item in prepared:
        means = answer_means(layer_output(model, item.batch, layer), item.batch.answer_mask)
        pos.append(means[0::2])
        neg.append(means[1::2])
    return diffmean(torch.cat(pos), torch.cat(neg)).float().cpu()


def _optimise(model: nn.Module, update: SteeringUpdate, prepared: list[_PreparedBatch], cfg: TrainConfig,
              generator: torch.Generator, started: float, progress: ProgressFn | None) -> TrainResult:
    update.requires_grad_(True)
    optimizer = torch.optim.AdamW(update.parameters(), lr=cfg.resolved_lr(), weight_decay=0.0)
    steps = math.ceil(len(prepared) / cfg.grad_accum) * cfg.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / max(steps, 1)))
    factor_set = torch.tensor(cfg.resolved_factors())
    budget = [cfg.cache_budget_mib]
    log: list[dict[str, float]] = []
    examples, step = 0, 0
    pending: list[float] = []
    last_good = update.detach()
    for epoch in range(cfg.epochs):
        batch_order = torch.randperm(len(prepared), generator=generator).tolist()
        for position, index in enumerate(batch_order):
            item = prepared[index]
            prefix = _prefix_for(model, item, cfg, budget)
            n_pairs = len(item.batch) // 2
            m = factor_set[torch.randint(len(factor_set), (n_pairs,), generator=generator)]
            loss, terms = _step_loss(model, update, prefix, item, m, cfg)
            if not torch.isfinite(loss.detach()):
                update.params.update(last_good.params)
                raise RuntimeFailure(f"loss became {float(loss)} at epoch {epoch + 1}, step {step + 1}; "
                                     "try a lower --lr (the last good update was kept)")
            (loss / cfg.grad_accum).backward()
            pending.append(float(loss.detach()))
            examples += n_pairs
            if (position + 1) % cfg.grad_accum == 0 or position + 1 == len(batch_order):
                grad_norm = torch.nn.utils.clip_grad_norm_(update.parameters(), cfg.max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                row = {"step": step, "epoch": epoch + 1, "loss": sum(pending) / len(pending), "lr": schedule.get_last_lr()[0],
                       "grad_norm": float(grad_norm), **{k: float(v.detach()) for k, v in terms.items()}}
                log.append(row)
                pending.clear()
                if progress is not None:
                    progress(step, steps, row)
        if all(torch.isfinite(p).all() for p in update.parameters()):
            last_good = update.detach()
    update.requires_grad_(False)
    final = update.detach()
    return TrainResult(final, log, time.perf_counter() - started, examples)


def train(model: nn.Module, tokenizer: Any, pairs: Sequence[Any], **options: Any) -> SteeringUpdate:
    """Train and return the update (``train_update`` also returns the log and timings)."""
    fingerprint = pairs.fingerprint() if hasattr(pairs, "fingerprint") else None
    return train_update(model, tokenizer, pairs, data_fingerprint=fingerprint, **options).update
