"""benchmarks._stats: bootstrap intervals of a mean, a paired difference and AUROC."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.functional.classification import binary_auroc, multiclass_auroc

from benchmarks._stats import auroc_ci, mean_ci, paired_difference_ci, ratio_of_medians_ci


def _width(low: float, high: float) -> float:
    return high - low


# ------------------------------------------------------------------ mean_ci


def test_constant_values_give_a_zero_width_interval() -> None:
    ci = mean_ci([0.7] * 8, resamples=500)
    assert ci.low == ci.high == pytest.approx(0.7) and ci.n == 8
    assert ci.estimate == pytest.approx(0.7)


def test_the_interval_matches_a_plain_numpy_bootstrap() -> None:
    values = [0.1, 0.5, 0.2, 0.9, 0.4, 0.3]
    ci = mean_ci(values, 0.9, resamples=4000, seed=1)
    index = torch.randint(0, 6, (4000, 6), generator=torch.Generator().manual_seed(1)).numpy()
    means = np.asarray(values)[index].mean(axis=1)
    assert (ci.low, ci.high) == pytest.approx(tuple(np.quantile(means, [0.05, 0.95])), abs=1e-12)
    assert ci.estimate == pytest.approx(np.mean(values))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=2, max_size=12), st.floats(0.5, 0.99))
def test_the_interval_lies_within_the_values_and_widens_with_confidence(values: list[float], confidence: float) -> None:
    ci = mean_ci(values, confidence, resamples=300)
    wider = mean_ci(values, min(confidence + 0.009, 0.999), resamples=300)
    slack = 1e-9 * (1 + max(abs(v) for v in values))
    assert min(values) - slack <= ci.low <= ci.high <= max(values) + slack
    assert wider.low <= ci.low + slack and ci.high <= wider.high + slack


def test_missing_values_are_left_out() -> None:
    kept = mean_ci([0.2, 0.4, 0.6], resamples=300, seed=3)
    with_gaps = mean_ci([0.2, None, 0.4, math.nan, math.inf, 0.6], resamples=300, seed=3)
    assert with_gaps == kept and with_gaps.n == 3
    single = mean_ci([math.nan, 0.5])
    assert single.estimate == 0.5 and math.isnan(single.low) and math.isnan(single.high) and single.n == 1
    none = mean_ci([math.nan, None])
    assert math.isnan(none.estimate) and none.n == 0


def test_the_seed_fixes_the_interval() -> None:
    values = torch.tensor([0.3, 0.8, 0.5, 0.1, 0.9])
    assert mean_ci(values, seed=4, resamples=500) == mean_ci(values.numpy(), seed=4, resamples=500)
    assert mean_ci(values, seed=4, resamples=500) != mean_ci(values, seed=5, resamples=500)


# ------------------------------------------------------- paired_difference_ci


def test_a_large_shift_is_detected_and_none_is_not() -> None:
    g = torch.Generator().manual_seed(0)
    b = torch.rand(10, generator=g)
    shifted = paired_difference_ci(b + 0.5 + 0.01 * torch.rand(10, generator=g), b, resamples=2000)
    assert shifted.excludes_zero and shifted.low > 0.4 and shifted.p_le_zero == 0.0
    below = paired_difference_ci(b - 0.5, b, resamples=2000)
    assert below.excludes_zero and below.p_le_zero == 1.0
    noise = paired_difference_ci(b + 0.05 * torch.randn(10, generator=g), b, resamples=2000)
    assert not noise.excludes_zero and 0.05 < noise.p_le_zero < 0.95


def test_pairing_narrows_the_interval_on_correlated_seeds() -> None:
    g = torch.Generator().manual_seed(1)
    seed_effect = torch.randn(12, generator=g)  # what the seed does to both methods
    a = seed_effect + 0.1 + 0.02 * torch.randn(12, generator=g)
    b = seed_effect + 0.02 * torch.randn(12, generator=g)
    paired = paired_difference_ci(a, b, resamples=2000)
    # the unpaired bootstrap of mean(a) - mean(b): a and b resampled independently
    ga, gb = torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)
    unpaired = (a[torch.randint(0, 12, (2000, 12), generator=ga)].mean(1)
                - b[torch.randint(0, 12, (2000, 12), generator=gb)].mean(1))
    low, high = torch.quantile(unpaired, torch.tensor([0.025, 0.975])).tolist()
    assert _width(paired.low, paired.high) < 0.2 * _width(low, high)
    assert paired.excludes_zero and not (low > 0 or high < 0)  # only pairing sees the 0.1 gain
    assert paired.estimate == pytest.approx(float((a - b).mean()))


def test_pairs_with_a_missing_side_are_left_out() -> None:
    full = paired_difference_ci([0.5, 0.7, 0.6], [0.4, 0.5, 0.6], resamples=300)
    gaps = paired_difference_ci([0.5, math.nan, 0.7, 0.6, 0.9], [0.4, 0.1, 0.5, 0.6, None], resamples=300)
    assert gaps == full and gaps.n == 3
    one = paired_difference_ci([0.5, math.nan], [0.4, 0.3])
    assert one.n == 1 and math.isnan(one.low) and math.isnan(one.p_le_zero)


# ------------------------------------------------------------------ auroc_ci


def test_auroc_estimate_is_torchmetrics_and_the_interval_covers_it() -> None:
    g = torch.Generator().manual_seed(2)
    labels = (torch.rand(300, generator=g) < 0.4).long()
    scores = labels.double() * 0.8 + torch.randn(300, generator=g, dtype=torch.float64)
    for stratified in (False, True):
        ci = auroc_ci(scores, labels, resamples=300, stratified=stratified)
        assert ci.estimate == pytest.approx(float(binary_auroc(scores, labels)))
        assert 0.5 < ci.low < ci.estimate < ci.high < 1.0 and ci.n == 300
    assert auroc_ci(scores, labels, resamples=200, seed=1) == auroc_ci(scores.tolist(), labels.tolist(),
                                                                        resamples=200, seed=1)


def test_perfect_scores_give_a_zero_width_interval_at_one() -> None:
    labels = [0, 0, 0, 1, 1, 1, 0, 1] * 4
    ci = auroc_ci([float(v) + 0.1 * i / 32 for i, v in enumerate(labels)], labels, resamples=200)
    assert ci.estimate == ci.high == 1.0 and ci.low == pytest.approx(1.0, abs=1e-6)  # float32 inside torchmetrics


def test_one_class_gives_nan_unless_stratified() -> None:
    single = auroc_ci([0.1, 0.5, 0.9], [1, 1, 1], resamples=100)
    assert math.isnan(single.estimate) and math.isnan(single.low) and single.n == 3
    rare = [1] + [0] * 29  # a plain resample draws no positive with probability (29/30)**30, about 0.36
    scores = [0.9] + [0.1 * i / 29 for i in range(29)]
    plain = auroc_ci(scores, rare, resamples=200)
    assert plain.estimate == 1.0 and math.isnan(plain.low) and math.isnan(plain.high)
    kept = auroc_ci(scores, rare, resamples=200, stratified=True)
    assert kept.high == 1.0 and kept.low == pytest.approx(1.0, abs=1e-6)


@pytest.mark.filterwarnings("ignore:No positive samples")
def test_multiclass_auroc_is_torchmetrics_macro_over_the_present_classes() -> None:
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (200,), generator=g)  # class 4 of 5 never occurs
    scores = torch.nn.functional.one_hot(labels, 5).double() + torch.randn(200, 5, generator=g, dtype=torch.float64)
    per_class = multiclass_auroc(scores.float().softmax(dim=1), labels, num_classes=5, average="none")
    ci = auroc_ci(scores.softmax(dim=1), labels, resamples=200, stratified=True)
    assert ci.estimate == pytest.approx(float(per_class[:4].mean()), abs=1e-6)
    assert 0.5 < ci.low < ci.estimate < ci.high <= 1.0 and ci.n == 200
    rare = labels.clone()
    rare[rare == 3] = 0
    rare[0] = 3  # one example of class 3: a plain resample loses it about a third of the time
    assert math.isnan(auroc_ci(scores, rare, resamples=200).low)
    assert not math.isnan(auroc_ci(scores, rare, resamples=200, stratified=True).low)


# ------------------------------------------------------------------ ratio of medians over rounds


def test_ratio_of_medians_matches_statistics_and_a_plain_numpy_paired_bootstrap() -> None:
    import statistics

    a = [1.31, 1.36, 1.29, 1.40, 1.33, 1.30, 1.35]
    b = [1.30, 1.37, 1.31, 1.33, 1.32, 1.29, 1.36]
    ci = ratio_of_medians_ci(a, b, 0.9, resamples=3000, seed=2)
    assert ci.estimate == pytest.approx(statistics.median(a) / statistics.median(b), abs=1e-12) and ci.n == 7
    index = torch.randint(0, 7, (3000, 7), generator=torch.Generator().manual_seed(2)).numpy()
    ratios = np.median(np.asarray(a)[index], axis=1) / np.median(np.asarray(b)[index], axis=1)  # rounds kept paired
    assert (ci.low, ci.high) == pytest.approx(tuple(np.quantile(ratios, [0.05, 0.95])), abs=1e-12)


def test_ratio_of_medians_of_equal_rounds_is_one_with_zero_width_and_a_shift_is_seen() -> None:
    same = ratio_of_medians_ci([1.3, 1.5, 1.2, 1.4], [1.3, 1.5, 1.2, 1.4], resamples=500)
    assert same.estimate == same.low == same.high == 1.0
    slower = ratio_of_medians_ci([1.45, 1.62, 1.38, 1.51, 1.49], [1.30, 1.41, 1.22, 1.35, 1.33], resamples=2000)
    assert slower.low > 1.0  # every round 10-15 % slower: the interval excludes parity
    gaps = ratio_of_medians_ci([1.3, None, 1.5, 1.2], [1.3, 1.4, math.nan, 1.2], resamples=500)
    assert gaps.n == 2  # a round missing on either side is left out


# ------------------------------------------------------------------ bad input


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="confidence must be a float in \\(0, 1\\).*got 95"):
        mean_ci([1.0, 2.0], 95)
    with pytest.raises(ValueError, match="resamples must be a positive int.*got 0"):
        mean_ci([1.0, 2.0], resamples=0)
    with pytest.raises(TypeError, match="seed must be an int, got float"):
        mean_ci([1.0, 2.0], seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="values is empty"):
        mean_ci([])
    with pytest.raises(ValueError, match="values must be 1-D .* got shape \\(2, 2\\)"):
        mean_ci(torch.ones(2, 2))
    with pytest.raises(TypeError, match="values must hold numbers"):
        mean_ci(["a", "b"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="values must be a sequence of floats"):
        mean_ci(3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a has 3 values and b 2"):
        paired_difference_ci([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="a has 3 values and b 2; pass one value per round"):
        ratio_of_medians_ci([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="labels must be 0 or 1, got the values \\[0.0, 2.0\\]"):
        auroc_ci([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="scores holds NaN"):
        auroc_ci([0.1, math.nan], [0, 1])
    with pytest.raises(ValueError, match="scores has 2 examples and labels 3"):
        auroc_ci([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="labels must be class indices 0..2"):
        auroc_ci(torch.rand(4, 3), [0, 1, 3, 1])
    with pytest.raises(ValueError, match="C >= 2 classes"):
        auroc_ci(torch.rand(4, 1), [0, 0, 0, 0])
