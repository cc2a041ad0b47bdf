"""Skin lesion data for the HAM10000-style benchmark: lesion segmentation + 7-class diagnosis on one image.

Two tasks share one dermoscopic image:

- ``lesion``: per-pixel segmentation, 1 = lesion, 0 = surrounding skin;
- ``diagnosis``: image classification into :data:`DIAGNOSES`, HAM10000's
  seven classes in its alphabetical order: 0 akiec (actinic keratosis /
  Bowen's disease), 1 bcc (basal cell carcinoma), 2 bkl (benign
  keratosis-like), 3 df (dermatofibroma), 4 mel (melanoma), 5 nv (melanocytic
  nevus), 6 vasc (vascular lesion).

Sources:

- :func:`synthetic_lesions`: a documented generator that needs no download.
  Class counts follow HAM10000 (:data:`HAM10000_COUNTS`, about two thirds nv):
  exactly the largest-remainder quotas of :func:`quota_counts`, shuffled.
  Each image is skin (a tone drawn between light and dark, smooth
  illumination noise and redness, a random dermoscope vignette, one to six
  dark hairs in 40 % of the images, drawn over the lesion too, a colour cast
  per image and pixel noise) with one lesion near the centre, at least two
  pixels from the border. The lesion's outline is a star-shaped curve
  ``r0 * exp(sum_k a_k cos(k theta + phi_k))`` (k = 1..7) on a rotated
  ellipse; its fill is a base colour mixed, through smooth noise fields, with
  up to two secondary colours, plus three textures: a network of thin lines,
  dots, and a central patch. Every class draws these from its own ranges
  (:data:`APPEARANCE`), chosen after the lesions' dermoscopy:

  ====== ==================================================================
  akiec  pink-red, poorly defined border, white scale dots, few red lines
  bcc    pink translucent, arborising red vessels, blue-grey nests
  bkl    waxy light-to-mid brown, sharp border, darker fissures, white
         milia-like dots, moderately irregular
  df     small, round, light brown periphery around a white scar-like centre
  mel    dark brown, irregular and asymmetric, black and blue-grey areas,
         irregular dark dots, large
  nv     round or oval, uniform brown (light to dark), faint globules
  vasc   red to purple lacunae separated by dark septa, sharp border, round
  ====== ==================================================================

  The ranges overlap (light melanomas, irregular or dark nevi, pigmented
  keratoses, faint vessels), and with probability :data:`MIMICRY` (0.25) each
  feature group of a lesion is drawn from another diagnosis's ranges, so no
  single cue decides: the diagnosis needs the lesion's colour relative to the
  skin around it, its border and its texture together, which is where the
  ``lesion`` mask helps. Tone, cast, illumination and hairs shift every colour.

  Measured difficulty (balanced accuracy, the mean recall over the seven
  classes: 0.14 by chance; plain accuracy of "always nv": 0.67), test set of
  1000 images, one CPU thread: at 32 px with 3000 training images, logistic
  regression on 16x16 average-pooled pixels 0.38; logistic regression on 19
  colour statistics inside and outside the *true* mask 0.65; a 3-layer CNN
  (16-32-64 channels, class-weighted cross-entropy, Adam, cosine schedule)
  0.58 after 60 s (accuracy 0.71); with 600 training images the CNN reaches
  0.40 in 45 s (logistic regression on pixels 0.33). At 64 px with 2000
  images: pixels 0.46, true-mask colour statistics 0.70, CNN 0.50 after 90 s.
- :func:`load_ham10000`: the real HAM10000 release (10015 dermoscopic images,
  several of them of the same lesion) with the lesion masks published for it
  (``HAM10000_segmentations_lesion_tschandl``), in the layout of :data:`LAYOUT`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Final, NamedTuple

import torch
from torch import Tensor

from benchmarks._images import (
    ImageTasks,
    images_in,
    quota_counts,
    read_image,
    smooth_noise,
    split_indices,
    stratified_subset,
    to_tensor,
)

__all__ = [
    "APPEARANCE",
    "DIAGNOSES",
    "HAM10000_COUNTS",
    "LAYOUT",
    "MIMICRY",
    "TASKS",
    "Appearance",
    "diagnosis_labels",
    "load_ham10000",
    "quota_counts",
    "stratified_subset",
    "synthetic_ham10000",
    "synthetic_lesions",
]

TASKS: Final[tuple[str, str]] = ("lesion", "diagnosis")
"""Task names in task order: segmentation first, classification (which can read it) second."""

DIAGNOSES: Final[tuple[str, ...]] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
"""HAM10000's ``dx`` values; a diagnosis label is the index in this tuple."""

