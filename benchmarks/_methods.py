"""One runner for every method the benchmarks compare (docs/method.md, "Ablations"; docs/results.md).

Every scenario describes its networks and losses once, as a :class:`Problem`;
:func:`build_learner` turns a method name into a :class:`Learner` with the
same interface for all of them:

- ``independent``: one network per task (``Problem.single_task``), each with its own optimizer.
- ``joint``: the hard-shared network (``Problem.multi_task``), loss = sum of task losses.
- ``pcgrad``, ``mgda``, ``cagrad``, ``graddrop``: the same Joint network; the task
  heads get their own gradients and the shared encoder's per-task Jacobian
  (``torchjd.autojac.backward``) is combined by ``torchjd``'s aggregator
  (``jac_to_grad``), not re-derived here. Needs ``pip install 'torchjd[cagrad]'``
  (``cagrad`` solves a small cone program with cvxpy).
- ``vanilla``, ``without_reg``, ``mt_cool``, ``mt_cool_clean``: the same network
  with its encoder channel-split (:func:`adapters.split_channels`) and trained by
  :class:`cooperative_opt.CooperativeOptimizer` (the paper's three ablations;
  ``mt_cool_clean`` uses ``consistency_reference="clean"``).

Batches are ``{task: (x, y)}``. When every task's ``x`` is the same tensor
object (segmentation and classification of one image) the Joint-family
methods run the encoder once for all tasks.

Under ``torch.distributed`` (a default process group of more than one rank,
e.g. under ``torchrun``), each rank passes its own shard of the batch:
``independent`` and ``joint`` train through
``torch.nn.parallel.DistributedDataParallel`` and the cooperative methods
through ``CooperativeOptimizer``, which averages each stepping task's
gradients itself (:data:`DISTRIBUTED_METHODS`); the gradient-manipulation
methods are refused, since an all-reduce of one gradient cannot average
their per-task Jacobians.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

import torch
import torch.distributed
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "COOPERATIVE_METHODS",
    "DISTRIBUTED_METHODS",
    "GRADIENT_METHODS",
    "METHODS",
    "Batch",
    "Learner",
    "Problem",
    "Training",
    "build_learner",
    "check_distributed_methods",
    "check_methods_available",
    "count_parameters",
    "world_size",
]

METHODS: Final[tuple[str, ...]] = (
    "independent",
    "joint",
    "pcgrad",
    "mgda",
    "cagrad",
    "graddrop",
    "vanilla",
    "without_reg",
    "mt_cool",
    "mt_cool_clean",
)
"""Every method, in the order the benchmarks run and report them (the paper's table order)."""

GRADIENT_METHODS: Final[tuple[str, ...]] = ("pcgrad", "mgda", "cagrad", "graddrop")
"""Gradient-manipulation methods on the Joint network, through ``torchjd`` aggregators."""

_Variant = Literal["vanilla", "without_reg", "mt_cool"]
_Reference = Literal["mean", "clean"]

COOPERATIVE_METHODS: Final[Mapping[str, tuple[_Variant, _Reference]]] = {
    "vanilla": ("vanilla", "mean"),
    "without_reg": ("without_reg", "mean"),
    "mt_cool": ("mt_cool", "mean"),
    "mt_cool_clean": ("mt_cool", "clean"),
}
"""Methods trained with ``CooperativeOptimizer``: method -> (``variant``, ``consistency_reference``)."""

DISTRIBUTED_METHODS: Final[tuple[str, ...]] = tuple(m for m in METHODS if m not in GRADIENT_METHODS)
"""Methods that train under ``torch.distributed``: ``independent`` and ``joint`` through
``DistributedDataParallel``, the cooperative methods through ``CooperativeOptimizer``."""

Batch = tuple[Tensor, Tensor]
"""One task's batch: inputs ``x`` and targets ``y``."""

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss(prediction, target) -> scalar``."""


def _check_network(model: nn.Module) -> nn.Module:
    """Check that ``Problem.multi_task`` built a network the Joint-family methods can drive.

    It needs ``encoder`` (a module: ``encoder(x)`` gives the shared features, a
    tensor or a list of tensors), ``heads`` (an ``nn.ModuleDict`` of private
    task modules), ``head_forward(features, task)`` (the task's prediction from
    the features) and ``model(x, task)`` (the two composed).
    :class:`adapters.MultiTaskModel` and :class:`benchmarks._models.LeNetMultiTask` fit.
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


def _encoder(model: nn.Module) -> nn.Module:
    encoder: nn.Module = getattr(model, "encoder")
    return encoder


def _head_forward(model: nn.Module, features: Any, task: str) -> Tensor:
    prediction: Tensor = getattr(model, "head_forward")(features, task)
    return prediction


def _heads(model: nn.Module) -> nn.ModuleDict:
    heads: nn.ModuleDict = getattr(model, "heads")
    return heads


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
    """

    tasks: tuple[str, ...]
    multi_task: Callable[[], nn.Module]
    single_task: Callable[[str], nn.Module]
    losses: Mapping[str, LossFn]


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
        consistency_weight: MT-COOL lambda, ``None`` for the library default.
        warmup_steps: MT-COOL warm-up steps.
        running_stats: MT-COOL's BatchNorm running-statistics policy. ``"clean"`` (one
            noise-free, gradient-free forward per task and step writes them) so that
            evaluation, which uses clean weights, normalizes with statistics of clean
            weights; the library's default ``"once"`` records them under noise.
        sliced_layers: MT-COOL evaluates split layers slice by slice (the library default);
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


def world_size() -> int:
    """The number of ranks of ``torch.distributed``'s default process group (1 outside ``torch.distributed``)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


def check_distributed_methods(methods: Sequence[str]) -> None:
    """Refuse the methods that cannot train under ``torch.distributed``, naming the ones that can.

    Raises:
        ValueError: if ``methods`` holds a method outside :data:`DISTRIBUTED_METHODS`.
    """
    refused = [m for m in methods if m not in DISTRIBUTED_METHODS]
    if refused:
        raise ValueError(
            f"--distributed: methods {refused} cannot train on several ranks (their per-task Jacobians are not "
            f"averaged by an all-reduce); choose --methods from {','.join(DISTRIBUTED_METHODS)}"
        )


def _data_parallel(module: nn.Module) -> DistributedDataParallel:
    """``module`` wrapped in ``DistributedDataParallel`` over the default group (CPU or one GPU per rank)."""
    return DistributedDataParallel(module)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable scalar parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _shared_input(batches: Mapping[str, Batch]) -> Tensor | None:
    """The common input when every task's batch holds the very same ``x`` tensor, else ``None``."""
    inputs = [x for x, _ in batches.values()]
    first = inputs[0]
    return first if all(x is first for x in inputs) else None


def _forward_all(model: nn.Module, batches: Mapping[str, Batch]) -> tuple[list[Any], dict[str, Tensor]]:
    """Encoder features (one entry per encoder pass) and each task's prediction."""
    encoder = _encoder(model)
    shared = _shared_input(batches)
    if shared is not None:
        features = encoder(shared)
        return [features], _shared_outputs(model, features, list(batches))
    passes: list[Any] = []
    outputs: dict[str, Tensor] = {}
    for task, (x, _) in batches.items():
        features = encoder(x)
        passes.append(features)
        outputs[task] = _head_forward(model, features, task)
    return passes, outputs


def _shared_outputs(model: nn.Module, features: Any, tasks: Sequence[str]) -> dict[str, Tensor]:
    """Every task's prediction from one encoder pass; a head fed by another task's prediction
    (``model.feeds``, as in :class:`adapters.MultiTaskModel`) reuses it instead of recomputing it."""
    feeds: Mapping[str, str] = getattr(model, "feeds", {})
    heads = _heads(model)
    outputs: dict[str, Tensor] = {}

    def run(task: str) -> Tensor:
        if task not in outputs:
            source = feeds.get(task)
            if source is None:
                outputs[task] = _head_forward(model, features, task)
            else:
                outputs[task] = heads[task](features, run(source))
        return outputs[task]

    return {task: run(task) for task in tasks}


class IndependentLearner:
    """Independent: one ``Problem.single_task`` network and one optimizer per task."""

    def __init__(self, problem: Problem, training: Training) -> None:
        self.losses = problem.losses
        self.models = {task: problem.single_task(task).to(training.device) for task in problem.tasks}
        self.optimizers_by_task = {task: training.make_optimizer(m.parameters()) for task, m in self.models.items()}
        self.num_parameters = sum(count_parameters(m) for m in self.models.values())
        # Under torch.distributed the training forwards go through DistributedDataParallel (predict does not).
        distributed = world_size() > 1
        self.forwards: dict[str, nn.Module] = {
            task: _data_parallel(m) if distributed else m for task, m in self.models.items()
        }

    def train_step(self, batches: Mapping[str, Batch]) -> dict[str, float]:
        losses: dict[str, float] = {}
        for task, (x, y) in batches.items():
            optimizer = self.optimizers_by_task[task]
            optimizer.zero_grad(set_to_none=True)
            loss = self.losses[task](self.forwards[task](x), y)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            losses[task] = loss.item()
        return losses

    def predict(self, x: Tensor, task: str) -> Tensor:
        prediction: Tensor = self.models[task](x)
        return prediction

    def train(self, mode: bool) -> None:
        for model in self.models.values():
            model.train(mode)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self.optimizers_by_task.values())


