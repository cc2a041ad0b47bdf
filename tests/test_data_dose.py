"""Tests for the OpenKBP-style data: synthetic slices, the real-layout loader and the OpenKBP metrics."""

from __future__ import annotations

import doctest
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from benchmarks import _dose, _dose_metrics
from benchmarks._dose import (
    OARS,
    PRESCRIPTIONS,
    STRUCTURE_CLASSES,
    TARGETS,
    normalise_ct,
    oar_labels,
    ptv_map,
    roi_masks,
    synthetic_openkbp,
    synthetic_slices,
)
from benchmarks._dose_metrics import dose_score, dvh_metrics, dvh_score, masked_l1, possible_dose_mask
from benchmarks._openkbp_files import VOLUME_SHAPE, load_openkbp, read_sparse_csv

NAN = math.nan


@pytest.fixture(scope="module")
def slices() -> tuple[Tensor, Tensor, Tensor]:
    return synthetic_slices(48, 64, seed=3)


# ---------------------------------------------------------------------------
# Synthetic slices


def test_synthetic_shapes_dtypes_and_ranges(slices: tuple[Tensor, Tensor, Tensor]) -> None:
    inputs, dose, structures = slices
    assert inputs.shape == (48, 2, 64, 64) and inputs.dtype == torch.float32
    assert dose.shape == (48, 64, 64) and dose.dtype == torch.float32
    assert structures.shape == (48, 64, 64) and structures.dtype == torch.int64
    assert 0.0 <= float(inputs.min()) and float(inputs.max()) <= 1.0
    levels = {round(v, 4) for v in inputs[:, 1].unique().tolist()}
    assert levels <= {0.0, 0.8, 0.9, 1.0} and 1.0 in levels
    inside = torch.isfinite(dose)
    assert float(dose[inside].min()) >= 0.0 and float(dose[inside].max()) <= 1.1 * 70.0
    assert 0 <= int(structures.min()) and int(structures.max()) < STRUCTURE_CLASSES


def test_synthetic_dose_is_nan_exactly_outside_the_body(slices: tuple[Tensor, Tensor, Tensor]) -> None:
    inputs, dose, structures = slices
    ct, outside = inputs[:, 0], torch.isnan(dose)
    assert bool(outside.any()) and bool((~outside).any())
    assert float(ct[outside].max()) < 0.05  # air (-1000 HU) wherever the dose is masked out
    assert float((ct[~outside] > 0.3).float().mean()) > 0.97  # tissue inside (only airway lumens are dark)
    assert not bool((structures[outside] > 0).any()) and not bool((inputs[:, 1][outside] > 0).any())


def test_synthetic_dose_is_highest_in_the_ptv70_and_covers_every_target(
    slices: tuple[Tensor, Tensor, Tensor],
) -> None:
    inputs, dose, _ = slices
    rois = roi_masks(inputs, torch.zeros_like(dose, dtype=torch.int64))
    for i in range(dose.shape[0]):
        ptv70 = rois["PTV70"][i]
        assert bool(ptv70.any())  # every synthetic slice has the gross disease
        top = float(dose[i][ptv70].mean())
        assert float(dose[i][ptv70].median()) >= 0.95 * 70.0
        for name in ("PTV56", "PTV63"):
            if bool(rois[name][i].any()):
                assert float(dose[i][rois[name][i]].median()) >= 0.95 * PRESCRIPTIONS[name]
                assert float(dose[i][rois[name][i]].mean()) < top
        elsewhere = torch.isfinite(dose[i]) & (inputs[i, 1] == 0)
        assert float(dose[i][elsewhere].mean()) < 0.75 * top


def test_synthetic_serial_organs_are_spared(slices: tuple[Tensor, Tensor, Tensor]) -> None:
    _, dose, structures = slices
    cord, stem = structures == OARS.index("SpinalCord") + 1, structures == OARS.index("Brainstem") + 1
    assert bool(cord.any()) and bool(stem.any())
    assert float(dose[cord].max()) <= 45.0 * 1.02 + 1e-4  # the cap times the 2 % heterogeneity
    assert float(dose[stem].max()) <= 54.0 * 1.02 + 1e-4


