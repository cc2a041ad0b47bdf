"""Tests for the HAM10000 data: synthetic lesion generator, label quotas, real-layout loader."""

from __future__ import annotations

import csv
import doctest
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import benchmarks._skin as skin
from benchmarks._skin import (
    APPEARANCE,
    DIAGNOSES,
    HAM10000_COUNTS,
    diagnosis_labels,
    load_ham10000,
    synthetic_ham10000,
    synthetic_lesions,
)
from benchmarks._images import quota_counts, stratified_subset


def test_documented_examples_run() -> None:
    result = doctest.testmod(skin, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0


# ---------------------------------------------------------------------------
# Label quotas


@settings(max_examples=60, deadline=None)
@given(total=st.integers(0, 5000), weights=st.lists(st.integers(0, 1000), min_size=1, max_size=8))
def test_quota_counts_sum_to_the_total_and_stay_within_one_of_the_exact_share(total: int, weights: list[int]) -> None:
    if sum(weights) == 0:
        weights = [*weights[:-1], 1]
    counts = quota_counts(total, weights)
    assert sum(counts) == total and len(counts) == len(weights)
    for count, weight in zip(counts, weights):
        assert abs(count - total * weight / sum(weights)) < 1.0


def test_quota_counts_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="total"):
        quota_counts(-1, [1, 2])
    with pytest.raises(ValueError, match="weights"):
        quota_counts(3, [0, 0])


def test_stratified_subset_keeps_the_first_entries_of_each_stratum_in_proportion() -> None:
    strata = [2, 0, 0, 1, 0, 2, 0, 0, 0, 0]  # 7 zeros, 1 one, 2 twos
    keep = stratified_subset(strata, 5).tolist()
    assert len(keep) == 5 and keep == sorted(keep)
    kept = [strata[i] for i in keep]
    assert kept.count(0) == 4 and kept.count(2) == 1  # 3.5 -> 4, 0.5 -> 0 or 1 by remainder, 1.0 -> 1
    assert [i for i in keep if strata[i] == 0] == [1, 2, 4, 6]  # the first zeros in file order
    assert stratified_subset(strata, 100).tolist() == list(range(10))
    with pytest.raises(ValueError, match="limit"):
        stratified_subset(strata, 0)


# ---------------------------------------------------------------------------
# Synthetic generator


def test_diagnosis_labels_follow_ham10000_shares_and_match_the_images_draw() -> None:
    labels = diagnosis_labels(5000, seed=4)
    assert labels.dtype == torch.int64
    shares = torch.bincount(labels, minlength=7).double() / 5000
    target = torch.tensor(HAM10000_COUNTS, dtype=torch.float64) / sum(HAM10000_COUNTS)
    assert torch.allclose(shares, target, atol=2e-4)  # exact quotas, not only in expectation
    assert abs(float(shares[DIAGNOSES.index("nv")]) - 2 / 3) < 0.005
    _, _, drawn = synthetic_lesions(60, 16, seed=4)
    assert torch.equal(drawn, diagnosis_labels(60, seed=4))
    assert not torch.equal(diagnosis_labels(60, seed=4), diagnosis_labels(60, seed=5))


def test_synthetic_lesions_have_the_documented_shapes_ranges_and_masks() -> None:
    images, masks, labels = synthetic_lesions(300, 32, seed=0)
    assert images.shape == (300, 3, 32, 32) and images.dtype == torch.float32
    assert masks.shape == (300, 32, 32) and masks.dtype == torch.int64
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert set(torch.unique(masks).tolist()) == {0, 1}
    assert set(torch.unique(labels).tolist()) == set(range(7))
    area = masks.flatten(1).sum(1)
    assert int(area.min()) >= 4  # non-empty, even at 32 px
    # the lesion lies inside the image: two pixels of skin all around
    border = masks.clone()
    border[:, 2:-2, 2:-2] = 0
    assert int(border.sum()) == 0
    # the mask marks the lesion: it differs from the skin around it in every image
    inside = (images * masks.unsqueeze(1)).sum((2, 3)) / area.view(-1, 1)
    outside = (images * (1 - masks).unsqueeze(1)).sum((2, 3)) / (32 * 32 - area).view(-1, 1)
    assert float((inside - outside).abs().amax(1).min()) > 0.02
    assert float((inside - outside).abs().amax(1).median()) > 0.1


