"""``step(batches)``: one outer iteration run by the library, written on the public user-loop API.

This driver is what a user's own loop would be, with the tasks' ``inputs``
and ``loss`` callables: ``for name in opt.iteration(names)``, M forwards
under ``opt.perturb(name)`` (or one ``vmap`` call over the same draw), the
loss plus the consistency term, one backward, ``opt.step()``. There is no
second implementation of noise, stepping or clamping behind it.

``batches`` is either one mapping ``{task: batch}``, which every inner step
of a task reuses, or a sequence of ``inner_steps`` such mappings, the l-th
feeding inner step l of every task (a fresh batch per inner step; warm-up
steps, which take one step per task, use the first).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from cooperative_opt._iteration import NON_FINITE, NON_FINITE_GRADIENT
from cooperative_opt._report import StepReport
from cooperative_opt._task import Task

if TYPE_CHECKING:
    from cooperative_opt._optimizer import CooperativeOptimizer

__all__ = ["run_batches"]


def _inputs(task: Task, batch: Any) -> tuple[Any, ...]:
    inputs = task.inputs(batch)
    if not isinstance(inputs, tuple):
        raise TypeError(
            f"task {task.name!r}: inputs(batch) must return a tuple of positional arguments for the model, "
            f"got {type(inputs).__name__}; e.g. inputs=lambda batch: (batch[0],)"
        )
    return inputs


def _loss(task: Task, output: Any, batch: Any) -> Tensor:
    loss = task.loss(output, batch)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise TypeError(
            f"task {task.name!r}: loss must return a scalar (0-dim) tensor, got {shape}; reduce it, e.g. .mean()"
        )
    return loss


def _names(opt: CooperativeOptimizer, argument: str, batches: Mapping[str, Any]) -> None:
    known = [t.name for t in opt.tasks]
    unknown = [k for k in batches if k not in known]
    if unknown:
        raise ValueError(f"{argument} names unknown tasks {unknown}; the tasks are {known}")
    if not batches:
        raise ValueError(f"{argument} is empty; pass a batch for at least one of the tasks {known}")


def _validated(opt: CooperativeOptimizer, batches: object) -> list[Mapping[str, Any]]:
    """``batches`` as one ``{task: batch}`` mapping per inner step (the one mapping ``inner_steps`` times)."""
    inner_steps = opt.settings.inner_steps
    if isinstance(batches, Mapping):
        _names(opt, "batches", batches)
        return [batches] * inner_steps
    if not isinstance(batches, Sequence) or isinstance(batches, (str, bytes)):
        raise TypeError(
            f"batches must be a mapping {{task name: batch}} or a sequence of inner_steps={inner_steps} such "
            f"mappings (one per inner step), got {type(batches).__name__}"
        )
    for i, mapping in enumerate(batches):
        if not isinstance(mapping, Mapping):
            raise TypeError(
                f"batches[{i}] must be a mapping {{task name: batch}}, got {type(mapping).__name__}; pass one "
                f"mapping, or a sequence of inner_steps={inner_steps} mappings (one per inner step)"
            )
    if len(batches) != inner_steps:
        raise ValueError(
            f"batches has {len(batches)} mappings but inner_steps={inner_steps}: pass exactly one per inner step, "
            "or one mapping (not in a sequence) that every inner step reuses"
        )
    _names(opt, "batches[0]", batches[0])
    for i, mapping in enumerate(batches[1:], start=1):
        if set(mapping) != set(batches[0]):
            raise ValueError(
                f"batches[{i}] has the tasks {sorted(mapping)} but batches[0] has {sorted(batches[0])}; every "
                "inner step's mapping must name the same tasks"
            )
    return list(batches)


def _outputs(opt: CooperativeOptimizer, name: str, inputs: tuple[Any, ...]) -> list[Any]:
    """The model's outputs under each of the M noise samples of this inner step."""
    settings = opt.settings
    noisy = settings.noise_bound is not None
    if noisy and settings.samples > 1 and settings.vectorize is True and settings.running_stats != "every_sample":
        return opt._perturber.vmapped(opt._iteration.entry_index, inputs)
    outputs = []
    for _ in range(settings.samples if noisy else 1):
        with opt.perturb(name):
            outputs.append(opt.model(*inputs))
    return outputs