HAM10000_COUNTS: Final[tuple[int, ...]] = (327, 514, 1099, 115, 1113, 6705, 142)
"""Images per diagnosis in the 10015 HAM10000 training images, in :data:`DIAGNOSES` order."""


def _draw_diagnoses(n: int, generator: torch.Generator) -> Tensor:
    counts = torch.tensor(quota_counts(n, HAM10000_COUNTS))
    labels = torch.repeat_interleave(torch.arange(len(DIAGNOSES)), counts)
    return labels[torch.randperm(n, generator=generator)]


def diagnosis_labels(n: int, *, seed: int = 0) -> Tensor:
    """The ``[n]`` int64 diagnoses :func:`synthetic_lesions` draws for ``(n, seed)``, without the images.

    Exactly :func:`quota_counts` ``(n, HAM10000_COUNTS)`` of each class, in a seeded random order.

    Example:
        >>> torch.bincount(diagnosis_labels(1000), minlength=7).tolist()
        [33, 51, 110, 11, 111, 670, 14]
    """
    if n < 1:
        raise ValueError(f"need n >= 1 labels, got n={n}")
    return _draw_diagnoses(n, torch.Generator().manual_seed(seed))


class Appearance(NamedTuple):
    """Ranges ``(low, high)`` a diagnosis draws its lesions' parameters from (uniformly, per image).

    Lengths are in units of the image half-width (the image spans [-1, 1]);
    colours are linear RGB in [0, 1] before the skin's illumination and cast.

    Attributes:
        radius: the outline's base radius ``r0``.
        elongation: aspect ratio of the ellipse the outline is drawn on (>= 1).
        irregularity: standard deviation of the outline's log-radius harmonics.
        softness: width of the border's soft edge, relative to ``r0``.
        colour: base fill colour.
        darkness: factor on the base colour.
        second: a secondary colour and ``share``: the fraction of the lesion it covers.
        third: another secondary colour and its share.
        lines: colour of the thin-line texture (vessels, septa, fissures) and its strength.
        dots: colour of the dot texture (globules, scales, milia) and its strength.
        centre: colour of the central patch and its strength.
    """

    radius: tuple[float, float]
    elongation: tuple[float, float]
    irregularity: tuple[float, float]
    softness: tuple[float, float]
    colour: tuple[float, float, float]
    darkness: tuple[float, float]
    second: tuple[tuple[float, float, float], tuple[float, float]]
    third: tuple[tuple[float, float, float], tuple[float, float]]
    lines: tuple[tuple[float, float, float], tuple[float, float]]
    dots: tuple[tuple[float, float, float], tuple[float, float]]
    centre: tuple[tuple[float, float, float], tuple[float, float]]


_RED: Final = (0.62, 0.10, 0.14)
_WHITE: Final = (0.93, 0.90, 0.84)
_BLACK: Final = (0.10, 0.07, 0.07)
_BLUE_GREY: Final = (0.38, 0.41, 0.48)
_DARK_BROWN: Final = (0.28, 0.16, 0.10)
_NONE: Final = ((0.0, 0.0, 0.0), (0.0, 0.0))

