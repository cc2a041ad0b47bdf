"""MTAN: the multi-task attention network of Liu, Johns and Davison (CVPR 2019), in 2D and 3D.

One shared network (the built-in encoder and, when there are pixel tasks, a
UNet decoder) that every task reads, and per task one soft-attention module
per block (:class:`AttentionMask`: Conv1x1-BN-ReLU-Conv1x1-BN-Sigmoid), as
in the authors' SegNet code (``lorenmt/mtan``, ``im2im_pred/model_segnet_mtan.py``):

- encoder block ``j``: the mask is computed from the shared block's
  intermediate features ``u_j`` (after its first conv), concatenated with the
  task's features ``t_j`` from block ``j - 1`` (block 0: ``u_0`` alone); the
  task's attended features are ``a_j = mask * p_j`` (``p_j`` the block's
  output); ``t_{j+1}`` is ``a_j`` through a shared 3x3 conv to the next width
  and the 2x max-pool.
- decoder block ``k``: the task's previous attended features are upsampled
  to the block's size and passed through a shared 3x3 conv to its width,
  concatenated with the block's intermediate features, and give the mask on
  the block's output.
- pixel tasks end with a private 1x1 convolution; image tasks pool their last
  attended encoder features (``adapters.PooledClassifier``).

``docs/architectures.md`` lists where this differs from the reference code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters import PooledClassifier
from architectures._backbone import Backbone, ConvNormAct, Encoder, Stage, layers
from architectures._decoder import DecoderBlock, UNetDecoder
from architectures._hps import check_backbone
from architectures._specs import PixelTask, TaskSpec, parse_tasks

__all__ = ["MTAN", "AttentionMask", "mtan"]


class AttentionMask(nn.Sequential):
    """Liu et al.'s attention module: ``[N, in, *s] -> [N, out, *s]`` in (0, 1).

    Conv1x1 (to ``middle``) - BN - ReLU - Conv1x1 (to ``out``) - BN - Sigmoid.
    """

    def __init__(self, dims: int, in_channels: int, middle: int, out_channels: int) -> None:
        conv, norm, _ = layers(dims)
        super().__init__(
            conv(in_channels, middle, 1), norm(middle), nn.ReLU(),
            conv(middle, out_channels, 1), norm(out_channels), nn.Sigmoid(),
        )


class _SharedNetwork(nn.Module):
    """What every task reads: the encoder, its bridges, and (for pixel tasks) the decoder and its bridges."""

    def __init__(self, dims: int, encoder: Encoder, decoder: bool) -> None:
        super().__init__()
        widths = encoder.out_channels
        self.encoder = encoder
        # a_j -> t_{j+1}: shared 3x3 conv to the next width (the max-pool is stage j + 1's)
        self.encoder_bridges = nn.ModuleList(
            ConvNormAct(dims, widths[j], widths[j + 1]) for j in range(len(widths) - 1)
        )
        self.decoder: UNetDecoder | None = None
        self.decoder_bridges: nn.ModuleList | None = None
        if decoder:
            self.decoder = UNetDecoder(dims, widths)
            levels = self.decoder.widths
            # upsampled task features of level k + 1 -> level k's width, before the mask of decoder level k
            self.decoder_bridges = nn.ModuleList(
                ConvNormAct(dims, levels[k + 1], levels[k]) for k in range(len(widths) - 2, -1, -1)
            )

    def encode(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The shared encoder's intermediate features ``u_j`` and block outputs ``p_j``."""
        inner: list[Tensor] = []
        outer: list[Tensor] = []
        for module in self.encoder.stages:
            stage = cast(Stage, module)
            u = stage.first(stage.pool(x))
            x = stage.second(u)
            inner.append(u)
            outer.append(x)
        return inner, outer

    def decode(self, outer: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The shared decoder's intermediate features and block outputs, deepest block first."""
        if self.decoder is None:  # pragma: no cover - only pixel tasks decode
            raise RuntimeError("this MTAN has no pixel task, so no decoder")
        inner: list[Tensor] = []
        blocks: list[Tensor] = []
        x = outer[-1]
        for module, skip in zip(self.decoder.blocks, reversed(outer[:-1])):
            block = cast(DecoderBlock, module)
            u = block.first(block.merge(x, skip))
            x = block.second(u)
            inner.append(u)
            blocks.append(x)
        return inner, blocks


class _TaskAttention(nn.Module):
    """One task's private part: its attention modules and its output layer."""

    def __init__(self, dims: int, spec: TaskSpec, widths: tuple[int, ...], decoder: UNetDecoder | None) -> None:
        super().__init__()
        self.encoder_masks = nn.ModuleList(
            AttentionMask(dims, w if j == 0 else 2 * w, w, w) for j, w in enumerate(widths)
        )
        self.decoder_masks: nn.ModuleList | None = None
        self.output: nn.Module
        if isinstance(spec, PixelTask):
            if decoder is None:  # pragma: no cover - MTAN builds a decoder when a pixel task exists
                raise RuntimeError("a pixel task needs the shared decoder")
            levels = decoder.widths
            self.decoder_masks = nn.ModuleList(
                AttentionMask(dims, 2 * levels[k], levels[k], levels[k]) for k in range(len(widths) - 2, -1, -1)
            )
            self.output = layers(dims).conv(decoder.out_channels, spec.channels, 1)
        else:
            self.output = PooledClassifier(widths[-1], spec.outputs)


class MTAN(nn.Module):
    """Liu et al.'s multi-task attention network (built by :func:`mtan`).

    ``shared()`` is the shared encoder and decoder, ``task_head(t)`` task
    ``t``'s attention modules and output layer; ``task_encoder(t)`` is ``None``.
    """

    def __init__(self, tasks: Mapping[str, TaskSpec], backbone: Backbone) -> None:
        super().__init__()
        encoder = backbone.build()
        if not isinstance(encoder, Encoder):  # pragma: no cover - mtan() refuses user encoders
            raise TypeError("MTAN needs the built-in encoder")
        self.specs = dict(tasks)
        pixel = any(isinstance(s, PixelTask) for s in self.specs.values())
        self.shared_network = _SharedNetwork(backbone.dims, encoder, decoder=pixel)
        widths = encoder.out_channels
        self.heads = nn.ModuleDict(
            {t: _TaskAttention(backbone.dims, s, widths, self.shared_network.decoder) for t, s in self.specs.items()}
        )

    @property
    def task_names(self) -> tuple[str, ...]:
        """The tasks, in order."""
        return tuple(self.specs)

    def _check_task(self, task: str) -> None:
        if task not in self.specs:
            raise ValueError(f"unknown task {task!r}; this network's tasks are {list(self.specs)}")

    def shared(self) -> nn.Module:
        """The shared encoder and decoder with their bridging convolutions."""
        return self.shared_network

    def task_encoder(self, task: str) -> None:
        """``None``: MTAN's task-specific modules are read by their task only."""
        self._check_task(task)
        return None

    def task_head(self, task: str) -> nn.Module:
        """Task ``task``'s attention modules and output layer."""
        self._check_task(task)
        head: nn.Module = self.heads[task]
        return head

    def _task(self, task: str, encoded: tuple[list[Tensor], list[Tensor]],
              decoded: tuple[list[Tensor], list[Tensor]] | None) -> Tensor:
        shared = self.shared_network
        head = cast(_TaskAttention, self.heads[task])
        inner, outer = encoded
        stages = shared.encoder.stages
        attended = inner[0]  # replaced at block 0
        for j, (mask, u, p) in enumerate(zip(head.encoder_masks, inner, outer)):
            attended = mask(u if j == 0 else torch.cat([u, attended], 1)) * p
            if j + 1 < len(outer):
                attended = cast(Stage, stages[j + 1]).pool(shared.encoder_bridges[j](attended))
        if head.decoder_masks is None:
            out: Tensor = head.output(attended)
            return out
        if decoded is None or shared.decoder_bridges is None:  # pragma: no cover - forward decodes for pixel tasks
            raise RuntimeError("a pixel task needs the shared decoder's features")
        for mask, bridge, u, q in zip(head.decoder_masks, shared.decoder_bridges, *decoded):
            attended = bridge(F.interpolate(attended, size=u.shape[2:], mode="nearest"))
            attended = mask(torch.cat([u, attended], 1)) * q
        out = head.output(attended)
        return out

    def forward(self, x: Tensor, task: str) -> Tensor:
        """Task ``task``'s prediction: ``[N, channels, *spatial]`` (pixel) or ``[N, outputs]`` (image)."""
        self._check_task(task)
        encoded = self.shared_network.encode(x)
        decoded = self.shared_network.decode(encoded[1]) if isinstance(self.specs[task], PixelTask) else None
        return self._task(task, encoded, decoded)

    def forward_all(self, x: Tensor) -> dict[str, Tensor]:
        """Every task's prediction from one pass of the shared network."""
        encoded = self.shared_network.encode(x)
        decoded = self.shared_network.decode(encoded[1]) if self.shared_network.decoder is not None else None
        return {t: self._task(t, encoded, decoded) for t in self.specs}


def mtan(tasks: Mapping[str, TaskSpec], backbone: Backbone) -> MTAN:
    """Liu et al.'s MTAN on the built-in encoder of ``backbone`` (2D or 3D).

    Args:
        tasks: ``{name: PixelTask(channels) | ImageTask(outputs)}``, two or more, in task order.
        backbone: a :class:`Backbone` without ``encoder=`` (the attention reads
            every block's intermediate features, which only the built-in encoder exposes).

    Example:
        >>> from architectures import Backbone, ImageTask, PixelTask
        >>> net = mtan({"seg": PixelTask(2), "cls": ImageTask(3)}, Backbone(2, 1, (4, 8)))
        >>> net(torch.zeros(2, 1, 8, 8), "seg").shape
        torch.Size([2, 2, 8, 8])
    """
    specs = parse_tasks(tasks, "mtan")
    backbone = check_backbone(backbone, "mtan")
    if not backbone.builtin:
        raise ValueError(
            "mtan: backbone has encoder=...; MTAN's attention reads the intermediate features inside every "
            "encoder block, which only the built-in encoder exposes; use Backbone(dims, in_channels, widths) "
            "without encoder="
        )
    return MTAN(specs, backbone)
