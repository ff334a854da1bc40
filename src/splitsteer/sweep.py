"""Sweeps of the steering factor: per-pair Lp and Ln at every factor, and their odds.

All factors of a batch of pairs run as one tail forward with a per-row factor, on the
activations below the site captured once per batch (:mod:`splitsteer.scoring`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .analysis.odds import summarize
from .errors import InputError
from .render import TruncationPolicy, context_length, pad_id, pair_batch, render_pairs, row_width
from .scoring import Positions, Reduction, can_pack, capture_prefix, chunks, pair_losses, row_factors
from .updates import SteeringUpdate

#: The most factors a range may ask for (a typo like 0:1:1e9 must not exhaust memory).
MAX_FACTORS = 10_000
_RANGE = re.compile(r"^\s*(-?[\d.eE+-]+)\s*:\s*(-?[\d.eE+-]+)\s*:\s*(\d+)\s*$")


def parse_factors(spec: str | Sequence[float], *, include_zero: bool = True) -> list[float]:
    """Parse ``--factors``: a list ``-4,-2,0,2,4`` or a range ``start:stop:count``.

    The result is sorted, de-duplicated and (by default) always contains 0.
    """
    if isinstance(spec, str):
        text = spec.strip()
        match = _RANGE.match(text)
        try:
            if match:
                start, stop, count = float(match[1]), float(match[2]), int(match[3])
                if count < 1:
                    raise ValueError
                if count > MAX_FACTORS:
                    raise InputError(f"--factors: a range of {count} factors; at most {MAX_FACTORS}")
                values = [float(v) for v in np.linspace(start, stop, count)] if count > 1 else [start]
            elif ":" in text:
                raise ValueError
            else:
                values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise InputError(f"--factors: cannot parse {spec!r} (use '-4,-2,0,2,4' or 'start:stop:count')") from None
    else:
        values = [float(v) for v in spec]
    if not values:
        raise InputError(f"--factors: {spec!r} gives no factors")
    if any(not math.isfinite(v) for v in values):
        raise InputError(f"--factors: {spec!r} holds a value that is not a finite number")
    if include_zero:
        values.append(0.0)
    return sorted({round(v, 10) + 0.0 for v in values})


def sweep_losses(
    model: nn.Module,
    tokenizer: Any,
    updates: Sequence[SteeringUpdate],
    pairs: Sequence[Any],
    factor_list: Sequence[float],
    *,
    batch_size: int = 8,
    max_rows: int = 128,
    reduction: Reduction = "mean",
    positions: Positions = "all",
    progress: Callable[[int], None] | None = None,
    truncation: TruncationPolicy = "error",
    pack: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Lp and Ln of shape (factors, pairs). ``max_rows`` bounds rows per tail forward;
    ``truncation`` is the policy for pairs longer than the model context (see ``render``);
    ``pack`` computes each pair's shared prompt once (see ``render.Packing``) where the
    model allows it."""
    if not len(pairs):
        raise InputError("sweep data is empty")
    start = min(u.layer for u in updates) if updates else 0
    rendered = render_pairs(tokenizer, pairs, max_length=context_length(model), truncation=truncation)
    lp_out = np.zeros((len(factor_list), len(pairs)))
    ln_out = np.zeros_like(lp_out)
    # Batches of similar lengths waste far less on padding (35% → 10% on BiPO's prompts).
    pack = pack and can_pack(model, rendered)
    order = sorted(range(len(rendered)), key=lambda i: row_width(rendered[i], pack))
    for indices in chunks(order, batch_size):
        group = [rendered[i] for i in indices]
        batch = pair_batch(group, pad_id(tokenizer), pack=pack)
        prefix = capture_prefix(model, batch, start)
        per_call = max(1, max_rows // len(batch))
        for offset in range(0, len(factor_list), per_call):
            chunk = list(factor_list[offset : offset + per_call])
            with torch.no_grad():
                lp, ln = pair_losses(model, prefix, updates, row_factors(batch, chunk),
                                     reduction=reduction, positions=positions)
            lp_out[offset : offset + len(chunk), list(indices)] = lp.cpu().numpy()
            ln_out[offset : offset + len(chunk), list(indices)] = ln.cpu().numpy()
        if progress is not None:
            progress(len(group))
    return lp_out, ln_out


def sweep(
    model: nn.Module,
    tokenizer: Any,
    update: SteeringUpdate | Sequence[SteeringUpdate],
    pairs: Sequence[Any],
    factors: Sequence[float] | str = "-20:20:21",
    **options: Any,
) -> dict[str, Any]:
    """Sweep ``update`` over ``factors`` on ``pairs``; returns the ``sweep.json`` payload."""
    factor_list = parse_factors(factors)
    updates = [update] if isinstance(update, SteeringUpdate) else list(update)
    lp, ln = sweep_losses(model, tokenizer, updates, pairs, factor_list, **options)
    result = summarize(factor_list, lp, ln)
    result["reduction"] = options.get("reduction", "mean")
    result["positions"] = options.get("positions", "all")
    result["truncation"] = options.get("truncation", "error")
    return result
