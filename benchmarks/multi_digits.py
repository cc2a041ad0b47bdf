"""The negative-transfer testbed (issue 13): two overlapping digits, one task per digit, a narrow network.

Where the MT-COOL paper's claim can hold: its case is Joint training falling well below one network per
task (negative transfer) and MT-COOL closing that gap. This benchmark first establishes whether there
is such a gap here, with a paired bootstrap confidence interval over seeds, and says plainly when there
is none; then it compares every method against Joint and against Independent the same way, and
measures the mechanism (negative transfer per outer iteration, the clamp, flatness).

Data (:mod:`benchmarks._multi_digits`, no download): composites of two of scikit-learn's 8x8 digits,
digit A at the top-left of a ``(8 + shift)`` canvas and digit B ``shift`` pixels lower and further
right (pixel-wise maximum where they overlap: the MultiMNIST construction of Sener & Koltun, 2018).
Task ``left`` classifies A, task ``right`` B (10 classes each). ``--conflict`` is the probability that
B is drawn independently of A (1: MultiMNIST, the tasks compete; 0: B shows A's class, the tasks agree).
Train and test composites come from disjoint pools of source images, split per seed.

Network (this project's choice, calibrated so that the tasks compete for capacity): a small LeNet-like
encoder, 3x3 convolution (1 -> w channels), ReLU, 3x3 convolution (w -> w), ReLU, 2x2 max-pooling, a
linear layer to 4w units, ReLU (:func:`digit_encoder`, w = ``--width``); one linear head per task.
Joint is :class:`adapters.MultiTaskModel` over that encoder, Independent one encoder and head per task,
MT-COOL's variants split the encoder's channels between the tasks. Loss: cross-entropy per task.
Metric: test accuracy per task (and their mean, the comparisons' summary). A calibration (3 seeds)
found Joint 77.1 % vs Independent 83.8 % mean accuracy at conflict 1, w = 4, shift 2, Adam 2e-3,
3000 composites, 10 epochs; no gap at conflict 0; the gap shrinks at w = 8 and vanishes at w = 16 or
with long training, which is why the network is this narrow and the budget this short.

Methods: every method of the registry on this network, plus the full method's settings:
``mt_cool_m2`` and ``mt_cool_m4`` (M = 2, 4 noise samples, the paper's mean reference, so the
consistency term is active), ``mt_cool_m2_l10`` (L = 10 inner steps per outer iteration, each on a
fresh batch; one outer iteration per 10 training steps, so every task takes the same number of base
steps on the same batches as Joint) and ``mt_cool_m2_jacobi`` (Algorithm 1's Jacobi update order,
against the default Gauss-Seidel of Eq. 4). ``independent`` and ``joint`` always run first.

Outputs (``--out-dir``): the gap table (at ``--conflict`` and the conflict-0 control), the driver's
table (mean ± std, Δm against Independent), the paired table (each method minus Joint and minus
Independent, 95 % bootstrap interval over seeds), the mechanism table; ``multi_digits.json``;
``multi_digits.png`` (bars), ``multi_digits_curves.png``, ``multi_digits_transfer.png`` and
``multi_digits_flatness.png`` (:mod:`benchmarks._mechanism`).

The parameter study over b, M, λ and L is ``python -m benchmarks.sweep`` (its default scenario is this
one): it trains on the validation split of :func:`validation_pairs` (``Scenario.validation``), never on the
test pool, and reads ``--conflict`` / ``--width`` / ``--shift`` through :func:`scenario_from_args`.

Example:
    python -m benchmarks.multi_digits --quick --out-dir /tmp/md
    python -m benchmarks.multi_digits --conflict 0.5 --width 8
    python -m benchmarks.sweep --scenario multi_digits --conflict 0.5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks._cli import POSITIVE_INT, config_record, finite, run_command
from benchmarks._figures import figure_paths, write_figures
from benchmarks._images import ImageTasks, split_indices
from benchmarks._learners import Problem, label, offered_methods
from benchmarks._mechanism import MechanismProbe, pair_name, plot_flatness, plot_transfer, summarise_mechanism
from benchmarks._multi_digits import (
    DIGIT_SIDE,
    SOURCE,
    TASKS,
    _generator,
    _pairs,
    compose,
    digit_images,
    multi_digit_pairs,
    multi_digits,
)
from benchmarks._options import parse_args as parse_scenario_args
from benchmarks._runs import run_scenario
from benchmarks._scenario import Metric, Scenario, ScenarioConfig, SeedData
from benchmarks._stats import paired_difference_ci
from benchmarks._summary import add_delta_m, markdown_table

__all__ = [
    "METHODS",
    "SCENARIO",
    "STUDY_METHODS",
    "Testbed",
    "cli",
    "digit_encoder",
    "evaluate",
    "gap_reading",
    "main",
    "parse_args",
    "scenario",
    "scenario_from_args",
    "validation_pairs",
]

STUDY_METHODS: Final[tuple[str, ...]] = ("mt_cool_m2", "mt_cool_m4", "mt_cool_m2_l10", "mt_cool_m2_jacobi")
"""The full method's settings (opt-in methods of the registry) this benchmark adds to the default list."""