def test_synthetic_oars_are_present_on_most_slices_with_every_class(slices: tuple[Tensor, Tensor, Tensor]) -> None:
    _, _, structures = slices
    per_slice = [len(set(s.unique().tolist()) - {0}) for s in structures]
    assert sum(count >= 2 for count in per_slice) >= 0.9 * len(per_slice)
    assert set(structures.unique().tolist()) == set(range(STRUCTURE_CLASSES))


def test_synthetic_oars_show_in_the_ct(slices: tuple[Tensor, Tensor, Tensor]) -> None:
    inputs, _, structures = slices
    ct = inputs[:, 0]
    tissue = ct[(structures == 0) & (inputs[:, 1] == 0) & (ct > 0.45)].median()
    assert float(ct[structures == OARS.index("Mandible") + 1].mean()) > 0.9  # bone
    parotids = (structures == OARS.index("RightParotid") + 1) | (structures == OARS.index("LeftParotid") + 1)
    assert float(ct[parotids].mean()) < float(tissue)  # fattier than muscle
    # the patient's right parotid is on the image's left (the real data's orientation)
    columns = torch.arange(64).expand_as(structures)
    right = float(columns[structures == OARS.index("RightParotid") + 1].float().mean())
    left = float(columns[structures == OARS.index("LeftParotid") + 1].float().mean())
    assert right < 32 < left


def test_synthetic_openkbp_is_a_function_of_the_seed() -> None:
    a, b, c = (synthetic_openkbp(4, 3, 32, seed=s) for s in (1, 1, 2))
    assert a.train_x.shape == (4, 2, 32, 32) and a.test_x.shape == (3, 2, 32, 32)
    assert set(a.train_y) == set(_dose.TASKS) and a.source == "synthetic"
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y["structures"], b.test_y["structures"])
    assert torch.equal(a.train_y["dose"].isnan(), b.train_y["dose"].isnan())
    assert torch.allclose(a.train_y["dose"].nan_to_num(-1), b.train_y["dose"].nan_to_num(-1))
    assert not torch.equal(a.train_x, c.train_x)
    assert not torch.equal(a.train_x[:3], a.test_x)  # train and test are different draws


def test_synthetic_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="size >= 32"):
        synthetic_slices(2, 16)
    with pytest.raises(ValueError, match="n >= 1"):
        synthetic_slices(0, 64)


def test_labels_and_ptv_map_resolve_overlaps_by_priority() -> None:
    cord = torch.tensor([True, True, False, False])
    mandible = torch.tensor([False, True, True, False])
    parotid = torch.tensor([False, False, True, True])
    labels = oar_labels({"Mandible": mandible, "SpinalCord": cord, "LeftParotid": parotid})
    assert labels.tolist() == [2, 2, 4, 4]
    ptv = ptv_map({"PTV56": torch.tensor([True, True, False]), "PTV70": torch.tensor([False, True, False])})
    assert ptv.tolist() == pytest.approx([0.8, 1.0, 0.0])
    with pytest.raises(ValueError, match="unknown OARs"):
        oar_labels({"Heart": cord})
    with pytest.raises(ValueError, match="unknown targets"):
        ptv_map({"PTV60": cord})


def test_roi_masks_read_back_the_targets_and_organs(slices: tuple[Tensor, Tensor, Tensor]) -> None:
    inputs, _, structures = slices
    rois = roi_masks(inputs, structures)
    assert set(rois) == set(TARGETS) | set(OARS)
    assert torch.equal(rois["PTV70"], inputs[:, 1] == 1.0)
    assert torch.equal(rois["Larynx"], structures == OARS.index("Larynx") + 1)
    with pytest.raises(ValueError, match="inputs must be"):
        roi_masks(inputs[:, :1], structures)


# ---------------------------------------------------------------------------
# Real OpenKBP layout

SHAPE = (16, 16, 16)


def _flat(points: Iterable[tuple[int, int, int]], shape: tuple[int, int, int] = SHAPE) -> list[int]:
    return sorted(int(np.ravel_multi_index(p, shape)) for p in points)


