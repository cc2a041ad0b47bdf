"""Even/odd digit data for the MT-COOL MNIST benchmark (paper Section 3.1, Table 1).

The paper turns MNIST into two tasks: Task 1 classifies the even digits
{0, 2, 4, 6, 8} and Task 2 the odd digits {1, 3, 5, 7, 9}. Each task keeps only
its own images and relabels digit ``d`` as class ``d // 2``, so both tasks are
5-way classification problems with labels 0..4.

Two sources are supported:

- :func:`load_digits_even_odd`: scikit-learn's bundled 8x8 ``digits`` set
  (1,797 images, no download). It has no official test split, so each task gets
  a stratified train/test split drawn from ``seed``.
- :func:`load_mnist_even_odd`: real MNIST from its four standard IDX files
  (``train-images-idx3-ubyte`` etc., plain or ``.gz``), parsed with
  :mod:`struct` and NumPy, using MNIST's official train/test split.

Both return a ``dict`` mapping ``"even"`` and ``"odd"`` (in that order) to a
:class:`TaskData`.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
from sklearn.datasets import load_digits  # type: ignore[import-untyped]
from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]
from torch import Tensor

__all__ = [
    "MNIST_FILES",
    "NUM_CLASSES",
    "TASK_DIGITS",
    "TaskData",
    "load_digits_even_odd",
    "load_mnist_even_odd",
    "read_idx",
]

TASK_DIGITS: Final[tuple[tuple[str, tuple[int, ...]], ...]] = (
    ("even", (0, 2, 4, 6, 8)),
    ("odd", (1, 3, 5, 7, 9)),
)
"""Task name and the digits it classifies, in task order. Digit ``d`` becomes class ``d // 2``."""

NUM_CLASSES: Final[int] = 5
"""Classes per task: five digits each, relabelled 0..4."""

MNIST_FILES: Final[tuple[str, str, str, str]] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
"""The four MNIST IDX file names (each may also carry a ``.gz`` suffix)."""

_IDX_UBYTE: Final[int] = 0x08
_MNIST_HINT: Final[str] = (
    "download the four MNIST files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) into that folder, or leave "
    "--data-dir out to use scikit-learn's bundled 8x8 digits"
)


