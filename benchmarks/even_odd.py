"""Even/odd digit benchmark: MT-COOL and its ablations against every baseline of the paper's Table 1.

This reproduces the setting of the MT-COOL paper's Table 1 (see
``docs/method.md`` and ``docs/results.md``) on data that needs no download: Task "even"
classifies the digits {0, 2, 4, 6, 8} and task "odd" the digits {1, 3, 5, 7, 9}
with a LeNet. By default it uses scikit-learn's bundled 8x8 digits; pass
``--data-dir`` to use real MNIST IDX files instead.

Methods (all trained with the same base optimizer, learning rate, batch size,
number of steps, per-seed initialisation and per-seed data order; :mod:`benchmarks._learners`):

- ``independent``: one :class:`LeNetSingle` per task, each trained on its own task.
- ``joint``: one :class:`LeNetMultiTask`, loss = sum of the task losses, plain SGD.
- ``pcgrad``, ``mgda``, ``cagrad``, ``graddrop``: the Joint network with the
  encoder's per-task gradients combined by ``torchjd``'s aggregators.
- ``vanilla``, ``without_reg``, ``mt_cool``: :class:`cooperative_opt.CooperativeOptimizer`
  on the channel-split :class:`LeNetMultiTask` with the matching ``variant``
  (the three ablations of the paper's Table 1).
- ``mt_cool_clean``: ``mt_cool`` with ``consistency_reference="clean"``; the
  paper's consistency term is identically zero at M = 1, this one is not.

Each task has its own images, so the run goes through the driver of
:mod:`benchmarks._scenario` with one input stream per task: every training
step draws one batch per task; an epoch is ``ceil(max_t N_t / batch_size)``
steps; each task draws its batches from its own stream of back-to-back random
permutations of its training set, so the smaller task wraps around a little
early. MT-COOL's warm-up (joint noisy updates) lasts ``--warmup-epochs`` epochs
(default 1), counted inside ``--epochs``.

``--distributed`` trains on the ranks of ``torchrun --nproc-per-node R``:
each task's training set is sharded by a ``DistributedSampler``, each rank
draws ``--batch-size`` examples per task per step from its shard (an epoch is
``ceil(max_t ceil(N_t / R) / batch_size)`` steps), only
:data:`benchmarks._learners.DISTRIBUTED_METHODS` run, and rank 0 alone
evaluates and writes the outputs.

Run ``python -m benchmarks.even_odd --help`` for the options. Outputs:
a markdown table on stdout (with Δm against Independent), ``<out-dir>/even_odd.json``
(configuration, per-seed accuracies and per-epoch curves; accuracies as fractions in [0, 1]) and
``<out-dir>/even_odd.png`` (accuracy bars with standard deviations, and test
accuracy curves).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, Final

import torch.nn.functional as F
from torch import Tensor

from benchmarks import _scenario
from benchmarks._data import NUM_CLASSES, TASK_DIGITS, load_digits_even_odd, load_mnist_even_odd
from benchmarks._images import ImageTasks
from benchmarks._learners import Problem, offered_methods
from benchmarks._models import LeNetMultiTask, LeNetSingle
from benchmarks._scenario import Metric, Scenario, ScenarioConfig, SeedData

__all__ = ["METHODS", "SCENARIO", "evaluate", "main", "parse_args", "problem"]

TASKS: Final[tuple[str, ...]] = tuple(name for name, _ in TASK_DIGITS)

METHODS: Final[tuple[str, ...]] = offered_methods(())
"""The methods this benchmark runs by default, in table order (every method on the LeNet pair)."""

_DIGITS_SOURCE: Final[str] = "sklearn digits 8x8"


def _cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Every task's loss: cross-entropy of its logits."""
    return F.cross_entropy(logits, target)


def problem(config: ScenarioConfig | None, data: SeedData) -> Problem:
    """The LeNets that fit ``data`` (its image size, 5 classes per task) and the cross-entropy losses."""
    first = next(iter(data.values())) if isinstance(data, Mapping) else data
    height, width = (int(s) for s in first.train_x.shape[2:])
    classes = dict.fromkeys(TASKS, NUM_CLASSES)

    def multi_task() -> LeNetMultiTask:
        return LeNetMultiTask(classes, input_size=(height, width))

    def single_task(task: str) -> LeNetSingle:
        return LeNetSingle(classes[task], input_size=(height, width))

    return Problem(tasks=TASKS, multi_task=multi_task, single_task=single_task,
                   losses=dict.fromkeys(TASKS, _cross_entropy))


