"""The parameter study of MT-COOL over the bound b, the noise samples M, the consistency weight λ and the
inner steps L (issue 13; the journal version of the method reports one): ``python -m benchmarks.sweep``.

What it does: for every cell of the grid ``--sweep-bound`` x ``--sweep-samples`` x ``--sweep-weight`` x
``--sweep-inner-steps`` it trains method ``mt_cool`` (the paper's variant and mean reference) with that
cell's ``bound``, ``samples``, ``consistency_weight`` and ``inner_steps`` through the scenario driver
(:func:`benchmarks._runs.run_scenario`), on every seed, and Joint once on the same data and seeds. Every
run trains and is scored on a **validation split** carved out of each seed's training data, never on the
test data: the scenario's own (``Scenario.validation``; multi_digits holds out a quarter of its training
pool of source images), else :meth:`benchmarks._images.ImageTasks.validation_split` of ``load``'s
training data (:data:`VALIDATION_FRACTION`, stratified on an int64 image-level target where there is one;
per task where each task has its own data). L > 1 runs with a fresh batch per inner step
(``--inner-batches fresh``, the sweep's default: one outer iteration per L training steps, so every task
takes Joint's number of base steps on Joint's batches). At M = 1 the paper's consistency term is
identically zero, so λ has no effect: such a cell runs once per (b, L) and stands for every λ (flagged in
the JSON and the table).

Per cell and seed, Δm against Joint of the same seed (:func:`benchmarks._delta_m.delta_m`, the scenario's
metrics and directions); per cell, its mean over seeds with a 95 % percentile bootstrap interval
(:func:`benchmarks._stats.mean_ci`). Where every metric is a percentage of the same direction (the
accuracies of multi_digits and even_odd), also their per-seed mean and its paired difference to Joint in
points. The selected cell maximises Δm on the validation split.

Outputs (``--out-dir``): a markdown table on stdout (one row per cell: b, M, λ, L, Δm vs Joint [95 % CI],
metric means), the selected cell, whether its interval contains 0, and the command that evaluates it on
the test split; ``sweep_<scenario>.json`` (configuration, grid, validation note, Joint's per-seed metrics,
every cell's per-seed metrics and Δm interval, the selection) and ``sweep_<scenario>.png``, the heat map:
one panel per (M, L), rows b, columns λ, one diverging colour scale centred at 0 shared by every panel,
each cell annotated with its estimate and interval, the selected cell outlined.

Reading: a cell's interval is over seeds; one that contains 0 is a tie with Joint, whatever its sign.
The selected cell's validation Δm is optimistic (the largest of many noisy estimates): its test-split
run, with the printed command, is the figure to report; the grid's shape (which b, whether λ or M
matter) is what the study itself shows.

Every other flag is the scenario driver's (:mod:`benchmarks._options`): ``--quick`` (a tiny grid and
budget), ``--seeds`` (default 5 here), ``--epochs``, ``--optimizer``, ``--preset paper``, and the
scenario's own (multi_digits: ``--conflict``, ``--width``, ``--shift``, through its
``scenario_from_args``). ``--methods``, ``--bound``, ``--samples``, ``--consistency-weight`` and
``--inner-steps`` belong to the grid and are refused.

Example:
    python -m benchmarks.sweep --out-dir /tmp/sweep
    python -m benchmarks.sweep --quick --out-dir /tmp/sweep
    python -m benchmarks.sweep --scenario even_odd --sweep-bound 0.01,0.05 --sweep-samples 2 --sweep-weight 0,1 \\
        --sweep-inner-steps 1 --seeds 3
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar

import numpy as np
import torch
from tqdm import tqdm  # type: ignore[import-untyped]

from benchmarks._cli import config_record, finite, run_command
from benchmarks._delta_m import delta_m
from benchmarks._images import ImageTasks
from benchmarks._options import SIZED
from benchmarks._options import parse_args as parse_scenario_args
from benchmarks._runs import SeedData, run_scenario
from benchmarks._scenario import Metric, Scenario, ScenarioConfig
from benchmarks._stats import Interval, mean_ci, paired_difference_ci
from benchmarks._sweep_output import flag_text, heat_map, table

__all__ = [
    "DEFAULT_GRID",
    "METHOD",
    "QUICK_GRID",
    "SCENARIOS",
    "VALIDATION_FRACTION",
    "Cell",
    "Grid",
    "Study",
    "cli",
    "main",
    "parse_args",
    "selection_reading",
    "validation_scenario",
]

SCENARIOS: Final[tuple[str, ...]] = ("even_odd", "refuge", "hrf_av", "ham10000", "openkbp", "stoic", "multi_digits")
"""The scenario modules ``--scenario`` chooses from (``benchmarks.<name>``)."""

DEFAULT_SCENARIO: Final[str] = "multi_digits"

METHOD: Final[str] = "mt_cool"
"""The method every cell trains (variant ``mt_cool``, the paper's mean reference; M, L from the cell)."""

BASELINE: Final[str] = "joint"
"""Trained once on the same validation data and seeds; every cell's Δm is against it, seed by seed."""

SEEDS: Final[int] = 5
"""The sweep's default ``--seeds`` (the scenario drivers keep their own)."""

QUICK_SEEDS: Final[int] = 2
"""The sweep's ``--quick`` seeds (two, so that there is an interval)."""

VALIDATION_FRACTION: Final[float] = 0.25
"""Share of each seed's training data held out for validation when the scenario has no ``validation``."""

_GRID_OPTIONS: Final[Mapping[str, str]] = {
    "--methods": "the sweep trains mt_cool and joint",
    "--bound": "give the bounds with --sweep-bound",
    "--samples": "give M with --sweep-samples",
    "--consistency-weight": "give λ with --sweep-weight",
    "--inner-steps": "give L with --sweep-inner-steps",
}
"""Driver options the grid sets, refused on the sweep's command line, with the fix."""

_NOT_REPEATED: Final[frozenset[str]] = frozenset({
    "seeds", "methods", "bound", "samples", "inner_steps", "consistency_weight", "inner_batches", "out_dir",
    "quick", "progress", "distributed", "preset",
})
"""``ScenarioConfig`` fields the test command does not copy from the sweep's configuration (the cell's
own, or the test run's choice: its seeds, its output folder)."""

_T = TypeVar("_T", int, float)


@dataclass(frozen=True)
class Cell:
    """One setting of the grid.

    Attributes:
        bound: b, the noise and clamp bound.
        samples: M, the noise samples.
        consistency_weight: λ.
        inner_steps: L.
    """

    bound: float
    samples: int
    consistency_weight: float
    inner_steps: int


def _check_values(flag: str, values: object, kind: type[_T], valid: Callable[[_T], bool], what: str,
                  example: str) -> None:
    if not isinstance(values, tuple) or not values:
        raise ValueError(f"{flag} needs a non-empty comma list of {what}, e.g. {example}; got {values!r}")
    for value in values:
        wrong_type = isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int)
        if wrong_type or not math.isfinite(value) or not valid(value):
            raise ValueError(f"{flag} takes {what}, e.g. {example}; got {value!r} in {list(values)}")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{flag} lists {repeated} more than once; give each value once, e.g. {example}")


