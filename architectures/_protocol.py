"""The interface every network of :mod:`architectures` has, and the one way from a network to MT-COOL."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

import adapters
from cooperative_opt import ConsistencySpec, Task, task_slices

__all__ = ["MultiTaskNetwork", "cooperative"]


@runtime_checkable
class MultiTaskNetwork(Protocol):
    """A multi-task network whose parameters are partitioned by who reads them.

    Every parameter belongs to exactly one of :meth:`shared`, some
    :meth:`task_encoder` or some :meth:`task_head`:

    - ``shared()``: what every task reads (the HPS encoder; MTAN's shared
      encoder and decoder). MT-COOL channel-splits it between the tasks.
      ``None`` for CTAN.
    - ``task_encoder(t)``: task ``t``'s own parameters that other tasks read
      too (CTAN: ``t``'s stream and its cross-task attention). MT-COOL
      perturbs them during the other tasks' updates. ``None`` for HPS and MTAN.
    - ``task_head(t)``: what only task ``t`` reads (decoder, classifier; MTAN:
      its attention modules too).
    """

    @property
    def task_names(self) -> tuple[str, ...]:
        """The tasks, in order."""
        ...

    def forward(self, x: Tensor, task: str) -> Tensor:
        """Task ``task``'s prediction for ``x``."""
        ...

    def forward_all(self, x: Tensor) -> dict[str, Tensor]:
        """Every task's prediction from one pass."""
        ...

    def shared(self) -> nn.Module | None:
        """The parameters every task reads, or ``None``."""
        ...

    def task_encoder(self, task: str) -> nn.Module | None:
        """Task ``task``'s parameters that other tasks read too, or ``None``."""
        ...

    def task_head(self, task: str) -> nn.Module:
        """Task ``task``'s private parameters."""
        ...


def _already_split(module: nn.Module, names: tuple[str, ...]) -> bool:
    try:
        found = task_slices(module)
    except ValueError:  # nothing split yet
        return False
    if tuple(found) != names:
        raise ValueError(
            f"net.shared() is already split between tasks {list(found)}, not the network's {list(names)}; "
            "call adapters.merge(net.shared()) first"
        )
    return True


def cooperative(
    net: MultiTaskNetwork,
    losses: Mapping[str, Callable[[Tensor, Any], Tensor]],
    *,
    consistency: ConsistencySpec | Mapping[str, ConsistencySpec] = "auto",
) -> tuple[list[Task], dict[str, list[tuple[str, nn.Parameter]]] | None]:
    """The ``cooperative_opt.Task`` list for ``net`` and the ``task_parameters=`` of ``CooperativeOptimizer``.

    When ``net.shared()`` is not ``None`` it is channel-split between the
    tasks in place (:func:`adapters.split_channels`; function-preserving,
    skipped when already split) and the mapping is ``None``: the optimizer
    finds the slices itself. Otherwise the mapping gives each task the
    parameters of ``net.task_encoder(t)``, named relative to ``net``.
    Batches are ``(x, y)``: task ``t`` computes ``losses[t](net(x, t), y)``;
    its head is ``net.task_head(t)``. Everything is validated before ``net``
    is changed.

    Args:
        net: a network of :mod:`architectures` (an ``nn.Module`` with two or more tasks).
        losses: ``{task: loss(prediction, target) -> scalar}`` for every task.
        consistency: one consistency spec for all tasks, or one per task
            (see ``cooperative_opt.Task``).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from cooperative_opt import CooperativeOptimizer
        >>> from architectures import Backbone, ImageTask, ctan
        >>> net = ctan({"a": ImageTask(2), "b": ImageTask(3)}, Backbone(2, 1, (4, 8)))
        >>> tasks, owned = cooperative(net, {"a": F.cross_entropy, "b": F.cross_entropy})
        >>> opt = CooperativeOptimizer(net, tasks, torch.optim.SGD, task_parameters=owned, lr=0.1,
        ...                            consistency_reference="clean")
        >>> sorted(opt.step({"a": (torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))}).losses)
        ['a']
    """
    if not isinstance(net, nn.Module) or not isinstance(net, MultiTaskNetwork):
        raise TypeError(
            f"net must be a network of architectures (an nn.Module with task_names, shared, task_encoder and "
            f"task_head), got {type(net).__name__}"
        )
    names = tuple(net.task_names)
    if len(names) < 2:
        raise ValueError(
            f"net has the single task {list(names)}; MT-COOL needs two or more tasks (train a single-task network "
            "with a plain torch optimizer)"
        )
    # losses and consistency are validated here, before the network is split
    tasks = adapters.make_tasks(net, losses, consistency=consistency, heads={t: net.task_head(t) for t in names})

    shared = net.shared()
    owned: dict[str, list[tuple[str, nn.Parameter]]] | None = None
    if shared is None:
        named = {id(p): n for n, p in net.named_parameters()}
        owned = {}
        for t in names:
            encoder = net.task_encoder(t)
            if encoder is None:
                raise ValueError(
                    f"net.shared() and net.task_encoder({t!r}) are both None; a MultiTaskNetwork puts the "
                    "parameters other tasks read in one of them"
                )
            owned[t] = [(named[id(p)], p) for p in encoder.parameters()]
    elif not _already_split(shared, names):
        adapters.split_channels(shared, list(names))

    return tasks, owned
