"""The figures of a scenario run (:mod:`benchmarks._scenario`), each from the results as written to JSON.

- ``"bars"`` (``<name>.png``): one bar chart per metric, mean ± std over seeds;
- ``"overview"`` (``<name>.png``): every metric as grouped bars per method beside each task's
  test curve (the even/odd figure);
- ``"curves"`` (``<name>_curves.png``): training loss and one test metric per task against the epoch;
- ``"samples"`` (``<name>_samples.png``): three test inputs, their ground truth and every
  method's prediction of the pixel-level tasks (first seed): the images at the quartiles of
  Independent's per-image score where the scenario gives ``sample_score`` (the MT-COOL paper's
  Fig. 2), else the first test inputs; without pixel-level tasks, the
  inputs and a table of every method's captions of the image-level tasks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from benchmarks._learners import label
from benchmarks._runs import QUARTILES
from benchmarks._summary import mean_std

if TYPE_CHECKING:
    from benchmarks._scenario import Metric, Scenario

__all__ = ["FIGURES", "figure_paths", "input_image", "write_figures"]

FIGURES: Final[Mapping[str, str]] = {
    "bars": "{name}.png", "overview": "{name}.png", "curves": "{name}_curves.png", "samples": "{name}_samples.png",
}
"""Figure kind -> file name pattern."""


def figure_paths(scenario: Scenario, out_dir: Path) -> dict[str, Path]:
    """Where each of the scenario's figures goes, by kind."""
    return {kind: out_dir / FIGURES[kind].format(name=scenario.name) for kind in scenario.figures}


def _shown(metric: Metric, values: Sequence[float | None]) -> list[float]:
    return [metric.show(v) if v is not None and math.isfinite(v) else 0.0 for v in values]


def _limits(metric: Metric, heights: Sequence[float], errors: Sequence[float], margin: float) -> tuple[float, float]:
    """The y range: 0..100 for percentages, else up to 1 or a little above the tallest bar."""
    top = 100.0 if metric.percent else max(1.0, 1.05 * max((h + e for h, e in zip(heights, errors)), default=1.0))
    low = min((h - e for h, e in zip(heights, errors, strict=True)), default=0.0)
    return max(0.0, low - margin * top), top


def _stats(results: Mapping[str, Any], method: str, metric: Metric) -> tuple[float | None, float | None]:
    entry = results["methods"][method]["metrics"][metric.key]
    return entry["mean"], entry["std"]


def _plot_bars(scenario: Scenario, results: Mapping[str, Any], path: Path) -> None:
    metrics = scenario.metrics
    columns = min(4, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.6 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    methods = list(results["methods"])
    colours = [f"C{i % 10}" for i in range(len(methods))]
    for axis, metric in zip(axes, metrics, strict=False):
        heights = _shown(metric, [_stats(results, m, metric)[0] for m in methods])
        errors = _shown(metric, [_stats(results, m, metric)[1] for m in methods])
        axis.bar(range(len(methods)), heights, yerr=errors, capsize=3, color=colours)
        axis.set_xticks(range(len(methods)), [label(m) for m in methods], rotation=45, ha="right",
                        rotation_mode="anchor", fontsize=8)
        axis.set_title(metric.header, fontsize=10)
        axis.set_ylim(*_limits(metric, heights, errors, 0.05))
    for axis in axes[len(metrics) :]:
        axis.set_visible(False)
    figure.suptitle(f"{scenario.title}: mean ± std over {len(results['config']['seeds'])} seed(s)")
    figure.savefig(path, dpi=110)


def _mean_curve(runs: Sequence[Mapping[str, Any]], curve: str, key: str) -> list[float]:
    """A per-epoch curve averaged over seeds, NaN-aware."""
    columns = zip(*(run["curves"][curve][key] for run in runs), strict=True)
    return [mean_std([math.nan if v is None else v for v in values])[0] for values in columns]


def _plot_overview(scenario: Scenario, results: Mapping[str, Any], path: Path) -> None:
    """Grouped bars (one group per method, one bar per metric) and each task's test curve."""
    metrics, tasks = scenario.metrics, scenario.tasks
    figure = Figure(figsize=(5 + 4 * len(tasks), 4.8), layout="constrained")
    axes = figure.subplots(1, 1 + len(tasks), squeeze=False)[0]
    methods = list(results["methods"])
    width = 0.8 / len(metrics)
    heights_all: list[float] = []
    errors_all: list[float] = []
    for offset, metric in enumerate(metrics):
        heights = _shown(metric, [_stats(results, m, metric)[0] for m in methods])
        errors = _shown(metric, [_stats(results, m, metric)[1] for m in methods])
        positions = [i + (offset - (len(metrics) - 1) / 2) * width for i in range(len(methods))]
        axes[0].bar(positions, heights, width, yerr=errors, capsize=3, label=metric.header)
        heights_all += heights
        errors_all += errors
    axes[0].set_xticks(range(len(methods)), [label(m) for m in methods], rotation=30, ha="right",
                       rotation_mode="anchor")
    axes[0].set_ylim(*_limits(metrics[0], heights_all, errors_all, 0.02))
    axes[0].set_ylabel("test metric (%)" if metrics[0].percent else "test metric")
    axes[0].set_title("final test metrics, mean ± std over seeds")
    # Above the plot area, so the legend never hides a bar.
    axes[0].legend(loc="lower center", bbox_to_anchor=(0.5, 1.08), ncols=len(metrics), fontsize="small")
    keys = {metric.key: metric for metric in metrics}
    for axis, task in zip(axes[1:], tasks, strict=True):
        metric = keys[scenario.curve_metric[task]]
        for method in methods:
            runs = results["methods"][method]["runs"]
            curve = [metric.show(v) for v in _mean_curve(runs, "test", metric.key)]
            axis.plot(runs[0]["curves"]["epoch"], curve, label=label(method))
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric.header)
        axis.set_title(f"task {task!r}, mean over seeds")
        axis.legend(fontsize="small")
    figure.suptitle(f"{scenario.title}, {results['data_source']}: {len(results['config']['seeds'])} seed(s), "
                    f"{results['config']['epochs']} epochs, batch {results['config']['batch_size']}, "
                    f"{results['config']['optimizer'].upper()} lr {results['config']['lr']}")
    figure.savefig(path, dpi=120)