@dataclass(frozen=True)
class TaskData:
    """One task's tensors, ready for training.

    Attributes:
        train_x: training images, float32 ``[N_train, 1, H, W]`` in ``[0, 1]``.
        train_y: training labels, int64 ``[N_train]`` in ``0..4``.
        test_x: test images, float32 ``[N_test, 1, H, W]`` in ``[0, 1]``.
        test_y: test labels, int64 ``[N_test]`` in ``0..4``.
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x: Tensor = getattr(self, f"{split}_x")
            y: Tensor = getattr(self, f"{split}_y")
            if x.ndim != 4 or y.ndim != 1 or x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"TaskData: {split}_x must be [N, C, H, W] and {split}_y [N] with the same N; "
                    f"got {tuple(x.shape)} and {tuple(y.shape)}"
                )

    def truncated(self, max_train: int | None, max_test: int | None) -> TaskData:
        """Return a copy keeping at most the first ``max_train`` / ``max_test`` examples.

        ``None`` keeps a split whole. Used by quick runs to bound their cost on full MNIST.
        """
        return TaskData(
            train_x=self.train_x[:max_train],
            train_y=self.train_y[:max_train],
            test_x=self.test_x[:max_test],
            test_y=self.test_y[:max_test],
        )


def _images_to_tensor(images: npt.NDArray[np.number[Any]], scale: float) -> Tensor:
    """Convert ``[N, H, W]`` pixel values in ``[0, scale]`` to float32 ``[N, 1, H, W]`` in ``[0, 1]``."""
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32) / np.float32(scale)).unsqueeze(1)


def _task_mask(labels: npt.NDArray[np.int64], digits: tuple[int, ...]) -> npt.NDArray[np.bool_]:
    """Boolean mask of the examples whose digit belongs to ``digits``."""
    return np.isin(labels, np.asarray(digits, dtype=np.int64))


def load_digits_even_odd(seed: int, test_fraction: float = 0.25) -> dict[str, TaskData]:
    """Load scikit-learn's 8x8 digits as the even and odd tasks, split per ``seed``.

    Each task's examples are split into train and test with stratification on the
    digit, so every class keeps (to rounding) the same share in both splits. The
    split is a pure function of ``seed``.

    Args:
        seed: non-negative integer that determines the train/test split.
        test_fraction: share of each task's examples held out for testing, in ``(0, 1)``.

    Returns:
        ``{"even": TaskData, "odd": TaskData}`` with images ``[N, 1, 8, 8]`` in ``[0, 1]``.

    Example:
        >>> data = load_digits_even_odd(seed=0)
        >>> tuple(data["even"].train_x.shape[1:])
        (1, 8, 8)
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), e.g. 0.25; got {test_fraction!r}")
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)  # [1797, 8, 8], values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    data: dict[str, TaskData] = {}
    for name, digits in TASK_DIGITS:
        index = np.flatnonzero(_task_mask(labels, digits))
        train_index, test_index = train_test_split(
            index, test_size=test_fraction, stratify=labels[index], random_state=seed
        )
        train_idx = np.asarray(train_index, dtype=np.int64)
        test_idx = np.asarray(test_index, dtype=np.int64)
        data[name] = TaskData(
            train_x=_images_to_tensor(images[train_idx], scale=16.0),
            train_y=torch.from_numpy(labels[train_idx] // 2),
            test_x=_images_to_tensor(images[test_idx], scale=16.0),
            test_y=torch.from_numpy(labels[test_idx] // 2),
        )
    return data


def _read_bytes(path: Path) -> bytes:
    """Read ``path``, gunzipping it when its name ends in ``.gz``."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(
            f"{path}: not a valid gzip file ({error}); re-download it, or gunzip it yourself "
            f"and pass the plain file"
        ) from error


def read_idx(path: str | Path, ndim: int) -> npt.NDArray[np.uint8]:
    """Parse one unsigned-byte IDX file (the MNIST format) into an array.

    The IDX header is two zero bytes, a type byte (``0x08`` = unsigned byte), a
    byte holding the number of dimensions, then one big-endian uint32 per
    dimension; the data follow. A ``.gz`` file is decompressed first.

    Args:
        path: file to read.
        ndim: number of dimensions the file must have (3 for images, 1 for labels),
            which fixes the expected magic number ``0x0800 + ndim``.

    Returns:
        A uint8 array with the shape stored in the header.

    Raises:
        ValueError: naming ``path``, when the magic number is wrong or the data are
            shorter or longer than the header says.
    """
    path = Path(path)
    raw = _read_bytes(path)
    header_size = 4 + 4 * ndim
    expected_magic = (_IDX_UBYTE << 8) | ndim
    if len(raw) < 4:
        raise ValueError(
            f"{path}: {len(raw)} bytes is too short for an IDX header; the file is truncated, re-download it"
        )
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != expected_magic:
        raise ValueError(
            f"{path}: bad magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(unsigned-byte IDX with {ndim} dimension{'s' if ndim > 1 else ''}); "
            f"check that this is the right MNIST file and that it is not still gzipped without a .gz suffix"
        )
    if len(raw) < header_size:
        raise ValueError(
            f"{path}: header needs {header_size} bytes but the file has {len(raw)}; "
            f"the file is truncated, re-download it"
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected = int(np.prod(shape, dtype=np.int64))
    found = len(raw) - header_size
    if found != expected:
        problem = "truncated" if found < expected else "longer than its header says"
        raise ValueError(
            f"{path}: header declares shape {tuple(shape)} = {expected} bytes of data but the file has "
            f"{found}; the file is {problem}, re-download it"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _find_idx(data_dir: Path, name: str) -> Path:
    """Locate MNIST file ``name`` (plain or ``.gz``) in ``data_dir`` or torchvision's ``MNIST/raw``."""
    tried: list[Path] = []
    for folder in (data_dir, data_dir / "MNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
            tried.append(candidate)
    raise FileNotFoundError(
        f"data_dir={str(data_dir)!r}: MNIST file {name!r} not found (tried {', '.join(map(str, tried))}); "
        + _MNIST_HINT
    )


def _load_idx_pair(images_path: Path, labels_path: Path) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Read one images/labels IDX pair and check that they match."""
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels; "
            f"the two files must come from the same split"
        )
    if labels.size and int(labels.max()) > 9:
        raise ValueError(f"{labels_path}: labels must be digits 0..9, found {int(labels.max())}")
    return images, labels


def load_mnist_even_odd(data_dir: str | Path) -> dict[str, TaskData]:
    """Load real MNIST from its IDX files as the even and odd tasks.

    Looks in ``data_dir`` (then ``data_dir/MNIST/raw``, torchvision's layout) for
    the four files named in :data:`MNIST_FILES`, each plain or with a ``.gz``
    suffix. The official train/test split is kept; nothing is downloaded.

    Args:
        data_dir: folder holding the four MNIST files.

    Returns:
        ``{"even": TaskData, "odd": TaskData}`` with images ``[N, 1, 28, 28]`` in ``[0, 1]``.

    Raises:
        FileNotFoundError: when ``data_dir`` or one of the files is missing.
        ValueError: naming the file, when a file is corrupt, truncated or mismatched.

    Example:
        >>> data = load_mnist_even_odd("~/data/mnist")  # doctest: +SKIP
        >>> data["odd"].train_x.shape  # doctest: +SKIP
        torch.Size([30508, 1, 28, 28])
    """
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"data_dir={str(data_dir)!r} is not a directory; " + _MNIST_HINT)
    train_images, train_labels, test_images, test_labels = (_find_idx(folder, name) for name in MNIST_FILES)
    x_train, y_train = _load_idx_pair(train_images, train_labels)
    x_test, y_test = _load_idx_pair(test_images, test_labels)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{train_images} has images of size {x_train.shape[1:]} but {test_images} has {x_test.shape[1:]}; "
            f"train and test files must come from the same dataset"
        )
    data: dict[str, TaskData] = {}
    for name, digits in TASK_DIGITS:
        train_mask = _task_mask(y_train, digits)
        test_mask = _task_mask(y_test, digits)
        data[name] = TaskData(
            train_x=_images_to_tensor(x_train[train_mask], scale=255.0),
            train_y=torch.from_numpy(y_train[train_mask] // 2),
            test_x=_images_to_tensor(x_test[test_mask], scale=255.0),
            test_y=torch.from_numpy(y_test[test_mask] // 2),
        )
    return data
