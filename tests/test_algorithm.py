"""The optimizer against the plain-loop reference implementation of Algorithm 1."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import adapters
from cooperative_opt import CooperativeOptimizer
from tests.conftest import make_batches, make_model, make_tasks, params_of, same
from tests.reference import NoiseLog, ReferenceMTCOOL

NAMES = ["a", "b"]


def _twin(names: list[str], **kwargs: Any) -> tuple[Any, Any]:
    torch.manual_seed(3)
    a = make_model(names, **kwargs)
    torch.manual_seed(3)
    b = make_model(names, **kwargs)
    return a, b


def _reference(model: Any, names: list[str], **kwargs: Any) -> ReferenceMTCOOL:
    return ReferenceMTCOOL(model, make_tasks(model, names), adapters.task_parameters(model), **kwargs)


def _close(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("names", [["a", "b"], ["a", "b", "c"], ["w", "x", "y", "z"]])
def test_vanilla_matches_reference_exactly(names: list[str]) -> None:
    """Whole layers (sliced_layers=False) compute what the reference computes, bit for bit."""
    model, ref_model = _twin(names)
    opt = CooperativeOptimizer(
        model, make_tasks(model, names), torch.optim.SGD, lr=0.1, variant="vanilla", sliced_layers=False
    )
    ref = _reference(ref_model, names, lr=0.1, clamp_bound=None)
    for step in range(4):
        batches = make_batches(names, seed=step)
        opt.step(batches)
        ref.step(batches, None)
        assert same(params_of(model), params_of(ref_model)), f"diverged at step {step}"


@pytest.mark.parametrize("names", [["a", "b"], ["a", "b", "c"], ["w", "x", "y", "z"]])
def test_vanilla_sliced_layers_match_reference(names: list[str]) -> None:
    """Sliced layers (the default) differ from the reference by float rounding only."""
    model, ref_model = _twin(names)
    opt = CooperativeOptimizer(model, make_tasks(model, names), torch.optim.SGD, lr=0.1, variant="vanilla")
    ref = _reference(ref_model, names, lr=0.1, clamp_bound=None)
    for step in range(4):
        batches = make_batches(names, seed=step)
        opt.step(batches)
        ref.step(batches, None)
        _close(params_of(model), params_of(ref_model))


@settings(max_examples=12, deadline=None)
@given(
    tasks=st.integers(2, 4),
    width=st.integers(1, 9),
    hidden=st.integers(2, 11),
    lr=st.floats(0.01, 0.5),
)
def test_vanilla_matches_reference_over_shapes(tasks: int, width: int, hidden: int, lr: float) -> None:
    names = [f"t{i}" for i in range(tasks)]
    model, ref_model = _twin(names, width=width, hidden=hidden)
    opt = CooperativeOptimizer(model, make_tasks(model, names), torch.optim.SGD, lr=lr, variant="vanilla")
    ref = _reference(ref_model, names, lr=lr, clamp_bound=None)
    for step in range(2):
        batches = make_batches(names, seed=step)
        opt.step(batches)
        ref.step(batches, None)
    _close(params_of(model), params_of(ref_model))  # sliced layers: rounding differs


@pytest.mark.parametrize(
    "config",
    [
        dict(samples=1),
        dict(samples=3, consistency_weight=0.7),
        dict(samples=1, consistency_weight=1.0, consistency_reference="clean"),
        dict(samples=2, inner_steps=2, consistency_weight=0.5),
        dict(samples=2, warmup_steps=2),
        dict(samples=2, warmup_steps=1, noise_scale="relative"),
    ],
    ids=["m1", "m3-mean", "m1-clean", "m2-l2", "warmup", "relative"],
)
@pytest.mark.parametrize("vectorize", [False, True])
def test_mt_cool_matches_reference(noise_log: NoiseLog, config: dict[str, Any], vectorize: bool) -> None:
    names = ["a", "b", "c"]
    model, ref_model = _twin(names)
    ref_kwargs = {
        "samples": config.get("samples", 1),
        "inner_steps": config.get("inner_steps", 1),
        "consistency_weight": config.get("consistency_weight", 0.0),
        "reference": config.get("consistency_reference", "mean"),
        "warmup_steps": config.get("warmup_steps", 0),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = CooperativeOptimizer(
            model, make_tasks(model, names), torch.optim.SGD, lr=0.2, bound=0.05, vectorize=vectorize,
            consistency_weight=ref_kwargs["consistency_weight"], **{k: v for k, v in config.items()
                                                                    if k != "consistency_weight"},
        )
    ref = _reference(ref_model, names, lr=0.2, clamp_bound=0.05, **ref_kwargs)
    for step in range(4):
        batches = make_batches(names, seed=step)
        if step == 3:
            del batches["b"]  # partial batch: b is skipped in both
        opt.step(batches)
        ref.step(batches, noise_log)
        _close(params_of(model), params_of(ref_model))
    assert noise_log == []  # the reference consumed exactly the draws the optimizer made


def test_gauss_seidel_order_sees_updated_slices(noise_log: NoiseLog) -> None:
    """Task b's noisy forward uses task a's slices as updated earlier in the same outer iteration."""
    model = make_model(NAMES)
    opt = CooperativeOptimizer(model, make_tasks(model, NAMES), torch.optim.SGD, lr=0.5, variant="without_reg")
    a_slices = [p for _, p in adapters.task_parameters(model)["a"]]
    seen: list[Tensor] = []
    before = [p.detach().clone() for p in a_slices]

    def hook(module: Any, args: Any) -> None:
        if args[1] == "b":
            seen.append(a_slices[0].detach().clone())

    model.register_forward_pre_hook(hook)
    opt.step(make_batches(NAMES))
    assert seen and not torch.equal(seen[0], before[0])
    assert torch.equal(seen[0], a_slices[0].detach())


def test_parameters_never_hold_noise() -> None:
    """During every forward, the inactive task's parameters hold their clean values."""
    model = make_model(NAMES)
    opt = CooperativeOptimizer(model, make_tasks(model, NAMES), torch.optim.SGD, lr=0.1, bound=0.5, samples=2)
    slices = adapters.task_parameters(model)
    clean = {n: p.detach().clone() for t in NAMES for n, p in slices[t]}
    violations: list[str] = []

    def hook(module: Any, args: Any) -> None:
        active = args[1]
        for t in NAMES:
            if t != active:
                for n, p in slices[t]:
                    if not torch.equal(p.detach(), clean[n]):
                        violations.append(n)

    model.register_forward_pre_hook(hook)
    batches = make_batches(NAMES)
    del batches["a"]  # only b updates, so a's slices must stay exactly clean throughout
    opt.step(batches)
    assert violations == []
    assert all(torch.equal(p.detach(), clean[n]) for n, p in slices["a"])


