"""How the core finds each task's encoder slices: a small protocol that model adapters implement.

A split tensor is a :mod:`torch.nn.utils.parametrize` parametrization whose
first element satisfies :class:`TaskSlicing`: it stores the tensor as
originals ``original0``, ``original1``, ... and says which task owns each.
``adapters.ChannelSplit`` is one; any other parametrization with
``task_names`` and ``owner(index)`` works the same way, so the core never
imports a model adapter. Models split some other way pass
``task_parameters=`` to ``CooperativeOptimizer`` instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["TaskSlicing", "task_slices"]


@runtime_checkable
class TaskSlicing(Protocol):
    """A parametrization that stores one tensor as per-task originals."""

    task_names: tuple[str, ...]

    def owner(self, index: int) -> str:
        """Name of the task that owns original ``index``."""
        ...


def _originals(plist: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``original0``, ``original1``, ... of a ParametrizationList (``original`` for a single one)."""
    single = getattr(plist, "original", None)
    if isinstance(single, nn.Parameter):
        yield "original", single
        return
    k = 0
    while isinstance(param := getattr(plist, f"original{k}", None), nn.Parameter):
        yield f"original{k}", param
        k += 1


def task_slices(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The encoder slices each task owns, by task name, in the split's order.

    Names are relative to ``model`` (``encoder.0.parametrizations.weight.original1``),
    so they address the slices in ``torch.func.functional_call``. A parameter
    tied between modules appears once, under its first name.

    Raises ``ValueError`` if ``model`` holds no split tensor, or split tensors
    whose task names disagree.
    """
    result: dict[str, list[tuple[str, nn.Parameter]]] = {}
    order: tuple[str, ...] | None = None
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        plists = module._modules["parametrizations"]
        if plists is None:  # pragma: no cover - is_parametrized guarantees it
            continue
        for tensor_name, plist in plists.named_children():
            split = next(iter(plist.children()), None)
            if not isinstance(split, TaskSlicing):
                continue
            if order is None:
                order = tuple(split.task_names)
                result = {name: [] for name in order}
            elif tuple(split.task_names) != order:
                raise ValueError(
                    f"module {module_name!r} is split between tasks {list(split.task_names)} but other modules "
                    f"between {list(order)}; split every encoder with the same task_names"
                )
            prefix = f"{module_name}.parametrizations.{tensor_name}" if module_name else f"parametrizations.{tensor_name}"
            for index, (original, param) in enumerate(_originals(plist)):
                if id(param) in seen:  # a tied parameter: listed once, under its first name
                    continue
                seen.add(id(param))
                result[split.owner(index)].append((f"{prefix}.{original}", param))
    if order is None:
        raise ValueError(
            f"{type(model).__name__} holds no channel-split module; call adapters.split_channels(encoder, task_names) "
            "first, or pass task_parameters={task: [(name, parameter), ...]}"
        )
    return result
