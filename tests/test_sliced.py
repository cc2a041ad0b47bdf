"""Sliced split layers: the same forward call, the same gradients, fewer weight gradients computed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from cooperative_opt import CooperativeOptimizer
from cooperative_opt._sliced import SlicedLayers
from tests.conftest import make_batches, make_model, make_tasks


def _row_gradients(out: Tensor) -> bool:
    """Whether ``out`` came from the sliced path (its autograd function, maybe under a squeeze)."""
    node = out.grad_fn
    while node is not None and type(node).__name__ in ("SqueezeBackward1", "SqueezeBackward0"):
        node = node.next_functions[0][0]
    return node is not None and type(node).__name__ == "_RowGradientsBackward"


def _pieces(rows: list[int], rest: tuple[int, ...], trainable: int = 0) -> list[Tensor]:
    return [torch.randn(r, *rest, requires_grad=i == trainable) for i, r in enumerate(rows)]


@settings(max_examples=25, deadline=None)
@given(
    dims=st.sampled_from([1, 2, 3]),
    rows=st.lists(st.integers(0, 4), min_size=2, max_size=4).filter(lambda r: sum(r) > 0),
    channels=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    dilation=st.integers(1, 2),
    bias=st.booleans(),
    batched=st.booleans(),
)
def test_conv_matches_whole_layer(
    dims: int, rows: list[int], channels: int, stride: int, padding: int, dilation: int, bias: bool, batched: bool
) -> None:
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    trainable = next(i for i, r in enumerate(rows) if r > 0)
    weights = _pieces(rows, (channels,) + (3,) * dims, trainable)
    biases = _pieces(rows, (), trainable) if bias else []
    x = torch.randn(*([2] if batched else []), channels, *([7] * dims), requires_grad=True)
    kwargs: dict[str, Any] = dict(stride=stride, padding=padding, dilation=dilation)
    inputs = [x, weights[trainable]] + ([biases[trainable]] if bias else [])

    def run() -> Tensor:
        b = torch.cat(biases) if bias else None
        out: Tensor = conv(x, torch.cat(weights), b, **kwargs)
        return out

    expected = run()
    want = torch.autograd.grad(expected.square().sum(), inputs)
    with SlicedLayers():
        got = run()
    assert _row_gradients(got)
    have = torch.autograd.grad(got.square().sum(), inputs)
    assert torch.equal(got, expected)  # the forward is the same single call on the whole weight
    for h, w in zip(have, want):
        torch.testing.assert_close(h, w, rtol=1e-5, atol=1e-4)


def test_linear_matches_whole_layer_with_leading_dims() -> None:
    """Two of three pieces train (Jacobi order, or a user's own split): each gets its own rows' gradient."""
    weights, biases = _pieces([3, 2, 4], (5,)), _pieces([3, 2, 4], ())
    for t in (weights[2], biases[2]):
        t.requires_grad_(True)
    x = torch.randn(2, 6, 5, requires_grad=True)
    inputs = [x, weights[0], weights[2], biases[0], biases[2]]
    expected = F.linear(x, torch.cat(weights), torch.cat(biases))
    want = torch.autograd.grad(expected.square().sum(), inputs)
    with SlicedLayers():
        got = F.linear(x, torch.cat(weights), torch.cat(biases))
    assert _row_gradients(got) and torch.equal(got, expected)
    have = torch.autograd.grad(got.square().sum(), inputs)
    for h, w in zip(have, want):
        torch.testing.assert_close(h, w)
    assert weights[1].grad is None and biases[1].grad is None


@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_under_bf16_autocast_the_forward_is_autocasts_and_gradients_keep_their_dtype(layer: str) -> None:
    torch.manual_seed(0)
    own, other = torch.randn(4, 3, 3, 3, requires_grad=True), torch.randn(5, 3, 3, 3)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    if layer == "linear":
        own, other = torch.randn(4, 6, requires_grad=True), torch.randn(5, 6)
        x = torch.randn(7, 6, requires_grad=True)
    bias = torch.randn(9, requires_grad=True)

    def run() -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            w = torch.cat([own, other])
            out: Tensor = F.conv2d(x, w, bias, padding=1) if layer == "conv" else F.linear(x, w, bias)
        return out

    expected = run()
    want = torch.autograd.grad(expected.float().square().sum(), [x, own, bias])
    with SlicedLayers():
        got = run()
    assert _row_gradients(got) and got.dtype == torch.bfloat16 and torch.equal(got, expected)
    have = torch.autograd.grad(got.float().square().sum(), [x, own, bias])
    for h, w in zip(have, want):
        assert h.dtype == w.dtype == torch.float32
        torch.testing.assert_close(h, w, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("spec", [dict(stride=(2,), padding=(1,)), dict(stride=[1, 2], padding=[0, 1], dilation=(2,)),
                                  dict(padding="valid")])
def test_conv_arguments_in_every_form_torch_accepts(spec: dict[str, Any]) -> None:
    own, other = torch.randn(2, 3, 3, 3, requires_grad=True), torch.randn(3, 3, 3, 3)
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    expected = F.conv2d(x, torch.cat([own, other]), **spec)
    want = torch.autograd.grad(expected.square().sum(), [x, own])
    with SlicedLayers():
        got = F.conv2d(x, torch.cat([own, other]), **spec)
    assert _row_gradients(got) and torch.equal(got, expected)
    for h, w in zip(torch.autograd.grad(got.square().sum(), [x, own]), want):
        torch.testing.assert_close(h, w)


def test_a_second_derivative_through_a_sliced_layer_raises_instead_of_missing_terms() -> None:
    own, other = torch.randn(2, 3, 3, 3, requires_grad=True), torch.randn(2, 3, 3, 3)
    x = torch.randn(1, 3, 5, 5, requires_grad=True)
    with SlicedLayers():
        out = F.conv2d(x, torch.cat([own, other]))
    (grad_x,) = torch.autograd.grad(out.square().sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.sum().backward()


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize(("kernel", "sliced"), [(3, True), (4, False)])
def test_same_padding_is_sliced_where_it_is_symmetric(kernel: int, sliced: bool) -> None:
    own, other = torch.randn(2, 3, kernel, kernel, requires_grad=True), torch.randn(2, 3, kernel, kernel)
    x = torch.randn(1, 3, 6, 6)
    expected = F.conv2d(x, torch.cat([own, other]), padding="same")
    with SlicedLayers():
        got = F.conv2d(x, torch.cat([own, other]), padding="same")
    assert _row_gradients(got) == sliced and torch.equal(got, expected)
    (have,) = torch.autograd.grad(got.sum(), [own])
    (want,) = torch.autograd.grad(expected.sum(), [own])
    torch.testing.assert_close(have, want)


def test_unsplit_bias_is_cut_to_the_slices() -> None:
    weights = _pieces([2, 3], (4, 3, 3))
    bias = torch.randn(5, requires_grad=True)
    x = torch.randn(1, 4, 6, 6)
    with SlicedLayers():
        got = F.conv2d(x, torch.cat(weights), bias)
    torch.testing.assert_close(got, F.conv2d(x, torch.cat(weights), bias))
    (grad,) = torch.autograd.grad(got.sum(), [bias])
    torch.testing.assert_close(grad, torch.full((5,), 16.0))  # 4 x 4 output positions


@pytest.mark.parametrize(
    "case",
    ["every piece trains", "no piece trains", "grad mode off", "weight transformed after the cat",
     "another cat in between", "cat along dim 1", "concatenate along axis 1", "grouped conv", "one piece",
     "vector weight"],
)
def test_layers_run_whole_when_slicing_does_not_apply(case: str) -> None:
    a, b = torch.randn(2, 4, 3, 3, requires_grad=True), torch.randn(2, 4, 3, 3)
    x = torch.randn(1, 4, 6, 6)
    run: Callable[[], Tensor] = lambda: F.conv2d(x, torch.cat([a, b]))  # noqa: E731
    if case == "every piece trains":
        b.requires_grad_(True)
    elif case == "no piece trains":
        a.requires_grad_(False)
    elif case == "grad mode off":
        run = torch.no_grad()(run)
    elif case == "weight transformed after the cat":
        run = lambda: F.conv2d(x, torch.cat([a, b]) * 2)  # noqa: E731
    elif case == "another cat in between":
        def run() -> Tensor:
            weight = torch.cat([a, b])
            torch.cat([a, b]), torch.cat([a, b])  # the mode remembers the last two cats (a weight's and a bias's)
            return F.conv2d(x, weight)
    elif case == "cat along dim 1":
        run = lambda: F.conv2d(torch.randn(1, 8, 6, 6), torch.cat([a, b], 1))  # noqa: E731
    elif case == "concatenate along axis 1":
        run = lambda: F.conv2d(torch.randn(1, 8, 6, 6), torch.concatenate([a, b], axis=1))  # noqa: E731
    elif case == "grouped conv":
        run = lambda: F.conv2d(torch.randn(1, 8, 6, 6), torch.cat([a, b]), groups=2)  # noqa: E731
    elif case == "one piece":
        run = lambda: F.conv2d(x, torch.cat([a]))  # noqa: E731
    else:
        u, v = torch.randn(3, requires_grad=True), torch.randn(2)
        run = lambda: F.linear(torch.randn(4, 5), torch.cat([u, v]))  # noqa: E731
    with SlicedLayers():
        out = run()
    assert not _row_gradients(out)


def _backward_flops(fn: Callable[[], Tensor], inputs: list[Tensor]) -> int:
    out = fn()
    with FlopCounterMode(display=False) as counter:
        torch.autograd.backward(out.square().sum(), inputs=inputs)
    return int(counter.get_total_flops())


def test_weight_gradients_of_frozen_slices_are_not_computed() -> None:
    own = torch.randn(8, 16, 3, 3, requires_grad=True)
    noisy = torch.randn(8, 16, 3, 3)  # another task's (noisy) slice: no gradient wanted
    x = torch.randn(4, 16, 12, 12, requires_grad=True)  # features that depend on earlier trainable layers

    def run() -> Tensor:
        out: Tensor = F.conv2d(x, torch.cat([own, noisy]), padding=1)
        return out

    whole = _backward_flops(run, [own, x])
    with SlicedLayers():
        sliced = _backward_flops(run, [own, x])
    per_gradient = 2 * 4 * 12 * 12 * 8 * 16 * 9  # one weight or input gradient of an 8-row slice
    assert whole == 4 * per_gradient  # input and weight gradients of both slices
    assert sliced == 3 * per_gradient  # the noisy slice's weight gradient is skipped


def test_optimizer_step_does_less_backward_work_with_sliced_layers() -> None:
    names = ["a", "b"]
    flops = {}
    for sliced in (False, True):
        torch.manual_seed(0)
        model = make_model(names, width=8, hidden=6)
        opt = CooperativeOptimizer(
            model, make_tasks(model, names), torch.optim.SGD, lr=0.1, variant="without_reg", sliced_layers=sliced
        )
        with FlopCounterMode(display=False) as counter:
            opt.step(make_batches(names, seed=0))
        flops[sliced] = counter.get_total_flops()
    assert flops[True] < flops[False]


def test_sliced_layers_must_be_a_bool() -> None:
    model = make_model(["a", "b"])
    with pytest.raises(TypeError, match="sliced_layers must be True or False"):
        CooperativeOptimizer(model, make_tasks(model, ["a", "b"]), sliced_layers="yes")  # type: ignore[arg-type]