@dataclass(frozen=True)
class Grid:
    """The grid of the study: every combination of its values is a cell.

    Attributes:
        bounds: b values (``--sweep-bound``), finite and > 0.
        samples: M values (``--sweep-samples``), ints >= 1.
        weights: λ values (``--sweep-weight``), finite and >= 0.
        inner_steps: L values (``--sweep-inner-steps``), ints >= 1.

    Raises:
        ValueError: naming the flag, for an empty list, a value out of range, or a value given twice.

    Example:
        >>> grid = Grid((0.05,), (1, 2), (0.0, 1.0), (1,))
        >>> [(c.samples, c.consistency_weight) for c in grid.cells()]
        [(1, 0.0), (1, 1.0), (2, 0.0), (2, 1.0)]
        >>> len(grid.runs())  # M = 1: one run stands for every λ
        3
    """

    bounds: tuple[float, ...]
    samples: tuple[int, ...]
    weights: tuple[float, ...]
    inner_steps: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_values("--sweep-bound", self.bounds, float, lambda v: v > 0, "numbers > 0", "0.01,0.05")
        _check_values("--sweep-samples", self.samples, int, lambda v: v >= 1, "integers >= 1", "2,4")
        _check_values("--sweep-weight", self.weights, float, lambda v: v >= 0, "numbers >= 0", "0,1,3")
        _check_values("--sweep-inner-steps", self.inner_steps, int, lambda v: v >= 1, "integers >= 1", "1,10")

    def cells(self) -> list[Cell]:
        """Every cell, panel by panel: M, then L, then b, then λ."""
        return [Cell(b, m, w, steps) for m in self.samples for steps in self.inner_steps for b in self.bounds
                for w in self.weights]

    def run_of(self, cell: Cell) -> Cell:
        """The cell whose run stands for ``cell``: itself, or at M = 1 (λ has no effect) the cell with the
        first λ of the grid."""
        return replace(cell, consistency_weight=self.weights[0]) if cell.samples == 1 else cell

    def runs(self) -> list[Cell]:
        """The cells that are trained, in :meth:`cells` order (one per (b, L) at M = 1)."""
        return [cell for cell in self.cells() if self.run_of(cell) == cell]


