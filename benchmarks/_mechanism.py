"""The mechanism MT-COOL relies on, measured while a benchmark trains (issue 13), not only its end metric.

:class:`MechanismProbe` watches the runs of :func:`benchmarks._runs.run_scenario` (a
:data:`benchmarks._runs.ProbeFactory`) and records, with :mod:`cooperative_opt.diagnostics`, on a
held-out batch (the first ``heldout`` test inputs, never trained on):

- **negative transfer**, per outer iteration of a cooperative method: how much task k's loss rises
  when task i alone moves from its previous iterate to its current one
  (:func:`~cooperative_opt.diagnostics.negative_transfer`; a :func:`~cooperative_opt.diagnostics.snapshot`
  before the outer iteration, the measure after it). Positive values are negative transfer.
- **clamped**, per outer iteration of every cooperative method: each task's fraction of slice
  elements the clamp put back (``StepReport.clamped``; 0 where no clamp ran, e.g. in warm-up).
- **flatness**, at the end of training: each task's loss with the other tasks' slices perturbed by
  ``U(-r, r)``, per radius r (:func:`~cooperative_opt.diagnostics.flatness`), for the cooperative
  methods and for **Joint-split**: a copy of the trained Joint network whose encoder is split
  (:func:`adapters.split_channels`) after training, which computes the same function and is
  measured without any cooperative training.

:func:`summarise_mechanism` reduces the runs' records over seeds (series: the mean over seeds per
outer iteration; scalars: the mean over the cooperative phase per seed, with a bootstrap interval
over seeds); :func:`plot_transfer` and :func:`plot_flatness` draw them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from matplotlib.figure import Figure

from benchmarks._learners import Batch, CooperativeLearner, JointLearner, Learner, label
from benchmarks._learners._joint import encoder_of, heads_of
from benchmarks._runs import Probe, Stream
from benchmarks._stats import mean_ci, paired_difference_ci

__all__ = ["DEFAULT_RADII", "MechanismProbe", "pair_name", "plot_flatness", "plot_transfer", "summarise_mechanism"]

DEFAULT_RADII: Final[tuple[float, ...]] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
"""Flatness radii (absolute, in weight units, like the bound b)."""

JOINT_SPLIT: Final[str] = "joint-split"
"""The name Joint's flatness is reported under (the trained Joint network, split afterwards)."""


def pair_name(mover: str, measured: str) -> str:
    """The key of one negative-transfer series: ``"left->right"`` is task right's loss change when left moves."""
    return f"{mover}->{measured}"


def _heldout(streams: Sequence[Stream], count: int) -> dict[str, Batch]:
    """Every task's first ``count`` test inputs and targets (the tasks of one stream share the ``x`` tensor)."""
    batches: dict[str, Batch] = {}
    for tasks, data in streams:
        x = data.test_x[:count]
        batches.update({task: (x, data.test_y[task][:count]) for task in tasks})
    return batches


def _flatness(opt: Any, batches: Mapping[str, Batch], radii: Sequence[float], samples: int, seed: int
              ) -> dict[str, Any]:
    from cooperative_opt import diagnostics

    was_training = opt.model.training
    opt.model.train(False)
    try:
        losses = {task: diagnostics.flatness(opt, task, batch, radii, samples=samples, seed=seed)
                  for task, batch in batches.items()}
    finally:
        opt.model.train(was_training)
    return {"radii": list(radii), "loss": losses}


class _CooperativeProbe:
    """Clamped fractions (and negative transfer) per outer iteration, flatness at the end."""

    def __init__(self, learner: CooperativeLearner, batches: dict[str, Batch], probe: MechanismProbe, seed: int,
                 transfer: bool, flatness: bool) -> None:
        self.learner, self.opt, self.batches = learner, learner.optimizer, batches
        self.probe, self.seed, self.transfer, self.flatness = probe, seed, transfer, flatness
        self.tasks = [t.name for t in self.opt.tasks]
        self.iterations: list[int] = []
        self.phases: list[str] = []
        self.clamped: dict[str, list[float]] = {task: [] for task in self.tasks}
        self.transfer_iterations: list[int] = []
        self.pairs: dict[str, list[float]] = {
            pair_name(i, k): [] for i in self.tasks for k in self.tasks if i != k and k in batches
        }

    def step(self, batches: Mapping[str, Batch]) -> dict[str, float]:
        from cooperative_opt import diagnostics

        taken = self.opt.steps_taken
        # after this call's outer iteration, numbered taken + 1; a call that only collects its batch
        # (inner_batches="fresh") leaves the parameters as they are, so the snapshot stays valid
        due = self.transfer and (taken + 1) % self.probe.every == 0
        before = diagnostics.snapshot(self.opt) if due else None
        losses = self.learner.train_step(batches)
        report = self.opt.last_report
        if self.opt.steps_taken == taken or report is None:
            return losses
        self.iterations.append(self.opt.steps_taken)
        self.phases.append(report.phase)
        for task in self.tasks:
            self.clamped[task].append(float(report.clamped.get(task, 0.0)))
        if before is not None:
            self.learner.train(False)
            try:
                measured = diagnostics.negative_transfer(self.opt, before, self.batches)
            finally:
                self.learner.train(True)
            self.transfer_iterations.append(self.opt.steps_taken)
            for (mover, task), value in measured.items():
                self.pairs[pair_name(mover, task)].append(value)
        return losses

    def finish(self) -> dict[str, Any]:
        record: dict[str, Any] = {"iterations": self.iterations, "phase": self.phases, "clamped": self.clamped}
        if self.transfer:
            record["transfer"] = {"iterations": self.transfer_iterations, "pairs": self.pairs}
        if self.flatness:
            record["flatness"] = _flatness(self.opt, self.batches, self.probe.radii, self.probe.flatness_samples,
                                           self.seed)
        return record