METHODS: Final[tuple[str, ...]] = tuple(
    m for m in offered_methods((), opt_in=True) if m in offered_methods(()) or m in STUDY_METHODS
)
"""The default methods, in table order: every method on this network plus :data:`STUDY_METHODS`."""

BASELINES: Final[tuple[str, str]] = ("independent", "joint")
"""Always run, first: the gap and every paired comparison need them."""

MEAN: Final[str] = "mean_acc"
"""Key of the per-seed mean of the two tasks' accuracies, the comparisons' summary."""

VALIDATION_FRACTION: Final[float] = 0.25
"""Model selection (:func:`validation_pairs`): share of the training pool's source images held out as the
validation pool."""

CONTRASTS: Final[tuple[tuple[str, str], ...]] = (
    ("without_reg", "vanilla"), ("mt_cool_m2", "without_reg"), ("mt_cool_m2", "vanilla"),
    ("mt_cool_m4", "mt_cool_m2"), ("mt_cool_m2_l10", "mt_cool_m2"), ("mt_cool_m2_jacobi", "mt_cool_m2"),
    ("mt_cool_clean", "without_reg"),
)
"""Method pairs compared directly (paired over seeds): the paper's ablation ladder and each setting's effect."""

FLATNESS_SHOWN: Final[tuple[float, float]] = (0.05, 0.2)
"""The two radii whose flatness rise the mechanism table prints."""

_CLASSES: Final[int] = 10


@dataclass(frozen=True)
class Testbed:
    """The testbed's own knobs (flags ``--conflict``, ``--width``, ``--shift``).

    Attributes:
        conflict: probability that digit B is independent of digit A, in [0, 1].
        width: channels w of both convolutions (the hidden layer has 4w units).
        shift: offset of digit B in pixels, 1..16 (canvas ``8 + shift``, overlap ``max(0, 8 - shift)**2``).
    """

    conflict: float = 1.0
    width: int = 4
    shift: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.conflict, bool) or not isinstance(self.conflict, (int, float)) \
                or not 0.0 <= self.conflict <= 1.0:
            raise ValueError(f"--conflict must be a number in [0, 1] (0: the digits agree, 1: independent), "
                             f"got {self.conflict!r}")
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"--width must be a positive int (channels of each convolution), got {self.width!r}")
        if isinstance(self.shift, bool) or not isinstance(self.shift, int) or not 1 <= self.shift <= 2 * DIGIT_SIDE:
            raise ValueError(f"--shift must be an int in [1, {2 * DIGIT_SIDE}], got {self.shift!r}")


# ---------------------------------------------------------------------------
# Network, data, metrics