def _box(rows: range, cols: range, slices: range) -> list[tuple[int, int, int]]:
    return [(r, c, k) for r in rows for c in cols for k in slices]


def _write(path: Path, values: dict[int, float] | list[int], *, header: bool = True) -> None:
    lines = [",data"] if header else []
    if isinstance(values, dict):
        lines += [f"{i},{v}" for i, v in sorted(values.items())]
    else:
        lines += [f"{i}," for i in values]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


BODY = _box(range(3, 13), range(2, 14), range(16))
PTV70 = _box(range(6, 9), range(5, 8), range(5, 10))
PTV56 = _box(range(6, 9), range(9, 11), range(4, 11))
CORD = _box(range(11, 12), range(7, 9), range(16))
MANDIBLE = _box(range(11, 12), range(8, 11), range(16))  # shares (11, 8, k) with the cord


def _patient(folder: Path, number: int, shape: tuple[int, int, int] = SHAPE) -> None:
    """A tiny patient: CT 1000 + 100 * number in the body, dose 10 + number there and 70 in its PTV70."""
    folder.mkdir(parents=True)
    body = _flat(BODY, shape)
    _write(folder / "ct.csv", {i: 1000.0 + 100 * number for i in body})
    dose = {i: 10.0 + number for i in body} | {i: 70.0 for i in _flat(PTV70, shape)}
    _write(folder / "dose.csv", dose)
    _write(folder / "possible_dose_mask.csv", body)
    _write(folder / "PTV70.csv", _flat(PTV70, shape))
    _write(folder / "PTV56.csv", _flat(PTV56, shape), header=False)  # index-only rows are accepted too
    _write(folder / "SpinalCord.csv", _flat(CORD, shape))
    _write(folder / "Mandible.csv", _flat(MANDIBLE, shape))
    (folder / "voxel_dimensions.csv").write_text("3.5\n3.5\n2.0\n", encoding="utf-8")


@pytest.fixture
def openkbp(tmp_path: Path) -> Path:
    _patient(tmp_path / "train-pats" / "pt_1", 1)
    _patient(tmp_path / "train-pats" / "pt_2", 2)
    _patient(tmp_path / "validation-pats" / "pt_10", 3)
    return tmp_path


def _patients_of(x: Tensor) -> set[int]:
    """Patient numbers from the CT channel: the body's CT number is 1000 + 100 * number."""
    ct = x[:, 0] * _dose.CT_CLIP
    return {round((float(v) - 1000.0) / 100.0) for v in ct[ct > 0].unique()}


def test_real_layout_loads_every_ptv_slice_exactly(openkbp: Path) -> None:
    data = load_openkbp(openkbp, size=16, test_fraction=0.34, seed=0, slices=None, crop=None, shape=SHAPE)
    assert data.train_x.shape[1:] == (2, 16, 16) and data.source == str(openkbp)
    assert data.train_x.shape[0] + data.test_x.shape[0] == 3 * 7  # slices 4..10 hold a PTV
    x, dose, structures = data.train_x, data.train_y["dose"], data.train_y["structures"]
    assert dose.dtype == torch.float32 and structures.dtype == torch.int64
    body = torch.zeros(16, 16, dtype=torch.bool)
    body[3:13, 2:14] = True
    for i in range(x.shape[0]):
        assert torch.equal(torch.isfinite(dose[i]), body)  # NaN outside the possible-dose mask
        assert torch.equal(x[i, 0] > 0, body)
        assert torch.equal(structures[i][11, 7:11], torch.tensor([2, 2, 7, 7]))  # cord wins the shared voxel
        assert int((structures[i] > 0).sum()) == 4
        assert {round(v, 4) for v in x[i, 1].unique().tolist()} <= {0.0, 0.8, 1.0}
    with_70 = x[:, 1].amax(dim=(1, 2)) == 1.0
    assert int(with_70.sum()) == x.shape[0] * 5 // 7  # slices 5..9 of 4..10
    assert torch.all(dose[:, 6:9, 5:8][with_70] == 70.0)
    assert torch.allclose(x[:, 1, 6:9, 9:11], torch.tensor(0.8))
    number = {round(float(v) - 10.0) for v in dose[:, 3, 2].unique()}  # dose 10 + number outside the PTV
    assert number == _patients_of(x)


