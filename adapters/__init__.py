"""Model adapters: turn a user's model into a channel-split, cooperative multi-task model.

``split_channels`` partitions every parameter of an encoder between tasks
(function-preserving; the rule per layer kind is :func:`split_rule`),
``task_parameters`` lists the slices each task owns, and ``merge`` returns
the model to plain parameters. ``multitask`` builds a
:class:`MultiTaskModel` (``model(x, task)``) from an encoder and heads, and
the family adapters build one in one call from a library model:
``adapters.timm.multitask``, ``adapters.smp.multitask`` and
``adapters.monai.multitask`` (optional extras ``timm``, ``smp``, ``monai``;
each library is imported only when its adapter is used).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from adapters._heads import Classification, Deepest, FedClassifier, PooledClassifier, Segmentation, TaskSpec
from adapters._multitask import MultiTaskModel, TaskModel, export, make_tasks, multitask
from adapters._rules import SplitRule, split_rule
from adapters._split import (
    ChannelSplit,
    PlannedSplit,
    SmallPolicy,
    channel_dim,
    merge,
    slice_sizes,
    split_channels,
    split_plan,
    task_parameters,
)

__all__ = [
    "ChannelSplit",
    "Classification",
    "Deepest",
    "FedClassifier",
    "MultiTaskModel",
    "PlannedSplit",
    "PooledClassifier",
    "Segmentation",
    "SmallPolicy",
    "SplitRule",
    "TaskModel",
    "TaskSpec",
    "channel_dim",
    "export",
    "make_tasks",
    "merge",
    "multitask",
    "slice_sizes",
    "split_channels",
    "split_plan",
    "split_rule",
    "task_parameters",
]

_FAMILIES = ("timm", "smp", "monai")


def __getattr__(name: str) -> ModuleType:
    """``adapters.timm`` / ``adapters.smp`` / ``adapters.monai`` without an explicit import."""
    if name in _FAMILIES:
        return importlib.import_module(f"adapters.{name}")
    raise AttributeError(f"module 'adapters' has no attribute {name!r}")
