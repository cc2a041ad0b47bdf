"""The base optimizer a ``CooperativeOptimizer`` wraps: built from a class or checked if given as an instance."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch import nn

from cooperative_opt._ownership import TaskParameters

__all__ = ["OptimizerSpec", "build_base"]

#: A torch optimizer instance over the model's parameters, or a class / factory
#: called as ``optimizer(param_groups, **optimizer_kwargs)``.
OptimizerSpec = Union[torch.optim.Optimizer, Callable[..., torch.optim.Optimizer], None]


def build_base(
    model: nn.Module, task_params: Sequence[TaskParameters], optimizer: OptimizerSpec, kwargs: dict[str, Any]
) -> torch.optim.Optimizer:
    """The base optimizer: ``optimizer`` itself if it is an instance over exactly the owned parameters,
    else ``optimizer(param_groups, **kwargs)`` with one group per task (key ``"task"``); ``None`` is SGD, lr 0.1."""
    names = {id(p): n for n, p in model.named_parameters()}
    owned = [p for tp in task_params for p in tp.own]
    if isinstance(optimizer, torch.optim.Optimizer):
        if kwargs:
            raise TypeError(
                f"optimizer is already an instance; the keyword arguments {sorted(kwargs)} would be ignored. "
                "Set them on the instance, or pass the optimizer class instead"
            )
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [names.get(id(p), "<head parameter>") for p in owned if id(p) not in in_opt]
        if missing:
            raise ValueError(
                f"the optimizer instance does not hold these task parameters: {missing}; build it over "
                "model.parameters() after adapters.split_channels (splitting replaces the parameters)"
            )
        extra = sorted(in_opt - {id(p) for p in owned})
        if extra:
            found = [names.get(i, "<not in model>") for i in extra]
            raise ValueError(
                f"the optimizer instance holds parameters no task owns: {found}; freeze them or give them to a task"
            )
        return optimizer
    if optimizer is None:
        optimizer = torch.optim.SGD
        kwargs = {"lr": 0.1, **kwargs}
    if not callable(optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer instance, an optimizer class, or None; got {optimizer!r}"
        )
    groups = [{"params": list(tp.own), "task": tp.name} for tp in task_params]
    base = optimizer(groups, **kwargs)
    if not isinstance(base, torch.optim.Optimizer):
        raise TypeError(f"optimizer(param_groups, **kwargs) must return a torch.optim.Optimizer, got {base!r}")
    return base
