"""The one driver of every benchmark scenario (``benchmarks.even_odd``, ``benchmarks.refuge``,
``benchmarks.hrf_av``, and the scenarios built on it later).

A :class:`Scenario` says what is specific to one benchmark (data, networks,
losses, metrics, table layout, how to draw a prediction); the driver does the
rest the same way for all: command line (:mod:`benchmarks._options`), per-seed data and batch order,
training every method of :mod:`benchmarks._learners` with identical models,
data and optimizer settings (:mod:`benchmarks._runs`), evaluation after every
epoch, a progress bar, the markdown table with Δm against Independent
(:mod:`benchmarks._summary`), a table of the metrics with bootstrap intervals over the test
examples (AUROC, ``Scenario.intervals``), the JSON results and the figures
(:mod:`benchmarks._figures`):

- ``<name>.png``: one bar chart per metric, mean with standard deviation over seeds
  (``"bars"``), or grouped bars beside the test curves (``"overview"``);
- ``<name>_curves.png``: training loss and one test metric per task against the epoch;
- ``<name>_samples.png``: three test images, their ground truth and every method's prediction
  of the pixel-level tasks (first seed), like the MT-COOL paper's Fig. 2: the images at the
  quartiles of Independent's per-image Dice where the scenario gives ``sample_score``;
  with image-level tasks only, the inputs (middle slice of a volume) and a table of every
  method's captions.

Data (:data:`benchmarks._runs.SeedData`): one :class:`benchmarks._images.ImageTasks`
when every task sees the same inputs (``{task: (x, y_task)}`` with one ``x``), or one
``ImageTasks`` per task when each task has its own inputs (even/odd). Inputs are
``[N, C, H, W]`` images or ``[N, C, D, H, W]`` volumes; targets int64 (labels, masks)
or float32 (regression). An epoch is ``ceil(max_s N_s / batch_size)`` steps; each
input stream draws its batches from back-to-back seeded permutations, identical for
every method of a seed.

``--distributed`` (under ``torchrun --nproc-per-node R``) trains on R ranks:
each rank draws ``batch_size`` examples per stream and step from its
``DistributedSampler`` shard (:func:`benchmarks._cli.sharded_schedule`), so an epoch is
``ceil(max_s ceil(N_s / R) / batch_size)`` steps; only
:data:`benchmarks._learners.DISTRIBUTED_METHODS` run, and rank 0 alone
evaluates, prints and writes the results.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from torch import Tensor

from benchmarks._cli import distributed_launch, finite, run_command
from benchmarks._figures import FIGURES, figure_paths, write_figures
from benchmarks._learners import Problem
from benchmarks._options import ScenarioConfig, parse_args
from benchmarks._runs import SeedData, run_scenario
from benchmarks._stats import Interval
from benchmarks._summary import mean_std

__all__ = ["Metric", "Scenario", "ScenarioConfig", "SeedData", "cli", "finite", "main", "mean_std", "parse_args",
           "run_scenario"]


@dataclass(frozen=True)
class Metric:
    """One column of the results table.

    Attributes:
        key: name in the JSON (``"dice_cup"``).
        header: column header (``"Dice cup (%)"``).
        percent: shown (table, plots) as a percentage of a fraction in [0, 1]; ``False`` shows the
            value itself (AUROC, or a value in physical units such as a dose error in Gy).
        higher_is_better: the metric's direction, for Δm (``False`` for errors and distances).
    """

    key: str
    header: str
    percent: bool = True
    higher_is_better: bool = True

    def show(self, value: float) -> float:
        """The value as displayed."""
        return 100 * value if self.percent else value


def _no_notes(config: ScenarioConfig) -> list[str]:
    return []


def _no_caption(task: str, value: Tensor) -> str:
    return ""


@dataclass(frozen=True)
class Scenario:
    """What one benchmark supplies to the driver.

    Attributes:
        name: module and file name (``"refuge"``).
        title: one line naming the benchmark and the paper table it mirrors.
        description: ``--help`` text.
        tasks: task names in task order.
        metrics: table columns, in the paper's order (``Metric.higher_is_better`` for Δm).
        curve_metric: per task, the metric key plotted against the epoch.
        defaults: default values of the run-size options (``seeds``, ``epochs``, ``train_size``,
            ``test_size``, ``warmup_epochs``, ``batch_size``, ``optimizer``, ``lr``; optional ``schedule``,
            ``bound``, ``methods`` (the default method list, else every method the scenario offers), and
            ``image_size``, whose flag exists only when it is given).
        quick: their ``--quick`` values.
        problem: ``problem(config, data)`` builds the networks and losses (``data``: the seed's data).
        load: ``load(config, seed)`` gives the data of one seed (:data:`benchmarks._runs.SeedData`).
        evaluate: ``evaluate(outputs, targets)`` -> ``{metric key: value}`` on the whole test set;
            ``outputs[task]`` are the predictions stacked over the test inputs (CPU, float32),
            ``targets[task]`` the test targets (CPU).
        layout: the real dataset's folder layout, for ``--help`` and errors.
        pixel_tasks: tasks whose outputs are maps ``[N, C, *spatial]`` (segmentation logits,
            regression maps), drawn in the samples figure; the others are image-level (captioned).
            Empty: the samples figure captions the inputs alone (give ``caption``).
        networks: the ``Problem.networks`` names ``problem`` builds (``"mtan"``, ``"ctan"``), so
            ``--methods`` can offer their methods before any data is loaded.
        draw: ``draw(task, output_or_target)`` -> ``[H, W, 3]`` float image of a pixel-level task;
            receives an output ``[C, *spatial]`` or a target ``[*spatial]``.
        caption: ``caption(task, output_or_target)`` -> short text for an image-level task.
        notes: ``notes(config)`` -> how to read the results (written into the JSON).
        figures: which of :data:`benchmarks._figures.FIGURES` to write.
        eval_batch: test inputs per prediction call.
        flag_names: option strings that replace the defaults (``{"train_size": "--max-train"}``).
        flag_help: help texts that replace the defaults, by option name (``"train_size"``, ``"data_dir"``).
        default_data: what runs without ``--data-dir``, for ``--help``.
        image_multiple: ``--image-size`` must be a multiple of this (a UNet's output stride).
        validation: ``validation(config, seed)`` gives one seed's data for model selection (``python -m
            benchmarks.sweep``): training data and a validation split carved out of the seed's training
            data, in the place of the test data, which it must never touch. ``None``: the sweep carves a
            stratified share out of ``load``'s training data itself.
        intervals: ``intervals(outputs, targets)`` -> ``{metric key: Interval}``, bootstrap intervals over
            the test examples of some metrics (AUROC), computed once on the final outputs of each run and
            printed in a table of their own; ``None``: none. A run whose outputs hold NaN or infinite
            values (it diverged) gets none: a warning and ``intervals_error`` in its record instead.
        sample_score: ``sample_score(outputs, targets)`` -> ``[N]`` per-test-image score (Dice) of the
            pixel-level tasks; the samples figure shows the first seed's images at the quartiles of
            Independent's scores, as the MT-COOL paper's Fig. 2 does. ``None`` (or Independent not run, or no
            finite score): the first test images.
    """

    name: str
    title: str
    description: str
    tasks: tuple[str, ...]
    metrics: tuple[Metric, ...]
    curve_metric: Mapping[str, str]
    defaults: Mapping[str, Any]
    quick: Mapping[str, Any]
    problem: Callable[[ScenarioConfig, SeedData], Problem]
    load: Callable[[ScenarioConfig, int], SeedData]
    evaluate: Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], dict[str, float]]
    layout: str
    pixel_tasks: tuple[str, ...] = ()
    networks: tuple[str, ...] = ()
    draw: Callable[[str, Tensor], npt.NDArray[np.float32]] | None = None
    caption: Callable[[str, Tensor], str] = _no_caption
    notes: Callable[[ScenarioConfig], list[str]] = _no_notes
    figures: tuple[str, ...] = ("bars", "curves", "samples")
    eval_batch: int = 32
    flag_names: Mapping[str, str] = field(default_factory=dict)
    flag_help: Mapping[str, str] = field(default_factory=dict)
    default_data: str = "synthetic data"
    image_multiple: int = 16
    validation: Callable[[ScenarioConfig, int], SeedData] | None = None
    intervals: Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], dict[str, Interval]] | None = None
    sample_score: Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], Tensor] | None = None

    def __post_init__(self) -> None:
        keys = [metric.key for metric in self.metrics]
        if not keys or len(set(keys)) != len(keys):
            raise ValueError(f"Scenario {self.name!r}: metrics must be non-empty with unique keys, got {keys}")
        unknown = [t for t in self.pixel_tasks if t not in self.tasks]
        if unknown:
            raise ValueError(f"Scenario {self.name!r}: pixel_tasks {unknown} are not among tasks {list(self.tasks)}")
        if sorted(self.curve_metric) != sorted(self.tasks) or any(k not in keys for k in self.curve_metric.values()):
            raise ValueError(
                f"Scenario {self.name!r}: curve_metric must map every task {list(self.tasks)} to a metric key of "
                f"{keys}, got {dict(self.curve_metric)}"
            )
        bad = [f for f in self.figures if f not in FIGURES]
        if bad or ("bars" in self.figures and "overview" in self.figures):
            raise ValueError(
                f"Scenario {self.name!r}: figures {list(self.figures)}: choose from {list(FIGURES)}, with at most one "
                "of 'bars' and 'overview' (both write <name>.png)"
            )
        if "samples" in self.figures and self.pixel_tasks and self.draw is None:
            raise ValueError(
                f"Scenario {self.name!r}: the 'samples' figure draws pixel_tasks with draw; give draw or leave "
                "'samples' out of figures"
            )
        if "samples" in self.figures and not self.pixel_tasks and self.caption is _no_caption:
            raise ValueError(
                f"Scenario {self.name!r}: without pixel_tasks the 'samples' figure shows each test input with "
                "every method's caption of its image-level tasks; give caption or leave 'samples' out of figures"
            )

    def flag(self, key: str) -> str:
        """The option string of a run-size option (``"--train-size"`` or the scenario's own)."""
        return self.flag_names.get(key, "--" + key.replace("_", "-"))


# ---------------------------------------------------------------------------
# Entry points


def main(scenario: Scenario, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run ``scenario`` from the command line: print the table, write JSON and figures, return the results."""
    config = parse_args(scenario, argv)
    with distributed_launch(config.distributed, config.device, f"python -m benchmarks.{scenario.name}") as launch:
        config = replace(config, device=launch.device)
        results, samples = run_scenario(scenario, config, launch)
        if not launch.main:
            return {}
        return _write(scenario, config, results, samples)


def _listing(paths: Sequence[Path]) -> str:
    names = [str(p) for p in paths]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _write(
    scenario: Scenario, config: ScenarioConfig, results: dict[str, Any], samples: Mapping[str, Mapping[str, Tensor]]
) -> dict[str, Any]:
    """Write the JSON and the figures, print the table; return the results as written."""
    results = finite(results)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{scenario.name}.json", **figure_paths(scenario, out_dir)}
    results["outputs"] = {key: str(path) for key, path in paths.items()}
    paths["json"].write_text(json.dumps(results, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    write_figures(scenario, results, samples, paths)
    print(results["table"])
    if results.get("interval_table"):
        print(f"\nAUROC-type metrics, each seed with its 95 % bootstrap interval over the test examples:\n"
              f"{results['interval_table']}")
    print(f"\nwall time {results['wall_time_s']:.1f} s; wrote {_listing(list(paths.values()))}")
    return dict(results)


def cli(scenario: Scenario, argv: Sequence[str] | None = None) -> int:
    """Entry point: configuration errors become one line on stderr and exit status 2."""
    return run_command(partial(main, scenario, argv), f"python -m benchmarks.{scenario.name}")
