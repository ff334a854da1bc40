"""Experiment report: the summary tables, a loss plot, ``results.json`` and a self-contained HTML page.

An experiment's ``results.json`` (written by the runner) is the single source of every number
here. The report reproduces the paper's two summary tables from it:

* Table 3 style (:func:`results_table`): one row per run with the A/B accuracy before and after
  steering, the steered PrefOdds, what steering cost in UtilOdds, the judges' harmonic mean and
  the fit quality;
* Table 2 style (:func:`r2_grid`): preference / utility R^2 of the validity-decay fit by method
  and form (and dataset when the experiment has several).

:func:`write_report` renders both plus one section per run into a single ``report.html`` that
needs nothing else to be viewed: PNGs are embedded as ``data:`` URIs, the CSS is inline and there
is no JavaScript, so the file can be mailed, archived or opened from a sandbox without network.
Every field except a run's ``name`` is optional, because experiments are often reported while
incomplete (no judges configured, manifold analysis skipped); a missing value renders as "—".
All user-supplied text (run names, prompts, generations, config values) goes through
:func:`html.escape`, since generations are arbitrary model output.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from splitsteer.atomic import json_safe, write_png, write_text
from splitsteer.errors import InputError

__all__ = [
    "MISSING",
    "TABLE_COLUMNS",
    "fmt",
    "format_table",
    "plot_loss",
    "r2_grid",
    "results_table",
    "write_report",
    "write_results",
]

MISSING = "—"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk: its absence means a truncated file

# (row key, header) of the Table-3 summary, in display order. ``ab_accuracy`` is a virtual column
# rendered from ``ab_accuracy_baseline`` and ``ab_accuracy_steered``.
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("run", "run"),
    ("dataset", "dataset"),
    ("method", "method"),
    ("form", "form"),
    ("layer", "layer"),
    ("ab_accuracy", "A/B acc base→steer"),
    ("factor", "factor"),
    ("pref_odds_steered", "PrefOdds steer"),
    ("util_odds_delta", "ΔUtilOdds"),
    ("judge_harmonic_steered", "judge H steer"),
    ("pref_r2", "pref R²"),
    ("util_r2", "util R²"),
    ("recommended_factor", "rec. factor"),
)

PLOT_KINDS: tuple[tuple[str, str], ...] = (
    ("fit", "Validity-decay fit (PrefOdds and UtilOdds against m)"),
    ("manifold", "Manifold: projection and off-manifold distance against m"),
    ("loss", "Training loss"),
)


# ----------------------------------------------------------------------------- formatting


def fmt(value: Any, digits: int = 3) -> str:
    """A number to ``digits`` significant digits, "—" for None/NaN; other values as ``str``.

    One formatter for the terminal table and the HTML so both show the same digits. Large
    magnitudes are written in full (``12346``, not ``1.23e+04``) because they are seconds or
    counts, where scientific notation only hides the size.
    """
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return MISSING
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value == 0.0:
            return "0"
        text = f"{value:.{digits}g}"
        if "e" in text and abs(value) >= 1.0:
            text = f"{value:.0f}"
        return text
    return str(value)


def _get(mapping: Any, *keys: str) -> Any:
    """Nested lookup that yields None as soon as a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, null, NaN, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def _runs(results: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    runs = results.get("runs") if isinstance(results, Mapping) else None
    if runs is None:
        return []
    if not isinstance(runs, Sequence) or isinstance(runs, (str, bytes)):
        raise InputError("results['runs'] must be a list of run objects")
    for i, run in enumerate(runs):
        if not isinstance(run, Mapping) or not isinstance(run.get("name"), str):
            raise InputError(f"results['runs'][{i}] must be an object with a string 'name'")
    return list(runs)


# ----------------------------------------------------------------------------- Table 3


def _steered_factor(run: Mapping[str, Any]) -> tuple[float | None, str | None]:
    """The factor the run was steered with: the chosen factor, else the A/B evaluation's factor."""
    chosen = _number(_get(run, "chosen_factor", "factor"))
    if chosen is not None:
        source = _get(run, "chosen_factor", "source")
        return chosen, source if isinstance(source, str) else None
    ab_factor = _number(_get(run, "ab", "factor"))
    if ab_factor is not None:
        return ab_factor, "ab"
    return None, None


def _nearest(factors: Sequence[Any], target: float) -> int | None:
    """Index of the sweep factor closest to ``target`` (first one on ties); None for no factors."""
    best: int | None = None
    for i, factor in enumerate(factors):
        f = _number(factor)
        if f is not None and (best is None or abs(f - target) < abs(float(factors[best]) - target)):
            best = i
    return best


def _util_delta(run: Mapping[str, Any], factor: float | None) -> tuple[float | None, float | None]:
    """UtilOdds at the sweep factor nearest ``factor`` minus at the one nearest 0, and that factor.

    The sweep is the only place both values come from the same measurement, so the cost of
    steering is read off it rather than mixing evaluations. None when either value is undefined
    (UtilOdds can be null in a sweep) or the run has no sweep.
    """
    factors = _get(run, "sweep", "factors")
    util = _get(run, "sweep", "util_odds")
    if factor is None or not isinstance(factors, Sequence) or not isinstance(util, Sequence):
        return None, None
    if len(factors) != len(util):
        return None, None
    at, zero = _nearest(factors, factor), _nearest(factors, 0.0)
    if at is None or zero is None:
        return None, None
    u_at, u_zero = _number(util[at]), _number(util[zero])
    used = _number(factors[at])
    if u_at is None or u_zero is None:
        return None, used
    return u_at - u_zero, used


def results_table(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The Table-3-style summary, one row (a dict of raw values, None when missing) per run.

    Keys: ``run``, ``model``, ``dataset``, ``method``, ``form``, ``layer``,
    ``ab_accuracy_baseline``/``ab_accuracy_steered`` (A/B accuracy), ``factor`` and
    ``factor_source`` (``chosen_factor`` if present, else the A/B factor), ``pref_odds_steered``
    (mean PrefOdds of the steered A/B evaluation), ``util_odds_delta`` (sweep UtilOdds at the
    factor minus at 0, each at the nearest swept factor; ``util_odds_at`` is the swept factor
    used), ``judge_harmonic_steered``, ``pref_r2``, ``util_r2``, ``recommended_factor``.
    Values stay unformatted so callers (tests, CSV export) get the numbers themselves.
    """
    rows: list[dict[str, Any]] = []
    for run in _runs(results):
        factor, source = _steered_factor(run)
        delta, util_at = _util_delta(run, factor)
        layer = run.get("layer")
        rows.append(
            {
                "run": run["name"],
                "model": run.get("model"),
                "dataset": run.get("dataset"),
                "method": run.get("method"),
                "form": run.get("form"),
                "layer": layer if isinstance(layer, int) and not isinstance(layer, bool) else None,
                "ab_accuracy_baseline": _number(_get(run, "ab", "baseline", "accuracy")),
                "ab_accuracy_steered": _number(_get(run, "ab", "steered", "accuracy")),
                "factor": factor,
                "factor_source": source,
                "pref_odds_steered": _number(_get(run, "ab", "steered", "mean_pref_odds")),
                "util_odds_delta": delta,
                "util_odds_at": util_at,
                "judge_harmonic_steered": _number(_get(run, "judges", "steered", "harmonic")),
                "pref_r2": _number(_get(run, "fit", "preference", "r2")),
                "util_r2": _number(_get(run, "fit", "utility", "r2")),
                "recommended_factor": _number(_get(run, "fit", "recommended_factor")),
            }
        )
    return rows


def _cell(row: Mapping[str, Any], key: str) -> str:
    if key == "ab_accuracy":
        base, steer = row.get("ab_accuracy_baseline"), row.get("ab_accuracy_steered")
        if base is None and steer is None:
            return MISSING
        return f"{fmt(base)} → {fmt(steer)}"
    return fmt(row.get(key))


def _is_numeric_column(key: str) -> bool:
    return key not in {"run", "dataset", "method", "form", "ab_accuracy"}


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Render :func:`results_table` rows as a fixed-width plain-text table for terminals.

    Plain text rather than a rich renderable so it can be printed, logged or diffed as is.
    Numbers are right-aligned, text left-aligned; "—" marks a missing value.
    """
    headers = [header for _, header in TABLE_COLUMNS]
    body = [[_cell(row, key) for key, _ in TABLE_COLUMNS] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = []
        for (key, _), cell, width in zip(TABLE_COLUMNS, cells, widths):
            parts.append(cell.rjust(width) if _is_numeric_column(key) else cell.ljust(width))
        return "  ".join(parts).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in body)
    if not rows:
        out.append("(no runs)")
    return "\n".join(out)


# ----------------------------------------------------------------------------- Table 2


def r2_grid(results: Mapping[str, Any]) -> dict[str, Any]:
    """The Table-2-style grid of fit quality: rows = method, columns = form (x dataset).

    Returns ``{"rows": [method, ...], "columns": [label, ...], "cells": {method: {label: text}}}``
    where ``text`` is ``"pref R² / util R²"`` (3 significant digits, "—" if missing). The column
    label is the form, or ``"form (dataset)"`` when the experiment spans more than one dataset,
    since fit quality is only comparable within a dataset. Runs that land in the same cell (other
    layers or models) are joined with "; " in run order rather than silently averaged.
    """
    runs = _runs(results)
    datasets = {run.get("dataset") for run in runs}
    by_dataset = len(datasets) > 1
    rows: list[str] = []
    columns: list[str] = []
    cells: dict[str, dict[str, str]] = {}
    for run in runs:
        method = fmt(run.get("method"))
        label = fmt(run.get("form"))
        if by_dataset:
            label = f"{label} ({fmt(run.get('dataset'))})"
        if method not in rows:
            rows.append(method)
        if label not in columns:
            columns.append(label)
        pref = fmt(_number(_get(run, "fit", "preference", "r2")))
        util = fmt(_number(_get(run, "fit", "utility", "r2")))
        text = f"{pref} / {util}"
        row = cells.setdefault(method, {})
        row[label] = f"{row[label]}; {text}" if label in row else text
    return {"rows": rows, "columns": columns, "cells": cells}


# ----------------------------------------------------------------------------- loss plot


# Bookkeeping columns of a training log (see train.py): numeric, but not terms of the objective, and
# on scales (a learning rate, an epoch counter) that would flatten the terms if drawn beside them.
NOT_LOSS_TERMS = frozenset(
    {"step", "epoch", "lr", "learning_rate", "grad_norm", "seconds", "time", "examples", "tokens"}
)


def _loss_terms(log: Sequence[Mapping[str, Any]]) -> list[str]:
    """Numeric objective columns (``loss`` first, then in order of first appearance)."""
    keys: list[str] = []
    for entry in log:
        keys.extend(k for k in entry if k not in NOT_LOSS_TERMS and k not in keys)
    numeric = []
    for key in keys:
        values = [entry.get(key) for entry in log]
        if all(v is None or _is_real(v) for v in values) and any(_number(v) is not None for v in values):
            numeric.append(key)
    return sorted(numeric, key=lambda k: k != "loss")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_loss(log: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Plot the training loss and every other numeric term (lp, ln, hinge, ...) against step.

    Bookkeeping columns (``epoch``, ``lr``, ``grad_norm``, ... see ``NOT_LOSS_TERMS``) and
    non-numeric ones are left out.

    The objective's terms can live on very different scales from the total, so when there are
    any they get their own panel below the loss instead of flattening it. The x axis is ``step``
    when every entry has one, the entry index otherwise. Written atomically as PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(log, Sequence) or not log or not all(isinstance(e, Mapping) for e in log):
        raise InputError("loss log must be a non-empty list of objects")
    terms = _loss_terms(log)
    if not terms:
        raise InputError("loss log has no numeric term to plot (expected e.g. 'loss')")
    steps = [_number(e.get("step")) for e in log]
    have_steps = all(s is not None for s in steps)
    x = [float(s) if have_steps else float(i) for i, s in enumerate(steps)]  # type: ignore[arg-type]

    main = ["loss"] if "loss" in terms else terms
    extra = [t for t in terms if t not in main]
    fig = Figure(figsize=(7.0, 5.5 if extra else 3.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if extra else 1, 1, sharex=True, squeeze=False)[:, 0]
    for ax, group in zip(axes, (main, extra)):
        for i, term in enumerate(group):
            pts = [(xi, _number(e.get(term))) for xi, e in zip(x, log)]
            xs = [p[0] for p in pts if p[1] is not None]
            ys = [p[1] for p in pts if p[1] is not None]
            style = "-" if len(xs) > 1 else "o"
            ax.plot(xs, ys, style, color=f"C{i}", lw=1.5 if term == "loss" else 1.2, label=term)
        ax.set_ylabel("loss" if group is main and main == ["loss"] else "value")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    axes[-1].set_xlabel("step" if have_steps else "log entry")
    axes[0].set_title("training loss" + (" and terms" if extra else ""), fontsize="medium")
    fig.tight_layout()
    return write_png(fig, path, dpi=110)


# ----------------------------------------------------------------------------- results.json


def write_results(results: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``results.json`` as strict JSON (NaN/inf become null), atomically.

    Strict because browsers' and most languages' JSON parsers reject NaN; an undefined number is
    null everywhere in this library. Atomic so a crash never leaves a truncated results file.
    """
    text = json.dumps(json_safe(results), indent=2, allow_nan=False, ensure_ascii=False)
    return write_text(path, text + "\n")


# ----------------------------------------------------------------------------- HTML


CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 2rem auto; max-width: 1200px; padding: 0 1.5rem; color: #1d1d1f; background: #fff;
       line-height: 1.45; }
h1 { font-size: 1.7rem; margin-bottom: .2rem; }
h2 { font-size: 1.3rem; margin-top: 2.2rem; border-bottom: 2px solid #e4e4e7; padding-bottom: .25rem; }
h3 { font-size: 1.05rem; margin-top: 1.4rem; }
.meta { color: #52525b; font-size: .9rem; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-size: .88rem; }
th, td { border: 1px solid #d4d4d8; padding: .3rem .55rem; vertical-align: top; text-align: left; }
th { background: #f4f4f5; font-weight: 600; }
tbody tr:nth-child(even) td { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.scroll { overflow-x: auto; }
figure { margin: .8rem 0 1.2rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #e4e4e7; }
figcaption { font-size: .85rem; color: #52525b; }
.note { color: #a1a1aa; font-style: italic; font-size: .88rem; }
table.gen { table-layout: fixed; width: 100%; }
table.gen td { white-space: pre-wrap; overflow-wrap: anywhere; font-size: .85rem; }
table.gen th:first-child { width: 26%; }
pre { background: #f4f4f5; padding: .8rem; overflow-x: auto; font-size: .8rem; }
nav ul { columns: 2; font-size: .9rem; }
.cols { display: flex; flex-wrap: wrap; gap: 0 2.5rem; align-items: flex-start; }
.cols h3:first-child { margin-top: .6rem; }
"""


def _e(value: Any) -> str:
    """Escaped display text of any value (numbers via :func:`fmt`)."""
    return html.escape(fmt(value), quote=True)


def _table(headers: Sequence[str], rows: Sequence[Sequence[tuple[str, bool]]], cls: str = "") -> str:
    """An HTML table from already-escaped cells; each cell is (html, is_numeric)."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if num else f"<td>{c}</td>" for c, num in row) + "</tr>"
        for row in rows
    )
    attr = f' class="{cls}"' if cls else ""
    return (
        f'<div class="scroll"><table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    )


def _summary_html(rows: Sequence[Mapping[str, Any]], anchors: Sequence[str]) -> str:
    if not rows:
        return '<p class="note">No runs.</p>'
    headers = [html.escape(h) for _, h in TABLE_COLUMNS]
    body = []
    for row, anchor in zip(rows, anchors):
        cells = []
        for key, _ in TABLE_COLUMNS:
            text = html.escape(_cell(row, key))
            if key == "run":
                text = f'<a href="#{anchor}">{text}</a>'
            cells.append((text, _is_numeric_column(key)))
        body.append(cells)
    return _table(headers, body)


def _grid_html(grid: Mapping[str, Any]) -> str:
    if not grid["rows"]:
        return '<p class="note">No runs.</p>'
    headers = ["method \\ form"] + list(grid["columns"])
    body = []
    for method in grid["rows"]:
        row = grid["cells"].get(method, {})
        body.append(
            [(html.escape(method), False)]
            + [(html.escape(row.get(col, MISSING)), True) for col in grid["columns"]]
        )
    return _table([html.escape(h) for h in headers], body)


def _png_data_uri(path: Path) -> str | None:
    """A ``data:image/png;base64`` URI of ``path``, or None if it is missing or not a PNG.

    The signature, the leading IHDR chunk and the trailing IEND chunk are checked so a truncated
    or mislabelled file is reported as missing instead of being embedded as a broken image.
    """
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not (data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR" and data.endswith(PNG_END)):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure_html(run: Mapping[str, Any], kind: str, caption: str, experiment_dir: Path) -> str:
    rel = _get(run, "plots", kind)
    if not isinstance(rel, str) or not rel:
        why = "no plot recorded"
        if kind == "manifold" and run.get("manifold") is None:
            why = "no manifold analysis for this run"
        return f'<p class="note">{html.escape(caption)}: {html.escape(why)}.</p>'
    uri = _png_data_uri(experiment_dir / rel)
    if uri is None:
        return (
            f'<p class="note">{html.escape(caption)}: plot file missing or not a PNG '
            f"(<code>{html.escape(rel)}</code>).</p>"
        )
    return (
        f'<figure><img src="{uri}" alt="{html.escape(caption, quote=True)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _kv_table(items: Sequence[tuple[str, Any]]) -> str:
    """Field/value rows; numbers right-aligned, text left-aligned."""
    rows = [[(html.escape(k), False), (_e(v), _is_real(v))] for k, v in items]
    return _table(["field", "value"], rows)


def _details_html(run: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    """Run facts (training, fit, chosen factor) and baseline-vs-steered evaluations."""
    facts = [
        ("model", run.get("model")),
        ("dataset", run.get("dataset")),
        ("method / form / layer", f"{fmt(run.get('method'))} / {fmt(run.get('form'))} / {fmt(row['layer'])}"),
        ("directory", run.get("dir")),
        ("train seconds", _number(_get(run, "train", "seconds"))),
        ("train examples/s", _number(_get(run, "train", "examples_per_second"))),
        ("train epochs", _get(run, "train", "epochs")),
        ("final loss", _number(_get(run, "train", "final_loss"))),
        ("sweep pairs", _get(run, "sweep", "n_pairs")),
        ("UtilOdds undefined (pair × factor)", _get(run, "sweep", "n_util_undefined")),
        (
            "pref R² / adj. R²",
            f"{fmt(row['pref_r2'])} / {fmt(_number(_get(run, 'fit', 'preference', 'adj_r2')))}",
        ),
        (
            "util R² / adj. R²",
            f"{fmt(row['util_r2'])} / {fmt(_number(_get(run, 'fit', 'utility', 'adj_r2')))}",
        ),
        ("recommended factor (fit)", row["recommended_factor"]),
        ("steered factor", row["factor"]),
        ("steered factor source", row["factor_source"]),
        ("held-out score of chosen factor", _number(_get(run, "chosen_factor", "held_out_score"))),
        ("ΔUtilOdds (sweep, at m ≈ factor)", row["util_odds_delta"]),
        (
            "manifold Spearman(util, off-manifold)",
            _number(_get(run, "manifold", "spearman_util_vs_off_manifold")),
        ),
        (
            "manifold Spearman(pref, projection)",
            _number(_get(run, "manifold", "spearman_pref_vs_projection")),
        ),
    ]
    parts = ['<div class="cols"><div>', _kv_table(facts), "</div><div>"]
    evals = [
        ("A/B evaluation", "ab", ("accuracy", "mean_pref_odds", "n")),
        (
            "Judges (0–2; harmonic mean per sample)",
            "judges",
            ("concept", "instruction", "fluency", "harmonic", "n"),
        ),
        ("Judge-free metrics", "metrics", ("fluency_entropy", "perplexity")),
    ]
    for title, key, fields in evals:
        block = run.get(key)
        if not isinstance(block, Mapping):
            parts.append(f'<p class="note">{html.escape(title)}: not run.</p>')
            continue
        extra = f" at m = {fmt(_number(block.get('factor')))}" if key == "ab" else ""
        body = [
            [(html.escape(side), False)] + [(_e(_number(_get(block, side, f))), True) for f in fields]
            for side in ("baseline", "steered")
        ]
        parts.append(f"<h3>{html.escape(title + extra)}</h3>" + _table(["", *fields], body))
    parts.append("</div></div>")
    return "\n".join(parts)


def _generations_html(run: Mapping[str, Any], max_generations: int | None) -> str:
    gens = run.get("generations")
    if not isinstance(gens, Sequence) or not gens:
        return '<p class="note">No sample generations.</p>'
    shown = [g for g in gens if isinstance(g, Mapping)]
    if max_generations is not None:
        shown = shown[:max_generations]
    factors = sorted({fmt(_number(g.get("factor"))) for g in shown})
    one_factor = len(factors) == 1
    label = f"m = {factors[0]}" if one_factor else "chosen factor"
    headers = ["prompt", "unsteered (m = 0)", f"steered ({html.escape(label)})"]
    body = []
    for g in shown:
        steered = _e(g.get("steered"))
        if not one_factor:  # several factors: say which one each row used
            steered = f"<b>m = {_e(_number(g.get('factor')))}</b>\n{steered}"
        body.append([(_e(g.get("prompt")), False), (_e(g.get("unsteered")), False), (steered, False)])
    note = ""
    if len(shown) < len(gens):
        note = f'<p class="note">Showing {len(shown)} of {len(gens)} generations.</p>'
    return _table(headers, body, cls="gen") + note


def _anchor(index: int) -> str:
    return f"run-{index + 1}"


def write_report(
    results: Mapping[str, Any],
    experiment_dir: str | os.PathLike[str],
    path: str | os.PathLike[str] | None = None,
    *,
    max_generations: int | None = 20,
) -> Path:
    """Write the experiment's self-contained ``report.html`` (default ``experiment_dir/report.html``).

    Contents: title and metadata, the Table-3 summary, the Table-2 R² grid, then per run its facts,
    the fit / manifold / loss plots (``plots`` paths are relative to ``experiment_dir``; a missing
    or non-PNG file becomes a note, never a broken image) and up to ``max_generations`` sample
    generations unsteered vs steered. Written atomically; returns the path.
    """
    exp_dir = Path(experiment_dir)
    target = Path(path) if path is not None else exp_dir / "report.html"
    if max_generations is not None and max_generations < 0:
        raise InputError(f"max_generations must be >= 0, got {max_generations}")
    runs = _runs(results)
    rows = results_table(results)
    anchors = [_anchor(i) for i in range(len(runs))]
    name = results.get("experiment")
    title = f"splitsteer report: {name}" if isinstance(name, str) and name else "splitsteer report"

    meta = " · ".join(
        f"{label}: {_e(results.get(key))}"
        for label, key in (("created", "created"), ("splitsteer", "splitsteer_version"))
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{meta} · runs: {len(runs)}</p>',
    ]
    config = results.get("config")
    if isinstance(config, Mapping) and config:
        dumped = json.dumps(json_safe(config), indent=2, ensure_ascii=False, default=str)
        parts.append(f"<details><summary>configuration</summary><pre>{html.escape(dumped)}</pre></details>")
    if runs:
        links = "".join(
            f'<li><a href="#{a}">{html.escape(run["name"])}</a></li>' for a, run in zip(anchors, runs)
        )
        parts.append(f"<nav><ul>{links}</ul></nav>")
    parts += [
        "<h2>Summary (Table 3)</h2>",
        (
            '<p class="meta">A/B accuracy unsteered → steered; PrefOdds of the steered A/B evaluation; '
            "ΔUtilOdds = sweep UtilOdds at the steered factor minus at m = 0 (nearest swept factors); "
            "judge H = mean harmonic judge score of steered generations.</p>"
        ),
        _summary_html(rows, anchors),
        "<h2>Fit quality (Table 2): pref R² / util R²</h2>",
        _grid_html(r2_grid(results)),
    ]
    for run, row, anchor in zip(runs, rows, anchors):
        parts.append(f'<section id="{anchor}"><h2>Run: {html.escape(run["name"])}</h2>')
        parts.append(_details_html(run, row))
        parts.append("<h3>Plots</h3>")
        parts.extend(_figure_html(run, kind, caption, exp_dir) for kind, caption in PLOT_KINDS)
        parts.append("<h3>Sample generations</h3>")
        parts.append(_generations_html(run, max_generations))
        parts.append("</section>")
    parts.append("</body></html>\n")
    return write_text(target, "\n".join(parts))
