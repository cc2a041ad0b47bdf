"""Function-preserving channel split of a module's parameters between tasks.

Every parameter of the split module is stored as ``T`` per-task slices along
its channel dimension and re-assembled with one ``torch.cat`` each time the
module reads it (a :mod:`torch.nn.utils.parametrize` parametrization with
several originals). The layer still computes one ordinary convolution or
matrix product over the concatenation of all tasks' slices, which is exactly
the paper's split-and-concat block: task ``i``'s output channels are computed
from the features of every task in the layer before.

Which dimension holds the channels is decided per layer kind by
:func:`adapters.split_rule` (the table is in ``adapters/_rules.py`` and
``docs/adapters/index.md``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from cooperative_opt import task_slices

from adapters._rules import WHOLE, SplitRule, channel_dim, slice_sizes, split_rule

__all__ = [
    "ChannelSplit",
    "PlannedSplit",
    "SmallPolicy",
    "channel_dim",
    "merge",
    "slice_sizes",
    "split_channels",
    "split_plan",
    "task_parameters",
]

#: What to do with a parameter that has fewer channels than there are tasks:
#: ``"split"`` gives the first ``C`` tasks one channel each and the others an
#: empty slice (the same formula as every other parameter, so the parameter is
#: still owned whole, never dropped); ``"raise"`` refuses to convert.
SmallPolicy = Literal["split", "raise"]


class ChannelSplit(nn.Module):
    """Parametrization storing a tensor as per-task slices along ``dim``.

    ``forward(*slices)`` concatenates the slices (the value the layer uses);
    ``right_inverse(tensor)`` cuts a full tensor into independent slices.
    ``dim == -1`` marks a 0-dim parameter owned whole by the first task. With
    ``chunks > 1`` (fused q/k/v projections, RNN gates) ``dim`` is made of
    ``chunks`` equal blocks, each split by ``sizes``: task ``k``'s slice holds
    its ``sizes[k]`` channels of every block, block after block.
    """

    def __init__(self, task_names: Sequence[str], sizes: Sequence[int], dim: int, chunks: int = 1) -> None:
        super().__init__()
        self.task_names = tuple(task_names)
        self.sizes = tuple(sizes)
        self.dim = dim
        self.chunks = chunks

    def forward(self, *slices: Tensor) -> Tensor:
        if self.dim == WHOLE:
            return slices[0].reshape(())
        if self.chunks == 1:
            return torch.cat(slices, self.dim)
        blocks = [torch.unflatten(s, self.dim, (self.chunks, size)) for s, size in zip(slices, self.sizes)]
        return torch.cat(blocks, self.dim + 1).flatten(self.dim, self.dim + 1)

    def right_inverse(self, tensor: Tensor) -> tuple[Tensor, ...]:
        tensor = tensor.detach()
        if self.dim == WHOLE:
            return (tensor.reshape(1).clone(),)
        if self.chunks == 1:
            return tuple(s.clone() for s in torch.split(tensor, list(self.sizes), self.dim))
        blocks = torch.unflatten(tensor, self.dim, (self.chunks, sum(self.sizes)))
        return tuple(
            s.flatten(self.dim, self.dim + 1).clone() for s in torch.split(blocks, list(self.sizes), self.dim + 1)
        )

    def owner(self, index: int) -> str:
        """Name of the task owning original ``index``."""
        return self.task_names[index]

    def extra_repr(self) -> str:
        chunks = f", chunks={self.chunks}" if self.chunks > 1 else ""
        return f"tasks={self.task_names}, sizes={self.sizes}, dim={self.dim}{chunks}"


@dataclass(frozen=True)
class PlannedSplit:
    """How :func:`split_channels` will split one parameter (see :func:`split_plan`).

    Attributes:
        name: qualified parameter name, relative to the split module.
        shape: the parameter's shape.
        dim: the channel dimension (``-1``: 0-dim, owned whole by the first task).
        chunks: equal blocks along ``dim`` split separately (q/k/v, RNN gates).
        sizes: channels of each task, per block, in task order.
        kind: the rule that applied (``"conv"``, ``"transposed conv"``, ``"free parameter"``, ``"override"``...).
        tied: other names of the same parameter (shared by several modules), split once.
    """

    name: str
    shape: tuple[int, ...]
    dim: int
    chunks: int
    sizes: tuple[int, ...]
    kind: str
    tied: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Target:
    module_name: str
    module: nn.Module
    param_name: str
    param: nn.Parameter
    rule: SplitRule
    sizes: tuple[int, ...]
    aliases: tuple[tuple[str, nn.Module, str], ...]  # (module name, module, param name) of tied uses

    @property
    def qualified_name(self) -> str:
        return _qualified(self.module_name, self.param_name)


def _qualified(module_name: str, name: str) -> str:
    return f"{module_name}.{name}" if module_name else name


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


def _validate_dims(dims: Mapping[str, int] | None) -> dict[str, int]:
    if dims is None:
        return {}
    if not isinstance(dims, Mapping):
        raise TypeError(f"dims must map parameter names to a dimension, e.g. {{'pos_embed': 1}}; got {dims!r}")
    bad = {k: v for k, v in dims.items() if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int)}
    if bad:
        raise TypeError(f"dims must map parameter names (str) to dimensions (int), got {bad!r}")
    return dict(dims)


def _uses(module: nn.Module) -> dict[int, list[tuple[str, nn.Module, str, nn.Parameter]]]:
    """Every (module name, module, param name, param) by parameter, modules visited once each."""
    uses: dict[int, list[tuple[str, nn.Module, str, nn.Parameter]]] = {}
    seen: set[int] = set()
    for module_name, sub in module.named_modules():
        if id(sub) in seen:
            continue
        seen.add(id(sub))
        if parametrize.is_parametrized(sub):
            names = ", ".join(_plists(sub).keys())
            raise ValueError(
                f"module {module_name or '<root>'!r} ({type(sub).__name__}) already has parametrizations on "
                f"{names}; split_channels must see plain parameters: call adapters.merge(module) first or "
                "remove the other parametrizations (torch.nn.utils.parametrize.remove_parametrizations)"
            )
        for param_name, param in sub.named_parameters(recurse=False):
            uses.setdefault(id(param), []).append((module_name, sub, param_name, param))
    return uses


def _targets(module: nn.Module, tasks: int, dims: Mapping[str, int], small: SmallPolicy) -> list[_Target]:
    """Every parameter to split with its rule, validated before anything is changed."""
    uses = _uses(module)
    if not uses:
        raise ValueError(f"split_channels found no parameters in {type(module).__name__}; nothing to split")
    known = {_qualified(mn, pn): key for key, group in uses.items() for mn, _, pn, _ in group}
    unknown = sorted(set(dims) - set(known))
    if unknown:
        sample = sorted(known)[:6]
        raise ValueError(
            f"dims names parameters not in {type(module).__name__}: {unknown}; use qualified names relative "
            f"to the split module, e.g. {sample}"
        )
    overrides: dict[int, tuple[str, int]] = {}
    for name, dim in dims.items():
        key = known[name]
        if key in overrides and overrides[key][1] != dim:
            raise ValueError(f"dims gives tied names {overrides[key][0]!r} and {name!r} different dimensions")
        overrides[key] = (name, dim)

    targets: list[_Target] = []
    too_small: list[str] = []
    for key, group in uses.items():
        module_name, sub, param_name, param = group[0]
        qualified = _qualified(module_name, param_name)
        if key in overrides:
            name, dim = overrides[key]
            if param.dim() == 0:
                raise ValueError(f"dims[{name!r}]: {qualified} is a 0-dim parameter, it has no dimension to split")
            if not -param.dim() <= dim < param.dim():
                raise ValueError(
                    f"dims[{name!r}] = {dim} is out of range for {qualified} of shape {tuple(param.shape)}; "
                    f"use 0..{param.dim() - 1}"
                )
            rule = SplitRule(dim % param.dim(), 1, "override")
        else:
            rule = split_rule(sub, param_name, param, module_name)
        if rule.dim == WHOLE:
            sizes: tuple[int, ...] = (1,)
        else:
            channels = param.shape[rule.dim] // rule.chunks
            sizes = slice_sizes(channels, tasks)
            if channels < tasks:
                too_small.append(f"{qualified} ({channels} channels along dim {rule.dim})")
        aliases = tuple((mn, m, pn) for mn, m, pn, _ in group[1:])
        targets.append(_Target(module_name, sub, param_name, param, rule, sizes, aliases))
    if too_small and small == "raise":
        raise ValueError(
            f"parameters with fewer channels than the {tasks} tasks: {too_small}; pass small='split' to give "
            "the first tasks one channel each (the others own none of them), or keep these layers out of the "
            "split encoder"
        )
    return targets


def split_plan(
    module: nn.Module,
    task_names: Sequence[str],
    *,
    dims: Mapping[str, int] | None = None,
    small: SmallPolicy = "split",
) -> list[PlannedSplit]:
    """How :func:`split_channels` would split every parameter of ``module``, without changing it.

    Takes the same arguments as :func:`split_channels` and raises the same errors.

    Example:
        >>> plan = split_plan(nn.Linear(4, 5), ["a", "b"])
        >>> [(p.name, p.dim, p.sizes) for p in plan]
        [('weight', 0, (3, 2)), ('bias', 0, (3, 2))]
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    names = _validate_task_names(task_names)
    small = _validate_small(small)
    targets = _targets(module, len(names), _validate_dims(dims), small)
    return [
        PlannedSplit(
            t.qualified_name,
            tuple(t.param.shape),
            t.rule.dim,
            t.rule.chunks,
            t.sizes,
            t.rule.kind,
            tuple(_qualified(mn, pn) for mn, _, pn in t.aliases),
        )
        for t in targets
    ]


