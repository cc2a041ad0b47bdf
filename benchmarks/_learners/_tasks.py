"""The one place the benchmarks turn losses into ``cooperative_opt.Task`` objects.

Batches are ``(x, y)`` pairs, the model is called as ``model(x, task)`` and a
task's loss is ``loss(prediction, y)``. The adapters are classes, not
closures, so the tasks pickle (``torch.multiprocessing`` spawn, checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

from benchmarks._learners._problem import Batch, LossFn

if TYPE_CHECKING:
    from cooperative_opt import Task

__all__ = ["BatchLoss", "TaskInputs", "cooperative_tasks"]


@dataclass(frozen=True)
class BatchLoss:
    """``Task.loss`` adapter: ``loss(output, (x, y)) = fn(output, y)``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> BatchLoss(F.mse_loss)(torch.ones(2), (torch.zeros(2, 3), torch.ones(2))).item()
        0.0
    """

    fn: LossFn

    def __call__(self, output: Tensor, batch: Batch) -> Tensor:
        return self.fn(output, batch[1])


@dataclass(frozen=True)
class TaskInputs:
    """``Task.inputs`` adapter: the model is called as ``model(x, task)`` for ``batch = (x, y)``."""

    task: str

    def __call__(self, batch: Batch) -> tuple[Tensor, str]:
        return (batch[0], self.task)


def cooperative_tasks(
    names: Sequence[str], losses: Mapping[str, LossFn], head_of: Callable[[str], nn.Module]
) -> list[Task]:
    """One ``cooperative_opt.Task`` per name, in order: ``model(x, name)``, ``losses[name](output, y)``,
    head ``head_of(name)`` (the task's private parameters).

    Raises:
        ValueError: when ``losses`` lacks one of ``names``.

    Example:
        >>> import torch.nn.functional as F
        >>> heads = nn.ModuleDict({"a": nn.Linear(4, 2), "b": nn.Linear(4, 2)})
        >>> [t.name for t in cooperative_tasks(["a", "b"], dict.fromkeys("ab", F.cross_entropy), heads.__getitem__)]
        ['a', 'b']
    """
    from cooperative_opt import Task

    missing = [name for name in names if name not in losses]
    if missing:
        raise ValueError(f"losses has no entry for tasks {missing} (it has {sorted(losses)}); give one loss per task")
    return [Task(name, loss=BatchLoss(losses[name]), head=head_of(name), inputs=TaskInputs(name)) for name in names]
