"""Gradient-manipulation methods (PCGrad, MGDA, CAGrad, GradDrop) on the hard-shared network, through
``torchjd``: its aggregators combine the shared encoder's per-task Jacobian (``torchjd.autojac``);
nothing is re-derived here. Needs ``pip install 'torchjd[cagrad]'`` (``cagrad`` solves a small cone
program with cvxpy)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

import torch
from torch import Tensor

from benchmarks._learners._joint import JointLearner, encoder_of, head_forward, shared_outputs
from benchmarks._learners._problem import Batch, Problem, Training, shared_input

__all__ = ["GRADIENT_METHODS", "GradientLearner", "missing_torchjd_message"]

GRADIENT_METHODS: Final[tuple[str, ...]] = ("pcgrad", "mgda", "cagrad", "graddrop")
"""Gradient-manipulation methods on the Joint network, through ``torchjd`` aggregators."""


def missing_torchjd_message(error: ImportError) -> str:
    """The error text when torchjd (or cvxpy, for CAGrad) cannot be imported."""
    return (
        f"methods {list(GRADIENT_METHODS)} need torchjd with its cagrad extra, which failed to import ({error}); "
        f"install it with pip install 'torchjd[cagrad]' (or pip install -e '.[bench]'), or leave these methods out "
        f"of --methods"
    )


def _aggregator(method: str, training: Training) -> Any:
    """The torchjd aggregator of a gradient-manipulation method."""
    try:
        from torchjd import aggregation
    except ImportError as error:
        raise RuntimeError(missing_torchjd_message(error)) from error
    if method == "pcgrad":
        return aggregation.PCGrad()
    if method == "mgda":
        return aggregation.MGDA()
    if method == "cagrad":
        return aggregation.CAGrad(c=training.cagrad_c)
    if method == "graddrop":
        return aggregation.GradDrop()
    raise ValueError(f"method={method!r} is not a gradient method; choose from {GRADIENT_METHODS}")


class GradientLearner(JointLearner):
    """PCGrad / MGDA / CAGrad / GradDrop on the Joint network through ``torchjd``.

    Heads get their own task's gradient (summed where heads are shared, as in
    Joint); the encoder's per-task Jacobian is computed by
    ``torchjd.autojac.backward`` (the features' Jacobian left-multiplied by each
    task's gradient w.r.t. the features) and combined into one gradient by the
    aggregator (``jac_to_grad``); then the base optimizer steps. This is what
    ``mtl_backward`` does, except that it also handles multi-scale features
    that depend on each other (UNet skip connections), which ``mtl_backward``
    would differentiate twice.
    """

    def __init__(self, problem: Problem, training: Training, method: str) -> None:
        super().__init__(problem, training)
        self.aggregator = _aggregator(method, training)
        self.shared = [p for p in encoder_of(self.model).parameters() if p.requires_grad]
        shared_ids = {id(p) for p in self.shared}
        self.private = [p for p in self.model.parameters() if p.requires_grad and id(p) not in shared_ids]

    def train_step(self, batches: Mapping[str, Batch]) -> dict[str, float]:
        from torchjd.autojac import backward, jac_to_grad

        self.optimizer.zero_grad(set_to_none=True)
        encoder = encoder_of(self.model)
        common = shared_input(batches)
        inputs = [common] if common is not None else [x for x, _ in batches.values()]
        originals: list[Tensor] = []
        leaves: list[Tensor] = []
        passes = [_cut(encoder(x), originals, leaves) for x in inputs]
        if common is not None:
            outputs = shared_outputs(self.model, passes[0], list(batches))
        else:
            outputs = {task: head_forward(self.model, f, task) for task, f in zip(batches, passes, strict=True)}
        losses = {task: self.losses[task](outputs[task], y) for task, (_, y) in batches.items()}
        values = {task: loss.item() for task, loss in losses.items()}
        if not all(math.isfinite(v) for v in values.values()):
            return values  # a diverged step: skip it rather than poison the parameters
        # Each task: its gradient w.r.t. the heads (accumulated, as Joint does) and w.r.t. the cut features.
        rows: list[list[Tensor]] = []
        for loss in losses.values():
            grads = torch.autograd.grad(loss, [*self.private, *leaves], retain_graph=True, allow_unused=True)
            for p, g in zip(self.private, grads[: len(self.private)], strict=True):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
            rows.append([torch.zeros_like(f) if g is None else g for f, g in zip(leaves, grads[len(self.private) :], strict=True)])
        # The encoder's per-task Jacobian: features' Jacobian left-multiplied by each task's feature gradients
        # (multi-scale features may depend on each other, so they are differentiated together, not one by one).
        jac_tensors = [torch.stack([row[k] for row in rows]) for k in range(len(leaves))]
        backward(originals, jac_tensors=jac_tensors, inputs=self.shared)
        jac_to_grad(self.shared, self.aggregator)
        self.optimizer.step()
        return values


def _cut(features: Any, originals: list[Tensor], leaves: list[Tensor]) -> Any:
    """``features`` with every parameter-dependent tensor replaced by a detached leaf copy.

    Appends the originals and their leaves to the two lists, so the heads can be
    differentiated w.r.t. the features alone and the encoder afterwards.
    """
    if isinstance(features, Tensor):
        if not features.requires_grad:
            return features
        leaf = features.detach().requires_grad_(True)
        originals.append(features)
        leaves.append(leaf)
        return leaf
    if isinstance(features, (list, tuple)):
        return type(features)(_cut(item, originals, leaves) for item in features)
    raise TypeError(
        f"the encoder returned {type(features).__name__}; the gradient methods need a tensor or a list/tuple "
        "of tensors as features"
    )