def digit_encoder(width: int, side: int) -> nn.Sequential:
    """The testbed's encoder: conv 3x3 (1 -> w), ReLU, conv 3x3 (w -> w), ReLU, max-pool 2, linear to 4w, ReLU.

    Only ``nn.Conv2d`` and ``nn.Linear`` hold parameters, so :func:`adapters.split_channels` splits it.

    Args:
        width: channels w of both convolutions.
        side: input side in pixels (``8 + shift``).

    Example:
        >>> digit_encoder(4, 10)(torch.zeros(2, 1, 10, 10)).shape
        torch.Size([2, 16])
    """
    if width < 1 or side < 2:
        raise ValueError(f"width must be >= 1 and side >= 2, got width={width!r}, side={side!r}")
    pooled = side // 2
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(width * pooled * pooled, 4 * width), nn.ReLU(),
    )


def _cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits, target)


def _problem(testbed: Testbed, config: ScenarioConfig | None, data: SeedData) -> Problem:
    first = next(iter(data.values())) if isinstance(data, Mapping) else data
    side = int(first.train_x.shape[-1])
    hidden = 4 * testbed.width

    def multi_task() -> nn.Module:
        import adapters

        return adapters.MultiTaskModel(digit_encoder(testbed.width, side),
                                       {task: nn.Linear(hidden, _CLASSES) for task in TASKS})

    def single_task(task: str) -> nn.Module:
        return nn.Sequential(digit_encoder(testbed.width, side), nn.Linear(hidden, _CLASSES))

    return Problem(tasks=TASKS, multi_task=multi_task, single_task=single_task,
                   losses=dict.fromkeys(TASKS, _cross_entropy))


def _sizes(config: ScenarioConfig) -> tuple[int, int]:
    if config.data_dir is not None:
        raise ValueError(f"multi_digits draws its composites from scikit-learn's bundled digits; --data-dir "
                         f"{config.data_dir!r} is not used, drop it")
    train, test = config.train_size or 1, config.test_size or 1
    if train < config.batch_size:
        raise ValueError(f"--batch-size {config.batch_size} exceeds --train-size {train}; lower --batch-size")
    return train, test


def _load(testbed: Testbed, config: ScenarioConfig, seed: int) -> ImageTasks:
    """One seed's composites: train from the train pool, test from the held-out pool."""
    train, test = _sizes(config)
    return multi_digits(train, test, seed=seed, shift=testbed.shift, conflict=testbed.conflict,
                        test_fraction=config.test_fraction)


def validation_pairs(train: int, validation: int, *, seed: int, conflict: float, test_fraction: float = 0.25
                     ) -> tuple[Tensor, Tensor]:
    """Model selection's composites (``python -m benchmarks.sweep``): the seed's training pool of source
    images (:func:`multi_digit_pairs`) split again, by digit, into a fit pool and a validation pool
    (:data:`VALIDATION_FRACTION`); the seed's test pool is never drawn.

    Returns:
        ``[train, 2]`` source-image pairs from the fit pool and ``[validation, 2]`` from the validation pool.

    Example:
        >>> fit, held = validation_pairs(50, 20, seed=0, conflict=1.0)
        >>> tuple(fit.shape), bool(torch.isin(held, fit).any())
        ((50, 2), False)
    """
    pool = multi_digit_pairs(1, 1, seed=seed, conflict=conflict, test_fraction=test_fraction).train_pool
    _, labels = digit_images()
    fit, held = split_indices(pool.numel(), VALIDATION_FRACTION, seed, strata=labels[pool].tolist())
    return (_pairs(labels, pool[fit], train, conflict, _generator(seed, 3)),
            _pairs(labels, pool[held], validation, conflict, _generator(seed, 4)))


def _validation_load(testbed: Testbed, config: ScenarioConfig, seed: int) -> ImageTasks:
    """Training composites from the fit pool, validation composites (--test-size of them) from the validation
    pool of validation_pairs (a quarter of each seed's training pool of source images, by digit); the test
    pool is never drawn.

    Model selection's data (``Scenario.validation``, ``python -m benchmarks.sweep``): the first paragraph
    of this docstring is the sweep's note on its validation split.
    """
    train, test = _sizes(config)
    fit_pairs, held_pairs = validation_pairs(train, test, seed=seed, conflict=testbed.conflict,
                                             test_fraction=config.test_fraction)
    images, labels = digit_images()

    def targets(pairs: Tensor) -> dict[str, Tensor]:
        return {TASKS[0]: labels[pairs[:, 0]], TASKS[1]: labels[pairs[:, 1]]}

    return ImageTasks(compose(images, fit_pairs, testbed.shift), targets(fit_pairs),
                      compose(images, held_pairs, testbed.shift), targets(held_pairs), f"{SOURCE} (validation)")


