"""Per-method summaries of a scenario run and the markdown table, Δm column included."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from benchmarks._delta_m import delta_m, kept_metrics
from benchmarks._learners import label
from benchmarks._stats import paired_difference_ci

if TYPE_CHECKING:
    from benchmarks._scenario import Metric

__all__ = ["BASELINE", "REFERENCE", "add_delta_m", "interval_table", "interval_text", "markdown_table", "mean_std", "summarise"]

BASELINE = "independent"
"""The method Δm is measured against (single-task learning)."""

REFERENCE = "joint"
"""The method every other one is compared with seed by seed (hard parameter sharing)."""


def mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) over the finite values; NaN, NaN if there is none.

    A seed whose value is NaN (a diverged run, an undefined metric) or ``None`` (NaN after the JSON
    round trip) is left out of both.

    Example:
        >>> mean_std([1.0, float("nan"), 3.0])
        (2.0, 1.4142135623730951)
    """
    kept = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not kept:
        return math.nan, math.nan
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0


def summarise(metrics: Sequence[Metric], runs: list[dict[str, Any]], joint_parameters: int) -> dict[str, Any]:
    """One method's summary: parameter count and ratio to Joint, each metric's mean/std/per-seed (and, for a
    metric with test-set bootstrap intervals, ``intervals``: one ``{"estimate", "low", "high", "n"}`` per
    seed), the runs."""
    summary: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        per_seed = [float(run["final"].get(metric.key, math.nan)) for run in runs]
        mean, std = mean_std(per_seed)
        summary[metric.key] = {"mean": mean, "std": std, "per_seed": per_seed}
        intervals = [run.get("intervals", {}).get(metric.key) for run in runs]
        if any(interval is not None for interval in intervals):
            summary[metric.key]["intervals"] = intervals
    parameters = int(runs[0]["num_parameters"])
    return {
        "params": parameters,
        "params_ratio": parameters / joint_parameters,
        "metrics": summary,
        "delta_m": math.nan,
        "wall_time_s": sum(float(run["wall_time_s"]) for run in runs),
        "runs": runs,
    }


def _means(summary: Mapping[str, Any]) -> dict[str, float | None]:
    return {key: value["mean"] for key, value in summary["metrics"].items()}


def _seed_means(summary: Mapping[str, Any], seed: int) -> dict[str, float | None]:
    return {key: value["per_seed"][seed] for key, value in summary["metrics"].items()}


def add_delta_m(summaries: Mapping[str, dict[str, Any]], metrics: Sequence[Metric]) -> list[str] | None:
    """Set every summary's ``delta_m`` against :data:`BASELINE` (NaN when it was not run); return the keys
    of the metrics Δm averaged over, ``None`` without the baseline.

    Also sets ``delta_m_per_seed`` (seed s of the method against seed s of the baseline: the runs of one
    seed share initialisation, data and batches) and, when :data:`REFERENCE` ran too,
    ``delta_m_vs_joint``: the paired bootstrap 95 % interval (:func:`benchmarks._stats.paired_difference_ci`)
    of the per-seed Δm difference to Joint, ``{"mean", "low", "high", "n"}`` (low and high NaN below two seeds).
    """
    if BASELINE not in summaries:
        for summary in summaries.values():
            summary["delta_m"] = math.nan
        return None
    baseline = _means(summaries[BASELINE])
    seeds = len(summaries[BASELINE]["runs"])
    for summary in summaries.values():
        summary["delta_m"] = delta_m(_means(summary), baseline, metrics)
        summary["delta_m_per_seed"] = [
            delta_m(_seed_means(summary, s), _seed_means(summaries[BASELINE], s), metrics) for s in range(seeds)
        ]
    if REFERENCE in summaries:
        reference = summaries[REFERENCE]["delta_m_per_seed"]
        for method, summary in summaries.items():
            if method == REFERENCE:
                continue
            interval = paired_difference_ci(summary["delta_m_per_seed"], reference)
            summary["delta_m_vs_joint"] = {
                "mean": interval.estimate, "low": interval.low, "high": interval.high, "n": interval.n,
            }
    return kept_metrics(baseline, metrics)


