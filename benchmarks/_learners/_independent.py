"""Independent (single-task learning, STL): one network and one optimizer per task."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from benchmarks._learners._problem import Batch, Problem, Training, count_parameters, data_parallel, world_size

__all__ = ["IndependentLearner"]


class IndependentLearner:
    """Independent: one ``Problem.single_task`` network and one optimizer per task.

    Under ``torch.distributed`` the training forwards go through ``DistributedDataParallel``
    (``predict`` does not).
    """

    def __init__(self, problem: Problem, training: Training) -> None:
        self.losses = problem.losses
        self.models = {task: problem.single_task(task).to(training.device) for task in problem.tasks}
        self.optimizers_by_task = {task: training.make_optimizer(m.parameters()) for task, m in self.models.items()}
        self.num_parameters = sum(count_parameters(m) for m in self.models.values())
        distributed = world_size() > 1
        self.forwards: dict[str, nn.Module] = {
            task: data_parallel(m) if distributed else m for task, m in self.models.items()
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