def evaluate(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, float]:
    """Accuracy of each task: the fraction of test composites whose largest logit is the digit.

    Args:
        outputs: per task, logits ``[N, 10]``.
        targets: per task, labels ``[N]`` in 0..9.

    Example:
        >>> evaluate({"left": torch.eye(10)[:4], "right": torch.eye(10)[:4]},
        ...          {"left": torch.tensor([0, 1, 2, 0]), "right": torch.tensor([9, 9, 9, 3])})
        {'left_acc': 0.75, 'right_acc': 0.25}
    """
    return {
        f"{task}_acc": int((outputs[task].argmax(dim=1) == y).sum().item()) / max(y.shape[0], 1)
        for task, y in targets.items()
    }


def _notes(testbed: Testbed, config: ScenarioConfig) -> list[str]:
    side = DIGIT_SIDE + testbed.shift
    notes = [
        f"Testbed: conflict {testbed.conflict}, width w = {testbed.width} (hidden {4 * testbed.width}), shift "
        f"{testbed.shift} ({side}x{side} canvas, {max(0, DIGIT_SIDE - testbed.shift) ** 2} overlapping pixels).",
        "Accuracies are fractions in [0, 1] on the test composites after the last epoch (no model selection); "
        "mean_acc is the per-seed mean of the two tasks. Paired intervals: 95 % percentile bootstrap over seeds "
        "of the per-seed difference (benchmarks/_stats.py); an interval that contains 0 is a tie.",
        "mt_cool at samples = 1 trains exactly like without_reg (the paper's consistency term is identically "
        "zero at M = 1); mt_cool_m2 / mt_cool_m4 are the full method. mt_cool_m2_l10: after warm-up one outer "
        "iteration per 10 training steps, inner step l on the l-th step's batch (same base steps and batches "
        "as Joint; up to 9 batches collected at the very end are not trained on). mt_cool_m2_jacobi: "
        "update_order='jacobi' (Algorithm 1, line 12).",
        f"MT-COOL warm-up lasts warmup_epochs = {config.warmup_epochs} epoch(s), counted inside epochs. "
        f"Bound b = {config.bound} ({config.optimizer} lr {config.lr}); the clamped fraction says whether the "
        "clamp binds.",
    ]
    return notes


def scenario(testbed: Testbed = Testbed()) -> Scenario:
    """The driver's :class:`Scenario` for ``testbed``; its ``validation`` is :func:`validation_pairs`' split."""
    defaults: dict[str, Any] = {
        "seeds": 10, "epochs": 10, "train_size": 3000, "test_size": 1000, "warmup_epochs": 1, "batch_size": 64,
        "optimizer": "adam", "lr": 2e-3, "schedule": "constant", "methods": METHODS,
    }
    quick: dict[str, Any] = {"seeds": 3, "epochs": 2, "train_size": 256, "test_size": 128, "warmup_epochs": 1,
                             "methods": METHODS}
    return Scenario(
        name="multi_digits",
        title=f"Multi-digit testbed (conflict {testbed.conflict}, w = {testbed.width})",
        description="The negative-transfer testbed: two overlapping sklearn digits, one task per digit, a narrow "
        "LeNet-like network. Establishes the Joint - Independent gap with a paired 95 % bootstrap interval, "
        "compares every method against both, and measures negative transfer, the clamp and flatness.",
        tasks=TASKS,
        metrics=tuple(Metric(f"{task}_acc", f"{task} acc (%)") for task in TASKS),
        curve_metric={task: f"{task}_acc" for task in TASKS},
        defaults=defaults,
        quick=quick,
        problem=partial(_problem, testbed),
        load=partial(_load, testbed),
        validation=partial(_validation_load, testbed),
        evaluate=evaluate,
        layout="none: the composites are drawn from scikit-learn's bundled 8x8 digits",
        notes=partial(_notes, testbed),
        figures=("bars", "curves"),
        eval_batch=1024,
        flag_help={
            "train_size": "training composites per seed",
            "test_size": "test composites per seed (python -m benchmarks.sweep: validation composites)",
            "data_dir": "not used: the composites come from scikit-learn's bundled digits",
        },
        default_data="sklearn 8x8 digit composites",
    )


