"""On a CUDA device: fp16 loss scaling, a compiled model, vmap against the loop (``make gpu-check`` runs these).

Each test is parametrized over ``DEVICES``: its CPU variant runs everywhere (CI
never needs a GPU), its ``cuda`` variant is skipped without a CUDA device.
The compiled variant exists on CUDA only: tests/test_compile.py covers the CPU.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.utils import counters

from cooperative_opt import CooperativeOptimizer
from tests.conftest import make_batches, make_model, make_tasks, params_of, same
from tests.test_user_loop import user_loop

NAMES = ["a", "b"]
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))
DEVICES = ["cpu", CUDA]


def _build(device: str, **kwargs: Any) -> tuple[nn.Module, CooperativeOptimizer]:
    torch.manual_seed(0)
    model = make_model(NAMES, batchnorm=True).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = CooperativeOptimizer(model, make_tasks(model, NAMES), torch.optim.SGD, lr=0.1, seed=1, **kwargs)
    return model, opt


def _batches(device: str, seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    return {k: (x.to(device), y.to(device)) for k, (x, y) in make_batches(NAMES, seed=seed).items()}


def _owned(model: nn.Module, opt: CooperativeOptimizer, task: str) -> dict[str, Tensor]:
    ids = {id(p) for tp in opt.task_params if tp.name == task for p in tp.own}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in ids}


def _fp16_scaled_iteration(model: nn.Module, opt: CooperativeOptimizer, scaler: torch.amp.GradScaler, device: str,
                           batches: dict[str, tuple[Tensor, Tensor]], overflow: str | None = None) -> None:
    for name in opt.iteration():
        x, y = batches[name]
        with torch.autocast(device, dtype=torch.float16), opt.perturb(name):
            out = model(x, name)
        assert out.dtype == torch.float16
        loss = F.cross_entropy(out.float(), y)
        if name == overflow:
            loss = loss * float("inf")  # what an fp16 overflow in the backward produces
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_gradscaler_skips_only_the_task_with_an_inf(device: str) -> None:
    model, opt = _build(device, variant="without_reg")
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    _fp16_scaled_iteration(model, opt, scaler, device, _batches(device, 0))
    a_before, b_before, scale = _owned(model, opt, "a"), _owned(model, opt, "b"), scaler.get_scale()
    _fp16_scaled_iteration(model, opt, scaler, device, _batches(device, 1), overflow="a")
    report = opt.last_report
    assert report is not None and report.skipped == {"a": "not stepped"}
    assert same(_owned(model, opt, "a"), a_before)  # skipped: not a single weight moved
    assert not same(_owned(model, opt, "b"), b_before)  # the other task stepped
    assert scaler.get_scale() < scale
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("samples", [2, 4])
@pytest.mark.parametrize("device", DEVICES)
def test_vmap_and_loop_compute_the_same_step(device: str, samples: int) -> None:
    # Both consume the same noise draws (one draw per inner step for all M samples).
    models = {}
    for vectorize in (True, False):
        model, opt = _build(device, samples=samples, consistency_weight=0.5, vectorize=vectorize)
        for s in range(3):
            opt.step(_batches(device, s))
        models[vectorize] = params_of(model)
    for name, value in models[True].items():
        torch.testing.assert_close(value, models[False][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("device", [CUDA])
def test_compiled_model_on_cuda_keeps_a_fixed_number_of_graphs(device: str) -> None:
    torch._dynamo.reset()
    counters.clear()
    model, opt = _build(device)
    compiled = torch.compile(model, fullgraph=True)
    graphs = []
    for s in range(20):
        user_loop(compiled, opt, _batches(device, s))
        if s + 1 in (5, 20):
            graphs.append(int(counters["stats"]["unique_graphs"]))
    assert graphs[0] == graphs[1] == len(NAMES)
    eager_model, eager_opt = _build(device)
    for s in range(20):
        user_loop(eager_model, eager_opt, _batches(device, s))
    expected = params_of(eager_model)
    for name, value in params_of(model).items():  # cuDNN may pick other algorithms for the compiled graph
        torch.testing.assert_close(value, expected[name], rtol=1e-3, atol=1e-4, msg=name)
    torch._dynamo.reset()
