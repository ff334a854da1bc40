"""The paper's validity-decay fit of PrefOdds and UtilOdds along the steering factor m.

"Why Steering Works" models both log-odds curves of a sweep with a piecewise rational-quadratic
decay, one branch per sign of m::

    D(m) = (1 + (m - m_+)^2 / L_+)^(-p_+)    for m >= 0
    D(m) = (1 + (m - m_-)^2 / L_-)^(-p_-)    for m <  0

    PrefOdds(m) = (alpha * m + beta) * D_p(m) + b
    UtilOdds(m) = beta_u * D_u(m) + b_u

Each curve has its own D. The two branches must meet at 0 (otherwise the fitted curve jumps at
the unsteered model), i.e. ``p_+ log(1 + m_+^2/L_+) = p_- log(1 + m_-^2/L_-)``, which is imposed
as an equality constraint in SLSQP.

The regions, breakdown points and recommended factor are this library's conventions (the paper
names regions informally but defines no thresholds):

* they are read off the utility's D_u, because "validity" is about the model still answering at
  all; only when the fitted UtilOdds is flat over the sweep (D_u then has no identifiable shape)
  is the preference's D_p used. ``regions["source"]`` and ``breakdown["source"]`` say which;
* per side of 0: linear where D >= 0.9, transitional where 0.5 <= D < 0.9, convergence where
  D < 0.5; the breakdown factor is where D = 0.5 moving away from that branch's peak
  (:func:`breakdown_points`, closed form);
* the recommended factor maximises predicted PrefOdds subject to predicted UtilOdds staying
  within ``max_util_drop`` nats of UtilOdds(0) (:func:`recommend_factor`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize

from splitsteer.atomic import write_png
from splitsteer.errors import InputError, RuntimeFailure

DECAY_NAMES = ("m_pos", "L_pos", "p_pos", "m_neg", "L_neg", "p_neg")
PREF_NAMES = ("alpha", "beta", "b", *DECAY_NAMES)
UTIL_NAMES = ("beta_u", "b_u", *DECAY_NAMES)

LINEAR_THRESHOLD = 0.9
BREAKDOWN_THRESHOLD = 0.5
P_BOUNDS = (0.05, 10.0)
L_BOUNDS_REL = (1e-3, 1e2)  # times R^2, R = max |m|
AMPLITUDE_MULTIPLE = 10.0
RECOMMEND_GRID = 2001

Factors = Sequence[float] | np.ndarray
Values = Sequence[float | None] | np.ndarray  # None/NaN = undefined at that factor


# ----------------------------------------------------------------------------- model


def decay(m: ArrayLike, params: dict[str, float]) -> np.ndarray:
    """D(m) of one curve: the + branch for m >= 0, the - branch for m < 0."""
    m_arr = np.asarray(m, dtype=float)
    pos = _branch(m_arr, params["m_pos"], params["L_pos"], params["p_pos"])
    neg = _branch(m_arr, params["m_neg"], params["L_neg"], params["p_neg"])
    return np.where(m_arr >= 0.0, pos, neg)


def _branch(m: np.ndarray, center: float, width: float, power: float) -> np.ndarray:
    """One rational-quadratic branch, computed as exp(-p log1p(u)) so tiny L cannot overflow."""
    return np.exp(-power * np.log1p((m - center) ** 2 / width))


def predict_curve(m: ArrayLike, params: dict[str, float]) -> np.ndarray:
    """Evaluate PrefOdds (params with ``alpha``) or UtilOdds (params with ``beta_u``) at m."""
    m_arr = np.asarray(m, dtype=float)
    d = decay(m_arr, params)
    if "alpha" in params:
        return (params["alpha"] * m_arr + params["beta"]) * d + params["b"]
    return params["beta_u"] * d + params["b_u"]


def continuity_gap(params: dict[str, float]) -> float:
    """D(0+) - D(0-); zero for a valid fit."""
    pos = _branch(np.array(0.0), params["m_pos"], params["L_pos"], params["p_pos"])
    neg = _branch(np.array(0.0), params["m_neg"], params["L_neg"], params["p_neg"])
    return float(pos - neg)


@dataclass
class CurveFit:
    """One fitted curve. ``k`` counts free parameters (raw parameters minus the constraint).

    ``r2``/``adj_r2`` are None when the data have no variance (R^2 undefined) or, for adj_r2,
    when n - k - 1 <= 0.
    """

    params: dict[str, float]
    r2: float | None
    adj_r2: float | None
    rss: float
    n: int
    k: int

    def predict(self, m: ArrayLike) -> np.ndarray:
        """Fitted log-odds at m."""
        return predict_curve(m, self.params)

    def decay(self, m: ArrayLike) -> np.ndarray:
        """This curve's D(m)."""
        return decay(m, self.params)

    def to_dict(self) -> dict:
        return {
            "params": {k: float(v) for k, v in self.params.items()},
            "r2": self.r2,
            "adj_r2": self.adj_r2,
            "rss": float(self.rss),
            "n": self.n,
            "k": self.k,
        }


