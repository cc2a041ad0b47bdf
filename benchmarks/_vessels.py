"""Retinal vessel data for the HRF-AV-style benchmark (paper Section 3.3, Table 3).

Two segmentation tasks share one fundus image:

- ``artery_vein``: per pixel, 0 = background, 1 = artery, 2 = vein
  (:data:`IGNORE` = -100 marks crossings and uncertain vessel pixels of real
  data: no loss, no metric);
- ``vessel``: per pixel, 1 = vessel (artery, vein or uncertain), 0 = background.

Sources:

- :func:`synthetic_vessels`: a documented vessel-tree generator that needs no
  download. An orange-red, vignetted fundus with smooth illumination noise
  and a bright optic disc near the left or right edge. From the disc grow two
  arteries and two veins (one of each towards the top and the bottom), each a
  random walk of short segments drifting towards the macula, branching with
  probability 0.3 per segment (children are thinner; two levels of
  branching). Veins are wider (about 1.35x) and darker; arteries are lighter
  with a faint central light reflex, and per-image contrast varies, so telling
  them apart needs colour *and* width, as on real images. Where an artery and
  a vein cross, the vein is drawn on top and labelled vein.
- :func:`load_hrf_av`: the real HRF-AV data in the layout of :data:`LAYOUT`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Final

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from benchmarks._images import ImageTasks, find_file, images_in, read_image, split_indices, to_tensor

__all__ = ["IGNORE", "LAYOUT", "TASKS", "load_hrf_av", "masks_from_av_colours", "synthetic_hrf_av", "synthetic_vessels"]

TASKS: Final[tuple[str, str]] = ("artery_vein", "vessel")
"""Task names in task order."""

IGNORE: Final[int] = -100
"""``artery_vein`` label of pixels left out of loss and metrics (cross-entropy's default ignore_index)."""

LAYOUT: Final[str] = (
    "<data_dir>/images/<name>.<jpg|png|tif> with <data_dir>/av/<name>.png colour-coded A/V masks "
    "(red = artery, blue = vein, green = crossing, white = uncertain vessel, black = background) and "
    "optionally <data_dir>/vessel/<name>.<png|tif> (or HRF's manual1/) binary vessel masks"
)


def _segments(generator: torch.Generator, size: int, disc: tuple[float, float], side: float) -> list[tuple[float, ...]]:
    """Line segments ``(x0, y0, x1, y1, width, kind)`` (kind 1 artery, 2 vein) of one image's vessel trees."""
    segments: list[tuple[float, ...]] = []
    scale = size / 64.0

    def rand() -> float:
        return float(torch.rand((), generator=generator))

    def grow(x: float, y: float, angle: float, width: float, kind: int, steps: int, depth: int) -> None:
        step = 4.0 * scale
        for _ in range(steps):
            # drift towards the horizontal, away from the disc (the macula side)
            target = 0.0 if side > 0 else math.pi
            angle += 0.12 * math.sin(target - angle) + 0.35 * (rand() - 0.5)
            nx, ny = x + step * math.cos(angle), y + step * math.sin(angle)
            segments.append((x, y, nx, ny, width, float(kind)))
            x, y = nx, ny
            if not (-4 <= x <= size + 4 and -4 <= y <= size + 4) or width < 0.6 * scale:
                return
            if depth < 2 and rand() < 0.3:
                branch = angle + (0.5 + 0.4 * rand()) * (1 if rand() < 0.5 else -1)
                grow(x, y, branch, width * 0.7, kind, max(2, steps // 2), depth + 1)
            width *= 0.97

    cx, cy = disc
    for vertical in (-1.0, 1.0):
        for kind, base_width in ((1, 1.8), (2, 2.4)):
            start = (math.pi / 2) * vertical + (0.5 if side > 0 else -0.5) * vertical * -1
            start += 0.3 * (rand() - 0.5) + (0.15 if kind == 2 else -0.15)
            grow(cx, cy, start, base_width * scale * (0.9 + 0.2 * rand()), kind, 14, 0)
    return segments


def _distance(segments: list[tuple[float, ...]], size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per segment: distance of every pixel to it ``[K, S, S]``, half widths ``[K]`` and kinds ``[K]``."""
    s = torch.tensor(segments, dtype=torch.float32)
    x0, y0, x1, y1, width, kind = (s[:, i].view(-1, 1, 1) for i in range(6))
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy = x1 - x0, y1 - y0
    length2 = (dx**2 + dy**2).clamp_min(1e-6)
    t = (((xx - x0) * dx + (yy - y0) * dy) / length2).clamp(0.0, 1.0)
    distance = ((xx - (x0 + t * dx)) ** 2 + (yy - (y0 + t * dy)) ** 2).sqrt()
    return distance, width.view(-1) / 2, kind.view(-1).long()


def synthetic_vessels(n: int, size: int = 64, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Generate ``n`` synthetic fundus images with artery and vein trees (see the module docstring).

    Args:
        n: number of images.
        size: image height and width in pixels.
        seed: everything is drawn from one generator seeded with this.

    Returns:
        ``(images [n, 3, S, S] float in [0, 1], labels [n, S, S] int64)``: labels
        0 background, 1 artery, 2 vein; the vessel mask is ``labels > 0``.

    Example:
        >>> images, labels = synthetic_vessels(2, 64, seed=0)
        >>> images.shape, sorted(labels.unique().tolist())
        (torch.Size([2, 3, 64, 64]), [0, 1, 2])
    """
    if n < 1 or size < 16:
        raise ValueError(f"need n >= 1 images of size >= 16 pixels, got n={n}, size={size}")
    g = torch.Generator().manual_seed(seed)
    coords = torch.linspace(-1.0, 1.0, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    images: list[Tensor] = []
    labels: list[Tensor] = []
    for _ in range(n):
        side = 1.0 if float(torch.rand((), generator=g)) < 0.5 else -1.0
        disc_x = size * (0.5 - side * (0.3 + 0.08 * float(torch.rand((), generator=g))))
        disc_y = size * (0.45 + 0.1 * float(torch.rand((), generator=g)))
        distance, half_width, kind = _distance(_segments(g, size, (disc_x, disc_y), side), size)
        soft = torch.sigmoid((half_width.view(-1, 1, 1) - distance) / 0.35)
        artery = soft[kind == 1].amax(dim=0) if bool((kind == 1).any()) else torch.zeros(size, size)
        vein = soft[kind == 2].amax(dim=0) if bool((kind == 2).any()) else torch.zeros(size, size)
        # central light reflex of arteries: brighter near the centre line of wide enough segments
        reflex_soft = torch.exp(-((distance / (0.35 * half_width.view(-1, 1, 1))) ** 2))
        reflex = (reflex_soft * (half_width.view(-1, 1, 1) > 0.6)).mul((kind == 1).view(-1, 1, 1)).amax(dim=0)
        label = torch.zeros(size, size, dtype=torch.int64)
        label[artery > 0.5] = 1
        label[vein > 0.5] = 2

        noise = F.interpolate(torch.rand(1, 1, 6, 6, generator=g) * 2 - 1, size=(size, size), mode="bicubic")[0, 0]
        light = 1.0 - 0.35 * (xx**2 + yy**2) + 0.08 * noise
        dx = (torch.arange(size) + 0.5 - disc_x) / (0.12 * size)
        dy = (torch.arange(size) + 0.5 - disc_y).view(-1, 1) / (0.14 * size)
        disc = torch.sigmoid((1.0 - (dx.view(1, -1) ** 2 + dy**2).sqrt()) / 0.15)
        background = torch.tensor([0.80, 0.36, 0.14]).view(3, 1, 1) * light
        background = background * (1 - disc) + torch.tensor([0.97, 0.78, 0.48]).view(3, 1, 1) * disc
        contrast = 0.75 + 0.25 * float(torch.rand((), generator=g))
        artery_colour = torch.tensor([0.44, 0.11, 0.06]).view(3, 1, 1)
        vein_colour = torch.tensor([0.30, 0.05, 0.05]).view(3, 1, 1)
        image = background * (1 - contrast * artery) + contrast * artery * (artery_colour + 0.12 * reflex)
        image = image * (1 - contrast * vein) + contrast * vein * vein_colour
        image = image * ((xx**2 + yy**2) <= 1.9).float()
        image = image + 0.025 * torch.randn(image.shape, generator=g)
        images.append(image.clamp(0.0, 1.0))
        labels.append(label)
    return torch.stack(images), torch.stack(labels)


def synthetic_hrf_av(train: int, test: int, size: int, *, seed: int) -> ImageTasks:
    """Synthetic train and test splits drawn from ``seed``."""
    x_train, av_train = synthetic_vessels(train, size, seed=2 * seed)
    x_test, av_test = synthetic_vessels(test, size, seed=2 * seed + 1)
    return ImageTasks(
        x_train,
        {"artery_vein": av_train, "vessel": (av_train > 0).long()},
        x_test,
        {"artery_vein": av_test, "vessel": (av_test > 0).long()},
        "synthetic",
    )


# ---------------------------------------------------------------------------
# Real HRF-AV


def masks_from_av_colours(rgb: Tensor) -> tuple[Tensor, Tensor]:
    """Colour-coded A/V mask ``[H, W, 3]`` uint8 to ``(artery_vein, vessel)`` label maps ``[H, W]`` int64.

    Red = artery (1), blue = vein (2), green (crossing) and white (uncertain) =
    vessel with A/V label :data:`IGNORE`, black = background.
    """
    on = rgb.to(torch.int64) > 127
    red, green, blue = on[..., 0], on[..., 1], on[..., 2]
    vessel = red | green | blue
    artery_vein = torch.zeros(rgb.shape[:2], dtype=torch.int64)
    artery_vein[vessel] = IGNORE
    artery_vein[red & ~green & ~blue] = 1
    artery_vein[blue & ~red & ~green] = 2
    return artery_vein, vessel.long()


def load_hrf_av(data_dir: str | Path, size: int = 64, *, test_fraction: float = 0.25, seed: int = 0) -> ImageTasks:
    """Load HRF-AV style data from the layout of :data:`LAYOUT` (nothing is downloaded).

    Images and masks are resized to ``size x size`` (masks by nearest
    neighbour); HRF's 3504x2336 images need a large ``size`` (and a GPU) for
    thin vessels to survive. A seeded train/test split is drawn from ``seed``.

    Raises:
        FileNotFoundError: when the layout is missing, naming the expected paths.
        ValueError: naming a file that cannot be read or whose mask has another size.

    Example:
        >>> data = load_hrf_av("~/data/HRF-AV", size=512)  # doctest: +SKIP
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir={str(data_dir)!r} is not a directory; expected the layout {LAYOUT}")
    paths = images_in(root / "images")
    if not paths:
        raise FileNotFoundError(f"no images found in {root / 'images'}; expected the layout {LAYOUT}")
    vessel_folder = next((root / name for name in ("vessel", "manual1") if (root / name).is_dir()), None)
    images: list[Tensor] = []
    av_masks: list[Tensor] = []
    vessel_masks: list[Tensor] = []
    for path in paths:
        image = read_image(path)
        av_path = find_file(root / "av", path.stem, "A/V mask")
        av_image = read_image(av_path).convert("RGB")
        _check_size(av_path, av_image, path, image)
        av_rgb = torch.from_numpy(np.asarray(av_image.resize((size, size), Image.Resampling.NEAREST)).copy())
        artery_vein, vessel = masks_from_av_colours(av_rgb)
        if vessel_folder is not None:
            vessel_path = find_file(vessel_folder, path.stem, "vessel mask")
            vessel_image = read_image(vessel_path).convert("L")
            _check_size(vessel_path, vessel_image, path, image)
            vessel = (to_tensor(vessel_image, size, mask=True) > 127).long()
        images.append(to_tensor(image, size))
        av_masks.append(artery_vein)
        vessel_masks.append(vessel)
    x, av, ves = torch.stack(images), torch.stack(av_masks), torch.stack(vessel_masks)
    train, test = split_indices(len(paths), test_fraction, seed)
    return ImageTasks(
        x[train],
        {"artery_vein": av[train], "vessel": ves[train]},
        x[test],
        {"artery_vein": av[test], "vessel": ves[test]},
        str(root),
    )


def _check_size(mask_path: Path, mask: Image.Image, image_path: Path, image: Image.Image) -> None:
    if mask.size != image.size:
        raise ValueError(
            f"{mask_path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is "
            f"{image.size[0]}x{image.size[1]}; masks must match their images"
        )
