"""Two overlapping digits, one task per digit: the negative-transfer testbed's data (MultiMNIST on sklearn digits).

The MultiMNIST construction of Sener & Koltun (2018, "Multi-task learning
as multi-objective optimization") on scikit-learn's bundled 8x8 digits (no
download): each composite overlays two digit images on a blank canvas of
side ``8 + shift``, digit A at the top-left corner and digit B ``shift``
pixels lower and further right, combined by a pixel-wise maximum. Task
``"left"`` classifies A (the upper-left digit), task ``"right"`` B (the
lower-right one); both are 10-way (labels 0..9) on the same input.

The conflict knob. ``conflict`` is the probability that B is drawn
independently of A; otherwise B is another image of A's class:

- ``conflict=0``: the two digits always show the same class (different
  images of it), so the two labels are equal. Every feature that recognises
  one digit recognises the other's class too: the tasks agree, and a shared
  encoder sees each class twice per composite (positive transfer).
- ``conflict=1``: A and B are independent (the labels agree one time in ten,
  by chance), which is MultiMNIST. Each task must read its own corner and
  ignore the other digit, which for it is structured noise drawn over the
  same pixels in the overlap; the features one task needs are, for the
  other, nuisance features it must suppress. A shared encoder must then hold
  the features of both digits in one set of channels, so when it is narrow
  (few channels) the tasks compete for capacity and Joint training can fall
  below one network per task of the same width (negative transfer).
- In between, the labels agree with probability ``(1 - conflict) + conflict
  * p`` (``p`` about 0.1, the chance that an independent draw hits A's
  class), so the knob moves the pair continuously from one task seen twice
  to two competing tasks. ``shift`` sets how much the digits overlap: an
  overlap of ``(8 - shift)**2`` pixels, none for ``shift >= 8``.

The source images are split once into a train and a test pool (stratified by
digit, from ``seed``); train composites use train-pool images only and test
composites test-pool images only, so no test digit image ever appears in
training.

- :func:`multi_digit_pairs`: the pools and which two images make each composite.
- :func:`compose`: draw the composites of given pairs.
- :func:`multi_digits`: both, as an :class:`benchmarks._images.ImageTasks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import torch
from sklearn.datasets import load_digits  # type: ignore[import-untyped]
from torch import Tensor

from benchmarks._images import ImageTasks, split_indices

__all__ = ["DIGIT_SIDE", "DigitPairs", "SOURCE", "TASKS", "compose", "digit_images", "multi_digit_pairs",
           "multi_digits"]

TASKS: Final[tuple[str, str]] = ("left", "right")
"""The task names: ``"left"`` reads the upper-left digit A, ``"right"`` the lower-right digit B."""

DIGIT_SIDE: Final[int] = 8
"""Side of one scikit-learn digit image, in pixels."""

SOURCE: Final[str] = "sklearn-digits"
"""``ImageTasks.source`` of these composites."""

_CLASSES: Final[int] = 10


@dataclass(frozen=True)
class DigitPairs:
    """Which source images make each composite (indices into :func:`digit_images`).

    Attributes:
        train: ``[N_train, 2]`` int64, column 0 the upper-left image A, column 1 the lower-right B.
        test: ``[N_test, 2]`` int64, drawn from ``test_pool`` only.
        train_pool: sorted int64 indices of the source images train composites may use.
        test_pool: sorted int64 indices of the held-out source images (disjoint from ``train_pool``).
    """

    train: Tensor
    test: Tensor
    train_pool: Tensor
    test_pool: Tensor


def digit_images() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits: images ``[1797, 8, 8]`` float32 in [0, 1] and labels ``[1797]`` int64 in 0..9."""
    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0))
    return images, torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))


