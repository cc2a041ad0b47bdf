"""What every learner of the benchmarks is built from: a scenario's :class:`Problem`, the run's
:class:`Training` settings, and the :class:`Learner` interface the training loop drives."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.distributed
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "Batch",
    "InnerBatches",
    "Learner",
    "LossFn",
    "OneNetwork",
    "Problem",
    "Training",
    "count_parameters",
    "data_parallel",
    "shared_input",
    "world_size",
]

Batch = tuple[Tensor, Tensor]
"""One task's batch: inputs ``x`` (``[N, C, H, W]`` or ``[N, C, D, H, W]``) and targets ``y`` (int64 labels or
masks, float32 regression targets)."""

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss(prediction, target) -> scalar``."""

InnerBatches = Literal["reuse", "fresh"]
"""Which batches MT-COOL's L inner steps train on: ``"reuse"``, every inner step on the training step's
batch (L times Joint's base steps), or ``"fresh"``, one outer iteration per L training steps, inner step l
on the l-th step's batch (Joint's base steps and batches); :class:`benchmarks._learners.CooperativeLearner`."""


@dataclass(frozen=True)
class Problem:
    """A scenario's networks and losses: everything method-independent.

    Attributes:
        tasks: task names in task order (the MT-COOL update order).
        multi_task: builds a fresh, unsplit hard-shared network (the Joint
            architecture) with ``encoder``, ``heads`` and
            ``head_forward(features, task)``, like :class:`adapters.MultiTaskModel`;
            draws its initialisation from the global torch RNG.
        single_task: builds a fresh network for one task (Independent);
            ``net(x)`` is that task's prediction.
        losses: ``{task: loss(prediction, target)}``.
        networks: optional multi-task architectures by name (``"mtan"``, ``"ctan"``), each
            building a fresh network of the ``architectures`` protocol (``task_names``,
            ``forward(x, task)``, ``forward_all(x)``, ``shared()``, ``task_encoder(task)``,
            ``task_head(task)``); the methods ``mtan``, ``ctan``, ``mtan_mt_cool`` and
            ``ctan_*`` train them. Empty: those methods are refused.

    Example:
        >>> import torch.nn.functional as F
        >>> problem = Problem(("a", "b"), multi_task=lambda: nn.Identity(), single_task=lambda t: nn.Identity(),
        ...                   losses={"a": F.cross_entropy, "b": F.cross_entropy})
        >>> dict(problem.networks)
        {}
    """

    tasks: tuple[str, ...]
    multi_task: Callable[[], nn.Module]
    single_task: Callable[[str], nn.Module]
    losses: Mapping[str, LossFn]
    networks: Mapping[str, Callable[[], nn.Module]] = field(default_factory=dict)


@dataclass(frozen=True)
class Training:
    """Method-independent training settings, shared by every method of one run.

    Attributes:
        optimizer: ``"sgd"`` or ``"adam"``: the base optimizer of every method.
        lr: learning rate (MT-COOL: warm-up and cooperative phase alike).
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 weight decay of the base optimizer.
        bound: MT-COOL noise/clamp bound b.
        noise_bound: MT-COOL noise bound alone (``None``: ``bound``); the clamp keeps ``bound``.
        noise_scale: MT-COOL noise in ``"absolute"`` units (the paper) or ``"relative"`` to each
            slice's root-mean-square value.
        samples: MT-COOL noise samples M.
        noise: MT-COOL noise across ranks under torch.distributed: ``"identical"`` or ``"per_rank"``.
        inner_steps: MT-COOL inner steps L.
        inner_batches: the batches of those L inner steps, ``"reuse"`` or ``"fresh"`` (:data:`InnerBatches`);
            a method with its own (``MethodSpec.inner_batches``) keeps it.
        consistency_weight: MT-COOL lambda, ``None`` for the library default.
        warmup_steps: MT-COOL warm-up steps.
        running_stats: MT-COOL's BatchNorm running-statistics policy. ``"clean"`` (one
            noise-free, gradient-free forward per task and step writes them) so that
            evaluation, which uses clean weights, normalizes with statistics of clean
            weights; the library's default ``"once"`` records them under noise.
        sliced_layers: MT-COOL computes split layers' weight gradients per slice (the library default);
            ``False`` runs them whole, for the speed table's comparison row.
        cagrad_c: CAGrad's radius scale c.
        seed: seeds the initialisation (global RNG) and MT-COOL's noise generator.
        device: torch device string.
    """

    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    bound: float = 0.05
    noise_bound: float | None = None
    noise_scale: Literal["absolute", "relative"] = "absolute"
    samples: int = 1
    noise: Literal["identical", "per_rank"] = "identical"
    inner_steps: int = 1
    inner_batches: InnerBatches = "reuse"
    consistency_weight: float | None = None
    warmup_steps: int = 0
    running_stats: Literal["once", "every_sample", "frozen", "clean"] = "clean"
    sliced_layers: bool = True
    cagrad_c: float = 0.4
    seed: int = 0
    device: str = "cpu"

    def optimizer_class(self) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        """The base optimizer class and its keyword arguments (lr included)."""
        if self.optimizer == "sgd":
            return torch.optim.SGD, {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay}
        if self.optimizer == "adam":
            return torch.optim.Adam, {"lr": self.lr, "weight_decay": self.weight_decay}
        raise ValueError(f"optimizer={self.optimizer!r} is unknown; use 'sgd' or 'adam'")

    def make_optimizer(self, parameters: Any) -> torch.optim.Optimizer:
        """A base optimizer over ``parameters``."""
        cls, kwargs = self.optimizer_class()
        return cls(parameters, **kwargs)


class Learner(Protocol):
    """One method's networks and optimizer: what a training loop needs.

    Attributes:
        num_parameters: trainable parameters over all of the method's networks.
    """

    num_parameters: int

    def train_step(self, batches: Mapping[str, Batch]) -> dict[str, float]:
        """Update on one batch per task; return each task's training loss (NaN if skipped)."""
        ...

    def predict(self, x: Tensor, task: str) -> Tensor:
        """``task``'s prediction for ``x`` (call under ``torch.no_grad`` for evaluation)."""
        ...

    def train(self, mode: bool) -> None:
        """Switch every network between training and evaluation mode."""
        ...

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every optimizer the method steps (for learning-rate schedulers)."""
        ...


class OneNetwork:
    """The :class:`Learner` methods of a learner with one multi-task network ``model`` (``model(x, task)``)
    and one optimizer ``optimizer``; the subclass sets both and ``num_parameters``, and writes ``train_step``."""

    model: nn.Module
    optimizer: torch.optim.Optimizer

    def predict(self, x: Tensor, task: str) -> Tensor:
        prediction: Tensor = self.model(x, task)
        return prediction

    def train(self, mode: bool) -> None:
        self.model.train(mode)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]


def count_parameters(module: nn.Module) -> int:
    """Number of trainable scalar parameters of ``module``.

    Example:
        >>> count_parameters(nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def world_size() -> int:
    """The number of ranks of ``torch.distributed``'s default process group (1 outside ``torch.distributed``)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


def data_parallel(module: nn.Module) -> DistributedDataParallel:
    """``module`` wrapped in ``DistributedDataParallel`` over the default group (CPU or one GPU per rank)."""
    return DistributedDataParallel(module)


def shared_input(batches: Mapping[str, Batch]) -> Tensor | None:
    """The common input when every task's batch holds the very same ``x`` tensor, else ``None``."""
    inputs = [x for x, _ in batches.values()]
    first = inputs[0]
    return first if all(x is first for x in inputs) else None
