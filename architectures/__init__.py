"""Multi-task networks for 2D images and 3D volumes: HPS, STL, MTAN and CTAN.

Every network is built from task specs (:class:`PixelTask`,
:class:`ImageTask`) and a :class:`Backbone`, and satisfies
:class:`MultiTaskNetwork`: ``net(x, task)``, ``net.forward_all(x)``, and a
partition of its parameters into what every task reads (``shared()``), what
a task owns but others read (``task_encoder(t)``) and what only a task reads
(``task_head(t)``). :func:`cooperative` turns any of them into MT-COOL's
tasks and parameter ownership.

- :func:`joint`: hard parameter sharing (one encoder, one head per task);
- :func:`independent`: single-task learning (the same network, one task);
- :func:`mtan`: Liu et al.'s multi-task attention network (CVPR 2019);
- :func:`ctan`: this project's reconstruction of the cross-task attention
  network (Kim et al., MICCAI 2023 workshops).

See ``docs/architectures.md``.
"""

from __future__ import annotations

from architectures._backbone import Backbone, Encoder
from architectures._ctan import CTAN, LAYER_SCALE, CrossTaskAttention, ctan
from architectures._decoder import PixelHead, UNetDecoder
from architectures._hps import HardSharingNetwork, independent, joint
from architectures._mtan import MTAN, AttentionMask, mtan
from architectures._protocol import MultiTaskNetwork, cooperative
from architectures._specs import ImageTask, PixelTask, TaskSpec

__all__ = [
    "CTAN",
    "LAYER_SCALE",
    "MTAN",
    "AttentionMask",
    "Backbone",
    "CrossTaskAttention",
    "Encoder",
    "HardSharingNetwork",
    "ImageTask",
    "MultiTaskNetwork",
    "PixelHead",
    "PixelTask",
    "TaskSpec",
    "UNetDecoder",
    "cooperative",
    "ctan",
    "independent",
    "joint",
    "mtan",
]
