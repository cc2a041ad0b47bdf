"""The scenario driver (``benchmarks._scenario``, ``_runs``, ``_summary``, ``_figures``) on a tiny fake scenario of
the kind the new benchmarks bring: 3D volumes, a float32 pixel-level regression task scored by a lower-is-better
error, an image-level classification task, and an architecture network of ``Problem.networks``."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import _scenario, even_odd
from benchmarks._figures import input_image
from benchmarks._images import ImageTasks
from benchmarks._learners import Problem, offered_methods
from benchmarks._runs import batch_schedule, quartile_indices, streams_of
from benchmarks._scenario import Metric, Scenario, ScenarioConfig, SeedData
from benchmarks._stats import Interval, mean_ci
from benchmarks._summary import mean_std

TASKS = ("dose", "grade")


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------------------
# Pieces


def test_mean_std_leaves_out_nan_seeds() -> None:
    assert mean_std([0.5, math.nan, 0.7]) == pytest.approx((0.6, math.sqrt(0.02)))
    assert mean_std([None, 0.4]) == (0.4, 0.0)  # a NaN seed read back from the JSON, one value left
    mean, std = mean_std([math.nan, math.nan])
    assert math.isnan(mean) and math.isnan(std)
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)


def test_summaries_average_the_seeds_that_have_a_value() -> None:
    from benchmarks._summary import summarise

    metric = Metric("auroc", "AUROC", percent=False)
    runs = [{"final": {"auroc": value}, "num_parameters": 4, "wall_time_s": 1.0} for value in (0.9, math.nan, 0.7)]
    runs.append({"final": {}, "num_parameters": 4, "wall_time_s": 1.0})  # a seed that never evaluated
    summary = summarise([metric], runs, joint_parameters=2)
    entry = summary["metrics"]["auroc"]
    assert entry["mean"] == pytest.approx(0.8) and entry["std"] == pytest.approx(math.sqrt(0.02))
    assert entry["per_seed"][0] == 0.9 and all(math.isnan(v) for v in entry["per_seed"][1::2])
    assert summary["params_ratio"] == 2.0 and summary["wall_time_s"] == 4.0


def test_batch_schedule_is_back_to_back_permutations_from_one_generator() -> None:
    first, second = batch_schedule([5, 3], batch_size=2, steps=4, seed=9)
    assert first.shape == second.shape == (4, 2)
    generator = torch.Generator().manual_seed(9)  # the plain reference: permutations drawn stream after stream
    reference = [torch.cat([torch.randperm(size, generator=generator) for _ in range(count)])[:8].view(4, 2)
                 for size, count in ((5, 2), (3, 3))]
    assert torch.equal(first, reference[0]) and torch.equal(second, reference[1])
    assert sorted(first.flatten()[:5].tolist()) == list(range(5))  # each pass covers the stream once
    alone = batch_schedule([5], batch_size=2, steps=4, seed=9)[0]
    assert torch.equal(alone, first)  # one stream: the schedule the shared-input scenarios always had


def _volumes(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, 4, generator=g)
    dose = 2.0 * x[:, 0] + 0.1 * torch.randn(n, 4, 4, 4, generator=g)  # float32 regression map
    grade = (x.mean(dim=(1, 2, 3, 4)) > 0.5).long()
    return x, dose, grade


def _data(n_train: int, n_test: int, seed: int) -> ImageTasks:
    x, dose, grade = _volumes(n_train, seed)
    tx, tdose, tgrade = _volumes(n_test, seed + 1000)
    return ImageTasks(x, {"dose": dose, "grade": grade}, tx, {"dose": tdose, "grade": tgrade}, "synthetic")


def test_streams_are_one_for_shared_inputs_and_one_per_task_otherwise() -> None:
    data = _data(6, 4, 0)
    [(tasks, stream)] = streams_of(data, TASKS, "cpu")
    assert tasks == TASKS and stream.spatial_dims == 3
    per_task = {t: ImageTasks(data.train_x, {t: data.train_y[t]}, data.test_x, {t: data.test_y[t]}, "x")
                for t in TASKS}
    assert [t for t, _ in streams_of(per_task, TASKS, "cpu")] == [("dose",), ("grade",)]
    with pytest.raises(ValueError, match=r"no targets for tasks \['stage'\]"):
        streams_of(data, ("dose", "stage"), "cpu")


def test_input_image_shows_the_middle_slice_of_a_volume_in_grey() -> None:
    volume = torch.zeros(1, 5, 3, 3)
    volume[0, 2, 1, 1] = 4.0
    image = input_image(volume)
    assert image.shape == (3, 3, 3) and image[1, 1].tolist() == [1.0, 1.0, 1.0] and image[0, 0].tolist() == [0.0] * 3


# ---------------------------------------------------------------------------
# A fake 3D scenario, end to end


class Tiny3D(nn.Module):
    """Hard-shared 3D network that also follows the ``architectures`` protocol (for the ``mtan`` methods)."""

    task_names = TASKS

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Tanh())
        self.heads = nn.ModuleDict({
            "dose": nn.Conv3d(4, 1, 1),
            "grade": nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 2)),
        })

    def head_forward(self, features: Tensor, task: str) -> Tensor:
        out: Tensor = self.heads[task](features)
        return out

    def forward(self, x: Tensor, task: str) -> Tensor:
        return self.head_forward(self.encoder(x), task)

    def forward_all(self, x: Tensor) -> dict[str, Tensor]:
        features = self.encoder(x)
        return {task: self.head_forward(features, task) for task in TASKS}

    def shared(self) -> nn.Module:
        return self.encoder

    def task_encoder(self, task: str) -> None:
        return None

    def task_head(self, task: str) -> nn.Module:
        head: nn.Module = self.heads[task]
        return head


class _Single(nn.Module):
    def __init__(self, task: str) -> None:
        super().__init__()
        self.net, self.task = Tiny3D(), task

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x, self.task)


def _dose_loss(out: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(out[:, 0], y)


def _problem(config: ScenarioConfig | None, data: SeedData) -> Problem:
    return Problem(TASKS, Tiny3D, _Single, {"dose": _dose_loss, "grade": F.cross_entropy}, networks={"mtan": Tiny3D})


def _evaluate(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, float]:
    return {
        "dose_mae": float((outputs["dose"][:, 0] - targets["dose"]).abs().mean()),
        "grade_acc": float((outputs["grade"].argmax(dim=1) == targets["grade"]).float().mean()),
    }


def _draw(task: str, value: Tensor) -> npt.NDArray[np.float32]:
    volume = value[0] if value.ndim == 4 else value
    return input_image(volume[None])


SCENARIO = Scenario(
    name="tiny3d",
    title="tiny 3D fake",
    description="test scenario",
    tasks=TASKS,
    metrics=(Metric("dose_mae", "Dose MAE (Gy)", percent=False, higher_is_better=False),
             Metric("grade_acc", "Grade acc (%)")),
    curve_metric={"dose": "dose_mae", "grade": "grade_acc"},
    defaults={"seeds": 1, "epochs": 2, "train_size": 8, "test_size": 4, "warmup_epochs": 1, "batch_size": 4,
              "optimizer": "adam", "lr": 1e-2},
    quick={"seeds": 1, "epochs": 2, "train_size": 8, "test_size": 4, "warmup_epochs": 1},
    problem=_problem,
    load=lambda config, seed: _data(config.train_size or 8, config.test_size or 4, seed),
    evaluate=_evaluate,
    layout="none",
    pixel_tasks=("dose",),
    networks=("mtan",),
    draw=_draw,
    caption=lambda task, value: f"{task}={int(value.argmax()) if value.ndim else int(value)}",
)


def test_a_3d_regression_scenario_runs_every_family_through_the_driver(tmp_path: Path) -> None:
    methods = "independent,joint,mtan,pcgrad,mt_cool,mtan_mt_cool"
    results: dict[str, Any] = _scenario.main(SCENARIO, ["--methods", methods, "--out-dir", str(tmp_path),
                                                        "--no-progress"])
    on_disk = json.loads((tmp_path / "tiny3d.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert list(on_disk["methods"]) == methods.split(",")
    assert on_disk["metrics"][0] == {"key": "dose_mae", "header": "Dose MAE (Gy)", "percent": False,
                                     "higher_is_better": False}
    base = on_disk["methods"]["independent"]["metrics"]
    for method, summary in on_disk["methods"].items():
        run = summary["runs"][0]
        assert run["train_sizes"] == {"dose": 8, "grade": 8} and run["steps_per_epoch"] == 2
        assert len(run["curves"]["test"]["dose_mae"]) == 2
        means = {k: v["mean"] for k, v in summary["metrics"].items()}
        expected = 50 * (-(means["dose_mae"] - base["dose_mae"]["mean"]) / base["dose_mae"]["mean"]
                         + (means["grade_acc"] - base["grade_acc"]["mean"]) / base["grade_acc"]["mean"])
        assert summary["delta_m"] == pytest.approx(expected), method
    assert on_disk["delta_m"]["metrics"] == ["dose_mae", "grade_acc"]
    assert on_disk["methods"]["mtan"]["params_ratio"] == pytest.approx(1.0)
    assert "| method | params | Dose MAE (Gy) | Grade acc (%) | Δm (%) |" in on_disk["table"]
    assert "| independent (STL) | 2.00 |" in on_disk["table"] and "| joint (HPS) | 1.00 |" in on_disk["table"]
    # mtan is the same network and loss as joint here, so the driver must give both the same numbers
    assert on_disk["methods"]["mtan"]["runs"][0]["curves"] == on_disk["methods"]["joint"]["runs"][0]["curves"]
    for name in ("tiny3d.png", "tiny3d_curves.png", "tiny3d_samples.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _accuracy_interval(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, Interval]:
    correct = (outputs["grade"].argmax(dim=1) == targets["grade"]).double()
    return {"grade_acc": mean_ci(correct, resamples=200)}


def _target_mean(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Tensor:
    return targets["dose"].flatten(1).mean(dim=1)  # known by construction: does not depend on the model


def test_quartile_indices_pick_distinct_images_at_the_quartiles() -> None:
    scores = torch.arange(100.0).flip(0)  # image i scores 99 - i
    assert quartile_indices(scores).tolist() == [74, 49, 24]
    assert quartile_indices(torch.tensor([0.3, 0.1, 0.2, 0.4])).tolist() == [2, 0, 3]
    assert quartile_indices(torch.tensor([0.5, float("nan"), 0.1])).tolist() == [2, 0]
    with pytest.raises(ValueError, match="one score per test image"):
        quartile_indices(torch.ones(2, 2))


def test_samples_sit_at_independents_quartiles_and_intervals_reach_the_table(tmp_path: Path) -> None:
    scored = replace(SCENARIO, sample_score=_target_mean, intervals=_accuracy_interval,
                     defaults={**SCENARIO.defaults, "test_size": 12})
    results = _scenario.main(scored, ["--methods", "independent,joint", "--out-dir", str(tmp_path), "--no-progress"])
    expected = quartile_indices(_target_mean({}, _data(8, 12, 0).test_y)).tolist()
    assert results["samples"]["indices"] == expected and len(set(expected)) == 3
    for method in ("independent", "joint"):
        summary = results["methods"][method]
        [interval] = summary["metrics"]["grade_acc"]["intervals"]
        assert interval["estimate"] == pytest.approx(summary["runs"][0]["final"]["grade_acc"])
        assert interval["n"] == 12 and interval["low"] <= interval["estimate"] <= interval["high"]
        assert "intervals" not in summary["metrics"]["dose_mae"]
    assert results["interval_table"].splitlines()[0] == "| method | Grade acc (%), per seed [95 % CI] |"
    assert (tmp_path / "tiny3d_samples.png").stat().st_size > 0
    unscored = replace(scored, sample_score=lambda outputs, targets: torch.full((12,), math.nan))
    fallback = _scenario.main(unscored, ["--methods", "independent", "--out-dir", str(tmp_path), "--no-progress"])
    assert fallback["samples"]["indices"] is None  # no image scored (a diverged Independent): the first images
    without = _scenario.main(SCENARIO, ["--methods", "joint", "--out-dir", str(tmp_path), "--no-progress"])
    assert without["samples"]["indices"] is None and without["interval_table"] is None


def test_a_diverged_run_gets_no_intervals_and_a_warning_instead_of_stopping_the_benchmark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import _runs

    predict, calls = _runs._predict, []

    def diverging(*args: Any) -> dict[str, Tensor]:  # independent's two evaluations, then NaN: joint diverged
        calls.append(1)
        outputs = predict(*args)
        return outputs if len(calls) <= 2 else {t: torch.full_like(v, math.nan) for t, v in outputs.items()}

    monkeypatch.setattr(_runs, "_predict", diverging)
    scored = replace(SCENARIO, intervals=_accuracy_interval)
    with pytest.warns(RuntimeWarning, match="joint on seed 0: the final outputs hold NaN"):
        results = _scenario.main(scored, ["--methods", "independent,joint", "--out-dir", str(tmp_path),
                                          "--no-progress"])
    run = results["methods"]["joint"]["runs"][0]
    assert run["intervals"] == {} and "diverged" in run["intervals_error"]
    assert results["methods"]["independent"]["runs"][0]["intervals"]["grade_acc"]["n"] == 4
    assert results["interval_table"].splitlines()[-1] == "| joint (HPS) | n/a |"


def test_methods_of_a_network_the_scenario_lacks_are_refused_naming_the_offered_ones() -> None:
    with pytest.raises(ValueError, match=r"\['ctan'\].*choose --methods from " + ",".join(offered_methods(["mtan"]))):
        _scenario.parse_args(SCENARIO, ["--methods", "joint,ctan"])
    with pytest.raises(ValueError, match=r"\['mtan_mt_cool'\].*it has \[\].*choose --methods from independent,joint,"
                                         r"pcgrad"):
        even_odd.parse_args(["--methods", "joint,mtan_mt_cool"])
    assert _scenario.parse_args(SCENARIO, []).methods == offered_methods(["mtan"])


def test_a_problem_whose_networks_differ_from_the_scenario_is_refused(tmp_path: Path) -> None:
    undeclared = replace(SCENARIO, networks=())
    with pytest.raises(ValueError, match=r"declares networks \[\] but its Problem builds \['mtan'\]"):
        _scenario.main(undeclared, ["--methods", "joint", "--out-dir", str(tmp_path), "--no-progress"])


def test_inconsistent_scenarios_are_refused_by_field() -> None:
    with pytest.raises(ValueError, match="curve_metric must map every task"):
        replace(SCENARIO, curve_metric={"dose": "dose_mae"})
    with pytest.raises(ValueError, match="'samples' figure draws pixel_tasks with draw"):
        replace(SCENARIO, draw=None)
    with pytest.raises(ValueError, match=r"pixel_tasks \['mask'\] are not among tasks"):
        replace(SCENARIO, pixel_tasks=("mask",))
    with pytest.raises(ValueError, match="at most one of 'bars' and 'overview'"):
        replace(SCENARIO, figures=("bars", "overview"))