def test_real_layout_splits_by_patient(openkbp: Path) -> None:
    for seed in range(4):
        data = load_openkbp(openkbp, size=16, seed=seed, slices=3, crop=None, shape=SHAPE)
        train, test = _patients_of(data.train_x), _patients_of(data.test_x)
        assert train.isdisjoint(test) and train | test == {1, 2, 3}
        assert data.train_x.shape[0] == 3 * len(train) and data.test_x.shape[0] == 3 * len(test)
    a, b = (load_openkbp(openkbp, size=16, seed=1, slices=3, shape=SHAPE) for _ in range(2))
    assert torch.equal(a.test_x, b.test_x)


def test_real_layout_slices_are_evenly_spaced_and_resized(openkbp: Path) -> None:
    data = load_openkbp(openkbp, size=16, seed=0, limit=2, slices=3, crop=None, shape=SHAPE)
    assert _patients_of(data.train_x) | _patients_of(data.test_x) == {1, 2}  # limit keeps the first two
    # slices 4, 7, 10 of 4..10: PTV70 (slices 5..9) only on the middle one
    assert (data.train_x[:, 1].amax(dim=(1, 2)) == 1.0).tolist() == [False, True, False]
    small = load_openkbp(openkbp, size=8, seed=0, slices=2, shape=SHAPE)
    assert small.train_x.shape[1:] == (2, 8, 8) and small.train_y["dose"].shape[1:] == (8, 8)
    inside = torch.isfinite(small.train_y["dose"])
    assert bool(inside.any()) and not bool(inside.all())
    assert float(small.train_y["dose"][inside].min()) >= 0.0


def test_real_layout_reads_the_full_128_volume(tmp_path: Path) -> None:
    shape = VOLUME_SHAPE
    for number in (1, 2):
        folder = tmp_path / "train-pats" / f"pt_{number}"
        folder.mkdir(parents=True)
        body = _flat(_box(range(40, 90), range(20, 110), range(60, 64)), shape)
        _write(folder / "ct.csv", {i: 1024.0 for i in body})
        _write(folder / "dose.csv", {i: 5.0 * number for i in body})
        _write(folder / "possible_dose_mask.csv", body)
        _write(folder / "PTV70.csv", _flat(_box(range(60, 64), range(60, 64), range(61, 63)), shape))
    data = load_openkbp(tmp_path, size=32, seed=0)
    assert data.train_x.shape == (2, 2, 32, 32) and data.test_x.shape == (2, 2, 32, 32)  # slices 61, 62 each
    assert float(data.train_x[:, 0].max()) == pytest.approx(0.5)
    assert not bool(data.train_y["structures"].any())  # no OAR files: all background
    whole = load_openkbp(tmp_path, size=32, seed=0, crop=None)
    cropped_share = float(torch.isfinite(data.train_y["dose"]).float().mean())
    whole_share = float(torch.isfinite(whole.train_y["dose"]).float().mean())
    # the body is 50 x 90 of 128 x 128 voxels; the 80-voxel crop keeps 50 x 80 of it
    assert whole_share == pytest.approx(50 * 90 / 128**2, abs=0.02)
    assert cropped_share == pytest.approx(50 * 80 / 80**2, abs=0.03)
    assert bool(torch.isfinite(data.train_y["dose"][:, 16, [0, -1]]).all())  # the body is cut at both sides
    assert not bool(torch.isfinite(data.train_y["dose"][:, [0, -1], 16]).any())  # but not at the top or bottom


def test_real_layout_errors_name_the_file(openkbp: Path, tmp_path: Path) -> None:
    (openkbp / "train-pats" / "pt_2" / "ct.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"pt_2/ct\.csv not found"):
        load_openkbp(openkbp, size=16, shape=SHAPE)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_openkbp(tmp_path / "missing")
    empty = tmp_path / "empty"
    (empty / "train-pats" / "pt_1").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="need at least 2"):
        load_openkbp(empty)
    with pytest.raises(ValueError, match="slices must be None"):
        load_openkbp(openkbp, slices=0)


