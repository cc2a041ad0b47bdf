"""benchmarks.sweep (the parameter study of MT-COOL over b, M, λ and L), the validation split it trains on
(``Scenario.validation`` or ``ImageTasks.validation_split``), and the ``--inner-batches`` run option."""

from __future__ import annotations

import doctest
import json
import math
import shlex
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import even_odd
from benchmarks import multi_digits as md
from benchmarks import sweep
from benchmarks._delta_m import delta_m
from benchmarks._images import ImageTasks
from benchmarks._learners import InnerBatches, Learner, Training, build_learner
from benchmarks._options import parse_args as driver_args
from benchmarks._runs import Stream, run_scenario
from benchmarks._scenario import Metric, Scenario, ScenarioConfig

_TINY = ["--quick", "--no-progress", "--train-size", "64", "--test-size", "32", "--epochs", "2"]

Calls = list[tuple[tuple[str, ...], float, int, float | None, int, str]]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Calls]:
    """Every run_scenario call of the sweep: (methods, bound, samples, consistency_weight, inner_steps,
    inner_batches)."""
    seen: Calls = []

    def counted(scenario: Scenario, config: ScenarioConfig, *args: Any, **kwargs: Any) -> Any:
        seen.append((config.methods, config.bound, config.samples, config.consistency_weight, config.inner_steps,
                     config.inner_batches))
        return run_scenario(scenario, config, *args, **kwargs)

    monkeypatch.setattr(sweep, "run_scenario", counted)
    yield seen


def test_the_modules_examples_hold() -> None:
    failures, tried = doctest.testmod(sweep)
    assert tried > 0 and failures == 0


# ---------------------------------------------------------------------------
# The grid and the command line


@pytest.mark.parametrize(("flag", "value"), [
    ("--sweep-bound", "a,b"), ("--sweep-bound", "0,0.05"), ("--sweep-bound", "0.05,0.05"), ("--sweep-bound", "nan"),
    ("--sweep-samples", "0,2"), ("--sweep-samples", "1.5"), ("--sweep-weight", "-1"), ("--sweep-weight", ""),
    ("--sweep-inner-steps", "0"), ("--sweep-inner-steps", "1,x"),
])
def test_bad_grid_flags_are_usage_errors_naming_the_flag(flag: str, value: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        sweep.parse_args(["--quick", flag, value])
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {flag}:" in error and "e.g." in error


@pytest.mark.parametrize(("field", "values", "flag"), [
    ("bounds", (), "--sweep-bound"), ("bounds", (0.0,), "--sweep-bound"), ("samples", (2, 2), "--sweep-samples"),
    ("samples", (True,), "--sweep-samples"), ("weights", (math.inf,), "--sweep-weight"),
    ("inner_steps", (1.0,), "--sweep-inner-steps"),
])
def test_a_bad_grid_raises_value_error_naming_the_flag(field: str, values: tuple[Any, ...], flag: str) -> None:
    grid = {"bounds": (0.05,), "samples": (2,), "weights": (1.0,), "inner_steps": (1,), field: values}
    with pytest.raises(ValueError, match=flag):
        sweep.Grid(**grid)


def test_options_the_grid_sets_and_distributed_are_refused_with_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="--bound is set by the sweep's grid.*--sweep-bound"):
        sweep.parse_args(["--quick", "--bound", "0.1"])
    with pytest.raises(ValueError, match="--methods is set by the sweep's grid"):
        sweep.parse_args(["--quick", "--methods", "joint"])
    with pytest.raises(ValueError, match="drop --distributed"):
        sweep.parse_args(["--quick", "--distributed"])
    assert sweep.cli(["--quick", "--inner-steps", "2"]) == 2
    assert "--sweep-inner-steps" in capsys.readouterr().err


