"""Split layers whose backward computes only the trained task's weight gradient.

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
call as a channel-split module does, through one autograd function: its
forward is the same single call on the whole weight (the same kernel and the
same result as without the mode, autocast's casts included), and its
backward computes the input's gradient over the whole weight and the weight
(and bias) gradient of each piece that needs one from that piece's own
output channels only (a convolution's output channel ``c`` depends only on
row ``c`` of the weight), with ``aten.convolution_backward``'s output mask or
one matrix product. The other pieces' weight gradients are never computed.
Anything else (transposed convolutions, grouped convolutions, asymmetric
``"same"`` padding, a cat along another dimension or of pieces that all, or
none, require a gradient, weights transformed before use) runs unchanged.
The backward is differentiable once: a second derivative through a sliced
layer (``create_graph=True`` and a gradient of the gradient) raises; use
``sliced_layers=False`` for that.

An earlier version ran the layer once per piece and concatenated the outputs:
the same saving in the backward, but an extra activation-sized concatenation
in the forward and an extra sum of the input's two gradients in the backward,
which cost more than the saving under bf16 autocast at 128 x 128 images
(docs/performance.md).

Under ``torch.compile`` dynamo inlines the mode into the compiled graph and
captures the autograd function whole (``autograd_function_apply``, forward and
backward), so the saving survives compilation. Every decision is made from
what dynamo already guards on (the function called, grad mode, the pieces'
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
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

__all__ = ["SlicedLayers"]

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVS: dict[Callable[..., Tensor], int] = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_CONV_OF_DIMS = {dims: conv for conv, dims in _CONVS.items()}
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
    """Compute only the trained slices' weight gradients of layers whose weight concatenates task slices.

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
        dims = _CONVS[func]
        dilation = _spread(bound.get("dilation", 1), dims)
        padding = _padding(bound.get("padding", 0), dilation, tuple(weight.shape[2:]))
        if padding is None:  # "same" padding that needs more on one side: torch pads the input first
            return func(*args, **kwargs)
        unbatched = x.dim() == dims + 1
        layer = _Layer(dims, _spread(bound.get("stride", 1), dims), padding, dilation)
        out = _apply(layer, x.unsqueeze(0) if unbatched else x, weight, bias, *split)
        return out.squeeze(0) if unbatched else out

    def _linear(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        bound = _bound(("input", "weight", "bias"), args, kwargs)
        weight, bias = bound.get("weight"), bound.get("bias")
        split = self._split(weight, bias, isinstance(weight, Tensor) and weight.dim() == 2)
        if split is None or not isinstance(weight, Tensor):
            return F.linear(*args, **kwargs)
        return _apply(_Layer(0), bound["input"], weight, bias, *split)


@dataclass(frozen=True)
class _Layer:
    """A convolution (with its stride, padding and dilation) or a linear layer, as the slicing evaluates it."""

    dims: int  # spatial dimensions of a convolution; 0: a linear layer
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if not self.dims:
            return F.linear(x, weight, bias)
        out: Tensor = _CONV_OF_DIMS[self.dims](x, weight, bias, self.stride, self.padding, self.dilation, 1)
        return out

    def input_gradient(self, grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
        if not self.dims:
            return grad.matmul(weight)
        return self._backward(grad, x, weight, None, (True, False, False))[0]

    def weight_gradients(self, grad: Tensor, x: Tensor, weight: Tensor, bias: bool) -> tuple[Tensor, Tensor | None]:
        """The gradients of the rows ``weight`` (and of their bias) from ``grad``, their output channels only."""
        if not self.dims:
            rows = grad.reshape(-1, grad.shape[-1])
            return rows.t().matmul(x.reshape(-1, x.shape[-1])), rows.sum(0) if bias else None
        _, grad_weight, grad_bias = self._backward(grad, x, weight, [weight.shape[0]] if bias else None,
                                                   (False, True, bias))
        return grad_weight, grad_bias if bias else None

    def _backward(self, grad: Tensor, x: Tensor, weight: Tensor, bias_sizes: list[int] | None,
                  mask: tuple[bool, bool, bool]) -> tuple[Tensor, Tensor, Tensor]:
        out: tuple[Tensor, Tensor, Tensor] = torch.ops.aten.convolution_backward(
            grad, x, weight, bias_sizes, list(self.stride), list(self.padding), list(self.dilation), False,
            [0] * self.dims, 1, list(mask),
        )
        return out


class _RowGradients(torch.autograd.Function):
    """One layer call on the whole concatenated weight; its backward computes the input's gradient and the
    weight (and bias) gradient of each piece that needs one, from that piece's own output channels only."""

    @staticmethod
    def forward(ctx: Any, layer: _Layer, x: Tensor, weight: Tensor, bias: Tensor | None, pieces: int,
                *tensors: Tensor | None) -> Tensor:
        ctx.layer, ctx.pieces = layer, pieces
        ctx.rows = [0 if t is None else t.shape[0] for t in tensors[:pieces]]
        ctx.dtypes = [None if t is None else t.dtype for t in tensors]
        ctx.save_for_backward(x, weight)
        return layer.forward(x, weight, bias)

    @staticmethod
    @once_differentiable  # its weight is detached: a second derivative would miss terms, so it raises instead
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        layer: _Layer = ctx.layer
        pieces: int = ctx.pieces
        needs = ctx.needs_input_grad[5:]  # each piece's weight, then each piece's bias
        grad_x = layer.input_gradient(grad, x, weight) if ctx.needs_input_grad[1] else None
        out: list[Tensor | None] = [None] * len(ctx.dtypes)
        channels = 1 if layer.dims else grad.dim() - 1
        start = 0
        for i, rows in enumerate(ctx.rows):
            want_weight = needs[i]
            want_bias = needs[pieces + i]
            if rows and (want_weight or want_bias):
                g = grad.narrow(channels, start, rows)
                grad_weight, grad_bias = layer.weight_gradients(g, x, weight.narrow(0, start, rows), want_bias)
                if want_weight:
                    out[i] = grad_weight.to(ctx.dtypes[i])
                if grad_bias is not None:
                    out[pieces + i] = grad_bias.to(ctx.dtypes[pieces + i])
            start += rows
        return (None, grad_x, None, None, None, *out)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs a convolution or a linear layer in on ``device``, or ``None``."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    # autocast casts the floating tensors other than float64; the others run as they are
    if dtype is None or t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return t
    return t.to(dtype)


def _apply(layer: _Layer, x: Tensor, weight: Tensor, bias: Tensor | None, pieces: Sequence[Tensor],
           biases: Sequence[Tensor | None]) -> Tensor:
    """``layer`` over the whole weight, with the gradients of ``pieces`` (and ``biases``) computed per piece."""
    dtype = _autocast_dtype(x.device)
    weight_value = _cast(weight.detach(), dtype)
    bias_value = None if bias is None else _cast(bias.detach(), dtype)
    out: Tensor = _RowGradients.apply(layer, _cast(x, dtype), weight_value, bias_value, len(pieces), *pieces,
                                      *biases)
    return out


def _spread(value: Any, dims: int) -> tuple[int, ...]:
    """A convolution's stride, padding or dilation per spatial dimension (an int or a 1-sequence is repeated)."""
    values = tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),)
    return values * dims if len(values) == 1 else values


def _padding(value: Any, dilation: tuple[int, ...], kernel: tuple[int, ...]) -> tuple[int, ...] | None:
    """Padding per side as integers, or ``None`` for ``"same"`` padding that is not symmetric."""
    if value == "valid":
        return (0,) * len(kernel)
    if value == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)
    return _spread(value, len(kernel))