def test_sparse_csv_reports_malformed_rows(tmp_path: Path) -> None:
    path = tmp_path / "dose.csv"
    path.write_text(",data\n3,1.5\n7,2.5\n", encoding="utf-8")
    indices, values = read_sparse_csv(path, 8, values=True)
    assert indices.tolist() == [3, 7] and values is not None and values.tolist() == [1.5, 2.5]
    path.write_text(",data\r\n3,\r\n\r\n5,\r\n", encoding="utf-8")  # a mask, Windows line ends, a blank line
    assert read_sparse_csv(path, 8, values=False)[0].tolist() == [3, 5]
    cases = {
        ",data\n3,1.5\nabc,2.0\n": r"dose\.csv: line 3: 'abc,2\.0' does not start with",
        ",data\n3,1.5\n9,2.0\n": r"line 3: .*outside \[0, 8\)",
        ",data\n3,1.5\n4,\n": r"line 3: .*has no value",
        ",data\n3,x\n": r"line 2: .*not a number",
        ",data\n3,nan\n": r"line 2: .*non-finite",
    }
    for text, message in cases.items():
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            read_sparse_csv(path, 8, values=True)


def test_real_layout_reports_bad_patient_data(openkbp: Path) -> None:
    folder = openkbp / "train-pats" / "pt_1"
    (folder / "dose.csv").write_text(",data\n1,2.0\n2,1e9x\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"pt_1/dose\.csv: line 3"):
        load_openkbp(openkbp, size=16, shape=SHAPE)
    (folder / "dose.csv").write_text(",data\n1,2.0\n", encoding="utf-8")
    for target in TARGETS:
        (folder / f"{target}.csv").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="pt_1 has no PTV56.csv"):
        load_openkbp(openkbp, size=16, shape=SHAPE)


def test_ct_numbers_are_clipped_and_scaled() -> None:
    assert normalise_ct(torch.tensor([-50.0, 0.0, 512.0, 2048.0, 4000.0])).tolist() == [0.0, 0.0, 0.25, 1.0, 1.0]


# ---------------------------------------------------------------------------
# Metrics


def test_masked_l1_ignores_the_masked_out_pixels() -> None:
    reference = torch.tensor([[[1.0, NAN], [3.0, 5.0]]])
    predicted = torch.tensor([[[[2.0, 100.0], [3.0, 3.0]]]], requires_grad=True)  # [N, 1, H, W] network output
    loss = masked_l1(predicted, reference)
    assert float(loss.detach()) == pytest.approx(1.0)  # (1 + 0 + 2) / 3
    loss.backward()
    assert predicted.grad is not None
    assert predicted.grad.view(-1).tolist() == pytest.approx([1 / 3, 0.0, 0.0, -1 / 3])
    empty = masked_l1(torch.zeros(1, 2, 2), torch.full((1, 2, 2), NAN))
    assert float(empty) == 0.0


def test_dose_score_is_the_per_image_mean_error_inside_the_mask() -> None:
    reference = torch.tensor([[[10.0, NAN], [20.0, 30.0]], [[NAN, NAN], [NAN, NAN]], [[0.0, 5.0], [NAN, NAN]]])
    predicted = torch.tensor([[[13.0, 99.0], [20.0, 30.0]], [[1.0, 1.0], [1.0, 1.0]], [[1.0, 4.0], [9.0, 9.0]]])
    # image 0: 3 / 3 = 1; image 1: empty mask, left out; image 2: (1 + 1) / 2 = 1
    assert dose_score(predicted, reference) == pytest.approx(1.0)
    assert dose_score(predicted[:1] * 0, reference[:1]) == pytest.approx(20.0)
    assert math.isnan(dose_score(predicted[1:2], reference[1:2]))
    assert torch.equal(possible_dose_mask(reference[0]), torch.tensor([[True, False], [True, True]]))
    with pytest.raises(ValueError, match="same shape"):
        dose_score(predicted[:, :1], reference)