def test_defaults_the_quick_grid_and_the_scenarios_own_flags() -> None:
    study = sweep.parse_args([])
    assert study.module == "multi_digits" and study.grid == sweep.DEFAULT_GRID
    assert len(study.grid.cells()) == 36 and len(study.grid.runs()) == 36
    assert study.config.seeds == (0, 1, 2, 3, 4) and study.config.inner_batches == "fresh"
    assert (study.config.epochs, study.config.train_size, study.config.optimizer) == (10, 3000, "adam")
    assert len(md.parse_args([])[1].seeds) == 10  # the testbed's own default stays
    assert md.parse_args([])[1].inner_batches == "reuse"
    quick = sweep.parse_args(["--quick", "--sweep-weight", "0,3"])
    assert quick.grid == sweep.Grid(sweep.QUICK_GRID.bounds, sweep.QUICK_GRID.samples, (0.0, 3.0),
                                    sweep.QUICK_GRID.inner_steps)
    assert quick.config.seeds == (0, 1)
    assert sweep.parse_args(["--width", "8"]).scenario.title == md.scenario(md.Testbed(width=8)).title
    assert sweep.parse_args(["--scenario", "even_odd"]).scenario is even_odd.SCENARIO


def test_help_lists_the_grid_the_scenarios_flags_and_the_drivers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        sweep.parse_args(["--help"])
    shown = capsys.readouterr().out
    for flag in ("--scenario", "--sweep-bound", "--sweep-samples", "--sweep-weight", "--sweep-inner-steps",
                 "--conflict", "--epochs", "--preset", "--inner-batches"):
        assert flag in shown, flag
    assert shown.startswith("usage: python -m benchmarks.sweep")


def test_the_test_command_runs_the_driver_with_the_studys_settings_and_the_cell() -> None:
    study = sweep.parse_args(["--conflict", "0.5", "--width", "8", "--epochs", "3", "--preset", "paper",
                              "--lr", "0.05", "--seeds", "2", "--out-dir", "/tmp/x"])
    cell = sweep.Cell(bound=0.05, samples=2, consistency_weight=1.0, inner_steps=10)
    command = study.test_command(cell)
    words = shlex.split(command)
    assert words[:5] == ["python", "-m", "benchmarks.multi_digits", "--methods", "independent,joint,mt_cool"]
    testbed, config = md.parse_args(words[3:])
    assert testbed == md.Testbed(conflict=0.5, width=8)
    assert (config.bound, config.samples, config.consistency_weight, config.inner_steps, config.inner_batches) == (
        0.05, 2, 1.0, 10, "fresh")
    assert len(config.seeds) == 10 and config.out_dir == "results"  # the test run's own seeds and folder
    kept = ("epochs", "train_size", "test_size", "warmup_epochs", "batch_size", "optimizer", "lr", "momentum",
            "weight_decay", "schedule", "noise_bound", "noise_scale", "noise", "cagrad_c", "preset")
    assert {k: getattr(config, k) for k in kept} == {k: getattr(study.config, k) for k in kept}
    assert "--seeds" not in words and "--width" in words and "--preset" in words


# ---------------------------------------------------------------------------
# End to end