def _validate_small(small: object) -> SmallPolicy:
    if small == "split":
        return "split"
    if small == "raise":
        return "raise"
    raise ValueError(f"small must be 'split' or 'raise', got {small!r}")


def split_channels(
    module: nn.Module,
    task_names: Sequence[str],
    *,
    dims: Mapping[str, int] | None = None,
    small: SmallPolicy = "split",
) -> nn.Module:
    """Split every parameter of ``module`` between tasks, in place.

    Each parameter is stored as one slice per task along its channel
    dimension (see :func:`adapters.split_rule` and :func:`slice_sizes`) and
    concatenated when used, so the module computes exactly what it computed
    before. Slices are named ``<module>.parametrizations.<param>.original<k>``
    and owned by ``task_names[k]``; :func:`task_parameters` lists them and
    :func:`merge` undoes the split. A parameter shared by several modules is
    split once: every module reads the same slice objects, so it stays tied.

    Every parameter is checked before the first one is changed, and a failure
    while converting undoes what was done: on error the module is left as it
    was, with its original parameter objects.

    Args:
        module: the shared encoder (any ``nn.Module``); modified in place.
        task_names: two or more unique task names, in the order of slices.
        dims: overrides of the rule, ``{qualified parameter name: dim}``
            (e.g. ``{"pos_embed": 1}`` to split a position embedding by position).
        small: what to do with parameters that have fewer channels than tasks
            (:data:`SmallPolicy`): ``"split"`` (default) or ``"raise"``.

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
    small = _validate_small(small)
    targets = _targets(module, len(names), _validate_dims(dims), small)
    orders = {id(t.module): list(t.module._parameters) for t in targets}
    orders.update({id(m): list(m._parameters) for t in targets for _, m, _ in t.aliases})
    done: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for t in targets:
            split = ChannelSplit(names, t.sizes, t.rule.dim, t.rule.chunks)
            parametrize.register_parametrization(t.module, t.param_name, split, unsafe=False)
            done.append((t.module, t.param_name, t.param))
            owner = _plists(t.module).train(t.module.training)[t.param_name]
            for _, alias_module, alias_name in t.aliases:
                # the alias gets its own ParametrizationList holding the owner's slice objects: tied
                # parameters of two modules, which torch.func.functional_call(tie_weights=True) handles
                alias_split = ChannelSplit(names, t.sizes, t.rule.dim, t.rule.chunks)
                parametrize.register_parametrization(alias_module, alias_name, alias_split, unsafe=False)
                done.append((alias_module, alias_name, t.param))
                alias = _plists(alias_module).train(alias_module.training)[alias_name]
                for k in range(len(t.sizes)):
                    setattr(alias, f"original{k}", getattr(owner, f"original{k}"))
    except BaseException:
        _restore(done, orders)
        raise
    return module


def _unparametrize(
    module: nn.Module, values: Mapping[str, nn.Parameter], order: Sequence[str] | None = None
) -> None:
    """Put plain parameters back on ``module``, every one of its parametrizations being listed in ``values``.

    Restores the module's own class instead of calling
    ``parametrize.remove_parametrizations``, which deletes the property from
    the injected class, a class that deep copies of the module share.
    """
    plists = _plists(module)
    for name in values:
        del plists[name]
    if len(plists) == 0:
        del module._modules["parametrizations"]
        module.__class__ = type(module).__bases__[0]
    else:  # pragma: no cover - callers pass every parametrization of the module
        raise RuntimeError(f"{type(module).__name__} keeps parametrizations {list(plists.keys())}")
    for name, value in values.items():
        module.register_parameter(name, value)
    for name in order or ():  # the original registration order (state_dict and optimizer order)
        if name in module._parameters:
            module._parameters[name] = module._parameters.pop(name)


def _restore(done: list[tuple[nn.Module, str, nn.Parameter]], orders: Mapping[int, Sequence[str]]) -> None:
    """Undo a partial :func:`split_channels`: the original parameter objects go back, in their order."""
    by_module: dict[int, tuple[nn.Module, dict[str, nn.Parameter]]] = {}
    for module, name, param in done:
        by_module.setdefault(id(module), (module, {}))[1][name] = param
    for key, (module, values) in by_module.items():
        _unparametrize(module, values, orders.get(key))


def _plists(module: nn.Module) -> nn.ModuleDict:
    """``module.parametrizations``: the ParametrizationList of every parametrized tensor, by name."""
    plists = module._modules.get("parametrizations")
    if not isinstance(plists, nn.ModuleDict):
        raise TypeError(f"{type(module).__name__} has no parametrizations")
    return plists


def _plist_items(module: nn.Module) -> list[tuple[str, parametrize.ParametrizationList]]:
    """(tensor name, ParametrizationList) for every parametrized tensor of ``module``."""
    items = []
    for name, plist in _plists(module).items():
        if not isinstance(plist, parametrize.ParametrizationList):
            raise TypeError(f"{type(module).__name__}.parametrizations[{name!r}] is not a ParametrizationList")
        items.append((name, plist))
    return items


def _splits(module: nn.Module) -> Iterator[tuple[str, nn.Module, str, ChannelSplit]]:
    """(module name, module, tensor name, split) for every split tensor of every module (tied ones repeat)."""
    for module_name, sub in module.named_modules():
        if not parametrize.is_parametrized(sub):
            continue
        for tensor_name, plist in _plist_items(sub):
            first = plist[0]
            if isinstance(first, ChannelSplit):
                yield module_name, sub, tensor_name, first


def task_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The encoder slices each task owns, by task name, in the split's order.

    Names are relative to ``model`` (e.g. ``encoder.0.parametrizations.weight.original1``)
    so they can be passed to ``torch.func.functional_call(model, ...)``. A
    parameter tied between modules appears once, under its first name.

    Raises ``ValueError`` if ``model`` holds no split module, or split modules
    whose task names disagree. This is the core's discovery
    (:func:`cooperative_opt.task_slices`): :class:`ChannelSplit` implements
    its ``TaskSlicing`` protocol.
    """
    return task_slices(model)


