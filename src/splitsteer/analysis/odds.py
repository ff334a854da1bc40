"""Preference and utility log-odds of a steering sweep, and the sweep.json payload.

Per pair (a prompt with a concept-positive and a concept-negative answer) the sweep records the
answer cross-entropies ``Lp`` and ``Ln`` (nats, mean per token or summed) at each steering factor m.
Following "Why Steering Works" the two quantities tracked along m are

* ``PrefOdds = Ln - Lp``: how much more the model likes the positive answer than the negative one;
* ``UtilOdds = log((e^-Lp + e^-Ln) / (1 - e^-Lp - e^-Ln))``: the log-odds that the model produces
  either answer at all, i.e. whether it still answers the prompt coherently.

UtilOdds only exists while ``e^-Lp + e^-Ln < 1``. With summed losses that always holds (two disjoint
events), but mean-per-token losses are not probabilities of whole answers and can break it. The raw
functions then return NaN; :func:`summarize` turns every undefined value into ``None`` and counts it,
so the JSON it produces is strict.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from splitsteer.errors import InputError

Aggregate = Literal["mean_of_odds", "odds_of_means"]
AGGREGATES: tuple[Aggregate, ...] = ("mean_of_odds", "odds_of_means")

UNDEFINED_RULE = (
    "UtilOdds is undefined where exp(-Lp) + exp(-Ln) >= 1 and is written as null; mean_of_odds "
    "excludes those pairs from the mean at that factor (null if no pair is left); odds_of_means is "
    "null where the mean losses themselves break the condition"
)


def pref_odds(lp: np.ndarray, ln: np.ndarray) -> np.ndarray:
    """PrefOdds = Ln - Lp, elementwise (log of P(positive)/P(negative) for summed losses)."""
    lp_arr, ln_arr = _as_float_arrays(lp, ln)
    return ln_arr - lp_arr


def _log_either(lp: np.ndarray, ln: np.ndarray) -> np.ndarray:
    """log(e^-Lp + e^-Ln) via logaddexp, so large losses neither underflow to log(0) nor overflow."""
    return np.logaddexp(-lp, -ln)


def _log1mexp(s: np.ndarray) -> np.ndarray:
    """log(1 - e^s) for s < 0, switching formulas at -log 2 so both ends keep full precision.

    Near 0, ``1 - e^s`` cancels catastrophically, so ``log(-expm1(s))`` is used; far below 0,
    ``e^s`` is tiny and ``log1p(-exp(s))`` is the accurate form (Maechler 2012).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        near_zero = np.log(-np.expm1(s))
        far = np.log1p(-np.exp(s))
    return np.where(s > -np.log(2.0), near_zero, far)


def util_defined(lp: np.ndarray, ln: np.ndarray) -> np.ndarray:
    """Boolean mask of where UtilOdds exists, i.e. e^-Lp + e^-Ln < 1 (decided in log space)."""
    lp_arr, ln_arr = _as_float_arrays(lp, ln)
    return _log_either(lp_arr, ln_arr) < 0.0


def util_odds(lp: np.ndarray, ln: np.ndarray) -> np.ndarray:
    """UtilOdds = log((e^-Lp + e^-Ln) / (1 - e^-Lp - e^-Ln)), elementwise; NaN where undefined.

    Computed as ``s - log(1 - e^s)`` with ``s = logaddexp(-Lp, -Ln)``, which stays finite and
    accurate for losses of any size (for large L it tends to ``s``, never ``log(0)``).
    """
    lp_arr, ln_arr = _as_float_arrays(lp, ln)
    s = _log_either(lp_arr, ln_arr)
    defined = s < 0.0
    safe_s = np.where(defined, s, -1.0)
    return np.where(defined, safe_s - _log1mexp(safe_s), np.nan)


@dataclass
class OddsSummary:
    """Per-factor aggregates of a sweep plus the per-pair values they come from.

    Every float list may hold ``None`` where UtilOdds is undefined (see ``undefined_rule``); no NaN
    is ever stored, so ``json.dumps(asdict(summary), allow_nan=False)`` always works.
    """

    factors: list[float]
    pref_odds: list[float | None]
    util_odds: list[float | None]
    lp: list[float]
    ln: list[float]
    per_pair: dict[str, list[list[float | None]]]
    n_pairs: int
    n_util_undefined: int
    n_util_undefined_per_factor: list[int]
    aggregate: Aggregate
    mean_of_odds: dict[str, list[float | None]]
    odds_of_means: dict[str, list[float | None]]
    util_undefined_rule: str = UNDEFINED_RULE

    def to_dict(self) -> dict:
        """The sweep.json payload (plain lists, ints, floats and None only)."""
        return asdict(self)


