"""The shared driver of the image benchmarks (``benchmarks.refuge``, ``benchmarks.hrf_av``).

A :class:`Scenario` says what is specific to one benchmark (data, networks,
losses, metrics, table layout, how to draw a prediction); this module does the
rest the same way for both: command line, per-seed data and batch order,
training every method of :mod:`benchmarks._methods` with identical models,
data and optimizer settings, evaluation after every epoch, a progress bar,
the markdown table, the JSON results and three figures:

- ``<name>.png``: one bar chart per metric, mean with standard deviation over seeds;
- ``<name>_curves.png``: training loss and one test metric per task against the epoch;
- ``<name>_samples.png``: the first test images, their ground truth and every
  method's prediction (first seed), like the paper's Fig. 2.

Every task sees the same image batch (``{task: (x, y_task)}`` with one ``x``);
an epoch is ``ceil(N_train / batch_size)`` steps drawn from back-to-back seeded
permutations of the training set, identical for every method of a seed.

``--distributed`` (under ``torchrun --nproc-per-node R``) trains on R ranks:
each rank draws ``batch_size`` images per step from its ``DistributedSampler``
shard (:func:`benchmarks._cli.sharded_schedule`), so an epoch is
``ceil(ceil(N_train / R) / batch_size)`` steps of ``R * batch_size`` images;
only :data:`benchmarks._methods.DISTRIBUTED_METHODS` run, and rank 0 alone
evaluates, prints and writes the results.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from matplotlib.figure import Figure
from torch import Tensor
from tqdm import tqdm  # type: ignore[import-untyped]

from benchmarks._cli import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Launch,
    add_distributed_flag,
    config_record,
    distributed_launch,
    finite,
    method_list,
    resolve_device,
    resolve_methods,
    sharded_schedule,
)
from benchmarks._images import ImageTasks
from benchmarks._methods import (
    COOPERATIVE_METHODS,
    METHODS,
    Learner,
    Problem,
    Training,
    build_learner,
    check_methods_available,
)

__all__ = ["Metric", "Scenario", "ScenarioConfig", "finite", "main", "parse_args", "run_scenario"]

_EVAL_BATCH = 32
_SAMPLES = 3


@dataclass(frozen=True)
class Metric:
    """One column of the results table.

    Attributes:
        key: name in the JSON (``"dice_cup"``).
        header: column header (``"Dice cup (%)"``).
        percent: shown (table, plots) as a percentage of a fraction in [0, 1].
    """

    key: str
    header: str
    percent: bool = True

    def show(self, value: float) -> float:
        """The value as displayed."""
        return 100 * value if self.percent else value


@dataclass(frozen=True)
class ScenarioConfig:
    """Everything that determines an image-benchmark run; written verbatim into the JSON.

    Attributes:
        seeds: run seeds (initialisation, batch order, MT-COOL noise, synthetic data, splits).
        epochs: training epochs per run, MT-COOL's warm-up included.
        batch_size: images per step (every task sees the same images).
        optimizer: base optimizer of every method, ``"sgd"`` or ``"adam"``.
        lr, momentum, weight_decay: base optimizer settings.
        schedule: learning rate over the run: ``"constant"``, or ``"cosine"`` (torch's
            ``CosineAnnealingLR`` from ``lr`` to 0 over all steps, the same for every method).
        methods: methods to run, in :data:`benchmarks._methods.METHODS` order.
        bound, samples, inner_steps, consistency_weight: MT-COOL b, M, L, lambda.
        noise: MT-COOL noise under ``--distributed``: ``"identical"`` on every rank or ``"per_rank"``.
        noise_bound: MT-COOL noise bound alone (``None``: ``bound``; the clamp keeps ``bound``).
        noise_scale: MT-COOL noise ``"absolute"`` (the paper) or ``"relative"`` to each slice's scale.
        warmup_epochs: MT-COOL warm-up length in epochs.
        cagrad_c: CAGrad's c.
        image_size: images are ``image_size x image_size``.
        train_size, test_size: synthetic images per split (real data: caps, ``None`` = all).
        data_dir: folder of the real dataset, ``None`` for synthetic data.
        test_fraction: real data: share held out for testing.
        device: torch device string.
        out_dir: folder for the JSON and figures.
        quick: whether ``--quick`` filled in the defaults.
        progress: whether to show the progress bar.
        distributed: ``--distributed``: train on torchrun's ranks, ``batch_size`` images per rank.
    """

    seeds: tuple[int, ...]
    epochs: int
    batch_size: int
    optimizer: Literal["sgd", "adam"]
    lr: float
    momentum: float
    weight_decay: float
    schedule: Literal["constant", "cosine"]
    methods: tuple[str, ...]
    bound: float
    noise_bound: float | None
    noise_scale: Literal["absolute", "relative"]
    samples: int
    noise: Literal["identical", "per_rank"]
    inner_steps: int
    consistency_weight: float | None
    warmup_epochs: int
    cagrad_c: float
    image_size: int
    train_size: int | None
    test_size: int | None
    data_dir: str | None
    test_fraction: float
    device: str
    out_dir: str
    quick: bool
    progress: bool
    distributed: bool = False


@dataclass(frozen=True)
class Scenario:
    """What one image benchmark supplies to the shared driver.

    Attributes:
        name: module and file name (``"refuge"``).
        title: one line naming the benchmark and the paper table it mirrors.
        description: ``--help`` text.
        tasks: task names in task order.
        segmentation: the tasks whose outputs are ``[N, C, H, W]`` logit maps (drawn in the samples figure).
        metrics: table columns, in the paper's order.
        curve_metric: per task, the metric key plotted against the epoch.
        defaults: default values of the run-size options (seeds, epochs, train_size, ...).
        quick: their ``--quick`` values.
        problem: ``problem(config)`` builds the networks and losses.
        load: ``load(config, seed)`` gives the data of one seed.
        evaluate: ``evaluate(outputs, targets)`` -> ``{metric key: value}`` on the whole test set.
        draw: ``draw(task, output_or_target)`` -> ``[H, W, 3]`` float image of a segmentation;
            receives logits ``[C, H, W]`` or an int64 mask ``[H, W]``.
        caption: ``caption(task, output_or_target)`` -> short text for a classification task.
        layout: the real dataset's folder layout, for ``--help`` and errors.
        notes: ``notes(config)`` -> how to read the results (written into the JSON).
    """

    name: str
    title: str
    description: str
    tasks: tuple[str, ...]
    segmentation: tuple[str, ...]
    metrics: tuple[Metric, ...]
    curve_metric: Mapping[str, str]
    defaults: Mapping[str, Any]
    quick: Mapping[str, Any]
    problem: Callable[[ScenarioConfig], Problem]
    load: Callable[[ScenarioConfig, int], ImageTasks]
    evaluate: Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], dict[str, float]]
    draw: Callable[[str, Tensor], npt.NDArray[np.float32]]
    caption: Callable[[str, Tensor], str]
    layout: str
    notes: Callable[[ScenarioConfig], list[str]] = field(default=lambda config: [])


# ---------------------------------------------------------------------------
# Command line


def _parser(scenario: Scenario) -> argparse.ArgumentParser:
    d, q = scenario.defaults, scenario.quick
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{scenario.name}", description=scenario.description)
    add = parser.add_argument
    add("--seeds", type=POSITIVE_INT, default=None, help=f"number of seeds 0..N-1 (default {d['seeds']}; --quick: {q['seeds']})")
    add("--epochs", type=POSITIVE_INT, default=None, help=f"epochs per run (default {d['epochs']}; --quick: {q['epochs']})")
    add("--train-size", type=POSITIVE_INT, default=None,
        help=f"synthetic training images (real data: cap) (default {d['train_size']}; --quick: {q['train_size']})")
    add("--test-size", type=POSITIVE_INT, default=None,
        help=f"synthetic test images (real data: cap) (default {d['test_size']}; --quick: {q['test_size']})")
    add("--image-size", type=POSITIVE_INT, default=None,
        help=f"image side in pixels, a multiple of 16 (default {d['image_size']}; --quick: {q['image_size']})")
    add("--batch-size", type=POSITIVE_INT, default=d["batch_size"], help=f"images per step (default {d['batch_size']})")
    add("--optimizer", choices=("sgd", "adam"), default=d["optimizer"], help=f"base optimizer (default {d['optimizer']})")
    add("--lr", type=POSITIVE, default=d["lr"], help=f"learning rate (default {d['lr']})")
    add("--momentum", type=NON_NEGATIVE, default=0.0, help="SGD momentum (default 0)")
    add("--weight-decay", type=NON_NEGATIVE, default=0.0, help="weight decay (default 0)")
    add("--schedule", choices=("constant", "cosine"), default=d.get("schedule", "constant"),
        help=f"learning-rate schedule, cosine = decay to 0 over the run (default {d.get('schedule', 'constant')})")
    add("--methods", type=method_list, default=None, help=f"comma list (default {','.join(METHODS)})")
    add("--bound", type=NON_NEGATIVE, default=d.get("bound", 0.05), help=f"MT-COOL bound b (default {d.get('bound', 0.05)})")
    add("--noise-bound", type=NON_NEGATIVE, default=None,
        help="MT-COOL noise bound alone; the clamp keeps --bound (default: --bound)")
    add("--noise-scale", choices=("absolute", "relative"), default="absolute",
        help="MT-COOL noise U(-b, b) (absolute, the paper's) or U(-b r, b r) with r each slice's "
             "root-mean-square value (relative); the clamp stays absolute (default absolute)")
    add("--samples", type=POSITIVE_INT, default=1, help="MT-COOL noise samples M (default 1)")
    add("--noise", choices=("identical", "per_rank"), default="identical",
        help="MT-COOL noise under --distributed: the same draws on every rank (default) or each rank its own")
    add("--inner-steps", type=POSITIVE_INT, default=1, help="MT-COOL inner steps L (default 1)")
    add("--consistency-weight", type=NON_NEGATIVE, default=None, help="MT-COOL lambda (default: library's)")
    add("--warmup-epochs", type=NON_NEGATIVE_INT, default=None,
        help=f"MT-COOL warm-up epochs (default {d['warmup_epochs']}; --quick: {q['warmup_epochs']})")
    add("--cagrad-c", type=NON_NEGATIVE, default=0.4, help="CAGrad c (default 0.4)")
    add("--data-dir", default=None, help=f"real dataset folder, layout: {scenario.layout}; default: synthetic data")
    add("--test-fraction", type=float, default=0.25, help="real data: test share (default 0.25)")
    add("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    add("--out-dir", default="results", help="output folder (default results)")
    add("--quick", action="store_true", help="tiny smoke run exercising every method in well under a minute")
    add("--no-progress", action="store_true", help="hide the progress bar")
    add_distributed_flag(parser)
    return parser


def parse_args(scenario: Scenario, argv: Sequence[str] | None = None) -> ScenarioConfig:
    """Parse the command line into a :class:`ScenarioConfig`, filling defaults (or ``--quick`` ones)."""
    args = _parser(scenario).parse_args(argv)
    preset = scenario.quick if args.quick else scenario.defaults
    sized = ("seeds", "epochs", "train_size", "test_size", "image_size", "warmup_epochs")
    filled = {key: preset[key] if getattr(args, key) is None else getattr(args, key) for key in sized}
    if filled["image_size"] % 16:
        raise ValueError(f"--image-size must be a multiple of 16 (the UNet's output stride), got {filled['image_size']}")
    if not 0.0 < args.test_fraction < 1.0:
        raise ValueError(f"--test-fraction must be in (0, 1), e.g. 0.25; got {args.test_fraction!r}")
    methods = resolve_methods(args.methods, args.distributed)
    if filled["warmup_epochs"] >= filled["epochs"] and set(methods) & set(COOPERATIVE_METHODS):
        print(
            f"warning: --warmup-epochs {filled['warmup_epochs']} >= --epochs {filled['epochs']}: "
            "MT-COOL runs will never leave warm-up",
            file=sys.stderr,
        )
    return ScenarioConfig(
        seeds=tuple(range(filled["seeds"])),
        epochs=filled["epochs"],
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        methods=methods,
        bound=args.bound,
        noise_bound=args.noise_bound,
        noise_scale=args.noise_scale,
        samples=args.samples,
        noise=args.noise,
        inner_steps=args.inner_steps,
        consistency_weight=args.consistency_weight,
        warmup_epochs=filled["warmup_epochs"],
        cagrad_c=args.cagrad_c,
        image_size=filled["image_size"],
        train_size=filled["train_size"],
        test_size=filled["test_size"],
        data_dir=args.data_dir,
        test_fraction=args.test_fraction,
        device=resolve_device(args.device),
        out_dir=args.out_dir,
        quick=args.quick,
        progress=not args.no_progress,
        distributed=args.distributed,
    )


# ---------------------------------------------------------------------------
# Training and evaluation


def _schedule(size: int, batch_size: int, steps: int, seed: int) -> Tensor:
    """Training indices ``[steps, batch_size]``: back-to-back permutations of ``range(size)`` from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    permutations = [torch.randperm(size, generator=generator) for _ in range(math.ceil(needed / size))]
    return torch.cat(permutations)[:needed].view(steps, batch_size)


