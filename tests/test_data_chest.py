"""Tests for the STOIC data: MetaImage reader/writer, synthetic CT generator, real-layout loader."""

from __future__ import annotations

import csv
import doctest
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import benchmarks._chest as chest
import benchmarks._metaimage as metaimage
from benchmarks._chest import (
    COVID_FRACTION,
    SEVERE_FRACTION,
    load_stoic,
    resample,
    stoic_labels,
    synthetic_ct,
    synthetic_stoic,
    window_hu,
)
from benchmarks._metaimage import read_mha, write_mha


@pytest.mark.parametrize("module", [chest, metaimage])
def test_documented_examples_run(module: Any) -> None:
    result = doctest.testmod(module)
    assert result.attempted >= 2 and result.failed == 0


# ---------------------------------------------------------------------------
# MetaImage


@pytest.mark.parametrize("dtype", ["int16", "uint16", "float32", "uint8", "int8", "int32", "float64"])
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("msb", [False, True])
def test_mha_round_trip_is_bit_exact(tmp_path: Path, dtype: str, compress: bool, msb: bool) -> None:
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is None:
        array = rng.standard_normal((3, 5, 7)).astype(dtype) * 1000
    else:
        array = rng.integers(info.min, info.max, size=(3, 5, 7), endpoint=True).astype(dtype)
    path = tmp_path / "volume.mha"
    write_mha(path, array, (2.5, 0.75, 0.5), compress=compress, msb=msb)
    back, spacing = read_mha(path)
    assert back.dtype == np.dtype(dtype) and back.shape == (3, 5, 7)
    assert back.tobytes() == array.tobytes()
    assert spacing == (2.5, 0.75, 0.5)
    header = path.read_bytes()[:400]
    assert (b"CompressedData = True" in header) == compress and (b"BinaryDataByteOrderMSB = True" in header) == msb


def _itk_header(dims: str, element: str, extra: str = "") -> bytes:
    """A header as ITK writes it, with keys the reader must skip."""
    return (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\n"
        f"{extra}"
        "TransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = -171.5 -327.1 -1233\nCenterOfRotation = 0 0 0\n"
        "AnatomicalOrientation = RAI\nElementSpacing = 0.67 0.67 1.25\n"
        f"DimSize = {dims}\nElementType = {element}\nElementDataFile = LOCAL\n"
    ).encode("ascii")


def test_mha_reader_follows_the_header_byte_order_axis_order_and_compression(tmp_path: Path) -> None:
    # voxels written by hand, x fastest: value = 100 z + 10 y + x for x < 4, y < 3, z < 2
    values = np.array([[[100 * z + 10 * y + x for x in range(4)] for y in range(3)] for z in range(2)])
    big = tmp_path / "big.mha"
    big.write_bytes(_itk_header("4 3 2", "MET_SHORT", "BinaryDataByteOrderMSB = True\n") + values.astype(">i2").tobytes())
    array, spacing = read_mha(big)
    assert array.shape == (2, 3, 4) and array.dtype == np.int16 and array.dtype.isnative
    assert np.array_equal(array, values) and spacing == (1.25, 0.67, 0.67)
    assert int(array[1, 2, 3]) == 123

    packed = zlib.compress(values.astype("<f4").tobytes())
    small = tmp_path / "small.mha"
    small.write_bytes(
        _itk_header("4 3 2", "MET_FLOAT", f"CompressedData = True\nCompressedDataSize = {len(packed)}\n") + packed
    )
    array, _ = read_mha(small)
    assert array.dtype == np.float32 and np.array_equal(array, values)

    # .mhd header with a separate raw file
    (tmp_path / "scan.raw").write_bytes(values.astype("<u2").tobytes())
    header = _itk_header("4 3 2", "MET_USHORT").replace(b"ElementDataFile = LOCAL", b"ElementDataFile = scan.raw")
    (tmp_path / "scan.mhd").write_bytes(header)
    array, _ = read_mha(tmp_path / "scan.mhd")
    assert array.dtype == np.uint16 and np.array_equal(array, values)


def test_mha_reader_names_the_file_of_bad_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.mha"):
        read_mha(tmp_path / "nowhere.mha")
    path = tmp_path / "bad.mha"
    path.write_bytes(_itk_header("4 3 2", "MET_SHORT") + b"\x00" * 10)
    with pytest.raises(ValueError, match=r"bad.mha: 10 bytes of voxel data .* truncated"):
        read_mha(path)
    path.write_bytes(_itk_header("4 3 2", "MET_RGB") + b"\x00" * 100)
    with pytest.raises(ValueError, match="bad.mha: ElementType = 'MET_RGB' is not supported"):
        read_mha(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(ValueError, match="bad.mha"):
        read_mha(path)
    path.write_bytes(_itk_header("4 3 2", "MET_SHORT", "CompressedData = True\n") + b"not zlib at all" * 4)
    with pytest.raises(ValueError, match="bad.mha: CompressedData = True but the data is not a zlib stream"):
        read_mha(path)
    with pytest.raises(ValueError, match="dtype complex64"):
        write_mha(path, np.zeros((2, 2), dtype=np.complex64))


# ---------------------------------------------------------------------------
# Windowing and resampling


def test_window_maps_the_hu_window_to_the_unit_interval() -> None:
    hu = torch.tensor([-3024.0, -1000.0, -250.0, 500.0, 1500.0])
    assert window_hu(hu).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="window"):
        window_hu(hu, (10.0, 0.0))