SCENARIO: Final[Scenario] = scenario()
"""The scenario at the default testbed (conflict 1, w = 4, shift 2)."""


# ---------------------------------------------------------------------------
# Command line


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] (0: the digits agree, 1: independent), "
                                         f"got {text!r}")
    return value


def _shift(text: str) -> int:
    value = POSITIVE_INT(text)
    if value > 2 * DIGIT_SIDE:
        raise argparse.ArgumentTypeError(f"expected an int in [1, {2 * DIGIT_SIDE}], got {text!r}")
    return int(value)


def _testbed_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.multi_digits", add_help=False)
    group = parser.add_argument_group("testbed")
    default = Testbed()
    group.add_argument("--conflict", type=_unit_interval, default=default.conflict,
                       help="probability that digit B is independent of digit A: 1 = MultiMNIST, the tasks compete; "
                            f"0 = same class, the tasks agree (default {default.conflict})")
    group.add_argument("--width", type=POSITIVE_INT, default=default.width,
                       help=f"channels w of both convolutions; hidden layer 4w (default {default.width})")
    group.add_argument("--shift", type=_shift, default=default.shift,
                       help=f"offset of digit B in pixels, canvas 8 + shift (default {default.shift})")
    return parser


def _testbed_of(arguments: Sequence[str]) -> tuple[Testbed, argparse.ArgumentParser]:
    parser = _testbed_parser()
    known, _ = parser.parse_known_args(list(arguments))
    return Testbed(known.conflict, known.width, known.shift), parser


def scenario_from_args(arguments: Sequence[str]) -> tuple[Scenario, list[argparse.ArgumentParser]]:
    """The scenario at the testbed that ``--conflict`` / ``--width`` / ``--shift`` among ``arguments`` give,
    and the parser of those flags (a parent, for ``--help``); the other arguments are left to the driver.
    How a program built on the driver (``python -m benchmarks.sweep``) runs this testbed.

    Example:
        >>> found, parents = scenario_from_args(["--width", "8", "--quick"])
        >>> found.title, len(parents)
        ('Multi-digit testbed (conflict 1.0, w = 8)', 1)
    """
    testbed, parser = _testbed_of(arguments)
    return scenario(testbed), [parser]


def parse_args(argv: Sequence[str] | None = None) -> tuple[Testbed, ScenarioConfig]:
    """The testbed and the driver's configuration.

    Raises:
        ValueError: for ``--distributed`` (the statistics need every seed in one process), and the
            driver's own checks.
    """
    arguments = sys.argv[1:] if argv is None else list(argv)
    testbed, parser = _testbed_of(arguments)
    if "--distributed" in arguments:
        raise ValueError("multi_digits runs in one process (its intervals pair every seed's runs); drop --distributed")
    return testbed, parse_scenario_args(scenario(testbed), arguments, parents=[parser])


# ---------------------------------------------------------------------------
# Statistics and tables


def _per_seed(summary: Mapping[str, Any], key: str) -> list[float]:
    metrics = summary["metrics"]
    if key == MEAN:
        left, right = (metrics[f"{task}_acc"]["per_seed"] for task in TASKS)
        return [(a + b) / 2 for a, b in zip(left, right, strict=True)]
    return list(metrics[key]["per_seed"])


def _keys() -> tuple[str, ...]:
    return (*(f"{task}_acc" for task in TASKS), MEAN)


