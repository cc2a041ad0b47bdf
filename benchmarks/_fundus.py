"""Optic disc / cup data for the REFUGE-style benchmark (paper Section 3.2, Table 2).

Two tasks share one fundus image:

- ``disc_cup``: per-pixel segmentation, class 0 = background, 1 = optic disc
  rim (disc without cup), 2 = optic cup. The disc is classes 1 and 2 together.
- ``glaucoma``: image classification, 0 = non-glaucoma, 1 = glaucoma.

Sources:

- :func:`synthetic_fundus`: a documented generator that needs no download.
  Disc-centred fundus crops (REFUGE methods work on disc crops): an
  orange-red, vignetted background with smooth illumination noise, a bright
  elliptical optic disc at a random position, a brighter cup inside it whose
  contrast varies from image to image, dark vessels leaving the disc, and
  pixel noise. Exactly ``round(positive_fraction * n)`` images are glaucoma
  (REFUGE's 1:9 imbalance by default). The vertical cup-to-disc ratio (CDR)
  follows the label: N(0.40, 0.08) for non-glaucoma, N(0.65, 0.08) for
  glaucoma (clipped to [0.2, 0.85]). The two distributions overlap, so the
  label is a noisy function of the CDR (label noise): a perfect CDR threshold
  at 0.525 misclassifies about 6 % of the images of each class.
- :func:`load_refuge`: the real REFUGE2018 training release, in its own layout
  (below), for users who have it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from benchmarks._images import ImageTasks, find_file, images_in, read_image, smooth_noise, split_indices, to_tensor

__all__ = [
    "CDR_MEANS",
    "CDR_STD",
    "LAYOUT",
    "REFUGE_CLASSES",
    "TASKS",
    "disc_crop",
    "load_refuge",
    "mask_from_refuge",
    "synthetic_fundus",
    "synthetic_refuge",
]

TASKS: Final[tuple[str, str]] = ("disc_cup", "glaucoma")
"""Task names in task order: segmentation first, classification (which reads it) second."""

REFUGE_CLASSES: Final[int] = 3
"""Segmentation classes: background, disc rim, cup."""

CDR_MEANS: Final[tuple[float, float]] = (0.40, 0.65)
"""Mean vertical cup-to-disc ratio of non-glaucoma and glaucoma images."""

CDR_STD: Final[float] = 0.08
"""Standard deviation of the cup-to-disc ratio within each class."""


def synthetic_fundus(
    n: int, size: int = 64, *, positive_fraction: float = 0.1, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Generate ``n`` synthetic disc-centred fundus crops (see the module docstring).

    Args:
        n: number of images.
        size: image height and width in pixels.
        positive_fraction: share of glaucoma images (REFUGE: 0.1, i.e. 1:9).
        seed: everything is drawn from one generator seeded with this.

    Returns:
        ``(images [n, 3, S, S] float in [0, 1], masks [n, S, S] int64 in {0, 1, 2},
        labels [n] int64, cdr [n] float)``; masks: 1 = disc rim, 2 = cup.

    Example:
        >>> images, masks, labels, cdr = synthetic_fundus(20, 32, seed=1)
        >>> images.shape, int(labels.sum())
        (torch.Size([20, 3, 32, 32]), 2)
    """
    if n < 1 or size < 8:
        raise ValueError(f"need n >= 1 images of size >= 8 pixels, got n={n}, size={size}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction!r}")
    g = torch.Generator().manual_seed(seed)
    positives = round(positive_fraction * n)
    labels = torch.zeros(n, dtype=torch.int64)
    labels[torch.randperm(n, generator=g)[:positives]] = 1
    means = torch.tensor(CDR_MEANS)[labels]
    cdr = (means + CDR_STD * torch.randn(n, generator=g)).clamp(0.2, 0.85)

    def uniform(low: float, high: float) -> Tensor:
        return (low + (high - low) * torch.rand(n, generator=g)).view(n, 1, 1)

    coords = torch.linspace(-1.0, 1.0, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    yy, xx = yy.expand(n, size, size), xx.expand(n, size, size)
    # optic disc: a slightly tall ellipse at a random position
    cx, cy = uniform(-0.25, 0.25), uniform(-0.2, 0.2)
    rx = uniform(0.30, 0.42)
    ry = rx * uniform(1.0, 1.15)
    disc_distance = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2).sqrt()
    # cup: the vertical cup-to-disc ratio sets its height; a little off-centre
    ccx = cx + uniform(-0.1, 0.1) * rx
    ccy = cy + uniform(-0.1, 0.1) * ry
    crx = cdr.view(n, 1, 1) * rx * uniform(0.85, 1.05)
    cry = cdr.view(n, 1, 1) * ry
    cup_distance = (((xx - ccx) / crx) ** 2 + ((yy - ccy) / cry) ** 2).sqrt()
    disc = disc_distance <= 1.0
    cup = (cup_distance <= 1.0) & disc
    masks = disc.long() + cup.long()

    edge = 2.0 / size  # soft edges, about one pixel wide
    disc_soft = torch.sigmoid((1.0 - disc_distance) / (edge / rx))
    cup_soft = torch.sigmoid((1.0 - cup_distance) / (edge / crx))
    radius2 = xx**2 + yy**2
    light = 1.0 - 0.35 * radius2 + 0.08 * smooth_noise(n, size, 6, g)[:, 0]
    background = torch.tensor([0.78, 0.33, 0.13]).view(1, 3, 1, 1) * light.unsqueeze(1)
    disc_colour = torch.tensor([0.95, 0.72, 0.42]).view(1, 3, 1, 1) * uniform(0.85, 1.0).unsqueeze(1)
    cup_gain = torch.tensor([0.05, 0.24, 0.40]).view(1, 3, 1, 1) * uniform(0.6, 1.0).unsqueeze(1)
    image = background * (1 - disc_soft.unsqueeze(1)) + disc_colour * disc_soft.unsqueeze(1)
    image = image + cup_gain * cup_soft.unsqueeze(1)
    # vessels: dark rays of random width leaving the disc centre
    vessels = torch.zeros(n, size, size)
    for _ in range(5):
        angle = uniform(0.0, 2 * math.pi)
        dx, dy = torch.cos(angle), torch.sin(angle)
        along = (xx - cx) * dx + (yy - cy) * dy
        across = ((xx - cx) * dy - (yy - cy) * dx).abs()
        width = uniform(0.015, 0.035)
        vessels = torch.maximum(vessels, torch.sigmoid((width - across) / edge) * (along > 0).float())
    image = image * (1 - 0.45 * vessels.unsqueeze(1))
    image = image * (radius2 <= 1.9).float().unsqueeze(1)  # dark outside the field of view
    image = image + 0.03 * torch.randn(image.shape, generator=g)
    return image.clamp(0.0, 1.0), masks, labels, cdr


