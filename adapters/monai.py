"""MONAI U-Nets as cooperative multi-task models (extra ``monai``).

``BasicUNet``, ``UNet`` and ``DynUNet``, in 2D and 3D: the down path (every
encoder stage down to the bottleneck) is channel-split between the tasks,
every segmentation task gets its own up path and output layer, and
classification tasks get a head on the bottleneck features. Needs ``pip
install 'cooperative-opt[monai]'``; MONAI is imported when :func:`multitask`
is called.

See ``docs/adapters/monai.md``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from adapters._heads import (
    Classification,
    Deepest,
    FedClassifier,
    PooledClassifier,
    Segmentation,
    TaskSpec,
    last_conv,
    parse_tasks,
    with_classes,
)
from adapters._optional import require
from adapters._split import SmallPolicy, split_channels
from adapters._template import Slot, TemplateModel, parameter_like

__all__ = ["Classification", "DownPath", "MonaiMultiTaskModel", "Segmentation", "UpPath", "multitask"]


class DownPath(nn.Module):
    """Encoder stages run in sequence; returns every stage's output, the bottleneck last."""

    def __init__(self, stages: Sequence[nn.Module]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class UpPath(nn.Module):
    """One segmentation task's up path over :class:`DownPath` features.

    ``ups`` run deepest first, each with the skip features of its level:
    ``up(u, skip)`` (``mode="pair"``: BasicUNet, DynUNet) or
    ``up(cat([skip, u], 1))`` (``mode="cat"``: UNet); then ``final`` if any.
    """

    def __init__(self, ups: Sequence[nn.Module], final: nn.Module | None, mode: Literal["pair", "cat"]) -> None:
        super().__init__()
        self.ups = nn.ModuleList(ups)
        self.final = final
        self.mode = mode

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        u = features[-1]
        for j, up in enumerate(self.ups):
            skip = features[-2 - j]
            u = up(u, skip) if self.mode == "pair" else up(torch.cat([skip, u], 1))
        return u if self.final is None else self.final(u)


@dataclass(frozen=True)
class _Layout:
    """Where a MONAI network keeps its parts (paths relative to the network)."""

    stages: list[str]
    ups: list[str]  # deepest first
    final: str | None
    mode: Literal["pair", "cat"]
    spatial_dims: int
    classes: int
    deep_channels: int


def _basic_unet(model: nn.Module) -> _Layout:
    final = model.get_submodule("final_conv")
    return _Layout(
        ["conv_0", "down_1", "down_2", "down_3", "down_4"],
        ["upcat_4", "upcat_3", "upcat_2", "upcat_1"],
        "final_conv",
        "pair",
        last_conv(final)[1].weight.dim() - 2,
        last_conv(final)[1].out_channels,
        last_conv(model.get_submodule("down_4"))[1].out_channels,
    )


def _unet(model: nn.Module, skip_type: type[nn.Module]) -> _Layout:
    stages: list[str] = []
    ups: list[str] = []
    path = "model"
    while True:
        block = model.get_submodule(path)
        if not (isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], skip_type)):
            raise TypeError(f"{path!r} of {type(model).__name__} is not MONAI UNet's (down, SkipConnection, up) block")
        skip = block[1]
        if getattr(skip, "mode", "cat") != "cat" or getattr(skip, "dim", 1) != 1:
            raise TypeError(f"{path}.1 is a SkipConnection with mode={skip.mode!r}, dim={skip.dim}; expected 'cat' on dim 1")
        stages.append(f"{path}.0")
        ups.append(f"{path}.2")
        inner = skip.submodule
        path = f"{path}.1.submodule"
        if not (isinstance(inner, nn.Sequential) and len(inner) == 3 and isinstance(inner[1], skip_type)):
            stages.append(path)  # the bottom layer
            break
    return _Layout(
        stages,
        ups[::-1],
        None,
        "cat",
        int(getattr(model, "dimensions")),
        int(getattr(model, "out_channels")),
        int(getattr(model, "channels")[-1]),
    )


def _dyn_unet(model: nn.Module) -> _Layout:
    if getattr(model, "deep_supervision", False):
        raise TypeError(
            "DynUNet with deep_supervision=True is not supported: its output stacks supervision heads; build it "
            "with deep_supervision=False"
        )
    downs = len(getattr(model, "downsamples"))
    ups = len(getattr(model, "upsamples"))
    return _Layout(
        ["input_block", *[f"downsamples.{i}" for i in range(downs)], "bottleneck"],
        [f"upsamples.{i}" for i in range(ups)],
        "output_block",
        "pair",
        int(getattr(model, "spatial_dims")),
        int(getattr(model, "out_channels")),
        int(getattr(model, "filters")[-1]),
    )


class MonaiMultiTaskModel(TemplateModel):
    """A MONAI U-Net split between tasks (built by :func:`multitask`).

    ``model.encoder`` is a :class:`DownPath` over the network's own encoder
    stages, ``model.heads[task]`` an :class:`UpPath` or a classification head.
    :meth:`export` gives a segmentation task's MONAI network back.
    """

    def export(self, task: str) -> nn.Module:
        """The MONAI network of segmentation task ``task``, with merged parameters.

        Its ``state_dict`` loads into a fresh network of the same class built
        with ``out_channels`` = the task's class count.
        """
        out = super().export(task)
        if hasattr(out, "out_channels"):
            setattr(out, "out_channels", self.classes[task])
        return out


