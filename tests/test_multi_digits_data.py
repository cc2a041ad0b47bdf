"""benchmarks._multi_digits: two overlapping sklearn digits, one task per digit, and the conflict knob."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks._images import ImageTasks
from benchmarks._multi_digits import TASKS, compose, digit_images, multi_digit_pairs, multi_digits


def test_shapes_ranges_and_labels() -> None:
    data = multi_digits(120, 40, seed=0, shift=5, conflict=0.5)
    assert isinstance(data, ImageTasks) and data.source == "sklearn-digits"
    assert tuple(data.train_x.shape) == (120, 1, 13, 13) and tuple(data.test_x.shape) == (40, 1, 13, 13)
    assert data.train_x.dtype == torch.float32 and 0.0 <= float(data.train_x.min()) <= float(data.train_x.max()) <= 1.0
    assert list(data.train_y) == list(TASKS) == ["left", "right"]
    for split in (data.train_y, data.test_y):
        for y in split.values():
            assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) <= 9


def test_composites_are_the_pixelwise_max_of_the_two_placed_digits() -> None:
    images, labels = digit_images()
    pairs = multi_digit_pairs(30, 10, seed=3, conflict=1.0)
    data = multi_digits(30, 10, seed=3, shift=3, conflict=1.0)
    for x, y, split in ((data.train_x, data.train_y, pairs.train), (data.test_x, data.test_y, pairs.test)):
        for n in range(split.shape[0]):
            a, b = split[n].tolist()
            expected = torch.zeros(11, 11)
            for i in range(8):
                for j in range(8):
                    expected[i, j] = images[a, i, j]
            for i in range(8):
                for j in range(8):
                    expected[3 + i, 3 + j] = max(float(expected[3 + i, 3 + j]), float(images[b, i, j]))
            assert torch.equal(x[n, 0], expected), n
            assert (int(y["left"][n]), int(y["right"][n])) == (int(labels[a]), int(labels[b]))


def test_the_same_seed_gives_the_same_data_and_another_seed_other_data() -> None:
    first, again, other = (multi_digits(50, 20, seed=s, conflict=0.3) for s in (1, 1, 2))
    assert torch.equal(first.train_x, again.train_x) and torch.equal(first.test_x, again.test_x)
    assert all(torch.equal(first.train_y[t], again.train_y[t]) for t in TASKS)
    assert not torch.equal(first.train_x, other.train_x)
    # the test composites do not depend on how many training composites were drawn
    assert torch.equal(multi_digit_pairs(50, 20, seed=1).test, multi_digit_pairs(500, 20, seed=1).test)


def test_test_digits_never_appear_in_training_composites() -> None:
    _, labels = digit_images()
    pairs = multi_digit_pairs(2000, 600, seed=4, conflict=1.0)
    assert not bool(torch.isin(pairs.train_pool, pairs.test_pool).any())
    assert pairs.train_pool.numel() + pairs.test_pool.numel() == labels.numel()
    assert bool(torch.isin(pairs.train, pairs.train_pool).all()) and bool(torch.isin(pairs.test, pairs.test_pool).all())
    assert not bool(torch.isin(pairs.test, pairs.train).any())
    shares = [float((labels[pairs.test_pool] == d).float().mean()) for d in range(10)]  # stratified pools
    assert max(shares) - min(shares) < 0.02


def test_the_conflict_knob_sets_how_often_the_labels_agree() -> None:
    agreement = []
    for conflict in (0.0, 0.25, 0.5, 0.75, 1.0):
        pairs = multi_digit_pairs(4000, 10, seed=0, conflict=conflict)
        data = multi_digits(4000, 10, seed=0, conflict=conflict)
        equal = float((data.train_y["left"] == data.train_y["right"]).float().mean())
        expected = (1 - conflict) + conflict * 0.1  # classes are balanced to within a few percent
        assert abs(equal - expected) < 4 * math.sqrt(expected * (1 - expected) / 4000) + 0.005, (conflict, equal)
        agreement.append(equal)
        right = torch.bincount(data.train_y["right"], minlength=10).float() / 4000
        assert float(right.max() - right.min()) < 0.05  # the right task stays balanced whatever the knob
        if conflict == 0.0:
            assert not bool((pairs.train[:, 0] == pairs.train[:, 1]).any())  # the same class, another image
    assert agreement[0] == 1.0 and agreement == sorted(agreement, reverse=True)


def test_at_full_conflict_the_digits_are_independent() -> None:
    data = multi_digits(5000, 10, seed=1, conflict=1.0)
    joint = torch.zeros(10, 10)
    joint.index_put_((data.train_y["left"], data.train_y["right"]), torch.ones(5000), accumulate=True)
    joint /= 5000
    product = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    mutual_information = float((joint * (joint / product).log()).nansum())
    assert mutual_information < 0.02  # 0 for independent labels, log(10) = 2.3 at conflict 0


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="conflict must be a float in \\[0, 1\\].*got 1.5"):
        multi_digits(10, 10, seed=0, conflict=1.5)
    with pytest.raises(ValueError, match="conflict must be a float in \\[0, 1\\].*got True"):
        multi_digits(10, 10, seed=0, conflict=True)
    with pytest.raises(ValueError, match="shift must be an int in \\[1, 16\\], got 0"):
        multi_digits(10, 10, seed=0, shift=0)
    with pytest.raises(ValueError, match="train must be an int >= 1, got 0"):
        multi_digits(0, 10, seed=0)
    with pytest.raises(ValueError, match="seed must be an int in \\[0, 2\\*\\*32\\), got -1"):
        multi_digits(10, 10, seed=-1)
    with pytest.raises(ValueError, match="test_fraction must be in \\(0, 1\\)"):
        multi_digits(10, 10, seed=0, test_fraction=1.0)
    with pytest.raises(ValueError, match="pairs must be \\[N, 2\\]"):
        compose(digit_images()[0], torch.zeros(3, dtype=torch.int64), 4)