def _cell(metric: Metric, summary: Mapping[str, Any]) -> str:
    mean, std = summary["mean"], summary["std"]
    if mean is None or not math.isfinite(mean):
        return "n/a"
    digits = 2 if metric.percent else 3
    return f"{metric.show(mean):.{digits}f} ± {metric.show(std):.{digits}f}"


def _delta_cell(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.2f}"


def interval_text(estimate: float | None, low: float | None, high: float | None, no_interval: str = "") -> str:
    """``+1.23 [+0.45, +2.01]``; ``n/a`` without an estimate; the estimate and ``no_interval`` without an
    interval (``None`` or NaN, as after the JSON round trip).

    Example:
        >>> interval_text(1.234, 0.5, 2.0), interval_text(1.0, None, None, " (no CI)"), interval_text(None, 1, 2)
        ('+1.23 [+0.50, +2.00]', '+1.00 (no CI)', 'n/a')
    """
    if estimate is None or not math.isfinite(estimate):
        return "n/a"
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return f"{estimate:+.2f}{no_interval}"
    return f"{estimate:+.2f} [{low:+.2f}, {high:+.2f}]"


def _versus_cell(interval: Mapping[str, Any] | None) -> str:
    return "–" if interval is None else interval_text(interval["mean"], interval["low"], interval["high"])


def markdown_table(metrics: Sequence[Metric], summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """The results laid out like the papers' tables: one row per method, Params relative to Joint, Δm (%)
    against Independent ("n/a" when Independent was not run) and, when Joint ran, the per-seed Δm
    difference to Joint with its paired bootstrap 95 % interval (a single value below two seeds)."""
    versus = REFERENCE in summaries and BASELINE in summaries
    rows = [
        "| method | params | " + " | ".join(metric.header for metric in metrics) + " | Δm (%) |"
        + (" Δm − joint [95 % CI] |" if versus else ""),
        "|---|---:|" + "---:|" * (len(metrics) + 1 + int(versus)),
    ]
    for method, summary in summaries.items():
        cells = [_cell(metric, summary["metrics"][metric.key]) for metric in metrics]
        rows.append(f"| {label(method)} | {summary['params_ratio']:.2f} | " + " | ".join(cells)
                    + f" | {_delta_cell(summary.get('delta_m'))} |"
                    + (f" {_versus_cell(summary.get('delta_m_vs_joint'))} |" if versus else ""))
    return "\n".join(rows)


def _interval_cell(metric: Metric, interval: Mapping[str, Any] | None) -> str:
    if interval is None or interval["estimate"] is None or not math.isfinite(interval["estimate"]):
        return "n/a"
    digits = 1 if metric.percent else 3
    estimate = f"{metric.show(interval['estimate']):.{digits}f}"
    low, high = interval["low"], interval["high"]
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return estimate
    return f"{estimate} [{metric.show(low):.{digits}f}, {metric.show(high):.{digits}f}]"


def interval_table(metrics: Sequence[Metric], summaries: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The metrics that carry test-set bootstrap intervals (AUROC: ``Scenario.intervals``), one row per method,
    every seed's value with its 95 % interval over the test examples (seeds separated by ``;``, in seed order);
    ``None`` when no metric has intervals."""
    shown = [m for m in metrics if any("intervals" in s["metrics"][m.key] for s in summaries.values())]
    if not shown:
        return None
    rows = ["| method | " + " | ".join(f"{m.header}, per seed [95 % CI]" for m in shown) + " |",
            "|---|" + "---:|" * len(shown)]
    for method, summary in summaries.items():
        cells = ["; ".join(_interval_cell(m, i) for i in summary["metrics"][m.key].get("intervals", [None]))
                 for m in shown]
        rows.append(f"| {label(method)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
