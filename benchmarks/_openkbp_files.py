"""The real OpenKBP data in the challenge's layout (:data:`LAYOUT`): its sparse CSV files, one patient's
volumes, and :func:`load_openkbp`, which slices them into the benchmark's 2D inputs and targets
(:mod:`benchmarks._dose` defines both, and the synthetic generator)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks._dose import OARS, TARGETS, normalise_ct, oar_labels, ptv_map
from benchmarks._images import ImageTasks, split_indices

__all__ = ["LAYOUT", "PATIENT_FOLDERS", "VOLUME_SHAPE", "load_openkbp", "read_sparse_csv"]

VOLUME_SHAPE: Final[tuple[int, int, int]] = (128, 128, 128)
"""OpenKBP's volume: rows (anterior to posterior), columns (patient right to left), axial slices."""

PATIENT_FOLDERS: Final[tuple[str, ...]] = ("train-pats", "validation-pats", "valid-pats", "test-pats")
"""Sub-folders of the data folder searched for ``pt_<k>`` patients (``valid-pats`` is the README's older name)."""

LAYOUT: Final[str] = (
    "<data_dir>/{train-pats,validation-pats,test-pats}/pt_<k>/ with ct.csv, dose.csv, possible_dose_mask.csv "
    "and one <Structure>.csv per contoured structure (Brainstem, SpinalCord, RightParotid, LeftParotid, "
    "Esophagus, Larynx, Mandible, PTV56, PTV63, PTV70): OpenKBP's sparse CSVs, a ',data' header then "
    "'index,value' rows over the C-order flattened 128x128x128 volume (value empty for structure masks)"
)


def _resize(x: Tensor, size: int, *, labels: bool) -> Tensor:
    """``[N, C, H, W]`` to ``size x size``: nearest neighbour for label maps, antialiased bilinear otherwise."""
    if x.shape[-2:] == (size, size):
        return x
    if labels:
        return F.interpolate(x, size=(size, size), mode="nearest-exact")
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def read_sparse_csv(
    path: Path, voxels: int, *, values: bool
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32] | None]:
    """Read one OpenKBP sparse CSV: an optional ``,data`` header, then ``index,value`` rows.

    ``index`` is a voxel of the C-order flattened volume (``numpy.unravel_index``
    with the volume shape). Structure masks leave ``value`` empty (presence means
    1; a row with only the index is accepted too); ``ct.csv`` and ``dose.csv``
    need a value on every row.

    Args:
        path: the CSV file.
        voxels: number of voxels in the volume (indices must be in ``[0, voxels)``).
        values: whether the rows carry values (dose, CT) or only indices (masks).

    Returns:
        ``(indices [K] int64, values [K] float32 or None)``.

    Raises:
        FileNotFoundError: naming the missing file.
        ValueError: naming the file and line of a malformed row, an index out of range or a
            missing / non-finite value.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; every OpenKBP patient folder needs it (layout: {LAYOUT})")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    first = 1 if lines and not lines[0].strip()[:1].isdigit() else 0  # the ',data' header (any non-numeric line)
    numbered = [(number, line.strip()) for number, line in enumerate(lines[first:], start=first + 1) if line.strip()]
    heads: list[str] = []
    tails: list[str] = []
    for _, line in numbered:
        head, _, tail = line.partition(",")
        heads.append(head.strip())
        tails.append(tail.strip())

    def bad(row: int, why: str) -> ValueError:
        number, line = numbered[row]
        expected = "'index,value'" if values else "'index,' (or 'index')"
        return ValueError(f"{path}: line {number}: {line[:60]!r} {why}; rows must be {expected} (OpenKBP sparse CSV)")

    try:
        indices = np.array(heads, dtype=np.int64)
    except ValueError:
        row = next(i for i, head in enumerate(heads) if not head.isdigit())
        raise bad(row, "does not start with a non-negative integer voxel index") from None
    out_of_range = np.flatnonzero((indices < 0) | (indices >= voxels))
    if out_of_range.size:
        raise bad(int(out_of_range[0]), f"has a voxel index outside [0, {voxels}) (is the volume shape right?)")
    if not values:
        return indices, None
    missing = [i for i, tail in enumerate(tails) if not tail]
    if missing:
        raise bad(missing[0], "has no value")
    try:
        data = np.array(tails, dtype=np.float64)
    except ValueError:
        row = next(i for i, tail in enumerate(tails) if not _is_number(tail))
        raise bad(row, "has a value that is not a number") from None
    not_finite = np.flatnonzero(~np.isfinite(data))
    if not_finite.size:
        raise bad(int(not_finite[0]), "has a non-finite value")
    return indices, data.astype(np.float32)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _volume(path: Path, shape: tuple[int, int, int]) -> Tensor:
    indices, data = read_sparse_csv(path, math.prod(shape), values=True)
    volume = np.zeros(math.prod(shape), dtype=np.float32)
    volume[indices] = data if data is not None else 1.0
    return torch.from_numpy(volume.reshape(shape))


def _mask(path: Path, shape: tuple[int, int, int]) -> Tensor:
    indices, _ = read_sparse_csv(path, math.prod(shape), values=False)
    mask = np.zeros(math.prod(shape), dtype=np.bool_)
    mask[indices] = True
    return torch.from_numpy(mask.reshape(shape))


def _patient_key(path: Path) -> tuple[int, int, str]:
    match = re.fullmatch(r"pt_(\d+)", path.name)
    return (0, int(match.group(1)), "") if match else (1, 0, path.name)


def _patients(root: Path) -> list[Path]:
    """``pt_*`` folders of every split folder present, split folders in :data:`PATIENT_FOLDERS` order."""
    found: list[Path] = []
    for folder in PATIENT_FOLDERS:
        if (root / folder).is_dir():
            found.extend(sorted((p for p in (root / folder).iterdir() if p.is_dir() and p.name.startswith("pt_")),
                                key=_patient_key))
    return found


def _slice_indices(has_target: Tensor, slices: int | None) -> Tensor:
    """Axial slices to keep: every slice with a target voxel, or ``slices`` evenly spaced among them."""
    candidates = has_target.nonzero().view(-1)
    if slices is None or candidates.numel() <= slices:
        return candidates
    picks = torch.linspace(0, candidates.numel() - 1, slices).round().long()
    return candidates[picks]


def _crop_box(body: Tensor, side: int | None) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of a ``side``-voxel square centred on ``body``'s bounding box, in the frame."""
    height, width = body.shape
    rows, cols = body.any(dim=1).nonzero().view(-1), body.any(dim=0).nonzero().view(-1)
    if side is None or rows.numel() == 0:
        return 0, height, 0, width
    box_rows, box_cols = min(side, height), min(side, width)
    top = (int(rows.min()) + int(rows.max()) + 1 - box_rows) // 2
    left = (int(cols.min()) + int(cols.max()) + 1 - box_cols) // 2
    top, left = min(max(top, 0), height - box_rows), min(max(left, 0), width - box_cols)
    return top, top + box_rows, left, left + box_cols


