"""CTAN: a reconstruction of the Cross-Task Attention Network (Kim, Purdie, McIntosh, MICCAI 2023 workshops).

The paper names two components and no public code exists; this module is
this project's reading of them (every choice the abstract does not state is
listed, with its reason, in ``docs/architectures.md``, "CTAN: this project's
reconstruction"):

- one encoder stream per task, each built from the same :class:`Backbone`;
- CTAE (cross-task attention encoder): at the chosen encoder stages, each
  task's feature map attends to the other tasks' maps of that stage
  (:class:`CrossTaskAttention`), and the result is added back to its stream
  before the stream's next stage;
- CTAB (cross-task attention bottleneck): the same once more over the
  deepest features;
- pixel tasks decode their own stream (UNet skips from their own stages),
  image tasks pool their own deepest features.

Every parameter belongs to one task: ``task_encoder(t)`` is ``t``'s stream
with its CTAE and CTAB modules (other tasks read the stream), and
``task_head(t)`` its decoder or classifier.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Final, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from architectures._backbone import Backbone, Encoder, adaptive_avg_pool, encoder_channels
from architectures._decoder import task_head
from architectures._hps import check_backbone
from architectures._specs import TaskSpec, parse_tasks

__all__ = ["CTAN", "LAYER_SCALE", "CrossTaskAttention", "ctan"]

LAYER_SCALE: Final[float] = 0.1
"""Initial value of the per-channel scale of the attention branch (LayerScale, Touvron et al. 2021).

