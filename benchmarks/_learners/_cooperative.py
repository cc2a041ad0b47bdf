"""MT-COOL and its ablations: a network whose parameters are split between the tasks, trained by
:class:`cooperative_opt.CooperativeOptimizer`.

- the hard-shared ``Problem.multi_task`` network with its encoder channel-split
  (:func:`adapters.split_channels`): ``vanilla``, ``without_reg``, ``mt_cool``, ``mt_cool_clean``;
- an ``architectures`` network of ``Problem.networks`` (``mtan_mt_cool``, ``ctan_vanilla``,
  ``ctan_without_reg``, ``ctan_mt_cool``), turned into tasks by :func:`architectures.cooperative`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from torch import nn

from benchmarks._learners._joint import build_network, check_hard_shared, encoder_of, heads_of
from benchmarks._learners._problem import Batch, InnerBatches, OneNetwork, Problem, Training, count_parameters

if TYPE_CHECKING:
    from cooperative_opt import CooperativeOptimizer

__all__ = ["CooperativeLearner", "InnerBatches", "Reference", "UpdateOrder", "Variant", "missing_core_message"]

Variant = Literal["vanilla", "without_reg", "mt_cool"]
Reference = Literal["mean", "clean"]
UpdateOrder = Literal["gauss_seidel", "jacobi"]


def missing_core_message(error: ImportError) -> str:
    """The error text when ``cooperative_opt`` or ``adapters`` cannot be imported."""
    return (
        "the MT-COOL methods need the cooperative_opt and adapters packages, which failed to "
        f"import ({error}); install the project (pip install -e .) or leave these methods out of --methods"
    )


class CooperativeLearner(OneNetwork):
    """MT-COOL or one of its ablations on a split network, trained by ``CooperativeOptimizer``.

    Args:
        problem: the scenario's networks and losses.
        training: the run's settings.
        variant: ``CooperativeOptimizer``'s ``variant``.
        reference: its ``consistency_reference``.
        network: ``None`` for the channel-split ``Problem.multi_task`` network, else the
            ``Problem.networks`` key of the architecture to split (``"mtan"``, ``"ctan"``).
        inner_batches: ``"reuse"``: each ``train_step`` is one outer iteration whose L inner steps
            all use its batch (L times the steps of Joint). ``"fresh"``: after warm-up, one outer
            iteration per L ``train_step`` calls, inner step l on the l-th call's batch
            (``step([b_1, ..., b_L])``), so each task takes as many base steps on as many batches as
            Joint; a call that only collects its batch returns the last outer iteration's losses, and
            batches still collected when training ends are not trained on. ``None``: the run's
            (``training.inner_batches``).
        update_order: ``CooperativeOptimizer``'s ``update_order``.
    """

    optimizer: CooperativeOptimizer

    def __init__(
        self, problem: Problem, training: Training, variant: Variant, reference: Reference = "mean",
        network: str | None = None, *, inner_batches: InnerBatches | None = None,
        update_order: UpdateOrder = "gauss_seidel",
    ) -> None:
        try:
            import adapters
            from cooperative_opt import VARIANTS, CooperativeOptimizer
        except ImportError as error:
            raise RuntimeError(missing_core_message(error)) from error
        spec = VARIANTS[variant]
        owned: dict[str, list[tuple[str, nn.Parameter]]] | None = None
        if network is None:
            self.model = check_hard_shared(problem.multi_task()).to(training.device)
            adapters.split_channels(encoder_of(self.model), list(problem.tasks))
            heads = heads_of(self.model)
            tasks = adapters.make_tasks(self.model, problem.losses, heads={t: heads[t] for t in problem.tasks})
        else:
            import architectures

            net = build_network(problem, network).to(training.device)
            if not isinstance(net, architectures.MultiTaskNetwork):
                raise TypeError(
                    f"Problem.networks[{network!r}] built a {type(net).__name__}, not an architectures.MultiTaskNetwork "
                    "(task_names, forward_all, shared, task_encoder, task_head); MT-COOL cannot tell its tasks apart"
                )
            self.model = net
            tasks, owned = architectures.cooperative(net, problem.losses)
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
                task_parameters=owned,
                update_order=update_order,
            )
        self.num_parameters = count_parameters(self.model)
        self.inner_batches: InnerBatches = training.inner_batches if inner_batches is None else inner_batches
        self._collected: list[Mapping[str, Batch]] = []

    def train_step(self, batches: Mapping[str, Batch]) -> dict[str, float]:
        report = self.optimizer.last_report
        if self.inner_batches == "reuse" or self.optimizer.phase == "warmup":
            report = self.optimizer.step(dict(batches))
        else:
            self._collected.append(dict(batches))
            if len(self._collected) == self.optimizer.settings.inner_steps:
                report, self._collected = self.optimizer.step(self._collected), []
        # A task skipped for a non-finite loss has no entry; record it as NaN.
        return {task: math.nan if report is None else float(report.losses.get(task, math.nan)) for task in batches}