def _plot_curves(scenario: Scenario, results: Mapping[str, Any], path: Path) -> None:
    tasks = scenario.tasks
    figure = Figure(figsize=(4.5 * len(tasks), 7.0), layout="constrained")
    axes = figure.subplots(2, len(tasks), squeeze=False)
    keys = {metric.key: metric for metric in scenario.metrics}
    for column, task in enumerate(tasks):
        metric = keys[scenario.curve_metric[task]]
        for method, summary in results["methods"].items():
            runs = summary["runs"]
            epochs = runs[0]["curves"]["epoch"]
            axes[0][column].plot(epochs, _mean_curve(runs, "train_loss", task), label=label(method))
            axes[1][column].plot(epochs, [metric.show(v) for v in _mean_curve(runs, "test", metric.key)],
                                 label=label(method))
        axes[0][column].set_title(f"{task}: training loss")
        axes[0][column].set_yscale("log")
        axes[1][column].set_title(f"{task}: test {metric.header}")
        axes[1][column].set_xlabel("epoch")
    axes[0][-1].legend(fontsize=7, ncols=2)
    figure.suptitle(f"{scenario.title}: training curves, mean over seeds")
    figure.savefig(path, dpi=110)


def input_image(x: Tensor) -> npt.NDArray[np.float32]:
    """An input ``[C, H, W]`` or ``[C, D, H, W]`` as an image to show: the middle slice of a volume,
    RGB for three channels, else the first channel in grey, scaled to [0, 1]."""
    if x.ndim == 4:
        x = x[:, x.shape[1] // 2]
    shown = x[:3] if x.shape[0] == 3 else x[:1].expand(3, -1, -1)
    low, high = float(shown.min()), float(shown.max())
    scaled = (shown - low) / (high - low) if high > low else shown * 0.0
    image: npt.NDArray[np.float32] = scaled.permute(1, 2, 0).float().numpy()
    return image


def _plot_captions(scenario: Scenario, samples: Mapping[str, Mapping[str, Tensor]], path: Path) -> None:
    """Image-level tasks only: the first test inputs of each stream, captioned with their ground truth, above a
    table of every method's captions (one row per method, one column per input)."""
    images = samples["image"]
    methods = [m for m in samples if m not in ("image", "ground truth")]
    streams: list[list[str]] = []  # tasks that share one input tensor
    for task in scenario.tasks:
        same = next((s for s in streams if images[s[0]].equal(images[task])), None)
        if same is None:
            streams.append([task])
        else:
            same.append(task)
    inputs = [(tasks, index) for tasks in streams for index in range(images[tasks[0]].shape[0])]

    def captions(source: str, tasks: Sequence[str], index: int) -> str:
        return ", ".join(scenario.caption(t, samples[source][t][index]) for t in tasks)

    figure = Figure(figsize=(max(6.0, 2.6 * len(inputs) + 1.6), 2.6 + 0.22 * (len(methods) + 1)), layout="constrained")
    grid = figure.add_gridspec(2, len(inputs), height_ratios=[2.2, 0.22 * (len(methods) + 1)])
    for column, (tasks, index) in enumerate(inputs):
        axis = figure.add_subplot(grid[0, column])
        axis.imshow(input_image(images[tasks[0]][index]))
        axis.set_title(f"#{index}", fontsize=8)
        axis.set_xlabel(captions("ground truth", tasks, index), fontsize=7)
        _bare(axis)
    axis = figure.add_subplot(grid[1, :])
    axis.axis("off")
    if methods:
        table = axis.table(
            cellText=[[captions(m, tasks, index) for tasks, index in inputs] for m in methods],
            rowLabels=[label(m) for m in methods], colLabels=[f"#{index}" for _, index in inputs],
            loc="center", cellLoc="center",
        )
        table.auto_set_font_size(False)
        table.set_fontsize(7)
    figure.suptitle(f"{scenario.title}: first test inputs (ground truth below each), first seed", fontsize=9)
    figure.savefig(path, dpi=110)


def _plot_samples(scenario: Scenario, samples: Mapping[str, Mapping[str, Tensor]], path: Path,
                  selection: Mapping[str, Any] | None = None) -> None:
    indices = None if selection is None else selection.get("indices")
    if not scenario.pixel_tasks:
        _plot_captions(scenario, samples, path)
        return
    if scenario.draw is None:
        raise ValueError(f"scenario {scenario.name!r} has no draw function for its samples figure")
    images = samples["image"]
    methods = [m for m in samples if m not in ("image", "ground truth")]
    columns = ["ground truth", *methods]
    count = max(images[task].shape[0] for task in scenario.pixel_tasks)
    rows = [(i, task) for i in range(count) for task in scenario.pixel_tasks if i < images[task].shape[0]]
    figure = Figure(figsize=(1.6 * (len(columns) + 1), 1.8 * len(rows)), layout="constrained")
    axes = figure.subplots(len(rows), len(columns) + 1, squeeze=False)
    image_level = [task for task in scenario.tasks if task not in scenario.pixel_tasks]
    for row, (index, task) in enumerate(rows):
        axes[row][0].imshow(input_image(images[task][index]))
        name = f"#{index}" if indices is None else f"#{indices[index]}"
        if indices is not None and len(indices) == len(QUARTILES):
            name += f" (q{round(100 * QUARTILES[index])})"
        axes[row][0].set_ylabel(f"{name} {task}", fontsize=7)
        same_input = [t for t in image_level if images[t].equal(images[task])]  # tasks of the same stream
        for column, method in enumerate(columns, start=1):
            axis = axes[row][column]
            axis.imshow(scenario.draw(task, samples[method][task][index]))
            caption = ", ".join(scenario.caption(t, samples[method][t][index]) for t in same_input)
            if row == 0:
                axis.set_title(label(method), fontsize=7)
            if caption and task == scenario.pixel_tasks[0]:
                axis.set_xlabel(caption, fontsize=6)
    for axis in axes.ravel():
        _bare(axis)
    shown = ("first test images" if indices is None else
             "images at the quartiles of Independent's per-image score")
    figure.suptitle(f"{scenario.title}: {shown}, first seed", fontsize=9)
    figure.savefig(path, dpi=110)


def _bare(axis: Axes) -> None:
    axis.set_xticks([])
    axis.set_yticks([])


def write_figures(
    scenario: Scenario, results: Mapping[str, Any], samples: Mapping[str, Mapping[str, Tensor]],
    paths: Mapping[str, Path],
) -> None:
    """Write each of ``scenario.figures`` to ``paths[kind]`` (see :func:`figure_paths`)."""
    for kind in scenario.figures:
        if kind == "bars":
            _plot_bars(scenario, results, paths[kind])
        elif kind == "overview":
            _plot_overview(scenario, results, paths[kind])
        elif kind == "curves":
            _plot_curves(scenario, results, paths[kind])
        elif kind == "samples":
            _plot_samples(scenario, samples, paths[kind], results.get("samples"))
