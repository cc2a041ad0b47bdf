"""The learners the benchmarks compare, one module per family, and the registry that names them.

- :mod:`._problem`: :class:`Problem` (a scenario's networks and losses), :class:`Training`
  (the run's settings), the :class:`Learner` interface, :func:`count_parameters`;
- :mod:`._independent`, :mod:`._joint`, :mod:`._gradient` (torchjd), :mod:`._cooperative`
  (``CooperativeOptimizer``): the learner families;
- tasks: ``adapters.make_tasks`` (picklable) and ``architectures.cooperative`` build the ``cooperative_opt.Task`` lists;
- :mod:`._registry`: :data:`METHODS` and :func:`build_learner`.
"""

from benchmarks._learners._cooperative import CooperativeLearner
from benchmarks._learners._gradient import GradientLearner
from benchmarks._learners._independent import IndependentLearner
from benchmarks._learners._joint import JointLearner
from benchmarks._learners._problem import (
    Batch,
    InnerBatches,
    Learner,
    LossFn,
    Problem,
    Training,
    count_parameters,
    world_size,
)
from benchmarks._learners._registry import (
    COOPERATIVE_METHODS,
    DISTRIBUTED_METHODS,
    GRADIENT_METHODS,
    METHOD_LABELS,
    METHODS,
    NETWORK_METHODS,
    REGISTRY,
    MethodSpec,
    build_learner,
    check_distributed_methods,
    check_methods_available,
    check_offered,
    label,
    offered_methods,
)

__all__ = [
    "COOPERATIVE_METHODS",
    "DISTRIBUTED_METHODS",
    "GRADIENT_METHODS",
    "METHODS",
    "METHOD_LABELS",
    "NETWORK_METHODS",
    "REGISTRY",
    "Batch",
    "CooperativeLearner",
    "GradientLearner",
    "IndependentLearner",
    "InnerBatches",
    "JointLearner",
    "Learner",
    "LossFn",
    "MethodSpec",
    "Problem",
    "Training",
    "build_learner",
    "check_distributed_methods",
    "check_methods_available",
    "check_offered",
    "count_parameters",
    "label",
    "offered_methods",
    "world_size",
]