def _class_means(values: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {name: float(values[labels == i].mean()) for i, name in enumerate(DIAGNOSES)}


def test_without_mimicry_each_diagnosis_looks_like_its_table_entry() -> None:
    images, masks, labels = synthetic_lesions(700, 32, seed=1, mimicry=0.0)
    area = _class_means(masks.flatten(1).float().mean(1), labels)
    assert area["df"] < area["nv"] < area["mel"]  # small dermatofibromas, large melanomas
    m = masks.unsqueeze(1).float()
    inside = (images * m).sum((2, 3)) / m.sum((2, 3))
    outside = (images * (1 - m)).sum((2, 3)) / (1 - m).sum((2, 3))
    contrast = _class_means((outside - inside).mean(1), labels)  # darker than the skin
    assert contrast["mel"] > contrast["nv"] > contrast["akiec"]
    red = _class_means(inside[:, 0] - inside[:, 1], labels)  # red minus green
    assert red["vasc"] == max(red.values())
    # melanomas are the irregular, multi-coloured ones: the largest colour spread inside the lesion
    spread = ((images - inside.view(-1, 3, 1, 1)) ** 2 * m).sum((2, 3)) / m.sum((2, 3))
    variation = _class_means(spread.sum(1).sqrt(), labels)
    assert variation["mel"] > variation["nv"]


def test_mimicry_blurs_the_classes() -> None:
    def df_area_gap(mimicry: float) -> float:
        _, masks, labels = synthetic_lesions(700, 32, seed=2, mimicry=mimicry)
        area = _class_means(masks.flatten(1).float().mean(1), labels)
        return area["mel"] - area["df"]

    assert df_area_gap(0.0) > 1.5 * df_area_gap(0.6) > 0


def test_synthetic_data_is_a_function_of_the_seed() -> None:
    a, again, other = (synthetic_ham10000(12, 6, 32, seed=s) for s in (3, 3, 4))
    assert torch.equal(a.train_x, again.train_x) and torch.equal(a.test_y["lesion"], again.test_y["lesion"])
    assert torch.equal(a.test_y["diagnosis"], again.test_y["diagnosis"])
    assert not torch.equal(a.train_x, other.train_x)
    assert not torch.equal(a.train_x[:6], a.test_x)  # train and test are different draws
    assert a.source == "synthetic" and a.spatial_dims == 2
    assert a.train_y["lesion"].shape == (12, 32, 32) and a.test_y["diagnosis"].shape == (6,)


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"n": 0}, "n >= 1"), ({"size": 8}, "size >= 16"), ({"mimicry": 1.5}, "mimicry")]
)
def test_synthetic_lesions_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"n": 4, "size": 32, **kwargs}
    with pytest.raises(ValueError, match=message):
        synthetic_lesions(**arguments)


def test_appearance_table_covers_every_diagnosis_with_valid_ranges() -> None:
    assert list(APPEARANCE) == list(DIAGNOSES)
    for look in APPEARANCE.values():
        for low, high in (look.radius, look.elongation, look.irregularity, look.softness, look.darkness):
            assert 0 <= low <= high
        assert look.elongation[0] >= 1.0 and look.radius[1] < 1.0


# ---------------------------------------------------------------------------
# Real HAM10000 layout

_HEADER = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
# (lesion_id, dx) per image, in file order; HAM10000 lists several images of some lesions
_IMAGES = [
    ("HAM_0000001", "nv"), ("HAM_0000001", "nv"), ("HAM_0000002", "nv"), ("HAM_0000003", "nv"),
    ("HAM_0000004", "nv"), ("HAM_0000004", "nv"), ("HAM_0000004", "nv"), ("HAM_0000005", "nv"),
    ("HAM_0000006", "mel"), ("HAM_0000006", "mel"), ("HAM_0000007", "mel"), ("HAM_0000008", "mel"),
    ("HAM_0000009", "bkl"), ("HAM_0000010", "bkl"), ("HAM_0000010", "bkl"), ("HAM_0000011", "vasc"),
]


