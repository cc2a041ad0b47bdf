"""Bootstrap confidence intervals for the benchmark tables: a mean over seeds, a paired difference, AUROC.

All three are percentile bootstraps: draw ``resamples`` samples with
replacement from a seeded ``torch.Generator``, compute the statistic on
each, and take the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``
quantiles (linear interpolation, NumPy's default). The same ``seed`` gives
the same interval.

Missing values follow the rule of :func:`benchmarks._summary.mean_std`: a
seed whose value is NaN, infinite (a diverged run) or ``None`` (NaN after the
JSON round trip) is left out, and ``n`` says how many values were kept. With
fewer than two kept values there is no spread to resample: the estimate is
the one value (or NaN) and ``low`` / ``high`` are NaN.

- :func:`mean_ci`: the mean over seeds.
- :func:`paired_difference_ci`: ``mean(a - b)`` over seeds run in pairs
  (method against Joint on the same seed), resampling the pairs, so what the
  seed does to both methods cancels; plus the fraction of resamples ``<= 0``,
  a one-sided p-like figure for "a beats b".
- :func:`auroc_ci`: AUROC (torchmetrics; binary, or multiclass macro one-vs-rest) resampling the examples.
- :func:`ratio_of_medians_ci`: ``median(a) / median(b)`` over paired rounds of a timing benchmark,
  resampling the rounds (both methods' values of a round stay together).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Final, Union

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

__all__ = ["TABLE_RESAMPLES", "Interval", "PairedInterval", "auroc_ci", "mean_ci", "paired_difference_ci",
           "ratio_of_medians_ci"]

TABLE_RESAMPLES: Final[int] = 1000
"""Resamples of the per-run test-set intervals in the scenario tables (``Scenario.intervals``): enough for a
95 % percentile interval to about +-0.005 of AUROC, at about a second per run."""

Values = Union[Sequence[Union[float, None]], Tensor, npt.NDArray[np.floating]]
"""One value per seed (or per example): a sequence of floats (``None`` allowed), a 1-D tensor or array."""


@dataclass(frozen=True)
class Interval:
    """A statistic with its bootstrap confidence interval.

    Attributes:
        estimate: the statistic on the values themselves (not a bootstrap mean).
        low: the lower end of the interval (NaN where it cannot be estimated).
        high: the upper end.
        confidence: the interval's nominal coverage, e.g. 0.95.
        n: the number of values (pairs, examples) it was computed on, after leaving out missing ones.
    """

    estimate: float
    low: float
    high: float
    confidence: float
    n: int

    def record(self) -> dict[str, float | int]:
        """Every field, for the JSON results (``p_le_zero`` too for a :class:`PairedInterval`).

        Example:
            >>> Interval(0.5, 0.25, 0.75, 0.95, 10).record()
            {'estimate': 0.5, 'low': 0.25, 'high': 0.75, 'confidence': 0.95, 'n': 10}
        """
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0 (False when it is NaN)."""
        return self.low > 0.0 or self.high < 0.0


@dataclass(frozen=True)
class PairedInterval(Interval):
    """:class:`Interval` of ``mean(a - b)`` plus ``p_le_zero``.

    Attributes:
        p_le_zero: the fraction of resampled means that are ``<= 0``: near 0 when a is reliably above
            b, near 1 when it is reliably below (a one-sided bootstrap p-value for ``mean(a - b) > 0``).
            NaN where the interval is.
    """

    p_le_zero: float


