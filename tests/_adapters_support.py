"""Shared helpers of the adapters tests (not a test module)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import adapters

#: largest relative deviation a conversion may introduce (the issue's bound)
TOLERANCE = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run far faster on one thread (and do not fight a busy second core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def deviation(after: Any, before: Any) -> float:
    """max |after - before| / max |before| over (nested lists / tuples of) tensors."""
    if isinstance(before, (list, tuple)):
        assert isinstance(after, (list, tuple)) and len(after) == len(before)
        return max((deviation(a, b) for a, b in zip(after, before)), default=0.0)
    assert isinstance(after, Tensor) and isinstance(before, Tensor)
    assert after.shape == before.shape and after.dtype == before.dtype
    scale = before.detach().abs().max().clamp_min(1e-30)
    return float((after.detach() - before.detach()).abs().max() / scale)


def perturb_slices(model: nn.Module, scale: float = 0.01) -> None:
    """Move every encoder slice a little, as training would (each task's own way)."""
    with torch.no_grad():
        for i, (_, params) in enumerate(adapters.task_parameters(model).items()):
            for _, p in params:
                p.add_(torch.randn_like(p) * scale * (i + 1))


def check_ownership(model: nn.Module, encoder_numel: int) -> None:
    """Every encoder element is owned by exactly one task's slices."""
    owned = adapters.task_parameters(model)
    seen: set[int] = set()
    total = 0
    for params in owned.values():
        for _, p in params:
            assert id(p) not in seen
            seen.add(id(p))
            total += p.numel()
    assert total == encoder_numel


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def train_lowers_losses(
    net: adapters.MultiTaskModel,
    batches: Mapping[str, tuple[Any, Any]],
    losses: Mapping[str, Callable[[Any, Any], Tensor]],
    steps: int = 8,
    lr: float = 0.05,
    **kwargs: Any,
) -> dict[str, tuple[float, float]]:
    """A short MT-COOL run; returns {task: (loss before, loss after)} on the training batches."""
    from cooperative_opt import CooperativeOptimizer

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            return {t: float(losses[t](net(b[0], t), b[1])) for t, b in batches.items()}

    kwargs.setdefault("consistency_reference", "clean")
    tasks = adapters.make_tasks(net, losses)
    opt = CooperativeOptimizer(net, tasks, torch.optim.SGD, lr=lr, seed=0, **kwargs)
    before = evaluate()
    for _ in range(steps):
        opt.step(batches)
    after = evaluate()
    return {t: (before[t], after[t]) for t in batches}


def state_dict_round_trip(net: nn.Module, fresh: nn.Module, x: Any, task: str) -> None:
    """The split model's state_dict loads into an identically built one, giving identical outputs."""
    fresh.load_state_dict(copy.deepcopy(net.state_dict()))
    net.eval()
    fresh.eval()
    with torch.no_grad():
        assert deviation(fresh(x, task), net(x, task)) == 0.0
