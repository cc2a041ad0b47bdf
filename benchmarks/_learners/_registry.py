"""Every method the benchmarks compare, by name, and the one function that builds its learner.

A method is a learner family plus its options (docs/method.md, "Ablations"; docs/results.md):

- ``independent`` (STL): one network per task (``Problem.single_task``), each with its own optimizer.
- ``joint`` (HPS): the hard-shared network (``Problem.multi_task``), loss = sum of task losses.
- ``mtan``, ``ctan``: the ``Problem.networks`` architecture of that name, trained like ``joint``.
- ``pcgrad``, ``mgda``, ``cagrad``, ``graddrop``: the Joint network with torchjd's aggregators.
- ``vanilla``, ``without_reg``, ``mt_cool``, ``mt_cool_clean``: the channel-split Joint network
  trained by ``CooperativeOptimizer`` (``mt_cool_clean``: ``consistency_reference="clean"``).
- ``mtan_mt_cool``, ``ctan_vanilla``, ``ctan_without_reg``, ``ctan_mt_cool``: the architecture of
  the prefix, split between the tasks, trained by ``CooperativeOptimizer`` with the suffix's variant.
- opt-in settings variants of ``mt_cool``, run only when named (``--methods``, or a scenario's
  ``defaults["methods"]``): ``mt_cool_m2``, ``mt_cool_m4`` (M = 2, 4 with the paper's mean
  reference), ``mt_cool_m2_l10`` (M = 2, L = 10 inner steps with a fresh batch each, whatever the
  run's ``--inner-batches``) and ``mt_cool_m2_jacobi`` (M = 2, ``update_order="jacobi"``).

Under ``torch.distributed`` (a default process group of more than one rank), each rank passes its
own shard of the batch: the Joint-like learners train through ``DistributedDataParallel``, the
cooperative ones through ``CooperativeOptimizer``, which averages each stepping task's gradients
itself (:data:`DISTRIBUTED_METHODS`); the gradient methods are refused, since an all-reduce of one
gradient cannot average their per-task Jacobians.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final, Literal

import torch

from benchmarks._learners._cooperative import (
    CooperativeLearner,
    InnerBatches,
    Reference,
    UpdateOrder,
    Variant,
    missing_core_message,
)
from benchmarks._learners._gradient import GRADIENT_METHODS, GradientLearner, missing_torchjd_message
from benchmarks._learners._independent import IndependentLearner
from benchmarks._learners._joint import JointLearner
from benchmarks._learners._problem import Learner, Problem, Training, world_size

__all__ = [
    "COOPERATIVE_METHODS",
    "DISTRIBUTED_METHODS",
    "GRADIENT_METHODS",
    "METHODS",
    "METHOD_LABELS",
    "NETWORK_METHODS",
    "MethodSpec",
    "REGISTRY",
    "build_learner",
    "check_distributed_methods",
    "check_methods_available",
    "check_offered",
    "label",
    "offered_methods",
]


@dataclass(frozen=True)
class MethodSpec:
    """One method: its learner family and options.

    Attributes:
        family: which learner trains it.
        network: the ``Problem.networks`` key it trains, ``None`` for ``Problem.multi_task``
            (and ``Problem.single_task`` for Independent).
        variant: ``CooperativeOptimizer``'s variant (cooperative family only).
        reference: its ``consistency_reference`` (cooperative family only).
        samples: M for this method, overriding ``Training.samples`` (``None``: the run's).
        inner_steps: L for this method, overriding ``Training.inner_steps`` (``None``: the run's).
        inner_batches: ``"reuse"`` (every inner step reuses the step's batch) or ``"fresh"`` (one
            outer iteration per L training steps, inner step l on the l-th step's batch), overriding
            ``Training.inner_batches`` (``None``: the run's, ``--inner-batches``).
        update_order: ``CooperativeOptimizer``'s ``update_order``.
        opt_in: left out of the default method list (:func:`offered_methods`); runs when named.
    """

    family: Literal["independent", "joint", "gradient", "cooperative"]
    network: str | None = None
    variant: Variant = "mt_cool"
    reference: Reference = "mean"
    samples: int | None = None
    inner_steps: int | None = None
    inner_batches: InnerBatches | None = None
    update_order: UpdateOrder = "gauss_seidel"
    opt_in: bool = False


REGISTRY: Final[Mapping[str, MethodSpec]] = {
    "independent": MethodSpec("independent"),
    "joint": MethodSpec("joint"),
    "mtan": MethodSpec("joint", network="mtan"),
    "ctan": MethodSpec("joint", network="ctan"),
    **{method: MethodSpec("gradient") for method in GRADIENT_METHODS},
    "vanilla": MethodSpec("cooperative", variant="vanilla"),
    "without_reg": MethodSpec("cooperative", variant="without_reg"),
    "mt_cool": MethodSpec("cooperative", variant="mt_cool"),
    "mt_cool_clean": MethodSpec("cooperative", variant="mt_cool", reference="clean"),
    "mt_cool_m2": MethodSpec("cooperative", samples=2, opt_in=True),
    "mt_cool_m4": MethodSpec("cooperative", samples=4, opt_in=True),
    "mt_cool_m2_l10": MethodSpec("cooperative", samples=2, inner_steps=10, inner_batches="fresh", opt_in=True),
    "mt_cool_m2_jacobi": MethodSpec("cooperative", samples=2, update_order="jacobi", opt_in=True),
    "mtan_mt_cool": MethodSpec("cooperative", network="mtan", variant="mt_cool"),
    "ctan_vanilla": MethodSpec("cooperative", network="ctan", variant="vanilla"),
    "ctan_without_reg": MethodSpec("cooperative", network="ctan", variant="without_reg"),
    "ctan_mt_cool": MethodSpec("cooperative", network="ctan", variant="mt_cool"),
}
"""Every method's spec, in the order the benchmarks run and report them."""

METHODS: Final[tuple[str, ...]] = tuple(REGISTRY)
"""Every method, in table order."""

COOPERATIVE_METHODS: Final[Mapping[str, tuple[Variant, Reference]]] = {
    method: (spec.variant, spec.reference) for method, spec in REGISTRY.items() if spec.family == "cooperative"
}
"""Methods trained with ``CooperativeOptimizer``: method -> (``variant``, ``consistency_reference``)."""

NETWORK_METHODS: Final[Mapping[str, str]] = {
    method: spec.network for method, spec in REGISTRY.items() if spec.network is not None
}
"""Methods that train a ``Problem.networks`` architecture: method -> network name."""

DISTRIBUTED_METHODS: Final[tuple[str, ...]] = tuple(m for m in METHODS if m not in GRADIENT_METHODS)
"""Methods that train under ``torch.distributed``."""

METHOD_LABELS: Final[Mapping[str, str]] = {
    "independent": "independent (STL)", "joint": "joint (HPS)", "mt_cool_m2": "mt_cool (M=2)",
    "mt_cool_m4": "mt_cool (M=4)", "mt_cool_m2_l10": "mt_cool (M=2, L=10 fresh)",
    "mt_cool_m2_jacobi": "mt_cool (M=2, Jacobi)",
}
"""Table labels that differ from the method name (the JSON keeps the names)."""


def label(method: str) -> str:
    """The method's row label in tables and figures (``"joint (HPS)"`` for ``joint``)."""
    return METHOD_LABELS.get(method, method)


def offered_methods(networks: Iterable[str], *, opt_in: bool = False) -> tuple[str, ...]:
    """The methods a problem with these ``Problem.networks`` names can train, in table order
    (the default method list; ``opt_in=True`` adds the ``MethodSpec.opt_in`` ones).

    Example:
        >>> offered_methods(["ctan"])[:5]
        ('independent', 'joint', 'ctan', 'pcgrad', 'mgda')
    """
    names = set(networks)
    return tuple(m for m, spec in REGISTRY.items()
                 if (spec.network is None or spec.network in names) and (opt_in or not spec.opt_in))


def check_offered(methods: Sequence[str], networks: Iterable[str]) -> None:
    """Refuse the methods whose network the problem does not build, naming the methods it offers.

    Raises:
        ValueError: for a method of :data:`NETWORK_METHODS` whose network is not in ``networks``.
    """
    names = sorted(set(networks))
    offered = offered_methods(names)
    refused = [m for m in methods if m in REGISTRY and m not in offered_methods(names, opt_in=True)]
    if refused:
        needed = sorted({NETWORK_METHODS[m] for m in refused})
        raise ValueError(
            f"methods {refused} train the {needed} network(s), which this scenario's Problem.networks does not "
            f"build (it has {names}); choose --methods from {','.join(offered)}"
        )


def check_distributed_methods(methods: Sequence[str], offered: Sequence[str] = METHODS) -> None:
    """Refuse the methods that cannot train under ``torch.distributed``, naming the ones of ``offered`` that can.

    Raises:
        ValueError: if ``methods`` holds a method outside :data:`DISTRIBUTED_METHODS`.
    """
    refused = [m for m in methods if m not in DISTRIBUTED_METHODS]
    if refused:
        allowed = [m for m in offered if m in DISTRIBUTED_METHODS]
        raise ValueError(
            f"--distributed: methods {refused} cannot train on several ranks (their per-task Jacobians are not "
            f"averaged by an all-reduce); choose --methods from {','.join(allowed)}"
        )


def check_methods_available(methods: Sequence[str]) -> None:
    """Fail before any training when a method's optional dependency cannot be imported.

    Raises:
        ValueError: for an unknown method name.
        RuntimeError: naming the package to install.
    """
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {','.join(METHODS)}")
    if set(GRADIENT_METHODS) & set(methods):
        try:
            from torchjd import aggregation, autojac  # noqa: F401
        except ImportError as error:
            raise RuntimeError(missing_torchjd_message(error)) from error
        if "cagrad" in methods:
            try:
                import cvxpy  # noqa: F401
            except ImportError as error:
                raise RuntimeError(missing_torchjd_message(error)) from error
    if set(COOPERATIVE_METHODS) & set(methods):
        try:
            import adapters  # noqa: F401
            import cooperative_opt  # noqa: F401
        except ImportError as error:
            raise RuntimeError(missing_core_message(error)) from error


def build_learner(method: str, problem: Problem, training: Training) -> Learner:
    """Seed the global torch RNG with ``training.seed`` and build ``method``'s learner.

    Every method built with the same seed starts from the same initial
    multi-task network (Independent: the same single-task networks; an
    architecture method: the same architecture). Under ``torch.distributed``
    (default group of more than one rank) every rank must build the same
    methods in the same order (construction broadcasts rank 0's parameters).

    Raises:
        ValueError: for an unknown ``method``, one whose network ``problem.networks`` lacks (naming
            the methods it offers), or under ``torch.distributed`` one outside :data:`DISTRIBUTED_METHODS`.
    """
    spec = REGISTRY.get(method)
    if spec is None:
        raise ValueError(f"method={method!r} is unknown; choose from {','.join(METHODS)}")
    check_offered([method], problem.networks)
    if world_size() > 1:
        check_distributed_methods([method], offered_methods(problem.networks))
    torch.manual_seed(training.seed)
    if spec.family == "independent":
        return IndependentLearner(problem, training)
    if spec.family == "joint":
        return JointLearner(problem, training, spec.network)
    if spec.family == "gradient":
        return GradientLearner(problem, training, method)
    training = replace(training, samples=spec.samples or training.samples,
                       inner_steps=spec.inner_steps or training.inner_steps,
                       inner_batches=spec.inner_batches or training.inner_batches)
    return CooperativeLearner(problem, training, spec.variant, spec.reference, spec.network,
                              update_order=spec.update_order)
