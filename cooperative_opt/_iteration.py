"""The algorithm's state across one outer iteration: anchor, active task, base steps, clamp, skips.

:class:`OuterIteration` is what ``CooperativeOptimizer.iteration()`` runs. It
takes the anchor theta^[t-1], makes each present task active in turn for
``inner_steps`` inner steps (one in warm-up), and, each time the user's code
calls ``step()``, applies the base optimizer to the active task's parameters
only and clamps its slices. Whatever the user's forward, backward and loss
scaling were, this is the one place where parameters move.

- An inner step that ends without ``step()`` (GradScaler found inf/NaN and
  skipped it, a non-finite loss, or the user's choice) skips the task for
  the rest of the outer iteration: that step has moved no weight and no
  optimizer state, and the task's BatchNorm statistics go back to what they
  were before its turn.
- In warm-up (Eq. 7) ``step()`` banks the task's gradients instead, and the
  end of the iteration applies one base step to their sum over the tasks.
- If the loop is left early (an exception in user code, ``break``), the
  interrupted task is put back as it was before its turn: statistics, and
  with ``inner_steps > 1`` its slices (from the anchor) and head.
- The clamp (``cooperative_opt._clamp``) also tallies which elements it
  changed (``StepReport.clamped``).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cooperative_opt._clamp import TurnClamp
from cooperative_opt._distributed import Ranks
from cooperative_opt._ownership import TaskParameters
from cooperative_opt._perturb import WARMUP, Perturber
from cooperative_opt._report import Phase, StepReport
from cooperative_opt._settings import Settings

__all__ = ["NON_FINITE", "NON_FINITE_GRADIENT", "NOT_STEPPED", "NO_BATCH", "OuterIteration", "Record"]

NO_BATCH = "no batch"
NON_FINITE = "non-finite loss"
NON_FINITE_GRADIENT = "non-finite gradient"
NOT_STEPPED = "not stepped"


@dataclass
class Record:
    """What one outer iteration did, filled in as it runs (losses by whoever computed them)."""

    phase: Phase
    losses: dict[str, list[float]] = field(default_factory=dict)
    consistency: dict[str, list[float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    clamped: dict[str, Tensor] = field(default_factory=dict)  # elements the clamp changed (a 0-dim count)

    def report(self, step: int, elements: dict[str, int]) -> StepReport:
        """The frozen report; ``elements`` is every task's number of encoder-slice elements."""

        def mean(values: dict[str, list[float]]) -> dict[str, float]:
            return {k: sum(v) / len(v) for k, v in values.items() if v}

        clamped = {name: float(self.clamped[name]) / n if name in self.clamped and n else 0.0
                   for name, n in elements.items()}
        return StepReport(step, self.phase, mean(self.losses), mean(self.consistency), dict(self.skipped), clamped)