class JointLearner:
    """Joint: the hard-shared network, one optimizer, loss = sum of the task losses."""

    def __init__(self, problem: Problem, training: Training) -> None:
        self.losses = problem.losses
        self.model = _check_network(problem.multi_task()).to(training.device)
        self.optimizer = training.make_optimizer(self.model.parameters())
        self.num_parameters = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.ddp: DistributedDataParallel | None = None
        """Under ``torch.distributed``: the ``DistributedDataParallel`` wrapper every training forward goes through."""
        self.forward_losses: nn.Module = _JointLosses(self.model, self.losses)
        if world_size() > 1:
            self.ddp = self.forward_losses = _data_parallel(self.forward_losses)

    def train_step(self, batches: Mapping[str, Batch]) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        losses: dict[str, Tensor] = self.forward_losses(batches)
        torch.stack(list(losses.values())).sum().backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        return {task: loss.item() for task, loss in losses.items()}

    def predict(self, x: Tensor, task: str) -> Tensor:
        prediction: Tensor = self.model(x, task)
        return prediction

    def train(self, mode: bool) -> None:
        self.model.train(mode)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]


class _JointLosses(nn.Module):
    """Every task's loss on the Joint network as one module call, so ``DistributedDataParallel`` sees one
    forward (and one backward of their sum) per step, whatever the number of encoder passes."""

    def __init__(self, model: nn.Module, losses: Mapping[str, LossFn]) -> None:
        super().__init__()
        self.model = model
        self.losses = dict(losses)

    def forward(self, batches: Mapping[str, Batch]) -> dict[str, Tensor]:
        _, outputs = _forward_all(self.model, batches)
        return {task: self.losses[task](outputs[task], y) for task, (_, y) in batches.items()}