def test_a_quick_study_on_multi_digits(tmp_path: Path, calls: Calls) -> None:
    results = sweep.main([*_TINY, "--sweep-bound", "0.01,0.05", "--sweep-samples", "1,2", "--sweep-weight", "0,1",
                          "--sweep-inner-steps", "2", "--out-dir", str(tmp_path)])
    assert (tmp_path / "sweep_multi_digits.png").stat().st_size > 0
    written = json.loads((tmp_path / "sweep_multi_digits.json").read_text(encoding="utf-8"))
    assert written["selected"] == results["selected"]

    # Joint ran once; mt_cool once per cell, but once per (b, L) at M = 1; L > 1 with fresh batches
    assert [c for c in calls if c[0] == ("joint",)] == [calls[0]] and len(calls) == 1 + 6
    trained = [c[1:] for c in calls[1:]]
    assert all(c[0] == ("mt_cool",) for c in calls[1:]) and len(set(trained)) == len(trained)
    assert {c[1:3] + c[4:5] for c in calls[1:] if c[2] == 1} == {(0.01, 1, 2), (0.05, 1, 2)}
    assert all(c[5] == "fresh" for c in calls[1:])
    assert written["runs"] == {"joint": 1, "mt_cool": 6}

    cells = written["cells"]
    assert [(c["samples"], c["bound"], c["consistency_weight"]) for c in cells] == [
        (1, 0.01, 0.0), (1, 0.01, 1.0), (1, 0.05, 0.0), (1, 0.05, 1.0),
        (2, 0.01, 0.0), (2, 0.01, 1.0), (2, 0.05, 0.0), (2, 0.05, 1.0)]
    for first, second in ((cells[0], cells[1]), (cells[2], cells[3])):  # M = 1: the λ = 1 cell is the λ = 0 run
        assert first["ran"] and not second["ran"]
        assert second["same_run_as"] == {"bound": first["bound"], "samples": 1, "consistency_weight": 0.0,
                                         "inner_steps": 2}
        assert second["per_seed"] == first["per_seed"] and second["delta_m"] == first["delta_m"]
    assert all(c["ran"] and c["same_run_as"] is None for c in cells[4:])
    assert "same run as λ = 0 (M = 1: λ has no effect)" in written["table"]

    # Δm per seed against Joint of the same seed, mean over seeds; the selection is the argmax
    metrics = [Metric(**m) for m in written["metrics"]]
    joint = written["joint"]["per_seed"]
    assert written["config"]["seeds"] == [0, 1] and len(joint["left_acc"]) == 2
    for cell in cells:
        expected = [delta_m({k: v[s] for k, v in cell["per_seed"].items()}, {k: v[s] for k, v in joint.items()},
                            metrics) for s in range(2)]
        assert cell["delta_m_per_seed"] == pytest.approx(expected)
        assert cell["delta_m"]["estimate"] == pytest.approx(sum(expected) / 2)
        mean = [(a + b) / 2 for a, b in zip(cell["per_seed"]["left_acc"], cell["per_seed"]["right_acc"])]
        assert cell["metric_mean"]["per_seed"] == pytest.approx(mean)
    best = max(range(len(cells)), key=lambda i: cells[i]["delta_m"]["estimate"])
    selected = written["selected"]
    assert selected["index"] == best
    assert {k: selected[k] for k in ("bound", "samples", "consistency_weight", "inner_steps")} == {
        k: cells[best][k] for k in ("bound", "samples", "consistency_weight", "inner_steps")}
    assert selected["reading"] == sweep.selection_reading(cells[best]["delta_m"])
    assert selected["test_command"].startswith("python -m benchmarks.multi_digits --methods independent,joint,mt_cool")
    assert "**selected**" in written["table"]

    # trained and scored on the testbed's validation split, never its test pool
    assert written["validation"]["own"] and written["validation"]["data_source"].endswith("(validation)")
    assert "_validation_load" in written["validation"]["note"]


def test_a_scenario_without_validation_runs_on_the_generic_split(tmp_path: Path, calls: Calls) -> None:
    assert even_odd.SCENARIO.validation is None
    results = sweep.main(["--scenario", "even_odd", "--quick", "--no-progress", "--seeds", "1", "--epochs", "1",
                          "--sweep-bound", "0.05", "--sweep-samples", "2", "--sweep-weight", "1",
                          "--sweep-inner-steps", "1", "--out-dir", str(tmp_path)])
    assert (tmp_path / "sweep_even_odd.png").stat().st_size > 0
    assert results["validation"] == {"note": results["validation"]["note"], "own": False, "fraction": 0.25,
                                     "data_source": "sklearn digits 8x8 (validation split of the training data)"}
    assert len(results["cells"]) == 1 and results["selected"]["index"] == 0
    assert results["selected"]["tie_with_joint"] is None  # one seed: no interval
    assert "no interval" in results["selected"]["reading"]


