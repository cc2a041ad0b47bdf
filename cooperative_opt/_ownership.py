"""Which parameters each task owns: encoder slices theta_i and head phi_i.

Every trainable parameter of the model must belong to exactly one task;
anything else is reported by name before training starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from cooperative_opt._slices import task_slices
from cooperative_opt._task import Task

__all__ = ["TaskParameters", "own_names", "resolve_ownership"]


@dataclass(frozen=True)
class TaskParameters:
    """One task's parameters. ``encoder_names`` are relative to the model (for ``functional_call``)."""

    name: str
    encoder: tuple[nn.Parameter, ...]
    encoder_names: tuple[str, ...]
    head: tuple[nn.Parameter, ...]

    @property
    def own(self) -> tuple[nn.Parameter, ...]:
        """theta_i followed by phi_i: everything this task's step updates."""
        return self.encoder + self.head


def own_names(model: nn.Module, task_params: TaskParameters) -> list[str | None]:
    """The names relative to ``model`` of ``task_params.own`` (slices, then head), ``None`` for a head
    parameter that lives outside ``model`` (it cannot be swapped in a forward of ``model``)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [*task_params.encoder_names, *(names.get(id(p)) for p in task_params.head)]


def _validate_tasks(tasks: Sequence[Task]) -> list[Task]:
    if isinstance(tasks, Task) or not isinstance(tasks, Iterable):
        raise TypeError(f"tasks must be a sequence of Task objects, got {type(tasks).__name__}")
    tasks = list(tasks)
    bad = [type(t).__name__ for t in tasks if not isinstance(t, Task)]
    if bad:
        raise TypeError(f"tasks must hold cooperative_opt.Task objects, found {bad}")
    if len(tasks) < 2:
        raise ValueError(
            f"tasks must hold at least two tasks, got {len(tasks)}; for one task use the base optimizer directly"
        )
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"task names must be unique, {duplicates} appear more than once")
    return tasks


def _named_encoder_slices(
    model: nn.Module, tasks: list[Task], task_parameters: Mapping[str, Iterable[tuple[str, nn.Parameter]]] | None
) -> dict[str, list[tuple[str, nn.Parameter]]]:
    if task_parameters is None:
        found = task_slices(model)
    else:
        found = {name: list(params) for name, params in task_parameters.items()}
    expected = [t.name for t in tasks]
    if sorted(found) != sorted(expected):
        raise ValueError(
            f"task names {expected} do not match the encoder split between {list(found)}; "
            "split the encoder with the same names as the tasks (adapters.split_channels(encoder, names))"
        )
    return found


def resolve_ownership(
    model: nn.Module,
    tasks: Sequence[Task],
    task_parameters: Mapping[str, Iterable[tuple[str, nn.Parameter]]] | None = None,
) -> tuple[list[Task], list[TaskParameters]]:
    """Validate ``tasks`` and assign every trainable parameter of ``model`` to one task.

    ``task_parameters`` overrides the encoder slices found by
    :func:`cooperative_opt.task_slices` (what ``adapters.split_channels`` produces) (``{task: [(name, param), ...]}``, names
    relative to ``model``). Frozen parameters (``requires_grad=False``) are
    left out. Raises ``ValueError`` naming parameters owned by no task or by
    several.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    task_list = _validate_tasks(tasks)
    slices = _named_encoder_slices(model, task_list, task_parameters)
    names_by_id: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_by_id.setdefault(id(p), name)

    owners: dict[int, list[str]] = {}
    result: list[TaskParameters] = []
    for task in task_list:
        enc = [(n, p) for n, p in slices[task.name] if p.requires_grad]
        head = [p for p in task.head_parameters() if p.requires_grad]
        for p in [p for _, p in enc] + head:
            owners.setdefault(id(p), []).append(task.name)
        result.append(
            TaskParameters(
                task.name, tuple(p for _, p in enc), tuple(n for n, _ in enc), tuple(head)
            )
        )

    shared = {names_by_id.get(i, "<not in model>"): ts for i, ts in owners.items() if len(ts) > 1}
    if shared:
        raise ValueError(
            f"parameters owned by more than one task: {shared}; each parameter must belong to exactly one "
            "task (give each task its own head, and pass each encoder slice once)"
        )
    unowned = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owners]
    if unowned:
        raise ValueError(
            f"trainable parameters owned by no task: {unowned}; put them in the shared encoder before "
            "adapters.split_channels, in a Task's head, or freeze them with requires_grad_(False)"
        )
    return task_list, result