def test_dvh_points_match_numpy_percentiles() -> None:
    generator = torch.Generator().manual_seed(5)
    dose = 70 * torch.rand(3, 12, 12, generator=generator)
    ptv = torch.rand(3, 12, 12, generator=generator) < 0.4
    oar = torch.rand(3, 12, 12, generator=generator) < 0.3
    points = dvh_metrics(dose, {"PTV63": ptv, "Larynx": oar})
    assert set(points) == {"D_99 PTV63", "D_95 PTV63", "D_1 PTV63", "D_2 Larynx", "mean Larynx"}
    for i in range(3):
        a, b = dose[i][ptv[i]].double().numpy(), dose[i][oar[i]].double().numpy()
        assert float(points["D_99 PTV63"][i]) == pytest.approx(np.percentile(a, 1), abs=1e-4)
        assert float(points["D_95 PTV63"][i]) == pytest.approx(np.percentile(a, 5), abs=1e-4)
        assert float(points["D_1 PTV63"][i]) == pytest.approx(np.percentile(a, 99), abs=1e-4)
        assert float(points["D_2 Larynx"][i]) == pytest.approx(np.percentile(b, 98), abs=1e-4)
        assert float(points["mean Larynx"][i]) == pytest.approx(b.mean(), abs=1e-4)


def test_dvh_points_by_hand() -> None:
    dose = torch.tensor([[[0.0, 10.0, 20.0, 30.0, 40.0]]])
    everything = torch.ones(1, 1, 5, dtype=torch.bool)
    points = dvh_metrics(dose, {"PTV70": everything, "SpinalCord": everything, "Mandible": ~everything})
    # linear interpolation between the sorted doses at position q * (5 - 1)
    assert float(points["D_99 PTV70"][0]) == pytest.approx(0.4)
    assert float(points["D_95 PTV70"][0]) == pytest.approx(2.0)
    assert float(points["D_1 PTV70"][0]) == pytest.approx(39.6)
    assert float(points["D_2 SpinalCord"][0]) == pytest.approx(39.2)
    assert float(points["mean SpinalCord"][0]) == pytest.approx(20.0)
    assert math.isnan(float(points["mean Mandible"][0]))  # absent structure


def test_dvh_score_by_hand() -> None:
    reference = torch.tensor([[[70.0, 70.0, 20.0, NAN]]])
    predicted = torch.tensor([[[68.0, 68.0, 30.0, 500.0]]])
    rois = {
        "PTV70": torch.tensor([[[True, True, False, False]]]),
        "SpinalCord": torch.tensor([[[False, False, True, True]]]),  # its masked-out pixel is not read
        "Esophagus": torch.tensor([[[False, False, False, False]]]),  # absent: no point
    }
    # PTV70: D_99, D_95, D_1 each 2 Gy off; SpinalCord: D_2 and mean each 10 Gy off
    assert dvh_score(predicted, reference, rois) == pytest.approx((3 * 2 + 2 * 10) / 5)
    assert dvh_score(reference + 3.0, reference, rois) == pytest.approx(3.0)
    assert math.isnan(dvh_score(predicted, reference, {"Esophagus": rois["Esophagus"]}))
    with pytest.raises(ValueError, match="bool mask"):
        dvh_score(predicted, reference, {"PTV70": rois["PTV70"].float()})


def test_dvh_score_of_synthetic_data_against_a_flat_guess(slices: tuple[Tensor, Tensor, Tensor]) -> None:
    inputs, dose, structures = slices
    rois = roi_masks(inputs, structures)
    assert dvh_score(dose.nan_to_num(0.0), dose, rois) == pytest.approx(0.0, abs=1e-5)
    flat = torch.full_like(dose, float(dose.nanmean()))
    assert dvh_score(flat, dose, rois) > 5.0 and dose_score(flat, dose) > 5.0


@pytest.mark.parametrize("module", [_dose, _dose_metrics])
def test_documented_examples_run(module: object) -> None:
    failures, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS)  # type: ignore[arg-type]
    assert attempted > 5 and failures == 0
