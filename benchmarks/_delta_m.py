"""Δm, the average relative change of every metric against a baseline (Maninis et al., CVPR 2019;
the headline figure of the CTAN paper's tables).

    Δm = (100 / K) Σ_k (-1)^{l_k} (M_m,k - M_b,k) / |M_b,k|

over the K table metrics, with l_k = 1 where lower is better, so a positive Δm
means "better than the baseline on average" whatever each metric's direction.
The benchmarks take Independent (STL) as the baseline b.

Rules for values the formula cannot use:

- a metric whose baseline mean is 0 or not finite (NaN: e.g. AUROC on a test set
  of one class) has no relative change; it is left out of the average, for every
  method alike (K counts the metrics kept). The denominator is ``|M_b,k|`` so a
  negative baseline keeps the sign convention (a metric in units that can be
  negative); for the usual positive metrics it is ``M_b,k`` itself;
- a method whose own mean is not finite on a kept metric (a diverged run) has no
  Δm: NaN;
- no metric kept: NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

__all__ = ["Direction", "delta_m", "kept_metrics"]


class Direction(Protocol):
    """What Δm needs of a table column (``benchmarks._scenario.Metric`` fits)."""

    @property
    def key(self) -> str: ...

    @property
    def higher_is_better(self) -> bool: ...


def _value(means: Mapping[str, float | None], key: str, which: str) -> float:
    if key not in means:
        raise ValueError(f"{which} has no mean for metric {key!r} (it has {sorted(means)}); give one per metric")
    value = means[key]
    return math.nan if value is None else float(value)


def kept_metrics(baseline_means: Mapping[str, float | None], metrics: Sequence[Direction]) -> list[str]:
    """The keys of the metrics Δm averages over: those whose baseline mean is finite and not zero."""
    kept = []
    for metric in metrics:
        base = _value(baseline_means, metric.key, "baseline_means")
        if math.isfinite(base) and base != 0.0:
            kept.append(metric.key)
    return kept


def delta_m(
    method_means: Mapping[str, float | None], baseline_means: Mapping[str, float | None], metrics: Sequence[Direction]
) -> float:
    """Δm of a method against the baseline, in percent (module docstring: the formula and its rules).

    Args:
        method_means: the method's mean over seeds of every metric, by key (``None`` counts as NaN).
        baseline_means: the baseline's means, by key.
        metrics: the table's metrics: ``key`` and ``higher_is_better``.

    Raises:
        ValueError: when ``metrics`` is empty or a mapping lacks one of their keys.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True)
        ... class M:
        ...     key: str
        ...     higher_is_better: bool = True
        >>> delta_m({"acc": 0.75, "err": 1.5}, {"acc": 0.5, "err": 2.0}, [M("acc"), M("err", False)])
        37.5
    """
    if not metrics:
        raise ValueError("metrics is empty; Δm averages over at least one metric")
    terms: list[float] = []
    for key in kept_metrics(baseline_means, metrics):
        metric = next(m for m in metrics if m.key == key)
        base = _value(baseline_means, key, "baseline_means")
        value = _value(method_means, key, "method_means")
        if not math.isfinite(value):
            return math.nan
        sign = 1.0 if metric.higher_is_better else -1.0
        terms.append(sign * (value - base) / abs(base))
    if not terms:
        return math.nan
    return 100.0 * sum(terms) / len(terms)