def _write_ham(root: Path, width: int = 60, height: int = 45) -> dict[int, tuple[str, str, int, tuple[int, int]]]:
    """A tiny HAM10000 tree. Image i has red level 20 + 12 i and a dark lesion box at a place of its own.

    Returns ``{i: (lesion_id, image_id, diagnosis, (top, left))}``.
    """
    parts = [root / "HAM10000_images_part_1", root / "HAM10000_images_part_2"]
    masks = root / "HAM10000_segmentations_lesion_tschandl"
    for folder in (*parts, masks):
        folder.mkdir(parents=True)
    expected: dict[int, tuple[str, str, int, tuple[int, int]]] = {}
    with (root / "HAM10000_metadata.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(_HEADER)
        for i, (lesion, dx) in enumerate(_IMAGES):
            image_id = f"ISIC_{24306 + i:07d}"
            writer.writerow([lesion, image_id, dx, "histo", 50, "male", "back"])
            top, left = 5 + (i % 4) * 6, 5 + (i // 4) * 8
            mask = np.zeros((height, width), dtype=np.uint8)
            mask[top : top + 16, left : left + 20] = 255
            pixels = np.zeros((height, width, 3), dtype=np.uint8)
            pixels[..., 0], pixels[..., 1], pixels[..., 2] = 20 + 12 * i, 200, 180
            pixels[mask > 0] = (10, 20, 30)
            Image.fromarray(pixels).save(parts[i % 2] / f"{image_id}.jpg", quality=95)
            Image.fromarray(mask).save(masks / f"{image_id}_segmentation.png")
            expected[i] = (lesion, image_id, DIAGNOSES.index(dx), (top, left))
    return expected


def _identify(image: torch.Tensor, mask: torch.Tensor) -> int:
    """Which written image this is: decode the red level of its skin."""
    red = float(image[0][mask == 0].median()) * 255
    return round((red - 20) / 12)


def test_ham10000_loader_reads_labels_and_aligned_masks(tmp_path: Path) -> None:
    expected = _write_ham(tmp_path)
    data = load_ham10000(tmp_path, size=32, test_fraction=0.3, seed=0)
    assert data.source == str(tmp_path)
    assert data.train_x.shape[1:] == (3, 32, 32) and data.train_y["lesion"].shape[1:] == (32, 32)
    assert data.train_x.shape[0] + data.test_x.shape[0] == len(_IMAGES)
    seen: set[int] = set()
    for x, ys in ((data.train_x, data.train_y), (data.test_x, data.test_y)):
        for image, mask, label in zip(x, ys["lesion"], ys["diagnosis"]):
            index = _identify(image, mask)
            lesion, _, diagnosis, (top, left) = expected[index]
            seen.add(index)
            assert int(label) == diagnosis
            # the mask is the written box, resized (60x45 -> 32x32) by nearest neighbour
            box = np.zeros((45, 60), dtype=np.uint8)
            box[top : top + 16, left : left + 20] = 255
            resized = np.asarray(Image.fromarray(box).resize((32, 32), Image.Resampling.NEAREST)) > 127
            assert torch.equal(mask, torch.from_numpy(resized).long())
            # and it lies on the dark lesion pixels of its image
            assert float(image[0][mask == 1].median()) < 0.15 < float(image[1][mask == 0].median())
    assert seen == set(range(len(_IMAGES)))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ham10000_split_keeps_every_lesion_on_one_side_and_is_stratified(tmp_path: Path, seed: int) -> None:
    expected = _write_ham(tmp_path)
    data = load_ham10000(tmp_path, size=16, test_fraction=0.3, seed=seed)

    def lesions(x: torch.Tensor, masks: torch.Tensor) -> set[str]:
        return {expected[_identify(image, mask)][0] for image, mask in zip(x, masks)}

    train, test = lesions(data.train_x, data.train_y["lesion"]), lesions(data.test_x, data.test_y["lesion"])
    assert train.isdisjoint(test) and len(train | test) == 11
    for name in ("nv", "mel", "bkl"):  # every diagnosis with two or more lesions is on both sides
        assert (data.train_y["diagnosis"] == DIAGNOSES.index(name)).any()
        assert (data.test_y["diagnosis"] == DIAGNOSES.index(name)).any()


def test_ham10000_split_is_a_function_of_the_seed_and_limit_keeps_a_stratified_head(tmp_path: Path) -> None:
    _write_ham(tmp_path)
    a, b = load_ham10000(tmp_path, 16, seed=1), load_ham10000(tmp_path, 16, seed=5)
    assert torch.equal(a.test_x, load_ham10000(tmp_path, 16, seed=1).test_x)
    assert not torch.equal(a.test_x, b.test_x)
    small = load_ham10000(tmp_path, 16, seed=1, limit=8)
    labels = torch.cat([small.train_y["diagnosis"], small.test_y["diagnosis"]])
    assert labels.numel() == 8
    assert torch.bincount(labels, minlength=7).tolist() == [0, 0, 2, 0, 2, 4, 0]  # 3/16, 4/16, 8/16, 1/16 of 8


def test_ham10000_loader_names_what_is_missing_or_wrong(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="HAM10000_metadata.csv"):
        load_ham10000(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="HAM10000_metadata.csv not found"):
        load_ham10000(tmp_path)
    expected = _write_ham(tmp_path)
    metadata = tmp_path / "HAM10000_metadata.csv"
    original = metadata.read_text()

    metadata.write_text(original.replace(",vasc,", ",melanoma,"))
    with pytest.raises(ValueError, match=r"line 17: dx='melanoma' is not one of"):
        load_ham10000(tmp_path)
    metadata.write_text(original.replace("lesion_id,", "lesion,", 1))
    with pytest.raises(ValueError, match=r"no column\(s\) \['lesion_id'\]"):
        load_ham10000(tmp_path)
    metadata.write_text(original)

    image_id = expected[3][1]
    mask = tmp_path / "HAM10000_segmentations_lesion_tschandl" / f"{image_id}_segmentation.png"
    mask.rename(mask.with_name("moved.png"))
    with pytest.raises(FileNotFoundError, match=f"lesion mask of '{image_id}' not found: expected .*_segmentation.png"):
        load_ham10000(tmp_path)
    Image.new("L", (30, 30)).save(mask)
    with pytest.raises(ValueError, match="30x30 but its image"):
        load_ham10000(tmp_path)
    mask.unlink()
    mask.with_name("moved.png").rename(mask)

    (tmp_path / "HAM10000_images_part_2" / f"{image_id}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=f"image '{image_id}' .* not found: expected .*part_1.*part_2"):
        load_ham10000(tmp_path)
    for part in ("HAM10000_images_part_1", "HAM10000_images_part_2"):
        for path in (tmp_path / part).iterdir():
            path.unlink()
        (tmp_path / part).rmdir()
    with pytest.raises(FileNotFoundError, match="neither .*HAM10000_images_part_1 nor"):
        load_ham10000(tmp_path)