@dataclass
class DecayFit:
    """Both fitted curves plus the derived regions, breakdown points and recommended factor."""

    preference: CurveFit
    utility: CurveFit
    regions: dict
    breakdown: dict
    recommended: dict
    factor_range: tuple[float, float] = field(default=(0.0, 0.0))

    @property
    def recommended_factor(self) -> float:
        return float(self.recommended["factor"])

    def to_dict(self) -> dict:
        """The fit.json payload (strict JSON: no NaN/inf, only None)."""
        return {
            "preference": self.preference.to_dict(),
            "utility": self.utility.to_dict(),
            "factor_range": [float(self.factor_range[0]), float(self.factor_range[1])],
            "breakdown": self.breakdown,
            "regions": self.regions,
            "recommended_factor": self.recommended["factor"],
            "recommended": self.recommended,
        }


# ----------------------------------------------------------------------------- statistics


def r_squared(y: np.ndarray, y_hat: np.ndarray) -> float | None:
    """1 - RSS/SST; None when SST is 0 (constant data: R^2 is undefined)."""
    sst = float(np.sum((y - np.mean(y)) ** 2))
    if sst == 0.0:
        return None
    return 1.0 - float(np.sum((y - y_hat) ** 2)) / sst


def adjusted_r_squared(r2: float | None, n: int, k: int) -> float | None:
    """1 - (1 - R^2)(n - 1)/(n - k - 1); None when n - k - 1 <= 0 or R^2 is undefined."""
    if r2 is None or n - k - 1 <= 0:
        return None
    return 1.0 - (1.0 - r2) * (n - 1) / (n - k - 1)


# ----------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class _Problem:
    """A curve's data in scaled units: x = m/R, L in units of R^2, amplitudes bounded by A."""

    x: np.ndarray
    y: np.ndarray
    scale: float  # R
    n_linear: int  # 3 for preference (a, beta, b), 2 for utility (beta_u, b_u)
    amplitude: float  # A
    sst: float

    @property
    def bounds(self) -> list[tuple[float, float]]:
        lin = [(-self.amplitude, self.amplitude)] * self.n_linear
        x_lo, x_hi = float(self.x.min()), float(self.x.max())
        log_l = (math.log(L_BOUNDS_REL[0]), math.log(L_BOUNDS_REL[1]))
        side = [(x_lo, x_hi), log_l, P_BOUNDS]
        return lin + side + side


def _make_problem(m: np.ndarray, y: np.ndarray, n_linear: int, scale: float) -> _Problem:
    spread = float(np.ptp(y))
    magnitude = max(spread, float(np.max(np.abs(y))), 1e-6)
    sst = float(np.sum((y - y.mean()) ** 2))
    return _Problem(m / scale, y, scale, n_linear, AMPLITUDE_MULTIPLE * magnitude, sst)