def _training(config: ScenarioConfig, seed: int, warmup_steps: int) -> Training:
    return Training(
        optimizer=config.optimizer,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        bound=config.bound,
        noise_bound=config.noise_bound,
        noise_scale=config.noise_scale,
        samples=config.samples,
        noise=config.noise,
        inner_steps=config.inner_steps,
        consistency_weight=config.consistency_weight,
        warmup_steps=warmup_steps,
        cagrad_c=config.cagrad_c,
        seed=seed,
        device=config.device,
    )


@torch.no_grad()
def _predict(learner: Learner, x: Tensor, tasks: Sequence[str]) -> dict[str, Tensor]:
    """Every task's outputs on ``x`` in evaluation mode, in chunks, on the CPU."""
    learner.train(False)
    try:
        outputs: dict[str, list[Tensor]] = {task: [] for task in tasks}
        for start in range(0, x.shape[0], _EVAL_BATCH):
            chunk = x[start : start + _EVAL_BATCH]
            for task in tasks:
                outputs[task].append(learner.predict(chunk, task).float().cpu())
        return {task: torch.cat(parts) for task, parts in outputs.items()}
    finally:
        learner.train(True)


def _run(
    scenario: Scenario, method: str, config: ScenarioConfig, data: ImageTasks, seed: int, bar: Any,
    launch: Launch = Launch(),
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Train ``method`` on one seed; return its record and its outputs on the first test images
    (with ``--distributed``: this rank's training, evaluated on rank 0 only)."""
    n_train = int(data.train_x.shape[0])
    shard = math.ceil(n_train / launch.world)  # a DistributedSampler's share; n_train without --distributed
    steps = math.ceil(shard / config.batch_size)
    batch = min(config.batch_size, shard)
    if config.distributed:
        schedule = sharded_schedule(n_train, batch, config.epochs * steps, seed, launch).to(data.train_x.device)
    else:
        schedule = _schedule(n_train, batch, config.epochs * steps, seed).to(data.train_x.device)
    warmup_steps = config.warmup_epochs * steps
    started = time.perf_counter()
    learner = build_learner(method, scenario.problem(config), _training(config, seed, warmup_steps))
    learner.train(True)
    schedulers = (
        [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=config.epochs * steps) for o in learner.optimizers()]
        if config.schedule == "cosine"
        else []
    )
    targets = {task: y.cpu() for task, y in data.test_y.items()}
    train_loss: dict[str, list[float]] = {task: [] for task in scenario.tasks}
    test_metrics: dict[str, list[float]] = {metric.key: [] for metric in scenario.metrics}
    metrics: dict[str, float] = {}
    for epoch in range(config.epochs):
        totals = dict.fromkeys(scenario.tasks, 0.0)
        for step in range(epoch * steps, (epoch + 1) * steps):
            index = schedule[step]
            x = data.train_x[index]
            losses = learner.train_step({task: (x, data.train_y[task][index]) for task in scenario.tasks})
            for scheduler in schedulers:
                scheduler.step()
            for task, loss in losses.items():
                totals[task] += loss
        for task, total in totals.items():
            train_loss[task].append(total / steps)
        if launch.main:
            metrics = scenario.evaluate(_predict(learner, data.test_x, scenario.tasks), targets)
            for key, value in metrics.items():
                test_metrics[key].append(value)
        bar.update(1)
    samples = _predict(learner, data.test_x[:_SAMPLES], scenario.tasks) if launch.main else {}
    record = {
        "seed": seed,
        "final": metrics,
        "curves": {"epoch": list(range(1, config.epochs + 1)), "train_loss": train_loss, "test": test_metrics},
        "num_parameters": learner.num_parameters,
        "steps_per_epoch": steps,
        "warmup_steps": warmup_steps if method in COOPERATIVE_METHODS else 0,
        "train_size": n_train,
        "test_size": int(data.test_x.shape[0]),
        "wall_time_s": time.perf_counter() - started,
    }
    return record, samples


# ---------------------------------------------------------------------------
# Summaries and outputs


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value), ignoring NaNs (NaN if all are)."""
    kept = [v for v in values if math.isfinite(v)]
    if not kept:
        return math.nan, math.nan
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0


def _summarise(scenario: Scenario, runs: list[dict[str, Any]], joint_parameters: int) -> dict[str, Any]:
    metrics: dict[str, dict[str, Any]] = {}
    for metric in scenario.metrics:
        per_seed = [float(run["final"][metric.key]) for run in runs]
        mean, std = _mean_std(per_seed)
        metrics[metric.key] = {"mean": mean, "std": std, "per_seed": per_seed}
    parameters = int(runs[0]["num_parameters"])
    return {
        "params": parameters,
        "params_ratio": parameters / joint_parameters,
        "metrics": metrics,
        "wall_time_s": sum(float(run["wall_time_s"]) for run in runs),
        "runs": runs,
    }


def _cell(metric: Metric, summary: Mapping[str, Any]) -> str:
    mean, std = summary["mean"], summary["std"]
    if mean is None or not math.isfinite(mean):
        return "n/a"
    digits = 2 if metric.percent else 3
    return f"{metric.show(mean):.{digits}f} ± {metric.show(std):.{digits}f}"


def markdown_table(scenario: Scenario, summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """The results laid out like the paper's table: one row per method, Params relative to Joint."""
    rows = [
        "| method | params | " + " | ".join(metric.header for metric in scenario.metrics) + " |",
        "|---|---:|" + "---:|" * len(scenario.metrics),
    ]
    for method, summary in summaries.items():
        cells = [_cell(metric, summary["metrics"][metric.key]) for metric in scenario.metrics]
        rows.append(f"| {method} | {summary['params_ratio']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def run_scenario(
    scenario: Scenario, config: ScenarioConfig, launch: Launch = Launch()
) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
    """Train every method on every seed; return the results and the first seed's sample outputs
    (on a rank other than 0 of a ``--distributed`` run, which only trains: two empty dictionaries)."""
    check_methods_available(config.methods)
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {method: [] for method in config.methods}
    samples: dict[str, dict[str, Tensor]] = {}
    joint_parameters = 0
    data: ImageTasks | None = None
    first: ImageTasks | None = None
    total = len(config.seeds) * len(config.methods) * config.epochs
    with tqdm(total=total, desc=scenario.name, unit="epoch", disable=not (config.progress and launch.main)) as bar:
        for seed in config.seeds:
            data = scenario.load(config, seed).to(config.device)
            if first is None:
                first = data
            torch.manual_seed(seed)
            joint_parameters = sum(p.numel() for p in scenario.problem(config).multi_task().parameters())
            for method in config.methods:
                bar.set_postfix(method=method, seed=seed)
                record, outputs = _run(scenario, method, config, data, seed, bar, launch)
                runs[method].append(record)
                if seed == config.seeds[0]:
                    samples[method] = outputs
    if first is None:
        raise ValueError("config.seeds is empty; give --seeds 1 or more")
    if not launch.main:
        return {}, {}
    summaries = {method: _summarise(scenario, method_runs, joint_parameters) for method, method_runs in runs.items()}
    samples["ground truth"] = {task: y[:_SAMPLES].cpu() for task, y in first.test_y.items()}
    samples["image"] = {"x": first.test_x[:_SAMPLES].cpu()}
    results = {
        "benchmark": scenario.name,
        "title": scenario.title,
        "config": {**config_record(config), "joint_params": joint_parameters},
        "data_source": first.source,
        "notes": scenario.notes(config) + (
            [launch.note("batch_size images", f"ceil(ceil(N_train / {launch.world}) / batch_size)", "the test set")]
            if config.distributed else []),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
        },
        "tasks": list(scenario.tasks),
        "metrics": [asdict(metric) for metric in scenario.metrics],
        "methods": summaries,
        "table": markdown_table(scenario, summaries),
        "wall_time_s": time.perf_counter() - started,
    }
    if config.distributed:
        results["distributed"] = launch.record(config.batch_size)
    return results, samples


