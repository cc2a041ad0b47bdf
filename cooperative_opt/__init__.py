"""cooperative-opt: multi-task cooperative learning (MT-COOL) for PyTorch.

``CooperativeOptimizer`` wraps any torch optimizer and trains a model whose
encoder is split between tasks (:mod:`adapters`): each task in turn takes
optimizer steps on its own slices and head while the other tasks' slices are
perturbed with uniform noise, then its slices are clamped near where the
outer iteration started. It keeps the ``torch.optim`` contract, so it runs
in your own loop (``iteration`` / ``perturb`` / ``step``), with GradScaler,
LR schedulers, Lightning and Accelerate (docs/usage.md).
"""

from cooperative_opt import diagnostics
from cooperative_opt._consistency import bernoulli_kl, softmax_kl
from cooperative_opt._base import OptimizerSpec
from cooperative_opt._optimizer import CooperativeOptimizer
from cooperative_opt._report import Phase, StepReport
from cooperative_opt._running_stats import RunningStatsPolicy
from cooperative_opt._settings import Settings
from cooperative_opt._slices import TaskSlicing, task_slices
from cooperative_opt._task import ConsistencySpec, Task
from cooperative_opt._variants import VARIANTS, Variant

__all__ = [
    "VARIANTS",
    "ConsistencySpec",
    "CooperativeOptimizer",
    "OptimizerSpec",
    "Phase",
    "RunningStatsPolicy",
    "Settings",
    "StepReport",
    "Task",
    "TaskSlicing",
    "Variant",
    "bernoulli_kl",
    "diagnostics",
    "softmax_kl",
    "task_slices",
]

__version__ = "0.2.0"