Small, so each stream starts close to its single-task network, but not zero:
a zero-initialised branch would make the other tasks invisible at
initialisation (MT-COOL's perturbation of them would change nothing) and
give the query and key projections no gradient in the first step.
"""


class CrossTaskAttention(nn.Module):
    """One task's features attend to the other tasks' features; the result is added back.

    ``forward(x, others)``: every position of ``x`` ``[N, C, *spatial]`` (2D
    or 3D) is a query; the keys and values are the tokens of each map in
    ``others`` (each ``[N, C, *spatial']``) average-pooled to at most
    ``tokens`` cells per spatial dimension, so the cost is linear in the
    number of positions. Pre-norm (LayerNorm over channels on queries and
    tokens), multi-head scaled dot-product attention, an output projection
    and a learnable per-channel scale (initialised to :data:`LAYER_SCALE`):
    ``x + scale * attention(norm(x), norm(tokens))``, same shape as ``x``.

    Args:
        channels: C.
        heads: attention heads; the inner width is ``heads * ceil(C / heads)``.
        tokens: pooled cells per spatial dimension of each other task's map.

    Example:
        >>> attend = CrossTaskAttention(8, heads=2, tokens=2)
        >>> attend(torch.zeros(1, 8, 4, 4, 4), [torch.ones(1, 8, 4, 4, 4)]).shape
        torch.Size([1, 8, 4, 4, 4])
    """

    def __init__(self, channels: int, heads: int = 4, tokens: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.tokens = tokens
        inner = heads * math.ceil(channels / heads)
        self.norm_query = nn.LayerNorm(channels)
        self.norm_source = nn.LayerNorm(channels)
        self.query = nn.Linear(channels, inner)
        # no key bias: it adds the same score to every key of a query, which softmax ignores (zero gradient)
        self.key = nn.Linear(channels, inner, bias=False)
        self.value = nn.Linear(channels, inner, bias=False)  # a value bias is the output projection's bias
        self.output = nn.Linear(inner, channels)
        self.scale = nn.Parameter(torch.full((channels,), LAYER_SCALE))

    def forward(self, x: Tensor, others: Sequence[Tensor]) -> Tensor:
        queries = x.flatten(2).transpose(1, 2)  # [N, S, C]
        sources = torch.cat([adaptive_avg_pool(o, self.tokens).flatten(2) for o in others], 2).transpose(1, 2)
        sources = self.norm_source(sources)  # [N, K, C]

        def split(t: Tensor) -> Tensor:  # [N, L, heads * d] -> [N, heads, L, d]
            return t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            split(self.query(self.norm_query(queries))), split(self.key(sources)), split(self.value(sources))
        )
        update: Tensor = self.output(attended.transpose(1, 2).flatten(2)) * self.scale  # [N, S, C]
        return x + update.transpose(1, 2).reshape(x.shape)


class _TaskStream(nn.Module):
    """One task's encoder stream with its CTAE modules (by stage) and its CTAB module."""

    def __init__(self, encoder: nn.Module, attention: Mapping[int, CrossTaskAttention],
                 bottleneck: CrossTaskAttention | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.attention = nn.ModuleDict({str(s): m for s, m in attention.items()})
        self.bottleneck = bottleneck


class CTAN(nn.Module):
    """The cross-task attention network (built by :func:`ctan`).

    ``shared()`` is ``None``; ``task_encoder(t)`` is ``t``'s stream with its
    CTAE and CTAB modules; ``task_head(t)`` its decoder or classifier.
    """

    def __init__(self, tasks: Mapping[str, TaskSpec], backbone: Backbone, streams: Mapping[str, nn.Module],
                 encoder_stages: tuple[int, ...], bottleneck: bool, heads: int, tokens: int) -> None:
        super().__init__()
        self.specs = dict(tasks)
        self.channels = encoder_channels(next(iter(streams.values())))
        self.encoder_stages = encoder_stages
        self.bottleneck = bottleneck
        self.staged = all(isinstance(s, Encoder) for s in streams.values())
        deepest = self.channels[-1]
        self.encoders = nn.ModuleDict({
            t: _TaskStream(
                encoder,
                {s: CrossTaskAttention(self.channels[s], heads, tokens) for s in encoder_stages},
                CrossTaskAttention(deepest, heads, tokens) if bottleneck else None,
            )
            for t, encoder in streams.items()
        })
        self.heads = nn.ModuleDict({t: task_head(s, backbone.dims, self.channels) for t, s in self.specs.items()})

    @property
    def task_names(self) -> tuple[str, ...]:
        """The tasks, in order."""
        return tuple(self.specs)

    @property
    def cross_task(self) -> bool:
        """Whether any stream reads another (CTAE at some stage, or CTAB)."""
        return bool(self.encoder_stages) or self.bottleneck

    def _check_task(self, task: str) -> None:
        if task not in self.specs:
            raise ValueError(f"unknown task {task!r}; this network's tasks are {list(self.specs)}")

    def _stream(self, task: str) -> _TaskStream:
        return cast(_TaskStream, self.encoders[task])

    def shared(self) -> None:
        """``None``: no parameter is read by every task as one."""
        return None

    def task_encoder(self, task: str) -> nn.Module:
        """Task ``task``'s stream with its CTAE and CTAB modules (the other tasks read the stream)."""
        self._check_task(task)
        return self._stream(task)

    def task_head(self, task: str) -> nn.Module:
        """Task ``task``'s decoder (pixel task) or pooled classifier (image task)."""
        self._check_task(task)
        head: nn.Module = self.heads[task]
        return head

    def _attend(self, stage: int, maps: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every stream's map after its cross-task attention over the others' maps of the same stage."""
        key = str(stage)
        return {t: self._stream(t).attention[key](m, [o for u, o in maps.items() if u != t]) for t, m in maps.items()}

    def _run(self, task: str, x: Tensor) -> list[Tensor]:
        features = self._stream(task).encoder(x)
        if not isinstance(features, (list, tuple)) or len(features) != len(self.channels):
            raise ValueError(
                f"the encoder of task {task!r} returned {type(features).__name__} of length "
                f"{len(features) if isinstance(features, (list, tuple)) else '-'}; Backbone.encoder must build a "
                f"module returning one feature map per entry of out_channels {self.channels}"
            )
        return list(features)

    def features(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, list[Tensor]]:
        """Each task's multi-scale features after CTAE and CTAB, shallowest first.

        All streams run (each reads the others); CTAB is applied for ``tasks``
        only (default: all), since no other task reads its output.
        """
        wanted = list(self.task_names if tasks is None else tasks)
        for task in wanted:
            self._check_task(task)
        running = list(self.task_names) if self.cross_task else wanted
        if self.staged:
            maps = {t: x for t in running}
            feats: dict[str, list[Tensor]] = {t: [] for t in running}
            for s in range(len(self.channels)):
                maps = {t: cast(Encoder, self._stream(t).encoder).stages[s](m) for t, m in maps.items()}
                if s in self.encoder_stages:
                    maps = self._attend(s, maps)
                for t, m in maps.items():
                    feats[t].append(m)
        else:  # an opaque encoder: CTAE acts on its output maps (see docs/architectures.md)
            feats = {t: self._run(t, x) for t in running}
            for s in self.encoder_stages:
                for t, m in self._attend(s, {t: f[s] for t, f in feats.items()}).items():
                    feats[t][s] = m
        deep = {t: f[-1] for t, f in feats.items()}
        for t in wanted:
            bottleneck = self._stream(t).bottleneck
            if bottleneck is not None:
                feats[t][-1] = bottleneck(deep[t], [m for u, m in deep.items() if u != t])
        return {t: feats[t] for t in wanted}

    def forward(self, x: Tensor, task: str) -> Tensor:
        """Task ``task``'s prediction: ``[N, channels, *spatial]`` (pixel) or ``[N, outputs]`` (image)."""
        features = self.features(x, [task])[task]
        out: Tensor = self.heads[task](features)
        return out

    def forward_all(self, x: Tensor) -> dict[str, Tensor]:
        """Every task's prediction from one pass of all streams."""
        feats = self.features(x)
        return {t: self.heads[t](f) for t, f in feats.items()}


def _check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ctan: {name} must be an int >= 1, got {value!r}")
    return value


def _check_stages(encoder_stages: Sequence[int] | None, levels: int) -> tuple[int, ...]:
    if encoder_stages is None:
        return tuple(range(1, levels - 1))
    valid = list(range(levels - 1))
    if isinstance(encoder_stages, (str, bytes)) or not isinstance(encoder_stages, Sequence):
        raise TypeError(
            f"ctan: encoder_stages must be a sequence of stage indices from {valid}, got {encoder_stages!r}"
        )
    bad = [s for s in encoder_stages if isinstance(s, bool) or not isinstance(s, int) or s not in valid]
    if bad or len(set(encoder_stages)) != len(encoder_stages):
        raise ValueError(
            f"ctan: encoder_stages must be distinct stage indices from {valid} (the encoder has {levels} stages; "
            f"the deepest, {levels - 1}, is the bottleneck's: use bottleneck=True), got {list(encoder_stages)}"
        )
    return tuple(sorted(encoder_stages))


def ctan(
    tasks: Mapping[str, TaskSpec],
    backbone: Backbone,
    *,
    encoder_stages: Sequence[int] | None = None,
    bottleneck: bool = True,
    heads: int = 4,
    tokens: int | None = None,
) -> CTAN:
    """The cross-task attention network (this project's reconstruction; see ``docs/architectures.md``).

    Args:
        tasks: ``{name: PixelTask(channels) | ImageTask(outputs)}``, two or more, in task order.
        backbone: the encoder each task's stream is built from (one
            ``backbone.build()`` per task). With the built-in encoder CTAE runs
            between stages (a stream's next stage reads its attended map); a
            user encoder runs whole, and CTAE acts on the maps it returns.
        encoder_stages: stages (indices into the feature list, shallowest 0)
            with a CTAE; default: every stage but the first (full resolution)
            and the deepest (the bottleneck). ``()`` for none.
        bottleneck: whether to apply the CTAB over the deepest features.
        heads: attention heads.
        tokens: pooled cells per spatial dimension of the other tasks' maps
            (keys and values); default 8 in 2D (64 tokens per task), 4 in 3D (64).

    Example:
        >>> from architectures import Backbone, ImageTask, PixelTask
        >>> net = ctan({"seg": PixelTask(2), "cls": ImageTask(3)}, Backbone(3, 1, (4, 8, 8)))
        >>> net(torch.zeros(2, 1, 8, 8, 8), "seg").shape
        torch.Size([2, 2, 8, 8, 8])
    """
    specs = parse_tasks(tasks, "ctan")
    backbone = check_backbone(backbone, "ctan")
    if not isinstance(bottleneck, bool):
        raise TypeError(f"ctan: bottleneck must be True or False, got {bottleneck!r}")
    heads = _check_int(heads, "heads")
    tokens = _check_int(tokens if tokens is not None else (8 if backbone.dims == 2 else 4), "tokens")
    streams = {t: backbone.build() for t in specs}
    channels = {t: encoder_channels(s) for t, s in streams.items()}
    if len(set(channels.values())) != 1:
        raise ValueError(f"ctan: Backbone.encoder built encoders of different out_channels {channels}")
    seen: dict[int, str] = {}
    for t, stream in streams.items():
        for p in stream.parameters():
            if seen.setdefault(id(p), t) != t:
                raise ValueError(
                    f"ctan: Backbone.encoder returned modules sharing parameters (tasks {seen[id(p)]!r} and {t!r}); "
                    "it must build a new encoder on every call, e.g. lambda: get_encoder(...)"
                )
    stages = _check_stages(encoder_stages, len(next(iter(channels.values()))))
    return CTAN(specs, backbone, streams, stages, bottleneck, heads, tokens)
