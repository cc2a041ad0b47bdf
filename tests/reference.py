"""A plain-loop reference implementation of MT-COOL (Algorithm 1 as docs/method.md states it).

Deliberately naive: one parameter at a time, explicit formulas, plain SGD
(``p <- p - lr * grad``, written as torch.optim.SGD writes it). The noise
comes from a log of what the optimizer under test drew, so both see the
same samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from cooperative_opt import Task

NoiseLog = list[dict[str, list[Tensor]]]  # one entry per draw: {slice name: [eps per sample]}


def naive_softmax_kl(outputs: Sequence[Tensor], clean: Tensor | None) -> Tensor:
    probs = [F.softmax(o, dim=1) for o in outputs]
    ref = F.softmax(clean, dim=1) if clean is not None else sum(probs) / len(probs)
    assert isinstance(ref, Tensor)
    total = torch.zeros(())
    for p in probs:
        total = total + (p * (p.log() - ref.log())).sum(dim=1).mean()
    return total / len(probs)


class ReferenceMTCOOL:
    """MT-COOL with plain loops; ``slices[task] = [(name, param)]`` are the encoder slices."""

    def __init__(
        self,
        model: nn.Module,
        tasks: Sequence[Task],
        slices: Mapping[str, list[tuple[str, nn.Parameter]]],
        lr: float,
        clamp_bound: float | None,
        samples: int = 1,
        inner_steps: int = 1,
        consistency_weight: float = 0.0,
        reference: str = "mean",
        warmup_steps: int = 0,
        order: str = "gauss_seidel",
    ) -> None:
        self.model, self.tasks, self.slices = model, list(tasks), slices
        self.order = order
        self.lr, self.clamp_bound, self.samples = lr, clamp_bound, samples
        self.inner_steps, self.weight, self.reference = inner_steps, consistency_weight, reference
        self.warmup_steps, self.steps = warmup_steps, 0
        # per task, the fraction of its slice elements the clamp changed in the last step (StepReport.clamped)
        self.clamped: dict[str, float] = {}

    def _sgd(self, params: Sequence[Tensor], loss: Tensor) -> None:
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.add_(g, alpha=-self.lr)

    def step(self, batches: Mapping[str, Any] | Sequence[Mapping[str, Any]], noise: NoiseLog | None) -> None:
        """``batches``: one mapping for every inner step, or one mapping per inner step (warm-up: the first)."""
        per_step = [batches] * self.inner_steps if isinstance(batches, Mapping) else list(batches)
        self.clamped = {t.name: 0.0 for t in self.tasks}
        if self.steps < self.warmup_steps:
            self._warmup(per_step[0], noise)
        else:
            self._outer(per_step, noise)
        self.steps += 1

    def _warmup(self, batches: Mapping[str, Any], noise: NoiseLog | None) -> None:
        thetas = [(n, p) for t in self.tasks for n, p in self.slices[t.name]]
        total = torch.zeros(())
        trainable: list[Tensor] = [p for _, p in thetas]
        for task in self.tasks:
            if task.name not in batches:
                continue
            eps = noise.pop(0) if noise is not None else {}  # each task's forward draws its own noise
            batch = batches[task.name]
            losses = []
            for j in range(self.samples if noise is not None else 1):
                replaced = {n: p + eps[n][j] for n, p in thetas} if noise is not None else {}
                out = functional_call(self.model, replaced, task.inputs(batch))
                losses.append(task.loss(out, batch))
            total = total + sum(losses) / len(losses)
            trainable += list(task.head_parameters())
        self._sgd(trainable, total)

    def _outer(self, per_step: Sequence[Mapping[str, Any]], noise: NoiseLog | None) -> None:
        anchor = {n: p.detach().clone() for t in self.tasks for n, p in self.slices[t.name]}
        for task in self.tasks:
            if task.name not in per_step[0]:
                continue
            own = [p for _, p in self.slices[task.name]] + list(task.head_parameters())
            others = [(n, p) for t in self.tasks if t is not task for n, p in self.slices[t.name]]
            changed = {n: torch.zeros(p.shape, dtype=torch.bool, device=p.device) for n, p in self.slices[task.name]}
            for inner in range(self.inner_steps):
                batch = per_step[inner][task.name]
                outs = []
                # Jacobi: the other tasks at the previous iterate (the anchor); Gauss-Seidel: as they are now
                at = {n: anchor[n] if self.order == "jacobi" else p.detach() for n, p in others}
                if noise is None:
                    outs.append(functional_call(self.model, at, task.inputs(batch)))
                else:
                    eps = noise.pop(0)
                    for j in range(self.samples):
                        replaced = {n: at[n] + eps[n][j] for n, _ in others}
                        outs.append(functional_call(self.model, replaced, task.inputs(batch)))
                loss = sum(task.loss(o, batch) for o in outs) / len(outs)
                assert isinstance(loss, Tensor)
                if self.weight > 0 and noise is not None and (self.samples > 1 or self.reference == "clean"):
                    clean = None
                    if self.reference == "clean":
                        with torch.no_grad():
                            clean = self.model(*task.inputs(batch))
                    loss = loss + self.weight * naive_softmax_kl(outs, clean)
                self._sgd(own, loss)
                if self.clamp_bound is not None:
                    with torch.no_grad():
                        for n, p in self.slices[task.name]:
                            lo, hi = anchor[n] - self.clamp_bound, anchor[n] + self.clamp_bound
                            changed[n] |= (p < lo) | (p > hi)
                            p.copy_(torch.minimum(torch.maximum(p, lo), hi))
            elements = sum(m.numel() for m in changed.values())
            self.clamped[task.name] = sum(int(m.sum()) for m in changed.values()) / elements if elements else 0.0