def _check_options(confidence: object, resamples: object, seed: object) -> tuple[float, int, int]:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be a float in (0, 1), e.g. 0.95; got {confidence!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, e.g. 10000; got {resamples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    return float(confidence), resamples, seed


def _vector(argument: str, values: object) -> Tensor:
    """``values`` as a 1-D float64 tensor, ``None`` as NaN."""
    if isinstance(values, Tensor):
        vector = values.detach().to("cpu", torch.float64)
    elif isinstance(values, np.ndarray):
        vector = torch.from_numpy(np.asarray(values, dtype=np.float64))
    elif isinstance(values, Sequence) and not isinstance(values, (str, bytes)):
        try:
            vector = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{argument} must hold numbers (or None for a missing value), got {list(values)!r}") from None
    else:
        raise TypeError(f"{argument} must be a sequence of floats, a 1-D tensor or array; got {type(values).__name__}")
    if vector.ndim != 1:
        raise ValueError(f"{argument} must be 1-D (one value per seed or example), got shape {tuple(vector.shape)}")
    if vector.numel() == 0:
        raise ValueError(f"{argument} is empty; pass at least one value")
    return vector


def _percentiles(statistics: Tensor, confidence: float) -> tuple[float, float]:
    """The percentile interval of the bootstrap distribution ``statistics`` (NaN if any resample is NaN)."""
    if bool(torch.isnan(statistics).any()):
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2.0
    low, high = torch.quantile(statistics, torch.tensor([tail, 1.0 - tail], dtype=statistics.dtype)).tolist()
    return float(low), float(high)


def _paired(a: Values, b: Values, unit: str) -> tuple[Tensor, Tensor]:
    """``a`` and ``b`` as vectors of equal length, without the ``unit``s (seeds, rounds) missing on either side."""
    first, second = _vector("a", a), _vector("b", b)
    if first.numel() != second.numel():
        raise ValueError(
            f"a has {first.numel()} values and b {second.numel()}; pass one value per {unit} for the same {unit}s"
        )
    both = torch.isfinite(first) & torch.isfinite(second)
    return first[both], second[both]


def _resampled_indices(n: int, resamples: int, seed: int) -> Tensor:
    """``[resamples, n]`` indices drawn with replacement, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (resamples, n), generator=generator)


def _resampled_means(kept: Tensor, resamples: int, seed: int) -> Tensor:
    return kept[_resampled_indices(kept.numel(), resamples, seed)].mean(dim=1)


def mean_ci(values: Values, confidence: float = 0.95, *, resamples: int = 10000, seed: int = 0) -> Interval:
    """The mean of ``values`` (one per seed) with a percentile-bootstrap confidence interval.

    Args:
        values: ``[S]`` one value per seed; NaN, infinite and ``None`` values are left out (module docstring).
        confidence: the interval's coverage, in (0, 1).
        resamples: bootstrap resamples (10,000 take about a millisecond for 10 seeds).
        seed: seeds the resampling; the same seed gives the same interval.

    Example:
        >>> ci = mean_ci([0.81, 0.84, 0.79, float("nan"), 0.83])
        >>> ci.n, round(ci.estimate, 4), ci.low <= ci.estimate <= ci.high
        (4, 0.8175, True)
    """
    confidence, resamples, seed = _check_options(confidence, resamples, seed)
    vector = _vector("values", values)
    kept = vector[torch.isfinite(vector)]
    estimate = float(kept.mean()) if kept.numel() else math.nan
    if kept.numel() < 2:
        return Interval(estimate, math.nan, math.nan, confidence, kept.numel())
    low, high = _percentiles(_resampled_means(kept, resamples, seed), confidence)
    return Interval(estimate, low, high, confidence, kept.numel())


def paired_difference_ci(
    a: Values, b: Values, confidence: float = 0.95, *, resamples: int = 10000, seed: int = 0
) -> PairedInterval:
    """``mean(a - b)`` over paired seeds with a paired-bootstrap interval and the fraction of resamples ``<= 0``.

    ``a[s]`` and ``b[s]`` must come from the same seed ``s`` (same data, split and initialisation), so
    the bootstrap resamples seeds, not the two methods separately: what a seed does to both cancels,
    and the interval is narrower than the unpaired one wherever the methods' results are correlated.

    Args:
        a: ``[S]`` the method's value per seed.
        b: ``[S]`` the baseline's value for the same seeds (e.g. Joint).
        confidence, resamples, seed: as in :func:`mean_ci`. A pair with a missing value on either side is
            left out.

    Example:
        >>> ci = paired_difference_ci([0.82, 0.86, 0.80, 0.84], [0.80, 0.85, 0.77, 0.83])
        >>> round(ci.estimate, 4), ci.excludes_zero, ci.p_le_zero
        (0.0175, True, 0.0)
    """
    confidence, resamples, seed = _check_options(confidence, resamples, seed)
    first, second = _paired(a, b, "seed")
    differences = first - second
    estimate = float(differences.mean()) if differences.numel() else math.nan
    if differences.numel() < 2:
        return PairedInterval(estimate, math.nan, math.nan, confidence, differences.numel(), math.nan)
    means = _resampled_means(differences, resamples, seed)
    low, high = _percentiles(means, confidence)
    return PairedInterval(estimate, low, high, confidence, differences.numel(), float((means <= 0).double().mean()))


def ratio_of_medians_ci(
    a: Values, b: Values, confidence: float = 0.95, *, resamples: int = 10000, seed: int = 0
) -> Interval:
    """``median(a) / median(b)`` over paired rounds with a paired-bootstrap interval.

    ``a[r]`` and ``b[r]`` are measured in the same round ``r`` (e.g. each method's time on 2 ranks over its
    time on 1, the rounds alternating the methods), so the bootstrap resamples rounds, keeping each round's
    two values together. Medians are interpolated (``statistics.median``).

    Args:
        a: ``[R]`` the first quantity per round.
        b: ``[R]`` the second, for the same rounds (positive).
        confidence, resamples, seed: as in :func:`mean_ci`. A round with a missing value on either side is
            left out.

    Example:
        >>> ci = ratio_of_medians_ci([1.30, 1.34, 1.31, 1.36, 1.29], [1.30, 1.31, 1.33, 1.32, 1.30])
        >>> round(ci.estimate, 4), ci.low <= ci.estimate <= ci.high
        (1.0, True)
    """
    confidence, resamples, seed = _check_options(confidence, resamples, seed)
    first, second = _paired(a, b, "round")
    estimate = float(torch.quantile(first, 0.5) / torch.quantile(second, 0.5)) if first.numel() else math.nan
    if first.numel() < 2:
        return Interval(estimate, math.nan, math.nan, confidence, first.numel())
    index = _resampled_indices(first.numel(), resamples, seed)
    ratios = torch.quantile(first[index], 0.5, dim=1) / torch.quantile(second[index], 0.5, dim=1)
    low, high = _percentiles(ratios, confidence)
    return Interval(estimate, low, high, confidence, first.numel())


def _scores(scores: Values | Tensor) -> Tensor:
    """``scores`` as float64: ``[N]`` (binary) or ``[N, C]`` (multiclass)."""
    if isinstance(scores, Tensor) and scores.ndim == 2:
        matrix = scores.detach().to("cpu", torch.float64)
    elif isinstance(scores, np.ndarray) and scores.ndim == 2:
        matrix = torch.from_numpy(np.asarray(scores, dtype=np.float64))
    else:
        return _vector("scores", scores)
    if matrix.shape[0] == 0 or matrix.shape[1] < 2:
        raise ValueError(f"scores [N, C] needs N >= 1 examples and C >= 2 classes, got shape {tuple(matrix.shape)}")
    return matrix


def _auroc(score: Tensor, target: Tensor, present: Tensor) -> Tensor:
    """Binary AUROC, or the macro one-vs-rest AUROC over the classes ``present``, clipped to [0, 1]."""
    import warnings

    from torchmetrics.functional.classification import binary_auroc, multiclass_auroc

    if score.ndim == 1:
        value = binary_auroc(score, target)
    else:
        with warnings.catch_warnings():
            # a class absent from a resample is masked out below; torchmetrics warns about it
            warnings.filterwarnings("ignore", message=r".*positive samples", category=UserWarning)
            per_class = multiclass_auroc(score, target, num_classes=score.shape[1], average="none")
        value = per_class[present].mean()
    return value.to(torch.float64).clamp(0.0, 1.0)


def auroc_ci(
    scores: Values | Tensor,
    labels: Values,
    confidence: float = 0.95,
    *,
    resamples: int = 10000,
    seed: int = 0,
    stratified: bool = False,
) -> Interval:
    """AUROC (torchmetrics) with a bootstrap interval over the examples: binary, or multiclass macro one-vs-rest.

    Binary (``scores`` ``[N]``, ``labels`` 0 / 1): ``binary_auroc``. Multiclass (``scores`` ``[N, C]``
    probabilities or logits, ``labels`` in 0..C-1): ``multiclass_auroc`` per class, averaged over the
    classes present in ``labels`` (a class absent from the test set has no AUROC), as the HAM10000
    benchmark scores it.

    The AUROC needs two classes. If ``labels`` hold one, the estimate and the interval are NaN. If a
    resample loses a class present in ``labels``, that resample's AUROC is undefined (or averages over
    fewer classes) and the interval is NaN: the sample has too few examples of one class for a plain
    bootstrap, and leaving those resamples out would bias the interval. ``stratified=True`` resamples
    within each class, keeping its count (as R's pROC does by default), so every resample has every
    class. torchmetrics computes in float32, whose rounding can step past 1 by an ulp; the estimate and
    the resampled values are clipped to [0, 1]. Each resample costs one torchmetrics call (about 0.5 ms
    at 2,000 binary examples on a CPU core), so pass fewer ``resamples`` for quick runs.

    Args:
        scores: ``[N]`` binary scores (any monotone score) or ``[N, C]`` class scores.
        labels: ``[N]``: 0 or 1 for binary scores, 0..C-1 for class scores.
        confidence, resamples, seed: as in :func:`mean_ci`.
        stratified: resample within each class (see above).

    Example:
        >>> ci = auroc_ci([0.1, 0.4, 0.35, 0.8, 0.7, 0.2], [0, 0, 1, 1, 1, 0], resamples=200, stratified=True)
        >>> round(ci.estimate, 4), ci.n, 0.0 <= ci.low <= ci.estimate <= ci.high <= 1.0
        (0.8889, 6, True)
        >>> three = torch.tensor([[3.0, 0, 0], [2, 1, 0], [0, 3, 0], [0, 0, 3], [1, 0, 2], [0, 2, 1]])
        >>> auroc_ci(three, [0, 0, 1, 2, 2, 1], resamples=100, stratified=True).estimate
        1.0
    """
    confidence, resamples, seed = _check_options(confidence, resamples, seed)
    score, label = _scores(scores), _vector("labels", labels)
    if score.shape[0] != label.numel():
        raise ValueError(f"scores has {score.shape[0]} examples and labels {label.numel()}; pass one label per example")
    if not bool(torch.isfinite(score).all()):
        raise ValueError("scores holds NaN or infinite values; every example needs a finite score")
    classes = 2 if score.ndim == 1 else score.shape[1]
    if not bool(((label >= 0) & (label < classes) & (label == label.round())).all()):
        allowed = "0 or 1" if score.ndim == 1 else f"class indices 0..{classes - 1} (one per column of scores)"
        raise ValueError(f"labels must be {allowed}, got the values {sorted(set(label.tolist()))}")
    target = label.long()
    n = target.numel()
    counts = torch.bincount(target, minlength=classes)
    present = counts > 0
    if int(present.sum()) < 2:
        return Interval(math.nan, math.nan, math.nan, confidence, n)
    estimate = float(_auroc(score, target, present))
    generator = torch.Generator().manual_seed(seed)
    if stratified:
        members = [torch.nonzero(target == k).flatten() for k in range(classes) if counts[k] > 0]
        index = torch.cat([m[torch.randint(0, m.numel(), (resamples, m.numel()), generator=generator)]
                           for m in members], dim=1)
    else:
        index = torch.randint(0, n, (resamples, n), generator=generator)
    drawn = torch.nn.functional.one_hot(target[index], classes).sum(dim=1) > 0  # [resamples, classes]
    if not bool((drawn == present).all()):
        return Interval(estimate, math.nan, math.nan, confidence, n)
    values = torch.stack([_auroc(score[i], target[i], present) for i in index])
    low, high = _percentiles(values, confidence)
    return Interval(estimate, low, high, confidence, n)
