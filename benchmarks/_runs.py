"""Training and evaluation for the scenario driver (:mod:`benchmarks._scenario`): the batch schedule,
the training loop of one method on one seed, and the run over every seed and method."""

from __future__ import annotations

import math
import platform
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeAlias

import torch
from torch import Tensor
from tqdm import tqdm  # type: ignore[import-untyped]

from benchmarks._cli import Launch, config_record, sharded_schedule
from benchmarks._images import ImageTasks
from benchmarks._learners import (
    COOPERATIVE_METHODS,
    Batch,
    Learner,
    Problem,
    Training,
    build_learner,
    check_methods_available,
    check_offered,
    count_parameters,
)
from benchmarks._summary import BASELINE, add_delta_m, interval_table, markdown_table, summarise

if TYPE_CHECKING:
    from benchmarks._scenario import Scenario, ScenarioConfig

__all__ = ["QUARTILES", "SAMPLES", "Probe", "ProbeFactory", "SeedData", "Stream", "batch_schedule", "quartile_indices",
           "run_scenario", "streams_of"]

SeedData: TypeAlias = ImageTasks | Mapping[str, ImageTasks]
"""One seed's data: one :class:`ImageTasks` whose inputs every task shares, or one per task
(``{task: ImageTasks holding that task's targets}``) when each task has its own inputs."""

Stream = tuple[tuple[str, ...], ImageTasks]
"""One input stream: the tasks that share its inputs, and its data."""

SAMPLES: Final[int] = 3
"""Test inputs per stream kept for the samples figure."""

QUARTILES: Final[tuple[float, float, float]] = (0.25, 0.5, 0.75)
"""Where the samples figure's images sit in Independent's per-image scores (:func:`quartile_indices`)."""


class Probe(Protocol):
    """Measures one method's training on one seed (:func:`run_scenario`'s ``probe``): it runs every
    training step itself, so it can measure around it, and hands over its measures when training ends."""

    def step(self, batches: Mapping[str, Batch]) -> dict[str, float]:
        """Run the learner's ``train_step(batches)``, measuring around it; return its losses."""
        ...

    def finish(self) -> dict[str, Any]:
        """The measures, after the last evaluation; the run's record keeps them under ``"probe"``."""
        ...


ProbeFactory: TypeAlias = Callable[[str, int, Learner, Sequence[Stream]], Probe | None]
"""``probe(method, seed, learner, streams)``: a :class:`Probe` for that run, or ``None`` to train it unwatched."""


def streams_of(data: SeedData, tasks: Sequence[str], device: str) -> list[Stream]:
    """The input streams of one seed's data, in task order, on ``device``.

    Raises:
        ValueError: when a task has no targets.
    """
    if isinstance(data, ImageTasks):
        missing = [t for t in tasks if t not in data.train_y or t not in data.test_y]
        if missing:
            raise ValueError(f"the data has no targets for tasks {missing}; give train_y and test_y for every task")
        return [(tuple(tasks), data.to(device))]
    missing = [t for t in tasks if t not in data or t not in data[t].train_y or t not in data[t].test_y]
    if missing:
        raise ValueError(f"the per-task data has no ImageTasks with targets for tasks {missing}")
    return [((t,), data[t].to(device)) for t in tasks]


def batch_schedule(sizes: Sequence[int], batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """Per stream, the training indices of every step, ``[steps, batch_size]`` int64.

    Each stream's indices are back-to-back random permutations of ``range(size)``
    drawn, stream after stream, from one generator seeded with ``seed``, so every
    method trained with the same seed sees exactly the same batches in the same order.
    """
    generator = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    schedule = []
    for size in sizes:
        permutations = [torch.randperm(size, generator=generator) for _ in range(math.ceil(needed / size))]
        schedule.append(torch.cat(permutations)[:needed].view(steps, batch_size))
    return schedule


def _sharded_batch_schedule(sizes: Sequence[int], batch_size: int, steps: int, seed: int, launch: Launch
                            ) -> list[Tensor]:
    """``--distributed``: per stream, this rank's indices of every step from a ``DistributedSampler``
    seeded from ``seed`` (one seed per stream)."""
    generator = torch.Generator().manual_seed(seed)
    seeds = torch.randint(0, 2**31 - 1, (len(sizes),), generator=generator).tolist()
    return [sharded_schedule(size, batch_size, steps, int(s), launch) for size, s in zip(sizes, seeds, strict=True)]


def _training(config: ScenarioConfig, seed: int, warmup_steps: int) -> Training:
    """The method-independent training settings of one seed."""
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
        inner_batches=config.inner_batches,
        consistency_weight=config.consistency_weight,
        warmup_steps=warmup_steps,
        cagrad_c=config.cagrad_c,
        seed=seed,
        device=config.device,
    )


