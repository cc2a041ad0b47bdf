"""Slice-by-slice evaluation of layers whose weight is a concatenation of task slices.

A channel-split layer (``adapters.split_channels``) reads its weight as
``torch.cat([theta_1, ..., theta_T])`` along the output channels and runs one
convolution or matrix product over it. During task ``i``'s update only
``theta_i`` needs a gradient, but autograd sees one weight that requires a
gradient and computes the whole weight gradient, half of a layer's backward
cost, then throws the other tasks' rows away.

:class:`SlicedLayers` is a :class:`torch.overrides.TorchFunctionMode` that,
while active, remembers which tensors are ``torch.cat`` of task slices along
dimension 0 and evaluates ``conv1d/2d/3d`` (``groups == 1``) and ``linear``
calls on such a weight as one call per slice, concatenated along the output
channels. The result is the same function (a convolution's output channel
``c`` depends only on row ``c`` of the weight), and autograd now skips the
weight gradient of every slice that is not being trained. Anything else
(transposed convolutions, grouped convolutions, a cat that is not of task
slices, weights transformed before use) runs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["SlicedLayers"]

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVS: dict[Callable[..., Tensor], int] = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_CATS = (torch.cat, torch.concat, torch.concatenate)


def _bound(names: Sequence[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


class SlicedLayers(TorchFunctionMode):
    """Evaluate convolutions and linear layers on concatenated task slices slice by slice.

    Args:
        slices: the tensors that are task slices in this forward (the model's
            slice parameters and any values standing in for them, such as
            noisy copies). Only a ``torch.cat`` of two or more of these along
            dimension 0 is treated as a split weight.
    """

    def __init__(self, slices: Iterable[Tensor]) -> None:
        super().__init__()
        self._slices = {id(t) for t in slices}
        self._pieces: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def track(self, slices: Iterable[Tensor]) -> None:
        """Replace the tensors that count as task slices (their storages changed, e.g. after ``model.to``)."""
        self._slices = {id(t) for t in slices}

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _CATS:
            return self._cat(func, args, kwargs)
        if func in _CONVS:
            return self._conv(func, args, kwargs)
        if func is F.linear:
            return self._linear(args, kwargs)
        return func(*args, **kwargs)

    def _cat(self, func: Callable[..., Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        out = func(*args, **kwargs)
        bound = _bound(("tensors", "dim"), args, kwargs)
        tensors = bound.get("tensors")
        dim = bound.get("dim", bound.get("axis", 0))  # torch.concatenate calls it axis
        if (
            isinstance(tensors, (list, tuple))
            and len(tensors) > 1
            and all(isinstance(t, Tensor) and id(t) in self._slices for t in tensors)
            and dim in (0, -out.dim())
        ):
            self._pieces[out] = tuple(tensors)
        return out

    def _split(self, weight: Tensor, bias: Tensor | None) -> tuple[tuple[Tensor, ...], list[Tensor | None]] | None:
        if weight not in self._pieces:
            return None
        pieces: tuple[Tensor, ...] = self._pieces[weight]
        if bias is None:
            return pieces, [None] * len(pieces)
        bias_pieces: tuple[Tensor, ...] | None = self._pieces[bias] if bias in self._pieces else None
        if bias_pieces is not None and [b.shape[0] for b in bias_pieces] == [w.shape[0] for w in pieces]:
            return pieces, list(bias_pieces)
        return pieces, list(torch.split(bias, [w.shape[0] for w in pieces]))

    def _conv(self, func: Callable[..., Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        bound = _bound(_CONV_ARGS, args, kwargs)
        weight, bias = bound.pop("weight", None), bound.pop("bias", None)
        split = self._split(weight, bias) if isinstance(weight, Tensor) and bound.get("groups", 1) == 1 else None
        if split is None:
            return func(*args, **kwargs)
        x = bound.pop("input")
        channels = 1 if x.dim() == _CONVS[func] + 2 else 0  # batched or unbatched input
        return _per_slice(lambda w, b: func(x, w, b, **bound), *split, channels)

    def _linear(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        bound = _bound(("input", "weight", "bias"), args, kwargs)
        weight, bias = bound.get("weight"), bound.get("bias")
        split = self._split(weight, bias) if isinstance(weight, Tensor) and weight.dim() == 2 else None
        if split is None:
            return F.linear(*args, **kwargs)
        x = bound["input"]
        return _per_slice(lambda w, b: F.linear(x, w, b), *split, -1)


def _per_slice(
    layer: Callable[[Tensor, Tensor | None], Tensor],
    pieces: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    channels: int,
) -> Tensor:
    """``layer`` once per non-empty weight slice, outputs concatenated along dimension ``channels``."""
    return torch.cat([layer(w, b) for w, b in zip(pieces, biases) if w.shape[0] > 0], channels)