class _JointSplitProbe:
    """Joint trains unwatched; at the end a copy of its network is split and its flatness measured."""

    def __init__(self, learner: JointLearner, batches: dict[str, Batch], probe: MechanismProbe, seed: int) -> None:
        self.learner, self.batches, self.probe, self.seed = learner, batches, probe, seed

    def step(self, batches: Mapping[str, Batch]) -> dict[str, float]:
        return self.learner.train_step(batches)

    def finish(self) -> dict[str, Any]:
        import adapters
        from cooperative_opt import CooperativeOptimizer

        model = copy.deepcopy(self.learner.model)  # once per run, so the trained Joint network stays unsplit
        heads = heads_of(model)
        adapters.split_channels(encoder_of(model), list(heads.keys()))
        tasks = adapters.make_tasks(model, self.learner.losses, heads=dict(heads.items()))
        # never stepped: the optimizer only gives the diagnostics the tasks' slices and losses
        opt = CooperativeOptimizer(model, tasks, torch.optim.SGD, lr=0.0, variant="vanilla", seed=self.seed)
        return {"flatness": _flatness(opt, self.batches, self.probe.radii, self.probe.flatness_samples, self.seed)}


@dataclass(frozen=True)
class MechanismProbe:
    """What to measure in which run (pass as ``run_scenario(..., probe=MechanismProbe())``).

    Every cooperative run logs ``StepReport.clamped`` per outer iteration; those in ``transfer`` also
    the negative transfer; those in ``flatness`` (``"joint"``: Joint-split) the final flatness.

    Attributes:
        transfer: methods whose negative transfer is logged.
        flatness: methods whose flatness is measured at the end of training.
        radii: flatness radii, absolute (0 is the clean loss).
        every: log the negative transfer every ``every``-th outer iteration (1: all).
        heldout: test inputs in the held-out batch.
        flatness_samples: noise draws per radius.

    Example:
        >>> probe = MechanismProbe(transfer=frozenset({"vanilla"}), every=5)
        >>> probe.every, sorted(probe.flatness)[:1]
        (5, ['joint'])
    """

    transfer: frozenset[str] = frozenset({"vanilla", "without_reg", "mt_cool", "mt_cool_m2"})
    flatness: frozenset[str] = frozenset({"joint", "vanilla", "without_reg", "mt_cool", "mt_cool_m2"})
    radii: tuple[float, ...] = DEFAULT_RADII
    every: int = 1
    heldout: int = 256
    flatness_samples: int = 8

    def __post_init__(self) -> None:
        for name in ("every", "heldout", "flatness_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.radii or any(not isinstance(r, (int, float)) or not r >= 0 for r in self.radii):
            raise ValueError(f"radii must be a non-empty sequence of numbers >= 0, got {self.radii!r}")

    def __call__(self, method: str, seed: int, learner: Learner, streams: Sequence[Stream]) -> Probe | None:
        if isinstance(learner, CooperativeLearner):
            return _CooperativeProbe(learner, _heldout(streams, self.heldout), self, seed,
                                     method in self.transfer, method in self.flatness)
        if isinstance(learner, JointLearner) and method in self.flatness:
            return _JointSplitProbe(learner, _heldout(streams, self.heldout), self, seed)
        return None


# ---------------------------------------------------------------------------
# Over seeds


def _column_mean(rows: Sequence[Sequence[float]]) -> list[float]:
    """Mean over seeds per position, over the positions every seed has."""
    length = min(len(row) for row in rows)
    if length == 0:
        return []
    values = np.asarray([row[:length] for row in rows], dtype=np.float64)
    return [float(v) for v in np.nanmean(values, axis=0)]


def _cooperative_mean(values: Sequence[float], iterations: Sequence[int], cooperative: set[int]) -> float:
    kept = [v for v, i in zip(values, iterations, strict=True) if i in cooperative and math.isfinite(v)]
    return float(np.mean(kept)) if kept else math.nan


def summarise_mechanism(methods: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The runs' probe records reduced over seeds.

    Args:
        methods: the results' ``"methods"`` (each with ``"runs"``, whose records may hold ``"probe"``).

    Returns:
        ``{"transfer": {method: {...}}, "clamped": {method: {...}}, "flatness": {method: {...}},
        "definitions": {...}}``. Transfer per pair ``"i->k"``: ``series`` (mean over seeds per logged
        outer iteration), ``iterations``, ``per_seed`` (mean over the cooperative phase) and ``mean``
        (its bootstrap interval over seeds), plus ``vs_vanilla`` (paired difference of the per-seed
        means to vanilla). Clamped: the same for the fraction averaged over tasks. Flatness per
        task: ``loss`` (mean over seeds per radius), ``rise`` (loss minus the clean loss) and
        ``rise_ci`` (its interval per radius). Joint's flatness is under ``"joint-split"``.
    """
    transfer: dict[str, Any] = {}
    clamped: dict[str, Any] = {}
    flatness: dict[str, Any] = {}
    for method, summary in methods.items():
        probes = [run["probe"] for run in summary["runs"] if run.get("probe")]
        if not probes:
            continue
        if all("clamped" in p for p in probes):
            per_seed, rows = [], []
            for p in probes:
                cooperative = {i for i, phase in zip(p["iterations"], p["phase"], strict=True) if phase == "cooperative"}
                mean_over_tasks = np.mean(np.asarray(list(p["clamped"].values()), dtype=np.float64), axis=0)
                rows.append([float(v) for v in np.atleast_1d(mean_over_tasks)])
                per_seed.append(_cooperative_mean(rows[-1], p["iterations"], cooperative))
            clamped[method] = {"per_seed": per_seed, "mean": mean_ci(per_seed).record(),
                               "series": _column_mean(rows), "iterations": probes[0]["iterations"]}
        if all("transfer" in p for p in probes):
            pairs: dict[str, Any] = {}
            for pair in probes[0]["transfer"]["pairs"]:
                per_seed, rows = [], []
                for p in probes:
                    cooperative = {i for i, phase in zip(p["iterations"], p["phase"], strict=True)
                                   if phase == "cooperative"}
                    rows.append([math.nan if v is None else float(v) for v in p["transfer"]["pairs"][pair]])
                    per_seed.append(_cooperative_mean(rows[-1], p["transfer"]["iterations"], cooperative))
                pairs[pair] = {"per_seed": per_seed, "mean": mean_ci(per_seed).record(),
                               "series": _column_mean(rows), "iterations": probes[0]["transfer"]["iterations"]}
            warmup = [i for i, phase in zip(probes[0]["iterations"], probes[0]["phase"], strict=True)
                      if phase == "warmup"]
            transfer[method] = {"pairs": pairs, "warmup_iterations": len(warmup)}
        if all("flatness" in p for p in probes):
            radii = probes[0]["flatness"]["radii"]
            tasks: dict[str, Any] = {}
            for task in probes[0]["flatness"]["loss"]:
                curves = np.asarray([p["flatness"]["loss"][task] for p in probes], dtype=np.float64)
                rise = curves - curves[:, :1]
                tasks[task] = {
                    "loss": [float(v) for v in curves.mean(axis=0)],
                    "rise": [float(v) for v in rise.mean(axis=0)],
                    "rise_ci": [mean_ci(rise[:, j].tolist()).record() for j in range(len(radii))],
                    "per_seed": curves.tolist(),
                }
            flatness[JOINT_SPLIT if method == "joint" else method] = {"radii": radii, "tasks": tasks}
    if "vanilla" in transfer:
        base = transfer["vanilla"]["pairs"]
        for method, entry in transfer.items():
            for pair, values in entry["pairs"].items():
                if method != "vanilla" and pair in base:
                    values["vs_vanilla"] = paired_difference_ci(values["per_seed"], base[pair]["per_seed"]).record()
    return {
        "transfer": transfer,
        "clamped": clamped,
        "flatness": flatness,
        "definitions": {
            "transfer": "pair 'i->k': L_k(theta_i^t, rest^(t-1)) - L_k(theta^(t-1)) on the held-out batch "
                        "(cooperative_opt.diagnostics.negative_transfer); > 0 is negative transfer; per_seed and "
                        "mean average over the cooperative (post-warm-up) outer iterations",
            "clamped": "StepReport.clamped averaged over the tasks: fraction of slice elements the clamp put "
                       "back in the outer iteration; per_seed and mean over the cooperative phase",
            "flatness": "task's mean loss on the held-out batch with the other tasks' slices perturbed by "
                        "U(-r, r) (cooperative_opt.diagnostics.flatness); rise = loss(r) - loss(0); joint-split "
                        "is the trained Joint network split by adapters.split_channels after training",
        },
    }


# ---------------------------------------------------------------------------
# Figures


def _smoothed(values: Sequence[float], window: int) -> tuple[list[float], list[float]]:
    """A trailing moving average (NaN-aware) and its positions' offsets, for a readable curve."""
    data = np.asarray(values, dtype=np.float64)
    if window <= 1 or data.size < window:
        return list(range(data.size)), data.tolist()
    finite = np.where(np.isfinite(data), data, 0.0)
    counts = np.convolve(np.isfinite(data).astype(np.float64), np.ones(window), "valid")
    sums = np.convolve(finite, np.ones(window), "valid")
    with np.errstate(invalid="ignore", divide="ignore"):
        average = sums / counts
    return list(range(window - 1, data.size)), average.tolist()


def plot_transfer(mechanism: Mapping[str, Any], path: Path, title: str, window: int = 20) -> None:
    """One panel per task pair: the negative transfer per outer iteration, mean over seeds, moving
    average over ``window`` iterations, one line per method; warm-up shaded."""
    transfer = mechanism["transfer"]
    pairs = sorted({pair for entry in transfer.values() for pair in entry["pairs"]})
    figure = Figure(figsize=(5.5 * max(1, len(pairs)), 4.2), layout="constrained")
    axes = figure.subplots(1, max(1, len(pairs)), squeeze=False)[0]
    for axis, pair in zip(axes, pairs, strict=False):
        for method, entry in transfer.items():
            if pair not in entry["pairs"]:
                continue
            series = entry["pairs"][pair]
            offsets, smooth = _smoothed(series["series"], window)
            iterations = series["iterations"]
            mean = series["mean"]["estimate"]
            axis.plot([iterations[i] for i in offsets], smooth,
                      label=f"{label(method)} (mean {mean:+.2e})" if mean is not None else label(method))
            if entry["warmup_iterations"]:
                axis.axvspan(0, entry["warmup_iterations"], color="0.9", zorder=0)
        axis.axhline(0.0, color="0.3", linewidth=0.8)
        mover, measured = pair.split("->")
        axis.set_title(f"{measured}'s loss change when {mover} moves", fontsize=10)
        axis.set_xlabel("outer iteration (grey: warm-up)")
        axis.set_ylabel("Δ held-out loss (> 0: negative transfer)")
        axis.legend(fontsize=7)
    figure.suptitle(f"{title}: negative transfer per outer iteration, mean over seeds, moving average of {window}")
    figure.savefig(path, dpi=110)


def plot_flatness(mechanism: Mapping[str, Any], path: Path, title: str) -> None:
    """One panel per task: the rise of its held-out loss over the clean loss against the radius of the noise
    on the other tasks' slices, mean over seeds, one line per method (Joint-split included; the legend
    gives each clean loss)."""
    flatness = mechanism["flatness"]
    tasks = sorted({task for entry in flatness.values() for task in entry["tasks"]})
    figure = Figure(figsize=(5.0 * max(1, len(tasks)), 4.2), layout="constrained")
    axes = figure.subplots(1, max(1, len(tasks)), squeeze=False)[0]
    for axis, task in zip(axes, tasks, strict=False):
        for method, entry in flatness.items():
            if task in entry["tasks"]:
                shown = "Joint-split" if method == JOINT_SPLIT else label(method)
                curve = entry["tasks"][task]
                axis.plot(entry["radii"], curve["rise"], marker="o", markersize=3,
                          label=f"{shown} (clean loss {curve['loss'][0]:.3f})")
        axis.axhline(0.0, color="0.3", linewidth=0.8)
        axis.set_title(f"task {task!r}: loss with the other task's slices perturbed", fontsize=10)
        axis.set_xlabel("radius r of U(-r, r) on the other task's slices")
        axis.set_ylabel("held-out loss(r) − loss(0)")
        axis.legend(fontsize=7)
    figure.suptitle(f"{title}: flatness at the end of training, mean over seeds")
    figure.savefig(path, dpi=110)
