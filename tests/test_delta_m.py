"""Δm (``benchmarks._delta_m``): the formula on hand-computed examples, its rules for unusable values,
its properties, and the column it adds to every table."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks._delta_m import delta_m, kept_metrics
from benchmarks._scenario import Metric
from benchmarks._summary import add_delta_m, markdown_table, summarise

ACC = Metric("acc", "Acc (%)")
DICE = Metric("dice", "Dice (%)")
ERR = Metric("err", "Dose error (Gy)", percent=False, higher_is_better=False)
METRICS = (ACC, DICE, ERR)


def test_hand_computed_example_with_a_lower_is_better_metric() -> None:
    baseline = {"acc": 0.8, "dice": 0.5, "err": 2.0}
    method = {"acc": 0.9, "dice": 0.4, "err": 1.5}
    # acc: +0.1 / 0.8 = +12.5 %; dice: -0.1 / 0.5 = -20 %; err is lower-is-better: -(-0.5 / 2.0) = +25 %
    assert delta_m(method, baseline, METRICS) == pytest.approx((12.5 - 20.0 + 25.0) / 3)
    assert delta_m(method, baseline, METRICS) == pytest.approx(5.833333333)
    # the same error read as higher-is-better counts against the method instead
    flipped = (ACC, DICE, Metric("err", "err"))
    assert delta_m(method, baseline, flipped) == pytest.approx((12.5 - 20.0 - 25.0) / 3)
    assert delta_m(baseline, baseline, METRICS) == 0.0


def test_a_zero_or_undefined_baseline_metric_is_left_out_for_every_method() -> None:
    baseline = {"acc": 0.0, "dice": 0.5, "err": math.nan}
    method = {"acc": 0.3, "dice": 0.6, "err": 1.0}
    assert kept_metrics(baseline, METRICS) == ["dice"]
    assert delta_m(method, baseline, METRICS) == pytest.approx(20.0)  # dice alone: +0.1 / 0.5
    assert math.isnan(delta_m(method, {"acc": 0.0, "dice": 0.0, "err": None}, METRICS))  # nothing kept


def test_a_method_without_a_value_on_a_kept_metric_has_no_delta_m() -> None:
    baseline = {"acc": 0.8, "dice": 0.5, "err": 2.0}
    assert math.isnan(delta_m({"acc": 0.9, "dice": math.nan, "err": 1.0}, baseline, METRICS))
    assert math.isnan(delta_m({"acc": 0.9, "dice": None, "err": 1.0}, baseline, METRICS))


def test_a_negative_baseline_keeps_the_sign_convention() -> None:
    bias = Metric("bias", "signed error", percent=False)  # higher is better, baseline below zero
    assert delta_m({"bias": -1.0}, {"bias": -2.0}, [bias]) == pytest.approx(50.0)  # it went up: better


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="metrics is empty"):
        delta_m({}, {}, [])
    with pytest.raises(ValueError, match=r"method_means has no mean for metric 'err'"):
        delta_m({"acc": 1.0, "dice": 1.0}, {"acc": 1.0, "dice": 1.0, "err": 1.0}, METRICS)
    with pytest.raises(ValueError, match=r"baseline_means has no mean for metric 'acc'"):
        delta_m({"acc": 1.0}, {}, [ACC])


positive = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)


@given(st.lists(st.tuples(positive, positive, st.booleans(), positive), min_size=1, max_size=6))
def test_delta_m_is_the_mean_signed_relative_change_and_ignores_units(
    rows: list[tuple[float, float, bool, float]],
) -> None:
    metrics = [Metric(f"m{i}", f"m{i}", higher_is_better=up) for i, (_, _, up, _) in enumerate(rows)]
    method = {f"m{i}": m for i, (m, _, _, _) in enumerate(rows)}
    baseline = {f"m{i}": b for i, (_, b, _, _) in enumerate(rows)}
    expected = 100 * sum((m - b) / b * (1 if up else -1) for m, b, up, _ in rows) / len(rows)
    assert delta_m(method, baseline, metrics) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # a change of unit (each metric times its own positive factor) leaves every relative change alone
    scaled_method = {f"m{i}": m * c for i, (m, _, _, c) in enumerate(rows)}
    scaled_baseline = {f"m{i}": b * c for i, (_, b, _, c) in enumerate(rows)}
    assert delta_m(scaled_method, scaled_baseline, metrics) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def _run(acc: float, err: float) -> dict[str, object]:
    return {"final": {"acc": acc, "dice": 0.5, "err": err}, "num_parameters": 10, "wall_time_s": 1.0}


def test_every_summary_gets_delta_m_and_the_table_its_column() -> None:
    summaries = {
        "independent": summarise(METRICS, [_run(0.8, 2.0), _run(0.8, 2.0)], 5),
        "joint": summarise(METRICS, [_run(0.9, 1.0), _run(0.7, 1.0)], 5),
    }
    assert add_delta_m(summaries, METRICS) == ["acc", "dice", "err"]
    assert summaries["independent"]["delta_m"] == 0.0
    assert summaries["joint"]["delta_m"] == pytest.approx((0.0 + 0.0 + 50.0) / 3)  # acc mean 0.8, err halved
    table = markdown_table(METRICS, summaries)
    assert table.splitlines()[0] == (
        "| method | params | Acc (%) | Dice (%) | Dose error (Gy) | Δm (%) | Δm − joint [95 % CI] |")
    independent = "| independent (STL) | 2.00 | 80.00 ± 0.00 | 50.00 ± 0.00 | 2.000 ± 0.000 |"
    assert table.splitlines()[2].startswith(independent)
    assert table.splitlines()[2].endswith("| +0.00 | -16.67 [-20.83, -12.50] |")  # per seed 20.83 and 12.50
    assert table.splitlines()[3].endswith("| +16.67 | – |")
    assert table.splitlines()[3].startswith("| joint (HPS) |")


def test_delta_m_is_also_paired_per_seed_with_an_interval_against_joint() -> None:
    summaries = {
        "independent": summarise(METRICS, [_run(0.8, 2.0), _run(0.6, 2.0), _run(0.5, 1.0)], 5),
        "joint": summarise(METRICS, [_run(0.8, 1.0), _run(0.6, 2.0), _run(0.5, 1.0)], 5),
        "other": summarise(METRICS, [_run(0.4, 2.0), _run(0.9, 2.0), _run(0.5, 2.0)], 5),
    }
    add_delta_m(summaries, METRICS)
    # seed by seed against independent's same seed: acc, dice (always 0.5: 0) and err, over 3 metrics
    assert summaries["joint"]["delta_m_per_seed"] == pytest.approx([50 / 3, 0.0, 0.0])
    assert summaries["other"]["delta_m_per_seed"] == pytest.approx([-50 / 3, 50 / 3, -100 / 3])
    versus = summaries["other"]["delta_m_vs_joint"]
    assert versus["n"] == 3 and versus["mean"] == pytest.approx((-100 / 3 + 50 / 3 - 100 / 3) / 3)
    assert versus["low"] < versus["mean"] < versus["high"]
    assert "delta_m_vs_joint" not in summaries["joint"]
    one_seed = {m: summarise(METRICS, [_run(0.8, 2.0)], 5) for m in ("independent", "joint")}
    add_delta_m(one_seed, METRICS)
    assert markdown_table(METRICS, one_seed).splitlines()[2].endswith("| +0.00 | +0.00 |")  # no interval


def test_without_independent_delta_m_is_not_available() -> None:
    summaries = {"joint": summarise(METRICS, [_run(0.9, 1.0)], 10)}
    assert add_delta_m(summaries, METRICS) is None
    assert math.isnan(summaries["joint"]["delta_m"])
    assert markdown_table(METRICS, summaries).splitlines()[2].endswith("| n/a |")
