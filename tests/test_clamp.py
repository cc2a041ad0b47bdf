"""The clamp's one-pass test on CPU: skipping a slice never changes a bit of the result or of the tally.

``TurnClamp`` skips a CPU slice whose computed ``max |theta - a|`` is at most
``b * (1 - 2 eps)``. These tests check it against the plain clamp
``min(max(theta, a - b), a + b)`` on values built to sit exactly on, one ulp
inside and one ulp outside the bounds, at magnitudes where rounding the bounds
matters, in every floating dtype, and with Hypothesis over random moves.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cooperative_opt._clamp import TurnClamp, _unchanged_below

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _plain(theta: torch.Tensor, anchor: torch.Tensor, bound: float) -> torch.Tensor:
    return torch.minimum(torch.maximum(theta, anchor - bound), anchor + bound)


def _check(theta: list[torch.Tensor], anchor: list[torch.Tensor], bound: float, steps: int = 1) -> list[int]:
    """Clamp copies through ``TurnClamp`` and plainly; both must agree bit for bit, counts included."""
    expected = [t.clone() for t in theta]
    changed = [torch.zeros(t.shape, dtype=torch.bool) for t in theta]
    for t, a, c in zip(expected, anchor, changed):
        after = _plain(t, a, bound)
        c |= after != t
        t.copy_(after)
    clamp = TurnClamp(bound, steps)
    got = [t.clone() for t in theta]
    picked = clamp._may_change(got, anchor, bound)
    clamp.apply(got, anchor)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0, equal_nan=True)
    count = clamp.tally(torch.float64)
    assert count is not None and int(count) == sum(int(c.sum()) for c in changed)
    return picked


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bound", [0.05, 1e-3, 0.3])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_values_at_the_bounds_are_clamped_exactly_as_the_plain_clamp(dtype: torch.dtype, bound: float,
                                                                    scale: float) -> None:
    torch.manual_seed(0)
    anchor = (torch.randn(64, dtype=torch.float64) * scale).to(dtype)
    hi, lo = anchor + bound, anchor - bound
    inf = torch.tensor(float("inf"), dtype=dtype)
    cases = {
        "on the bounds": torch.cat([hi[:32], lo[32:]]),
        "one ulp inside": torch.cat([torch.nextafter(hi[:32], -inf), torch.nextafter(lo[32:], inf)]),
        "one ulp outside": torch.cat([torch.nextafter(hi[:32], inf), torch.nextafter(lo[32:], -inf)]),
        "at the test's limit": anchor + _unchanged_below(bound, dtype),
        "far inside": anchor + bound / 100,
        "unmoved": anchor.clone(),
    }
    for name, theta in cases.items():
        _check([theta], [anchor], bound)
    # a slice that moved by less than the limit is skipped, and one that moved past b is not
    small = anchor + torch.linspace(-1, 1, 64, dtype=torch.float64).to(dtype) * (bound / 4)
    spacing = torch.finfo(dtype).eps * abs(float(anchor[0]))  # so that the move survives rounding
    past = torch.cat([anchor[:1] + 2 * (bound + spacing), anchor[1:]])
    assert _check([small], [anchor], bound) == []
    assert _check([past], [anchor], bound) == [0]


@given(
    moves=st.lists(st.floats(-3.0, 3.0), min_size=1, max_size=40),
    magnitude=st.sampled_from([1e-4, 1.0, 50.0]),
    bound=st.sampled_from([1e-3, 0.05, 0.5]),
    dtype=st.sampled_from(DTYPES),
    steps=st.integers(1, 3),
)
@settings(max_examples=150, deadline=None)
def test_random_moves_in_several_slices_give_the_plain_result(moves: list[float], magnitude: float, bound: float,
                                                             dtype: torch.dtype, steps: int) -> None:
    """Several slices (some moved past b, some not, one empty), one or several inner steps of a turn."""
    torch.manual_seed(len(moves))
    anchor = [(torch.randn(len(moves), dtype=torch.float64) * magnitude).to(dtype), torch.empty(0, dtype=dtype),
              (torch.randn(3, 2, dtype=torch.float64) * magnitude).to(dtype)]
    step = torch.tensor(moves, dtype=torch.float64) * bound
    clamp, plain = TurnClamp(bound, steps), [a.clone() for a in anchor]
    theta = [a.clone() for a in anchor]
    changed = [torch.zeros(a.shape, dtype=torch.bool) for a in anchor]
    for s in range(steps):
        deltas = [(step * (s + 1) / steps).to(dtype), torch.empty(0, dtype=dtype),
                  torch.full((3, 2), float(step[0]) / 3, dtype=dtype)]
        torch._foreach_add_(theta, deltas)
        torch._foreach_add_(plain, deltas)
        clamp.apply(theta, anchor)
        for p, a, c in zip(plain, anchor, changed):
            after = _plain(p, a, bound)
            c |= after != p
            p.copy_(after)
        for t, p in zip(theta, plain):
            assert torch.equal(t, p)
    count = clamp.tally(torch.float64)
    assert count is not None and int(count) == sum(int(c.sum()) for c in changed)


def test_a_nan_slice_goes_through_the_full_clamp() -> None:
    anchor = torch.zeros(4)
    theta = torch.tensor([0.0, float("nan"), 0.001, 0.0])
    assert TurnClamp(0.05, 1)._may_change([theta], [anchor], 0.05) == [0]
    assert _check([theta.clone()], [anchor], 0.05) == [0]


def test_no_bound_means_no_clamp_and_no_tally() -> None:
    theta = [torch.ones(3)]
    clamp = TurnClamp(None, 1)
    clamp.apply(theta, [torch.zeros(3)])
    assert torch.equal(theta[0], torch.ones(3)) and clamp.tally(torch.float32) is None
    unused = TurnClamp(0.1, 1)
    assert unused.tally(torch.float32) is None  # a turn without a step has nothing to report
    unused.apply([torch.ones(2)], [torch.ones(2)])
    assert unused.tally(torch.float32) == 0
    unused.reset()
    assert unused.tally(torch.float32) is None
