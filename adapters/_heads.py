"""Task specifications and the task heads the encoder-decoder adapters build.

``Segmentation(classes)`` gets its own decoder and output layer;
``Classification(classes, fed_by=...)`` gets a pooled linear head on the
deepest encoder features, optionally also reading a segmentation task's
prediction (the paper's REFUGE set-up: "the output of segmentation and the
features from the bottom layers are taken as the input of the decoder for
classification").
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

__all__ = ["Classification", "Deepest", "FedClassifier", "PooledClassifier", "Segmentation", "TaskSpec"]


@dataclass(frozen=True)
class Segmentation:
    """A segmentation task: its own decoder and an output layer with ``classes`` channels.

    Example:
        >>> Segmentation(3)
        Segmentation(classes=3)
    """

    classes: int

    def __post_init__(self) -> None:
        _check_classes(self.classes, "Segmentation")


@dataclass(frozen=True)
class Classification:
    """A classification task: a head with ``classes`` logits on the deepest encoder features.

    Args:
        classes: number of logits.
        fed_by: name of a :class:`Segmentation` task whose prediction the head
            also reads (resized to the deepest features and concatenated), or ``None``.
        dropout: dropout probability before the last linear layer.

    Example:
        >>> Classification(2, fed_by="seg")
        Classification(classes=2, fed_by='seg', dropout=0.0)
    """

    classes: int
    fed_by: str | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_classes(self.classes, "Classification")
        if self.fed_by is not None and (not isinstance(self.fed_by, str) or not self.fed_by):
            raise TypeError(f"Classification.fed_by must be a task name or None, got {self.fed_by!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"Classification.dropout must be in [0, 1), got {self.dropout!r}")


#: What a task of an encoder-decoder adapter is: an int (a segmentation task
#: with that many classes) or a :class:`Segmentation` / :class:`Classification`.
TaskSpec = Union[int, Segmentation, Classification]


def _check_classes(classes: object, owner: str) -> None:
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ValueError(f"{owner}.classes must be an int >= 1, got {classes!r}")


def parse_tasks(tasks: Mapping[str, TaskSpec], owner: str) -> dict[str, Segmentation | Classification]:
    """Validate ``{task: spec}`` of an encoder-decoder adapter; ints become :class:`Segmentation`."""
    if not isinstance(tasks, Mapping):
        raise TypeError(
            f"{owner}: tasks must map task names to specs, e.g. {{'seg': Segmentation(2), "
            f"'cls': Classification(2)}}; got {type(tasks).__name__}"
        )
    parsed: dict[str, Segmentation | Classification] = {}
    for name, spec in tasks.items():
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"{owner}: task names must be non-empty strings without '.', got {name!r}")
        if isinstance(spec, (Segmentation, Classification)):
            parsed[name] = spec
        elif isinstance(spec, int) and not isinstance(spec, bool):
            parsed[name] = Segmentation(spec)
        else:
            raise TypeError(
                f"{owner}: task {name!r} must be an int (segmentation classes), Segmentation(...) or "
                f"Classification(...); got {spec!r}"
            )
    if len(parsed) < 2:
        raise ValueError(f"{owner}: tasks must name at least two tasks, got {list(parsed)}")
    for name, spec in parsed.items():
        if isinstance(spec, Classification) and spec.fed_by is not None:
            if not isinstance(parsed.get(spec.fed_by), Segmentation):
                raise ValueError(
                    f"{owner}: task {name!r} is fed_by={spec.fed_by!r}, which is not a segmentation task of "
                    f"{list(parsed)}"
                )
    return parsed


def select(features: Any, index: Sequence[int]) -> Tensor:
    """``features[i0][i1]...``: the deepest feature map of a multi-scale encoder output."""
    for i in index:
        features = features[i]
    if not isinstance(features, Tensor):
        raise TypeError(f"encoder output at index {list(index)} is {type(features).__name__}, expected a Tensor")
    return features


class Deepest(nn.Module):
    """Runs ``head`` on one entry of a multi-scale encoder's output (``features[index...]``; the default
    ``(-1,)``: the deepest feature map), so a head written for one tensor sits on a UNet-style encoder.

    Example:
        >>> head = Deepest(torch.nn.Flatten())
        >>> tuple(head([torch.ones(1, 2, 4, 4), torch.ones(1, 3, 2, 2)]).shape)
        (1, 12)
    """

    def __init__(self, head: nn.Module, index: Sequence[int] = (-1,)) -> None:
        super().__init__()
        self.head = head
        self.index = tuple(index)

    def forward(self, features: Any) -> Any:
        return self.head(select(features, self.index))


class PooledClassifier(nn.Module):
    """Global average pooling, dropout and a linear layer: ``[B, C, *spatial] -> [B, classes]``."""

    def __init__(self, in_channels: int, classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        pooled: Tensor = self.linear(self.dropout(x.flatten(2).mean(2)))
        return pooled


_LAYERS: dict[int, tuple[type[nn.Module], type[nn.Module]]] = {
    1: (nn.Conv1d, nn.BatchNorm1d),
    2: (nn.Conv2d, nn.BatchNorm2d),
    3: (nn.Conv3d, nn.BatchNorm3d),
}
"""(convolution, batch norm) classes per number of spatial dimensions."""


def _layer_classes(spatial_dims: int) -> tuple[type[nn.Module], type[nn.Module]]:
    if spatial_dims not in _LAYERS:
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
    return _LAYERS[spatial_dims]


class FedClassifier(nn.Module):
    """A classification head reading the deepest features and a segmentation prediction.

    The segmentation logits are average-pooled to the deepest feature map's
    size, concatenated to it, mixed by a 3x3 convolution followed by batch
    normalization and ReLU, pooled globally and classified by a linear layer
    (works in 1D, 2D and 3D). The normalization is not optional decoration:
    segmentation logits grow during training (a Dice loss pushes them far from
    zero), and without it the mixing ReLU dies within a few dozen Adam steps,
    leaving a classifier that outputs the same logits for every image.

    Args:
        in_channels: channels of the deepest features.
        source_channels: channels of the segmentation prediction.
        classes: number of logits.
        spatial_dims: 1, 2 or 3.
        index: where the deepest features sit in the encoder output.
        dropout: dropout before the linear layer.
    """

    def __init__(
        self,
        in_channels: int,
        source_channels: int,
        classes: int,
        spatial_dims: int = 2,
        index: Sequence[int] = (-1,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.index = tuple(index)
        conv, norm = _layer_classes(spatial_dims)
        self.mix = conv(in_channels + source_channels, in_channels, 3, padding=1, bias=False)
        self.norm = norm(in_channels)
        self.classifier = PooledClassifier(in_channels, classes, dropout)

    def forward(self, features: Any, source: Tensor) -> Tensor:
        deep = select(features, self.index)
        if source.shape[2:] != deep.shape[2:]:
            size = deep.shape[2:]
            if deep.dim() == 3:
                source = F.adaptive_avg_pool1d(source, size[0])
            elif deep.dim() == 4:
                source = F.adaptive_avg_pool2d(source, (size[0], size[1]))
            else:
                source = F.adaptive_avg_pool3d(source, (size[0], size[1], size[2]))
        logits: Tensor = self.classifier(F.relu(self.norm(self.mix(torch.cat([deep, source], 1)))))
        return logits


def last_conv(module: nn.Module) -> tuple[str, _ConvNd]:
    """The last convolution registered in ``module`` (the output layer of a decoder or head)."""
    found = [(n, m) for n, m in module.named_modules() if isinstance(m, _ConvNd)]
    if not found:
        raise ValueError(f"{type(module).__name__} has no convolution to use as the output layer")
    return found[-1]


def resized_conv(conv: _ConvNd, out_channels: int) -> nn.Module:
    """A freshly initialized convolution like ``conv`` with ``out_channels`` outputs (same device and dtype)."""
    if out_channels % conv.groups:
        raise ValueError(
            f"cannot give the grouped output layer {type(conv).__name__} (groups={conv.groups}) "
            f"{out_channels} output channels; the class count must be a multiple of groups"
        )
    kwargs: dict[str, Any] = {
        "in_channels": conv.in_channels,
        "out_channels": out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
        "device": conv.weight.device,
        "dtype": conv.weight.dtype,
    }
    if isinstance(conv, _ConvTransposeNd):
        kwargs["output_padding"] = conv.output_padding
    bases = [c for c in type(conv).__mro__ if c.__module__ == "torch.nn.modules.conv" and not c.__name__.startswith("_")]
    try:
        new: nn.Module = type(conv)(**kwargs)
    except TypeError:  # a subclass with its own signature: fall back to the torch layer it extends
        if not bases:
            raise
        new = bases[0](**kwargs)
    return new.train(conv.training)


def with_classes(module: nn.Module, classes: int) -> nn.Module:
    """A copy of ``module`` whose last convolution has ``classes`` outputs (fresh), or the copy as is if it has."""
    result = copy.deepcopy(module)
    name, conv = last_conv(result)
    if conv.out_channels == classes:
        return result
    if not name:
        return resized_conv(conv, classes)
    parent_name, _, leaf = name.rpartition(".")
    setattr(result.get_submodule(parent_name), leaf, resized_conv(conv, classes))
    return result
