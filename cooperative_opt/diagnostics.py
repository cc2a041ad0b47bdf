"""Measures of the mechanism MT-COOL relies on, for deciding whether cooperation helps on your data.

Two quantities of the paper, evaluated with the tasks' own ``inputs`` and
``loss`` on batches you hold out (no gradient, parameters untouched):

- :func:`negative_transfer`: how much task k's loss rises when task i alone
  moves from its previous iterate to its current one, the other tasks'
  parameters held at the previous iterate. Take a :func:`snapshot` before an
  outer iteration and call it after.
- :func:`flatness`: task i's loss as a function of the radius of a uniform
  perturbation on the other tasks' encoder slices (a flat minimum with
  respect to them is what the noise in MT-COOL searches for).

And one measure of the optimizer itself, for choosing the bound b:

- :func:`movement`: how far each task's encoder slices moved since a
  :func:`snapshot` (largest element change and root-mean-square change). The
  paper's b bounds both the noise on the other tasks and the clamp on a
  task's own move per outer iteration; matching b to the measured movement
  (docs/method.md, "Choosing the bound") keeps the noise on the scale of the
  moves it stands for and makes the clamp bind.

Example:
    >>> before = diagnostics.snapshot(opt)  # doctest: +SKIP
    >>> opt.step(batches)  # doctest: +SKIP
    >>> diagnostics.negative_transfer(opt, before, heldout)  # doctest: +SKIP
    {('a', 'b'): 0.012, ('b', 'a'): -0.003}
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from torch.nn.utils.stateless import _reparametrize_module

from cooperative_opt._noise import UniformNoise
from cooperative_opt._ownership import own_names

if TYPE_CHECKING:
    from cooperative_opt._optimizer import CooperativeOptimizer

__all__ = ["Movement", "Snapshot", "flatness", "movement", "negative_transfer", "snapshot"]


@dataclass(frozen=True)
class Snapshot:
    """Copies of every task's slices and head at one moment, by parameter name."""

    values: dict[str, dict[str, Tensor]]  # task -> {parameter name: value}


def _named(opt: CooperativeOptimizer) -> dict[str, list[tuple[str, Tensor]]]:
    return {
        tp.name: [(n, p) for n, p in zip(own_names(opt.model, tp), tp.own) if n is not None] for tp in opt.task_params
    }


@dataclass(frozen=True)
class Movement:
    """How far one task's encoder slices moved between a snapshot and now.

    Attributes:
        max: the largest absolute change of any slice element (what the clamp's bound limits).
        rms: the root-mean-square change over all slice elements (the scale of a typical move).
        elements: number of slice elements measured.
    """

    max: float
    rms: float
    elements: int


def movement(opt: CooperativeOptimizer, before: Snapshot) -> dict[str, Movement]:
    """Each task's encoder-slice movement since ``before`` (a :func:`snapshot`), by task name.

    One ``torch._foreach_sub`` / ``_foreach_norm`` pass per task; heads are not
    measured (the bound applies to the slices only).

    Example:
        >>> before = diagnostics.snapshot(opt)  # doctest: +SKIP
        >>> opt.step(batches)  # doctest: +SKIP
        >>> diagnostics.movement(opt, before)["a"].max  # doctest: +SKIP
        0.0031
    """
    if sorted(before.values) != sorted(t.name for t in opt.tasks):
        raise ValueError(f"before is a snapshot of tasks {sorted(before.values)}, not of this optimizer's tasks")
    result: dict[str, Movement] = {}
    for tp in opt.task_params:
        saved = before.values[tp.name]
        missing = [n for n in tp.encoder_names if n not in saved]
        if missing:
            raise ValueError(f"before holds no value for {missing[:3]}; take it with diagnostics.snapshot(opt)")
        current = [p.detach() for p in tp.encoder]
        if not current:
            result[tp.name] = Movement(0.0, 0.0, 0)
            continue
        # empty slices (fewer channels than tasks) have no infinity norm
        deltas = [d for d in torch._foreach_sub(current, [saved[n] for n in tp.encoder_names]) if d.numel()]
        elements = sum(d.numel() for d in deltas)
        if not deltas:
            result[tp.name] = Movement(0.0, 0.0, 0)
            continue
        largest = torch.stack(torch._foreach_norm(deltas, float("inf"))).amax()
        squares = torch.stack(torch._foreach_norm(deltas)).square().sum()
        result[tp.name] = Movement(float(largest), float(squares.div(elements).sqrt()), elements)
    return result