APPEARANCE: Final[dict[str, Appearance]] = {
    "akiec": Appearance(
        radius=(0.30, 0.55), elongation=(1.0, 1.4), irregularity=(0.06, 0.16), softness=(0.12, 0.30),
        colour=(0.80, 0.46, 0.42), darkness=(0.85, 1.05),
        second=((0.70, 0.42, 0.30), (0.0, 0.35)), third=_NONE,
        lines=(_RED, (0.0, 0.35)), dots=(_WHITE, (0.35, 0.9)), centre=_NONE,
    ),
    "bcc": Appearance(
        radius=(0.30, 0.55), elongation=(1.0, 1.4), irregularity=(0.05, 0.15), softness=(0.08, 0.22),
        colour=(0.84, 0.60, 0.58), darkness=(0.85, 1.05),
        second=(_BLUE_GREY, (0.0, 0.4)), third=_NONE,
        lines=(_RED, (0.45, 1.0)), dots=(_BLUE_GREY, (0.0, 0.5)), centre=_NONE,
    ),
    "bkl": Appearance(
        radius=(0.35, 0.65), elongation=(1.0, 1.5), irregularity=(0.06, 0.17), softness=(0.03, 0.10),
        colour=(0.64, 0.47, 0.32), darkness=(0.65, 1.05),
        second=((0.50, 0.34, 0.22), (0.0, 0.45)), third=_NONE,
        lines=(_DARK_BROWN, (0.2, 0.8)), dots=(_WHITE, (0.0, 0.6)), centre=_NONE,
    ),
    "df": Appearance(
        radius=(0.20, 0.38), elongation=(1.0, 1.3), irregularity=(0.02, 0.08), softness=(0.12, 0.28),
        colour=(0.60, 0.42, 0.30), darkness=(0.75, 1.05),
        second=((0.52, 0.36, 0.26), (0.0, 0.3)), third=_NONE,
        lines=_NONE, dots=(_DARK_BROWN, (0.0, 0.3)), centre=(_WHITE, (0.35, 0.9)),
    ),
    "mel": Appearance(
        radius=(0.40, 0.70), elongation=(1.0, 1.6), irregularity=(0.10, 0.24), softness=(0.03, 0.16),
        colour=(0.42, 0.27, 0.19), darkness=(0.55, 1.1),
        second=(_BLACK, (0.05, 0.45)), third=(_BLUE_GREY, (0.0, 0.3)),
        lines=(_DARK_BROWN, (0.0, 0.4)), dots=(_BLACK, (0.1, 0.7)), centre=_NONE,
    ),
    "nv": Appearance(
        radius=(0.30, 0.60), elongation=(1.0, 1.35), irregularity=(0.02, 0.11), softness=(0.05, 0.18),
        colour=(0.50, 0.34, 0.24), darkness=(0.6, 1.25),
        second=((0.36, 0.23, 0.16), (0.0, 0.3)), third=_NONE,
        lines=(_DARK_BROWN, (0.0, 0.25)), dots=(_DARK_BROWN, (0.0, 0.5)), centre=_NONE,
    ),
    "vasc": Appearance(
        radius=(0.25, 0.50), elongation=(1.0, 1.35), irregularity=(0.03, 0.10), softness=(0.03, 0.10),
        colour=(0.66, 0.16, 0.26), darkness=(0.7, 1.05),
        second=((0.42, 0.14, 0.34), (0.1, 0.6)), third=_NONE,
        lines=((0.22, 0.06, 0.10), (0.3, 0.9)), dots=_NONE, centre=_NONE,
    ),
}
"""Per diagnosis, the ranges of :class:`Appearance` its synthetic lesions are drawn from."""

_HARMONICS: Final[int] = 7
_HAIRY: Final[float] = 0.4
_MAX_HAIRS: Final[int] = 6

MIMICRY: Final[float] = 0.25
"""Default :func:`synthetic_lesions` ``mimicry``: chance that a feature group comes from another diagnosis."""
_LIGHT_SKIN: Final = (0.96, 0.80, 0.70)
_DARK_SKIN: Final = (0.66, 0.45, 0.32)


def _ridges(level: Tensor, width: float | Tensor) -> Tensor:
    """Thin curves along the zero set of ``level``, ``width`` wide in units of ``level``."""
    return torch.exp(-((level / width) ** 2))