def _aggregator(method: str, training: Training) -> Any:
    """The torchjd aggregator of a gradient-manipulation method."""
    try:
        from torchjd import aggregation
    except ImportError as error:
        raise RuntimeError(_missing_torchjd_message(error)) from error
    if method == "pcgrad":
        return aggregation.PCGrad()
    if method == "mgda":
        return aggregation.MGDA()
    if method == "cagrad":
        return aggregation.CAGrad(c=training.cagrad_c)
    if method == "graddrop":
        return aggregation.GradDrop()
    raise ValueError(f"method={method!r} is not a gradient method; choose from {GRADIENT_METHODS}")


class GradientLearner(JointLearner):
    """PCGrad / MGDA / CAGrad / GradDrop on the Joint network through ``torchjd``.

    Heads get their own task's gradient (summed where heads are shared, as in
    Joint); the encoder's per-task Jacobian is computed by
    ``torchjd.autojac.backward`` (the features' Jacobian left-multiplied by each
    task's gradient w.r.t. the features) and combined into one gradient by the
    aggregator (``jac_to_grad``); then the base optimizer steps. This is what
    ``mtl_backward`` does, except that it also handles multi-scale features
    that depend on each other (UNet skip connections), which ``mtl_backward``
    would differentiate twice.
    """

    def __init__(self, problem: Problem, training: Training, method: str) -> None:
        if world_size() > 1:
            check_distributed_methods([method])
        super().__init__(problem, training)
        self.aggregator = _aggregator(method, training)
        self.shared = [p for p in _encoder(self.model).parameters() if p.requires_grad]
        shared_ids = {id(p) for p in self.shared}
        self.private = [p for p in self.model.parameters() if p.requires_grad and id(p) not in shared_ids]

    def train_step(self, batches: Mapping[str, Batch]) -> dict[str, float]:
        from torchjd.autojac import backward, jac_to_grad

        self.optimizer.zero_grad(set_to_none=True)
        encoder = _encoder(self.model)
        shared_input = _shared_input(batches)
        inputs = [shared_input] if shared_input is not None else [x for x, _ in batches.values()]
        originals: list[Tensor] = []
        leaves: list[Tensor] = []
        passes = [_cut(encoder(x), originals, leaves) for x in inputs]
        if shared_input is not None:
            outputs = _shared_outputs(self.model, passes[0], list(batches))
        else:
            outputs = {task: _head_forward(self.model, f, task) for task, f in zip(batches, passes, strict=True)}
        losses = {task: self.losses[task](outputs[task], y) for task, (_, y) in batches.items()}
        values = {task: loss.item() for task, loss in losses.items()}
        if not all(math.isfinite(v) for v in values.values()):
            return values  # a diverged step: skip it rather than poison the parameters
        # Each task: its gradient w.r.t. the heads (accumulated, as Joint does) and w.r.t. the cut features.
        rows: list[list[Tensor]] = []
        for loss in losses.values():
            grads = torch.autograd.grad(loss, [*self.private, *leaves], retain_graph=True, allow_unused=True)
            for p, g in zip(self.private, grads[: len(self.private)], strict=True):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
            rows.append([torch.zeros_like(f) if g is None else g for f, g in zip(leaves, grads[len(self.private) :], strict=True)])
        # The encoder's per-task Jacobian: features' Jacobian left-multiplied by each task's feature gradients
        # (multi-scale features may depend on each other, so they are differentiated together, not one by one).
        jac_tensors = [torch.stack([row[k] for row in rows]) for k in range(len(leaves))]
        backward(originals, jac_tensors=jac_tensors, inputs=self.shared)
        jac_to_grad(self.shared, self.aggregator)
        self.optimizer.step()
        return values


