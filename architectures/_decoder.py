"""The UNet decoder (2D and 3D) of pixel-level tasks, and the head each task spec gets.

A pixel task's head decodes a multi-scale feature list (shallowest first)
with one :class:`DecoderBlock` per skip: upsample to the skip's size, concat,
two conv-norm-ReLU; a 1x1 convolution gives the task's maps at the
resolution of the shallowest features (the input resolution for the
built-in encoder and smp encoders). An image task's head is
``adapters.PooledClassifier`` on the deepest features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters import PooledClassifier
from adapters import Deepest
from architectures._backbone import ConvNormAct, layers
from architectures._specs import ImageTask, PixelTask, TaskSpec

__all__ = ["DecoderBlock", "PixelHead", "UNetDecoder", "decoder_widths", "task_head"]


def decoder_widths(channels: Sequence[int]) -> tuple[int, ...]:
    """Output channels of the decoder at each level: the encoder's, except a thin first level.

    The first feature map of an smp encoder is the input itself (3 channels
    for RGB), which would starve the last decoder block; that level gets at
    least half the width of the next.

    >>> decoder_widths((3, 64, 64, 128))
    (32, 64, 64, 128)
    """
    widths = list(channels)
    if len(widths) > 1:
        widths[0] = max(widths[0], widths[1] // 2)
    return tuple(widths)


class DecoderBlock(nn.Module):
    """Upsample ``x`` to ``skip``'s size (nearest), concatenate, then ``first`` and ``second`` conv-norm-ReLU."""

    def __init__(self, dims: int, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.first = ConvNormAct(dims, in_channels + skip_channels, out_channels)
        self.second = ConvNormAct(dims, out_channels, out_channels)

    @staticmethod
    def merge(x: Tensor, skip: Tensor) -> Tensor:
        """``cat(upsample(x), skip)`` along the channels: the input of ``first``."""
        return torch.cat([F.interpolate(x, size=skip.shape[2:], mode="nearest"), skip], 1)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        out: Tensor = self.second(self.first(self.merge(x, skip)))
        return out


class UNetDecoder(nn.Module):
    """Decodes ``[f_0, ..., f_{L-1}]`` (channels ``channels``) to ``[N, out_channels, *f_0.spatial]``.

    ``blocks[i]`` handles level ``L - 2 - i`` (deepest first); ``out_channels``
    is ``decoder_widths(channels)[0]``. With one feature map it is the identity.
    """

    def __init__(self, dims: int, channels: Sequence[int]) -> None:
        super().__init__()
        widths = decoder_widths(channels)
        self.widths = widths
        self.out_channels = widths[0]
        levels = range(len(channels) - 2, -1, -1)
        self.blocks = nn.ModuleList(DecoderBlock(dims, widths[k + 1], channels[k], widths[k]) for k in levels)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        x = features[-1]
        for block, skip in zip(self.blocks, reversed(features[:-1])):
            x = block(x, skip)
        return x


class PixelHead(nn.Module):
    """A pixel task's head: :class:`UNetDecoder` then a 1x1 convolution to ``classes`` maps.

    Example:
        >>> head = PixelHead(2, (4, 8), 3)
        >>> head([torch.zeros(1, 4, 8, 8), torch.zeros(1, 8, 4, 4)]).shape
        torch.Size([1, 3, 8, 8])
    """

    def __init__(self, dims: int, channels: Sequence[int], classes: int) -> None:
        super().__init__()
        self.decoder = UNetDecoder(dims, channels)
        self.output = layers(dims).conv(self.decoder.out_channels, classes, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        out: Tensor = self.output(self.decoder(features))
        return out


def task_head(spec: TaskSpec, dims: int, channels: Sequence[int]) -> nn.Module:
    """The head of ``spec`` reading a feature list of ``channels``: a :class:`PixelHead` or a pooled linear layer."""
    if isinstance(spec, PixelTask):
        return PixelHead(dims, channels, spec.channels)
    if isinstance(spec, ImageTask):
        return Deepest(PooledClassifier(channels[-1], spec.outputs))
    raise TypeError(f"spec must be a PixelTask or an ImageTask, got {type(spec).__name__}")
