"""Hard parameter sharing (HPS, ``joint``) and single-task learning (STL, ``independent``).

Both are one construction: an encoder from the :class:`Backbone` and one
head per task (:func:`architectures._decoder.task_head`); HPS shares the
encoder between its tasks, STL is the same network with one task.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from adapters import MultiTaskModel
from architectures._backbone import Backbone, encoder_channels
from architectures._decoder import task_head
from architectures._specs import TaskSpec, parse_tasks

__all__ = ["HardSharingNetwork", "check_backbone", "independent", "joint"]


def check_backbone(backbone: object, owner: str) -> Backbone:
    """``backbone`` if it is a :class:`Backbone`, else a ``TypeError`` that says how to make one."""
    if not isinstance(backbone, Backbone):
        raise TypeError(
            f"{owner}: backbone must be an architectures.Backbone(dims, in_channels, widths), "
            f"got {type(backbone).__name__}"
        )
    return backbone


class HardSharingNetwork(MultiTaskModel):
    """An encoder every task reads and one private head per task (an ``adapters.MultiTaskModel``).

    ``net(x, task)`` is ``task``'s prediction (``net(x)`` when there is one
    task); ``encoder(x)`` returns the feature list each head reads.
    """

    def forward(self, x: Any, task: str | None = None) -> Any:
        """Task ``task``'s prediction for ``x`` (``task`` may be left out when the network has one task)."""
        if task is None:
            if len(self.heads) != 1:
                raise ValueError(f"task must name one of the tasks {list(self.task_names)}")
            task = self.task_names[0]
        return super().forward(x, task)

    def forward_all(self, x: Tensor) -> dict[str, Tensor]:
        """Every task's prediction from one encoder pass."""
        return self.forward_tasks(x)

    def shared(self) -> nn.Module:
        """The encoder (every task reads it)."""
        return self.encoder

    def task_encoder(self, task: str) -> None:
        """``None``: no task has parameters that another task reads."""
        self._check_task(task)
        return None

    def task_head(self, task: str) -> nn.Module:
        """Task ``task``'s head."""
        self._check_task(task)
        head: nn.Module = self.heads[task]
        return head


def _hard_sharing(specs: Mapping[str, TaskSpec], backbone: Backbone) -> HardSharingNetwork:
    encoder = backbone.build()
    channels = encoder_channels(encoder)
    return HardSharingNetwork(encoder, {t: task_head(spec, backbone.dims, channels) for t, spec in specs.items()})


def joint(tasks: Mapping[str, TaskSpec], backbone: Backbone) -> HardSharingNetwork:
    """Hard parameter sharing: one encoder for all ``tasks``, one head each (trained on the summed losses).

    Args:
        tasks: ``{name: PixelTask(channels) | ImageTask(outputs)}``, two or more, in task order.
        backbone: the encoder (see :class:`Backbone`).

    Example:
        >>> import torch
        >>> from architectures import Backbone, ImageTask, PixelTask
        >>> net = joint({"seg": PixelTask(2), "cls": ImageTask(3)}, Backbone(2, 1, (4, 8)))
        >>> {t: tuple(y.shape) for t, y in net.forward_all(torch.zeros(2, 1, 8, 8)).items()}
        {'seg': (2, 2, 8, 8), 'cls': (2, 3)}
    """
    return _hard_sharing(parse_tasks(tasks, "joint"), check_backbone(backbone, "joint"))


def independent(task: str, spec: TaskSpec, backbone: Backbone) -> HardSharingNetwork:
    """Single-task learning: the :func:`joint` network with the one task ``task`` (``net(x)`` predicts it).

    Example:
        >>> import torch
        >>> from architectures import Backbone, PixelTask
        >>> independent("dose", PixelTask(1), Backbone(3, 1, (4, 8)))(torch.zeros(1, 1, 8, 8, 8)).shape
        torch.Size([1, 1, 8, 8, 8])
    """
    return _hard_sharing(parse_tasks({task: spec}, "independent", minimum=1), check_backbone(backbone, "independent"))