DEFAULT_GRID: Final[Grid] = Grid(bounds=(0.01, 0.05, 0.1), samples=(2, 4), weights=(0.0, 1.0, 3.0), inner_steps=(1, 10))
"""b {0.01, 0.05, 0.1} x M {2, 4} x λ {0, 1, 3} x L {1, 10}: 36 cells."""

QUICK_GRID: Final[Grid] = Grid(bounds=(0.05,), samples=(1, 2), weights=(0.0, 1.0), inner_steps=(1, 2))
"""``--quick``: b 0.05 x M {1, 2} x λ {0, 1} x L {1, 2}, 8 cells in 6 runs (M = 1 once per L)."""


@dataclass(frozen=True)
class Study:
    """What one ``python -m benchmarks.sweep`` command runs.

    Attributes:
        module: the scenario module (``"multi_digits"``), run as ``python -m benchmarks.<module>``.
        scenario: its scenario, as its own driver runs it (the scenario's flags applied).
        grid: the cells.
        config: the driver's configuration; each cell replaces its ``bound``, ``samples``,
            ``consistency_weight`` and ``inner_steps``, and its ``methods``.
        driver_flags: the flags that make the scenario's driver run with this configuration's settings
            (those that differ from its defaults, the scenario's own flags included), for the test command.
    """

    module: str
    scenario: Scenario
    grid: Grid
    config: ScenarioConfig
    driver_flags: tuple[str, ...]

    def test_command(self, cell: Cell) -> str:
        """The command that evaluates ``cell`` on the test split, beside Independent and Joint."""
        words = ["python", "-m", f"benchmarks.{self.module}", "--methods", f"independent,{BASELINE},{METHOD}",
                 *self.driver_flags, "--bound", flag_text(cell.bound), "--samples", str(cell.samples),
                 "--consistency-weight", flag_text(cell.consistency_weight), "--inner-steps", str(cell.inner_steps)]
        if self.config.inner_batches != "reuse":
            words += ["--inner-batches", self.config.inner_batches]
        return " ".join(shlex.quote(word) for word in words)


# ---------------------------------------------------------------------------
# Command line


