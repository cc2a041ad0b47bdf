"""benchmarks.multi_digits (the negative-transfer testbed), benchmarks._mechanism, and the driver pieces they
added: opt-in methods with their own M / L / update order, fresh batches per inner step, the run probe."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import even_odd
from benchmarks import multi_digits as md
from benchmarks._learners import (
    CooperativeLearner,
    Problem,
    Training,
    build_learner,
    check_offered,
    label,
    offered_methods,
)
from benchmarks._images import ImageTasks
from benchmarks._mechanism import MechanismProbe, pair_name, summarise_mechanism
from benchmarks._multi_digits import TASKS, digit_images, multi_digit_pairs, multi_digits
from benchmarks._runs import streams_of
from benchmarks._stats import paired_difference_ci
from cooperative_opt import diagnostics

_QUICK_METHODS = "vanilla,mt_cool_m2,mt_cool_m2_jacobi"


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """One --quick run of a few methods (independent and joint are added by the benchmark itself)."""
    out = tmp_path_factory.mktemp("multi_digits")
    torch.manual_seed(0)
    md.main(["--quick", "--no-progress", "--out-dir", str(out), "--methods", _QUICK_METHODS])
    return json.loads((out / "multi_digits.json").read_text(encoding="utf-8")), out


def _problem(width: int = 2) -> tuple[Problem, Any]:
    data = multi_digits(64, 32, seed=0, shift=2, conflict=1.0)
    return md._problem(md.Testbed(width=width), None, data), data


def _batches(data: Any, count: int, size: int = 16) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    batches = []
    for step in range(count):
        index = torch.arange(step * size, (step + 1) * size) % data.train_x.shape[0]
        x = data.train_x[index]
        batches.append({task: (x, data.train_y[task][index]) for task in TASKS})
    return batches


# ---------------------------------------------------------------------------
# End to end


def test_quick_run_writes_the_gap_the_paired_intervals_and_the_mechanism(quick: tuple[dict[str, Any], Path]) -> None:
    results, out = quick
    methods = results["methods"]
    assert list(methods) == ["independent", "joint", "vanilla", "mt_cool_m2", "mt_cool_m2_jacobi"]
    for name in ("multi_digits.json", "multi_digits.png", "multi_digits_curves.png", "multi_digits_transfer.png",
                 "multi_digits_flatness.png"):
        assert (out / name).stat().st_size > 0, name
    assert results["testbed"] == {"conflict": 1.0, "width": 4, "shift": 2}
    assert len(results["config"]["seeds"]) == 3

    # the gap: Joint - Independent, paired over seeds, at conflict 1 and the conflict-0 control
    gap = results["gap"]
    assert gap["at_conflict"]["conflict"] == 1.0 and gap["control"]["conflict"] == 0.0
    per_seed = [(a + b) / 2 for a, b in zip(*(methods["joint"]["metrics"][f"{t}_acc"]["per_seed"] for t in TASKS))]
    baseline = [(a + b) / 2 for a, b in zip(*(methods["independent"]["metrics"][f"{t}_acc"]["per_seed"] for t in TASKS))]
    expected = paired_difference_ci(per_seed, baseline)
    measured = gap["at_conflict"]["joint_minus_independent"]["mean_acc"]
    assert measured["estimate"] == pytest.approx(expected.estimate)
    assert (measured["low"], measured["high"]) == pytest.approx((expected.low, expected.high))
    assert measured["low"] <= measured["estimate"] <= measured["high"]
    assert gap["at_conflict"]["reading"] == md.gap_reading(measured, 1.0)
    assert gap["at_conflict"]["negative_transfer"] == (measured["high"] < 0)

    # every method: paired intervals against joint and against independent, per task and for the mean
    assert set(results["paired"]) == set(methods)
    for method, entry in results["paired"].items():
        for baseline_name in ("vs_joint", "vs_independent"):
            assert set(entry[baseline_name]) == {"left_acc", "right_acc", "mean_acc"}
    assert results["paired"]["joint"]["vs_joint"]["mean_acc"]["estimate"] == 0.0
    assert results["paired"]["joint"]["vs_independent"]["mean_acc"]["estimate"] == pytest.approx(expected.estimate)
    assert math.isfinite(methods["joint"]["delta_m"]) and methods["independent"]["delta_m"] == 0.0
    # contrasts between the variants present: mt_cool_m2 - vanilla is the same pairing as paired[...]
    contrast = results["contrasts"][f"{label('mt_cool_m2')} − vanilla"]["mean_acc"]
    direct = paired_difference_ci([(a + b) / 2 for a, b in zip(*(methods["mt_cool_m2"]["metrics"][f"{t}_acc"]["per_seed"]
                                                                 for t in TASKS))],
                                  [(a + b) / 2 for a, b in zip(*(methods["vanilla"]["metrics"][f"{t}_acc"]["per_seed"]
                                                                 for t in TASKS))])
    assert contrast["estimate"] == pytest.approx(direct.estimate)
    assert set(results["contrasts"]) == {f"{label('mt_cool_m2')} − vanilla", f"{label('mt_cool_m2_jacobi')} − "
                                                                                 f"{label('mt_cool_m2')}"}

    # the mechanism: transfer series per pair, flatness series per task, clamped per outer iteration
    mechanism = results["mechanism"]
    pairs = {pair_name("left", "right"), pair_name("right", "left")}
    for method in ("vanilla", "mt_cool_m2"):
        assert set(mechanism["transfer"][method]["pairs"]) == pairs
        series = mechanism["transfer"][method]["pairs"]["left->right"]
        assert len(series["series"]) == len(series["iterations"]) == 8  # 2 epochs x 4 steps, every iteration
        assert len(series["per_seed"]) == 3
    assert "mt_cool_m2_jacobi" not in mechanism["transfer"]  # logged for the chosen methods only
    for method in ("joint-split", "vanilla", "mt_cool_m2"):
        flat = mechanism["flatness"][method]
        assert flat["radii"][0] == 0.0 and set(flat["tasks"]) == set(TASKS)
        assert flat["tasks"]["left"]["rise"][0] == 0.0 and len(flat["tasks"]["left"]["loss"]) == len(flat["radii"])
    for method in ("vanilla", "mt_cool_m2", "mt_cool_m2_jacobi"):
        clamped = mechanism["clamped"][method]
        assert len(clamped["series"]) == 8 and all(0.0 <= v <= 1.0 for v in clamped["series"])
        assert clamped["series"][:4] == [0.0] * 4  # warm-up (4 steps): no clamp runs
    assert "mt_cool_m2" in results["tables"]["paired"] or label("mt_cool_m2") in results["tables"]["paired"]


def test_the_probe_keeps_each_runs_records_and_the_vanilla_clamp_never_binds(
    quick: tuple[dict[str, Any], Path],
) -> None:
    results, _ = quick
    runs = results["methods"]["vanilla"]["runs"]
    probe = runs[0]["probe"]
    assert probe["phase"] == ["warmup"] * 4 + ["cooperative"] * 4
    assert all(v == 0.0 for values in probe["clamped"].values() for v in values)  # vanilla has no clamp
    assert "probe" not in results["methods"]["independent"]["runs"][0]
    again = summarise_mechanism(results["methods"])
    assert again["transfer"]["vanilla"]["pairs"]["left->right"]["series"] == pytest.approx(
        results["mechanism"]["transfer"]["vanilla"]["pairs"]["left->right"]["series"])


def test_validation_pairs_never_touch_the_test_pool() -> None:
    pools = multi_digit_pairs(1, 1, seed=5, conflict=1.0)
    fit, held = md.validation_pairs(300, 200, seed=5, conflict=1.0)
    assert bool(torch.isin(fit, pools.train_pool).all()) and bool(torch.isin(held, pools.train_pool).all())
    assert not bool(torch.isin(held, fit).any())  # fit and validation pools are disjoint
    assert not bool(torch.isin(torch.cat([fit, held]), pools.test_pool).any())


def test_the_scenarios_validation_is_the_validation_pairs_split() -> None:
    config = md.parse_args(["--quick", "--train-size", "40", "--test-size", "20", "--batch-size", "16"])[1]
    found, parents = md.scenario_from_args(["--conflict", "0.5", "--quick"])
    assert found.title == md.scenario(md.Testbed(conflict=0.5)).title and len(parents) == 1
    assert found.validation is not None
    held = found.validation(config, 3)
    assert isinstance(held, ImageTasks) and held.source.endswith("(validation)")
    fit_pairs, held_pairs = md.validation_pairs(40, 20, seed=3, conflict=0.5)
    assert torch.equal(held.train_y["left"], digit_images()[1][fit_pairs[:, 0]])
    assert torch.equal(held.test_y["right"], digit_images()[1][held_pairs[:, 1]])


# ---------------------------------------------------------------------------
# Flags, network, metrics


@pytest.mark.parametrize("flags", [["--conflict", "1.5"], ["--conflict", "-0.1"], ["--conflict", "x"],
                                   ["--width", "0"], ["--shift", "17"]])
def test_bad_testbed_flags_exit_with_a_usage_error(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        md.parse_args(["--quick", *flags])
    assert raised.value.code == 2
    assert "expected" in capsys.readouterr().err


def test_bad_options_are_refused_naming_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="--data-dir '/x' is not used"):
        md._sizes(md.parse_args(["--quick", "--data-dir", "/x"])[1])
    with pytest.raises(ValueError, match="drop --distributed"):
        md.parse_args(["--quick", "--distributed"])
    with pytest.raises(ValueError, match=r"--conflict must be a number in \[0, 1\]"):
        md.Testbed(conflict=2.0)
    assert md.cli(["--quick", "--distributed"]) == 2
    assert "drop --distributed" in capsys.readouterr().err


def test_help_lists_the_testbed_flags_beside_the_drivers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        md.parse_args(["--help"])
    shown = capsys.readouterr().out
    assert "--conflict" in shown and "--methods" in shown and "mt_cool_m2_l10" in shown and "--inner-batches" in shown
    assert "--sweep" not in shown  # the parameter study is python -m benchmarks.sweep


def test_defaults_run_every_method_plus_the_full_methods_settings() -> None:
    testbed, config = md.parse_args([])
    assert testbed == md.Testbed(1.0, 4, 2)
    assert config.methods == md.METHODS
    assert md.METHODS == offered_methods(()) + md.STUDY_METHODS
    assert (len(config.seeds), config.epochs, config.train_size, config.optimizer, config.lr) == (10, 10, 3000,
                                                                                                   "adam", 0.002)
    # the opt-in methods stay out of every other scenario's defaults
    assert not set(md.STUDY_METHODS) & set(even_odd.METHODS) and not set(md.STUDY_METHODS) & set(offered_methods(()))


def test_the_encoder_splits_and_the_networks_fit_the_canvas() -> None:
    problem, data = _problem(width=4)
    joint, single = problem.multi_task(), problem.single_task("left")
    x = data.test_x[:3]
    assert joint(x, "right").shape == (3, 10) and single(x).shape == (3, 10)
    assert sum(p.numel() for p in joint.parameters()) == 2144  # the calibrated w = 4 network
    with pytest.raises(ValueError, match="width must be >= 1"):
        md.digit_encoder(0, 10)


def test_evaluate_counts_the_correct_argmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    assert md.evaluate({"left": logits, "right": logits}, {"left": torch.tensor([0, 1, 2, 1]),
                                                           "right": torch.tensor([1, 1, 1, 1])}) == {
        "left_acc": 0.75, "right_acc": 0.25}


def test_gap_reading_names_negative_transfer_a_tie_or_a_positive_gap() -> None:
    assert md.gap_reading({"estimate": -0.05, "low": -0.08, "high": -0.02, "n": 10}, 1.0).startswith(
        "negative transfer at conflict 1.0: Joint is 5.0 pp below")
    assert "a tie" in md.gap_reading({"estimate": -0.01, "low": -0.03, "high": 0.01, "n": 10}, 0.0)
    assert "no negative transfer at conflict 0.0: Joint is 2.0 pp above" in md.gap_reading(
        {"estimate": 0.02, "low": 0.01, "high": 0.03, "n": 10}, 0.0)
    assert "--seeds 2 or more" in md.gap_reading({"estimate": 0.0, "low": math.nan, "high": math.nan, "n": 1}, 1.0)


# ---------------------------------------------------------------------------
# Driver pieces: opt-in methods, fresh inner batches, the probe


def test_opt_in_methods_carry_their_own_settings() -> None:
    problem, _ = _problem()
    training = Training(optimizer="sgd", lr=0.1, samples=1, seed=0)
    settings = {m: build_learner(m, problem, training) for m in md.STUDY_METHODS}
    assert all(isinstance(learner, CooperativeLearner) for learner in settings.values())
    observed = {m: (lrn.optimizer.settings.samples, lrn.optimizer.settings.inner_steps,  # type: ignore[attr-defined]
                    lrn.optimizer.settings.update_order, lrn.inner_batches)  # type: ignore[attr-defined]
                for m, lrn in settings.items()}
    assert observed == {
        "mt_cool_m2": (2, 1, "gauss_seidel", "reuse"), "mt_cool_m4": (4, 1, "gauss_seidel", "reuse"),
        "mt_cool_m2_l10": (2, 10, "gauss_seidel", "fresh"), "mt_cool_m2_jacobi": (2, 1, "jacobi", "reuse"),
    }
    check_offered(list(md.STUDY_METHODS), ())  # accepted when named
    assert label("mt_cool_m2_l10") == "mt_cool (M=2, L=10 fresh)"


def test_fresh_inner_batches_equal_one_outer_iteration_over_the_collected_batches() -> None:
    problem, data = _problem()
    training = Training(optimizer="sgd", lr=0.1, inner_steps=3, samples=2, warmup_steps=1, seed=0)
    torch.manual_seed(0)
    reference = CooperativeLearner(problem, training, "mt_cool")
    torch.manual_seed(0)
    again = CooperativeLearner(problem, training, "mt_cool", inner_batches="fresh")
    assert all(torch.equal(a, b) for a, b in zip(reference.model.state_dict().values(),
                                                again.model.state_dict().values()))
    batches = _batches(data, 7)
    reference.optimizer.step(batches[0])
    reference.optimizer.step(batches[1:4])
    reference.optimizer.step(batches[4:7])
    taken, returned = [], []
    for batch in batches:
        returned.append(again.train_step(batch))
        taken.append(again.optimizer.steps_taken)
    assert taken == [1, 1, 1, 2, 2, 2, 3]  # warm-up takes one batch, then one outer iteration per 3
    assert all(torch.equal(a, b) for a, b in zip(reference.model.state_dict().values(),
                                                again.model.state_dict().values()))
    report = reference.optimizer.last_report
    assert report is not None and returned[-1] == pytest.approx(dict(report.losses))
    assert returned[1] == returned[2] == returned[0]  # collecting calls report the last outer iteration (warm-up)


def test_the_probe_logs_what_the_diagnostics_give_around_each_outer_iteration() -> None:
    problem, data = _problem()
    training = Training(optimizer="sgd", lr=0.1, bound=1e-4, warmup_steps=1, seed=3)
    streams = streams_of(data, TASKS, "cpu")
    watched = build_learner("without_reg", problem, training)
    probe = MechanismProbe(transfer=frozenset({"without_reg"}), flatness=frozenset({"without_reg"}), heldout=16,
                           radii=(0.0, 0.05))("without_reg", 3, watched, streams)
    reference = build_learner("without_reg", problem, training)
    heldout = {task: (data.test_x[:16], data.test_y[task][:16]) for task in TASKS}
    expected: list[dict[tuple[str, str], float]] = []
    clamped: list[dict[str, float]] = []
    assert probe is not None
    for batch in _batches(data, 4):
        probe.step(batch)
        before = diagnostics.snapshot(reference.optimizer)  # type: ignore[attr-defined]
        reference.train_step(batch)
        reference.train(False)
        expected.append(diagnostics.negative_transfer(reference.optimizer, before, heldout))  # type: ignore[attr-defined]
        reference.train(True)
        clamped.append(dict(reference.optimizer.last_report.clamped))  # type: ignore[attr-defined]
    record = probe.finish()
    assert record["phase"] == ["warmup", "cooperative", "cooperative", "cooperative"]
    for mover, task in (("left", "right"), ("right", "left")):
        assert record["transfer"]["pairs"][pair_name(mover, task)] == [e[(mover, task)] for e in expected]
    assert record["clamped"] == {task: [c.get(task, 0.0) for c in clamped] for task in TASKS}
    assert any(v > 0 for v in record["clamped"]["left"])  # SGD 0.1 against b = 1e-4: the clamp binds
    flat = record["flatness"]
    assert flat["radii"] == [0.0, 0.05]
    with torch.no_grad():
        clean = float(torch.nn.functional.cross_entropy(watched.predict(heldout["left"][0], "left"), heldout["left"][1]))
    assert flat["loss"]["left"][0] == pytest.approx(clean, rel=1e-6)


def test_joint_split_flatness_measures_a_copy_that_computes_the_trained_joint_network() -> None:
    problem, data = _problem()
    learner = build_learner("joint", problem, Training(optimizer="adam", lr=2e-3, seed=0))
    for batch in _batches(data, 3):
        learner.train_step(batch)
    probe = MechanismProbe(radii=(0.0, 0.1))("joint", 0, learner, streams_of(data, TASKS, "cpu"))
    assert probe is not None
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}  # type: ignore[attr-defined]
    flat = probe.finish()["flatness"]
    after = learner.model.state_dict()  # type: ignore[attr-defined]
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)  # left unsplit
    x, y = data.test_x[:256], data.test_y["right"][:256]
    with torch.no_grad():
        clean = float(torch.nn.functional.cross_entropy(learner.predict(x, "right"), y))
    assert flat["loss"]["right"][0] == pytest.approx(clean, rel=1e-5)
    assert flat["loss"]["right"][1] != flat["loss"]["right"][0]  # the noise reaches the other task's slices
    assert MechanismProbe()("independent", 0, build_learner("independent", problem, Training()),
                            streams_of(data, TASKS, "cpu")) is None


def test_mechanism_probe_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="every must be a positive int"):
        MechanismProbe(every=0)
    with pytest.raises(ValueError, match="radii must be"):
        MechanismProbe(radii=(-0.1,))