def synthetic_lesions(
    n: int, size: int = 64, *, seed: int = 0, mimicry: float = MIMICRY
) -> tuple[Tensor, Tensor, Tensor]:
    """Generate ``n`` synthetic dermoscopic images with one lesion each (see the module docstring).

    Args:
        n: number of images.
        size: image height and width in pixels (>= 16).
        seed: everything is drawn from one generator seeded with this; the
            labels first, so :func:`diagnosis_labels` gives them alone.
        mimicry: probability that one feature group of a lesion (outline,
            colour, second colour, third colour, lines, dots, centre) is drawn
            from another diagnosis's ranges (uniformly among the six others),
            independently per group. 0 makes every class look like its table
            entry; larger values make the diagnosis harder (Bayes error grows).

    Returns:
        ``(images [n, 3, S, S] float32 in [0, 1], masks [n, S, S] int64 in {0, 1},
        diagnoses [n] int64 in 0..6)``. Every mask is non-empty and leaves a
        border of at least two pixels.

    Example:
        >>> images, masks, diagnoses = synthetic_lesions(8, 32, seed=1)
        >>> images.shape, masks.shape, bool(masks.flatten(1).any(1).all())
        (torch.Size([8, 3, 32, 32]), torch.Size([8, 32, 32]), True)
    """
    if n < 1 or size < 16:
        raise ValueError(f"need n >= 1 images of size >= 16 pixels, got n={n}, size={size}")
    if not 0.0 <= mimicry <= 1.0:
        raise ValueError(f"mimicry must be in [0, 1], got {mimicry!r}")
    g = torch.Generator().manual_seed(seed)
    labels = _draw_diagnoses(n, g)
    classes = len(DIAGNOSES)
    table = [APPEARANCE[name] for name in DIAGNOSES]

    def source() -> Tensor:
        """Per image, the diagnosis a feature group is drawn from: its own, or another with probability mimicry."""
        other = (labels + torch.randint(1, classes, (n,), generator=g)) % classes
        return torch.where(torch.rand(n, generator=g) < mimicry, other, labels)

    def draw(ranges: Sequence[tuple[float, float]], by: Tensor) -> Tensor:
        """One value per image, uniform in the range of diagnosis ``by``: ``[n, 1, 1]``."""
        low, high = (torch.tensor([r[i] for r in ranges])[by] for i in (0, 1))
        return (low + (high - low) * torch.rand(n, generator=g)).view(n, 1, 1)

    def colour(colours: Sequence[tuple[float, float, float]], by: Tensor) -> Tensor:
        return torch.tensor(colours)[by].view(n, 3, 1, 1)

    def uniform(low: float, high: float) -> Tensor:
        return (low + (high - low) * torch.rand(n, generator=g)).view(n, 1, 1)

    def noise(cells: int) -> Tensor:
        return smooth_noise(n, size, cells, g)[:, 0]

    coords = torch.linspace(-1.0, 1.0, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    # outline: a star-shaped curve on a rotated ellipse, scaled to stay two pixels inside the image
    shape = source()
    cx, cy = uniform(-0.15, 0.15), uniform(-0.15, 0.15)
    angle = uniform(0.0, math.pi)
    elongation = draw([t.elongation for t in table], shape).sqrt()
    k = torch.arange(1, _HARMONICS + 1, dtype=torch.float32)
    irregularity = draw([t.irregularity for t in table], shape).view(n, 1)
    amplitude = irregularity * torch.randn(n, _HARMONICS, generator=g) / k.sqrt()
    phase = 2 * math.pi * torch.rand(n, _HARMONICS, generator=g)
    angles = torch.linspace(0.0, 2 * math.pi, 256).view(1, -1, 1)
    reach = (amplitude.unsqueeze(1) * torch.cos(k * angles + phase.unsqueeze(1))).sum(-1).amax(dim=1).exp()
    room = 1.0 - 4.0 / size - torch.maximum(cx.abs(), cy.abs())
    r0 = torch.minimum(draw([t.radius for t in table], shape), room / (reach.view(n, 1, 1) * elongation))
    dx, dy = xx - cx, yy - cy
    u = (dx * torch.cos(angle) + dy * torch.sin(angle)) / elongation
    v = (-dx * torch.sin(angle) + dy * torch.cos(angle)) * elongation
    radius = (u**2 + v**2).sqrt()
    theta = torch.atan2(v, u)
    harmonics = (amplitude.view(n, 1, 1, -1) * torch.cos(k * theta.unsqueeze(-1) + phase.view(n, 1, 1, -1))).sum(-1)
    boundary = r0 * harmonics.exp()
    masks = (radius < boundary).long()
    # the pixel nearest the centre is lesion even where a tiny, very irregular outline misses it
    row, col = (((c.view(n) + 1) / 2 * (size - 1)).round().long() for c in (cy, cx))
    masks[torch.arange(n), row, col] = 1
    softness = draw([t.softness for t in table], shape) * r0 + 1.0 / size
    alpha = torch.sigmoid(2.0 * (boundary - radius) / softness).unsqueeze(1)

    # fill: base colour, secondary colours through smooth noise, then the textures
    by = source()
    fill = colour([t.colour for t in table], by) * draw([t.darkness for t in table], by).unsqueeze(1)
    for part in ("second", "third"):
        spec: list[tuple[tuple[float, float, float], tuple[float, float]]] = [getattr(t, part) for t in table]
        by = source()
        share = draw([s[1] for s in spec], by)
        field = noise(4) + 0.5 * noise(8)
        # threshold at the field's (1 - share) quantile, so the colour covers about ``share`` of the lesion
        ranked = field.flatten(1).sort(dim=1).values
        rank = ((1 - share).clamp(0.0, 1.0).view(n, 1) * (size * size - 1)).round().long()
        weight = torch.sigmoid((field - ranked.gather(1, rank).view(n, 1, 1)) / 0.06) * (share > 0.01)
        fill = fill * (1 - weight.unsqueeze(1)) + colour([s[0] for s in spec], by) * weight.unsqueeze(1)
    inner = radius / boundary
    textures = (
        ("lines", _ridges(noise(6), 0.12) * (inner < 0.95)),
        ("dots", torch.sigmoid((noise(14) - 0.45) / 0.06) * (inner < 0.9)),
        ("centre", torch.exp(-((inner / 0.45) ** 2))),
    )
    for part, pattern in textures:
        spec = [getattr(t, part) for t in table]
        by = source()
        weight = (pattern * draw([s[1] for s in spec], by)).unsqueeze(1)
        fill = fill * (1 - weight) + colour([s[0] for s in spec], by) * weight

    # skin: tone and redness; the lesion on top; hairs; vignette, illumination, colour cast, noise
    tone = uniform(0.0, 1.0).unsqueeze(1)
    skin = torch.tensor(_LIGHT_SKIN).view(1, 3, 1, 1) * (1 - tone) + torch.tensor(_DARK_SKIN).view(1, 3, 1, 1) * tone
    redness = 0.06 * noise(3) * uniform(0.0, 1.0)
    skin = skin + torch.stack([redness, -0.5 * redness, -0.5 * redness], dim=1)
    image = skin * (1 - alpha) + fill * alpha
    # hairs: long, gently curved lines, each the zero set of a tilted plane plus smooth noise
    count = torch.where(torch.rand(n, generator=g) < _HAIRY, torch.randint(1, _MAX_HAIRS + 1, (n,), generator=g), 0)
    hairs = torch.zeros(n, size, size)
    for index in range(_MAX_HAIRS):
        direction, offset = uniform(0.0, math.pi), uniform(-0.9, 0.9)
        level = xx * torch.cos(direction) + yy * torch.sin(direction) - offset + 0.25 * noise(2)
        hairs = torch.maximum(hairs, _ridges(level, uniform(0.6, 1.2) / size) * (count > index).view(n, 1, 1))
    hairs = (hairs * uniform(0.6, 0.95)).unsqueeze(1)
    image = image * (1 - hairs) + torch.tensor(_BLACK).view(1, 3, 1, 1) * hairs
    vignette = 1.0 - uniform(0.0, 0.6) * torch.sigmoid((xx**2 + yy**2 - uniform(1.3, 2.0)) / 0.08)
    light = (1.0 + 0.08 * noise(3)) * vignette * uniform(0.85, 1.1)
    cast = 1.0 + 0.05 * torch.randn(n, 3, 1, 1, generator=g)
    image = image * light.unsqueeze(1) * cast + 0.02 * torch.randn(image.shape, generator=g)
    return image.clamp(0.0, 1.0), masks, labels


def synthetic_ham10000(train: int, test: int, size: int, *, seed: int, mimicry: float = MIMICRY) -> ImageTasks:
    """Synthetic train and test splits, each with HAM10000's class shares (drawn from ``seed``).

    Example:
        >>> data = synthetic_ham10000(30, 10, 32, seed=0)
        >>> data.train_x.shape, data.train_y["lesion"].shape, data.test_y["diagnosis"].shape
        (torch.Size([30, 3, 32, 32]), torch.Size([30, 32, 32]), torch.Size([10]))
    """
    x_train, m_train, d_train = synthetic_lesions(train, size, seed=2 * seed, mimicry=mimicry)
    x_test, m_test, d_test = synthetic_lesions(test, size, seed=2 * seed + 1, mimicry=mimicry)
    return ImageTasks(
        x_train,
        {"lesion": m_train, "diagnosis": d_train},
        x_test,
        {"lesion": m_test, "diagnosis": d_test},
        "synthetic",
    )


# ---------------------------------------------------------------------------
# Real HAM10000


_METADATA: Final[str] = "HAM10000_metadata.csv"
_IMAGE_FOLDERS: Final[tuple[str, str]] = ("HAM10000_images_part_1", "HAM10000_images_part_2")
_MASK_FOLDER: Final[str] = "HAM10000_segmentations_lesion_tschandl"
_COLUMNS: Final[tuple[str, ...]] = ("lesion_id", "image_id", "dx")
LAYOUT: Final[str] = (
    "<data_dir>/HAM10000_metadata.csv (columns lesion_id,image_id,dx,dx_type,age,sex,localization; "
    f"dx in {{{','.join(DIAGNOSES)}}}), images <data_dir>/HAM10000_images_part_1/<image_id>.jpg or "
    "<data_dir>/HAM10000_images_part_2/<image_id>.jpg, and lesion masks "
    "<data_dir>/HAM10000_segmentations_lesion_tschandl/<image_id>_segmentation.png (0 = skin, 255 = lesion)"
)


def _read_metadata(path: Path) -> list[tuple[str, str, int]]:
    """``(lesion_id, image_id, diagnosis)`` per row of HAM10000_metadata.csv, in file order."""
    with path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path} has no column(s) {missing} (header: {reader.fieldnames}); expected the layout {LAYOUT}"
            )
        rows: list[tuple[str, str, int]] = []
        for line, row in enumerate(reader, start=2):
            dx = (row["dx"] or "").strip().lower()
            if dx not in DIAGNOSES:
                raise ValueError(f"{path}, line {line}: dx={row['dx']!r} is not one of {DIAGNOSES}")
            lesion, image = (row["lesion_id"] or "").strip(), (row["image_id"] or "").strip()
            if not lesion or not image:
                raise ValueError(f"{path}, line {line}: empty lesion_id or image_id")
            rows.append((lesion, image, DIAGNOSES.index(dx)))
    if not rows:
        raise ValueError(f"{path} lists no images; expected the layout {LAYOUT}")
    return rows


