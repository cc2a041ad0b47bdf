"""Uniform noise on the encoder slices, drawn into preallocated flat buffers.

Drawing noise dominates the extra cost of a cooperative step on CPU, so it
is done with as few passes over memory as possible: one call of the
generator fills 64 random bits per four parameters (``int64.random_``), the
bits are read as four 16-bit integers ``k``, made odd (``k | 1``, one pass
over the 64-bit words) and mapped to ``eps = k * b / 2**15``. The noise is
therefore uniform on a lattice of 32,768 equally spaced points, symmetric
about zero and strictly inside ``(-b, b)``; the spacing (``b / 16384``,
3.1e-6 for ``b = 0.05``) is far below anything a forward pass in float32
resolves. The buffers are allocated
once and reused at every step (fresh allocations page-fault on CPU).

With ``relative=True`` the bound is a fraction of each slice's current
root-mean-square value: ``eps_k ~ U(-b * rms(theta_k), b * rms(theta_k))``,
the scales taken with one ``torch._foreach_norm`` at every draw. A slice that
is all zeros (a freshly initialised bias) then gets no noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["UniformNoise"]

_LATTICE_HALF = 32768.0
_LOW_BIT_OF_EACH_INT16 = 0x0001000100010001  # the same mask on little- and big-endian machines


@dataclass
class _Group:
    """The slices of one (device, dtype): one flat buffer row per noise sample."""

    device: torch.device
    values: Tensor  # [samples, numel]
    bits: Tensor  # int64 scratch, 64 random bits per four entries
    task_ranges: list[tuple[int, int]]  # [start, end) of each task's slices in a row
    params: list[list[Tensor]]  # per task, its parameters in this group
    offsets: list[list[int]]  # per task, each parameter's start in a row


def _merged(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if b <= a:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


class UniformNoise:
    """Noise ``eps ~ U(-b, b)`` for chosen tasks' encoder slices, ``samples`` draws at a time.

    Args:
        task_params: per task, its encoder slices (theta_i) with their names, in task order.
        samples: number M of independent draws held at once.
        generators: one ``torch.Generator`` per device the slices live on.
        relative: the bound is a fraction of each slice's root-mean-square value.
    """

    def __init__(
        self,
        task_params: Sequence[Sequence[tuple[str, Tensor]]],
        samples: int,
        generators: dict[torch.device, torch.Generator],
        relative: bool = False,
    ) -> None:
        self.samples = samples
        self.generators = generators
        self.relative = relative
        keys: list[tuple[torch.device, torch.dtype]] = []
        for named in task_params:
            for _, p in named:
                if (p.device, p.dtype) not in keys:
                    keys.append((p.device, p.dtype))
        self._groups: list[_Group] = []
        for device, dtype in keys:
            per_task = [[p for _, p in named if p.device == device and p.dtype == dtype] for named in task_params]
            offsets, ranges, pos = [], [], 0
            for params in per_task:
                start = pos
                task_offsets = []
                for p in params:
                    task_offsets.append(pos)
                    pos += p.numel()
                offsets.append(task_offsets)
                ranges.append((start, pos))
            values = torch.empty(samples, pos, device=device, dtype=dtype)
            bits = torch.empty((samples * pos + 3) // 4, device=device, dtype=torch.int64)
            self._groups.append(_Group(device, values, bits, ranges, per_task, offsets))
        self._views = [[self._make_views(t, j) for j in range(samples)] for t in range(len(task_params))]
        self._stacked = [self._make_stacked(t) for t in range(len(task_params))]
        self._params = [[p for g in self._groups for p in g.params[t]] for t in range(len(task_params))]
        names = {id(p): n for named in task_params for n, p in named}
        self._names = [[names[id(p)] for p in params] for params in self._params]
        # 1 / sqrt(numel) per slice turns a norm into a root-mean-square (empty slices: any finite factor)
        self._rms_factors = [[1.0 / math.sqrt(max(p.numel(), 1)) for p in params] for params in self._params]

    def draw(self, tasks: Sequence[int], bound: float) -> None:
        """Fill the buffers of ``tasks`` with fresh noise in ``(-bound, bound)`` for every sample."""
        scale = bound / _LATTICE_HALF
        for g in self._groups:
            ranges = _merged([g.task_ranges[t] for t in sorted(tasks)])
            width = sum(b - a for a, b in ranges)
            if width == 0:
                continue
            words = (self.samples * width + 3) // 4
            bits = g.bits[:words].random_(-(2**63), None, generator=self.generators[g.device])
            bits.bitwise_or_(_LOW_BIT_OF_EACH_INT16)
            lattice = bits.view(torch.int16)[: self.samples * width].view(self.samples, width)
            pos = 0
            for a, b in ranges:
                block = g.values[:, a:b]
                block.copy_(lattice[:, pos : pos + b - a])
                block.mul_(scale)
                pos += b - a
        if self.relative:
            self._scale_by_rms(tasks)

    def _scale_by_rms(self, tasks: Sequence[int]) -> None:
        """Multiply each slice's noise by the slice's current root-mean-square value."""
        for t in tasks:
            params = self._params[t]
            if not params:
                continue
            with torch.no_grad():
                rms = torch._foreach_norm(params)
                torch._foreach_mul_(rms, self._rms_factors[t])
                for sample in range(self.samples):
                    torch._foreach_mul_(self._views[t][sample], rms)

    def _make_views(self, task: int, sample: int) -> list[Tensor]:
        return [
            g.values[sample, off : off + p.numel()].view(p.shape)
            for g in self._groups
            for p, off in zip(g.params[task], g.offsets[task])
        ]

    def _make_stacked(self, task: int) -> list[Tensor]:
        return [
            g.values[:, off : off + p.numel()].view(self.samples, *p.shape)
            for g in self._groups
            for p, off in zip(g.params[task], g.offsets[task])
        ]

    def noise(self, task: int, sample: int) -> list[Tensor]:
        """Views of the last draw for ``task``'s slices in ``sample`` (same order as its parameters)."""
        return self._views[task][sample]

    def stacked_noise(self, task: int) -> list[Tensor]:
        """Views ``[samples, *shape]`` of the last draw for ``task``'s slices, for ``vmap``."""
        return self._stacked[task]

    def parameters(self, task: int) -> list[Tensor]:
        """``task``'s slices in the order used by :meth:`noise`."""
        return list(self._params[task])

    def names(self, task: int) -> list[str]:
        """Names (relative to the model) of ``task``'s slices in the order used by :meth:`noise`."""
        return self._names[task]