def _paired(methods: Mapping[str, Mapping[str, Any]], method: str, baseline: str) -> dict[str, dict[str, float | int]]:
    return {key: paired_difference_ci(_per_seed(methods[method], key), _per_seed(methods[baseline], key)).record()
            for key in _keys()}


def _reading(interval: Mapping[str, Any]) -> str:
    low, high = interval["low"], interval["high"]
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return "no interval"
    return "better" if low > 0 else "worse" if high < 0 else "tie"


def gap_reading(interval: Mapping[str, Any], conflict: float) -> str:
    """One sentence on the Joint - Independent gap of mean accuracy (fractions) and its interval.

    Example:
        >>> gap_reading({"estimate": -0.066, "low": -0.093, "high": -0.027, "n": 10}, 1.0)
        'negative transfer at conflict 1.0: Joint is 6.6 pp below Independent (95 % CI [-9.3, -2.7] pp, 10 seeds)'
    """
    estimate, low, high, n = interval["estimate"], interval["low"], interval["high"], interval["n"]
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return f"no interval at conflict {conflict} with {n} seed(s); run --seeds 2 or more"
    ci = f"95 % CI [{100 * low:.1f}, {100 * high:.1f}] pp, {n} seeds"
    if high < 0:
        return f"negative transfer at conflict {conflict}: Joint is {-100 * estimate:.1f} pp below Independent ({ci})"
    if low > 0:
        return (f"no negative transfer at conflict {conflict}: Joint is {100 * estimate:.1f} pp above Independent "
                f"({ci})")
    return (f"no negative transfer established at conflict {conflict}: Joint - Independent = {100 * estimate:+.1f} pp, "
            f"the interval includes 0, a tie ({ci})")


def _gap(results: Mapping[str, Any], conflict: float) -> dict[str, Any]:
    methods = results["methods"]
    paired = _paired(methods, "joint", "independent")
    return {
        "conflict": conflict,
        "joint_minus_independent": paired,
        "independent": {key: float(np.mean(_per_seed(methods["independent"], key))) for key in _keys()},
        "joint": {key: float(np.mean(_per_seed(methods["joint"], key))) for key in _keys()},
        "negative_transfer": bool(paired[MEAN]["high"] < 0) if np.isfinite(paired[MEAN]["high"]) else False,
        "reading": gap_reading(paired[MEAN], conflict),
    }


def _cell(interval: Mapping[str, Any]) -> str:
    estimate, low, high = interval["estimate"], interval["low"], interval["high"]
    if estimate is None or not np.isfinite(estimate):
        return "n/a"
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return f"{100 * estimate:+.2f} (no CI)"
    return f"{100 * estimate:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"


def _gap_table(gaps: Sequence[Mapping[str, Any]]) -> str:
    rows = ["| conflict | independent mean acc (%) | joint mean acc (%) | joint − independent, mean (pp) [95 % CI] | "
            "left (pp) | right (pp) | reading |",
            "|---:|---:|---:|---:|---:|---:|---|"]
    for gap in gaps:
        d = gap["joint_minus_independent"]
        rows.append(f"| {gap['conflict']} | {100 * gap['independent'][MEAN]:.2f} | {100 * gap['joint'][MEAN]:.2f} | "
                    f"{_cell(d[MEAN])} | {_cell(d['left_acc'])} | {_cell(d['right_acc'])} | "
                    f"{_reading(d[MEAN]).replace('worse', 'negative transfer').replace('better', 'positive transfer')} |")
    return "\n".join(rows)


def _paired_table(methods: Mapping[str, Mapping[str, Any]], paired: Mapping[str, Mapping[str, Any]]) -> str:
    rows = ["| method | mean acc (%) | − joint (pp) [95 % CI] | vs joint | − independent (pp) [95 % CI] | "
            "vs independent |", "|---|---:|---:|---|---:|---|"]
    for method, entry in paired.items():
        mean = float(np.mean(_per_seed(methods[method], MEAN)))
        cells = [("–", "–") if method == baseline else (_cell(entry[f"vs_{baseline}"][MEAN]),
                                                        _reading(entry[f"vs_{baseline}"][MEAN]))
                 for baseline in ("joint", "independent")]
        rows.append(f"| {label(method)} | {100 * mean:.2f} | " + " | ".join(" | ".join(c) for c in cells) + " |")
    return "\n".join(rows)


