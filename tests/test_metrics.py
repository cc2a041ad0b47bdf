"""benchmarks._metrics.dice_iou against the formulas, and its empty-mask rule."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks._metrics import dice_iou


def _naive(p: torch.Tensor, t: torch.Tensor) -> tuple[list[float], list[float]]:
    dice, iou = [], []
    for a, b in zip(p.bool(), t.bool()):
        inter, total, union = int((a & b).sum()), int(a.sum() + b.sum()), int((a | b).sum())
        dice.append(1.0 if total == 0 else 2 * inter / total)
        iou.append(1.0 if union == 0 else inter / union)
    return dice, iou


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 4), h=st.integers(1, 6), w=st.integers(1, 6), density=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16), volume=st.booleans())
def test_dice_iou_match_the_formulas_per_image(n: int, h: int, w: int, density: float, seed: int,
                                               volume: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 2, h, w) if volume else (n, h, w)
    p = torch.rand(shape, generator=g) < density
    t = torch.rand(shape, generator=g) < density
    dice, iou = dice_iou(p, t)
    want_dice, want_iou = _naive(p.flatten(1), t.flatten(1))
    assert dice.tolist() == pytest.approx(want_dice, abs=1e-6)
    assert iou.tolist() == pytest.approx(want_iou, abs=1e-6)


def test_both_empty_is_perfect_and_one_empty_is_zero() -> None:
    empty, full = torch.zeros(1, 3, 3, dtype=torch.bool), torch.ones(1, 3, 3, dtype=torch.bool)
    assert dice_iou(empty, empty)[0].item() == 1.0 and dice_iou(empty, empty)[1].item() == 1.0
    assert dice_iou(full, empty)[0].item() == 0.0 and dice_iou(empty, full)[1].item() == 0.0


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="one shape"):
        dice_iou(torch.zeros(2, 3, 3), torch.zeros(2, 3, 4))