def _branch_terms(x: np.ndarray, c: float, log_l: float, p: float) -> tuple[np.ndarray, ...]:
    """D on one branch and its derivatives with respect to (c, log L, p)."""
    inv_l = math.exp(-log_l)
    diff = x - c
    u = diff * diff * inv_l
    log1pu = np.log1p(u)
    d = np.exp(-p * log1pu)
    dd_dc = p * d / (1.0 + u) * 2.0 * diff * inv_l
    dd_dlogl = p * d * u / (1.0 + u)
    dd_dp = -log1pu * d
    return d, dd_dc, dd_dlogl, dd_dp


def _model_and_jacobian(theta: np.ndarray, prob: _Problem) -> tuple[np.ndarray, np.ndarray]:
    """Model values and d(model)/d(theta) in scaled units (analytic, for an accurate SLSQP)."""
    x = prob.x
    nl = prob.n_linear
    pos = x >= 0.0
    d_pos = _branch_terms(x, *theta[nl : nl + 3])
    d_neg = _branch_terms(x, *theta[nl + 3 : nl + 6])
    d = np.where(pos, d_pos[0], d_neg[0])
    jac = np.zeros((x.size, theta.size))
    if nl == 3:
        a, beta, b = theta[:3]
        gain = a * x + beta
        model = gain * d + b
        jac[:, 0] = x * d
        jac[:, 1] = d
        jac[:, 2] = 1.0
    else:
        beta, b = theta[:2]
        gain = np.full_like(x, beta)
        model = beta * d + b
        jac[:, 0] = d
        jac[:, 1] = 1.0
    for j in range(3):
        jac[:, nl + j] = np.where(pos, gain * d_pos[j + 1], 0.0)
        jac[:, nl + 3 + j] = np.where(pos, 0.0, gain * d_neg[j + 1])
    return model, jac


def _objective(theta: np.ndarray, prob: _Problem) -> tuple[float, np.ndarray]:
    """RSS / SST (i.e. 1 - R^2) and its gradient; normalised so SLSQP's ftol means the same for all data."""
    model, jac = _model_and_jacobian(theta, prob)
    resid = model - prob.y
    norm = prob.sst if prob.sst > 0.0 else 1.0
    return float(resid @ resid) / norm, 2.0 * (jac.T @ resid) / norm


def _constraint(theta: np.ndarray, prob: _Problem) -> float:
    """log D(0+) - log D(0-) = p_- log(1 + m_-^2/L_-) - p_+ log(1 + m_+^2/L_+), scaled units."""
    nl = prob.n_linear
    cp, lp, pp, cn, ln, pn = theta[nl : nl + 6]
    return float(pn * math.log1p(cn * cn * math.exp(-ln)) - pp * math.log1p(cp * cp * math.exp(-lp)))


def _constraint_grad(theta: np.ndarray, prob: _Problem) -> np.ndarray:
    nl = prob.n_linear
    cp, lp, pp, cn, ln, pn = theta[nl : nl + 6]
    grad = np.zeros_like(theta)
    up, un = cp * cp * math.exp(-lp), cn * cn * math.exp(-ln)
    grad[nl : nl + 3] = [-pp * 2.0 * cp * math.exp(-lp) / (1 + up), pp * up / (1 + up), -math.log1p(up)]
    grad[nl + 3 : nl + 6] = [pn * 2.0 * cn * math.exp(-ln) / (1 + un), -pn * un / (1 + un), math.log1p(un)]
    return grad


