"""The consistency term D and the uniform noise, checked against their definitions."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from cooperative_opt import bernoulli_kl, softmax_kl
from cooperative_opt._consistency import consistency_term
from cooperative_opt._noise import UniformNoise
from tests.reference import naive_softmax_kl


def naive_bernoulli_kl(outputs: list[Tensor], clean: Tensor | None) -> Tensor:
    probs = [torch.sigmoid(o) for o in outputs]
    ref = torch.sigmoid(clean) if clean is not None else sum(probs) / len(probs)
    assert isinstance(ref, Tensor)
    kls = [(p * (p / ref).log() + (1 - p) * ((1 - p) / (1 - ref)).log()).mean() for p in probs]
    return sum(kls) / len(kls)  # type: ignore[return-value]


shapes = st.sampled_from([(4, 3), (2, 5, 3, 3), (3, 2, 4), (1, 7, 2, 2, 2)])


@settings(max_examples=25, deadline=None)
@given(shape=shapes, samples=st.integers(1, 4), use_clean=st.booleans(), seed=st.integers(0, 2**16))
def test_softmax_kl_matches_definition(shape: tuple[int, ...], samples: int, use_clean: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    outs = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(samples)]
    clean = torch.randn(shape, generator=g, dtype=torch.float64) if use_clean else None
    torch.testing.assert_close(softmax_kl(outs, clean), naive_softmax_kl(outs, clean))
    assert float(softmax_kl(outs, clean)) >= -1e-12


@settings(max_examples=25, deadline=None)
@given(shape=st.sampled_from([(5,), (4, 1), (2, 1, 3, 3)]), samples=st.integers(1, 4), use_clean=st.booleans(),
       seed=st.integers(0, 2**16))
def test_bernoulli_kl_matches_definition(shape: tuple[int, ...], samples: int, use_clean: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    outs = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(samples)]
    clean = torch.randn(shape, generator=g, dtype=torch.float64) if use_clean else None
    torch.testing.assert_close(bernoulli_kl(outs, clean), naive_bernoulli_kl(outs, clean))


def test_kl_is_zero_for_identical_predictions_and_at_m1_with_mean() -> None:
    x = torch.randn(6, 4, 3, 3)
    assert float(softmax_kl([x, x.clone(), x.clone()])) == pytest.approx(0.0, abs=1e-6)
    assert float(softmax_kl([x])) == pytest.approx(0.0, abs=1e-7)  # the paper's M = 1 gap
    assert float(softmax_kl([x], clean=x + 1.0 * torch.randn_like(x))) > 0.01  # "clean" keeps it active
    z = torch.randn(8)
    assert float(bernoulli_kl([z])) == pytest.approx(0.0, abs=1e-7)


def test_kl_is_per_pixel_for_segmentation() -> None:
    """For [B, C, H, W] logits the KL is over classes at each pixel, averaged over pixels."""
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    per_pixel = []
    for i in range(4):
        for j in range(4):
            per_pixel.append(softmax_kl([a[:, :, i, j], b[:, :, i, j]]))
    torch.testing.assert_close(softmax_kl([a, b]), torch.stack(per_pixel).mean())


def test_consistency_dispatch() -> None:
    multi, single = [torch.randn(4, 3)] * 2, [torch.randn(4, 1)] * 2
    torch.testing.assert_close(consistency_term("t", "auto", multi, None), softmax_kl(multi))
    torch.testing.assert_close(consistency_term("t", "auto", single, None), bernoulli_kl(single))
    assert consistency_term("t", None, multi, None) is None

    def custom(outputs: list[Any], clean: Any) -> Tensor:
        return sum(o["seg"].square().mean() for o in outputs)  # type: ignore[no-any-return]

    dicts = [{"seg": torch.ones(2, 2)}] * 3
    assert float(consistency_term("t", custom, dicts, None)) == pytest.approx(3.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="task 't': consistency='auto' needs a logits tensor"):
        consistency_term("t", "auto", dicts, None)
    with pytest.raises(TypeError, match="must return a scalar tensor"):
        consistency_term("t", lambda outs, clean: torch.ones(2), multi, None)


def _noise(shapes: list[list[tuple[int, ...]]], samples: int, seed: int = 0) -> tuple[UniformNoise, list[list[Tensor]]]:
    params = [[torch.zeros(s) for s in task] for task in shapes]
    named = [[(f"t{t}.p{i}", p) for i, p in enumerate(task)] for t, task in enumerate(params)]
    gen = {torch.device("cpu"): torch.Generator().manual_seed(seed)}
    return UniformNoise(named, samples, gen), params


def test_noise_is_uniform_symmetric_and_within_bound() -> None:
    noise, _ = _noise([[(300_000,)], [(50, 50)]], samples=2)
    noise.draw([0, 1], 0.05)
    values = torch.cat([noise.noise(0, 0)[0], noise.noise(0, 1)[0]])
    assert float(values.abs().max()) < 0.05
    assert abs(float(values.mean())) < 3 * 0.05 / math.sqrt(3 * values.numel())
    assert float(values.std()) == pytest.approx(0.05 / math.sqrt(3), rel=0.01)
    hist = torch.histc(values, bins=10, min=-0.05, max=0.05)
    assert float(hist.min()) > 0.97 * values.numel() / 10  # flat
    assert values.unique().numel() > 30_000  # a fine lattice, not a handful of values
    assert not torch.equal(noise.noise(0, 0)[0], noise.noise(0, 1)[0])  # samples are independent draws


@settings(max_examples=20, deadline=None)
@given(
    shapes=st.lists(st.lists(st.tuples(st.integers(0, 7), st.integers(1, 5)), min_size=0, max_size=3),
                    min_size=2, max_size=4),
    samples=st.integers(1, 3),
    bound=st.floats(1e-4, 10.0),
    data=st.data(),
)
def test_noise_draws_only_requested_tasks(shapes: list[list[tuple[int, int]]], samples: int, bound: float,
                                          data: st.DataObject) -> None:
    noise, params = _noise(shapes, samples)  # type: ignore[arg-type]
    tasks = data.draw(st.lists(st.integers(0, len(shapes) - 1), unique=True, min_size=1))
    for t in range(len(shapes)):  # mark the buffers to see what draw() leaves alone
        for j in range(samples):
            for v in noise.noise(t, j):
                v.fill_(123.0)
    noise.draw(tasks, bound)
    for t in range(len(shapes)):
        assert [n for n in noise.names(t)] == [f"t{t}.p{i}" for i in range(len(shapes[t]))]
        for j in range(samples):
            for v, p in zip(noise.noise(t, j), params[t]):
                assert v.shape == p.shape
                if t in tasks:
                    assert v.numel() == 0 or float(v.abs().max()) < bound
                else:
                    assert bool((v == 123.0).all())
            for s, p in zip(noise.stacked_noise(t), params[t]):
                assert s.shape == (samples, *p.shape)


def test_noise_generator_determinism() -> None:
    a, _ = _noise([[(100,)], [(7, 3)]], samples=2, seed=5)
    b, _ = _noise([[(100,)], [(7, 3)]], samples=2, seed=5)
    a.draw([0, 1], 0.1)
    b.draw([0, 1], 0.1)
    assert torch.equal(a.noise(1, 1)[0], b.noise(1, 1)[0])


def _relative_noise(params: list[list[Tensor]], samples: int, seed: int = 0) -> UniformNoise:
    named = [[(f"t{t}.p{i}", p) for i, p in enumerate(task)] for t, task in enumerate(params)]
    return UniformNoise(named, samples, {torch.device("cpu"): torch.Generator().manual_seed(seed)}, relative=True)


def _rms(t: Tensor) -> float:
    return float(t.square().mean().sqrt()) if t.numel() else 0.0


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 400), min_size=1, max_size=4),
    scales=st.lists(st.floats(1e-3, 1e3), min_size=4, max_size=4),
    samples=st.integers(1, 3),
    bound=st.floats(1e-3, 0.5),
)
def test_relative_noise_scales_with_each_slice(sizes: list[int], scales: list[float], samples: int,
                                               bound: float) -> None:
    g = torch.Generator().manual_seed(1)
    mine = [torch.randn(n, generator=g) * scales[i % 4] for i, n in enumerate(sizes)]
    noise = _relative_noise([mine, [torch.randn(3, generator=g)]], samples)
    noise.draw([0], bound)
    for j in range(samples):
        for eps, p in zip(noise.noise(0, j), mine):
            limit = bound * _rms(p)
            assert eps.numel() == 0 or float(eps.abs().max()) <= limit * (1 + 1e-6)
            if p.numel() >= 200:  # a uniform sample of this size reaches close to its bound
                assert float(eps.abs().max()) > 0.9 * limit


def test_relative_noise_is_the_absolute_draw_times_the_rms() -> None:
    g = torch.Generator().manual_seed(2)
    params = [[torch.randn(50, 4, generator=g) * 0.03, torch.zeros(7), torch.full((5,), -2.0)], [torch.randn(9)]]
    relative = _relative_noise(params, samples=2, seed=7)
    absolute, _ = _noise([[(50, 4), (7,), (5,)], [(9,)]], samples=2, seed=7)
    relative.draw([0, 1], 0.05)
    absolute.draw([0, 1], 0.05)
    for j in range(2):
        for eps, ref, p in zip(relative.noise(0, j), absolute.noise(0, j), params[0]):
            torch.testing.assert_close(eps, ref * _rms(p))
    assert float(relative.noise(0, 0)[1].abs().max()) == 0.0  # an all-zero slice gets no noise


def test_task_defaults() -> None:
    from cooperative_opt import Task

    t = Task("x", loss=F.mse_loss)
    assert t.inputs(("in", "target")) == ("in",)
    assert t.head_parameters() == ()
    p = torch.nn.Parameter(torch.zeros(2))
    assert Task("y", loss=F.mse_loss, head=(q for q in [p])).head_parameters() == (p,)
    with pytest.raises(TypeError, match="non-empty string"):
        Task("", loss=F.mse_loss)
    with pytest.raises(ValueError, match="consistency must be"):
        Task("x", loss=F.mse_loss, consistency="l2")  # type: ignore[arg-type]