def _positive_int(name: str, value: object, low: int = 1, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {bounds}, got {value!r}")
    return value


def _conflict(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"conflict must be a float in [0, 1] (0: the tasks agree, 1: independent digits); "
                         f"got {value!r}")
    return float(value)


def _generator(seed: int, stream: int) -> torch.Generator:
    """An independent generator per (seed, stream), so the test pairs do not depend on the train count."""
    state = np.random.SeedSequence([seed, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _pairs(labels: Tensor, pool: Tensor, count: int, conflict: float, generator: torch.Generator) -> Tensor:
    """``[count, 2]`` source indices: A uniform over ``pool``; B uniform over ``pool`` with probability
    ``conflict``, else uniform over the other images of A's class in ``pool``."""
    left = pool[torch.randint(0, pool.numel(), (count,), generator=generator)]
    independent = torch.rand(count, generator=generator) < conflict
    right = pool[torch.randint(0, pool.numel(), (count,), generator=generator)]
    pick = torch.rand(count, generator=generator)  # position among the class's other images
    pool_labels = labels[pool]
    for digit in range(_CLASSES):
        members = pool[pool_labels == digit]  # sorted, as pool is
        tied = (~independent) & (labels[left] == digit)
        if members.numel() == 0 or not bool(tied.any()):
            continue
        if members.numel() == 1:  # no other image of the class: B repeats A
            right[tied] = members[0]
            continue
        own = torch.searchsorted(members, left[tied])  # A's position among the class's images
        other = (pick[tied] * (members.numel() - 1)).long().clamp(max=members.numel() - 2)
        right[tied] = members[other + (other >= own).long()]  # skip A itself
    return torch.stack([left, right], dim=1)


def multi_digit_pairs(
    train: int, test: int, *, seed: int, conflict: float = 0.0, test_fraction: float = 0.25
) -> DigitPairs:
    """The train/test pools of source digits and the image pairs of every composite.

    Args:
        train: number of training composites.
        test: number of test composites.
        seed: an int in [0, 2**32): the pool split and every pair.
        conflict: in [0, 1], the probability that digit B is independent of digit A (module docstring).
        test_fraction: share of the source images held out as the test pool, stratified by digit.

    Example:
        >>> pairs = multi_digit_pairs(100, 50, seed=0, conflict=1.0)
        >>> tuple(pairs.train.shape), bool(torch.isin(pairs.test, pairs.train_pool).any())
        ((100, 2), False)
    """
    train = _positive_int("train", train)
    test = _positive_int("test", test)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    conflict = _conflict(conflict)
    _, labels = digit_images()
    train_pool, test_pool = split_indices(labels.numel(), test_fraction, seed, strata=labels.tolist())
    return DigitPairs(
        train=_pairs(labels, train_pool, train, conflict, _generator(seed, 1)),
        test=_pairs(labels, test_pool, test, conflict, _generator(seed, 2)),
        train_pool=train_pool,
        test_pool=test_pool,
    )


def compose(images: Tensor, pairs: Tensor, shift: int) -> Tensor:
    """The composites of ``pairs``: ``[N, 1, 8 + shift, 8 + shift]`` float32 in [0, 1].

    Image ``pairs[n, 0]`` fills rows and columns ``0..7``, image ``pairs[n, 1]`` rows and columns
    ``shift..shift + 7``; where they overlap the brighter pixel wins (pixel-wise max).

    Args:
        images: ``[K, 8, 8]`` source digits (:func:`digit_images`).
        pairs: ``[N, 2]`` int64 indices into ``images``.
        shift: offset of the second digit along each axis, 1..16.
    """
    shift = _positive_int("shift", shift, 1, 2 * DIGIT_SIDE)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be [N, 2] indices (A, B), got shape {tuple(pairs.shape)}")
    side = DIGIT_SIDE + shift
    canvas = torch.zeros(pairs.shape[0], 1, side, side, dtype=images.dtype)
    canvas[:, 0, :DIGIT_SIDE, :DIGIT_SIDE] = images[pairs[:, 0]]
    lower = canvas[:, 0, shift:, shift:]
    torch.maximum(lower, images[pairs[:, 1]], out=lower)
    return canvas


def multi_digits(
    train: int,
    test: int,
    *,
    seed: int,
    shift: int = 4,
    conflict: float = 0.0,
    test_fraction: float = 0.25,
) -> ImageTasks:
    """Two-digit composites with tasks ``"left"`` and ``"right"``, as :class:`ImageTasks`.

    Args:
        train: number of training composites (any number: pairs are drawn with replacement from the
            train pool of about 1,350 source images).
        test: number of test composites, from the held-out pool of about 450.
        seed: an int in [0, 2**32): the pool split and every pair (the images are then fixed).
        shift: offset in pixels of digit B from digit A along each axis, 1..16; the canvas side is
            ``8 + shift`` and the digits share ``max(0, 8 - shift)**2`` pixels (default 4: 12x12,
            a 4x4 overlap).
        conflict: in [0, 1]; 0: both digits show the same class (equal labels), 1: independent
            digits (MultiMNIST). See the module docstring for why 1 creates negative transfer.
        test_fraction: share of the source images held out for the test composites.

    Returns:
        ``train_x`` ``[train, 1, 8 + shift, 8 + shift]`` float32 in [0, 1], ``train_y`` ``{"left":
        [train], "right": [train]}`` int64 in 0..9, and the same for the test split.

    Example:
        >>> data = multi_digits(64, 32, seed=0, conflict=1.0)
        >>> tuple(data.train_x.shape), sorted(data.train_y)
        ((64, 1, 12, 12), ['left', 'right'])
    """
    shift = _positive_int("shift", shift, 1, 2 * DIGIT_SIDE)
    pairs = multi_digit_pairs(train, test, seed=seed, conflict=conflict, test_fraction=test_fraction)
    images, labels = digit_images()

    def targets(split: Tensor) -> dict[str, Tensor]:
        return {TASKS[0]: labels[split[:, 0]], TASKS[1]: labels[split[:, 1]]}

    return ImageTasks(compose(images, pairs.train, shift), targets(pairs.train),
                      compose(images, pairs.test, shift), targets(pairs.test), SOURCE)