def load_ham10000(
    data_dir: str | Path, size: int = 64, *, test_fraction: float = 0.25, seed: int = 0, limit: int | None = None
) -> ImageTasks:
    """Load the HAM10000 release from its own layout (:data:`LAYOUT`; nothing is downloaded).

    The diagnosis is the metadata's ``dx``; the lesion mask is Tschandl et
    al.'s segmentation (pixels > 127 are lesion). Images (600x450) and masks
    are resized to ``size x size`` (masks by nearest neighbour).

    The seeded train/test split is drawn over *lesions*, not images: HAM10000
    has several images of many lesions (same ``lesion_id``), and all of them
    fall in the same split, so no lesion is seen in training and tested on. Lesions
    are stratified by diagnosis (the ``dx`` of their first image), so each split
    keeps about HAM10000's class shares, and ``test_fraction`` is the share of
    lesions (about that of images) held out.

    Args:
        data_dir: the folder holding ``HAM10000_metadata.csv``.
        size: images and masks are resized to ``size x size``.
        test_fraction: share of each diagnosis's lesions held out for testing.
        seed: fixes the split.
        limit: read at most this many images (``None``: all): the first rows of
            each diagnosis in file order, in HAM10000's proportions
            (:func:`stratified_subset`), the same for every seed.

    Raises:
        FileNotFoundError: naming the missing folder, metadata file, image or mask and the expected layout.
        ValueError: naming the file and line of an unknown ``dx``, a file that
            cannot be read, or a mask whose size differs from its image's.

    Example:
        >>> data = load_ham10000("~/data/HAM10000", size=64)  # doctest: +SKIP
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir={str(data_dir)!r} is not a directory; expected the layout {LAYOUT}")
    metadata = root / _METADATA
    if not metadata.is_file():
        raise FileNotFoundError(f"{metadata} not found; expected the layout {LAYOUT}")
    rows = _read_metadata(metadata)
    if limit is not None:
        rows = [rows[i] for i in stratified_subset([r[2] for r in rows], limit).tolist()]
    folders = [root / name for name in _IMAGE_FOLDERS if (root / name).is_dir()]
    if not folders:
        raise FileNotFoundError(
            f"neither {root / _IMAGE_FOLDERS[0]} nor {root / _IMAGE_FOLDERS[1]} is a directory; "
            f"expected the layout {LAYOUT}"
        )
    mask_folder = root / _MASK_FOLDER
    if not mask_folder.is_dir():
        raise FileNotFoundError(f"{mask_folder} is not a directory; expected the layout {LAYOUT}")
    # one directory listing each, not one per image: HAM10000 has 10015 images
    image_paths = {p.stem: p for folder in folders for p in images_in(folder)}
    mask_paths = {p.stem: p for p in images_in(mask_folder)}
    images: list[Tensor] = []
    masks: list[Tensor] = []
    for _, image_id, _ in rows:
        if image_id not in image_paths:
            raise FileNotFoundError(
                f"image {image_id!r} of {metadata} not found: expected "
                f"{root / _IMAGE_FOLDERS[0] / image_id}.jpg or {root / _IMAGE_FOLDERS[1] / image_id}.jpg"
            )
        if f"{image_id}_segmentation" not in mask_paths:
            raise FileNotFoundError(
                f"lesion mask of {image_id!r} not found: expected {mask_folder / image_id}_segmentation.png"
            )
        image_path, mask_path = image_paths[image_id], mask_paths[f"{image_id}_segmentation"]
        image, mask = read_image(image_path), read_image(mask_path).convert("L")
        if mask.size != image.size:
            raise ValueError(
                f"{mask_path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is "
                f"{image.size[0]}x{image.size[1]}; masks must match their images"
            )
        images.append(to_tensor(image, size))
        masks.append((to_tensor(mask, size, mask=True) > 127).long())
    x, lesion_masks = torch.stack(images), torch.stack(masks)
    diagnoses = torch.tensor([r[2] for r in rows], dtype=torch.int64)
    train, test = _grouped_split([r[0] for r in rows], diagnoses.tolist(), test_fraction, seed)
    return ImageTasks(
        x[train],
        {"lesion": lesion_masks[train], "diagnosis": diagnoses[train]},
        x[test],
        {"lesion": lesion_masks[test], "diagnosis": diagnoses[test]},
        str(root),
    )


def _grouped_split(groups: Sequence[str], strata: Sequence[int], test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Train / test image indices with every group wholly on one side; groups stratified by their first stratum."""
    first: dict[str, int] = {}
    for group, stratum in zip(groups, strata):
        first.setdefault(group, stratum)
    names = list(first)
    if len(names) < 2:
        raise ValueError(f"need at least 2 lesions (lesion_id) to split into train and test, got {names}")
    _, test_groups = split_indices(len(names), test_fraction, seed, [first[name] for name in names])
    held_out = {names[i] for i in test_groups.tolist()}
    test = [i for i, group in enumerate(groups) if group in held_out]
    train = [i for i, group in enumerate(groups) if group not in held_out]
    return torch.tensor(train, dtype=torch.int64), torch.tensor(test, dtype=torch.int64)