def _plot_bars(scenario: Scenario, results: Mapping[str, Any], path: Path) -> None:
    metrics = scenario.metrics
    columns = min(4, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.6 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    methods = list(results["methods"])
    colours = [f"C{i % 10}" for i in range(len(methods))]
    for axis, metric in zip(axes, metrics, strict=False):
        means = [results["methods"][m]["metrics"][metric.key]["mean"] for m in methods]
        stds = [results["methods"][m]["metrics"][metric.key]["std"] for m in methods]
        heights = [metric.show(v) if v is not None else 0.0 for v in means]
        errors = [metric.show(v) if v is not None else 0.0 for v in stds]
        axis.bar(range(len(methods)), heights, yerr=errors, capsize=3, color=colours)
        axis.set_xticks(range(len(methods)), methods, rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
        axis.set_title(metric.header, fontsize=10)
        finite_low = [h - e for h, e in zip(heights, errors, strict=True)]
        top = 100.0 if metric.percent else 1.0
        axis.set_ylim(max(0.0, min(finite_low) - 0.05 * top), top)
    for axis in axes[len(metrics) :]:
        axis.set_visible(False)
    figure.suptitle(f"{scenario.title}: mean ± std over {len(results['config']['seeds'])} seed(s)")
    figure.savefig(path, dpi=110)


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
            losses = [_mean_std([v if v is not None else math.nan for v in values])[0]
                      for values in zip(*(run["curves"]["train_loss"][task] for run in runs), strict=True)]
            tests = [metric.show(_mean_std([v if v is not None else math.nan for v in values])[0])
                     for values in zip(*(run["curves"]["test"][metric.key] for run in runs), strict=True)]
            axes[0][column].plot(epochs, losses, label=method)
            axes[1][column].plot(epochs, tests, label=method)
        axes[0][column].set_title(f"{task}: training loss")
        axes[0][column].set_yscale("log")
        axes[1][column].set_title(f"{task}: test {metric.header}")
        axes[1][column].set_xlabel("epoch")
    axes[0][-1].legend(fontsize=7, ncols=2)
    figure.suptitle(f"{scenario.title}: training curves, mean over seeds")
    figure.savefig(path, dpi=110)


def _plot_samples(scenario: Scenario, samples: Mapping[str, Mapping[str, Tensor]], path: Path) -> None:
    images = samples["image"]["x"]
    methods = [m for m in samples if m not in ("image", "ground truth")]
    columns = ["ground truth", *methods]
    rows = [(i, task) for i in range(images.shape[0]) for task in scenario.segmentation]
    figure = Figure(figsize=(1.6 * (len(columns) + 1), 1.8 * len(rows)), layout="constrained")
    axes = figure.subplots(len(rows), len(columns) + 1, squeeze=False)
    classification = [task for task in scenario.tasks if task not in scenario.segmentation]
    for row, (index, task) in enumerate(rows):
        axes[row][0].imshow(images[index].permute(1, 2, 0).numpy())
        axes[row][0].set_ylabel(f"#{index} {task}", fontsize=7)
        for column, method in enumerate(columns, start=1):
            axis = axes[row][column]
            axis.imshow(scenario.draw(task, samples[method][task][index]))
            caption = ", ".join(scenario.caption(t, samples[method][t][index]) for t in classification)
            if row == 0:
                axis.set_title(method, fontsize=7)
            if caption and task == scenario.segmentation[0]:
                axis.set_xlabel(caption, fontsize=6)
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(f"{scenario.title}: first test images, first seed", fontsize=9)
    figure.savefig(path, dpi=110)


def main(scenario: Scenario, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run ``scenario`` from the command line: print the table, write JSON and figures, return the results."""
    config = parse_args(scenario, argv)
    with distributed_launch(config.distributed, config.device, f"python -m benchmarks.{scenario.name}") as launch:
        config = replace(config, device=launch.device)
        results, samples = run_scenario(scenario, config, launch)
        if not launch.main:
            return {}
        return _write(scenario, config, results, samples)


def _write(
    scenario: Scenario, config: ScenarioConfig, results: dict[str, Any], samples: Mapping[str, Mapping[str, Tensor]]
) -> dict[str, Any]:
    """Write the JSON and the figures, print the table; return the results as written."""
    results = finite(results)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / f"{scenario.name}.json",
        "bars": out_dir / f"{scenario.name}.png",
        "curves": out_dir / f"{scenario.name}_curves.png",
        "samples": out_dir / f"{scenario.name}_samples.png",
    }
    results["outputs"] = {key: str(path) for key, path in paths.items()}
    paths["json"].write_text(json.dumps(results, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    _plot_bars(scenario, results, paths["bars"])
    _plot_curves(scenario, results, paths["curves"])
    _plot_samples(scenario, samples, paths["samples"])
    print(results["table"])
    print(f"\nwall time {results['wall_time_s']:.1f} s; wrote {', '.join(str(p) for p in paths.values())}")
    return dict(results)


def cli(scenario: Scenario, argv: Sequence[str] | None = None) -> int:
    """Entry point: configuration errors become one line on stderr and exit status 2."""
    try:
        main(scenario, argv)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"python -m benchmarks.{scenario.name}: error: {error}", file=sys.stderr)
        return 2
    return 0
