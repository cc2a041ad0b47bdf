"""Image data shared by the image benchmarks: one image (or volume), one target per task.

:class:`ImageTasks` holds a train and a test split of inputs ``[N, C, H, W]``
(2D images) or ``[N, C, D, H, W]`` (3D volumes), float32, and, per task,
targets indexed like the inputs: int64 masks ``[N, *spatial]`` or labels
``[N]``, or float32 maps ``[N, *spatial]`` / values ``[N]`` for regression
tasks. The file helpers read the real datasets' images and masks with
Pillow, nothing is downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageTasks",
    "find_file",
    "images_in",
    "quota_counts",
    "read_image",
    "smooth_noise",
    "split_indices",
    "stratified_subset",
    "to_tensor",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".ppm")
"""File suffixes the real-layout loaders accept (any case)."""


@dataclass(frozen=True)
class ImageTasks:
    """Inputs shared by every task and one target tensor per task, for a train and a test split.

    Attributes:
        train_x: ``[N, C, H, W]`` (2D) or ``[N, C, D, H, W]`` (3D) float32 inputs.
        train_y: ``{task: targets}`` with ``targets.shape[0] == N``: int64 (masks,
            labels) or float32 (regression maps or values).
        test_x: ``[M, C, ...]`` inputs with the train split's channels and spatial rank.
        test_y: ``{task: targets}`` with ``targets.shape[0] == M``.
        source: ``"synthetic"`` or the folder the inputs came from.
    """

    train_x: Tensor
    train_y: Mapping[str, Tensor]
    test_x: Tensor
    test_y: Mapping[str, Tensor]
    source: str

    def __post_init__(self) -> None:
        for split, x, targets in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if x.ndim not in (4, 5) or x.shape[1] < 1:
                raise ValueError(
                    f"{split}_x must be [N, C, H, W] images or [N, C, D, H, W] volumes, got shape {tuple(x.shape)}"
                )
            if not x.is_floating_point():
                raise ValueError(f"{split}_x must be a float tensor, got {x.dtype}; convert with .float()")
            for task, y in targets.items():
                if y.shape[0] != x.shape[0]:
                    raise ValueError(
                        f"{split}_y[{task!r}] has {y.shape[0]} entries for {x.shape[0]} images; "
                        "every task needs one target per image"
                    )
                if y.dtype not in (torch.int64, torch.float32):
                    raise ValueError(
                        f"{split}_y[{task!r}] has dtype {y.dtype}; use int64 for labels and masks, "
                        "float32 for regression targets"
                    )
        if self.train_x.shape[1:2] != self.test_x.shape[1:2] or self.train_x.ndim != self.test_x.ndim:
            raise ValueError(
                f"train_x {tuple(self.train_x.shape)} and test_x {tuple(self.test_x.shape)} must have the same "
                "channels and spatial rank"
            )

    @property
    def spatial_dims(self) -> int:
        """2 for images, 3 for volumes."""
        return self.train_x.ndim - 2

    def to(self, device: str) -> ImageTasks:
        """A copy with every tensor on ``device``."""
        return ImageTasks(
            self.train_x.to(device),
            {task: y.to(device) for task, y in self.train_y.items()},
            self.test_x.to(device),
            {task: y.to(device) for task, y in self.test_y.items()},
            self.source,
        )

    def select(self, train: Tensor | None, test: Tensor | None) -> ImageTasks:
        """A copy keeping the given train / test indices (``None`` keeps a split whole)."""

        def pick(x: Tensor, ys: Mapping[str, Tensor], index: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
            if index is None:
                return x, dict(ys)
            return x[index], {task: y[index] for task, y in ys.items()}

        train_x, train_y = pick(self.train_x, self.train_y, train)
        test_x, test_y = pick(self.test_x, self.test_y, test)
        return ImageTasks(train_x, train_y, test_x, test_y, self.source)

    def capped(self, train_size: int | None, test_size: int | None) -> ImageTasks:
        """A copy keeping the first ``train_size`` / ``test_size`` examples of each split (``None``: all);
        how the scenarios cap real data to their ``--train-size`` / ``--test-size``."""
        train = None if train_size is None else torch.arange(min(train_size, self.train_x.shape[0]))
        test = None if test_size is None else torch.arange(min(test_size, self.test_x.shape[0]))
        return self.select(train, test)

    def validation_split(self, fraction: float, seed: int) -> ImageTasks:
        """A copy for model selection: ``fraction`` of the *training* examples held out as its test split,
        the rest as its training split; the test split of ``self`` is never read.

        The split is :func:`split_indices` with ``seed``, stratified on the first task (in ``train_y``
        order) whose targets are int64 image-level labels ``[N]`` where there is one (every class keeps
        at least one example on each side), else unstratified; the same seed gives the same split.
        Targets that only the test split has (evaluation-only ones) cannot be carved out of the
        training data and are absent from the result.

        Args:
            fraction: share of the training examples held out, in (0, 1).
            seed: seeds the split.

        Raises:
            ValueError: for ``fraction`` outside (0, 1), fewer than 2 training examples, or a split that
                leaves one side empty.

        Example:
            >>> data = ImageTasks(torch.zeros(8, 1, 4, 4), {"digit": torch.arange(8) % 2},
            ...                   torch.ones(2, 1, 4, 4), {"digit": torch.tensor([0, 1])}, "synthetic")
            >>> held = data.validation_split(0.25, seed=0)
            >>> held.train_x.shape[0], sorted(held.test_y["digit"].tolist()), bool(held.test_x.any())
            (6, [0, 1], False)
        """
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), e.g. 0.25 (the share of training examples held out), "
                             f"got {fraction!r}")
        count = int(self.train_x.shape[0])
        if count < 2:
            raise ValueError(f"the training split has {count} example(s); a validation split needs at least 2")
        labels = next((y for y in self.train_y.values() if y.dtype == torch.int64 and y.ndim == 1), None)
        fit, held = split_indices(count, fraction, seed, None if labels is None else labels.tolist())
        if not fit.numel() or not held.numel():
            raise ValueError(f"fraction={fraction!r} of {count} training examples leaves {fit.numel()} to train on and "
                             f"{held.numel()} to validate on; give a fraction nearer 0.5 or more training examples")
        fit, held = fit.to(self.train_x.device), held.to(self.train_x.device)
        return ImageTasks(
            self.train_x[fit], {task: y[fit] for task, y in self.train_y.items()},
            self.train_x[held], {task: y[held] for task, y in self.train_y.items()},
            f"{self.source} (validation split of the training data)",
        )


def to_tensor(image: Image.Image, size: int, *, mask: bool = False) -> Tensor:
    """A Pillow image resized to ``size x size``: ``[3, S, S]`` float in [0, 1], or ``[S, S]`` uint8 for masks.

    Masks are resized with nearest-neighbour sampling, so their values stay labels.
    """
    if mask:
        resized = image.resize((size, size), Image.Resampling.NEAREST)
        array: npt.NDArray[np.uint8] = np.asarray(resized, dtype=np.uint8)
        return torch.from_numpy(array.copy())
    rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def read_image(path: Path) -> Image.Image:
    """Open ``path`` with Pillow and load it, with an error naming the file when it is not an image."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{path}: cannot be read as an image ({error}); check the file is not truncated") from None