def test_resample_keeps_constants_and_averages_before_shrinking() -> None:
    assert torch.allclose(resample(torch.full((12, 40, 30), 7.0), 8), torch.full((8, 8, 8), 7.0))
    # a one-voxel checkerboard must average to grey, not alias into stripes
    index = torch.arange(64)
    board = ((index.view(-1, 1, 1) + index.view(1, -1, 1) + index.view(1, 1, -1)) % 2).float()
    small = resample(board, 8)
    assert small.shape == (8, 8, 8) and float((small - 0.5).abs().max()) < 0.01
    # a ramp along z stays a monotone ramp along z
    ramp = resample(torch.arange(20.0).view(20, 1, 1).expand(20, 6, 6), 10)
    assert bool((ramp[1:, 3, 3] > ramp[:-1, 3, 3]).all()) and float(ramp[:, 0, 0].std()) > 4
    with pytest.raises(ValueError, match=r"\[D, H, W\]"):
        resample(torch.zeros(4, 4), 4)


# ---------------------------------------------------------------------------
# Synthetic generator


def test_labels_follow_the_stoic_prevalence_with_severe_inside_covid() -> None:
    covid, severe = stoic_labels(6000, seed=3)
    assert covid.dtype == severe.dtype == torch.int64
    assert abs(float(covid.float().mean()) - COVID_FRACTION) < 1e-3
    assert abs(int(severe.sum()) / int(covid.sum()) - SEVERE_FRACTION) < 2e-3
    assert bool((severe <= covid).all())
    _, drawn_covid, drawn_severe = synthetic_ct(20, 8, seed=3)
    expected_covid, expected_severe = stoic_labels(20, seed=3)
    assert torch.equal(drawn_covid, expected_covid) and torch.equal(drawn_severe, expected_severe)
    other, _ = stoic_labels(6000, seed=3, covid_fraction=0.2)
    assert int(other.sum()) == 1200


def test_synthetic_volumes_have_the_documented_shapes_and_anatomy() -> None:
    volumes, covid, severe = synthetic_ct(48, 16, seed=0)
    assert volumes.shape == (48, 1, 16, 16, 16) and volumes.dtype == torch.float32
    assert 0.0 <= float(volumes.min()) and float(volumes.max()) <= 1.0
    assert bool((severe <= covid).all()) and 0 < int(severe.sum()) < int(covid.sum()) < 48
    v = volumes[:, 0]
    air = v[:, :, 0, 0]  # the corners are outside the body
    centre_tissue = v[:, :, 4, 8]  # front midline: soft tissue between the lungs
    lung = v[:, :, 8, 4]  # a point inside the right lung
    assert float(air.max()) < 0.1 and float(centre_tissue.median()) > 0.6
    assert float(lung.median()) < 0.25  # about -800 HU


def test_positive_scans_have_more_peripheral_ground_glass() -> None:
    volumes, covid, severe = synthetic_ct(160, 16, seed=1)
    ground_glass = ((volumes > window_hu(torch.tensor(-700.0))) & (volumes < window_hu(torch.tensor(-250.0))))
    share = ground_glass.flatten(1).float().mean(1)
    negative, mild, severe_share = share[covid == 0], share[(covid == 1) & (severe == 0)], share[severe == 1]
    assert float(severe_share.mean()) > float(mild.mean()) > float(negative.mean())


def test_synthetic_data_is_a_function_of_the_seed() -> None:
    a, again, other = (synthetic_stoic(6, 4, 12, seed=s) for s in (2, 2, 3))
    assert torch.equal(a.train_x, again.train_x) and torch.equal(a.test_y["severe"], again.test_y["severe"])
    assert not torch.equal(a.train_x, other.train_x)
    assert not torch.equal(a.train_x[:4], a.test_x)
    assert a.spatial_dims == 3 and a.train_x.shape == (6, 1, 12, 12, 12) and a.source == "synthetic"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"n": 0}, "n >= 1"), ({"size": 4}, "size must be >= 8"), ({"covid_fraction": 1.2}, "covid_fraction"),
     ({"severe_fraction": -0.1}, "severe_fraction")],
)
def test_synthetic_ct_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"n": 2, "size": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        synthetic_ct(**arguments)