def _comma_list(kind: Callable[[str], _T], valid: Callable[[_T], bool], what: str, example: str
                ) -> Callable[[str], tuple[_T, ...]]:
    """argparse type: a comma list of ``kind`` values, each ``valid``, none twice."""

    def parse(text: str) -> tuple[_T, ...]:
        try:
            values = tuple(kind(part.strip()) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list of {what}, e.g. {example}; got {text!r}") from None
        if not all(math.isfinite(v) and valid(v) for v in values):
            raise argparse.ArgumentTypeError(f"expected a comma list of {what}, e.g. {example}; got {text!r}")
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"lists a value more than once in {text!r}; give each once, e.g. "
                                             f"{example}")
        return values

    return parse


def _shown(grid: Grid, key: str) -> str:
    return ",".join(flag_text(v) for v in getattr(grid, key))


def _sweep_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep", add_help=False)
    group = parser.add_argument_group("sweep")
    group.add_argument("--scenario", choices=SCENARIOS, default=DEFAULT_SCENARIO,
                       help=f"the scenario module to study (default {DEFAULT_SCENARIO}); every other flag is its "
                            "driver's (and its own, e.g. multi_digits --conflict)")
    grids = {
        "bounds": ("--sweep-bound", "B1,B2,...", _comma_list(float, lambda v: v > 0, "numbers > 0", "0.01,0.05"),
                   "bounds b"),
        "samples": ("--sweep-samples", "M1,M2,...", _comma_list(int, lambda v: v >= 1, "integers >= 1", "2,4"),
                    "noise samples M (M = 1: lambda has no effect, one run per b and L)"),
        "weights": ("--sweep-weight", "W1,W2,...", _comma_list(float, lambda v: v >= 0, "numbers >= 0", "0,1,3"),
                    "consistency weights lambda"),
        "inner_steps": ("--sweep-inner-steps", "L1,L2,...", _comma_list(int, lambda v: v >= 1, "integers >= 1",
                                                                       "1,10"), "inner steps L"),
    }
    for key, (flag, metavar, kind, what) in grids.items():
        group.add_argument(flag, dest=key, type=kind, default=None, metavar=metavar,
                           help=f"{what} (default {_shown(DEFAULT_GRID, key)}; --quick: {_shown(QUICK_GRID, key)})")
    return parser


def _refuse_grid_options(arguments: Sequence[str]) -> None:
    detector = argparse.ArgumentParser(add_help=False)
    for flag in _GRID_OPTIONS:
        detector.add_argument(flag, default=None)
    given = vars(detector.parse_known_args(list(arguments))[0])
    for flag, fix in _GRID_OPTIONS.items():
        if given[flag.lstrip("-").replace("-", "_")] is not None:
            raise ValueError(f"{flag} is set by the sweep's grid, not on its command line; drop it ({fix})")


def _scenario_of(module_name: str, arguments: Sequence[str]) -> tuple[Scenario, list[argparse.ArgumentParser]]:
    """The scenario module's scenario for these arguments (its ``scenario_from_args`` hook where it has one,
    else its ``SCENARIO``) and the parsers of its own flags."""
    module = importlib.import_module(f"benchmarks.{module_name}")
    hook = getattr(module, "scenario_from_args", None)
    scenario, parents = hook(list(arguments)) if hook is not None else (getattr(module, "SCENARIO", None), [])
    if not isinstance(scenario, Scenario):
        raise TypeError(f"benchmarks.{module_name} gives no Scenario (SCENARIO or scenario_from_args); got "
                        f"{type(scenario).__name__}")
    return scenario, list(parents)


def _for_sweep(scenario: Scenario) -> Scenario:
    """The scenario with the sweep's defaults: :data:`SEEDS` seeds (``--quick``: :data:`QUICK_SEEDS`) and
    fresh inner batches."""
    return replace(scenario, defaults={**scenario.defaults, "seeds": SEEDS, "inner_batches": "fresh"},
                   quick={**scenario.quick, "seeds": QUICK_SEEDS})


