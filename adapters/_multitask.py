"""A multi-task model: one channel-split encoder and one private head per task.

``MultiTaskModel(encoder, heads)`` is the shape every adapter returns:
``model(x, task)`` runs the shared encoder and the task's head, the encoder's
parameters are split between the tasks (:func:`adapters.split_channels`) and
each head is owned by its task, so the model plugs straight into
``cooperative_opt.CooperativeOptimizer``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from adapters._split import SmallPolicy, _merge_all, split_channels

if TYPE_CHECKING:
    from cooperative_opt import ConsistencySpec, Task

__all__ = ["MultiTaskModel", "TaskModel", "export", "make_tasks", "multitask"]


def _validate_heads(heads: Mapping[str, nn.Module], owner: str) -> dict[str, nn.Module]:
    if not isinstance(heads, Mapping):
        raise TypeError(f"{owner}: heads must map task names to nn.Module heads, got {type(heads).__name__}")
    bad = {k: type(v).__name__ for k, v in heads.items() if not isinstance(v, nn.Module)}
    if bad:
        raise TypeError(f"{owner}: heads must be nn.Module instances, got {bad}")
    for name in heads:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"{owner}: task names must be non-empty strings without '.', got {name!r}")
    return dict(heads)


def _validate_feeds(feeds: Mapping[str, str] | None, tasks: Sequence[str]) -> dict[str, str]:
    if feeds is None:
        return {}
    if not isinstance(feeds, Mapping):
        raise TypeError(f"feeds must map a task to the task whose output it also reads, got {feeds!r}")
    result = dict(feeds)
    for task, source in result.items():
        if task not in tasks or source not in tasks:
            raise ValueError(f"feeds {{{task!r}: {source!r}}} names a task that is not one of {list(tasks)}")
        if task == source:
            raise ValueError(f"feeds: task {task!r} cannot read its own output")
        if source in result:
            raise ValueError(
                f"feeds: task {task!r} reads {source!r}, which itself reads {result[source]!r}; "
                "a head may read the output of a task that reads none"
            )
    return result


def _check_private(encoder: nn.Module, heads: Mapping[str, nn.Module]) -> None:
    """Every parameter must sit in the encoder or in exactly one head."""
    where: dict[int, list[str]] = {}
    for n, p in encoder.named_parameters():
        where.setdefault(id(p), []).append(f"encoder.{n}")
    for task, head in heads.items():
        for n, p in head.named_parameters():
            where.setdefault(id(p), []).append(f"heads.{task}.{n}")
    shared = [names for names in where.values() if len(names) > 1]
    if shared:
        raise ValueError(
            f"parameters shared between the encoder and heads or between heads: {shared}; each head must be "
            "private to its task and hold no encoder parameter (give each task its own head module)"
        )


class MultiTaskModel(nn.Module):
    """A shared encoder and one head per task; ``forward(x, task)`` is task's prediction.

    The encoder is not split by the constructor; :func:`multitask` and the
    family adapters (:mod:`adapters.timm`, :mod:`adapters.smp`,
    :mod:`adapters.monai`) build split ones. The plain class is also the
    unsplit "Joint" baseline of the same architecture.

    Args:
        encoder: called as ``encoder(x)``; its output (a tensor, or a list of
            multi-scale features) is what every head receives.
        heads: ``{task: head}``, called as ``head(features)``; the order is the task order.
        feeds: ``{task: source}``: ``task``'s head is called as
            ``head(features, source_output)`` with the prediction of task
            ``source`` (e.g. a classification head that also reads the
            segmentation, as in the paper's REFUGE set-up).

    Example:
        >>> net = MultiTaskModel(nn.Linear(4, 8), {"a": nn.Linear(8, 2), "b": nn.Linear(8, 3)})
        >>> import torch
        >>> net(torch.zeros(5, 4), "b").shape
        torch.Size([5, 3])
    """

    def __init__(
        self, encoder: nn.Module, heads: Mapping[str, nn.Module], *, feeds: Mapping[str, str] | None = None
    ) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
        checked = _validate_heads(heads, "MultiTaskModel")
        if not checked:
            raise ValueError("MultiTaskModel needs at least one head")
        _check_private(encoder, checked)
        self.encoder = encoder
        self.heads = nn.ModuleDict(checked)
        self.feeds = _validate_feeds(feeds, list(checked))
        # the containers follow the encoder; the user's modules keep their own flags
        self.training = self.heads.training = encoder.training

    @property
    def task_names(self) -> tuple[str, ...]:
        """The tasks, in order."""
        return tuple(self.heads.keys())

    def _check_task(self, task: str) -> None:
        if task not in self.heads:
            raise ValueError(f"unknown task {task!r}; this model's tasks are {list(self.heads.keys())}")

    def head_forward(self, features: Any, task: str) -> Any:
        """Task ``task``'s prediction from encoder features (runs the source head of a fed task too)."""
        self._check_task(task)
        source = self.feeds.get(task)
        if source is None:
            return self.heads[task](features)
        return self.heads[task](features, self.heads[source](features))

    def forward(self, x: Any, task: str) -> Any:
        """Task ``task``'s prediction for input ``x``."""
        self._check_task(task)
        return self.head_forward(self.encoder(x), task)

    def forward_tasks(self, x: Any, tasks: Sequence[str] | None = None) -> dict[str, Any]:
        """Every task's prediction (or those in ``tasks``) from one encoder pass, for a shared input."""
        wanted = list(self.task_names if tasks is None else tasks)
        for task in wanted:
            self._check_task(task)
        features = self.encoder(x)
        outputs: dict[str, Any] = {}

        def run(task: str) -> Any:
            if task not in outputs:
                source = self.feeds.get(task)
                head = self.heads[task]
                outputs[task] = head(features) if source is None else head(features, run(source))
            return outputs[task]

        for task in wanted:
            run(task)
        return {task: outputs[task] for task in wanted}

    def export(self, task: str) -> nn.Module:
        """A standalone copy of task ``task``'s network with plain (merged) parameters.

        The plain model returns a :class:`TaskModel` (encoder then head); the
        family adapters return their library's own architecture.
        """
        self._check_task(task)
        encoder = copy.deepcopy(self.encoder)
        _merge_all(encoder)
        source = self.feeds.get(task)
        return TaskModel(
            encoder,
            copy.deepcopy(self.heads[task]),
            None if source is None else copy.deepcopy(self.heads[source]),
        ).train(self.training)


class TaskModel(nn.Module):
    """One task's network exported from a :class:`MultiTaskModel`: ``head(encoder(x))``.

    With a ``source`` head (a fed task) it computes ``head(f, source(f))`` with ``f = encoder(x)``.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, source: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.source = source

    def forward(self, x: Any) -> Any:
        features = self.encoder(x)
        if self.source is None:
            return self.head(features)
        return self.head(features, self.source(features))


def multitask(
    encoder: nn.Module,
    heads: Mapping[str, nn.Module],
    *,
    feeds: Mapping[str, str] | None = None,
    dims: Mapping[str, int] | None = None,
    small: SmallPolicy = "split",
) -> MultiTaskModel:
    """A cooperative multi-task model from a plain encoder and the user's heads.

    The encoder is channel-split in place between the tasks named by
    ``heads`` (in their order); the heads are used as given and stay private
    to their task. Everything is validated before the encoder is changed.

    Args:
        encoder: any ``nn.Module``; split in place (see :func:`adapters.split_channels`).
        heads: ``{task: head}``, two or more; ``head(encoder(x))`` is the task's prediction.
        feeds: ``{task: source}`` heads that also read another task's prediction.
        dims: rule overrides for :func:`adapters.split_channels`.
        small: policy for parameters with fewer channels than tasks.

    Example:
        >>> import torch
        >>> enc = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU())
        >>> net = multitask(enc, {"even": nn.Linear(32, 5), "odd": nn.Linear(32, 5)})
        >>> net(torch.zeros(2, 4, 4), "odd").shape
        torch.Size([2, 5])
    """
    checked = _validate_heads(heads, "multitask")
    if len(checked) < 2:
        raise ValueError(f"multitask needs heads for at least two tasks, got {list(checked)}")
    model = MultiTaskModel(encoder, checked, feeds=feeds)
    split_channels(encoder, list(checked), dims=dims, small=small)
    return model


def export(model: MultiTaskModel, task: str) -> nn.Module:
    """Task ``task``'s network as a standalone model with plain parameters (``model.export(task)``).

    For a model from :mod:`adapters.timm`, :mod:`adapters.smp` or
    :mod:`adapters.monai` it is the library's own architecture: its
    ``state_dict`` loads into a freshly built, never-split model of that
    family with the task's class count, which then computes the same outputs.
    ``model`` itself is left unchanged.
    """
    if not isinstance(model, MultiTaskModel):
        raise TypeError(f"model must be an adapters.MultiTaskModel, got {type(model).__name__}")
    return model.export(task)


@dataclass(frozen=True)
class _TargetLoss:
    """``Task.loss`` of :func:`make_tasks`: ``fn(output, y)`` for ``batch = (x, y)``; a class so tasks pickle."""

    fn: Callable[[Any, Any], Tensor]

    def __call__(self, output: Any, batch: Any) -> Tensor:
        return self.fn(output, batch[1])


@dataclass(frozen=True)
class _TaskInputs:
    """``Task.inputs`` of :func:`make_tasks`: the model is called as ``model(x, task)`` for ``batch = (x, y)``."""

    task: str

    def __call__(self, batch: Any) -> tuple[Any, str]:
        return (batch[0], self.task)


def make_tasks(
    model: nn.Module,
    losses: Mapping[str, Callable[[Any, Any], Tensor]],
    *,
    consistency: ConsistencySpec | Mapping[str, ConsistencySpec] = "auto",
    heads: Mapping[str, nn.Module] | None = None,
) -> list[Task]:
    """The ``cooperative_opt.Task`` list for ``model``, one per task, in the model's order.

    Batches are ``(x, y)`` pairs: task ``t`` runs ``model(x, t)`` and its
    loss is ``losses[t](output, y)``; its head is ``model.heads[t]``.

    Args:
        model: a :class:`MultiTaskModel`, or any module called as ``model(x, task)``
            when ``heads`` is given.
        losses: ``{task: loss(output, target) -> scalar}`` for every task.
        consistency: one consistency spec for all tasks, or one per task.
        heads: ``{task: private module}`` in task order, for a model that is not a
            :class:`MultiTaskModel` (e.g. the networks of :mod:`architectures`);
            ``None`` reads ``model.heads``.

    Example:
        >>> import torch.nn.functional as F
        >>> net = multitask(nn.Linear(4, 8), {"a": nn.Linear(8, 2), "b": nn.Linear(8, 2)})
        >>> [t.name for t in make_tasks(net, {"a": F.cross_entropy, "b": F.cross_entropy})]
        ['a', 'b']
    """
    from cooperative_opt import Task

    if heads is None:
        if not isinstance(model, MultiTaskModel):
            raise TypeError(
                f"model must be an adapters.MultiTaskModel, got {type(model).__name__}; for another model pass "
                "heads={task: module}"
            )
        heads = dict(model.heads.items())
    elif not isinstance(model, nn.Module) or not isinstance(heads, Mapping) or not heads:
        raise TypeError(
            f"with heads=, model must be an nn.Module and heads a non-empty mapping {{task: module}}, got "
            f"{type(model).__name__} and {type(heads).__name__}"
        )
    names = list(heads)
    if not isinstance(losses, Mapping) or sorted(losses) != sorted(names):
        given = sorted(losses) if isinstance(losses, Mapping) else type(losses).__name__
        raise ValueError(f"losses must give one loss per task {names}, got {given}")
    not_callable = [n for n in names if not callable(losses[n])]
    if not_callable:
        raise TypeError(f"losses of tasks {not_callable} are not callable as loss(output, target)")
    per_task: dict[str, ConsistencySpec]
    if isinstance(consistency, Mapping):
        missing = [n for n in names if n not in consistency]
        if missing:
            raise ValueError(f"consistency has no entry for tasks {missing}")
        per_task = {n: consistency[n] for n in names}
    else:
        per_task = {n: consistency for n in names}

    return [
        Task(name, loss=_TargetLoss(losses[name]), head=heads[name], inputs=_TaskInputs(name),
             consistency=per_task[name])
        for name in names
    ]