# ---------------------------------------------------------------------------
# Real STOIC 2021 layout

# (PatientID, covid, severe); patient i's volume is filled with HU -900 + 90 i
_PATIENTS = [
    ("1", 0, 0), ("2", 1, 0), ("7", 1, 1), ("11", 0, 0), ("12", 1, 0), ("20", 1, 1),
    ("23", 0, 0), ("31", 1, 0), ("40", 1, 0), ("52", 0, 0), ("60", 1, 0), ("61", 1, 1),
]


def _hu(index: int) -> float:
    return -900.0 + 90.0 * index


def _write_stoic(root: Path) -> None:
    (root / "metadata").mkdir(parents=True)
    (root / "data" / "mha").mkdir(parents=True)
    with (root / "metadata" / "reference.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["PatientID", "probCOVID", "probSevere"])
        for i, (patient, covid, severe) in enumerate(_PATIENTS):
            writer.writerow([patient, covid, severe])
            # anisotropic scans of different shapes, MET_SHORT or MET_FLOAT, compressed or not
            shape = (10 + i, 20, 18)
            array = np.full(shape, _hu(i), dtype=np.int16 if i % 2 == 0 else np.float32)
            array[0, 0, 0] = -3024  # outside the field of view: clipped to -1000 before resampling
            write_mha(root / "data" / "mha" / f"{patient}.mha", array, (1.5, 0.7, 0.7), compress=i % 3 == 0)


def test_stoic_loader_reads_labels_and_volumes(tmp_path: Path) -> None:
    _write_stoic(tmp_path)
    data = load_stoic(tmp_path, size=8, test_fraction=0.34, seed=0)
    assert data.source == str(tmp_path) and data.spatial_dims == 3
    assert data.train_x.shape[1:] == (1, 8, 8, 8) and data.train_x.dtype == torch.float32
    assert data.train_x.shape[0] + data.test_x.shape[0] == len(_PATIENTS)
    levels = {round(float(window_hu(torch.tensor(_hu(i)))), 3): i for i in range(len(_PATIENTS))}
    seen = set()
    for x, ys in ((data.train_x, data.train_y), (data.test_x, data.test_y)):
        for volume, covid, severe in zip(x, ys["covid"], ys["severe"]):
            i = levels[round(float(volume.median()), 3)]
            seen.add(i)
            assert (int(covid), int(severe)) == _PATIENTS[i][1:]
            assert float(volume.min()) >= 0.0 and float(volume.max()) <= 1.0
    assert seen == set(range(len(_PATIENTS)))
    # stratified by (covid, severe): every group of three or more scans is on both sides
    for covid, severe in ((0, 0), (1, 0), (1, 1)):
        for ys in (data.train_y, data.test_y):
            assert bool(((ys["covid"] == covid) & (ys["severe"] == severe)).any())


def test_stoic_split_is_a_function_of_the_seed_and_limit_keeps_each_group(tmp_path: Path) -> None:
    _write_stoic(tmp_path)
    a, b = load_stoic(tmp_path, 8, seed=1), load_stoic(tmp_path, 8, seed=4)
    assert torch.equal(a.test_x, load_stoic(tmp_path, 8, seed=1).test_x)
    assert not torch.equal(a.test_x, b.test_x)
    small = load_stoic(tmp_path, 8, seed=1, limit=6)
    covid = torch.cat([small.train_y["covid"], small.test_y["covid"]])
    severe = torch.cat([small.train_y["severe"], small.test_y["severe"]])
    assert covid.numel() == 6 and int(covid.sum()) == 4 and int(severe.sum()) == 1  # 4 / 5 / 3 of 12, halved


def test_stoic_loader_names_what_is_missing_or_wrong(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="reference.csv"):
        load_stoic(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"metadata/reference.csv not found"):
        load_stoic(tmp_path)
    _write_stoic(tmp_path)
    reference = tmp_path / "metadata" / "reference.csv"
    original = reference.read_text()
    reference.write_text(original.replace("\n7,1,1", "\n7,1,0.7"))
    with pytest.raises(ValueError, match=r"reference.csv, line 4: probSevere='0.7' is not 0 or 1"):
        load_stoic(tmp_path)
    reference.write_text(original.replace("probCOVID", "covid"))
    with pytest.raises(ValueError, match=r"no column\(s\) \['probCOVID'\]"):
        load_stoic(tmp_path)
    reference.write_text(original)
    (tmp_path / "data" / "mha" / "20.mha").unlink()
    with pytest.raises(FileNotFoundError, match=r"PatientID '20' .* not found: expected .*data/mha/20.mha"):
        load_stoic(tmp_path)
    (tmp_path / "data" / "mha" / "20.mha").write_bytes(b"ObjectType = Image\nNDims = 3\n")
    with pytest.raises(ValueError, match="20.mha: no 'ElementDataFile"):
        load_stoic(tmp_path)