def _start_shapes(prob: _Problem, starts: int, seed: int) -> list[np.ndarray]:
    """Deterministic start shapes (a grid of widths/powers, mirrored about 0), then seeded random.

    Each shape is (c+, log L+, p+, c-, log L-, p-) in scaled units. Grid starts are continuous by
    construction (mirror-symmetric branches); random ones need not be, SLSQP restores feasibility.
    Peaks are never placed exactly at 0: there the constraint's gradient vanishes and SLSQP stops
    at once with a singular LSQ subproblem.
    """
    x_lo, x_hi = float(prob.x.min()), float(prob.x.max())
    shapes: list[np.ndarray] = []
    for offset in (0.02, 0.15):
        for width in (0.05, 0.3, 1.0, 3.0):
            for power in (0.7, 2.0):
                c_pos = min(offset, x_hi)
                c_neg = max(-offset, x_lo)
                shapes.append(np.array([c_pos, math.log(width), power, c_neg, math.log(width), power]))
    rng = np.random.default_rng(seed)
    while len(shapes) < starts:
        centres = rng.uniform(x_lo, x_hi, size=2) * 0.5
        log_ls = rng.uniform(math.log(0.01), math.log(10.0), size=2)
        powers = np.exp(rng.uniform(math.log(0.2), math.log(5.0), size=2))
        shapes.append(np.array([centres[0], log_ls[0], powers[0], centres[1], log_ls[1], powers[1]]))
    return shapes[:starts]


def _linear_start(shape: np.ndarray, prob: _Problem) -> np.ndarray:
    """Best linear parameters for a fixed shape (ordinary least squares), clipped to the bounds."""
    theta = np.concatenate([np.zeros(prob.n_linear), shape])
    _, jac = _model_and_jacobian(theta, prob)  # the linear columns do not depend on the linear values
    coef, *_ = np.linalg.lstsq(jac[:, : prob.n_linear], prob.y, rcond=None)
    theta[: prob.n_linear] = np.clip(coef, -prob.amplitude, prob.amplitude)
    return theta


def _fit_one(prob: _Problem, starts: int, seed: int) -> np.ndarray:
    """Multistart SLSQP; the best start whose continuity gap is within tolerance wins."""
    bounds = prob.bounds
    lo = np.array([b[0] for b in bounds])
    hi = np.array([b[1] for b in bounds])
    constraint = {
        "type": "eq",
        "fun": _constraint,
        "jac": _constraint_grad,
        "args": (prob,),
    }
    best: tuple[float, np.ndarray] | None = None
    for shape in _start_shapes(prob, starts, seed):
        theta0 = np.clip(_linear_start(shape, prob), lo, hi)
        res = minimize(
            _objective,
            theta0,
            args=(prob,),
            jac=True,
            method="SLSQP",
            bounds=bounds,
            constraints=[constraint],
            options={"maxiter": 500, "ftol": 1e-14},
        )
        theta = np.clip(res.x, lo, hi)
        if not np.all(np.isfinite(theta)) or abs(_constraint(theta, prob)) > 1e-8:
            continue
        value = _objective(theta, prob)[0]
        if best is None or value < best[0]:
            best = (value, theta)
    if best is None:
        raise RuntimeFailure("validity-decay fit found no start satisfying the continuity constraint")
    return best[1]


def _unscale(theta: np.ndarray, prob: _Problem) -> dict[str, float]:
    """Scaled parameter vector -> parameters in the units of m (alpha per unit m, L in m^2)."""
    r = prob.scale
    nl = prob.n_linear
    cp, lp, pp, cn, ln, pn = theta[nl : nl + 6]
    shape = {
        "m_pos": cp * r,
        "L_pos": math.exp(lp) * r * r,
        "p_pos": pp,
        "m_neg": cn * r,
        "L_neg": math.exp(ln) * r * r,
        "p_neg": pn,
    }
    if nl == 3:
        linear = {"alpha": theta[0] / r, "beta": theta[1], "b": theta[2]}
    else:
        linear = {"beta_u": theta[0], "b_u": theta[1]}
    return {k: float(v) for k, v in {**linear, **shape}.items()}