def _load(config: ScenarioConfig, seed: int) -> dict[str, ImageTasks]:
    """The even/odd tasks for one seed, each with its own images, capped by ``--max-train`` / ``--max-test``."""
    if config.data_dir is None:
        data, source = load_digits_even_odd(seed, test_fraction=config.test_fraction), _DIGITS_SOURCE
    else:
        data, source = load_mnist_even_odd(config.data_dir), config.data_dir
    tasks: dict[str, ImageTasks] = {}
    for task, task_data in data.items():
        capped = task_data.truncated(config.train_size, config.test_size)
        if capped.train_y.shape[0] < config.batch_size:
            raise ValueError(
                f"--batch-size {config.batch_size} exceeds the {capped.train_y.shape[0]} training examples "
                f"of task {task!r}; lower --batch-size or raise --max-train"
            )
        tasks[task] = ImageTasks(capped.train_x, {task: capped.train_y}, capped.test_x, {task: capped.test_y}, source)
    return tasks


def evaluate(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, float]:
    """Test accuracy of every task: the fraction of its test images whose largest logit is the label.

    Args:
        outputs: per task, logits ``[N_task, 5]``.
        targets: per task, labels ``[N_task]``.
    """
    return {
        f"{task}_acc": int((outputs[task].argmax(dim=1) == y).sum().item()) / max(y.shape[0], 1)
        for task, y in targets.items()
    }


def _notes(config: ScenarioConfig) -> list[str]:
    """How to read the results; written into the JSON beside the configuration."""
    notes = [
        "Accuracies are fractions in [0, 1] on each task's test set after the last epoch (no model "
        "selection on the test set); mean and sample standard deviation over seeds.",
        "MT-COOL warm-up (joint noisy updates, docs/method.md, 'Warm-up') lasts warmup_epochs epochs, i.e. "
        "warmup_steps = warmup_epochs * steps_per_epoch optimizer steps, counted inside epochs (the paper does "
        "not state its warm-up length); vanilla, without_reg, mt_cool and mt_cool_clean all use it.",
        "An epoch is ceil(max task train size / batch_size) steps; each step draws one batch per task from that "
        "task's stream of back-to-back random permutations, identical for every method with the same seed.",
        "params_ratio is the trainable parameter count relative to joint (the paper's Params column).",
    ]
    if config.samples == 1:
        notes.append(
            "With samples = 1 the paper's consistency term (reference = mean of the M predictions) is identically "
            "zero, so mt_cool trains exactly like without_reg; mt_cool_clean uses the noise-free prediction as "
            "the reference, which keeps the term active (docs/method.md, 'The M = 1 gap')."
        )
    if config.data_dir is None:
        notes.append(
            "scikit-learn digits (8x8) stand in for MNIST; each seed also draws its own stratified train/test "
            "split, so the standard deviation includes split variance. Test sets have about 225 images per "
            "task: one image is about 0.45 percentage points."
        )
    return notes


SCENARIO: Final[Scenario] = Scenario(
    name="even_odd",
    title="Even/odd digits, LeNet (paper Table 1)",
    description="Compare Independent, Joint, PCGrad, MGDA, CAGrad, GradDrop and MT-COOL "
    "(vanilla / without_reg / mt_cool / mt_cool_clean) on the even/odd digit tasks of the MT-COOL paper's Table 1.",
    tasks=TASKS,
    metrics=tuple(Metric(f"{task}_acc", f"{task} acc (%)") for task in TASKS),
    curve_metric={task: f"{task}_acc" for task in TASKS},
    defaults={"seeds": 5, "epochs": 30, "train_size": None, "test_size": None, "warmup_epochs": 1,
              "batch_size": 32, "optimizer": "sgd", "lr": 0.1, "schedule": "constant"},
    quick={"seeds": 1, "epochs": 2, "train_size": 256, "test_size": 256, "warmup_epochs": 1},
    problem=problem,
    load=_load,
    evaluate=evaluate,
    layout="the four MNIST IDX files (plain or .gz), or torchvision's MNIST/raw folder",
    notes=_notes,
    figures=("overview",),
    eval_batch=1024,
    flag_names={"train_size": "--max-train", "test_size": "--max-test"},
    flag_help={
        "train_size": "cap on training examples per task",
        "test_size": "cap on test examples per task",
        "data_dir": "folder with the four real MNIST IDX files (plain or .gz); default: sklearn 8x8 digits. "
        "Full MNIST takes hours on 2 CPU cores at the default --epochs: use --device cuda or --max-train",
    },
    default_data="sklearn 8x8 digits",
)


def parse_args(argv: Sequence[str] | None = None) -> ScenarioConfig:
    """Parse the command line into a :class:`ScenarioConfig`, filling defaults (or ``--quick`` ones)."""
    return _scenario.parse_args(SCENARIO, argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark from the command line; print the table, write JSON and PNG, return the results.

    Example:
        >>> results = main(["--quick", "--out-dir", "/tmp/even_odd"])  # doctest: +SKIP
        >>> list(results["methods"])  # doctest: +SKIP
        ['independent', 'joint', 'pcgrad', 'mgda', 'cagrad', 'graddrop', 'vanilla', 'without_reg', 'mt_cool', 'mt_cool_clean']
    """
    return _scenario.main(SCENARIO, argv)


if __name__ == "__main__":
    sys.exit(_scenario.cli(SCENARIO))