def summarize(
    factors: Sequence[float] | np.ndarray,
    lp: np.ndarray,
    ln: np.ndarray,
    aggregate: Aggregate = "odds_of_means",
) -> dict:
    """Aggregate a sweep's losses (shape ``(n_factors, n_pairs)``) into the sweep.json payload.

    Two per-factor aggregates are reported, and ``aggregate`` picks which one fills the top-level
    ``pref_odds``/``util_odds``:

    * ``odds_of_means`` (default): average Lp and Ln over pairs first, then apply the odds
      formulas. This is what the paper plots (odds of the mean losses), it uses every pair, and it
      is defined whenever the *mean* losses keep e^-Lp + e^-Ln < 1; by Jensen's inequality
      e^-mean(L) <= mean(e^-L), so it survives individual pairs that break the condition.
    * ``mean_of_odds``: apply the formulas per pair, then average. Pairs whose UtilOdds is
      undefined are *excluded* from the mean at that factor (the mean is over the remaining
      pairs, and ``null`` if none remain). Because excluded pairs are exactly the confident ones,
      this mean is biased low whenever exclusions happen, one more reason it is not the default.

    PrefOdds is linear in the losses, so both aggregates give the same PrefOdds; they differ only
    in UtilOdds.
    """
    if aggregate not in AGGREGATES:
        raise InputError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    factor_arr = np.asarray(factors, dtype=float)
    lp_arr, ln_arr = _checked_losses(lp, ln, factor_arr)

    pref = pref_odds(lp_arr, ln_arr)
    util = util_odds(lp_arr, ln_arr)
    undefined = ~util_defined(lp_arr, ln_arr)

    mean_lp = lp_arr.mean(axis=1)
    mean_ln = ln_arr.mean(axis=1)
    mean_of = {"pref_odds": _to_list(pref.mean(axis=1)), "util_odds": _to_list(_mean_defined(util))}
    of_means = {
        "pref_odds": _to_list(pref_odds(mean_lp, mean_ln)),
        "util_odds": _to_list(util_odds(mean_lp, mean_ln)),
    }
    chosen = of_means if aggregate == "odds_of_means" else mean_of
    summary = OddsSummary(
        factors=[float(f) for f in factor_arr],
        pref_odds=list(chosen["pref_odds"]),
        util_odds=list(chosen["util_odds"]),
        lp=[float(v) for v in mean_lp],
        ln=[float(v) for v in mean_ln],
        per_pair={
            "lp": [_to_list(row) for row in lp_arr],
            "ln": [_to_list(row) for row in ln_arr],
            "pref_odds": [_to_list(row) for row in pref],
            "util_odds": [_to_list(row) for row in util],
        },
        n_pairs=int(lp_arr.shape[1]),
        n_util_undefined=int(undefined.sum()),
        n_util_undefined_per_factor=[int(c) for c in undefined.sum(axis=1)],
        aggregate=aggregate,
        mean_of_odds=mean_of,
        odds_of_means=of_means,
    )
    return summary.to_dict()


def _mean_defined(values: np.ndarray) -> np.ndarray:
    """Row means over the non-NaN entries; NaN for a row with none (no RuntimeWarning)."""
    defined = ~np.isnan(values)
    counts = defined.sum(axis=1)
    totals = np.where(defined, values, 0.0).sum(axis=1)
    return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)


def _to_list(values: np.ndarray) -> list[float | None]:
    """Plain floats for JSON, with None where a value is NaN (undefined)."""
    return [None if np.isnan(v) else float(v) for v in np.asarray(values, dtype=float).ravel()]


def _as_float_arrays(lp: np.ndarray, ln: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float arrays of a common shape; mismatched shapes are a user error, not a broadcast."""
    lp_arr = np.asarray(lp, dtype=float)
    ln_arr = np.asarray(ln, dtype=float)
    if lp_arr.shape != ln_arr.shape:
        raise InputError(f"lp and ln must have the same shape, got {lp_arr.shape} and {ln_arr.shape}")
    return lp_arr, ln_arr


def _checked_losses(lp: np.ndarray, ln: np.ndarray, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a sweep: 1-D finite factors, (n_factors, n_pairs) finite losses, at least one pair."""
    if factors.ndim != 1 or factors.size == 0:
        raise InputError("factors must be a non-empty 1-D sequence")
    if not np.all(np.isfinite(factors)):
        raise InputError("factors must be finite numbers")
    lp_arr, ln_arr = _as_float_arrays(lp, ln)
    if lp_arr.ndim != 2 or lp_arr.shape[0] != factors.size or lp_arr.shape[1] == 0:
        raise InputError(
            f"lp and ln must have shape (n_factors={factors.size}, n_pairs>=1), got {lp_arr.shape}"
        )
    if not (np.all(np.isfinite(lp_arr)) and np.all(np.isfinite(ln_arr))):
        raise InputError("lp and ln must be finite (a NaN/inf loss means the sweep itself failed)")
    return lp_arr, ln_arr