def _cut(features: Any, originals: list[Tensor], leaves: list[Tensor]) -> Any:
    """``features`` with every parameter-dependent tensor replaced by a detached leaf copy.

    Appends the originals and their leaves to the two lists, so the heads can be
    differentiated w.r.t. the features alone and the encoder afterwards.
    """
    if isinstance(features, Tensor):
        if not features.requires_grad:
            return features
        leaf = features.detach().requires_grad_(True)
        originals.append(features)
        leaves.append(leaf)
        return leaf
    if isinstance(features, (list, tuple)):
        return type(features)(_cut(item, originals, leaves) for item in features)
    raise TypeError(
        f"the encoder returned {type(features).__name__}; the gradient methods need a tensor or a list/tuple "
        "of tensors as features"
    )


def _missing_torchjd_message(error: ImportError) -> str:
    return (
        f"methods {list(GRADIENT_METHODS)} need torchjd with its cagrad extra, which failed to import ({error}); "
        f"install it with pip install 'torchjd[cagrad]' (or pip install -e '.[bench]'), or leave these methods out "
        f"of --methods"
    )


def _missing_core_message(error: ImportError) -> str:
    return (
        f"methods {list(COOPERATIVE_METHODS)} need the cooperative_opt and adapters packages, which failed to "
        f"import ({error}); install the project (pip install -e .) or leave these methods out of --methods"
    )


