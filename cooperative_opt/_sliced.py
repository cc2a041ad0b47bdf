"""Slice-by-slice evaluation of layers whose weight is a concatenation of task slices.

A channel-split layer (``adapters.split_channels``) reads its weight as
``torch.cat([theta_1, ..., theta_T])`` along the output channels and runs one
convolution or matrix product over it. During task ``i``'s update only
``theta_i`` needs a gradient, but autograd sees one weight that requires a
gradient and computes the whole weight gradient, half of a layer's backward
cost, then throws the other tasks' rows away.

:class:`SlicedLayers` is a :class:`torch.overrides.TorchFunctionMode` that,
while active (and grad mode is on), notes each ``torch.cat`` along dimension
0 of two or more tensors of which some require a gradient and some do not
(the trained task's slice next to the other tasks' noisy or detached
slices), and evaluates a ``conv1d/2d/3d`` (``groups == 1``) or ``linear``
call whose weight *is* such a concatenation, read by the very next layer
call as a channel-split module does, as one call per piece, concatenated
along the output channels. The result is the same function (a convolution's
output channel ``c`` depends only on row ``c`` of the weight), and autograd
now skips the weight gradient of every piece that needs none. Anything else
(transposed convolutions, grouped convolutions, a cat along another
dimension or of pieces that all, or none, require a gradient, weights
transformed before use) runs unchanged.

Under ``torch.compile`` dynamo inlines the mode into the compiled graph, so
the slicing survives compilation. Every decision is made from what dynamo
already guards on (the function called, grad mode, the pieces'
``requires_grad`` and dimensions) or traces exactly (``is`` between tensors
of the same graph); nothing depends on a tensor's ``id()``, which would
install an identity guard on every noise buffer and detached alias and
recompile whenever they are recreated. The pending concatenations live in a
short list on the mode (the weight's and the bias's, read just before the
layer call), emptied by each layer call and by :meth:`SlicedLayers.forget`
when ``perturb`` exits, so no concatenation outlives its forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["SlicedLayers"]

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVS: dict[Callable[..., Tensor], int] = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_CATS = (torch.cat, torch.concat, torch.concatenate)
#: A layer reads its weight and then its bias: the two concatenations it may use.
_PENDING = 2

_Split = tuple[tuple[Tensor, ...], list[Tensor | None]]


def _bound(names: Sequence[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _sliceable(tensors: object, dim: object) -> bool:
    """A cat worth remembering: along dimension 0, of two or more tensors, some but not all needing a gradient."""
    if not isinstance(tensors, (list, tuple)) or len(tensors) < 2 or not all(isinstance(t, Tensor) for t in tensors):
        return False
    first = tensors[0]
    if not isinstance(dim, int) or first.dim() == 0 or dim not in (0, -first.dim()):
        return False
    grads = [t.requires_grad for t in tensors]
    return any(grads) and not all(grads)


class SlicedLayers(TorchFunctionMode):
    """Evaluate convolutions and linear layers on concatenated task slices slice by slice.

    Enter it around a forward in which the trained task's slices require a
    gradient and the other tasks' stand-ins do not; it is what
    ``CooperativeOptimizer(sliced_layers=True)`` enters inside ``perturb``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: list[tuple[Tensor, tuple[Tensor, ...]]] = []

    def forget(self) -> None:
        """Drop the concatenations no layer has read (call it after leaving the mode)."""
        self._pending = []

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
        if torch.is_grad_enabled() and _sliceable(tensors, bound.get("dim", bound.get("axis", 0))):
            self._pending = [*self._pending[1 - _PENDING :], (out, tuple(tensors))]  # type: ignore[arg-type]
        return out

    def _pieces(self, tensor: Tensor | None) -> tuple[Tensor, ...] | None:
        for out, pieces in self._pending:
            if out is tensor:
                return pieces
        return None

    def _split(self, weight: Any, bias: Tensor | None, ok: bool) -> _Split | None:
        """The weight's pieces and a bias per piece, or ``None`` to run the layer whole; empties the pending list."""
        pieces = self._pieces(weight) if ok and isinstance(weight, Tensor) else None
        bias_pieces = self._pieces(bias) if pieces is not None and bias is not None else None
        self._pending = []
        if pieces is None:
            return None
        if bias is None:
            return pieces, [None] * len(pieces)
        if bias_pieces is not None and [b.shape[0] for b in bias_pieces] == [w.shape[0] for w in pieces]:
            return pieces, list(bias_pieces)
        return pieces, list(torch.split(bias, [w.shape[0] for w in pieces]))

    def _conv(self, func: Callable[..., Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        bound = _bound(_CONV_ARGS, args, kwargs)
        weight, bias = bound.pop("weight", None), bound.pop("bias", None)
        split = self._split(weight, bias, bound.get("groups", 1) == 1)
        if split is None:
            return func(*args, **kwargs)
        x = bound.pop("input")
        channels = 1 if x.dim() == _CONVS[func] + 2 else 0  # batched or unbatched input
        return _per_slice(lambda w, b: func(x, w, b, **bound), *split, channels)

    def _linear(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        bound = _bound(("input", "weight", "bias"), args, kwargs)
        weight, bias = bound.get("weight"), bound.get("bias")
        split = self._split(weight, bias, isinstance(weight, Tensor) and weight.dim() == 2)
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
