"""What one outer iteration (or warm-up step) of ``CooperativeOptimizer`` did."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Phase", "StepReport"]

Phase = Literal["warmup", "cooperative"]


@dataclass(frozen=True)
class StepReport:
    """Summary of one warm-up step or one outer iteration.

    Attributes:
        step: 1-based index of this outer iteration.
        phase: ``"warmup"`` (Eq. 7) or ``"cooperative"`` (one outer iteration).
        losses: each updated task's loss, averaged over noise samples and inner steps
            (what the optimizer computed: ``step(batches)`` and closures).
        consistency: each updated task's consistency term D (0 where it is off).
        skipped: tasks whose update stopped, with the reason: ``"no batch"``,
            ``"non-finite loss"``, ``"non-finite gradient"`` (a GradScaler
            skipped the step in ``step(batches, scaler=...)``) or ``"not stepped"``
            (an inner step of a user loop ended without ``step()``).
        clamped: every task's fraction (0 to 1) of its encoder-slice elements
            that the clamp changed in this outer iteration, i.e. that an inner
            step moved outside ``anchor -/+ clamp_bound`` and the clamp put
            back, counted once however many of the task's inner steps did so.
            It says whether the clamp binds: 0.0 means the clamp did nothing.
            It is 0.0 wherever no clamp ran: in warm-up, without a clamp
            (``variant="vanilla"``), for a task with no batch or skipped at
            its first inner step (``skipped`` tells these apart). Every
            driver reports it (``step(batches)``, closures, your own loop).
    """

    step: int
    phase: Phase
    losses: Mapping[str, float]
    consistency: Mapping[str, float]
    skipped: Mapping[str, str]
    clamped: Mapping[str, float] = field(default_factory=dict)

    @property
    def total_loss(self) -> float:
        """Sum of the task losses of this step."""
        return float(sum(self.losses.values()))
