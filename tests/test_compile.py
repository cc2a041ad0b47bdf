"""torch.compile: a compiled model trains under MT-COOL with a fixed number of graphs, sliced layers on.

The main test uses inductor (the default backend, what users get): 50 outer
iterations of a cold compile take about 20 s on the project's 2-core machine,
nearly all of it the first compilation of the two graphs. The other tests
check the ways of compiling and the settings with ``backend="aot_eager"``
(dynamo and AOTAutograd, no code generation), which exercises the same
guards and graph captures in about a second each.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import Tensor, nn
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from cooperative_opt import CooperativeOptimizer
from tests.conftest import make_batches, make_model, make_tasks, params_of
from tests.test_user_loop import user_loop

NAMES = ["a", "b"]
Forward = Callable[..., Tensor]


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Empty caches and counters; hitting the recompile limit raises instead of silently running eagerly."""
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


def _build(**kwargs: Any) -> tuple[nn.Module, CooperativeOptimizer]:
    torch.manual_seed(0)
    model = make_model(NAMES, batchnorm=kwargs.pop("batchnorm", False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # M = 1: the consistency term is inactive
        opt = CooperativeOptimizer(model, make_tasks(model, NAMES), torch.optim.SGD, lr=0.1, seed=1, **kwargs)
    return model, opt


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def _eager_parameters(steps: int, **kwargs: Any) -> dict[str, Tensor]:
    model, opt = _build(**kwargs)
    for s in range(steps):
        user_loop(model, opt, make_batches(NAMES, seed=s))
    return params_of(model)


def test_compiled_model_trains_50_iterations_with_a_fixed_number_of_graphs() -> None:
    model, opt = _build(sliced_layers=True)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break is an error
    graphs = []
    for s in range(50):
        user_loop(compiled, opt, make_batches(NAMES, seed=s))
        if s + 1 in (10, 50):
            graphs.append(_graphs())
    assert graphs[0] == graphs[1] == len(NAMES)  # one graph per task name (its head), none added by steps
    expected = _eager_parameters(50, sliced_layers=True)
    for name, value in params_of(model).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_slicing_survives_compilation() -> None:
    """Compiled, each split layer is one captured autograd function whose backward computes the trained
    slice's weight gradient only: the backward graphs' weight-gradient products have half the rows."""
    weight_rows: dict[bool, list[int]] = {}
    for sliced in (False, True):
        torch._dynamo.reset()
        backward: list[torch.fx.GraphModule] = []

        def forward_compiler(gm: torch.fx.GraphModule, inputs: Any) -> Any:
            return make_boxed_func(gm.forward)

        def backward_compiler(gm: torch.fx.GraphModule, inputs: Any) -> Any:
            backward.append(gm)
            return make_boxed_func(gm.forward)

        model, opt = _build(variant="without_reg", sliced_layers=sliced)
        counter = CompileCounterWithBackend(aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler))
        user_loop(torch.compile(model, backend=counter, fullgraph=True), opt, make_batches(NAMES))
        assert counter.frame_count == len(NAMES)  # one graph per task, no graph break
        ops = Counter(str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function")
        assert ops["autograd_function_apply"] == (2 * len(NAMES) if sliced else 0)  # the split conv and linear
        rows = []
        for g in backward:
            for n in g.graph.nodes:
                if n.target is torch.ops.aten.convolution_backward.default and n.args[-1][1]:
                    rows.append(n.args[2].meta["val"].shape[0])  # the weight whose gradient it computes
        weight_rows[sliced] = rows
    assert weight_rows[False] == [6] * len(NAMES)  # the split conv's whole weight, in each task's backward
    assert weight_rows[True] == [3] * len(NAMES)  # the trained task's 3 rows only


def _compile_wrapped(model: nn.Module) -> tuple[Forward, Any]:
    return torch.compile(model, backend="aot_eager"), model  # forward compiled, optimizer given the model


def _compile_given_to_optimizer(model: nn.Module) -> tuple[Forward, Any]:
    compiled = torch.compile(model, backend="aot_eager")
    return compiled, compiled  # the optimizer holds the compiled module: step(batches) runs it too


def _compile_in_place(model: nn.Module) -> tuple[Forward, Any]:
    model.compile(backend="aot_eager")
    return model, model


WAYS = {"torch.compile(model)": _compile_wrapped, "optimizer(torch.compile(model))": _compile_given_to_optimizer,
        "model.compile()": _compile_in_place}
CONFIGS = {
    "mt_cool": dict(),
    "vanilla": dict(variant="vanilla"),  # detached aliases, recreated every outer iteration
    "m2-batchnorm": dict(samples=2, consistency_weight=0.5, batchnorm=True),  # sample 2 reads scratch statistics
    "warmup-l2-relative": dict(warmup_steps=2, inner_steps=2, noise_scale="relative"),
    "m2-vmap": dict(samples=2, consistency_weight=0.5, vectorize=True),  # step(batches) vmaps, eagerly
}
CASES = [(way, "mt_cool") for way in WAYS] + [("optimizer(torch.compile(model))", c) for c in CONFIGS if c != "mt_cool"]


@pytest.mark.parametrize(("way", "config"), CASES)
def test_every_way_of_compiling_matches_eager_with_a_fixed_number_of_graphs(way: str, config: str) -> None:
    kwargs: dict[str, Any] = CONFIGS[config]
    torch.manual_seed(0)
    model = make_model(NAMES, batchnorm=kwargs.get("batchnorm", False))
    forward, given = WAYS[way](model)
    options = {k: v for k, v in kwargs.items() if k != "batchnorm"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = CooperativeOptimizer(given, make_tasks(model, NAMES), torch.optim.SGD, lr=0.1, seed=1, **options)
    _, reference = _build(**kwargs)
    graphs = []
    for s in range(8):  # user loop and step(batches) alternate, on both optimizers
        batches = make_batches(NAMES, seed=s)
        for o, f in ((opt, forward), (reference, reference.model)):
            if s % 2:
                o.step(batches)
            else:
                user_loop(f, o, batches)
        if s + 1 in (4, 8):
            graphs.append(_graphs())
    assert graphs[0] == graphs[1] <= 2 * len(NAMES)  # warm-up (every slice trains) adds one graph per task
    assert sum(counters["graph_break"].values()) == 0
    expected = params_of(reference.model)
    for name, value in params_of(model).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