def _load_patient(
    folder: Path, shape: tuple[int, int, int], size: int, slices: int | None, crop: int | None
) -> tuple[Tensor, Tensor, Tensor]:
    """One patient's chosen axial slices: ``(inputs [K, 2, S, S], dose [K, S, S], structures [K, S, S])``."""
    ct = _volume(folder / "ct.csv", shape).clamp(0.0, 4095.0)  # 12-bit range, as the data description advises
    dose = _volume(folder / "dose.csv", shape)
    possible = _mask(folder / "possible_dose_mask.csv", shape)
    if float(dose.min()) < 0.0:
        raise ValueError(
            f"{folder / 'dose.csv'} has negative doses (min {float(dose.min()):g} Gy); doses are in Gy >= 0"
        )
    targets = {name: _mask(folder / f"{name}.csv", shape) for name in TARGETS if (folder / f"{name}.csv").is_file()}
    if not targets:
        raise ValueError(
            f"{folder} has no {', '.join(t + '.csv' for t in TARGETS)}; slices are taken where a target is, "
            "and every OpenKBP plan has a PTV70"
        )
    oars = {name: _mask(folder / f"{name}.csv", shape) for name in OARS if (folder / f"{name}.csv").is_file()}
    ptv = ptv_map(targets)
    keep = _slice_indices((ptv > 0).any(dim=0).any(dim=0), slices)
    labels = oar_labels(oars) if oars else torch.zeros(shape, dtype=torch.int64)
    top, bottom, left, right = _crop_box(possible[:, :, keep].any(dim=2), crop)

    def axial(volume: Tensor) -> Tensor:  # [rows, columns, slices] -> [K, 1, rows, columns], cropped
        return volume[top:bottom, left:right, keep].permute(2, 0, 1).unsqueeze(1)

    image = _resize(axial(normalise_ct(ct)), size, labels=False)
    ptv_channel = _resize(axial(ptv), size, labels=True)
    inside = _resize(axial(possible.float()), size, labels=True)[:, 0] > 0.5
    dose_slices = _resize(axial(torch.where(possible, dose, 0.0)), size, labels=False)[:, 0]
    structures = _resize(axial(labels.float()), size, labels=True)[:, 0].round().long()
    return (
        torch.cat((image, ptv_channel), dim=1),
        torch.where(inside, dose_slices.clamp_min(0.0), math.nan),
        structures,
    )