def _new_top_up(model: nn.Module, top: nn.Module, classes: int) -> nn.Module:
    """MONAI UNet's top up layer rebuilt by UNet itself with ``classes`` outputs (it is a residual block)."""
    first = next(m for m in top.modules() if isinstance(m, nn.modules.conv._ConvNd))
    build = getattr(model, "_get_up_layer")
    strides = getattr(model, "strides")
    layer: nn.Module = build(first.in_channels, classes, strides[0], True)
    return parameter_like(layer, top)


def _up_path(model: nn.Module, layout: _Layout, classes: int, copy_modules: bool, unet: bool) -> UpPath:
    ups = [model.get_submodule(p) for p in layout.ups]
    final = None if layout.final is None else model.get_submodule(layout.final)
    if copy_modules:
        ups = [copy.deepcopy(u) for u in ups]
        final = None if final is None else copy.deepcopy(final)
    if classes != layout.classes:
        if unet:
            ups[-1] = _new_top_up(model, ups[-1], classes)
        elif final is not None:
            final = with_classes(final, classes)
    return UpPath(ups, final, layout.mode).train(model.training)


def multitask(
    model: nn.Module,
    tasks: Mapping[str, TaskSpec],
    *,
    dims: Mapping[str, int] | None = None,
    small: SmallPolicy = "split",
) -> MonaiMultiTaskModel:
    """A MONAI ``BasicUNet``, ``UNet`` or ``DynUNet`` (2D or 3D) as a cooperative multi-task model.

    Works on a copy (``model`` itself is not changed), keeping device, dtype
    and training flag. The down path, bottleneck included, is channel-split
    between the tasks and computes exactly what it did.

    - Segmentation tasks (an int, or :class:`adapters.Segmentation`): the first
      keeps the network's up path, the others get a copy; a task whose class
      count differs from the network's ``out_channels`` gets a new output layer
      (UNet: a new top up layer built by UNet itself).
    - Classification tasks (:class:`adapters.Classification`): a pooled linear
      head on the bottleneck, or with ``fed_by`` a :class:`adapters.FedClassifier`
      that also reads the segmentation prediction.

    Args:
        model: a ``monai.networks.nets`` ``BasicUNet``, ``UNet`` or ``DynUNet``
            (``deep_supervision=False``).
        tasks: ``{task: spec}``, two or more, in task order.
        dims: splitting-rule overrides (:func:`adapters.split_channels`).
        small: policy for parameters with fewer channels than tasks.

    Example:
        >>> from monai.networks.nets import BasicUNet  # doctest: +SKIP
        >>> net = multitask(BasicUNet(2, 1, 2, features=(8, 8, 16, 16, 32, 8)),
        ...                 {"organ": 2, "lesion": 2})  # doctest: +SKIP
    """
    nets = require("monai.networks.nets", "monai")
    layers = require("monai.networks.layers", "monai")
    specs = parse_tasks(tasks, "adapters.monai.multitask")
    if isinstance(model, nets.BasicUNet):
        layout = _basic_unet(model)
    elif isinstance(model, nets.DynUNet):
        layout = _dyn_unet(model)
    elif isinstance(model, nets.UNet):
        layout = _unet(model, layers.SkipConnection)
    else:
        raise TypeError(
            f"model must be a MONAI BasicUNet, UNet or DynUNet, got {type(model).__name__}; use "
            "adapters.multitask(encoder, heads) for other networks"
        )
    unet = isinstance(model, nets.UNet)
    model = copy.deepcopy(model)
    encoder = DownPath([model.get_submodule(p) for p in layout.stages]).train(model.training)

    heads: dict[str, nn.Module] = {}
    head_slots: dict[str, list[Slot]] = {}
    feeds: dict[str, str] = {}
    first_seg = True
    for task, spec in specs.items():
        if isinstance(spec, Segmentation):
            heads[task] = _up_path(model, layout, spec.classes, not first_seg, unet)
            first_seg = False
            slots: list[Slot] = [(p, f"ups.{j}") for j, p in enumerate(layout.ups)]
            if layout.final is not None:
                slots.append((layout.final, "final"))
            head_slots[task] = slots
        elif spec.fed_by is not None:
            source = specs[spec.fed_by]
            fed = FedClassifier(layout.deep_channels, source.classes, spec.classes, layout.spatial_dims, (-1,),
                                spec.dropout)
            heads[task] = parameter_like(fed, model)
            feeds[task] = spec.fed_by
        else:
            pooled: Any = PooledClassifier(layout.deep_channels, spec.classes, spec.dropout)
            heads[task] = parameter_like(Deepest(pooled), model)

    built = MonaiMultiTaskModel(
        encoder,
        heads,
        feeds=feeds,
        template=model,
        encoder_slots=[(p, f"stages.{i}") for i, p in enumerate(layout.stages)],
        head_slots=head_slots,
        classes={task: spec.classes for task, spec in specs.items()},
        family="monai",
    )
    split_channels(encoder, list(specs), dims=dims, small=small)
    return built