class MixedDtypeNet(nn.Module):
    """Slices of two dtypes: the noise keeps one buffer per (device, dtype), so its order is not the model's."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict(
            {"first": nn.Linear(5, 6), "middle": nn.Linear(6, 6).double(), "last": nn.Linear(6, 6)})
        self.heads = nn.ModuleDict({n: nn.Linear(6, 3) for n in NAMES})

    def forward(self, x: Tensor, task: str) -> Tensor:
        h = torch.tanh(self.encoder["first"](x))
        h = torch.tanh(self.encoder["middle"](h.double())).float()
        return self.heads[task](torch.tanh(self.encoder["last"](h)))


@pytest.mark.parametrize("update_order", ["gauss_seidel", "jacobi"])
def test_warmup_pairs_each_noise_with_its_slice_when_dtypes_differ(noise_log: NoiseLog, update_order: str) -> None:
    models = []
    for _ in range(2):
        torch.manual_seed(2)
        model = MixedDtypeNet()
        adapters.split_channels(model.encoder, NAMES)
        models.append(model)
    model, ref_model = models
    tasks = make_tasks(model, NAMES)  # type: ignore[arg-type]
    opt = CooperativeOptimizer(model, tasks, torch.optim.SGD, lr=0.2, bound=0.05, warmup_steps=2, seed=1,
                               variant="without_reg", update_order=update_order)  # type: ignore[arg-type]
    ref = _reference(ref_model, NAMES, lr=0.2, clamp_bound=0.05, warmup_steps=2, order=update_order)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        batches = {t: (torch.randn(4, 5, generator=g), torch.randint(0, 3, (4,), generator=g)) for t in NAMES}
        opt.step(batches)
        ref.step(batches, noise_log)
        _close(params_of(model), params_of(ref_model))
    assert noise_log == []
