"""The clamp of a task's slices to anchor +/- b, and its tally of the elements it changed.

After each base step of task ``i``, ``theta_i <- min(max(theta_i, a - b), a + b)``
elementwise, with ``a`` the anchor theta_i^[t-1] (docs/method.md). The tally
(``StepReport.clamped``) counts the elements that some inner step of the
turn changed: ``before - after`` is nonzero exactly where the clamp moved an
element (the difference of two distinct floats is never 0), and over
several inner steps the elementwise maximum of its magnitude is kept.

On CPU most steps move every element by far less than b, and the clamp's
passes over memory (clone, two bounds, maximum, minimum, difference, count)
run tensor by tensor and cost more than the base step. So a CPU slice is
first tested with one pass: the clamp provably leaves a slice unchanged when
the largest computed ``|theta - a|`` is at most ``b * (1 - 2 * eps)`` (``eps``
the dtype's machine epsilon: the computed difference is within ``eps`` of
the exact one, so ``a - b <= theta <= a + b`` holds exactly, and rounding the
bounds cannot cut a value that lies between them). Such a slice is skipped
and counts 0; the others go through the full clamp. The parameters are
bit-identical to clamping every slice. The test reads its result on the host,
which is free on CPU; on other devices, where one host sync would stall the
stream and ``_foreach`` kernels cover many tensors per launch, every slice
is clamped without the test, so nothing syncs until the report.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TurnClamp"]


def _unchanged_below(bound: float, dtype: torch.dtype) -> float:
    """The largest computed ``max |theta - a|`` of a ``dtype`` slice for which the clamp changes nothing."""
    # the scalar enters the bounds' arithmetic in the op's compute type: float64 or float32
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    rounded = float(torch.tensor(bound, dtype=compute))
    return rounded * (1.0 - 2.0 * torch.finfo(dtype).eps)


class TurnClamp:
    """Clamps one task's slices at each inner step of its turn and tallies the elements it changed."""

    def __init__(self, bound: float | None, inner_steps: int) -> None:
        self.bound = bound
        self.inner_steps = inner_steps
        # per slice (its index in the task's slices), > 0 where the clamp changed it in some inner step of the turn
        self._excess: dict[int, Tensor] = {}
        self._clamped_any = False
        self._limits: dict[torch.dtype, float] = {}

    def reset(self) -> None:
        """Forget the turn's tally (a new turn starts)."""
        self._excess = {}
        self._clamped_any = False

    def apply(self, theta: list[Tensor], anchor: list[Tensor]) -> None:
        """Clamp ``theta`` to ``anchor +/- bound`` in place and add what changed to the turn's tally."""
        bound = self.bound
        if not theta or bound is None:
            return
        self._clamped_any = True
        with torch.no_grad():
            picked = self._may_change(theta, anchor, bound)
            if not picked:
                return
            slices = [theta[i] for i in picked]
            anchors = [anchor[i] for i in picked]
            before = list(torch._foreach_clone(slices))
            torch._foreach_maximum_(slices, list(torch._foreach_sub(anchors, bound)))
            torch._foreach_minimum_(slices, list(torch._foreach_add(anchors, bound)))
            torch._foreach_sub_(before, slices)
            if self.inner_steps > 1:
                torch._foreach_abs_(before)
            seen = [(self._excess[i], change) for i, change in zip(picked, before) if i in self._excess]
            if seen:
                torch._foreach_maximum_([old for old, _ in seen], [new for _, new in seen])
            for i, change in zip(picked, before):
                self._excess.setdefault(i, change)

    def tally(self, dtype: torch.dtype) -> Tensor | None:
        """The number of elements the turn's clamp changed, as a 0-dim tensor (``None`` if it never ran)."""
        if not self._clamped_any:
            return None
        if not self._excess:
            return torch.zeros((), dtype=dtype)
        with torch.no_grad():
            # nonzero exactly where clamped: the fused 0-"norm" counts the nonzero elements
            counts = torch._foreach_norm(list(self._excess.values()), 0, dtype=dtype)
        device = counts[0].device
        return torch.stack([c.to(device) for c in counts]).sum()

    def _may_change(self, theta: list[Tensor], anchor: list[Tensor], bound: float) -> list[int]:
        """Indices of the non-empty slices the clamp may change: on CPU those that fail the one-pass test, else all."""
        nonempty = [i for i, p in enumerate(theta) if p.numel()]
        if not nonempty or any(theta[i].device.type != "cpu" for i in nonempty):
            return nonempty
        moved = torch._foreach_sub([theta[i] for i in nonempty], [anchor[i] for i in nonempty])
        torch._foreach_abs_(moved)
        largest = torch.stack(torch._foreach_max(moved)).tolist()
        return [i for i, m in zip(nonempty, largest)
                if not m <= self._limit(bound, theta[i].dtype)]  # a NaN fails the test as well

    def _limit(self, bound: float, dtype: torch.dtype) -> float:
        limit = self._limits.get(dtype)
        if limit is None:
            limit = self._limits[dtype] = _unchanged_below(bound, dtype)
        return limit
