"""cooperative_opt.diagnostics on a model where the answers are known by construction."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import adapters
from cooperative_opt import CooperativeOptimizer, Task, diagnostics
from tests.conftest import make_batches, make_model, make_tasks, params_of, same

NAMES = ["a", "b"]


class OneWay(nn.Module):
    """Feature 0 belongs to task a, feature 1 to task b; both heads read feature 0 only.

    So task b's parameters cannot change task a's loss (transfer b -> a is exactly 0, and a's
    loss is flat in b's slices), while task a's update moves task b's prediction.
    """

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 2)
        self.heads = nn.ModuleDict({n: nn.Linear(1, 1) for n in NAMES})

    def forward(self, x: Tensor, task: str) -> Tensor:
        return self.heads[task](torch.tanh(self.encoder(x))[:, :1]).squeeze(1)


def _setup() -> tuple[OneWay, CooperativeOptimizer, dict[str, tuple[Tensor, Tensor]]]:
    torch.manual_seed(0)
    model = OneWay()
    adapters.split_channels(model.encoder, NAMES)
    tasks = [Task(n, loss=lambda out, b: F.mse_loss(out, b[1]), head=model.heads[n], inputs=lambda b, n=n: (b[0], n))
             for n in NAMES]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = CooperativeOptimizer(model, tasks, torch.optim.SGD, lr=0.5, variant="vanilla")
    x = torch.randn(16, 3)
    batches = {"a": (x, 2.0 * x[:, 0]), "b": (x, -2.0 * x[:, 0])}  # the two tasks want opposite features
    return model, opt, batches


def _naive_transfer(model: nn.Module, opt: CooperativeOptimizer, before: dict[str, Tensor], mover: str, k: str,
                    batch: Any) -> float:
    """Set the parameters by hand, evaluate, put them back."""
    current = params_of(model)
    movers = {n for tp in opt.task_params if tp.name == mover for n, p in model.named_parameters()
              if any(p is q for q in tp.own)}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(current[n] if n in movers else before[n])
        moved = float(F.mse_loss(model(batch[0], k), batch[1]))
        for n, p in model.named_parameters():
            p.copy_(before[n])
        base = float(F.mse_loss(model(batch[0], k), batch[1]))
        for n, p in model.named_parameters():
            p.copy_(current[n])
    return moved - base


def test_negative_transfer_matches_a_naive_evaluation_and_the_construction() -> None:
    model, opt, batches = _setup()
    before_params = params_of(model)
    before = diagnostics.snapshot(opt)
    opt.step(batches)
    after = params_of(model)
    transfer = diagnostics.negative_transfer(opt, before, batches)
    assert set(transfer) == {("a", "b"), ("b", "a")}
    assert transfer[("b", "a")] == 0.0  # b's parameters cannot reach a's prediction
    assert transfer[("a", "b")] > 0  # a pulled the shared feature the way b does not want
    for mover, k in transfer:
        assert transfer[(mover, k)] == pytest.approx(_naive_transfer(model, opt, before_params, mover, k, batches[k]),
                                                     abs=1e-6)
    assert same(params_of(model), after)  # nothing moved


def test_flatness_is_flat_where_the_task_cannot_see_the_others() -> None:
    model, opt, batches = _setup()
    generator_state = opt._generators[torch.device("cpu")].get_state()
    with torch.no_grad():
        clean_a = float(F.mse_loss(model(batches["a"][0], "a"), batches["a"][1]))
        clean_b = float(F.mse_loss(model(batches["b"][0], "b"), batches["b"][1]))
    a = diagnostics.flatness(opt, "a", batches["a"], radii=[0.0, 0.1, 1.0])
    assert a == pytest.approx([clean_a] * 3, abs=1e-7)  # a reads only its own feature
    b = diagnostics.flatness(opt, "b", batches["b"], radii=[0.0, 0.5, 2.0], samples=16)
    assert b[0] == pytest.approx(clean_b) and b[1] != b[0] and b[2] != b[0]
    assert torch.equal(opt._generators[torch.device("cpu")].get_state(), generator_state)
    assert diagnostics.flatness(opt, "b", batches["b"], radii=[0.5], samples=16) == pytest.approx([b[1]])  # seeded


def test_diagnostics_leave_parameters_and_statistics_alone_and_refuse_bad_input() -> None:
    model = make_model(NAMES, batchnorm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = CooperativeOptimizer(model, make_tasks(model, NAMES))
    batches = make_batches(NAMES)
    params, buffers = params_of(model), {n: b.clone() for n, b in model.named_buffers()}
    before = diagnostics.snapshot(opt)
    diagnostics.negative_transfer(opt, before, batches)
    diagnostics.flatness(opt, "a", batches["a"], radii=[0.0, 0.05], scale="relative")
    assert same(params_of(model), params) and same({n: b.clone() for n, b in model.named_buffers()}, buffers)
    with pytest.raises(ValueError, match="unknown tasks"):
        diagnostics.negative_transfer(opt, before, {"z": batches["a"]})
    with pytest.raises(ValueError, match="radii must be"):
        diagnostics.flatness(opt, "a", batches["a"], radii=[-1.0])
    with pytest.raises(ValueError, match="task='z' is not a task"):
        diagnostics.flatness(opt, "z", batches["a"], radii=[0.1])


def test_movement_matches_a_naive_measure_and_the_clamp_bounds_it() -> None:
    model = make_model(NAMES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = CooperativeOptimizer(model, make_tasks(model, NAMES), torch.optim.SGD, lr=1.0, bound=1e-3)
    batches = make_batches(NAMES)
    before = diagnostics.snapshot(opt)
    opt.step(batches)
    moved = diagnostics.movement(opt, before)
    for tp in opt.task_params:
        deltas = torch.cat([(p.detach() - before.values[tp.name][n]).flatten()
                            for n, p in zip(tp.encoder_names, tp.encoder)])
        assert moved[tp.name].elements == deltas.numel()
        assert moved[tp.name].max == pytest.approx(float(deltas.abs().max()))
        assert moved[tp.name].rms == pytest.approx(float(deltas.square().mean().sqrt()))
        assert 0 < moved[tp.name].max <= 1e-3 + 1e-7  # lr 1.0 would move further: the clamp binds
    unmoved = diagnostics.movement(opt, diagnostics.snapshot(opt))
    assert all(m.max == 0.0 and m.rms == 0.0 for m in unmoved.values())
    with pytest.raises(ValueError, match="snapshot of tasks"):
        diagnostics.movement(opt, diagnostics.Snapshot({"a": {}}))
