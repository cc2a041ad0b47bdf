"""Tests for the learners of the benchmarks (``benchmarks._learners``) on the hard-shared network."""

from __future__ import annotations

import sys
from collections.abc import Mapping

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import adapters
from benchmarks._learners import (
    COOPERATIVE_METHODS,
    GRADIENT_METHODS,
    Batch,
    GradientLearner,
    JointLearner,
    Problem,
    Training,
    build_learner,
    check_methods_available,
    count_parameters,
    offered_methods,
)

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")

TASKS = ("a", "b")
PLAIN_METHODS = offered_methods(())
"""The methods of a problem without ``Problem.networks``."""


def _lenet_like_problem() -> Problem:
    """Two classification tasks on separate inputs, on a small conv encoder."""

    def encoder() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 12), nn.Tanh())

    def multi_task() -> nn.Module:
        return adapters.MultiTaskModel(encoder(), {"a": nn.Linear(12, 3), "b": nn.Linear(12, 4)})

    def single_task(task: str) -> nn.Module:
        return nn.Sequential(encoder(), nn.Linear(12, 3 if task == "a" else 4))

    return Problem(TASKS, multi_task, single_task, {"a": F.cross_entropy, "b": F.cross_entropy})


def _batches(shared: bool, n: int = 16, seed: int = 3) -> dict[str, Batch]:
    generator = torch.Generator().manual_seed(seed)
    xa = torch.randn(n, 1, 4, 4, generator=generator)
    xb = xa if shared else torch.randn(n, 1, 4, 4, generator=generator)
    return {
        "a": (xa, torch.randint(0, 3, (n,), generator=generator)),
        "b": (xb, torch.randint(0, 4, (n,), generator=generator)),
    }


