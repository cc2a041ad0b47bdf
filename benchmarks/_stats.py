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
- :func:`auroc_ci`: binary AUROC (torchmetrics) resampling the examples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

__all__ = ["Interval", "PairedInterval", "auroc_ci", "mean_ci", "paired_difference_ci"]

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


def _resampled_means(kept: Tensor, resamples: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, kept.numel(), (resamples, kept.numel()), generator=generator)
    return kept[index].mean(dim=1)


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
    first, second = _vector("a", a), _vector("b", b)
    if first.numel() != second.numel():
        raise ValueError(
            f"a has {first.numel()} values and b {second.numel()}; pass one value per seed for the same seeds"
        )
    both = torch.isfinite(first) & torch.isfinite(second)
    differences = (first - second)[both]
    estimate = float(differences.mean()) if differences.numel() else math.nan
    if differences.numel() < 2:
        return PairedInterval(estimate, math.nan, math.nan, confidence, differences.numel(), math.nan)
    means = _resampled_means(differences, resamples, seed)
    low, high = _percentiles(means, confidence)
    return PairedInterval(estimate, low, high, confidence, differences.numel(), float((means <= 0).double().mean()))


def auroc_ci(
    scores: Values,
    labels: Values,
    confidence: float = 0.95,
    *,
    resamples: int = 10000,
    seed: int = 0,
    stratified: bool = False,
) -> Interval:
    """Binary AUROC (``torchmetrics``' ``binary_auroc``) with a bootstrap interval over the examples.

    The AUROC of a sample with one class is undefined. If ``labels`` hold one class, the estimate and
    the interval are NaN. If a resample draws one class only, that resample's AUROC is NaN and so is
    the interval: the sample has too few examples of one class for a plain bootstrap, and leaving those
    resamples out would bias the interval. ``stratified=True`` resamples the positives and the
    negatives separately, keeping their counts (as R's pROC does by default), so every resample has
    both classes. torchmetrics computes in float32, whose rounding can step past 1 by an ulp; the
    estimate and the resampled values are clipped to [0, 1]. Each resample costs one ``binary_auroc`` call (about 0.5 ms at 2,000 examples on a
    CPU core), so pass fewer ``resamples`` for quick runs.

    Args:
        scores: ``[N]`` predicted probabilities or logits (any monotone score).
        labels: ``[N]`` 0 or 1.
        confidence, resamples, seed: as in :func:`mean_ci`.
        stratified: resample within each class (see above).

    Example:
        >>> ci = auroc_ci([0.1, 0.4, 0.35, 0.8, 0.7, 0.2], [0, 0, 1, 1, 1, 0], resamples=200, stratified=True)
        >>> round(ci.estimate, 4), ci.n, 0.0 <= ci.low <= ci.estimate <= ci.high <= 1.0
        (0.8889, 6, True)
    """
    from torchmetrics.functional.classification import binary_auroc

    confidence, resamples, seed = _check_options(confidence, resamples, seed)
    score, label = _vector("scores", scores), _vector("labels", labels)
    if score.numel() != label.numel():
        raise ValueError(f"scores has {score.numel()} values and labels {label.numel()}; pass one per example")
    if not bool(torch.isfinite(score).all()):
        raise ValueError("scores holds NaN or infinite values; every example needs a finite score")
    if not bool(((label == 0) | (label == 1)).all()):
        raise ValueError(f"labels must be 0 or 1, got the values {sorted(set(label.tolist()))}")
    target = label.long()
    positives = int(target.sum())
    n = target.numel()
    if positives in (0, n):
        return Interval(math.nan, math.nan, math.nan, confidence, n)
    estimate = min(max(float(binary_auroc(score, target)), 0.0), 1.0)
    generator = torch.Generator().manual_seed(seed)
    if stratified:
        pos, neg = torch.nonzero(target == 1).flatten(), torch.nonzero(target == 0).flatten()
        index = torch.cat(
            [pos[torch.randint(0, pos.numel(), (resamples, pos.numel()), generator=generator)],
             neg[torch.randint(0, neg.numel(), (resamples, neg.numel()), generator=generator)]], dim=1)
    else:
        index = torch.randint(0, n, (resamples, n), generator=generator)
    drawn = target[index].sum(dim=1)
    if bool(((drawn == 0) | (drawn == n)).any()):
        return Interval(estimate, math.nan, math.nan, confidence, n)
    values = torch.stack([binary_auroc(score[i], target[i]) for i in index]).to(torch.float64).clamp(0.0, 1.0)
    low, high = _percentiles(values, confidence)
    return Interval(estimate, low, high, confidence, n)
