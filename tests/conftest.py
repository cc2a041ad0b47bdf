"""Shared fixtures: a seeded RNG for every test and a small multi-task model factory."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import adapters

from cooperative_opt import Task
from cooperative_opt._noise import UniformNoise
from tests.reference import NoiseLog


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA device (set on every test that is skipped without one, "
                            "or parametrized with device 'cuda'); `make gpu-check` runs `pytest -m cuda`")


def _needs_cuda(item: pytest.Item) -> bool:
    if any("cuda" in str(mark.kwargs.get("reason", "")).lower() for mark in item.iter_markers("skipif")):
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and any(str(value).startswith("cuda") for value in callspec.params.values())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _needs_cuda(item):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(autouse=True)
def _seeded() -> Iterator[None]:
    torch.manual_seed(0)
    yield


@pytest.fixture
def noise_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[NoiseLog]:
    """Record every noise draw of the optimizer, so the reference can replay it."""
    log: NoiseLog = []
    original = UniformNoise.draw

    def draw(self: UniformNoise, tasks: Any, bound: float) -> None:
        original(self, tasks, bound)
        entry: dict[str, list[Tensor]] = {}
        for k in tasks:
            for i, name in enumerate(self.names(k)):
                entry[name] = [self.noise(k, j)[i].clone() for j in range(self.samples)]
        log.append(entry)

    monkeypatch.setattr(UniformNoise, "draw", draw)
    yield log


class MultiTaskNet(nn.Module):
    """A small conv encoder (optionally with BatchNorm) and one linear head per task."""

    def __init__(
        self, names: Sequence[str], width: int = 6, hidden: int = 10, classes: int = 3, batchnorm: bool = False
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(width))
        layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, hidden), nn.Tanh()]
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({n: nn.Linear(hidden, classes) for n in names})

    def forward(self, x: Tensor, task: str) -> Tensor:
        return self.heads[task](self.encoder(x))


def make_model(names: Sequence[str], split: bool = True, **kwargs: Any) -> MultiTaskNet:
    model = MultiTaskNet(names, **kwargs)
    if split:
        adapters.split_channels(model.encoder, list(names))
    return model


def make_tasks(model: MultiTaskNet, names: Sequence[str]) -> list[Task]:
    return [
        Task(
            n,
            loss=lambda out, batch: F.cross_entropy(out, batch[1]),
            head=model.heads[n],
            inputs=lambda batch, n=n: (batch[0], n),
        )
        for n in names
    ]


def make_batches(names: Sequence[str], n: int = 8, classes: int = 3, seed: int = 1) -> dict[str, tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {t: (torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, classes, (n,), generator=g)) for t in names}


def params_of(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


__all__ = ["MultiTaskNet", "make_batches", "make_model", "make_tasks", "params_of", "same"]
_ = F