def _driver_flags(scenario: Scenario, config: ScenarioConfig, parents: Sequence[argparse.ArgumentParser],
                  arguments: Sequence[str]) -> tuple[str, ...]:
    """The flags under which the scenario's own driver runs with ``config``'s settings (cell settings, seeds
    and output aside): ``--preset``, every option whose value differs from the driver's default, and the
    scenario's own flags that were given."""
    flags: list[str] = []
    if config.preset is not None:
        flags += ["--preset", config.preset]
    default = parse_scenario_args(scenario, list(flags), parents=parents)
    for field in fields(config):
        name = field.name
        value = getattr(config, name)
        if name in _NOT_REPEATED or value is None or value == getattr(default, name):
            continue
        flag = scenario.flag(name) if name in SIZED else "--" + name.replace("_", "-")
        flags += [flag] if isinstance(value, bool) else [flag, flag_text(value)]
    for parent in parents:
        given, base = vars(parent.parse_known_args(list(arguments))[0]), vars(parent.parse_known_args([])[0])
        for action in parent._actions:  # argparse keeps a parser's options only there
            if not action.option_strings or action.dest not in given or given[action.dest] == base[action.dest]:
                continue
            value = given[action.dest]
            flags += [action.option_strings[-1]] if isinstance(value, bool) else [action.option_strings[-1],
                                                                                 flag_text(value)]
    return tuple(flags)


def parse_args(argv: Sequence[str] | None = None) -> Study:
    """The study a command line asks for: scenario, grid and the driver's configuration.

    Raises:
        SystemExit: (argparse, status 2) for a malformed flag, naming it (``argument --sweep-bound: ...``).
        ValueError: for ``--distributed``, for a driver option the grid sets (``--bound`` ...), and the
            driver's own checks.
    """
    arguments = sys.argv[1:] if argv is None else list(argv)
    sweep_parser = _sweep_parser()
    known, _ = sweep_parser.parse_known_args(arguments)
    if "--distributed" in arguments:
        raise ValueError("the sweep runs in one process (its intervals pair every seed's runs); drop --distributed")
    scenario, parents = _scenario_of(known.scenario, arguments)
    config = parse_scenario_args(
        _for_sweep(scenario), arguments, parents=[sweep_parser, *parents], prog="python -m benchmarks.sweep",
        description="The parameter study of MT-COOL over b, M, lambda and L on a validation split of a scenario's "
                    "training data: Δm against Joint per cell with a 95 % bootstrap interval over seeds, a heat map, "
                    "the selected cell and the command that evaluates it on the test split.",
    )
    _refuse_grid_options(arguments)
    base = QUICK_GRID if config.quick else DEFAULT_GRID
    grid = Grid(*(getattr(known, key) or getattr(base, key) for key in ("bounds", "samples", "weights", "inner_steps")))
    return Study(known.scenario, scenario, grid, config, _driver_flags(scenario, config, parents, arguments))


# ---------------------------------------------------------------------------
# Validation data and runs


def _carve(name: str, data: ImageTasks, seed: int) -> ImageTasks:
    extra = sorted(key for key in data.test_y if key not in data.train_y)
    if extra:
        raise ValueError(
            f"scenario {name!r}: its test data holds evaluation-only targets {extra} that its training data lacks, "
            "so the sweep's generic validation split (ImageTasks.validation_split) cannot give them to evaluate; "
            f"give the scenario a Scenario.validation (benchmarks/{name}.py) that builds them"
        )
    return data.validation_split(VALIDATION_FRACTION, seed)


def _carved_load(name: str, load: Callable[[ScenarioConfig, int], SeedData], config: ScenarioConfig, seed: int
                 ) -> SeedData:
    """``load``'s data of one seed with its test data replaced by a share of its training data (per task
    where each task has its own data)."""
    data = load(config, seed)
    if isinstance(data, ImageTasks):
        return _carve(name, data, seed)
    return {task: _carve(name, task_data, seed) for task, task_data in data.items()}


