"""Mixed precision: GradScaler (fp16-style loss scaling, tested on CPU) and bf16/fp16 autocast, both paths."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from cooperative_opt import CooperativeOptimizer
from tests.conftest import make_batches, make_model, make_tasks, params_of, same
from tests.test_user_loop import user_loop

NAMES = ["a", "b"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _build(device: str = "cpu", **kwargs: Any) -> tuple[Any, CooperativeOptimizer]:
    torch.manual_seed(3)
    model = make_model(NAMES, batchnorm=True).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = CooperativeOptimizer(model, make_tasks(model, NAMES), kwargs.pop("optimizer", torch.optim.Adam),
                                   lr=kwargs.pop("lr", 1e-2), seed=7, **kwargs)
    return model, opt


def _batches(device: str, seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    return {k: (x.to(device), y.to(device)) for k, (x, y) in make_batches(NAMES, seed=seed).items()}


def _owned(model: Any, opt: CooperativeOptimizer, task: str) -> dict[str, Tensor]:
    ids = {id(p) for tp in opt.task_params if tp.name == task for p in tp.own}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in ids}


def _state(opt: CooperativeOptimizer, task: str) -> list[dict[str, Tensor]]:
    return [{k: v.clone() for k, v in opt.state[p].items()} for tp in opt.task_params if tp.name == task for p in tp.own]


@pytest.mark.parametrize("device", DEVICES)
def test_gradscaler_user_loop_with_an_injected_inf_skips_only_that_task(device: str) -> None:
    model, opt = _build(device, variant="without_reg")
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    user_loop(model, opt, _batches(device, 0), backward=lambda loss: scaler.scale(loss).backward(),
              step=lambda: (scaler.step(opt), scaler.update()))
    a_before, b_before, a_state = _owned(model, opt, "a"), _owned(model, opt, "b"), _state(opt, "a")
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    scale_before = scaler.get_scale()
    batches = _batches(device, 1)
    for name in opt.iteration():
        with opt.perturb(name):
            loss = F.cross_entropy(model(batches[name][0], name), batches[name][1])
        if name == "a":
            loss = loss * float("inf")  # the overflow an fp16 backward produces
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if name == "a":
            assert scaler.get_scale() < scale_before  # the scale backed off
    assert same(_owned(model, opt, "a"), a_before)  # weights
    assert all(torch.equal(v, old[k]) for new, old in zip(_state(opt, "a"), a_state) for k, v in new.items())
    assert not same(_owned(model, opt, "b"), b_before)  # the other task stepped
    report = opt.last_report
    assert report is not None and report.skipped == {"a": "not stepped"}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.steps_taken == 2 and buffers.keys() == dict(model.named_buffers()).keys()


def test_gradscaler_without_overflow_equals_the_fp32_loop() -> None:
    """Scaling by a power of two and unscaling is exact in float32, so the result is bit-identical."""
    model_1, opt_1 = _build()
    model_2, opt_2 = _build()
    model_3, opt_3 = _build()
    scaler_2 = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaler_3 = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for s in range(3):
        batches = make_batches(NAMES, seed=s)
        user_loop(model_1, opt_1, batches)
        user_loop(model_2, opt_2, batches, backward=lambda loss: scaler_2.scale(loss).backward(),
                  step=lambda: (scaler_2.step(opt_2), scaler_2.update()))
        opt_3.step(batches, scaler=scaler_3)
    assert same(params_of(model_1), params_of(model_2))
    assert same(params_of(model_2), params_of(model_3))


def test_step_batches_with_a_scaler_reports_the_overflowing_task() -> None:
    model, opt = _build(variant="vanilla")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    hook = model.heads["a"].weight.register_hook(lambda g: g * float("inf"))  # finite loss, overflowing gradient
    a_before, b_before = _owned(model, opt, "a"), _owned(model, opt, "b")
    report = opt.step(make_batches(NAMES), scaler=scaler)
    hook.remove()
    assert report.skipped == {"a": "non-finite gradient"} and set(report.losses) == {"a", "b"}
    assert same(_owned(model, opt, "a"), a_before) and not same(_owned(model, opt, "b"), b_before)
    assert scaler.get_scale() < 2.0**8


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_in_step_batches_trains(device: str, dtype: torch.dtype) -> None:
    model, opt = _build(device, variant="mt_cool", samples=2, lr=2e-2)
    scaler = torch.amp.GradScaler(device) if dtype == torch.float16 else None
    seen: list[torch.dtype] = []
    model.heads["a"].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    batches = _batches(device)
    first = opt.step(batches, autocast=dtype, scaler=scaler)
    for _ in range(10):
        last = opt.step(batches, autocast=dtype, scaler=scaler)
    assert seen and set(seen) == {dtype}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert last.losses["a"] < first.losses["a"] and last.losses["b"] < first.losses["b"]


def test_precision_arguments_are_validated() -> None:
    model, opt = _build()
    with pytest.raises(ValueError, match="autocast must be torch.bfloat16, torch.float16 or None"):
        opt.step(make_batches(NAMES), autocast=torch.float64)
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler"):
        opt.step(make_batches(NAMES), scaler=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="apply to step\\(batches\\)"):
        opt.step(autocast=torch.bfloat16)
    assert opt.steps_taken == 0