def test_the_generic_split_takes_its_held_out_share_from_the_training_data_per_task() -> None:
    config = even_odd.parse_args(["--quick"])
    scenario, note = sweep.validation_scenario(even_odd.SCENARIO)
    assert "test data is never used" in note and scenario.figures == () and scenario.intervals is None
    carved, original = scenario.load(config, 0), even_odd.SCENARIO.load(config, 0)
    assert isinstance(carved, dict) and isinstance(original, dict) and set(carved) == set(original)
    for task, data in carved.items():
        source = original[task]
        assert data.train_x.shape[0] + data.test_x.shape[0] == source.train_x.shape[0]
        rows = {tuple(x.flatten().tolist()) for x in source.train_x}
        assert all(tuple(x.flatten().tolist()) in rows for x in torch.cat([data.train_x, data.test_x]))
        assert data.test_x.shape[0] == pytest.approx(0.25 * source.train_x.shape[0], abs=5)


def test_evaluation_only_test_targets_are_refused_naming_the_fix() -> None:
    data = ImageTasks(torch.zeros(8, 1, 4, 4), {"seg": torch.zeros(8, 4, 4, dtype=torch.int64)},
                      torch.zeros(2, 1, 4, 4), {"seg": torch.zeros(2, 4, 4, dtype=torch.int64),
                                                "ptv": torch.zeros(2, 4, 4)}, "synthetic")
    with pytest.raises(ValueError, match=r"evaluation-only targets \['ptv'\].*Scenario.validation"):
        sweep._carved_load("openkbp", lambda config, seed: data, even_odd.parse_args(["--quick"]), 0)


# ---------------------------------------------------------------------------
# ImageTasks.validation_split


def _indexed(train: int, test: int, classes: int) -> ImageTasks:
    """Training image i is filled with i + 1, test images with negative values, so every example is traceable."""
    train_x = (torch.arange(train, dtype=torch.float32) + 1).view(train, 1, 1, 1).expand(train, 1, 2, 2).contiguous()
    test_x = -(torch.arange(test, dtype=torch.float32) + 1).view(test, 1, 1, 1).expand(test, 1, 2, 2).contiguous()
    labels = torch.arange(train) % classes
    return ImageTasks(train_x, {"mask": torch.zeros(train, 2, 2, dtype=torch.int64), "label": labels},
                      test_x, {"mask": torch.zeros(test, 2, 2, dtype=torch.int64), "label": torch.arange(test) % classes},
                      "synthetic")


@settings(max_examples=40, deadline=None)
@given(train=st.integers(2, 60), classes=st.integers(1, 5), fraction=st.floats(0.05, 0.95), seed=st.integers(0, 99))
def test_validation_split_partitions_the_training_data_and_never_returns_a_test_example(
    train: int, classes: int, fraction: float, seed: int
) -> None:
    data = _indexed(train, 7, classes)
    try:
        held = data.validation_split(fraction, seed)
    except ValueError as error:  # only when one side would be empty (a tiny class-by-class split)
        assert "leaves 0 to" in str(error) or "and 0 to validate" in str(error)
        return
    fit_ids, held_ids = held.train_x[:, 0, 0, 0].long(), held.test_x[:, 0, 0, 0].long()
    assert bool((fit_ids > 0).all()) and bool((held_ids > 0).all())  # no test image (those are negative)
    assert sorted(torch.cat([fit_ids, held_ids]).tolist()) == list(range(1, train + 1))  # a partition of train
    assert held.train_y["label"].tolist() == ((fit_ids - 1) % classes).tolist()  # targets follow their images
    assert held.test_y["label"].tolist() == ((held_ids - 1) % classes).tolist()
    assert held.test_y["mask"].shape == (held_ids.numel(), 2, 2)
    again = data.validation_split(fraction, seed)
    assert torch.equal(again.test_x, held.test_x) and torch.equal(again.train_x, held.train_x)  # deterministic
    for label in range(classes):  # stratified on the image-level labels (not the masks)
        members = int((data.train_y["label"] == label).sum())
        kept = int((held.test_y["label"] == label).sum())
        if members >= 2:
            assert 1 <= kept <= members - 1