def validation_scenario(scenario: Scenario) -> tuple[Scenario, str]:
    """The scenario as the sweep trains and scores it, and a note on its validation split.

    Its ``load`` gives the scenario's ``validation`` data, or without one ``load``'s training data split by
    :meth:`~benchmarks._images.ImageTasks.validation_split` (:data:`VALIDATION_FRACTION`); it draws no
    figures and computes no test-set intervals.
    """
    if scenario.validation is not None:
        function = getattr(scenario.validation, "func", scenario.validation)
        first = " ".join((function.__doc__ or "").strip().split("\n\n")[0].split())
        name = f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', '?')}"
        note = f"the scenario's own validation split ({name}){': ' + first if first else ''}"
        load = scenario.validation
    else:
        note = (f"{VALIDATION_FRACTION:.0%} of each seed's training data held out for validation "
                "(ImageTasks.validation_split, stratified on the first int64 image-level target where there is "
                "one, per task where each task has its own data); the rest trains; the test data is never used")
        load = partial(_carved_load, scenario.name, scenario.load)
    return replace(scenario, load=load, figures=(), intervals=None, sample_score=None), note


def _per_seed(results: Mapping[str, Any], method: str, metrics: Sequence[Metric]) -> dict[str, list[float]]:
    entry = results["methods"][method]["metrics"]
    return {m.key: [math.nan if v is None else float(v) for v in entry[m.key]["per_seed"]] for m in metrics}


def _averaged(metrics: Sequence[Metric]) -> bool:
    """Whether the metrics' plain mean means something: two or more percentages of one direction."""
    return len(metrics) > 1 and all(m.percent and m.higher_is_better == metrics[0].higher_is_better for m in metrics)


def _seed_means(values: Mapping[str, Sequence[float]]) -> list[float]:
    columns = list(values.values())
    return [float(np.mean([column[s] for column in columns])) for s in range(len(columns[0]))]


def _entry(cell: Cell, runs: Mapping[str, list[float]], joint: Mapping[str, list[float]],
           metrics: Sequence[Metric]) -> dict[str, Any]:
    seeds = range(len(next(iter(joint.values()))))
    deltas = [delta_m({k: v[s] for k, v in runs.items()}, {k: v[s] for k, v in joint.items()}, metrics)
              for s in seeds]
    entry: dict[str, Any] = {
        **asdict(cell),
        "per_seed": dict(runs),
        "mean": {key: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for key, v in runs.items()},
        "delta_m_per_seed": deltas,
        "delta_m": mean_ci(deltas).record(),
    }
    if _averaged(metrics):
        mine, theirs = _seed_means(runs), _seed_means(joint)
        kept = [v for v in mine if math.isfinite(v)]
        entry["metric_mean"] = {"per_seed": mine, "mean": float(np.mean(kept)) if kept else math.nan,
                                "vs_joint": paired_difference_ci(mine, theirs).record()}
    return entry


def selection_reading(delta: Mapping[str, Any]) -> str:
    """One sentence on the selected cell's Δm interval against Joint (validation split).

    Example:
        >>> selection_reading({"estimate": 1.2, "low": -0.4, "high": 2.9, "n": 5})
        'Δm vs Joint +1.20 % [-0.40, +2.90] over 5 seeds: the interval contains 0, a tie with Joint'
        >>> selection_reading({"estimate": 2.0, "low": 0.5, "high": 3.1, "n": 5})
        'Δm vs Joint +2.00 % [+0.50, +3.10] over 5 seeds: above Joint (the interval excludes 0)'
    """
    estimate, low, high, n = delta["estimate"], delta["low"], delta["high"], delta["n"]
    if estimate is None or not math.isfinite(estimate):
        return "no finite Δm (every run of the cell diverged?)"
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return f"Δm vs Joint {estimate:+.2f} % over {n} seed(s): no interval; run --seeds 2 or more"
    shown = f"Δm vs Joint {estimate:+.2f} % [{low:+.2f}, {high:+.2f}] over {n} seeds"
    if low > 0:
        return f"{shown}: above Joint (the interval excludes 0)"
    if high < 0:
        return f"{shown}: below Joint (the interval excludes 0), though it is the best cell"
    return f"{shown}: the interval contains 0, a tie with Joint"


