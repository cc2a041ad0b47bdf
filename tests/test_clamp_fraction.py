"""``StepReport.clamped``: the fraction of each task's slice elements the clamp changed in an outer iteration.

The fast path (foreach ops, no host sync until the report) is checked
against the plain reference, which counts ``(p < lo) | (p > hi)`` element by
element and takes the union over a task's inner steps.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import adapters
from cooperative_opt import CooperativeOptimizer
from tests.conftest import make_batches, make_model, make_tasks
from tests.reference import NoiseLog, ReferenceMTCOOL

NAMES = ["a", "b", "c"]


def _build(seed: int = 3, dtype: torch.dtype = torch.float32, **kwargs: Any) -> tuple[Any, CooperativeOptimizer]:
    torch.manual_seed(seed)
    model = make_model(NAMES).to(dtype)
    kwargs.setdefault("lr", 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = CooperativeOptimizer(model, make_tasks(model, NAMES), torch.optim.SGD, seed=7, sliced_layers=False,
                                   **kwargs)
    return model, opt


def _batches(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    return {k: (x.to(dtype), y) for k, (x, y) in make_batches(NAMES, seed=seed).items()}


@pytest.mark.parametrize(
    "config",
    [
        dict(variant="without_reg", bound=0.01),
        dict(variant="without_reg", bound=0.003, inner_steps=3),
        dict(samples=2, bound=0.01, inner_steps=2, consistency_weight=0.5),
        dict(variant="without_reg", bound=0.01, inner_steps=2, update_order="jacobi"),
        dict(variant="without_reg", bound=0.01, dtype=torch.float64),
    ],
    ids=["l1", "l3-union", "mt_cool-m2-l2", "jacobi", "float64"],
)
def test_the_clamped_fraction_matches_the_reference(noise_log: NoiseLog, config: dict[str, Any]) -> None:
    dtype = config.get("dtype", torch.float32)
    model, opt = _build(**config)
    torch.manual_seed(3)
    ref_model = make_model(NAMES).to(dtype)
    settings = opt.settings
    ref = ReferenceMTCOOL(
        ref_model, make_tasks(ref_model, NAMES), adapters.task_parameters(ref_model), lr=0.2,
        clamp_bound=settings.clamp_bound, samples=settings.samples, inner_steps=settings.inner_steps,
        consistency_weight=settings.consistency_weight, order=settings.update_order,
    )
    seen = []
    for s in range(3):
        batches = _batches(s, dtype)
        report = opt.step(batches)
        ref.step(batches, noise_log)
        assert set(report.clamped) == set(NAMES)
        for name in NAMES:
            assert report.clamped[name] == pytest.approx(ref.clamped[name], abs=1e-12), (s, name)
        seen += list(report.clamped.values())
    assert any(0.0 < f < 1.0 for f in seen), seen  # the bound binds on some elements, not all
    assert noise_log == []


def test_the_union_over_inner_steps_is_not_a_sum() -> None:
    """With a tiny bound every inner step clamps nearly every moving element; each is counted once."""
    _, once = _build(variant="without_reg", bound=1e-9)
    _, thrice = _build(variant="without_reg", bound=1e-9, inner_steps=3)
    batches = _batches(0)
    single, union = once.step(batches).clamped, thrice.step(batches).clamped
    for name in NAMES:
        assert 0.5 < single[name] <= union[name] <= 1.0, (single, union)


def test_the_user_loop_and_closures_report_what_step_batches_reports() -> None:
    _, driven = _build(variant="without_reg", bound=0.01, inner_steps=2)
    loop_model, loop_opt = _build(variant="without_reg", bound=0.01, inner_steps=2)
    closure_model, closure_opt = _build(variant="without_reg", bound=0.01, inner_steps=2)
    for s in range(2):
        batches = _batches(s)
        expected = driven.step(batches).clamped
        for name in loop_opt.iteration():
            x, y = batches[name]
            with loop_opt.perturb(name):
                loss = F.cross_entropy(loop_model(x, name), y)
            torch.autograd.backward(loss)
            loop_opt.step()
            loop_opt.zero_grad()
        assert loop_opt.last_report is not None and loop_opt.last_report.clamped == expected

        def closure() -> torch.Tensor:
            name = closure_opt.active_task
            assert name is not None
            x, y = batches[name]
            with closure_opt.perturb(name):
                loss = F.cross_entropy(closure_model(x, name), y)
            torch.autograd.backward(loss)
            return loss

        closure_opt.step(closure)
        assert closure_opt.last_report is not None and closure_opt.last_report.clamped == expected


def test_zero_where_no_clamp_ran() -> None:
    _, opt = _build(variant="without_reg", bound=1e-9, warmup_steps=1)
    warmup = opt.step(_batches(0))
    assert warmup.phase == "warmup" and warmup.clamped == dict.fromkeys(NAMES, 0.0)
    partial = opt.step({k: v for k, v in _batches(1).items() if k != "b"})
    assert partial.skipped == {"b": "no batch"} and partial.clamped["b"] == 0.0
    assert partial.clamped["a"] > 0.5 and partial.clamped["c"] > 0.5
    nan = _batches(2)
    nan["c"] = (torch.full_like(nan["c"][0], float("nan")), nan["c"][1])
    skipped = opt.step(nan)
    assert skipped.skipped == {"c": "non-finite loss"} and skipped.clamped["c"] == 0.0
    _, vanilla = _build(variant="vanilla")
    assert vanilla.step(_batches(0)).clamped == dict.fromkeys(NAMES, 0.0)
    _, wide = _build(variant="without_reg", bound=10.0)
    assert wide.step(_batches(0)).clamped == dict.fromkeys(NAMES, 0.0)


def test_bfloat16_slices_are_counted_exactly(noise_log: NoiseLog) -> None:
    """Counts are summed in float32 whatever the slices' dtype (a bfloat16 count is inexact past 256)."""
    torch.manual_seed(0)
    model = make_model(NAMES, width=48, hidden=40).to(torch.bfloat16)  # slices of up to 2,496 elements
    torch.manual_seed(0)
    ref_model = make_model(NAMES, width=48, hidden=40).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = CooperativeOptimizer(model, make_tasks(model, NAMES), torch.optim.SGD, lr=0.5, seed=7,
                                   variant="without_reg", bound=0.002, sliced_layers=False)
    ref = ReferenceMTCOOL(ref_model, make_tasks(ref_model, NAMES), adapters.task_parameters(ref_model), lr=0.5,
                          clamp_bound=0.002)
    batches = _batches(0, torch.bfloat16)
    report = opt.step(batches)
    ref.step(batches, noise_log)
    elements = {n: sum(p.numel() for _, p in adapters.task_parameters(model)[n]) for n in NAMES}
    counts = {n: round(ref.clamped[n] * elements[n]) for n in NAMES}
    assert any(c > 256 and float(torch.tensor(float(c), dtype=torch.bfloat16)) != c for c in counts.values())
    assert report.clamped == ref.clamped
