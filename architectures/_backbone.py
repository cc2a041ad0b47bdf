"""The encoder every network of :mod:`architectures` is built on, in 2D or 3D.

:class:`Backbone` describes the encoder; ``backbone.build()`` makes a fresh
one each call (CTAN builds one per task). The built-in encoder is a stack of
UNet stages (two conv-norm-ReLU layers each, a 2x max-pool before every stage
but the first) returning one feature map per stage, shallowest first. A user
encoder is any module returning such a list and carrying ``out_channels``
(the segmentation-models-pytorch encoder convention).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Backbone", "ConvNormAct", "Encoder", "Stage", "adaptive_avg_pool", "encoder_channels", "layers"]


class Layers(NamedTuple):
    """The layer classes of one number of spatial dimensions."""

    conv: type[nn.Conv2d] | type[nn.Conv3d]
    norm: type[nn.BatchNorm2d] | type[nn.BatchNorm3d]
    pool: type[nn.MaxPool2d] | type[nn.MaxPool3d]


_LAYERS: dict[int, Layers] = {
    2: Layers(nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d),
    3: Layers(nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d),
}


def layers(dims: int) -> Layers:
    """Conv, batch-norm and max-pool classes for ``dims`` (2 or 3) spatial dimensions."""
    if dims not in _LAYERS:
        raise ValueError(f"dims must be 2 (images) or 3 (volumes), got {dims!r}")
    return _LAYERS[dims]


def adaptive_avg_pool(x: Tensor, size: int) -> Tensor:
    """Average-pool ``x`` ``[N, C, *spatial]`` (2D or 3D) to at most ``size`` cells per spatial dimension."""
    grid = [min(size, s) for s in x.shape[2:]]
    if len(grid) == 2:
        return F.adaptive_avg_pool2d(x, (grid[0], grid[1]))
    return F.adaptive_avg_pool3d(x, (grid[0], grid[1], grid[2]))


class ConvNormAct(nn.Sequential):
    """Convolution (no bias: the norm has one), batch norm and ReLU: ``[N, in, *s] -> [N, out, *s]``."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, kernel: int = 3) -> None:
        conv, norm, _ = layers(dims)
        super().__init__(
            conv(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
            norm(out_channels),
            nn.ReLU(),
        )


class Stage(nn.Module):
    """One encoder stage: optional 2x max-pool, then two :class:`ConvNormAct` (``first``, ``second``).

    MTAN reads the intermediate features after ``first``; everything else calls the stage as a whole.
    """

    def __init__(self, dims: int, in_channels: int, out_channels: int, downsample: bool) -> None:
        super().__init__()
        self.pool: nn.Module = layers(dims).pool(2) if downsample else nn.Identity()
        self.first = ConvNormAct(dims, in_channels, out_channels)
        self.second = ConvNormAct(dims, out_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.second(self.first(self.pool(x)))
        return out


class Encoder(nn.Module):
    """The built-in encoder: ``len(widths)`` stages; ``forward(x)`` gives one map per stage, shallowest first.

    Stage ``s`` has ``widths[s]`` channels at ``1 / 2**s`` of the input size
    (the first at full resolution), so the list is
    ``[[N, widths[0], *S], [N, widths[1], *S/2], ...]``.

    Example:
        >>> import torch
        >>> [f.shape[1:] for f in Encoder(2, 1, (4, 8))(torch.zeros(1, 1, 8, 8))]
        [torch.Size([4, 8, 8]), torch.Size([8, 4, 4])]
    """

    def __init__(self, dims: int, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.out_channels = tuple(widths)
        ins = (in_channels, *widths[:-1])
        self.stages = nn.ModuleList(Stage(dims, i, o, downsample=s > 0) for s, (i, o) in enumerate(zip(ins, widths)))

    def forward(self, x: Tensor) -> list[Tensor]:
        features: list[Tensor] = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def _positive_ints(value: object) -> bool:
    return isinstance(value, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)


def encoder_channels(encoder: nn.Module, owner: str = "Backbone.encoder") -> tuple[int, ...]:
    """``encoder.out_channels`` as a tuple of channel counts, shallowest first (validated)."""
    channels = getattr(encoder, "out_channels", None)
    if not isinstance(channels, Sequence) or isinstance(channels, str) or not channels or not _positive_ints(channels):
        raise TypeError(
            f"{owner} must build a module whose out_channels lists the channels of the feature maps its forward "
            f"returns (as smp encoders do), got out_channels={channels!r} on {type(encoder).__name__}"
        )
    return tuple(int(c) for c in channels)


@dataclass(frozen=True)
class Backbone:
    """The encoder of a multi-task network (2D or 3D), as a recipe: :meth:`build` makes a fresh one.

    Args:
        dims: 2 (images ``[N, C, H, W]``) or 3 (volumes ``[N, C, D, H, W]``).
        in_channels: channels of the input.
        widths: channels of each stage of the built-in encoder (stage ``s`` at
            ``1 / 2**s`` of the input size); ignored when ``encoder`` is given.
        encoder: instead of the built-in encoder, a factory returning a new
            module on every call whose ``forward(x)`` returns a list of feature
            maps, shallowest first, the first at input resolution, and whose
            ``out_channels`` lists their channels, e.g.
            ``lambda: smp.encoders.get_encoder("resnet18", weights=None, depth=4)``.

    Example:
        >>> Backbone(dims=3, in_channels=1, widths=(8, 16)).build().out_channels
        (8, 16)
    """

    dims: int
    in_channels: int
    widths: tuple[int, ...] = (16, 32, 64, 128)
    encoder: Callable[[], nn.Module] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.dims, bool) or self.dims not in _LAYERS:
            raise ValueError(f"Backbone.dims must be 2 (images) or 3 (volumes), got {self.dims!r}")
        if isinstance(self.in_channels, bool) or not isinstance(self.in_channels, int) or self.in_channels < 1:
            raise ValueError(f"Backbone.in_channels must be an int >= 1, got {self.in_channels!r}")
        if isinstance(self.widths, str) or not _positive_ints(self.widths) or not self.widths:
            raise ValueError(
                f"Backbone.widths must be a non-empty sequence of ints >= 1 (channels per stage, e.g. (16, 32, 64)), "
                f"got {self.widths!r}"
            )
        object.__setattr__(self, "widths", tuple(self.widths))
        if self.encoder is not None and (isinstance(self.encoder, nn.Module) or not callable(self.encoder)):
            raise TypeError(
                "Backbone.encoder must be a factory (a callable with no arguments) returning a new encoder module "
                f"on every call, e.g. lambda: smp.encoders.get_encoder('resnet18', weights=None, depth=4); got "
                f"{type(self.encoder).__name__} (wrap a module class or function in a lambda)"
            )

    @property
    def builtin(self) -> bool:
        """Whether :meth:`build` makes the built-in :class:`Encoder`."""
        return self.encoder is None

    def build(self) -> nn.Module:
        """A new encoder with freshly initialized parameters (``out_channels`` says its feature widths)."""
        if self.encoder is None:
            return Encoder(self.dims, self.in_channels, self.widths)
        built = self.encoder()
        if not isinstance(built, nn.Module):
            raise TypeError(f"Backbone.encoder must return an nn.Module, got {type(built).__name__}")
        encoder_channels(built)
        return built
