"""Training and evaluation for the scenario driver (:mod:`benchmarks._scenario`): the batch schedule,
the training loop of one method on one seed, and the run over every seed and method."""

from __future__ import annotations

import math
import platform
import time
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
from benchmarks._summary import add_delta_m, markdown_table, summarise

if TYPE_CHECKING:
    from benchmarks._scenario import Scenario, ScenarioConfig

__all__ = ["SAMPLES", "Probe", "ProbeFactory", "SeedData", "Stream", "batch_schedule", "run_scenario", "streams_of"]

SeedData: TypeAlias = ImageTasks | Mapping[str, ImageTasks]
"""One seed's data: one :class:`ImageTasks` whose inputs every task shares, or one per task
(``{task: ImageTasks holding that task's targets}``) when each task has its own inputs."""

Stream = tuple[tuple[str, ...], ImageTasks]
"""One input stream: the tasks that share its inputs, and its data."""

SAMPLES: Final[int] = 3
"""Test inputs per stream kept for the samples figure."""


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
        consistency_weight=config.consistency_weight,
        warmup_steps=warmup_steps,
        cagrad_c=config.cagrad_c,
        seed=seed,
        device=config.device,
    )


@torch.no_grad()
def _predict(learner: Learner, streams: Sequence[Stream], batch: int, limit: int | None = None) -> dict[str, Tensor]:
    """Every task's outputs on its stream's test inputs (the first ``limit``), in evaluation mode, in chunks,
    on the CPU as float32."""
    learner.train(False)
    try:
        outputs: dict[str, Tensor] = {}
        for tasks, data in streams:
            x = data.test_x[:limit]
            parts: dict[str, list[Tensor]] = {task: [] for task in tasks}
            for start in range(0, x.shape[0], batch):
                chunk = x[start : start + batch]
                for task in tasks:
                    parts[task].append(learner.predict(chunk, task).float().cpu())
            outputs.update({task: torch.cat(p) if p else torch.empty(0) for task, p in parts.items()})
        return outputs
    finally:
        learner.train(True)


def _run(
    scenario: Scenario, method: str, config: ScenarioConfig, problem: Problem, streams: Sequence[Stream],
    schedules: Sequence[Tensor], steps: int, seed: int, bar: Any, launch: Launch, probe: ProbeFactory | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Train ``method`` on one seed; return its record and its outputs on the first test inputs
    (with ``--distributed``: this rank's training, evaluated on rank 0 only)."""
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
    # evaluation-only targets (e.g. openkbp's "ptv" for the DVH score) reach evaluate too; each task's own
    # targets come from its own stream
    targets = {key: y.cpu() for _, data in streams for key, y in data.test_y.items() if key not in scenario.tasks}
    targets.update({task: data.test_y[task].cpu() for tasks, data in streams for task in tasks})
    train_loss: dict[str, list[float]] = {task: [] for task in scenario.tasks}
    test_metrics: dict[str, list[float]] = {metric.key: [] for metric in scenario.metrics}
    metrics: dict[str, float] = {}
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
            metrics = scenario.evaluate(_predict(learner, streams, scenario.eval_batch), targets)
            for key, value in metrics.items():
                test_metrics[key].append(value)
        bar.update(1)
    drawn = launch.main and "samples" in scenario.figures
    samples = _predict(learner, streams, scenario.eval_batch, SAMPLES) if drawn else {}
    record = {
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
    if watch is not None:
        record["probe"] = watch.finish()
    return record, samples


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
                if seed == config.seeds[0]:
                    samples[method] = outputs
    if not launch.main:
        return {}, {}
    summaries = {method: summarise(scenario.metrics, method_runs, joint_parameters)
                 for method, method_runs in runs.items()}
    kept = add_delta_m(summaries, scenario.metrics)
    samples["ground truth"] = {task: data.test_y[task][:SAMPLES].cpu() for tasks, data in first for task in tasks}
    samples["image"] = {task: data.test_x[:SAMPLES].cpu() for tasks, data in first for task in tasks}
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
        "wall_time_s": time.perf_counter() - started,
    }
    if config.distributed:
        results["distributed"] = launch.record(config.batch_size)
    return results, samples