def _clean(opt: CooperativeOptimizer, inputs: tuple[Any, ...], with_reference: bool) -> Any | None:
    """The noise-free, gradient-free forward that the "clean" reference and the "clean" statistics need."""
    settings = opt.settings
    clean_stats = settings.running_stats == "clean" and settings.noise_bound is not None
    if not (with_reference or (clean_stats and opt._perturber.stats.buffers)):
        return None
    with torch.no_grad(), opt._perturber.clean(update_stats=clean_stats):
        return opt.model(*inputs)


def _precision(
    opt: CooperativeOptimizer, scaler: object, autocast: object
) -> tuple[torch.amp.GradScaler | None, contextlib.AbstractContextManager[Any]]:
    """Validate ``scaler=`` / ``autocast=`` and build the autocast context for the forwards."""
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
    if autocast is None:
        return scaler, contextlib.nullcontext()
    if autocast not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast must be torch.bfloat16, torch.float16 or None, got {autocast!r}")
    devices = {p.device.type for tp in opt.task_params for p in tp.own}
    if len(devices) != 1:
        raise ValueError(f"autocast= needs the model on one device type, its parameters are on {sorted(devices)}")
    return scaler, torch.autocast(devices.pop(), dtype=autocast)


def _non_finite(opt: CooperativeOptimizer, name: str, objective: Tensor) -> None:
    """A non-finite loss of task ``name`` (here or on another rank): raise, or skip its step."""
    if opt.settings.nonfinite == "raise":
        here = objective.item()
        where = "" if not math.isfinite(here) else " on this rank but non-finite on another"
        raise FloatingPointError(
            f"task {name!r}: loss is {here}{where} at step {opt.steps_taken + 1}; "
            "pass nonfinite='skip' to skip such updates instead"
        )
    opt._iteration.skip(NON_FINITE)


def run_batches(opt: CooperativeOptimizer, batches: object, scaler: object = None, autocast: object = None) -> StepReport:
    """One outer iteration (or warm-up step) over the tasks present in ``batches``."""
    per_step = _validated(opt, batches)
    grad_scaler, precision = _precision(opt, scaler, autocast)
    settings = opt.settings
    iteration = opt.iteration([t.name for t in opt.tasks if t.name in per_step[0]])
    taken = dict.fromkeys(per_step[0], 0)  # inner steps each task has begun (iteration() yields a name L times)
    with torch.enable_grad():
        try:
            for name in iteration:
                task = opt.task(name)
                batch = per_step[taken[name]][name]
                taken[name] += 1
                inputs = _inputs(task, batch)
                cooperative = opt.phase == "cooperative"
                with precision:
                    outputs = _outputs(opt, name, inputs)
                    loss = torch.stack([_loss(task, o, batch) for o in outputs]).mean()
                    wants_reference = cooperative and settings.consistency_reference == "clean" and (
                        settings.consistency_active and task.consistency is not None)
                    clean = _clean(opt, inputs, wants_reference)
                    term = opt._consistency_term(task, outputs, clean) if cooperative else None
                    objective = loss if term is None else loss + settings.consistency_weight * term
                finite = bool(torch.isfinite(objective.detach()))
                if opt._ranks is None and not finite:  # alone: skip before the backward
                    _non_finite(opt, name, objective)
                    continue
                # On R ranks one rank's NaN must skip the step on every rank. The vote is started here and read
                # after the backward, which every rank runs (a NaN loss gives NaN gradients, averaged like any
                # others), so waiting for it costs no synchronisation of its own.
                agreed = opt._ranks.vote(finite) if opt._ranks is not None else None
                torch.autograd.backward(objective if grad_scaler is None else grad_scaler.scale(objective))
                if agreed is not None and not agreed():
                    _non_finite(opt, name, objective)
                    continue
                opt._iteration.log(name, float(loss.detach()), 0.0 if term is None else float(term.detach()))
                if grad_scaler is None:
                    opt.step()
                    continue
                grad_scaler.step(opt)
                grad_scaler.update()
                if not opt._iteration.stepped:
                    opt._iteration.skip(NON_FINITE_GRADIENT)
        finally:
            iteration.close()
    report = opt.last_report
    if report is None:  # pragma: no cover - the iteration has just completed
        raise RuntimeError("the outer iteration did not complete")
    return report
