"""Even/odd digit benchmark: MT-COOL and its ablations against every baseline of the paper's Table 1.

This reproduces the setting of the MT-COOL paper's Table 1 (see
``docs/method.md`` and ``docs/results.md``) on data that needs no download: Task "even"
classifies the digits {0, 2, 4, 6, 8} and task "odd" the digits {1, 3, 5, 7, 9}
with a LeNet. By default it uses scikit-learn's bundled 8x8 digits; pass
``--data-dir`` to use real MNIST IDX files instead.

Methods (all trained with the same base optimizer, learning rate, batch size,
number of steps, per-seed initialisation and per-seed data order):

- ``independent``: one :class:`LeNetSingle` per task, each trained on its own task.
- ``joint``: one :class:`LeNetMultiTask`, loss = sum of the task losses, plain SGD.
- ``pcgrad``, ``mgda``, ``cagrad``, ``graddrop``: the Joint network with the
  encoder's per-task gradients combined by ``torchjd``'s aggregators
  (:mod:`benchmarks._methods`).
- ``vanilla``, ``without_reg``, ``mt_cool``: :class:`cooperative_opt.CooperativeOptimizer`
  on the channel-split :class:`LeNetMultiTask` with the matching ``variant``
  (the three ablations of the paper's Table 1).
- ``mt_cool_clean``: ``mt_cool`` with ``consistency_reference="clean"``; the
  paper's consistency term is identically zero at M = 1, this one is not.

Every training step draws one batch per task. An epoch is
``ceil(max_t N_t / batch_size)`` steps; each task draws its batches from its own
stream of back-to-back random permutations of its training set, so the smaller
task wraps around a little early. MT-COOL's warm-up (joint noisy updates) lasts
``--warmup-epochs`` epochs (default 1), counted inside ``--epochs``.

``--distributed`` trains on the ranks of ``torchrun --nproc-per-node R``:
each task's training set is sharded by a ``DistributedSampler``, each rank
draws ``--batch-size`` examples per task per step from its shard (an epoch is
``ceil(max_t ceil(N_t / R) / batch_size)`` steps), only
:data:`benchmarks._methods.DISTRIBUTED_METHODS` run, and rank 0 alone
evaluates and writes the outputs.

Run ``python -m benchmarks.even_odd --help`` for the options. Outputs:
a markdown table on stdout, ``<out-dir>/even_odd.json`` (configuration,
per-seed accuracies and per-epoch curves; accuracies as fractions in [0, 1]) and
``<out-dir>/even_odd.png`` (accuracy bars with standard deviations, and test
accuracy curves).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor
from tqdm import tqdm  # type: ignore[import-untyped]

from benchmarks._cli import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
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
from benchmarks._data import NUM_CLASSES, TaskData, load_digits_even_odd, load_mnist_even_odd
from benchmarks._methods import (
    COOPERATIVE_METHODS,
    METHODS,
    Learner,
    Problem,
    Training,
    build_learner,
    check_methods_available,
    count_parameters,
)
from benchmarks._models import LeNetMultiTask, LeNetSingle

__all__ = ["METHODS", "BenchmarkConfig", "main", "parse_args", "run_benchmark"]

_COOPERATIVE_NAMES: Final[frozenset[str]] = frozenset(COOPERATIVE_METHODS)
"""Methods trained with ``CooperativeOptimizer`` (they have a warm-up).