def _fit_curve(m: np.ndarray, y: np.ndarray, n_linear: int, scale: float, starts: int, seed: int) -> CurveFit:
    prob = _make_problem(m, y, n_linear, scale)
    params = _unscale(_fit_one(prob, starts, seed), prob)
    y_hat = predict_curve(m, params)
    k = n_linear + len(DECAY_NAMES) - 1
    r2 = r_squared(y, y_hat)
    return CurveFit(params, r2, adjusted_r_squared(r2, y.size, k), float(np.sum((y - y_hat) ** 2)), y.size, k)


def fit_decay(
    factors: Factors,
    pref_odds: Values,
    util_odds: Values,
    *,
    max_util_drop: float = 1.0,
    starts: int = 24,
    seed: int = 0,
) -> DecayFit:
    """Fit the paper's decay model to a sweep's aggregated PrefOdds and UtilOdds.

    Factors whose aggregate is None/NaN (undefined UtilOdds in sweep.json) are dropped for that
    curve only, so each curve is fitted on the factors where it exists. Each curve needs at least
    (raw parameter count + 1) points: 10 for PrefOdds, 9 for UtilOdds.

    The search runs SLSQP on the sum of squared residuals (normalised by SST) with the continuity
    constraint, in scaled units (m/R with R = max|m|, log L) for conditioning, from ``starts``
    deterministic starts (a grid, then a generator seeded with ``seed``); the best feasible
    optimum wins. Bounds: m± within the swept range, L± in [1e-3 R^2, 1e2 R^2], p± in [0.05, 10],
    linear amplitudes within 10x the data magnitude.
    """
    m = _checked_factors(factors)
    _check_util_drop(max_util_drop)
    if starts < 1:
        raise InputError(f"starts must be >= 1, got {starts}")
    scale = float(np.max(np.abs(m)))
    if scale == 0.0:
        raise InputError("factors are all 0: a sweep needs nonzero steering factors")
    m_p, y_p = _defined_points(m, pref_odds, "pref_odds", len(PREF_NAMES) + 1)
    m_u, y_u = _defined_points(m, util_odds, "util_odds", len(UTIL_NAMES) + 1)
    preference = _fit_curve(m_p, y_p, 3, scale, starts, seed)
    utility = _fit_curve(m_u, y_u, 2, scale, starts, seed)
    lo, hi = float(m.min()), float(m.max())
    source = _region_source(preference, utility, lo, hi)
    return DecayFit(
        preference=preference,
        utility=utility,
        regions=decay_regions(source[1], lo, hi) | {"source": source[0]},
        breakdown=breakdown_points(source[1], lo, hi) | {"source": source[0]},
        recommended=recommend_factor(preference, utility, lo, hi, max_util_drop),
        factor_range=(lo, hi),
    )


def score_fit(
    fit: DecayFit,
    factors: Factors,
    pref_odds: Values,
    util_odds: Values,
) -> dict:
    """R^2 and RSS of an existing fit on another sweep (the paper's Table 7: fit on train, score on test).

    Missing values are dropped per curve as in :func:`fit_decay`; R^2 is None for constant data.
    """
    m = _checked_factors(factors)
    out: dict = {}
    for name, curve, values in (
        ("preference", fit.preference, pref_odds),
        ("utility", fit.utility, util_odds),
    ):
        m_c, y_c = _defined_points(m, values, name, 1)
        y_hat = curve.predict(m_c)
        out[name] = {
            "r2": r_squared(y_c, y_hat),
            "rss": float(np.sum((y_c - y_hat) ** 2)),
            "n": int(y_c.size),
        }
    return out


def _check_util_drop(max_util_drop: float) -> None:
    if not (math.isfinite(max_util_drop) and max_util_drop >= 0.0):
        raise InputError(f"max_util_drop must be a finite number >= 0, got {max_util_drop}")


def _checked_factors(factors: Factors) -> np.ndarray:
    m = np.asarray(factors, dtype=float)
    if m.ndim != 1 or m.size == 0 or not np.all(np.isfinite(m)):
        raise InputError("factors must be a non-empty 1-D sequence of finite numbers")
    return m