def _contrast_table(contrasts: Mapping[str, Mapping[str, Any]]) -> str:
    rows = ["| contrast | mean acc (pp) [95 % CI] | left (pp) | right (pp) | reading |", "|---|---:|---:|---:|---|"]
    for name, entry in contrasts.items():
        rows.append(f"| {name} | {_cell(entry[MEAN])} | {_cell(entry['left_acc'])} | {_cell(entry['right_acc'])} | "
                    f"{_reading(entry[MEAN])} |")
    return "\n".join(rows)


def _sci(interval: Mapping[str, Any] | None) -> str:
    if interval is None or interval["estimate"] is None or not np.isfinite(interval["estimate"]):
        return "n/a"
    low, high = interval["low"], interval["high"]
    if low is None or not (np.isfinite(low) and np.isfinite(high)):
        return f"{interval['estimate']:+.2e}"
    return f"{interval['estimate']:+.2e} [{low:+.2e}, {high:+.2e}]"


def _mechanism_table(mechanism: Mapping[str, Any], methods: Sequence[str]) -> str:
    pairs = [pair_name(TASKS[0], TASKS[1]), pair_name(TASKS[1], TASKS[0])]
    shown = [f"r={r}" for r in FLATNESS_SHOWN]
    rows = ["| method | transfer " + " | transfer ".join(pairs) + " | clamped (fraction) | "
            + " | ".join(f"flatness rise {s} (left / right)" for s in shown) + " |",
            "|---|" + "---:|" * (len(pairs) + 1 + len(shown))]
    for method in ["joint", *methods]:
        transfer = mechanism["transfer"].get(method, {}).get("pairs", {})
        clamped = mechanism["clamped"].get(method)
        flat = mechanism["flatness"].get("joint-split" if method == "joint" else method)
        if not transfer and clamped is None and flat is None:
            continue
        cells = [_sci(transfer[p]["mean"]) if p in transfer else "–" for p in pairs]
        fraction = None if clamped is None else clamped["mean"]["estimate"]
        cells.append("–" if clamped is None else "n/a" if fraction is None or not np.isfinite(fraction)
                     else f"{fraction:.4f}")
        for radius in FLATNESS_SHOWN:
            if flat is None or radius not in flat["radii"]:
                cells.append("–")
                continue
            j = flat["radii"].index(radius)
            cells.append(" / ".join(f"{flat['tasks'][t]['rise'][j]:+.3f}" for t in TASKS))
        name = "Joint-split" if method == "joint" else label(method)
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------
# Runs