def synthetic_refuge(train: int, test: int, size: int, *, seed: int, positive_fraction: float = 0.1) -> ImageTasks:
    """Synthetic train and test splits, each with the same glaucoma share (drawn from ``seed``)."""
    x_train, m_train, l_train, _ = synthetic_fundus(train, size, positive_fraction=positive_fraction, seed=2 * seed)
    x_test, m_test, l_test, _ = synthetic_fundus(test, size, positive_fraction=positive_fraction, seed=2 * seed + 1)
    return ImageTasks(
        x_train,
        {"disc_cup": m_train, "glaucoma": l_train},
        x_test,
        {"disc_cup": m_test, "glaucoma": l_test},
        "synthetic",
    )


# ---------------------------------------------------------------------------
# Real REFUGE2018


_CLASS_FOLDERS: Final[tuple[tuple[str, int], ...]] = (("Non-Glaucoma", 0), ("Glaucoma", 1))
_IMAGES: Final[str] = "Training400"
_MASKS: Final[tuple[str, str]] = ("Annotation-Training400", "Disc_Cup_Masks")
LAYOUT: Final[str] = (
    "<data_dir>/Training400/{Glaucoma,Non-Glaucoma}/<name>.jpg and "
    "<data_dir>/Annotation-Training400/Disc_Cup_Masks/{Glaucoma,Non-Glaucoma}/<name>.bmp "
    "(REFUGE2018 training release; mask pixels 0 = cup, 128 = disc rim, 255 = background)"
)


def mask_from_refuge(values: Tensor) -> Tensor:
    """REFUGE mask pixels (0 cup, 128 rim, 255 background; any grey level) to classes 2 / 1 / 0."""
    values = values.to(torch.int64)
    return torch.where(values < 64, 2, torch.where(values < 192, 1, 0))


