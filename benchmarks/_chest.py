"""Chest CT data for the STOIC-style benchmark: COVID-19 diagnosis and severity from one small 3D volume.

Two image-level tasks share one CT volume ``[1, D, H, W]`` (HU windowed to
[0, 1] by :func:`window_hu`):

- ``covid``: 1 = RT-PCR positive for SARS-CoV-2, 0 = negative;
- ``severe``: 1 = intubation or death within one month, 0 = neither. In the
  synthetic data, as in STOIC's COVID-positive focus, severe cases are a
  subset of the positive ones.

Sources:

- :func:`synthetic_ct`: a documented generator that needs no download.
  Prevalence: exactly :func:`benchmarks._images.quota_counts` of
  ``(negative, positive non-severe, severe)`` with :data:`COVID_FRACTION` =
  0.57 positive and :data:`SEVERE_FRACTION` = 1/6 of the positives severe
  (about 9.5 % of all scans), the shares the STOIC 2021 public training set
  (2000 scans) is described with; both are arguments. Each volume (axes z, y,
  x; z towards the head, y towards the back) is a chest in Hounsfield units
  (HU): air (-1000) around an elliptic body (soft tissue +40 HU under a fat
  layer of -100 HU), a spine (+600 HU) at the back, and two lungs: ellipsoids
  narrowing towards the apex, of -880 to -760 HU (inspiration varies) with a
  gravity gradient (denser at the back), crossed by vessels (tubes of +40 HU,
  thicker near the hilum). Findings that are *not* COVID-19 appear with the
  same chance in both classes: dependent atelectasis (a dense posterior band at
  the lung bases, 40 %), one or two small dense nodules (30 %) and emphysema
  (patches of -960 HU, 20 %). Of the negative scans, 25 % have a non-COVID
  pneumonia (one large unilateral consolidation) and 30 % ground glass of
  another cause (oedema, other infections): up to four blobs of +150 to +400 HU
  in the *central* half of the lungs. Positive scans have COVID-19's pattern:
  ground-glass opacities (GGO, +250 to +500 HU over the lung) that are
  multifocal (2 to 10 blobs), bilateral (both lungs in 85 % of the scans),
  *peripheral* (in the outer 30 % of the lung radius) and more frequent in the
  lower, posterior lung, some with a consolidated core (-100 to +30 HU). A
  burden ``b`` in [0, 1] sets the number, size and density of the blobs and
  how often they consolidate: ``b ~ U(0, 0.65)`` for non-severe and
  ``U(0.35, 1)`` for severe positives, so severity is visible but noisy (the
  overlap stands for the age, comorbidities and care that also decide real
  outcomes). Per-voxel noise of 10 to 35 HU completes the picture. Telling
  COVID-19 from the other ground glass needs *where* the opacities are, not
  only how many voxels are dense.

  Measured difficulty (AUROC on 400 test volumes at 32^3, one CPU thread;
  ``severe`` over all scans, and among the positive ones): logistic
  regression on 8^3 average-pooled voxels: covid 0.63, severe 0.74 (0.73);
  logistic regression on a 30-bin intensity histogram: covid 0.83, severe
  0.88 (0.82); a tiny 3D CNN (stride-2 stem, 16-32-64 channels, global max
  pool, two logits) trained on 800 volumes: covid 0.84, severe 0.87 (0.78)
  after 2 minutes; on 300 volumes: covid 0.62, severe 0.61 after 45 s (at
  16^3: 0.64 and 0.70 after 30 s).
- :func:`load_stoic`: the real STOIC 2021 training release in the layout of
  :data:`LAYOUT`, read with :func:`benchmarks._metaimage.read_mha` and resampled
  to ``size^3``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Final

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks._images import ImageTasks, quota_counts, split_indices, stratified_subset
from benchmarks._metaimage import read_mha

__all__ = [
    "COVID_FRACTION",
    "HU_WINDOW",
    "LAYOUT",
    "SEVERE_FRACTION",
    "TASKS",
    "load_stoic",
    "resample",
    "stoic_labels",
    "synthetic_ct",
    "synthetic_stoic",
    "window_hu",
]

TASKS: Final[tuple[str, str]] = ("covid", "severe")
"""Task names in task order."""

COVID_FRACTION: Final[float] = 0.57
"""Default share of RT-PCR positive scans."""

SEVERE_FRACTION: Final[float] = 1 / 6
"""Default share of severe outcomes among the positive scans."""

HU_WINDOW: Final[tuple[float, float]] = (-1000.0, 500.0)
"""HU mapped to 0 and 1 by :func:`window_hu` (lung to bone)."""


def window_hu(hu: Tensor, window: tuple[float, float] = HU_WINDOW) -> Tensor:
    """Hounsfield units clipped to ``window`` and scaled to [0, 1] (float32, same shape).

    Example:
        >>> window_hu(torch.tensor([-2048.0, -1000.0, -250.0, 500.0, 3000.0])).tolist()
        [0.0, 0.0, 0.5, 1.0, 1.0]
    """
    low, high = window
    if not high > low:
        raise ValueError(f"window must be (low, high) with high > low, got {window}")
    return (hu.float().clamp(low, high) - low) / (high - low)


def resample(volume: Tensor, size: int) -> Tensor:
    """A ``[D, H, W]`` volume resampled to ``[size, size, size]`` (float32).

    Each axis is first averaged over blocks of ``floor(extent / size)`` voxels
    (so a 512-voxel axis does not alias when it shrinks to 32), then
    interpolated trilinearly to ``size``. The physical aspect ratio is not
    kept: every scan fills the cube.
    """
    if volume.ndim != 3:
        raise ValueError(f"volume must be [D, H, W], got shape {tuple(volume.shape)}")
    if size < 2:
        raise ValueError(f"size must be >= 2 voxels, got {size}")
    x = volume.float()[None, None]
    factors = [max(1, extent // size) for extent in volume.shape]
    if max(factors) > 1:
        x = F.avg_pool3d(x, kernel_size=factors, stride=factors)
    return F.interpolate(x, size=(size, size, size), mode="trilinear", align_corners=False)[0, 0]


def _draw_outcomes(n: int, covid_fraction: float, severe_fraction: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    shares = (1 - covid_fraction, covid_fraction * (1 - severe_fraction), covid_fraction * severe_fraction)
    groups = torch.repeat_interleave(torch.arange(3), torch.tensor(quota_counts(n, shares)))
    groups = groups[torch.randperm(n, generator=g)]
    return (groups >= 1).long(), (groups == 2).long()


def _check_fractions(n: int, covid_fraction: float, severe_fraction: float) -> None:
    if n < 1:
        raise ValueError(f"need n >= 1 scans, got n={n}")
    for name, value in (("covid_fraction", covid_fraction), ("severe_fraction", severe_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def stoic_labels(
    n: int, *, seed: int = 0, covid_fraction: float = COVID_FRACTION, severe_fraction: float = SEVERE_FRACTION
) -> tuple[Tensor, Tensor]:
    """The ``(covid [n], severe [n])`` int64 labels :func:`synthetic_ct` draws for the same arguments, alone.

    Example:
        >>> covid, severe = stoic_labels(600)
        >>> int(covid.sum()), int(severe.sum()), bool((severe <= covid).all())
        (342, 57, True)
    """
    _check_fractions(n, covid_fraction, severe_fraction)
    return _draw_outcomes(n, covid_fraction, severe_fraction, torch.Generator().manual_seed(seed))


_CHUNK: Final[int] = 64
_MAX_BLOBS: Final[int] = 10
_PNEUMONIA: Final[float] = 0.25
_OTHER_GGO: Final[float] = 0.3


def _noise3d(n: int, size: int, cells: int, g: torch.Generator) -> Tensor:
    """Low-frequency noise ``[n, S, S, S]`` in about [-1, 1]: a coarse grid, trilinearly upsampled."""
    coarse = torch.rand(n, 1, cells, cells, cells, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size, size), mode="trilinear", align_corners=False)[:, 0]


def _render(covid: Tensor, severe: Tensor, size: int, g: torch.Generator) -> Tensor:
    """HU volumes ``[n, S, S, S]`` for one chunk of labels (see the module docstring)."""
    n = covid.numel()

    def uniform(low: float | Tensor, high: float | Tensor) -> Tensor:
        return (low + (high - low) * torch.rand(n, generator=g)).view(n, 1, 1, 1)

    def chance(p: float | Tensor) -> Tensor:
        return (torch.rand(n, generator=g) < p).float().view(n, 1, 1, 1)

    def noise(cells: int) -> Tensor:
        return _noise3d(n, size, cells, g)

    # axis coordinates in [-1, 1], broadcast against each other (and [n, 1, 1, 1] parameters) only when needed
    coords = torch.linspace(-1.0, 1.0, size)
    z, y, x = coords.view(1, -1, 1, 1), coords.view(1, 1, -1, 1), coords.view(1, 1, 1, -1)
    # body: an ellipse in every axial slice, fat under the skin, soft tissue inside, spine at the back
    ax, ay, centre_y = uniform(0.80, 0.94), uniform(0.58, 0.72), uniform(-0.05, 0.05)
    body_r = ((x / ax) ** 2 + ((y - centre_y) / ay) ** 2).sqrt()  # [n, 1, S, S]
    fat = uniform(0.05, 0.14)
    tissue = torch.where(body_r > 1.0 - fat, -100.0, 40.0)
    spine = (x**2 + (y - centre_y - 0.78 * ay) ** 2).sqrt() < 0.11 * ax
    tissue = torch.where(spine, 600.0, tissue)
    hu = torch.where(body_r <= 1.0, tissue, -1000.0).expand(n, size, size, size)

    # lungs: one ellipsoid per side, narrowing towards the apex (z -> +1), inside the body
    lung_r: list[Tensor] = []
    centres: list[Tensor] = []
    for sign in (-1.0, 1.0):
        lx = sign * uniform(0.46, 0.52) * ax
        rx, ry = uniform(0.28, 0.33) * ax, uniform(0.60, 0.72) * ay
        zc, rz = uniform(-0.15, 0.0), uniform(0.85, 1.0)
        taper = (1.0 - 0.35 * ((z - zc) / rz).clamp(0.0, 1.0)).clamp_min(0.3)
        r2 = ((x - lx) / (rx * taper)) ** 2 + ((y - centre_y) / (ry * taper)) ** 2 + ((z - zc) / rz) ** 2
        lung_r.append(r2.sqrt())
        centres.append(lx)
    lung = (torch.minimum(*lung_r) <= 1.0) & (body_r < 1.0 - fat)
    dependent = ((y - centre_y) / ay).clamp(-1.0, 1.0)  # -1 front, +1 back
    # lung density varies with inspiration from scan to scan
    lung_hu = uniform(-880.0, -760.0) + 30.0 * dependent + 15.0 * noise(6)
    # vessels: tubes where two smooth noise fields are both near zero, wider near the hilum
    width2 = (0.10 * (1.25 - torch.minimum(*lung_r).clamp(0.0, 1.0))) ** 2
    tubes = torch.exp(-(noise(5) ** 2 + noise(5) ** 2) / width2)
    lung_hu = lung_hu + tubes * (40.0 - lung_hu) * 0.9
    wobble = noise(4)  # one field shapes every blob of a volume, each at its own place

    def distance2(centre: tuple[Tensor, Tensor, Tensor], radius: Tensor, irregular: float) -> Tensor:
        """Squared distance to ``centre`` (z, y, x) in units of ``radius``, made irregular by ``wobble``."""
        cz, cy, cx = centre
        return ((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2) / radius**2 * (1.0 + irregular * wobble)

    def blob(d2: Tensor) -> Tensor:
        """A soft blob in [0, 1] inside squared distance 1."""
        return torch.sigmoid((1.0 - d2) / 0.25)

    def point_in_lung(
        side: Tensor, depth: tuple[float, float], lower: float, posterior: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """A point in the lung on ``side`` (+1 or -1) at a relative radius in ``depth``, biased down and back."""
        fraction = uniform(*depth)
        azimuth = uniform(0.0, 2 * math.pi)
        lateral = torch.cos(azimuth).abs() * side  # towards the chest wall
        back = torch.sin(azimuth) + posterior
        norm = (lateral**2 + back**2).sqrt().clamp_min(1e-3)
        cz = (0.75 * (uniform(-1.0, 1.0) - lower)).clamp(-0.8, 0.7)
        cy = centre_y + fraction * 0.64 * ay * back / norm
        cx = torch.where(side > 0, centres[1], centres[0]) + fraction * 0.30 * ax * lateral / norm
        return cz, cy, cx

    def random_side() -> Tensor:
        return torch.where(torch.rand(n, generator=g) < 0.5, 1.0, -1.0).view(n, 1, 1, 1)

    # findings of either class: atelectasis, emphysema, nodules
    atelectasis = chance(0.4) * torch.sigmoid((dependent - 0.75) / 0.05) * torch.sigmoid((-z - 0.2) / 0.1)
    lung_hu = lung_hu + atelectasis * uniform(150.0, 450.0)
    lung_hu = torch.where((noise(5) > 0.45) & (chance(0.2) > 0), -960.0, lung_hu)
    nodules = chance(0.3) * blob(torch.minimum(
        distance2(point_in_lung(random_side(), (0.0, 0.8), 0.0, 0.0), uniform(0.05, 0.09), 0.1),
        distance2(point_in_lung(random_side(), (0.0, 0.8), 0.0, 0.0), uniform(0.05, 0.09), 0.1),
    ))
    lung_hu = lung_hu + nodules * (uniform(-50.0, 60.0) - lung_hu)

    # negatives: sometimes a non-COVID pneumonia (one large unilateral consolidation), or ground glass of
    # another cause (oedema, other infections): central, around the hilum, on one or both sides
    negative = 1 - covid.float().view(n, 1, 1, 1)
    other = torch.rand(n, generator=g).view(n, 1, 1, 1)
    pneumonia = (other < _PNEUMONIA).float() * negative
    lobar = blob(distance2(point_in_lung(random_side(), (0.2, 0.7), 0.0, 0.0), uniform(0.22, 0.34), 0.3)) * pneumonia
    lung_hu = lung_hu + lobar * (uniform(-150.0, 20.0) - lung_hu)
    central = ((other >= _PNEUMONIA) & (other < _PNEUMONIA + _OTHER_GGO)).float() * negative
    side = random_side()
    nearest = torch.full((n, size, size, size), math.inf)
    for _ in range(4):
        side = torch.where(chance(0.5) > 0, -side, side)
        d2 = distance2(point_in_lung(side, (0.0, 0.55), 0.0, 0.0), uniform(0.10, 0.22), 0.35)
        nearest = torch.minimum(nearest, d2 + torch.where(chance(0.7) > 0, 0.0, math.inf))
    lung_hu = lung_hu + blob(nearest) * central * uniform(150.0, 400.0)

    # positives: peripheral, bilateral, multifocal ground-glass opacities with consolidated cores
    burden = torch.where(severe.view(n, 1, 1, 1) > 0, uniform(0.35, 1.0), uniform(0.0, 0.65))
    count = (2.0 + 8.0 * burden.view(n) + torch.rand(n, generator=g)).floor().clamp(2, _MAX_BLOBS) * covid
    first_side = random_side()
    bilateral = chance(0.85)
    # the nearest blob decides: track the smallest squared distance (inactive blobs are pushed far away)
    nearest = torch.full((n, size, size, size), math.inf)
    nearest_core = torch.full((n, size, size, size), math.inf)
    for index in range(_MAX_BLOBS):
        # alternate sides in bilateral scans, stay on one side otherwise
        side = torch.where((bilateral > 0) & (index % 2 == 1), -first_side, first_side)
        far = torch.where(count > index, 0.0, math.inf).view(n, 1, 1, 1)
        radius = uniform(0.11, 0.15) + 0.14 * burden * uniform(0.5, 1.0)
        d2 = distance2(point_in_lung(side, (0.70, 1.0), 0.4, 0.5), radius, 0.35) + far
        nearest = torch.minimum(nearest, d2)
        consolidates = chance(0.05 + 0.6 * burden.view(n)) > 0
        nearest_core = torch.minimum(nearest_core, d2 + torch.where(consolidates, 0.0, math.inf))
    ggo = blob(nearest)
    core = torch.sigmoid((0.3 - nearest_core) / 0.08)
    lung_hu = lung_hu + ggo * (uniform(250.0, 350.0) + 150.0 * burden)
    lung_hu = lung_hu + core * (uniform(-100.0, 30.0) - lung_hu)

    hu = torch.where(lung, lung_hu, hu)
    return hu + uniform(10.0, 35.0) * torch.randn(hu.shape, generator=g)


def synthetic_ct(
    n: int,
    size: int = 32,
    *,
    seed: int = 0,
    covid_fraction: float = COVID_FRACTION,
    severe_fraction: float = SEVERE_FRACTION,
) -> tuple[Tensor, Tensor, Tensor]:
    """Generate ``n`` synthetic chest CT volumes with COVID-19 and severity labels (see the module docstring).

    Args:
        n: number of volumes.
        size: edge of the cube in voxels (>= 8).
        seed: everything is drawn from one generator seeded with this; the
            labels first, so :func:`stoic_labels` gives them alone.
        covid_fraction: share of positive scans.
        severe_fraction: share of severe outcomes among the positive scans.

    Returns:
        ``(volumes [n, 1, S, S, S] float32 in [0, 1] (:func:`window_hu`),
        covid [n] int64, severe [n] int64)``, with ``severe <= covid``.

    Example:
        >>> volumes, covid, severe = synthetic_ct(4, 16, seed=1)
        >>> volumes.shape, bool((severe <= covid).all())
        (torch.Size([4, 1, 16, 16, 16]), True)
    """
    _check_fractions(n, covid_fraction, severe_fraction)
    if size < 8:
        raise ValueError(f"size must be >= 8 voxels, got {size}")
    g = torch.Generator().manual_seed(seed)
    covid, severe = _draw_outcomes(n, covid_fraction, severe_fraction, g)
    volumes = torch.empty(n, 1, size, size, size)
    for start in range(0, n, _CHUNK):  # bounded memory: a few [64, S, S, S] temporaries at a time
        stop = min(start + _CHUNK, n)
        volumes[start:stop, 0] = window_hu(_render(covid[start:stop], severe[start:stop], size, g))
    return volumes, covid, severe


def synthetic_stoic(train: int, test: int, size: int, *, seed: int) -> ImageTasks:
    """Synthetic train and test splits, each with the default prevalence (drawn from ``seed``).

    Example:
        >>> data = synthetic_stoic(6, 3, 16, seed=0)
        >>> data.train_x.shape, data.spatial_dims, sorted(data.test_y)
        (torch.Size([6, 1, 16, 16, 16]), 3, ['covid', 'severe'])
    """
    x_train, c_train, s_train = synthetic_ct(train, size, seed=2 * seed)
    x_test, c_test, s_test = synthetic_ct(test, size, seed=2 * seed + 1)
    return ImageTasks(
        x_train, {"covid": c_train, "severe": s_train}, x_test, {"covid": c_test, "severe": s_test}, "synthetic"
    )


# ---------------------------------------------------------------------------
# Real STOIC 2021


_REFERENCE: Final[tuple[str, str]] = ("metadata", "reference.csv")
_VOLUMES: Final[tuple[str, str]] = ("data", "mha")
_COLUMNS: Final[tuple[str, str, str]] = ("PatientID", "probCOVID", "probSevere")
LAYOUT: Final[str] = (
    "<data_dir>/metadata/reference.csv (columns PatientID,probCOVID,probSevere with 0/1 values) and "
    "<data_dir>/data/mha/<PatientID>.mha CT volumes in HU (STOIC 2021 training release)"
)


def _label(path: Path, line: int, column: str, text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value not in (0.0, 1.0):
        raise ValueError(f"{path}, line {line}: {column}={text!r} is not 0 or 1")
    return int(value)


def _read_reference(path: Path) -> list[tuple[str, int, int]]:
    """``(PatientID, covid, severe)`` per row of reference.csv, in file order."""
    with path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} has no column(s) {missing} (header: {reader.fieldnames}); expected {LAYOUT}")
        rows: list[tuple[str, int, int]] = []
        for line, row in enumerate(reader, start=2):
            patient = (row["PatientID"] or "").strip()
            if not patient:
                raise ValueError(f"{path}, line {line}: empty PatientID")
            covid = _label(path, line, "probCOVID", (row["probCOVID"] or "").strip())
            severe = _label(path, line, "probSevere", (row["probSevere"] or "").strip())
            rows.append((patient, covid, severe))
    if not rows:
        raise ValueError(f"{path} lists no patients; expected the layout {LAYOUT}")
    return rows


def load_stoic(
    data_dir: str | Path, size: int = 32, *, test_fraction: float = 0.25, seed: int = 0, limit: int | None = None
) -> ImageTasks:
    """Load the STOIC 2021 training release from its own layout (:data:`LAYOUT`; nothing is downloaded).

    Every ``.mha`` volume is read (:func:`benchmarks._metaimage.read_mha`,
    axes z, y, x), clipped to :data:`HU_WINDOW`, resampled to ``size^3``
    (:func:`resample`) and scaled to [0, 1] (:func:`window_hu`). Labels are
    taken as given: ``probCOVID`` and ``probSevere`` must be 0 or 1 (the
    loader does not require severe cases to be positive). A seeded train/test
    split stratified by ``(covid, severe)`` is drawn from ``seed``.

    Args:
        data_dir: the STOIC folder (holding ``metadata/`` and ``data/``).
        size: edge of the resampled cube in voxels.
        test_fraction: share of each ``(covid, severe)`` group held out for testing.
        seed: fixes the split.
        limit: read at most this many scans (``None``: all): the first rows of
            each ``(covid, severe)`` group in file order, in their proportions
            (:func:`benchmarks._images.stratified_subset`), the same for every seed.
            A full-resolution scan takes a few hundred MB while it is resampled.

    Raises:
        FileNotFoundError: naming the missing folder, reference.csv or volume and the expected layout.
        ValueError: naming the file (and line) of a label that is not 0/1 or a volume that cannot be read.

    Example:
        >>> data = load_stoic("~/data/stoic2021-training", size=32, limit=200)  # doctest: +SKIP
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir={str(data_dir)!r} is not a directory; expected the layout {LAYOUT}")
    reference = root.joinpath(*_REFERENCE)
    if not reference.is_file():
        raise FileNotFoundError(f"{reference} not found; expected the layout {LAYOUT}")
    rows = _read_reference(reference)
    strata = [2 * covid + severe for _, covid, severe in rows]
    if limit is not None:
        keep = stratified_subset(strata, limit).tolist()
        rows, strata = [rows[i] for i in keep], [strata[i] for i in keep]
    folder = root.joinpath(*_VOLUMES)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory; expected the layout {LAYOUT}")
    volumes: list[Tensor] = []
    for patient, _, _ in rows:
        path = folder / f"{patient}.mha"
        if not path.is_file():
            raise FileNotFoundError(f"CT volume of PatientID {patient!r} ({reference}) not found: expected {path}")
        array, _ = read_mha(path)
        if array.ndim != 3:
            raise ValueError(f"{path} has {array.ndim} dimensions {array.shape}; expected a 3D CT volume")
        hu = torch.from_numpy(array.astype("float32")).clamp_(*HU_WINDOW)  # in place: scans are large
        volumes.append(window_hu(resample(hu, size)))
    x = torch.stack(volumes).unsqueeze(1)
    covid = torch.tensor([r[1] for r in rows], dtype=torch.int64)
    severe = torch.tensor([r[2] for r in rows], dtype=torch.int64)
    train, test = split_indices(len(rows), test_fraction, seed, strata)
    return ImageTasks(
        x[train],
        {"covid": covid[train], "severe": severe[train]},
        x[test],
        {"covid": covid[test], "severe": severe[test]},
        str(root),
    )