def _merge(scenario_: Scenario, config: ScenarioConfig, parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One results mapping from runs over disjoint method lists (same seeds and data)."""
    merged = dict(parts[-1])
    found = {method: summary for part in parts for method, summary in part["methods"].items()}
    methods = {method: found[method] for method in config.methods if method in found}
    merged["methods"] = methods
    merged["delta_m"] = {**merged["delta_m"], "metrics": add_delta_m(methods, scenario_.metrics)}
    merged["table"] = markdown_table(scenario_.metrics, methods)
    merged["config"] = {**config_record(config), "joint_params": parts[0]["config"]["joint_params"]}
    return merged


def _run_testbed(testbed: Testbed, config: ScenarioConfig) -> dict[str, Any]:
    started = time.perf_counter()
    config = replace(config, methods=tuple(m for m in offered_methods((), opt_in=True)
                                           if m in BASELINES or m in config.methods))
    main_scenario = scenario(testbed)
    probe = MechanismProbe()
    first, _ = run_scenario(main_scenario, replace(config, methods=BASELINES), probe=probe)
    gaps = [_gap(first, testbed.conflict)]
    if testbed.conflict != 0.0:
        control, _ = run_scenario(scenario(replace(testbed, conflict=0.0)), replace(config, methods=BASELINES))
        gaps.append(_gap(control, 0.0))
    print("Joint - Independent gap (paired over seeds):\n" + _gap_table(gaps))
    for gap in gaps:
        print(f"- {gap['reading']}")
    sys.stdout.flush()
    rest = tuple(m for m in config.methods if m not in BASELINES)
    parts = [first]
    if rest:
        second, _ = run_scenario(main_scenario, replace(config, methods=rest), probe=probe)
        parts.append(second)
    results = _merge(main_scenario, config, parts)
    methods = results["methods"]
    results["testbed"] = {"conflict": testbed.conflict, "width": testbed.width, "shift": testbed.shift}
    results["gap"] = {"at_conflict": gaps[0], "control": gaps[-1] if len(gaps) > 1 else gaps[0],
                      "control_is_the_main_run": len(gaps) == 1}
    results["paired"] = {method: {"vs_joint": _paired(methods, method, "joint"),
                                  "vs_independent": _paired(methods, method, "independent")}
                         for method in methods}
    results["contrasts"] = {f"{label(a)} − {label(b)}": _paired(methods, a, b)
                            for a, b in CONTRASTS if a in methods and b in methods}
    results["mechanism"] = summarise_mechanism(methods)
    results["tables"] = {
        "gap": _gap_table(gaps),
        "paired": _paired_table(methods, results["paired"]),
        "contrasts": _contrast_table(results["contrasts"]),
        "mechanism": _mechanism_table(results["mechanism"], [m for m in methods if m not in BASELINES]),
    }
    results["wall_time_s"] = time.perf_counter() - started
    return results


# ---------------------------------------------------------------------------
# Figures and output


def _write(scenario_: Scenario, results: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    paths = {"json": out_dir / "multi_digits.json", **figure_paths(scenario_, out_dir),
             "transfer": out_dir / "multi_digits_transfer.png", "flatness": out_dir / "multi_digits_flatness.png"}
    results["outputs"] = {key: str(path) for key, path in paths.items()}
    results = finite(results)
    paths["json"].write_text(json.dumps(results, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    write_figures(scenario_, results, {}, paths)
    plot_transfer(results["mechanism"], paths["transfer"], scenario_.title)
    plot_flatness(results["mechanism"], paths["flatness"], scenario_.title)
    tables = results["tables"]
    print(f"\nJoint - Independent gap (paired over seeds):\n{tables['gap']}")
    for key in ("at_conflict", "control"):
        print(f"- {results['gap'][key]['reading']}")
    print(f"\nAll methods (mean ± std over seeds, Δm against Independent):\n{results['table']}")
    print(f"\nPaired differences of mean accuracy (95 % bootstrap CI over seeds; a CI containing 0 is a tie):\n"
          f"{tables['paired']}")
    print(f"\nContrasts between the cooperative variants (paired over seeds):\n{tables['contrasts']}")
    print(f"\nMechanism (held-out batch; transfer and clamped averaged over the cooperative phase, 95 % CI over "
          f"seeds; flatness rise = loss(r) - loss(0)):\n{tables['mechanism']}")
    print(f"\nwall time {results['wall_time_s']:.1f} s; wrote {', '.join(str(p) for p in paths.values())}")
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the testbed from the command line; print the tables, write JSON and figures.

    Example:
        >>> results = main(["--quick", "--out-dir", "/tmp/multi_digits"])  # doctest: +SKIP
        >>> results["gap"]["at_conflict"]["reading"]  # doctest: +SKIP
        'negative transfer at conflict 1.0: ...'
    """
    testbed, config = parse_args(argv)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return _write(scenario(testbed), _run_testbed(testbed, config), out_dir)


def cli(argv: Sequence[str] | None = None) -> int:
    """Entry point: configuration errors become one line on stderr and exit status 2."""
    return run_command(partial(main, argv), "python -m benchmarks.multi_digits")


if __name__ == "__main__":
    sys.exit(cli())