class CooperativeLearner:
    """MT-COOL or one of its ablations: the channel-split network plus ``CooperativeOptimizer``."""

    def __init__(self, problem: Problem, training: Training, method: str) -> None:
        try:
            import adapters
            from cooperative_opt import VARIANTS, CooperativeOptimizer, Task
        except ImportError as error:
            raise RuntimeError(_missing_core_message(error)) from error
        variant, reference = COOPERATIVE_METHODS[method]
        spec = VARIANTS[variant]
        self.model = _check_network(problem.multi_task()).to(training.device)
        adapters.split_channels(_encoder(self.model), list(problem.tasks))
        tasks = [
            Task(
                name,
                loss=_BatchLoss(problem.losses[name]),
                head=_heads(self.model)[name],
                inputs=_TaskInputs(name),
            )
            for name in problem.tasks
        ]
        cls, kwargs = training.optimizer_class()
        with warnings.catch_warnings():
            # mt_cool at samples=1 runs the paper's formula on purpose (its consistency term is
            # identically zero there); mt_cool_clean is the active alternative, reported beside it.
            warnings.filterwarnings("ignore", message=r".*identically zero", category=UserWarning)
            self.optimizer = CooperativeOptimizer(
                self.model,
                tasks,
                cls,
                **kwargs,
                variant=variant,
                consistency_reference=reference,
                # options of a term the variant does not have are not passed (the optimizer rejects them)
                consistency_weight=training.consistency_weight if spec.consistency else None,
                bound=training.bound,
                noise_bound=training.noise_bound if spec.noise else None,
                noise_scale=training.noise_scale if spec.noise else "absolute",
                samples=training.samples,
                noise=training.noise if spec.noise else "identical",
                inner_steps=training.inner_steps,
                warmup_steps=training.warmup_steps,
                running_stats=training.running_stats,
                sliced_layers=training.sliced_layers,
                seed=training.seed,
            )
        self.num_parameters = sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def train_step(self, batches: Mapping[str, Batch]) -> dict[str, float]:
        report = self.optimizer.step(dict(batches))
        # A task skipped for a non-finite loss has no entry; record it as NaN.
        return {task: float(report.losses.get(task, math.nan)) for task in batches}

    def predict(self, x: Tensor, task: str) -> Tensor:
        prediction: Tensor = self.model(x, task)
        return prediction

    def train(self, mode: bool) -> None:
        self.model.train(mode)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]


@dataclass(frozen=True)
class _BatchLoss:
    """``Task.loss`` adapter: ``loss(output, (x, y)) = fn(output, y)`` (a class, so it pickles)."""

    fn: LossFn

    def __call__(self, output: Tensor, batch: Batch) -> Tensor:
        return self.fn(output, batch[1])


@dataclass(frozen=True)
class _TaskInputs:
    """``Task.inputs`` adapter: ``model(x, task)`` for ``batch = (x, y)``."""

    task: str

    def __call__(self, batch: Batch) -> tuple[Tensor, str]:
        return (batch[0], self.task)


def check_methods_available(methods: Sequence[str]) -> None:
    """Fail before any training when a method's optional dependency cannot be imported.

    Raises:
        ValueError: for an unknown method name.
        RuntimeError: naming the package to install.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {','.join(METHODS)}")
    if set(GRADIENT_METHODS) & set(methods):
        try:
            from torchjd import aggregation, autojac  # noqa: F401
        except ImportError as error:
            raise RuntimeError(_missing_torchjd_message(error)) from error
        if "cagrad" in methods:
            try:
                import cvxpy  # noqa: F401
            except ImportError as error:
                raise RuntimeError(_missing_torchjd_message(error)) from error
    if set(COOPERATIVE_METHODS) & set(methods):
        try:
            import adapters  # noqa: F401
            import cooperative_opt  # noqa: F401
        except ImportError as error:
            raise RuntimeError(_missing_core_message(error)) from error


def build_learner(method: str, problem: Problem, training: Training) -> Learner:
    """Seed the global torch RNG with ``training.seed`` and build ``method``'s learner.

    Every method built with the same seed starts from the same initial
    multi-task network (Independent: the same single-task networks). Under
    ``torch.distributed`` (default group of more than one rank) every rank
    must build the same methods in the same order (construction broadcasts
    rank 0's parameters).

    Raises:
        ValueError: for an unknown ``method``, or under ``torch.distributed`` for one outside
            :data:`DISTRIBUTED_METHODS`.
    """
    torch.manual_seed(training.seed)
    if method == "independent":
        return IndependentLearner(problem, training)
    if method == "joint":
        return JointLearner(problem, training)
    if method in GRADIENT_METHODS:
        return GradientLearner(problem, training, method)
    if method in COOPERATIVE_METHODS:
        return CooperativeLearner(problem, training, method)
    raise ValueError(f"method={method!r} is unknown; choose from {','.join(METHODS)}")
