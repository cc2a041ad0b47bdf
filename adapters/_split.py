"""Function-preserving channel split of a module's parameters between tasks.

Every parameter of the split module is stored as ``T`` per-task slices along
its channel dimension and re-assembled with one ``torch.cat`` each time the
module reads it (a :mod:`torch.nn.utils.parametrize` parametrization with
several originals). The layer still computes one ordinary convolution or
matrix product over the concatenation of all tasks' slices, which is exactly
the paper's split-and-concat block: task ``i``'s output channels are computed
from the features of every task in the layer before.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvTransposeNd
from torch.nn.utils import parametrize

__all__ = ["ChannelSplit", "channel_dim", "merge", "slice_sizes", "split_channels", "task_parameters"]


def slice_sizes(channels: int, tasks: int) -> tuple[int, ...]:
    """Sizes of the ``tasks`` contiguous slices of ``channels`` channels.

    Task ``i`` gets ``channels // tasks`` channels plus one more for the first
    ``channels % tasks`` tasks, so sizes differ by at most one; with fewer
    channels than tasks the last tasks get empty slices.

    >>> slice_sizes(10, 3)
    (4, 3, 3)
    """
    if tasks < 1:
        raise ValueError(f"tasks must be >= 1, got {tasks}")
    if channels < 0:
        raise ValueError(f"channels must be >= 0, got {channels}")
    base, extra = divmod(channels, tasks)
    return tuple(base + (1 if i < extra else 0) for i in range(tasks))


def channel_dim(module: nn.Module, name: str, tensor: Tensor) -> int:
    """The channel dimension along which ``module.<name>`` is split.

    Output channels are dim 0 for convolutions, linear layers and norm
    affine parameters; transposed convolutions store their output channels
    in dim 1. A 0-dim parameter has no channel dimension (-1): it is owned
    whole by the first task.
    """
    if tensor.dim() == 0:
        return -1
    if isinstance(module, _ConvTransposeNd) and name == "weight":
        return 1
    return 0


class ChannelSplit(nn.Module):
    """Parametrization storing a tensor as per-task slices along ``dim``.

    ``forward(*slices)`` concatenates the slices (the value the layer uses);
    ``right_inverse(tensor)`` cuts a full tensor into independent slices.
    ``dim == -1`` marks a 0-dim parameter owned whole by the first task.
    """

    def __init__(self, task_names: Sequence[str], sizes: Sequence[int], dim: int) -> None:
        super().__init__()
        self.task_names = tuple(task_names)
        self.sizes = tuple(sizes)
        self.dim = dim

    def forward(self, *slices: Tensor) -> Tensor:
        if self.dim == -1:
            return slices[0].reshape(())
        return torch.cat(slices, self.dim)

    def right_inverse(self, tensor: Tensor) -> tuple[Tensor, ...]:
        if self.dim == -1:
            return (tensor.detach().reshape(1).clone(),)
        return tuple(s.clone() for s in torch.split(tensor.detach(), self.sizes, self.dim))

    def owner(self, index: int) -> str:
        """Name of the task owning original ``index``."""
        return self.task_names[index]

    def extra_repr(self) -> str:
        return f"tasks={self.task_names}, sizes={self.sizes}, dim={self.dim}"


@dataclass(frozen=True)
class _Target:
    module_name: str
    module: nn.Module
    param_name: str
    param: nn.Parameter

    @property
    def qualified_name(self) -> str:
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name


def _validate_task_names(task_names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(task_names, str) or not isinstance(task_names, Sequence):
        raise TypeError(
            f"task_names must be a sequence of task names such as ['seg', 'cls'], got {task_names!r}"
        )
    names = tuple(task_names)
    if len(names) < 2:
        raise ValueError(f"task_names must name at least two tasks to split between, got {list(names)}")
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise TypeError(f"task_names must be non-empty strings, got {bad!r}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"task_names must be unique, {duplicates} appear more than once")
    return names


def _targets(module: nn.Module) -> list[_Target]:
    """Every parameter to split, validated before anything is changed."""
    targets: list[_Target] = []
    owners: dict[int, list[str]] = {}
    for module_name, sub in module.named_modules(remove_duplicate=False):
        if parametrize.is_parametrized(sub):
            names = ", ".join(sub.parametrizations.keys())  # type: ignore[union-attr,operator]
            raise ValueError(
                f"module {module_name or '<root>'!r} ({type(sub).__name__}) already has parametrizations on "
                f"{names}; split_channels must see plain parameters: call adapters.merge(module) first or "
                "remove the other parametrizations (torch.nn.utils.parametrize.remove_parametrizations)"
            )
        for param_name, param in sub.named_parameters(recurse=False):
            target = _Target(module_name, sub, param_name, param)
            owners.setdefault(id(param), []).append(target.qualified_name)
            targets.append(target)
    tied = [names for names in owners.values() if len(names) > 1]
    if tied:
        raise ValueError(
            f"parameters shared between modules cannot be split yet: {tied}; untie them "
            "(give each module its own nn.Parameter) before calling split_channels"
        )
    if not targets:
        raise ValueError(f"split_channels found no parameters in {type(module).__name__}; nothing to split")
    return targets


def split_channels(module: nn.Module, task_names: Sequence[str]) -> nn.Module:
    """Split every parameter of ``module`` between tasks, in place.

    Each parameter is stored as one slice per task along its channel
    dimension (see :func:`channel_dim` and :func:`slice_sizes`) and
    concatenated when used, so the module computes exactly what it computed
    before. Slices are named ``<module>.parametrizations.<param>.original<k>``
    and owned by ``task_names[k]``; :func:`task_parameters` lists them and
    :func:`merge` undoes the split.

    Every parameter is checked before the first one is changed: on error the
    module is left as it was.

    Args:
        module: the shared encoder (any ``nn.Module``); modified in place.
        task_names: two or more unique task names, in the order of slices.

    Returns:
        ``module`` itself.

    Example:
        >>> enc = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU())
        >>> _ = split_channels(enc, ["even", "odd"])
        >>> [n for n, _ in task_parameters(enc)["odd"]][0]
        '0.parametrizations.weight.original1'
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    names = _validate_task_names(task_names)
    targets = _targets(module)
    for target in targets:
        dim = channel_dim(target.module, target.param_name, target.param)
        sizes = (1,) if dim == -1 else slice_sizes(target.param.shape[dim], len(names))
        parametrize.register_parametrization(
            target.module, target.param_name, ChannelSplit(names, sizes, dim), unsafe=False
        )
    return module