def _defined_points(
    m: np.ndarray, values: Values, name: str, min_points: int
) -> tuple[np.ndarray, np.ndarray]:
    """(m, y) where y is defined (not None/NaN); inf is an error, too few points is an error."""
    if isinstance(values, np.ndarray):
        y = values.astype(float)
    else:
        y = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    if y.shape != m.shape:
        raise InputError(f"{name} has {y.size} values for {m.size} factors")
    if np.any(np.isinf(y)):
        raise InputError(f"{name} contains an infinite value")
    keep = ~np.isnan(y)
    if int(keep.sum()) < min_points:
        raise InputError(f"{name} has {int(keep.sum())} defined points; the fit needs at least {min_points}")
    return m[keep], y[keep]


# ----------------------------------------------------------------------------- regions and recommendation


def _region_source(preference: CurveFit, utility: CurveFit, lo: float, hi: float) -> tuple[str, CurveFit]:
    """Which D defines regions: D_u (validity is about still answering), unless utility is flat.

    If the fitted UtilOdds varies by less than 1e-6 nats over the swept range, D_u's shape is not
    identifiable from the data and D_p is used instead.
    """
    grid = np.linspace(lo, hi, RECOMMEND_GRID)
    if float(np.ptp(utility.predict(grid))) < 1e-6:
        return "preference", preference
    return "utility", utility


def half_width(length: float, power: float, level: float) -> float:
    """|m - m0| where (1 + (m - m0)^2 / L)^(-p) = level, i.e. sqrt(L (level^(-1/p) - 1))."""
    return math.sqrt(length * (level ** (-1.0 / power) - 1.0))


def _sides(lo: float, hi: float) -> dict[str, tuple[float, float] | None]:
    """The swept interval on each side of 0 (m = 0 belongs to the positive branch)."""
    return {
        "positive": (max(lo, 0.0), hi) if hi >= 0.0 else None,
        "negative": (lo, min(hi, 0.0)) if lo < 0.0 else None,
    }


def _side_params(curve: CurveFit, side: str) -> tuple[float, float, float]:
    suffix = "pos" if side == "positive" else "neg"
    p = curve.params
    return p[f"m_{suffix}"], p[f"L_{suffix}"], p[f"p_{suffix}"]


def breakdown_points(curve: CurveFit, lo: float, hi: float) -> dict:
    """Per side, the factor where D falls to 0.5 moving away from that branch's peak.

    Closed form: m = m_+ + sqrt(L_+ (2^(1/p_+) - 1)) on the positive side and
    m = m_- - sqrt(L_- (2^(1/p_-) - 1)) on the negative side. ``in_range`` says whether that
    factor lies inside the swept part of its side (otherwise it is an extrapolation).
    """
    out: dict = {}
    for side, interval in _sides(lo, hi).items():
        center, length, power = _side_params(curve, side)
        width = half_width(length, power, BREAKDOWN_THRESHOLD)
        factor = center + width if side == "positive" else center - width
        in_range = interval is not None and interval[0] <= factor <= interval[1]
        out[side] = {"factor": float(factor), "in_range": bool(in_range), "peak": float(center)}
    return out


def decay_regions(curve: CurveFit, lo: float, hi: float) -> dict:
    """Linear (D >= 0.9), transitional (0.5 <= D < 0.9) and convergence (D < 0.5) regions.

    Each is a list of [start, end] intervals per side, clipped to the swept range on that side;
    a branch is unimodal around its peak, so a region has at most two intervals on a side.
    """
    out: dict = {"thresholds": {"linear": LINEAR_THRESHOLD, "breakdown": BREAKDOWN_THRESHOLD}}
    for side, interval in _sides(lo, hi).items():
        if interval is None:
            out[side] = {"linear": [], "transitional": [], "convergence": []}
            continue
        center, length, power = _side_params(curve, side)
        w_lin = half_width(length, power, LINEAR_THRESHOLD)
        w_half = half_width(length, power, BREAKDOWN_THRESHOLD)
        inner = (center - w_lin, center + w_lin)
        outer = (center - w_half, center + w_half)
        out[side] = {
            "linear": _clip([inner], interval),
            "transitional": _clip([(outer[0], inner[0]), (inner[1], outer[1])], interval),
            "convergence": _clip([(-math.inf, outer[0]), (outer[1], math.inf)], interval),
        }
    return out