def _merge_all(module: nn.Module) -> int:
    """Merge every split tensor of ``module`` in place; returns how many were merged."""
    modules: dict[int, tuple[str, nn.Module]] = {}
    for module_name, sub, _, _ in _splits(module):
        modules.setdefault(id(sub), (module_name, sub))
    for module_name, sub in modules.values():
        others = {
            name: [type(p).__name__ for p in plist]
            for name, plist in _plist_items(sub)
            if len(plist) != 1 or not isinstance(plist[0], ChannelSplit)
        }
        if others:
            raise ValueError(
                f"module {module_name or '<root>'!r} has parametrizations besides the channel split: {others}; "
                "remove them (torch.nn.utils.parametrize.remove_parametrizations) before merging"
            )
    merged: dict[int, nn.Parameter] = {}
    plans: list[tuple[nn.Module, dict[str, nn.Parameter]]] = []
    for _, sub in modules.values():
        values: dict[str, nn.Parameter] = {}
        for name, plist in _plist_items(sub):
            first_slice = getattr(plist, "original0")
            if id(first_slice) not in merged:  # tied parameters share their slices: merged once, tied again
                with torch.no_grad():
                    value = plist()
                    if plist[0].dim == WHOLE:
                        value = value.clone()  # a view of the slice otherwise
                merged[id(first_slice)] = nn.Parameter(value, requires_grad=bool(first_slice.requires_grad))
            values[name] = merged[id(first_slice)]
        plans.append((sub, values))
    for sub, values in plans:
        _unparametrize(sub, values)
    return len(merged)


def merge(module: nn.Module) -> nn.Module:
    """Undo :func:`split_channels` in place: every split tensor becomes one plain parameter again.

    The merged parameter is the concatenation of the current slices, so a
    trained split model becomes the original architecture computing the same
    function; its ``state_dict`` loads into a fresh, never-split model.
    Parameters tied before the split are tied again (one ``nn.Parameter``),
    frozen ones stay frozen. Returns ``module``. Raises ``ValueError`` if
    nothing in ``module`` is split, or if a split module carries other
    parametrizations.

    Example:
        >>> enc = split_channels(nn.Linear(3, 4), ["a", "b"])
        >>> sorted(n for n, _ in merge(enc).named_parameters())
        ['bias', 'weight']
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if _merge_all(module) == 0:
        raise ValueError(f"{type(module).__name__} holds no channel-split parameters; nothing to merge")
    return module