def test_validation_split_is_stratified_seeded_and_checks_its_arguments() -> None:
    data = _indexed(40, 5, 4)
    held = data.validation_split(0.25, 0)
    assert torch.bincount(held.test_y["label"], minlength=4).tolist() == [2, 2, 2, 2]  # 10 per class, 25 %
    assert not torch.equal(data.validation_split(0.25, 1).test_x, held.test_x)
    assert held.source == "synthetic (validation split of the training data)"
    masks_only = ImageTasks(data.train_x, {"mask": data.train_y["mask"]}, data.test_x, {"mask": data.test_y["mask"]},
                            "synthetic")
    assert masks_only.validation_split(0.25, 0).test_x.shape[0] == 10  # no image-level label: unstratified
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
        data.validation_split(1.0, 0)
    with pytest.raises(ValueError, match="at least 2"):
        data.select(torch.tensor([0]), None).validation_split(0.5, 0)


# ---------------------------------------------------------------------------
# --inner-batches


def test_inner_batches_is_a_run_option_that_methods_with_their_own_keep() -> None:
    assert even_odd.parse_args([]).inner_batches == "reuse"
    assert even_odd.parse_args(["--inner-batches", "fresh"]).inner_batches == "fresh"
    problem = even_odd.problem(None, even_odd.SCENARIO.load(even_odd.parse_args(["--quick"]), 0))

    def built(method: str, batches: InnerBatches) -> str:
        learner = build_learner(method, problem, Training(inner_batches=batches, inner_steps=2))
        return str(learner.inner_batches)  # type: ignore[attr-defined]

    assert built("mt_cool", "fresh") == "fresh" and built("mt_cool", "reuse") == "reuse"
    assert built("mt_cool_m2_l10", "reuse") == "fresh"  # its own setting
    assert built("mt_cool_m2", "fresh") == "fresh"


def test_inner_batches_fresh_reaches_the_learner_through_the_driver() -> None:
    seen: list[tuple[str, str]] = []

    def probe(method: str, seed: int, learner: Learner, streams: Sequence[Stream]) -> None:
        seen.append((method, getattr(learner, "inner_batches", "-")))

    config = driver_args(even_odd.SCENARIO, ["--quick", "--no-progress", "--epochs", "1", "--max-train", "64",
                                             "--max-test", "32", "--warmup-epochs", "0", "--methods", "joint,mt_cool,mt_cool_m2_l10",
                                             "--inner-steps", "2", "--inner-batches", "fresh"])
    run_scenario(even_odd.SCENARIO, config, probe=probe)
    assert seen == [("joint", "-"), ("mt_cool", "fresh"), ("mt_cool_m2_l10", "fresh")], (
        "benchmarks/_runs._training must pass inner_batches=config.inner_batches into Training")
    seen.clear()
    run_scenario(even_odd.SCENARIO, driver_args(even_odd.SCENARIO, ["--quick", "--no-progress", "--epochs", "1",
                                                                    "--max-train", "64", "--max-test", "32",
                                                                    "--methods", "mt_cool,mt_cool_m2_l10"]),
                 probe=probe)
    assert seen == [("mt_cool", "reuse"), ("mt_cool_m2_l10", "fresh")]  # the default path is unchanged


def test_every_run_of_a_study_shares_one_load_per_seed() -> None:
    loads: list[int] = []

    def load(config: Any, seed: int) -> Any:
        loads.append(seed)
        return {"seed": seed}

    once = sweep._loaded_once(load)
    config = object()
    first = [once(config, seed) for seed in (0, 1)]  # type: ignore[arg-type]
    again = [once(config, seed) for seed in (0, 1, 0)]  # type: ignore[arg-type]
    assert loads == [0, 1] and again[0] is first[0] and again[1] is first[1]