class OuterIteration:
    """Anchor, turn order, base steps and clamp of MT-COOL's outer iterations (one object per optimizer)."""

    def __init__(
        self,
        base: torch.optim.Optimizer,
        task_params: Sequence[TaskParameters],
        settings: Settings,
        perturber: Perturber,
        ranks: Ranks | None = None,
        on_start: Callable[[int], None] | None = None,
        previous: Sequence[Sequence[Tensor]] | None = None,
    ) -> None:
        self.base = base
        self.ranks = ranks
        self._on_start = on_start  # called with the iteration's index before anything is drawn
        self.task_params = list(task_params)
        self.settings = settings
        self.perturber = perturber
        self.steps = 0  # completed outer iterations and warm-up steps
        self.active: int | None = None  # index of the task whose turn it is
        self.record: Record | None = None
        self.last_report: StepReport | None = None
        self._stepped = False
        self._skip_reason = NOT_STEPPED
        # the previous iterate theta^[t-1], copied when an outer iteration starts: the clamp's anchor, and under
        # update_order="jacobi" (``previous``: one buffer per owned parameter) what the other tasks are read at
        if previous is not None:
            self._thetas: list[Tensor] = [p for tp in self.task_params for p in tp.own]
            self._anchor = [b for buffers in previous for b in buffers]
            self._anchor_of = [list(buffers[: len(tp.encoder)]) for tp, buffers in zip(self.task_params, previous)]
        else:
            self._thetas = [p for tp in self.task_params for p in tp.encoder]
            needs_anchor = settings.clamp_bound is not None or settings.inner_steps > 1
            self._anchor = [torch.empty_like(p) for p in self._thetas] if needs_anchor else []
            self._anchor_of = []
            start = 0
            for tp in self.task_params:
                self._anchor_of.append(self._anchor[start : start + len(tp.encoder)] if self._anchor else [])
                start += len(tp.encoder)
        owned = [p for tp in self.task_params for p in tp.own]
        self._owned = owned
        self._not_owned_by = [[p for p in owned if all(p is not q for q in tp.own)] for tp in self.task_params]
        self._bank: dict[int, Tensor] = {}
        self._elements = {tp.name: sum(p.numel() for p in tp.encoder) for tp in self.task_params}
        # the clamp counts are summed in float32 (exact up to 2**24 elements), in float64 for a task with a float64
        # slice (a norm may not narrow its input's dtype)
        self._count_dtype = [torch.float64 if any(p.dtype == torch.float64 for p in tp.encoder) else torch.float32
                             for tp in self.task_params]
        self._clamp = TurnClamp(settings.clamp_bound, settings.inner_steps)

    @property
    def phase(self) -> Phase:
        """The phase of the next (or the running) outer iteration."""
        if self.record is not None:
            return self.record.phase
        return "warmup" if self.steps < self.settings.warmup_steps else "cooperative"

    @property
    def entry_index(self) -> int:
        """The index ``perturb`` evaluates for: the active task, or ``WARMUP``."""
        if self.active is None:  # pragma: no cover - callers check
            raise RuntimeError("no task is active")
        return WARMUP if self.phase == "warmup" else self.active

    def log(self, name: str, loss: float, consistency: float | None = None) -> None:
        """Record a loss (and consistency term) of task ``name`` in the running iteration's report."""
        if self.record is None:  # pragma: no cover - callers run inside an iteration
            raise RuntimeError("no outer iteration is running")
        self.record.losses.setdefault(name, []).append(loss)
        if consistency is not None:
            self.record.consistency.setdefault(name, []).append(consistency)

    @property
    def stepped(self) -> bool:
        """Whether the active task's current inner step has called ``step()``."""
        return self._stepped

    def skip(self, reason: str) -> None:
        """Why the active task's current inner step will end without a step (reported in ``StepReport``)."""
        self._skip_reason = reason

    # ------------------------------------------------------------------ run

    def run(self, present: Sequence[int]) -> Generator[str, None, None]:
        """The generator behind ``CooperativeOptimizer.iteration()``."""
        if self.record is not None:
            raise RuntimeError(
                "iteration() was started while another outer iteration is running; finish its loop "
                "(or break out of it) before starting the next"
            )
        record = Record(self.phase)
        names = {i: tp.name for i, tp in enumerate(self.task_params)}
        record.skipped.update({names[i]: NO_BATCH for i in names if i not in present})
        self.record = record
        cooperative = record.phase == "cooperative"
        finished = False
        try:
            self.perturber.refresh()
            if self._on_start is not None:
                self._on_start(self.steps)
            if cooperative and self._anchor:
                with torch.no_grad():
                    torch._foreach_copy_(self._anchor, self._thetas)
            for index in present:
                tp = self.task_params[index]
                several = cooperative and self.settings.inner_steps > 1
                head_before = [p.detach().clone() for p in tp.head] if several else []
                self.perturber.stats.save()  # restored if the turn is skipped or left early
                inner_steps = self.settings.inner_steps if cooperative else 1
                for inner in range(inner_steps):
                    self._begin(index)
                    try:
                        yield tp.name
                    except BaseException:
                        if not (self._stepped and inner == inner_steps - 1):  # unless the turn was complete
                            self._rollback(index, head_before, moved=several)
                        raise
                    if not self._stepped:
                        self.perturber.stats.restore()
                        record.skipped[tp.name] = self._skip_reason
                        break
                self._tally_clamped(record, index)
                self.active = None
            if not cooperative:
                self._apply_bank()
            if self.ranks is not None and self.perturber.stats.buffers:
                self.ranks.average(self.perturber.stats.buffers)  # the documented rule without SyncBatchNorm
            finished = True
        finally:
            self.active = None
            if self.ranks is not None:
                self.ranks.activate(())
            self._bank.clear()
            self._clamp.reset()
            self.base.zero_grad(set_to_none=True)
            self.record = None
            if finished:
                self.steps += 1
                self.last_report = record.report(self.steps, self._elements)

    def _begin(self, index: int) -> None:
        self.active = index
        if self.ranks is not None:  # the coming backward averages the stepping parameters' gradients
            self.ranks.activate(self._owned if self.phase == "warmup" else self.task_params[index].own)
        self._stepped = False
        self._skip_reason = NOT_STEPPED
        self.base.zero_grad(set_to_none=True)  # inactive tasks must have grad None: stock optimizers skip them
        self.perturber.new_step()

    # ----------------------------------------------------------------- step

    def step(self) -> None:
        """The base step of the active task's inner step (banked in warm-up), then its clamp."""
        if self.active is None:  # pragma: no cover - callers check
            raise RuntimeError("no task is active")
        if self._stepped:
            raise RuntimeError(
                f"step() was already called in this inner step of task {self.task_params[self.active].name!r}; "
                "call it once per name that iteration() yields (set inner_steps for several steps per task)"
            )
        if self.phase == "warmup":
            self._deposit()
        else:
            for p in self._not_owned_by[self.active]:
                p.grad = None  # discarded, never applied: only the active task moves
            self.base.step()
            self._clamp.apply(list(self.task_params[self.active].encoder), self._anchor_of[self.active])
        self._stepped = True

    def _tally_clamped(self, record: Record, index: int) -> None:
        """Record how many of task ``index``'s slice elements its turn clamped (a device tensor)."""
        count = self._clamp.tally(self._count_dtype[index])
        if count is not None:
            record.clamped[self.task_params[index].name] = count
        self._clamp.reset()

    def _deposit(self) -> None:
        """Warm-up: move this task's gradients into the bank (Eq. 7 sums the tasks' losses)."""
        grads = {id(p): p.grad for p in self._owned if p.grad is not None}
        adding = [key for key in grads if key in self._bank]
        if adding:
            with torch.no_grad():
                torch._foreach_add_([self._bank[key] for key in adding], [grads[key] for key in adding])
        for key, grad in grads.items():
            self._bank.setdefault(key, grad)  # the first task's gradient tensor becomes the bank
        for p in self._owned:
            p.grad = None

    def _apply_bank(self) -> None:
        """Warm-up: one base step on the summed gradients of the tasks that stepped."""
        if not self._bank:
            return
        self.base.zero_grad(set_to_none=True)
        for p in self._owned:
            banked = self._bank.get(id(p))
            if banked is not None:
                p.grad = banked
        self.base.step()

    def _rollback(self, index: int, head_before: list[Tensor], moved: bool) -> None:
        """Undo task ``index``'s partial turn after its loop was left early. With several inner steps
        (``moved``) its slices go back to the anchor and its head to the snapshot taken before its turn."""
        self.perturber.stats.restore()
        if not moved:
            return
        tp = self.task_params[index]
        with torch.no_grad():
            if tp.encoder and self._anchor_of[index]:
                torch._foreach_copy_(list(tp.encoder), self._anchor_of[index])
            if tp.head and head_before:
                torch._foreach_copy_(list(tp.head), head_before)