@torch.no_grad()
def _predict(learner: Learner, streams: Sequence[Stream], batch: int) -> dict[str, Tensor]:
    """Every task's outputs on its stream's test inputs, in evaluation mode, in chunks, on the CPU as float32."""
    learner.train(False)
    try:
        outputs: dict[str, Tensor] = {}
        for tasks, data in streams:
            x = data.test_x
            parts: dict[str, list[Tensor]] = {task: [] for task in tasks}
            for start in range(0, x.shape[0], batch):
                chunk = x[start : start + batch]
                for task in tasks:
                    parts[task].append(learner.predict(chunk, task).float().cpu())
            outputs.update({task: torch.cat(p) if p else torch.empty(0) for task, p in parts.items()})
        return outputs
    finally:
        learner.train(True)


def _test_targets(scenario: Scenario, streams: Sequence[Stream]) -> dict[str, Tensor]:
    """The test targets ``evaluate`` receives, on the CPU: each task's from its own stream, plus the
    evaluation-only targets (e.g. openkbp's ``"ptv"`` for the DVH score)."""
    targets = {key: y.cpu() for _, data in streams for key, y in data.test_y.items() if key not in scenario.tasks}
    targets.update({task: data.test_y[task].cpu() for tasks, data in streams for task in tasks})
    return targets


def quartile_indices(scores: Tensor) -> Tensor:
    """The test images the samples figure shows: those at the 25th, 50th and 75th percentile of ``scores``
    (Independent's per-image Dice, as the MT-COOL paper's Fig. 2 picks them), lowest first: ranks
    ``floor(q * n)`` of the ``n`` scored images, distinct for ``n >= 4``; NaN scores are left out; at most
    three scored images: all of them.

    Example:
        >>> quartile_indices(torch.tensor([0.9, 0.1, 0.5, float("nan"), 0.7, 0.3])).tolist()
        [5, 2, 4]
    """
    if scores.ndim != 1:
        raise ValueError(f"sample_score must give one score per test image [N], got shape {tuple(scores.shape)}")
    scored = torch.nonzero(~torch.isnan(scores)).flatten()
    order = scored[torch.argsort(scores[scored], stable=True)]
    if order.numel() <= SAMPLES:
        return order
    return order[[int(q * order.numel()) for q in QUARTILES]]


def _intervals(scenario: Scenario, method: str, seed: int, outputs: Mapping[str, Tensor],
               targets: Mapping[str, Tensor]) -> dict[str, Any]:
    """``{"intervals": ...}`` of one run; a run whose outputs hold NaN or infinite values (it diverged) has
    none: ``{"intervals": {}, "intervals_error": why}``, with a warning, rather than losing every other run."""
    if scenario.intervals is None:
        return {}
    if not all(bool(torch.isfinite(value).all()) for value in outputs.values() if value.is_floating_point()):
        why = f"{method} on seed {seed}: the final outputs hold NaN or infinite values (the run diverged)"
        warnings.warn(f"no test-set intervals for {why}", RuntimeWarning, stacklevel=2)
        return {"intervals": {}, "intervals_error": why}
    return {"intervals": {key: i.record() for key, i in scenario.intervals(outputs, targets).items()}}