def load_openkbp(
    data_dir: str | Path,
    size: int = 64,
    *,
    test_fraction: float = 0.25,
    seed: int = 0,
    limit: int | None = None,
    slices: int | None = 8,
    crop: int | None = 80,
    shape: Sequence[int] = VOLUME_SHAPE,
) -> ImageTasks:
    """Load OpenKBP patients from the challenge's own layout (nothing is downloaded) as 2D axial slices.

    Layout (:data:`LAYOUT`), checked against ``ababier/open-kbp``
    (``provided_code/data_loader.py``, ``utils.py`` and its ``data-description.pdf``):
    ``<data_dir>/{train-pats,validation-pats,test-pats}/pt_<k>/`` (any of them; all
    found are pooled), each with ``ct.csv``, ``dose.csv``, ``possible_dose_mask.csv``,
    ``voxel_dimensions.csv`` (not needed: the DVH points use pixel fractions) and one
    CSV per contoured structure. Every CSV is sparse over the C-order flattened
    ``128 x 128 x 128`` volume: a ``,data`` header, then ``index,value`` rows for the
    non-zero voxels (``dose`` in Gy, ``ct`` in CT numbers), or ``index,`` rows for
    masks (:func:`read_sparse_csv`). The first two axes are the axial plane
    (rows anterior to posterior, columns from the patient's right), the third
    the slice; a slice is ``volume[:, :, k]``.

    CT values are unsigned CT numbers: the data show air at 0 and soft tissue near
    1000-1050 (HU + 1024 in the 12-bit convention; the description only says
    "Hounsfield units" with "a mix of 12-bit and 16-bit formats" and advises
    clipping to [0, 4095]). They are clipped so, then :func:`normalise_ct`; the
    exact offset (1000 or 1024) does not matter for a clip-and-scale.

    Slices: per patient, the axial slices with a PTV voxel; with ``slices=k``,
    ``k`` of them evenly spaced from the first to the last (all when fewer).
    Crop: the patient fills about 9 % of OpenKBP's frame, so a 64-pixel slice of
    the whole frame leaves the spinal cord a pixel wide. The slices of a patient
    are therefore first cut to one ``crop x crop``-voxel square (default 80,
    about 28 cm) centred on the bounding box of the possible-dose mask over those
    slices and kept inside the frame; one box per patient, so the pixel size
    stays that of the CT. On 11 OpenKBP patients checked, every PTV and OAR voxel
    of the chosen slices fell inside it and 0-12 % of the body did not (the
    shoulders of the lowest slices); those pixels are simply not part of the
    data. ``crop=None`` keeps the whole frame. Each slice is then resized to
    ``size x size`` (CT and dose antialiased bilinear, masks and labels nearest).
    The dose is NaN outside the possible-dose mask. The
    train/test split is drawn over **patients** (``split_indices`` with
    ``seed``), so no patient has slices on both sides; OpenKBP's own
    train/validation/test folders are pooled first, so each seed gets its own split.

    Args:
        data_dir: the folder holding ``train-pats`` etc. (OpenKBP's ``provided-data``).
        size: slices are resized to ``size x size``.
        test_fraction: share of the patients held out for testing.
        seed: fixes the split.
        limit: read only the first ``limit`` patients (folder order, then patient number).
        slices: axial slices per patient (``None``: every slice with a target).
        crop: side in voxels of the square each patient's slices are cut to before
            resizing (``None``: the whole frame).
        shape: the volume shape the indices are flattened over (OpenKBP: 128, 128, 128).

    Raises:
        FileNotFoundError: when the layout or a required file is missing, naming it.
        ValueError: naming the file (and line) of malformed data, or bad arguments.

    Example:
        >>> data = load_openkbp("~/data/open-kbp/provided-data", size=64)  # doctest: +SKIP
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size!r}")
    if limit is not None and limit < 2:
        raise ValueError(f"limit must be None or at least 2 patients (a train and a test one), got {limit!r}")
    if crop is not None and crop < 1:
        raise ValueError(f"crop must be None (the whole frame) or a positive side in voxels, got {crop!r}")
    if slices is not None and slices < 1:
        raise ValueError(f"slices must be None (every slice with a target) or a positive count, got {slices!r}")
    volume_shape = tuple(int(s) for s in shape)
    if len(volume_shape) != 3 or min(volume_shape) < 1:
        raise ValueError(f"shape must be three positive sizes like {VOLUME_SHAPE}, got {tuple(shape)!r}")
    dims = (volume_shape[0], volume_shape[1], volume_shape[2])
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir={str(data_dir)!r} is not a directory; expected the layout {LAYOUT}")
    patients = _patients(root)[:limit]
    if len(patients) < 2:
        raise FileNotFoundError(
            f"found {len(patients)} patient folder(s) pt_<k> under {root}/{{{','.join(PATIENT_FOLDERS)}}}; "
            f"need at least 2 to split by patient; expected the layout {LAYOUT}"
        )
    per_patient = [_load_patient(folder, dims, size, slices, crop) for folder in patients]
    train, test = split_indices(len(patients), test_fraction, seed)

    def gather(index: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        parts = [per_patient[i] for i in index.tolist()]
        inputs = torch.cat([p[0] for p in parts])
        return inputs, {"dose": torch.cat([p[1] for p in parts]), "structures": torch.cat([p[2] for p in parts])}

    x_train, y_train = gather(train)
    x_test, y_test = gather(test)
    return ImageTasks(x_train, y_train, x_test, y_test, str(root))
