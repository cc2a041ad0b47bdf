"""Joint training: one multi-task network, one base optimizer, loss = sum of the task losses.

Two kinds of network train this way:

- the hard-shared network of ``Problem.multi_task`` (``joint``, HPS): ``encoder``, ``heads``
  and ``head_forward(features, task)``, like :class:`adapters.MultiTaskModel`;
- a multi-task architecture of ``Problem.networks`` (``mtan``, ``ctan``): the
  ``architectures`` protocol, ``forward(x, task)`` and ``forward_all(x)``.

When every task's ``x`` is the same tensor object (segmentation and
classification of one image) the encoder (or the architecture) runs once for all tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from benchmarks._learners._problem import (
    Batch,
    LossFn,
    OneNetwork,
    Problem,
    Training,
    count_parameters,
    data_parallel,
    shared_input,
    world_size,
)

__all__ = [
    "JointLearner",
    "build_network",
    "check_hard_shared",
    "encoder_of",
    "forward_all",
    "head_forward",
    "heads_of",
    "shared_outputs",
]

_PROTOCOL = ("task_names", "forward_all", "shared", "task_encoder", "task_head")


def check_hard_shared(model: nn.Module) -> nn.Module:
    """Check that ``Problem.multi_task`` built a network the Joint-family methods can drive.

    It needs ``encoder`` (a module: ``encoder(x)`` gives the shared features, a
    tensor or a list of tensors), ``heads`` (an ``nn.ModuleDict`` of private
    task modules), ``head_forward(features, task)`` (the task's prediction from
    the features) and ``model(x, task)`` (the two composed).
    :class:`adapters.MultiTaskModel` and :class:`benchmarks._models.LeNetMultiTask` fit.

    Raises:
        TypeError: naming what is missing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Problem.multi_task must build an nn.Module, got {type(model).__name__}")
    missing = [
        name
        for name, ok in (
            ("encoder", isinstance(getattr(model, "encoder", None), nn.Module)),
            ("heads", isinstance(getattr(model, "heads", None), nn.ModuleDict)),
            ("head_forward", callable(getattr(model, "head_forward", None))),
        )
        if not ok
    ]
    if missing:
        raise TypeError(
            f"Problem.multi_task built a {type(model).__name__} without {missing}; give it an encoder module, "
            f"a heads ModuleDict and head_forward(features, task) (see adapters.MultiTaskModel)"
        )
    return model


def build_network(problem: Problem, name: str) -> nn.Module:
    """A fresh ``Problem.networks[name]`` network, checked against the ``architectures`` protocol.

    Raises:
        ValueError: when the problem has no network ``name``.
        TypeError: when the network lacks part of the protocol.
    """
    if name not in problem.networks:
        raise ValueError(
            f"Problem.networks has no {name!r} network (it has {sorted(problem.networks)}); add a builder "
            f"networks={{{name!r}: ...}} to the scenario's Problem"
        )
    net = problem.networks[name]()
    if not isinstance(net, nn.Module):
        raise TypeError(f"Problem.networks[{name!r}] must build an nn.Module, got {type(net).__name__}")
    missing = [attr for attr in _PROTOCOL if not hasattr(net, attr)]
    if missing:
        raise TypeError(
            f"Problem.networks[{name!r}] built a {type(net).__name__} without {missing}; networks must follow the "
            "architectures.MultiTaskNetwork protocol (task_names, forward(x, task), forward_all(x), shared(), "
            "task_encoder(task), task_head(task))"
        )
    names = tuple(getattr(net, "task_names"))
    if sorted(names) != sorted(problem.tasks):
        raise ValueError(
            f"Problem.networks[{name!r}] built a network for tasks {list(names)}, the problem's tasks are "
            f"{list(problem.tasks)}; build it with the same task names"
        )
    return net


def encoder_of(model: nn.Module) -> nn.Module:
    """The hard-shared network's encoder."""
    encoder: nn.Module = getattr(model, "encoder")
    return encoder


def heads_of(model: nn.Module) -> nn.ModuleDict:
    """The hard-shared network's task heads."""
    heads: nn.ModuleDict = getattr(model, "heads")
    return heads


def head_forward(model: nn.Module, features: Any, task: str) -> Tensor:
    """``task``'s prediction from the hard-shared network's encoder features."""
    prediction: Tensor = getattr(model, "head_forward")(features, task)
    return prediction