def _loaded_once(load: Callable[[ScenarioConfig, int], SeedData]) -> Callable[[ScenarioConfig, int], SeedData]:
    """``load`` that reads or generates each seed's data once per study: every run of a study (Joint and each
    cell) shares the configuration ``load`` reads; only the methods and MT-COOL's settings differ."""
    data: dict[int, SeedData] = {}

    def once(config: ScenarioConfig, seed: int) -> SeedData:
        if seed not in data:
            data[seed] = load(config, seed)
        return data[seed]

    return once


def _run(study: Study) -> dict[str, Any]:
    started = time.perf_counter()
    scenario, note = validation_scenario(study.scenario)
    scenario = replace(scenario, load=_loaded_once(scenario.load))
    metrics = scenario.metrics
    quiet = replace(study.config, progress=False)
    runs = study.grid.runs()
    trained: dict[Cell, dict[str, Any]] = {}
    with tqdm(total=len(runs) + 1, desc=f"sweep {study.module}", unit="run",
              disable=not study.config.progress) as bar:
        bar.set_postfix(run=BASELINE)
        joint_results, _ = run_scenario(scenario, replace(quiet, methods=(BASELINE,)))
        joint = _per_seed(joint_results, BASELINE, metrics)
        bar.update(1)
        for cell in runs:
            bar.set_postfix(b=cell.bound, M=cell.samples, λ=cell.consistency_weight, L=cell.inner_steps)
            results, _ = run_scenario(scenario, replace(
                quiet, methods=(METHOD,), bound=cell.bound, samples=cell.samples,
                consistency_weight=cell.consistency_weight, inner_steps=cell.inner_steps))
            trained[cell] = {**_entry(cell, _per_seed(results, METHOD, metrics), joint, metrics),
                             "wall_time_s": results["methods"][METHOD]["wall_time_s"]}
            bar.update(1)
    cells = []
    for cell in study.grid.cells():
        run = study.grid.run_of(cell)
        source = trained[run]
        entry = {**source, **asdict(cell), "inner_batches": study.config.inner_batches, "ran": run == cell,
                 "same_run_as": None if run == cell else asdict(run)}
        cells.append(entry)
    ranked = [i for i, c in enumerate(cells) if math.isfinite(c["delta_m"]["estimate"])]
    chosen = max(ranked, key=lambda i: cells[i]["delta_m"]["estimate"]) if ranked else None
    selected = None
    if chosen is not None:
        cell = Cell(**{key: cells[chosen][key] for key in ("bound", "samples", "consistency_weight", "inner_steps")})
        delta = cells[chosen]["delta_m"]
        selected = {"index": chosen, **asdict(cell), "delta_m": delta,
                    "tie_with_joint": None if not (math.isfinite(delta["low"]) and math.isfinite(delta["high"]))
                    else not Interval(**delta).excludes_zero,
                    "reading": selection_reading(delta), "test_command": study.test_command(cell)}
    return {
        "benchmark": f"sweep_{study.module}",
        "scenario": study.module,
        "title": f"{study.scenario.title}: {METHOD} over b x M x λ x L on a validation split",
        "method": METHOD,
        "config": {**config_record(study.config), "methods": [BASELINE, METHOD]},
        "grid": {"bound": list(study.grid.bounds), "samples": list(study.grid.samples),
                 "consistency_weight": list(study.grid.weights), "inner_steps": list(study.grid.inner_steps)},
        "validation": {"note": note, "own": study.scenario.validation is not None,
                       "fraction": None if study.scenario.validation is not None else VALIDATION_FRACTION,
                       "data_source": joint_results["data_source"]},
        "notes": _notes(study, metrics),
        "metrics": [asdict(metric) for metric in metrics],
        "joint": {"per_seed": joint, "mean": {k: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
                                               for k, v in joint.items()},
                  **({"metric_mean": {"per_seed": _seed_means(joint)}} if _averaged(metrics) else {}),
                  "wall_time_s": joint_results["methods"][BASELINE]["wall_time_s"]},
        "runs": {BASELINE: 1, METHOD: len(runs)},
        "cells": cells,
        "selected": selected,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "wall_time_s": time.perf_counter() - started,
    }