def _splits(module: nn.Module) -> Iterator[tuple[str, nn.Module, str, ChannelSplit]]:
    """(module name, module, tensor name, split) for every split tensor."""
    for module_name, sub in module.named_modules():
        if not parametrize.is_parametrized(sub):
            continue
        for tensor_name, plist in sub.parametrizations.items():  # type: ignore[union-attr,operator]
            first = plist[0]
            if isinstance(first, ChannelSplit):
                yield module_name, sub, tensor_name, first


def task_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The encoder slices each task owns, by task name, in the split's order.

    Names are relative to ``model`` (e.g. ``encoder.0.parametrizations.weight.original1``)
    so they can be passed to ``torch.func.functional_call(model, ...)``.

    Raises ``ValueError`` if ``model`` holds no split module, or split modules
    whose task names disagree.
    """
    result: dict[str, list[tuple[str, nn.Parameter]]] = {}
    task_order: tuple[str, ...] | None = None
    for module_name, sub, tensor_name, split in _splits(model):
        if task_order is None:
            task_order = split.task_names
            result = {name: [] for name in task_order}
        elif split.task_names != task_order:
            raise ValueError(
                f"module {module_name!r} is split between tasks {list(split.task_names)} but other modules "
                f"between {list(task_order)}; split every encoder with the same task_names"
            )
        plist = sub.parametrizations[tensor_name]  # type: ignore[index]
        prefix = f"{module_name}.parametrizations.{tensor_name}" if module_name else f"parametrizations.{tensor_name}"
        for k in range(len(split.sizes)):
            param = getattr(plist, f"original{k}")
            result[split.owner(k)].append((f"{prefix}.original{k}", param))
    if task_order is None:
        raise ValueError(
            f"{type(model).__name__} holds no channel-split module; call adapters.split_channels(encoder, task_names) first"
        )
    return result


def merge(module: nn.Module) -> nn.Module:
    """Undo :func:`split_channels` in place: every split tensor becomes one plain parameter again.

    The merged parameter is the concatenation of the current slices, so a
    trained split model becomes the original architecture computing the same
    function; its ``state_dict`` loads into a fresh, never-split model.
    Returns ``module``. Raises ``ValueError`` if nothing in ``module`` is split.
    """
    found = list(_splits(module))
    if not found:
        raise ValueError(f"{type(module).__name__} holds no channel-split parameters; nothing to merge")
    for module_name, sub, tensor_name, _ in found:
        plist = sub.parametrizations[tensor_name]  # type: ignore[index]
        if len(plist) > 1:
            raise ValueError(
                f"{module_name}.{tensor_name} has further parametrizations after the channel split "
                f"({[type(p).__name__ for p in list(plist)[1:]]}); remove them before merging"
            )
    for _, sub, tensor_name, _ in found:
        parametrize.remove_parametrizations(sub, tensor_name, leave_parametrized=True)
    return module