def find_file(folder: Path, stem: str, what: str) -> Path:
    """The file in ``folder`` named ``stem`` with an image suffix (any case).

    Raises:
        FileNotFoundError: naming ``what``, the folder and the stem.
    """
    if folder.is_dir():
        for candidate in sorted(folder.iterdir()):
            if candidate.stem == stem and candidate.suffix.lower() in IMAGE_SUFFIXES:
                return candidate
    raise FileNotFoundError(
        f"{what} for {stem!r} not found: expected {folder}/{stem}<{'|'.join(IMAGE_SUFFIXES)}>"
    )


def images_in(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def split_indices(count: int, test_fraction: float, seed: int, strata: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """A seeded train/test split of ``range(count)``, stratified by ``strata`` when given.

    Every stratum with at least two members contributes at least one example to
    each split. Returns ``(train_indices, test_indices)``, both sorted int64.

    Raises:
        ValueError: when ``test_fraction`` is not in (0, 1) or ``count < 2``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), e.g. 0.25; got {test_fraction!r}")
    if count < 2:
        raise ValueError(f"need at least 2 examples to split into train and test, got {count}")
    groups = [0] * count if strata is None else list(strata)
    if len(groups) != count:
        raise ValueError(f"strata has {len(groups)} entries for {count} examples")
    generator = torch.Generator().manual_seed(seed)
    train: list[int] = []
    test: list[int] = []
    for value in sorted(set(groups)):
        members = torch.tensor([i for i, g in enumerate(groups) if g == value], dtype=torch.int64)
        members = members[torch.randperm(members.numel(), generator=generator)]
        n_test = round(members.numel() * test_fraction)
        if members.numel() >= 2:
            n_test = min(max(n_test, 1), members.numel() - 1)
        test.extend(members[:n_test].tolist())
        train.extend(members[n_test:].tolist())
    return torch.tensor(sorted(train), dtype=torch.int64), torch.tensor(sorted(test), dtype=torch.int64)


def smooth_noise(n: int, size: int, cells: int, generator: torch.Generator) -> Tensor:
    """Low-frequency noise ``[n, 1, size, size]`` in about [-1, 1]: a coarse grid, bicubically upsampled."""
    coarse = torch.rand(n, 1, cells, cells, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def quota_counts(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into integer counts proportional to ``weights`` (largest-remainder rounding).

    The counts sum to ``total``; each is the floor of its exact share, and the
    remaining units go to the largest fractional parts (ties: lower index first).

    Example:
        >>> quota_counts(100, (327, 514, 1099, 115, 1113, 6705, 142))
        [3, 5, 11, 1, 11, 67, 2]
    """
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if not weights or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def stratified_subset(strata: Sequence[int], limit: int) -> Tensor:
    """Indices of at most ``limit`` entries, each stratum keeping its share (:func:`quota_counts`).

    Each stratum keeps its *first* entries in the given order, so the subset is
    the same for every seed and grows with ``limit``. Returns sorted int64 indices.

    Example:
        >>> stratified_subset([0, 0, 0, 1, 1, 1, 1, 1, 2, 2], 5).tolist()
        [0, 1, 3, 4, 8]
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for everything), got {limit}")
    values = sorted(set(strata))
    counts = quota_counts(min(limit, len(strata)), [sum(1 for s in strata if s == v) for v in values])
    keep: list[int] = []
    for value, count in zip(values, counts):
        keep.extend([i for i, s in enumerate(strata) if s == value][:count])
    return torch.tensor(sorted(keep), dtype=torch.int64)