``mt_cool`` is the paper's formula (consistency against the mean of the M noisy
predictions, identically zero at M = 1); ``mt_cool_clean`` measures it against
the noise-free prediction instead, which keeps it active at M = 1
(docs/method.md, "The M = 1 gap", is why both are reported).
"""

_DEFAULTS: Final[tuple[tuple[str, Any], ...]] = (
    ("seeds", 5),
    ("epochs", 30),
    ("max_train", None),
    ("max_test", None),
)
_QUICK: Final[tuple[tuple[str, Any], ...]] = (
    ("seeds", 1),
    ("epochs", 2),
    ("max_train", 256),
    ("max_test", 256),
)
_EVAL_BATCH: Final[int] = 1024


@dataclass(frozen=True)
class BenchmarkConfig:
    """Everything that determines a benchmark run; written verbatim into the JSON.

    Attributes:
        seeds: run seeds; each fixes the model initialisation, the data order, the
            MT-COOL noise and (for digits) the train/test split.
        epochs: training epochs per run (including MT-COOL's warm-up).
        batch_size: examples per task per step.
        lr: SGD learning rate (paper: 0.1 for warm-up and cooperative phase).
        momentum: SGD momentum (0 = plain SGD).
        methods: methods to run, a subset of :data:`METHODS` in that order.
        bound: MT-COOL noise/clamp bound b (paper: 0.05).
        samples: MT-COOL noise samples M per step (paper: 1).
        noise: MT-COOL noise under ``--distributed``: ``"identical"`` on every rank or ``"per_rank"``.
        inner_steps: MT-COOL inner steps L per task per outer iteration.
        consistency_weight: MT-COOL lambda, or ``None`` for the library default
            (1.0 for ``mt_cool`` / ``mt_cool_clean``, 0 for the others).
        warmup_epochs: MT-COOL warm-up length in epochs.
        dataset: ``"digits"`` (scikit-learn 8x8) or ``"mnist"`` (IDX files in ``data_dir``).
        data_dir: MNIST folder, or ``None`` for digits.
        test_fraction: digits only: share of each task held out for testing.
        max_train: keep at most this many training examples per task (``None`` = all).
        max_test: keep at most this many test examples per task (``None`` = all).
        device: torch device string, e.g. ``"cpu"`` or ``"cuda"``.
        out_dir: folder for ``even_odd.json`` and ``even_odd.png``.
        quick: whether ``--quick`` filled in the defaults.
        progress: whether to show the tqdm progress bar.
        distributed: ``--distributed``: train on torchrun's ranks, ``batch_size`` examples per task per rank.
    """

    seeds: tuple[int, ...]
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    methods: tuple[str, ...]
    bound: float
    samples: int
    noise: Literal["identical", "per_rank"]
    inner_steps: int
    consistency_weight: float | None
    warmup_epochs: int
    dataset: str
    data_dir: str | None
    test_fraction: float
    max_train: int | None
    max_test: int | None
    device: str
    out_dir: str
    quick: bool
    progress: bool
    distributed: bool = False


# ---------------------------------------------------------------------------
# Command line


def _build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m benchmarks.even_odd``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.even_odd",
        description="Compare Independent, Joint, PCGrad, MGDA, CAGrad, GradDrop and MT-COOL "
        "(vanilla / without_reg / mt_cool / mt_cool_clean) on the even/odd digit tasks of the MT-COOL paper's Table 1.",
    )
    add = parser.add_argument
    add("--seeds", type=POSITIVE_INT, default=None, help="number of seeds 0..N-1 (default 5; --quick: 1)")
    add("--epochs", type=POSITIVE_INT, default=None, help="epochs per run (default 30; --quick: 2)")
    add("--batch-size", type=POSITIVE_INT, default=32, help="examples per task per step (default 32)")
    add("--lr", type=NON_NEGATIVE, default=0.1, help="SGD learning rate (default 0.1, as the paper)")
    add("--momentum", type=NON_NEGATIVE, default=0.0, help="SGD momentum (default 0)")
    add("--methods", type=method_list, default=None, help=f"comma list (default {','.join(METHODS)})")
    add("--bound", type=NON_NEGATIVE, default=0.05, help="MT-COOL bound b (default 0.05)")
    add("--samples", type=POSITIVE_INT, default=1, help="MT-COOL noise samples M (default 1)")
    add("--noise", choices=("identical", "per_rank"), default="identical",
        help="MT-COOL noise under --distributed: the same draws on every rank (default) or each rank its own")
    add("--inner-steps", type=POSITIVE_INT, default=1, help="MT-COOL inner steps L (default 1)")
    add("--consistency-weight", type=NON_NEGATIVE, default=None, help="MT-COOL lambda (default: library's)")
    add("--warmup-epochs", type=NON_NEGATIVE_INT, default=1, help="MT-COOL warm-up epochs (default 1)")
    add("--test-fraction", type=float, default=0.25, help="digits: test share per task (default 0.25)")
    add("--max-train", type=POSITIVE_INT, default=None, help="cap on training examples per task")
    add("--max-test", type=POSITIVE_INT, default=None, help="cap on test examples per task")
    add("--out-dir", default="results", help="output folder (default results)")
    add(
        "--data-dir",
        default=None,
        help="folder with the four real MNIST IDX files (plain or .gz); default: sklearn 8x8 digits. "
        "Full MNIST takes hours on 2 CPU cores at the default --epochs: use --device cuda or --max-train",
    )
    add("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    add("--quick", action="store_true", help="tiny smoke run: 1 seed, 2 epochs, <= 256 examples per task")
    add("--no-progress", action="store_true", help="hide the progress bar")
    add_distributed_flag(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> BenchmarkConfig:
    """Parse the command line into a :class:`BenchmarkConfig`, filling defaults (or ``--quick`` ones)."""
    args = _build_parser().parse_args(argv)
    defaults = dict(_QUICK if args.quick else _DEFAULTS)
    filled = {key: default if getattr(args, key) is None else getattr(args, key) for key, default in defaults.items()}
    methods = resolve_methods(args.methods, args.distributed)
    if args.warmup_epochs >= filled["epochs"] and set(methods) & _COOPERATIVE_NAMES:
        print(
            f"warning: --warmup-epochs {args.warmup_epochs} >= --epochs {filled['epochs']}: "
            "MT-COOL runs will never leave warm-up",
            file=sys.stderr,
        )
    if not 0.0 < args.test_fraction < 1.0:
        raise ValueError(f"--test-fraction must be in (0, 1), e.g. 0.25; got {args.test_fraction!r}")
    return BenchmarkConfig(
        seeds=tuple(range(filled["seeds"])),
        epochs=filled["epochs"],
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        methods=methods,
        bound=args.bound,
        samples=args.samples,
        noise=args.noise,
        inner_steps=args.inner_steps,
        consistency_weight=args.consistency_weight,
        warmup_epochs=args.warmup_epochs,
        dataset="digits" if args.data_dir is None else "mnist",
        data_dir=args.data_dir,
        test_fraction=args.test_fraction,
        max_train=filled["max_train"],
        max_test=filled["max_test"],
        device=resolve_device(args.device),
        out_dir=args.out_dir,
        quick=args.quick,
        progress=not args.no_progress,
        distributed=args.distributed,
    )


# ---------------------------------------------------------------------------
# Data order


def _load_data(config: BenchmarkConfig, seed: int) -> dict[str, TaskData]:
    """The even/odd tasks for one seed, capped and moved to ``config.device``."""
    if config.data_dir is None:
        data = load_digits_even_odd(seed, test_fraction=config.test_fraction)
    else:
        data = load_mnist_even_odd(config.data_dir)
    moved: dict[str, TaskData] = {}
    for task, task_data in data.items():
        capped = task_data.truncated(config.max_train, config.max_test)
        if capped.train_y.shape[0] < config.batch_size:
            raise ValueError(
                f"--batch-size {config.batch_size} exceeds the {capped.train_y.shape[0]} training examples "
                f"of task {task!r}; lower --batch-size or raise --max-train"
            )
        moved[task] = TaskData(
            train_x=capped.train_x.to(config.device),
            train_y=capped.train_y.to(config.device),
            test_x=capped.test_x.to(config.device),
            test_y=capped.test_y.to(config.device),
        )
    return moved


def _steps_per_epoch(data: Mapping[str, TaskData], batch_size: int, world: int = 1) -> int:
    """Steps in one epoch: enough batches to go once through the largest task (its shard on ``world`` ranks)."""
    return math.ceil(max(math.ceil(d.train_y.shape[0] / world) for d in data.values()) / batch_size)


def _batch_schedule(
    sizes: Mapping[str, int], batch_size: int, steps: int, seed: int, device: str
) -> dict[str, Tensor]:
    """Per task, the training indices of every step: ``[steps, batch_size]`` int64.

    Each task's indices are back-to-back random permutations of ``range(size)``
    drawn from one generator seeded with ``seed``, so every method trained with
    the same seed sees exactly the same batches in the same order.
    """
    generator = torch.Generator().manual_seed(seed)
    schedule: dict[str, Tensor] = {}
    for task, size in sizes.items():
        needed = steps * batch_size
        permutations = [torch.randperm(size, generator=generator) for _ in range(math.ceil(needed / size))]
        schedule[task] = torch.cat(permutations)[:needed].view(steps, batch_size).to(device)
    return schedule


def _sharded_batch_schedule(
    sizes: Mapping[str, int], batch_size: int, steps: int, seed: int, device: str, launch: Launch
) -> dict[str, Tensor]:
    """``--distributed``: per task, this rank's training indices of every step, ``[steps, batch_size]``,
    from a ``DistributedSampler`` over the task's training set seeded from ``seed`` (one seed per task)."""
    generator = torch.Generator().manual_seed(seed)
    seeds = torch.randint(0, 2**31 - 1, (len(sizes),), generator=generator).tolist()
    return {
        task: sharded_schedule(size, batch_size, steps, int(task_seed), launch).to(device)
        for (task, size), task_seed in zip(sizes.items(), seeds, strict=True)
    }


# ---------------------------------------------------------------------------
# Methods


@dataclass(frozen=True)
class _ModelSpec:
    """Constructor arguments shared by every network in one run."""

    num_classes: Mapping[str, int]
    input_size: tuple[int, int]

    @staticmethod
    def for_data(data: Mapping[str, TaskData]) -> _ModelSpec:
        """The networks that fit ``data``: its tasks, 5 classes each, its image size."""
        height, width = next(iter(data.values())).train_x.shape[2:]
        return _ModelSpec(dict.fromkeys(data, NUM_CLASSES), (int(height), int(width)))

    def multi_task(self) -> LeNetMultiTask:
        """A fresh multi-task LeNet (draws its initialisation from the global torch RNG)."""
        return LeNetMultiTask(self.num_classes, input_size=self.input_size)

    def single_task(self, task: str) -> LeNetSingle:
        """A fresh single-task LeNet for ``task``."""
        return LeNetSingle(self.num_classes[task], input_size=self.input_size)

    def problem(self) -> Problem:
        """The networks and losses every method trains (see :mod:`benchmarks._methods`)."""
        return Problem(
            tasks=tuple(self.num_classes),
            multi_task=self.multi_task,
            single_task=self.single_task,
            losses=dict.fromkeys(self.num_classes, _cross_entropy),
        )


def _cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Every task's loss: cross-entropy of its logits."""
    return F.cross_entropy(logits, target)


def _training(config: BenchmarkConfig, seed: int, warmup_steps: int) -> Training:
    """The method-independent training settings of one seed."""
    return Training(
        optimizer="sgd",
        lr=config.lr,
        momentum=config.momentum,
        bound=config.bound,
        samples=config.samples,
        noise=config.noise,
        inner_steps=config.inner_steps,
        consistency_weight=config.consistency_weight,
        warmup_steps=warmup_steps,
        seed=seed,
        device=config.device,
    )


# ---------------------------------------------------------------------------
# Training and evaluation


@torch.no_grad()
def _accuracy(learner: Learner, x: Tensor, y: Tensor, task: str) -> float:
    """Fraction of ``x`` that ``learner`` classifies correctly for ``task``."""
    correct = 0
    for start in range(0, x.shape[0], _EVAL_BATCH):
        logits = learner.predict(x[start : start + _EVAL_BATCH], task)
        correct += int((logits.argmax(dim=1) == y[start : start + _EVAL_BATCH]).sum().item())
    return correct / max(x.shape[0], 1)


def _evaluate(learner: Learner, data: Mapping[str, TaskData]) -> dict[str, float]:
    """Test accuracy of every task, in evaluation mode."""
    learner.train(False)
    try:
        return {task: _accuracy(learner, d.test_x, d.test_y, task) for task, d in data.items()}
    finally:
        learner.train(True)


def _train_epoch(
    learner: Learner, data: Mapping[str, TaskData], schedule: Mapping[str, Tensor], epoch: int, steps: int
) -> dict[str, float]:
    """Run one epoch of ``steps`` steps; return each task's mean training loss."""
    totals = dict.fromkeys(data, 0.0)
    for step in range(epoch * steps, (epoch + 1) * steps):
        batches = {task: (d.train_x[schedule[task][step]], d.train_y[schedule[task][step]]) for task, d in data.items()}
        for task, loss in learner.train_step(batches).items():
            totals[task] += loss
    return {task: total / steps for task, total in totals.items()}


def _run(
    method: str, config: BenchmarkConfig, data: Mapping[str, TaskData], schedule: Mapping[str, Tensor], seed: int,
    launch: Launch = Launch(),
) -> dict[str, Any]:
    """Train ``method`` for one seed; return its accuracies, curves and timing (evaluated on rank 0 only)."""
    steps = _steps_per_epoch(data, config.batch_size, launch.world)
    warmup_steps = config.warmup_epochs * steps
    spec = _ModelSpec.for_data(data)
    started = time.perf_counter()
    learner = build_learner(method, spec.problem(), _training(config, seed, warmup_steps))
    learner.train(True)
    train_loss: dict[str, list[float]] = {task: [] for task in data}
    test_accuracy: dict[str, list[float]] = {task: [] for task in data}
    for epoch in range(config.epochs):
        for task, loss in _train_epoch(learner, data, schedule, epoch, steps).items():
            train_loss[task].append(loss)
        if launch.main:
            for task, accuracy in _evaluate(learner, data).items():
                test_accuracy[task].append(accuracy)
    return {
        "seed": seed,
        "final_accuracy": {task: curve[-1] for task, curve in test_accuracy.items() if curve},
        "curves": {
            "epoch": list(range(1, config.epochs + 1)),
            "train_loss": train_loss,
            "test_accuracy": test_accuracy,
        },
        "num_parameters": learner.num_parameters,
        "steps_per_epoch": steps,
        "warmup_steps": warmup_steps if method in _COOPERATIVE_NAMES else 0,
        "train_sizes": {task: int(d.train_y.shape[0]) for task, d in data.items()},
        "test_sizes": {task: int(d.test_y.shape[0]) for task, d in data.items()},
        "wall_time_s": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------
# Summaries and outputs


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _summarise(method: str, runs: list[dict[str, Any]], joint_parameters: int) -> dict[str, Any]:
    """Per-method summary: parameter count and ratio, accuracy mean/std/per-seed, and the runs."""
    tasks = list(runs[0]["final_accuracy"])
    accuracy: dict[str, dict[str, Any]] = {}
    for task in tasks:
        per_seed = [float(run["final_accuracy"][task]) for run in runs]
        mean, std = _mean_std(per_seed)
        accuracy[task] = {"mean": mean, "std": std, "per_seed": per_seed}
    parameters = int(runs[0]["num_parameters"])
    return {
        "method": method,
        "params": parameters,
        "params_ratio": parameters / joint_parameters,
        "accuracy": accuracy,
        "runs": runs,
    }


def _markdown_table(summaries: Mapping[str, Mapping[str, Any]], tasks: Sequence[str]) -> str:
    """The results as a markdown table, accuracies in percent as mean ± std over seeds."""
    header = "| method | params | " + " | ".join(f"{task} acc (%)" for task in tasks) + " |"
    rule = "|---|---:|" + "---:|" * len(tasks)
    rows = [header, rule]
    for method, summary in summaries.items():
        cells = [
            f"{100 * summary['accuracy'][task]['mean']:.2f} ± {100 * summary['accuracy'][task]['std']:.2f}"
            for task in tasks
        ]
        rows.append(f"| {method} | {summary['params_ratio']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _mean_curve(runs: Sequence[Mapping[str, Any]], task: str) -> list[float]:
    """Test-accuracy curve of ``task`` averaged over seeds, in percent."""
    curves = [run["curves"]["test_accuracy"][task] for run in runs]
    return [100 * statistics.fmean(values) for values in zip(*curves, strict=True)]


def _plot(summaries: Mapping[str, Mapping[str, Any]], tasks: Sequence[str], title: str, path: Path) -> None:
    """Save the bar chart (mean ± std final accuracy) and per-task test-accuracy curves to ``path``."""
    figure = Figure(figsize=(5 + 4 * len(tasks), 4.8), layout="constrained")
    axes = figure.subplots(1, 1 + len(tasks), squeeze=False)[0]
    methods = list(summaries)
    width = 0.8 / len(tasks)
    lowest = 100.0
    for offset, task in enumerate(tasks):
        means = [100 * summaries[m]["accuracy"][task]["mean"] for m in methods]
        stds = [100 * summaries[m]["accuracy"][task]["std"] for m in methods]
        positions = [i + (offset - (len(tasks) - 1) / 2) * width for i in range(len(methods))]
        axes[0].bar(positions, means, width, yerr=stds, capsize=3, label=task)
        lowest = min([lowest, *(m - s for m, s in zip(means, stds, strict=True))])
    axes[0].set_xticks(range(len(methods)), methods, rotation=30, ha="right", rotation_mode="anchor")
    axes[0].set_ylim(max(0.0, lowest - 2.0), 100.0)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_title("final accuracy, mean ± std over seeds")
    # Above the plot area, so the legend never hides a bar.
    axes[0].legend(title="task", loc="lower center", bbox_to_anchor=(0.5, 1.08), ncols=len(tasks), fontsize="small")
    for axis, task in zip(axes[1:], tasks, strict=True):
        for method in methods:
            runs = summaries[method]["runs"]
            axis.plot(runs[0]["curves"]["epoch"], _mean_curve(runs, task), label=method)
        axis.set_xlabel("epoch")
        axis.set_ylabel("test accuracy (%)")
        axis.set_title(f"task {task!r}, mean over seeds")
        axis.legend(fontsize="small")
    figure.suptitle(title)
    figure.savefig(path, dpi=120)


def _notes(config: BenchmarkConfig) -> list[str]:
    """How to read the results; written into the JSON beside the configuration."""
    notes = [
        "Accuracies are fractions in [0, 1] on each task's test set after the last epoch (no model "
        "selection on the test set); mean and sample standard deviation over seeds.",
        "MT-COOL warm-up (joint noisy updates, docs/method.md, 'Warm-up') lasts warmup_epochs epochs, i.e. "
        "warmup_steps = warmup_epochs * steps_per_epoch optimizer steps, counted inside epochs (the paper does "
        "not state its warm-up length); vanilla, without_reg, mt_cool and mt_cool_clean all use it.",
        "An epoch is ceil(max task train size / batch_size) steps; each step draws one batch per task from that "
        "task's stream of back-to-back random permutations, identical for every method with the same seed.",
        "params_ratio is the trainable parameter count relative to joint (the paper's Params column).",
    ]
    if config.samples == 1:
        notes.append(
            "With samples = 1 the paper's consistency term (reference = mean of the M predictions) is identically "
            "zero, so mt_cool trains exactly like without_reg; mt_cool_clean uses the noise-free prediction as "
            "the reference, which keeps the term active (docs/method.md, 'The M = 1 gap')."
        )
    if config.dataset == "digits":
        notes.append(
            "scikit-learn digits (8x8) stand in for MNIST; each seed also draws its own stratified train/test "
            "split, so the standard deviation includes split variance. Test sets have about 225 images per "
            "task: one image is about 0.45 percentage points."
        )
    return notes


def run_benchmark(config: BenchmarkConfig, launch: Launch = Launch()) -> dict[str, Any]:
    """Train every method on every seed and return the results (what ``main`` writes as JSON; on a rank
    other than 0 of a ``--distributed`` run, which only trains, an empty dictionary)."""
    check_methods_available(config.methods)
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {method: [] for method in config.methods}
    joint_parameters = 0
    total = len(config.seeds) * len(config.methods)
    with tqdm(total=total, desc="even/odd", unit="run", disable=not (config.progress and launch.main)) as bar:
        for seed in config.seeds:
            data = _load_data(config, seed)
            steps = _steps_per_epoch(data, config.batch_size, launch.world)
            sizes = {task: int(d.train_y.shape[0]) for task, d in data.items()}
            if config.distributed:
                schedule = _sharded_batch_schedule(
                    sizes, config.batch_size, config.epochs * steps, seed, config.device, launch)
            else:
                schedule = _batch_schedule(sizes, config.batch_size, config.epochs * steps, seed, config.device)
            joint_parameters = count_parameters(_ModelSpec.for_data(data).multi_task())
            for method in config.methods:
                bar.set_postfix(method=method, seed=seed)
                runs[method].append(_run(method, config, data, schedule, seed, launch))
                bar.update(1)
    if not launch.main:
        return {}
    tasks = list(next(iter(runs.values()))[0]["final_accuracy"])
    summaries = {method: _summarise(method, method_runs, joint_parameters) for method, method_runs in runs.items()}
    results = {
        "benchmark": "even_odd",
        "config": {**config_record(config), "joint_params": joint_parameters},
        "notes": _notes(config) + (
            [launch.note("batch_size examples per task", f"ceil(max task train size / {launch.world} / batch_size)",
                         "the test sets")]
            if config.distributed else []),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
        },
        "tasks": tasks,
        "accuracy_unit": "fraction in [0, 1]",
        "methods": summaries,
        "table": _markdown_table(summaries, tasks),
        "wall_time_s": time.perf_counter() - started,
    }
    if config.distributed:
        results["distributed"] = launch.record(config.batch_size)
    return results


def _title(config: BenchmarkConfig) -> str:
    """Figure title naming the data and the training budget."""
    data = "MNIST" if config.dataset == "mnist" else "sklearn digits 8x8"
    return (
        f"Even/odd {data}: {len(config.seeds)} seed(s), {config.epochs} epochs, "
        f"batch {config.batch_size}, SGD lr {config.lr}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark from the command line; print the table, write JSON and PNG, return the results.

    Example:
        >>> results = main(["--quick", "--out-dir", "/tmp/even_odd"])  # doctest: +SKIP
        >>> list(results["methods"])  # doctest: +SKIP
        ['independent', 'joint', 'pcgrad', 'mgda', 'cagrad', 'graddrop', 'vanilla', 'without_reg', 'mt_cool', 'mt_cool_clean']
    """
    config = parse_args(argv)
    with distributed_launch(config.distributed, config.device, "python -m benchmarks.even_odd") as launch:
        config = replace(config, device=launch.device)
        results = run_benchmark(config, launch)
        if not launch.main:
            return {}
        return _write(config, results)


def _write(config: BenchmarkConfig, results: dict[str, Any]) -> dict[str, Any]:
    """Write the JSON and the figure, print the table; return the results as written."""
    results = finite(results)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "even_odd.json"
    png_path = out_dir / "even_odd.png"
    json_path.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    _plot(results["methods"], results["tasks"], _title(config), png_path)
    print(results["table"])
    print(f"\nwall time {results['wall_time_s']:.1f} s; wrote {json_path} and {png_path}")
    return dict(results)


def _cli() -> int:
    """Entry point for ``python -m benchmarks.even_odd``: configuration errors become one line, exit status 2."""
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"python -m benchmarks.even_odd: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