def disc_crop(mask: Tensor, scale: float = 2.0) -> tuple[int, int, int, int]:
    """A square box ``(left, top, right, bottom)`` centred on the disc, ``scale`` times its larger extent.

    The box is clipped to the image. Without any disc pixel, the whole image is returned.
    """
    height, width = mask.shape
    rows, cols = torch.nonzero(mask > 0, as_tuple=True)
    if rows.numel() == 0:
        return 0, 0, width, height
    top, bottom = int(rows.min()), int(rows.max()) + 1
    left, right = int(cols.min()), int(cols.max()) + 1
    side = max(int(round(scale * max(bottom - top, right - left))), 8)
    side = min(side, height, width)
    cy, cx = (top + bottom) // 2, (left + right) // 2
    y0 = min(max(cy - side // 2, 0), height - side)
    x0 = min(max(cx - side // 2, 0), width - side)
    return x0, y0, x0 + side, y0 + side


def load_refuge(
    data_dir: str | Path, size: int = 64, *, test_fraction: float = 0.25, seed: int = 0, crop: bool = True
) -> ImageTasks:
    """Load the REFUGE2018 training release from its own layout (nothing is downloaded).

    Layout: ``<data_dir>/Training400/{Glaucoma,Non-Glaucoma}/<name>.jpg`` with the
    masks in ``<data_dir>/Annotation-Training400/Disc_Cup_Masks/{Glaucoma,Non-Glaucoma}/<name>.bmp``
    (pixels 0 = cup, 128 = disc rim, 255 = background). The label is the
    folder. A seeded train/test split stratified by label is drawn from ``seed``.

    Args:
        data_dir: the REFUGE folder.
        size: images and masks are resized to ``size x size``.
        test_fraction: share of each class held out for testing.
        seed: fixes the split.
        crop: crop a square around the optic disc (twice its extent, read off the
            ground-truth mask: the usual "disc region given" protocol) before resizing.

    Raises:
        FileNotFoundError: when the layout is missing, naming the expected paths.
        ValueError: naming a file that cannot be read or whose mask has another size.

    Example:
        >>> data = load_refuge("~/data/REFUGE", size=64)  # doctest: +SKIP
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir={str(data_dir)!r} is not a directory; expected the layout {LAYOUT}")
    images: list[Tensor] = []
    masks: list[Tensor] = []
    labels: list[int] = []
    for folder, label in _CLASS_FOLDERS:
        mask_folder = root.joinpath(*_MASKS, folder)
        for path in images_in(root / _IMAGES / folder):
            image = read_image(path)
            mask_path = find_file(mask_folder, path.stem, "REFUGE mask")
            mask_image = read_image(mask_path).convert("L")
            if mask_image.size != image.size:
                raise ValueError(
                    f"{mask_path} is {mask_image.size[0]}x{mask_image.size[1]} but its image {path} is "
                    f"{image.size[0]}x{image.size[1]}; masks must match their images"
                )
            full = mask_from_refuge(_as_tensor(mask_image))
            if crop:
                box = disc_crop(full)
                image, mask_image = image.crop(box), mask_image.crop(box)
            images.append(to_tensor(image, size))
            masks.append(mask_from_refuge(to_tensor(mask_image, size, mask=True)))
            labels.append(label)
    if not images:
        raise FileNotFoundError(f"no REFUGE images found under {root}; expected the layout {LAYOUT}")
    return _split(torch.stack(images), torch.stack(masks), torch.tensor(labels), str(root), test_fraction, seed)


def _as_tensor(mask_image: Image.Image) -> Tensor:
    """A greyscale Pillow image at full size as a ``[H, W]`` uint8 tensor."""
    return torch.from_numpy(np.asarray(mask_image, dtype=np.uint8).copy())


def _split(
    images: Tensor, masks: Tensor, labels: Tensor, source: str, test_fraction: float, seed: int
) -> ImageTasks:
    strata: Sequence[int] = labels.tolist()
    train, test = split_indices(labels.numel(), test_fraction, seed, strata)
    return ImageTasks(
        images[train],
        {"disc_cup": masks[train], "glaucoma": labels[train]},
        images[test],
        {"disc_cup": masks[test], "glaucoma": labels[test]},
        source,
    )