def _run(
    scenario: Scenario, method: str, config: ScenarioConfig, problem: Problem, streams: Sequence[Stream],
    schedules: Sequence[Tensor], steps: int, seed: int, bar: Any, launch: Launch, probe: ProbeFactory | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Train ``method`` on one seed; return its record and its final outputs on every test input
    (with ``--distributed``: this rank's training, evaluated on rank 0 only; other ranks return no outputs)."""
    warmup_steps = config.warmup_epochs * steps
    started = time.perf_counter()
    learner = build_learner(method, problem, _training(config, seed, warmup_steps))
    learner.train(True)
    watch = None if probe is None else probe(method, seed, learner, streams)
    train_step = learner.train_step if watch is None else watch.step
    schedulers = (
        [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=config.epochs * steps) for o in learner.optimizers()]
        if config.schedule == "cosine"
        else []
    )
    targets = _test_targets(scenario, streams)
    train_loss: dict[str, list[float]] = {task: [] for task in scenario.tasks}
    test_metrics: dict[str, list[float]] = {metric.key: [] for metric in scenario.metrics}
    metrics: dict[str, float] = {}
    outputs: dict[str, Tensor] = {}
    for epoch in range(config.epochs):
        totals = dict.fromkeys(scenario.tasks, 0.0)
        for step in range(epoch * steps, (epoch + 1) * steps):
            batches = {}
            for (tasks, data), schedule in zip(streams, schedules, strict=True):
                index = schedule[step]
                x = data.train_x[index]
                batches.update({task: (x, data.train_y[task][index]) for task in tasks})
            losses = train_step(batches)
            for scheduler in schedulers:
                scheduler.step()
            for task, loss in losses.items():
                totals[task] += loss
        for task, total in totals.items():
            train_loss[task].append(total / steps)
        if launch.main:
            outputs = _predict(learner, streams, scenario.eval_batch)
            metrics = scenario.evaluate(outputs, targets)
            for key, value in metrics.items():
                test_metrics[key].append(value)
        bar.update(1)
    record: dict[str, Any] = {
        "seed": seed,
        "final": metrics,
        "curves": {"epoch": list(range(1, config.epochs + 1)), "train_loss": train_loss, "test": test_metrics},
        "num_parameters": learner.num_parameters,
        "steps_per_epoch": steps,
        "warmup_steps": warmup_steps if method in COOPERATIVE_METHODS else 0,
        "train_sizes": {task: int(data.train_x.shape[0]) for tasks, data in streams for task in tasks},
        "test_sizes": {task: int(data.test_x.shape[0]) for tasks, data in streams for task in tasks},
        "wall_time_s": time.perf_counter() - started,
    }
    if outputs and scenario.intervals is not None:
        record.update(_intervals(scenario, method, seed, outputs, targets))
    if watch is not None:
        record["probe"] = watch.finish()
    return record, outputs


def _chosen(outputs: Mapping[str, Tensor], picks: Tensor | None) -> dict[str, Tensor]:
    """The samples figure's rows of ``outputs``: ``picks``, or the first :data:`SAMPLES` of each stream."""
    return {task: value[:SAMPLES] if picks is None else value[picks] for task, value in outputs.items()}


def _steps_and_schedules(
    streams: Sequence[Stream], config: ScenarioConfig, seed: int, launch: Launch
) -> tuple[int, list[Tensor]]:
    """Steps per epoch (enough to go once through the largest stream, its shard on ``launch.world`` ranks)
    and every stream's schedule, on its data's device."""
    sizes = [int(data.train_x.shape[0]) for _, data in streams]
    longest = max(math.ceil(size / launch.world) for size in sizes)
    batch = min(config.batch_size, longest)
    steps = math.ceil(longest / batch)
    total = config.epochs * steps
    if config.distributed:
        schedules = _sharded_batch_schedule(sizes, batch, total, seed, launch)
    else:
        schedules = batch_schedule(sizes, batch, total, seed)
    return steps, [s.to(data.train_x.device) for s, (_, data) in zip(schedules, streams, strict=True)]


def run_scenario(
    scenario: Scenario, config: ScenarioConfig, launch: Launch = Launch(), probe: ProbeFactory | None = None
) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
    """Train every method on every seed; return the results and the first seed's sample outputs
    (on a rank other than 0 of a ``--distributed`` run, which only trains: two empty dictionaries).
    ``probe`` may watch each run (:class:`Probe`); its measures land in the run's record.

    Raises:
        ValueError: for a method the scenario does not offer, empty seeds, or a ``problem`` whose
            networks differ from ``scenario.networks``.
    """
    check_methods_available(config.methods)
    check_offered(config.methods, scenario.networks)
    if not config.seeds:
        raise ValueError("config.seeds is empty; give --seeds 1 or more")
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {method: [] for method in config.methods}
    samples: dict[str, dict[str, Tensor]] = {}
    pending: dict[str, dict[str, Tensor]] = {}  # first seed's full outputs while the samples are not chosen yet
    picks: Tensor | None = None  # the chosen test images; None: the first SAMPLES of each stream
    chosen = "samples" not in scenario.figures
    joint_parameters = 0
    first: list[Stream] = []
    total = len(config.seeds) * len(config.methods) * config.epochs
    with tqdm(total=total, desc=scenario.name, unit="epoch", disable=not (config.progress and launch.main)) as bar:
        for seed in config.seeds:
            data = scenario.load(config, seed)
            streams = streams_of(data, scenario.tasks, config.device)
            first = first or streams
            problem = scenario.problem(config, data)
            if sorted(problem.networks) != sorted(scenario.networks):
                raise ValueError(
                    f"scenario {scenario.name!r} declares networks {sorted(scenario.networks)} but its Problem "
                    f"builds {sorted(problem.networks)}; make Scenario.networks list the Problem.networks keys"
                )
            joint_parameters = count_parameters(problem.multi_task())
            steps, schedules = _steps_and_schedules(streams, config, seed, launch)
            for method in config.methods:
                bar.set_postfix(method=method, seed=seed)
                record, outputs = _run(scenario, method, config, problem, streams, schedules, steps, seed, bar, launch,
                                       probe)
                runs[method].append(record)
                if seed != config.seeds[0] or not launch.main or "samples" not in scenario.figures:
                    continue
                if not chosen and (scenario.sample_score is None or BASELINE not in config.methods):
                    chosen = True
                elif not chosen and method == BASELINE and scenario.sample_score is not None:
                    scored = quartile_indices(scenario.sample_score(outputs, _test_targets(scenario, streams)))
                    picks, chosen = (scored if scored.numel() else None), True  # all NaN: the first images
                if chosen:
                    samples[method] = _chosen(outputs, picks)
                else:
                    pending[method] = outputs
    if not launch.main:
        return {}, {}
    samples.update({method: _chosen(outputs, picks) for method, outputs in pending.items()})
    summaries = {method: summarise(scenario.metrics, method_runs, joint_parameters)
                 for method, method_runs in runs.items()}
    kept = add_delta_m(summaries, scenario.metrics)
    if "samples" in scenario.figures:
        samples["ground truth"] = _chosen({t: d.test_y[t].cpu() for tasks, d in first for t in tasks}, picks)
        samples["image"] = _chosen({t: d.test_x.cpu() for tasks, d in first for t in tasks}, picks)
    results = {
        "benchmark": scenario.name,
        "title": scenario.title,
        "config": {**config_record(config), "joint_params": joint_parameters},
        "data_source": first[0][1].source,
        "notes": scenario.notes(config) + (
            [launch.note("batch_size examples per input stream", f"ceil(max_s ceil(N_s / {launch.world}) / batch_size)",
                         "the test set(s)")]
            if config.distributed else []),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
        },
        "tasks": list(scenario.tasks),
        "metrics": [asdict(metric) for metric in scenario.metrics],
        "delta_m": {
            "baseline": "independent",
            "metrics": kept,
            "definition": "Maninis et al. 2019: (100 / K) sum_k (-1)^l_k (M_method,k - M_baseline,k) / "
                          "|M_baseline,k| over the K metrics kept (baseline mean finite and non-zero), l_k = 1 "
                          "where lower is better; null when independent was not run (benchmarks/_delta_m.py)",
        },
        "methods": summaries,
        "table": markdown_table(scenario.metrics, summaries),
        "interval_table": interval_table(scenario.metrics, summaries),
        "samples": {
            "indices": None if picks is None else picks.tolist(),
            "rule": "the first test images of the first seed" if picks is None else
                    "the first seed's test images at the 25th, 50th and 75th percentile of Independent's per-image "
                    "score (Scenario.sample_score), as the MT-COOL paper's Fig. 2",
        },
        "wall_time_s": time.perf_counter() - started,
    }
    if config.distributed:
        results["distributed"] = launch.record(config.batch_size)
    return results, samples