def snapshot(opt: CooperativeOptimizer) -> Snapshot:
    """The current values of every task's parameters (one copy; take it before an outer iteration)."""
    return Snapshot({task: {n: p.detach().clone() for n, p in named} for task, named in _named(opt).items()})


def _loss(opt: CooperativeOptimizer, task: str, batch: Any, replacements: dict[str, Tensor]) -> float:
    spec = opt.task(task)
    inputs = spec.inputs(batch)
    buffers = opt._perturber.stats.scratch()  # held-out forwards must not move the running statistics
    with torch.no_grad(), _reparametrize_module(opt.model, {**replacements, **buffers}):
        return float(spec.loss(opt.model(*inputs), batch))


def _batches(opt: CooperativeOptimizer, batches: Mapping[str, Any]) -> Mapping[str, Any]:
    unknown = [k for k in batches if k not in {t.name for t in opt.tasks}]
    if unknown:
        raise ValueError(f"batches names unknown tasks {unknown}; the tasks are {[t.name for t in opt.tasks]}")
    if not batches:
        raise ValueError("batches is empty; pass held-out batches {task name: batch}")
    return batches


def negative_transfer(opt: CooperativeOptimizer, before: Snapshot, batches: Mapping[str, Any]) -> dict[tuple[str, str], float]:
    """``{(i, k): L_k(theta_i^t, rest^(t-1)) - L_k(theta^(t-1))}`` for every pair of tasks i != k in ``batches``.

    Positive values are negative transfer: task i's own update made task k
    worse. ``before`` is a :func:`snapshot` of the previous iterate; the
    current values are the model's. Evaluated in the model's current mode
    (call ``model.eval()`` first for dropout and BatchNorm statistics).

    Args:
        opt: the optimizer (its tasks' ``inputs`` and ``loss`` are used).
        before: the parameters at the start of the outer iteration.
        batches: held-out ``{task name: batch}`` on which task k's loss is measured.
    """
    batches = _batches(opt, batches)
    if sorted(before.values) != sorted(t.name for t in opt.tasks):
        raise ValueError(f"before is a snapshot of tasks {sorted(before.values)}, not of this optimizer's tasks")
    previous = {n: v for values in before.values.values() for n, v in values.items()}
    current = {task: {n: p.detach() for n, p in named} for task, named in _named(opt).items()}
    base = {k: _loss(opt, k, batches[k], previous) for k in batches}
    result: dict[tuple[str, str], float] = {}
    for mover in (t.name for t in opt.tasks):
        moved = {**previous, **current[mover]}
        for k in batches:
            if k != mover:
                result[(mover, k)] = _loss(opt, k, batches[k], moved) - base[k]
    return result


def flatness(
    opt: CooperativeOptimizer,
    task: str,
    batch: Any,
    radii: Sequence[float],
    samples: int = 8,
    scale: Literal["absolute", "relative"] = "absolute",
    seed: int = 0,
) -> list[float]:
    """Task ``task``'s mean loss on ``batch`` with the other tasks' slices perturbed by ``U(-r, r)``, per radius.

    ``scale="relative"`` makes r a fraction of each slice's root-mean-square
    value (as ``noise_scale="relative"``). Radius 0 is the clean loss. The
    noise comes from its own generator (``seed``), so the optimizer's noise
    stream is untouched.
    """
    index = {t.name: i for i, t in enumerate(opt.tasks)}
    if task not in index:
        raise ValueError(f"task={task!r} is not a task of this optimizer; the tasks are {list(index)}")
    bad = [r for r in radii if not isinstance(r, (int, float)) or r < 0 or r != r]
    if bad or not radii:
        raise ValueError(f"radii must be a non-empty sequence of numbers >= 0, got {list(radii)}")
    others = [i for i in range(len(opt.tasks)) if i != index[task]]
    named = [list(zip(tp.encoder_names, tp.encoder)) for tp in opt.task_params]
    devices = {p.device for tp in opt.task_params for p in tp.encoder}
    generators = {d: torch.Generator(device=d).manual_seed(seed) for d in devices}
    noise = UniformNoise(named, samples, generators, relative=scale == "relative")
    losses = []
    for radius in radii:
        if radius == 0:
            losses.append(_loss(opt, task, batch, {}))
            continue
        noise.draw(others, float(radius))
        total = 0.0
        for j in range(samples):
            replacements = {n: p.detach() + e for k in others for n, p, e in _zip(noise, k, j)}
            total += _loss(opt, task, batch, replacements)
        losses.append(total / samples)
    return losses


def _zip(noise: UniformNoise, task: int, sample: int) -> Iterator[tuple[str, Tensor, Tensor]]:
    return zip(noise.names(task), noise.parameters(task), noise.noise(task, sample))