def forward_all(model: nn.Module, batches: Mapping[str, Batch]) -> tuple[list[Any], dict[str, Tensor]]:
    """Encoder features of the hard-shared network (one entry per encoder pass) and each task's prediction."""
    encoder = encoder_of(model)
    shared = shared_input(batches)
    if shared is not None:
        features = encoder(shared)
        return [features], shared_outputs(model, features, list(batches))
    passes: list[Any] = []
    outputs: dict[str, Tensor] = {}
    for task, (x, _) in batches.items():
        features = encoder(x)
        passes.append(features)
        outputs[task] = head_forward(model, features, task)
    return passes, outputs


def shared_outputs(model: nn.Module, features: Any, tasks: Sequence[str]) -> dict[str, Tensor]:
    """Every task's prediction from one encoder pass; a head fed by another task's prediction
    (``model.feeds``, as in :class:`adapters.MultiTaskModel`) reuses it instead of recomputing it."""
    feeds: Mapping[str, str] = getattr(model, "feeds", {})
    heads = heads_of(model)
    outputs: dict[str, Tensor] = {}

    def run(task: str) -> Tensor:
        if task not in outputs:
            source = feeds.get(task)
            if source is None:
                outputs[task] = head_forward(model, features, task)
            else:
                outputs[task] = heads[task](features, run(source))
        return outputs[task]

    return {task: run(task) for task in tasks}


class _JointLosses(nn.Module):
    """Every task's loss on the hard-shared network as one module call, so ``DistributedDataParallel``
    sees one forward (and one backward of their sum) per step, whatever the number of encoder passes."""

    def __init__(self, model: nn.Module, losses: Mapping[str, LossFn]) -> None:
        super().__init__()
        self.model = model
        self.losses = dict(losses)

    def forward(self, batches: Mapping[str, Batch]) -> dict[str, Tensor]:
        _, outputs = forward_all(self.model, batches)
        return {task: self.losses[task](outputs[task], y) for task, (_, y) in batches.items()}


class _NetworkLosses(nn.Module):
    """Every task's loss on an ``architectures`` network: one ``forward_all(x)`` when the tasks share
    their input, else ``forward(x, task)`` per task."""

    def __init__(self, model: nn.Module, losses: Mapping[str, LossFn]) -> None:
        super().__init__()
        self.model = model
        self.losses = dict(losses)

    def forward(self, batches: Mapping[str, Batch]) -> dict[str, Tensor]:
        x = shared_input(batches)
        if x is not None:
            outputs: Mapping[str, Tensor] = getattr(self.model, "forward_all")(x)
        else:
            outputs = {task: self.model(inputs, task) for task, (inputs, _) in batches.items()}
        return {task: self.losses[task](outputs[task], y) for task, (_, y) in batches.items()}


class JointLearner(OneNetwork):
    """Joint: one multi-task network, one optimizer, loss = sum of the task losses.

    Args:
        problem: the scenario's networks and losses.
        training: the run's settings.
        network: ``None`` for the hard-shared ``Problem.multi_task`` network (``joint``),
            else the ``Problem.networks`` key of the architecture to train (``"mtan"``, ``"ctan"``).
    """

    def __init__(self, problem: Problem, training: Training, network: str | None = None) -> None:
        self.losses = problem.losses
        losses: nn.Module
        if network is None:
            self.model = check_hard_shared(problem.multi_task()).to(training.device)
            losses = _JointLosses(self.model, self.losses)
        else:
            self.model = build_network(problem, network).to(training.device)
            losses = _NetworkLosses(self.model, self.losses)
        self.optimizer = training.make_optimizer(self.model.parameters())
        self.num_parameters = count_parameters(self.model)
        self.ddp: DistributedDataParallel | None = None
        """Under ``torch.distributed``: the ``DistributedDataParallel`` wrapper every training forward goes through."""
        self.forward_losses: nn.Module = losses
        if world_size() > 1:
            self.ddp = self.forward_losses = data_parallel(losses)

    def train_step(self, batches: Mapping[str, Batch]) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        losses: dict[str, Tensor] = self.forward_losses(batches)
        torch.stack(list(losses.values())).sum().backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        return {task: loss.item() for task, loss in losses.items()}
