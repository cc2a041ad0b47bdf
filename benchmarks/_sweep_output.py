"""The parameter study's outputs (:mod:`benchmarks.sweep`): the markdown table and the heat map, both
drawn from the results as written to JSON, so a stored ``sweep_<scenario>.json`` can be drawn again."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from benchmarks._scenario import Metric
from benchmarks._summary import interval_text

__all__ = ["flag_text", "heat_map", "table"]


def flag_text(value: object) -> str:
    """A flag value as typed: ``0.05``, ``1`` for 1.0, ``a,b`` for a sequence."""
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    if isinstance(value, (list, tuple)):
        return ",".join(flag_text(v) for v in value)
    return str(value)


def _delta_cell(delta: Mapping[str, Any]) -> str:
    return interval_text(delta["estimate"], delta["low"], delta["high"], " (no CI)")


def _value(metric: Metric | None, value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    if metric is None or metric.percent:
        return f"{100 * value:.2f}"
    return f"{value:.4g}"


def table(results: Mapping[str, Any]) -> str:
    """The markdown table: Joint, then one row per cell (b, M, λ, L, Δm vs Joint [95 % CI], metric means)."""
    metrics = [Metric(**m) for m in results["metrics"]]
    averaged = "metric_mean" in results["joint"]
    headers = ["b", "M", "λ", "L", "Δm vs Joint (%) [95 % CI]", *(m.header for m in metrics)]
    if averaged:
        headers.append("mean (%)")
    rows = ["| " + " | ".join(headers) + " | note |", "|" + "---:|" * len(headers) + "---|"]
    joint = results["joint"]
    cells = [_value(m, joint["mean"][m.key]) for m in metrics]
    if averaged:
        kept = [v for v in joint["metric_mean"]["per_seed"] if v is not None and math.isfinite(v)]
        cells.append(_value(None, float(np.mean(kept)) if kept else None))
    rows.append("| joint | – | – | – | 0 (baseline) | " + " | ".join(cells) + " | the same seeds and data |")
    selected = results["selected"]
    for index, cell in enumerate(results["cells"]):
        values = [_value(m, cell["mean"][m.key]) for m in metrics]
        if averaged:
            values.append(_value(None, cell["metric_mean"]["mean"]))
        notes = []
        if selected is not None and selected["index"] == index:
            notes.append("**selected**")
        if not cell["ran"]:
            notes.append(f"same run as λ = {flag_text(cell['same_run_as']['consistency_weight'])} "
                         "(M = 1: λ has no effect)")
        rows.append(f"| {flag_text(cell['bound'])} | {cell['samples']} | {flag_text(cell['consistency_weight'])} | "
                    f"{cell['inner_steps']} | {_delta_cell(cell['delta_m'])} | " + " | ".join(values)
                    + f" | {'; '.join(notes)} |")
    return "\n".join(rows)


def heat_map(results: Mapping[str, Any], path: Path) -> None:
    """The heat map: one panel per (M, L), rows b, columns λ, one colour scale centred at 0 for all."""
    grid = results["grid"]
    bounds, samples, weights, steps = grid["bound"], grid["samples"], grid["consistency_weight"], grid["inner_steps"]
    estimates = [c["delta_m"]["estimate"] for c in results["cells"]]
    finite_values = [abs(v) for v in estimates if v is not None and math.isfinite(v)]
    limit = max(max(finite_values, default=1.0), 1e-3)
    figure = Figure(figsize=(len(steps) * (1.45 * len(weights) + 1.4) + 1.2, len(samples) * (0.85 * len(bounds) + 1.1)
                             + 0.9), layout="constrained")
    axes = figure.subplots(len(samples), len(steps), squeeze=False)
    image = None
    selected = results["selected"]
    for row, m in enumerate(samples):
        for column, inner in enumerate(steps):
            axis = axes[row, column]
            values = np.full((len(bounds), len(weights)), np.nan)
            for index, cell in enumerate(results["cells"]):
                if cell["samples"] != m or cell["inner_steps"] != inner:
                    continue
                i, j = bounds.index(cell["bound"]), weights.index(cell["consistency_weight"])
                delta = cell["delta_m"]
                estimate = delta["estimate"]
                if estimate is not None and math.isfinite(estimate):
                    values[i, j] = estimate
                low, high = delta["low"], delta["high"]
                interval = "" if low is None or high is None else f"\n[{low:+.1f}, {high:+.1f}]"
                text = "n/a" if estimate is None or not math.isfinite(estimate) else f"{estimate:+.2f}{interval}"
                dark = estimate is not None and math.isfinite(estimate) and abs(estimate) > 0.6 * limit
                axis.text(j, i, text, ha="center", va="center", fontsize=7.5, color="white" if dark else "black")
                if selected is not None and selected["index"] == index:
                    axis.add_patch(Rectangle((j - 0.48, i - 0.48), 0.96, 0.96, fill=False, edgecolor="black",
                                             linewidth=2.2))
            image = axis.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
            axis.set_xticks(range(len(weights)), [flag_text(w) for w in weights])
            axis.set_yticks(range(len(bounds)), [flag_text(b) for b in bounds])
            axis.set_xlabel("consistency weight λ", fontsize=8)
            axis.set_ylabel("bound b", fontsize=8)
            axis.set_title(f"M = {m}, L = {inner}" + (" (λ has no effect: one run)" if m == 1 else ""), fontsize=9)
    if image is not None:
        figure.colorbar(image, ax=list(axes.ravel()), label="Δm vs Joint (%)", shrink=0.9)
    seeds = len(results["config"]["seeds"])
    figure.suptitle(f"{results['scenario']}: {results['method']} Δm vs Joint (%), mean [95 % CI] over {seeds} seeds, "
                    "validation split; outlined: selected", fontsize=10)
    figure.savefig(path, dpi=110)