def _clip(intervals: list[tuple[float, float]], bounds: tuple[float, float]) -> list[list[float]]:
    """Intersect intervals with bounds, dropping empty (zero-length) pieces."""
    out = []
    for start, end in intervals:
        a, b = max(start, bounds[0]), min(end, bounds[1])
        if b > a:
            out.append([float(a), float(b)])
    return out


def recommend_factor(
    preference: CurveFit, utility: CurveFit, lo: float, hi: float, max_util_drop: float
) -> dict:
    """The factor with the largest predicted PrefOdds whose predicted UtilOdds stays within
    ``max_util_drop`` nats of the unsteered UtilOdds(0).

    Searched on a 2001-point grid over [lo, hi] (plus m = 0 when it is in range). ``factor`` is
    None when no grid point qualifies (possible only if 0 is outside the swept range).
    """
    _check_util_drop(max_util_drop)
    grid = np.linspace(lo, hi, RECOMMEND_GRID)
    if lo <= 0.0 <= hi:
        grid = np.union1d(grid, [0.0])
    floor = float(utility.predict(np.array(0.0))) - max_util_drop
    util = utility.predict(grid)
    pref = preference.predict(grid)
    ok = util >= floor
    result: dict = {
        "factor": None,
        "pref_odds": None,
        "util_odds": None,
        "max_util_drop": float(max_util_drop),
    }
    if np.any(ok):
        i = int(np.argmax(np.where(ok, pref, -np.inf)))
        result.update(factor=float(grid[i]), pref_odds=float(pref[i]), util_odds=float(util[i]))
    return result


# ----------------------------------------------------------------------------- plot


REGION_COLOURS = {"linear": "#d9f0d3", "transitional": "#fee8c8", "convergence": "#f2f2f2"}


def plot_fit(
    fit: DecayFit,
    factors: Factors,
    pref_odds: Values,
    util_odds: Values,
    path: str | os.PathLike[str],
) -> Path:
    """Plot data, fitted curves, shaded regions and the recommended factor; write the PNG atomically.

    Written with :func:`splitsteer.atomic.write_png`, so a reader never sees half a PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = _checked_factors(factors)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7.0, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    labelled: set[str] = set()
    for side in ("negative", "positive"):
        for region, colour in REGION_COLOURS.items():
            for start, end in fit.regions.get(side, {}).get(region, []):
                label = f"{region} region" if region not in labelled else None
                labelled.add(region)
                ax.axvspan(start, end, color=colour, alpha=0.8, lw=0, label=label)
    grid = np.linspace(float(m.min()), float(m.max()), 400)
    m_p, y_p = _defined_points(m, pref_odds, "pref_odds", 0)
    m_u, y_u = _defined_points(m, util_odds, "util_odds", 0)
    ax.plot(m_p, y_p, "o", color="C0", ms=4, label="PrefOdds (data)")
    ax.plot(grid, fit.preference.predict(grid), "-", color="C0", label="PrefOdds (fit)")
    ax.plot(m_u, y_u, "s", color="C1", ms=4, label="UtilOdds (data)")
    ax.plot(grid, fit.utility.predict(grid), "--", color="C1", label="UtilOdds (fit)")
    if fit.recommended.get("factor") is not None:
        ax.axvline(
            fit.recommended["factor"],
            color="k",
            ls=":",
            label=f"recommended m = {fit.recommended['factor']:.3g}",
        )
    ax.set_xlabel("steering factor m")
    ax.set_ylabel("log-odds (nats)")
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    return write_png(fig, target, dpi=120)