def _parameters(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _encoder_jacobian(model: nn.Module, batches: Mapping[str, Batch]) -> Tensor:
    """Rows: each task's loss gradient w.r.t. the encoder's parameters, flattened (the reference)."""
    encoder: nn.Module = getattr(model, "encoder")
    shared = list(encoder.parameters())
    rows = []
    for task, (x, y) in batches.items():
        loss = F.cross_entropy(model(x, task), y)
        grads = torch.autograd.grad(loss, shared)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("method", PLAIN_METHODS)
@pytest.mark.parametrize("shared", [False, True])
def test_every_method_lowers_the_training_loss(method: str, shared: bool) -> None:
    learner = build_learner(method, _lenet_like_problem(), Training(lr=0.2, warmup_steps=2))
    batches = _batches(shared)
    first = learner.train_step(batches)
    for _ in range(40):
        last = learner.train_step(batches)
    assert set(last) == set(TASKS)
    for task in TASKS:
        assert last[task] < 0.7 * first[task], (method, task, first, last)
    with torch.no_grad():
        assert learner.predict(batches["b"][0], "b").shape == (16, 4)


def test_parameter_counts_are_those_of_the_networks() -> None:
    problem = _lenet_like_problem()
    counts = {method: build_learner(method, problem, Training()).num_parameters for method in PLAIN_METHODS}
    joint = count_parameters(problem.multi_task())
    single = sum(count_parameters(problem.single_task(task)) for task in TASKS)
    assert counts["independent"] == single
    assert all(counts[method] == joint for method in PLAIN_METHODS if method != "independent")
    assert 1.5 < single / joint < 2.0


def test_same_seed_same_initialisation_for_every_multi_task_method() -> None:
    problem = _lenet_like_problem()
    training = Training(seed=7)
    joint = build_learner("joint", problem, training)
    assert isinstance(joint, JointLearner)
    reference = {name: p for name, p in _parameters(joint.model).items()}
    for method in (*GRADIENT_METHODS, *(m for m in COOPERATIVE_METHODS if m in PLAIN_METHODS)):
        learner = build_learner(method, problem, training)
        model: nn.Module = getattr(learner, "model")
        encoder: nn.Module = getattr(model, "encoder")
        merged = _parameters(adapters.merge(encoder)) if method in COOPERATIVE_METHODS else None
        if merged is None:
            assert all(torch.equal(p, reference[name]) for name, p in _parameters(model).items())
        else:
            assert all(torch.equal(p, reference[f"encoder.{name}"]) for name, p in merged.items())


@pytest.mark.parametrize("shared", [False, True])
def test_gradient_learner_with_the_sum_aggregator_is_joint(shared: bool) -> None:
    """Plumbing check: mtl_backward + jac_to_grad(Sum) must give exactly the Joint update."""
    problem = _lenet_like_problem()
    batches = _batches(shared)
    joint = build_learner("joint", problem, Training(lr=0.1, momentum=0.5))
    summed = build_learner("pcgrad", problem, Training(lr=0.1, momentum=0.5))
    assert isinstance(joint, JointLearner) and isinstance(summed, GradientLearner)
    summed.aggregator = torchjd_aggregation.Sum()
    for _ in range(3):
        assert joint.train_step(batches) == pytest.approx(summed.train_step(batches), rel=1e-5)
    for (name, p), q in zip(joint.model.named_parameters(), summed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["pcgrad", "mgda", "cagrad"])
@pytest.mark.parametrize("shared", [False, True])
def test_gradient_methods_step_along_the_aggregated_encoder_jacobian(method: str, shared: bool) -> None:
    """The encoder moves by -lr * aggregator(J); each head by -lr * its own task's gradient."""
    lr = 0.05
    learner = build_learner(method, _lenet_like_problem(), Training(lr=lr))
    assert isinstance(learner, GradientLearner)
    model = learner.model
    for seed in range(50):  # batches whose task gradients conflict, or PCGrad is the plain sum
        batches = _batches(shared, seed=seed)
        jacobian = _encoder_jacobian(model, batches)
        if float(jacobian[0] @ jacobian[1]) < 0.0:
            break
    assert float(jacobian[0] @ jacobian[1]) < 0.0
    expected = learner.aggregator(jacobian)
    heads: nn.ModuleDict = getattr(model, "heads")
    head_grads = {
        task: torch.autograd.grad(F.cross_entropy(model(x, task), y), list(heads[task].parameters()))
        for task, (x, y) in batches.items()
    }
    before = _parameters(model)
    learner.train_step(batches)
    after = _parameters(model)
    step = torch.cat([(before[n] - after[n]).reshape(-1) for n in before if n.startswith("encoder.")]) / lr
    torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(step, jacobian.sum(dim=0), atol=1e-4)  # the aggregator changed something
    for task, grads in head_grads.items():
        names = [n for n in before if n.startswith(f"heads.{task}.")]
        for name, grad in zip(names, grads, strict=True):
            torch.testing.assert_close((before[name] - after[name]) / lr, grad, rtol=1e-4, atol=1e-5)


def test_shared_input_runs_the_encoder_once() -> None:
    calls = []
    learner = build_learner("mgda", _lenet_like_problem(), Training())
    assert isinstance(learner, GradientLearner)
    encoder: nn.Module = getattr(learner.model, "encoder")
    encoder.register_forward_hook(lambda *_: calls.append(1))
    learner.train_step(_batches(shared=True))
    assert len(calls) == 1
    learner.train_step(_batches(shared=False))
    assert len(calls) == 3


def test_independent_networks_do_not_share_anything() -> None:
    learner = build_learner("independent", _lenet_like_problem(), Training(lr=0.5))
    models: dict[str, nn.Module] = getattr(learner, "models")
    before_b = _parameters(models["b"])
    batches = _batches(shared=True)
    with torch.no_grad():
        prediction_b = learner.predict(batches["b"][0], "b")
    learner.train_step({"a": batches["a"]})
    assert all(torch.equal(p, before_b[n]) for n, p in _parameters(models["b"]).items())
    with torch.no_grad():
        torch.testing.assert_close(learner.predict(batches["b"][0], "b"), prediction_b)


def test_cooperative_learner_updates_only_the_active_slices_after_warm_up() -> None:
    learner = build_learner("vanilla", _lenet_like_problem(), Training(lr=0.1, warmup_steps=0))
    batches = _batches(shared=False)
    model: nn.Module = getattr(learner, "model")
    slices = adapters.task_parameters(model)
    assert set(slices) == set(TASKS)
    before = {task: [p.detach().clone() for _, p in params] for task, params in slices.items()}
    learner.train_step(batches)
    for task, params in slices.items():  # vanilla: every task moves its own slices in one outer step
        assert any(not torch.equal(p, q) for (_, p), q in zip(params, before[task], strict=True))


def test_adam_is_available_as_base_optimizer() -> None:
    learner = build_learner("mt_cool_clean", _lenet_like_problem(), Training(optimizer="adam", lr=1e-2))
    optimizer = getattr(learner, "optimizer")
    assert any(isinstance(group.get("betas"), tuple) for group in optimizer.param_groups)
    with pytest.raises(ValueError, match="optimizer='rmsprop'"):
        Training(optimizer="rmsprop").optimizer_class()  # type: ignore[arg-type]


def test_unknown_method_and_bad_network_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        check_methods_available(["joint", "sam"])
    with pytest.raises(ValueError, match="method='sam'"):
        build_learner("sam", _lenet_like_problem(), Training())
    problem = Problem(TASKS, lambda: nn.Linear(2, 2), lambda task: nn.Linear(2, 2), {})
    with pytest.raises(TypeError, match=r"without \['encoder', 'heads', 'head_forward'\]"):
        build_learner("joint", problem, Training())


def test_missing_torchjd_is_reported_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "torchjd" or m.startswith("torchjd.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchjd", None)
    with pytest.raises(RuntimeError, match=r"pip install 'torchjd\[cagrad\]'"):
        check_methods_available(["joint", "pcgrad"])
    check_methods_available(["independent", "joint", "mt_cool"])  # the others still run


class _TwoScaleEncoder(nn.Module):
    """Returns ``[x, f1, f2]`` with ``f2`` computed from ``f1``, like a UNet encoder's skip features."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(1, 4, 3, padding=1)
        self.second = nn.Conv2d(4, 6, 3, padding=1, stride=2)

    def forward(self, x: Tensor) -> list[Tensor]:
        f1 = torch.relu(self.first(x))
        return [x, f1, torch.relu(self.second(f1))]


class _SkipHead(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(4 + 6, classes)

    def forward(self, features: list[Tensor]) -> Tensor:
        _, f1, f2 = features
        logits: Tensor = self.linear(torch.cat([f1.mean(dim=(2, 3)), f2.mean(dim=(2, 3))], dim=1))
        return logits


def test_gradient_methods_handle_features_that_depend_on_each_other() -> None:
    """UNet-style skip features: the Sum aggregator must still reproduce Joint exactly (no double counting)."""

    def multi_task() -> nn.Module:
        return adapters.MultiTaskModel(_TwoScaleEncoder(), {"a": _SkipHead(3), "b": _SkipHead(4)})

    problem = Problem(TASKS, multi_task, lambda task: nn.Identity(), {"a": F.cross_entropy, "b": F.cross_entropy})
    joint = build_learner("joint", problem, Training(lr=0.1))
    summed = build_learner("graddrop", problem, Training(lr=0.1))
    assert isinstance(joint, JointLearner) and isinstance(summed, GradientLearner)
    summed.aggregator = torchjd_aggregation.Sum()
    batches = _batches(shared=True)
    for _ in range(2):
        joint.train_step(batches)
        summed.train_step(batches)
    for p, q in zip(joint.model.parameters(), summed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