def _notes(study: Study, metrics: Sequence[Metric]) -> list[str]:
    notes = [
        f"Every cell trains {METHOD} with its b, M, λ and L (config's bound, samples, consistency_weight and "
        "inner_steps are replaced); every other setting is config's, for Joint too. Scored on the validation "
        "split after the last epoch.",
        "delta_m: Δm (benchmarks/_delta_m.py, %) of the cell against Joint on the same seed, per seed; estimate = "
        "its mean over seeds, low/high = 95 % percentile bootstrap interval over seeds (benchmarks/_stats.mean_ci). "
        "An interval containing 0 is a tie with Joint.",
        "selected: the cell with the largest Δm estimate on the validation split (first in grid order on a tie); "
        "the maximum of many noisy estimates is optimistic, so its test-split run (test_command) is the figure to "
        "report.",
        "M = 1: the paper's consistency term (mean reference) is identically zero, so λ has no effect; one run per "
        "(b, L) at the grid's first λ stands for every λ (ran = false, same_run_as).",
        f"inner_batches = {study.config.inner_batches!r}: with 'fresh', after warm-up one outer iteration per L "
        "training steps, inner step l on the l-th step's batch, so every task takes Joint's base steps on Joint's "
        "batches (L = 1 is the same either way).",
    ]
    if _averaged(metrics):
        notes.append("metric_mean: the per-seed mean of the metrics (" + ", ".join(m.key for m in metrics) + ") and "
                     "its paired difference to Joint in the metric's units (fractions), 95 % bootstrap over seeds.")
    return notes


# ---------------------------------------------------------------------------
# Output


def _write(results: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    name = results["scenario"]
    paths = {"json": out_dir / f"sweep_{name}.json", "heatmap": out_dir / f"sweep_{name}.png"}
    results["outputs"] = {key: str(path) for key, path in paths.items()}
    results["table"] = table(results)
    results = finite(results)
    paths["json"].write_text(json.dumps(results, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    heat_map(results, paths["heatmap"])
    print(f"{results['title']}, {len(results['config']['seeds'])} seeds; Δm of {METHOD} against Joint on the same "
          "seed, 95 % bootstrap interval over seeds:\n")
    print(results["table"])
    print(f"\nvalidation: {results['validation']['note']}")
    selected = results["selected"]
    if selected is None:
        print("\nno cell has a finite Δm: nothing selected")
    else:
        print(f"\nselected (largest Δm on the validation split): b = {flag_text(selected['bound'])}, "
              f"M = {selected['samples']}, λ = {flag_text(selected['consistency_weight'])}, "
              f"L = {selected['inner_steps']}: {selected['reading']}")
        print(f"evaluate it on the test split:\n  {selected['test_command']}")
    print(f"\nwall time {results['wall_time_s']:.1f} s; wrote {paths['json']} and {paths['heatmap']}")
    return dict(results)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the study from the command line: print the table and the selection, write the JSON and the heat map.

    Example:
        >>> results = main(["--quick", "--out-dir", "/tmp/sweep"])  # doctest: +SKIP
        >>> results["selected"]["test_command"]  # doctest: +SKIP
        'python -m benchmarks.multi_digits --methods independent,joint,mt_cool ...'
    """
    study = parse_args(argv)
    return _write(_run(study), Path(study.config.out_dir))


def cli(argv: Sequence[str] | None = None) -> int:
    """Entry point: configuration errors become one line on stderr and exit status 2."""
    return run_command(partial(main, argv), "python -m benchmarks.sweep")


if __name__ == "__main__":
    sys.exit(cli())
