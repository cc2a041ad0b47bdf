"""Head-and-neck radiotherapy data for the OpenKBP-style benchmark: dose prediction + OAR segmentation.

OpenKBP (AAPM 2020 grand challenge; Babier et al., Med. Phys. 2021; data and
reference code in the ``ababier/open-kbp`` repository) gives, for 340
head-and-neck cancer patients, a CT, the contours of seven organs at risk
(OARs) and up to three planning target volumes (PTVs), a clinically acceptable
IMRT dose and the mask of the voxels that can receive dose. Two pixel-level
tasks share one 2D axial slice here:

- ``dose``: regression of the slice of the 3D dose distribution, in Gy. The
  target is float32 ``[N, H, W]`` and **NaN outside the possible-dose mask**
  (see "How the possible-dose mask travels" below).
- ``structures``: segmentation of the OARs, int64 ``[N, H, W]``: 0 background,
  then :data:`OARS` in OpenKBP's order (1 Brainstem, 2 SpinalCord,
  3 RightParotid, 4 LeftParotid, 5 Esophagus, 6 Larynx, 7 Mandible).

Inputs ``[N, 2, H, W]`` float32 (:data:`CHANNELS`):

0. ``ct``: the CT slice, CT numbers clipped to [0, :data:`CT_CLIP`] and divided
   by it (:func:`normalise_ct`), so air is 0, water about 0.5, bone up to 1;
1. ``ptv``: the targets with their prescriptions, ``Rx / 70`` inside each PTV
   (0.8 PTV56, 0.9 PTV63, 1.0 PTV70), 0 elsewhere (:func:`ptv_map`).

Why these inputs. The challenge feeds the network the CT *and every structure
mask*, but then the OARs would be an input rather than something to learn. A
planner is given the targets and the prescription (that is the planning
problem) and seeks the dose; contouring the OARs is the other half of the
work, done from the CT before planning. So the targets and their
prescriptions are inputs, the OARs are the second task, predicted from the CT.
The tasks are tied the way they are in a plan: the dose falls off from the
PTVs and is pulled down where an OAR is spared, so knowing where the OARs are
helps predicting the dose. The PTVs share one channel because OpenKBP's PTV
masks never overlap (its data description: "the provided PTV masks have no
overlap with each other"); where hand-made masks do, the higher prescription
wins.

Overlapping OAR masks (OpenKBP's OARs are contoured independently; the
mandible and a parotid, or the larynx and the esophagus, may share voxels)
get one label by :data:`OAR_PRIORITY`: the serial organs whose maximum dose
limits the plan first (spinal cord, brainstem), then the small midline organs
(esophagus, larynx), the parotids, and the large mandible last, so a small
structure is never swallowed by a large one.

How the possible-dose mask travels. It is needed by the metrics (the dose
score is a mean inside it) and by the loss, but it is neither an input nor a
task, and :class:`benchmarks._images.ImageTasks` holds inputs and task targets
only. The dose target is therefore NaN outside the mask and the Gy dose
inside. The mask then moves, is indexed (``select``), batched and sent to the
metrics with the target, by every code path, with no extra attribute and no
change to ``ImageTasks``; :func:`benchmarks._dose_metrics.possible_dose_mask`
reads it back as ``isfinite(target)``, :func:`benchmarks._dose_metrics.masked_l1`
is the loss that ignores it, and an unmasked loss returns NaN (loud) rather
than training on the air around the patient.

Sources:

- :func:`synthetic_openkbp` (:func:`synthetic_slices`): a documented generator,
  no download. Each slice is an axial cut through a random neck level
  ``z`` in [0, 1] (0 = skull base, 1 = lower neck), in the real data's
  orientation (anterior at the top, the patient's right on the image's left).
  Lengths are in units of half the frame's side (coordinates run from -1 to 1).

  * Anatomy (Hounsfield units, HU): an elliptical body (soft tissue +45 HU
    with smooth variation, a subcutaneous fat rim at -90 HU) in air
    (-1000 HU). Cranial levels (z < 0.3) show the brainstem (+35 HU, a CSF
    ring at +5 HU, occipital bone behind); caudal levels the spinal cord
    (+35 HU) in a CSF-filled canal inside a bony arch, behind the vertebral
    body. The parotids (-15 HU, fattier than muscle) sit laterally behind
    the jaw for z < 0.55, shrinking with z; the mandible is a U-shaped
    cortical-bone ring (+1100 HU) in front for 0.12 < z < 0.6; the larynx
    (cartilage ring +250 HU around an air lumen) is anterior midline for
    0.45 < z < 0.85, the trachea below it; the esophagus (+45 HU wall in a
    fat ring, sometimes air in its lumen) lies between the airway and the
    spine for z > 0.65. Each slice gets its own scale (0.9-1.1), shift,
    sizes, positions and 20 HU pixel noise. CT numbers are HU + 1024 (the
    12-bit convention), then :func:`normalise_ct` as for real data.
  * Targets: every slice has a PTV70 (gross disease, anterior or lateral,
    radius 0.1-0.2); a third of the slices also a PTV56
    (a larger elective region), a third a PTV56 and a PTV63 next to the
    PTV70, OpenKBP's three plan types. PTVs stay 0.1 away from the
    cord / brainstem and inside 0.9 of the body (OpenKBP clips PTVs 5 mm
    from the skin), and do not overlap (PTV70 over PTV63 over PTV56).
  * Dose (Gy): ``max_p Rx_p exp(-d_p / lambda)`` with ``d_p`` the distance to
    PTV ``p`` (0 inside) and a per-slice falloff ``lambda`` in [0.32, 0.4],
    or the low-dose bath of OpenKBP's nine coplanar beams (0°, 40°, ...,
    320°): nine bands through the PTV70 of 2.5-3.5 Gy each, whichever is
    larger; times a parotid sparing factor (a 30-50 % reduction over and
    around each parotid, faded out within 0.1 of any PTV); capped near the
    serial organs at ``45 Gy + 120 Gy * distance`` from the spinal cord
    (54 Gy for the brainstem), the usual planning constraints; times
    ``1 + 0.02 h`` with ``h`` smooth noise in [-1, 1] (plan heterogeneity);
    zero outside the body, which is the possible-dose mask (NaN in the
    target, as for real data). So the dose
    never exceeds 71.4 Gy, is highest in the PTV70 and is a function of the
    inputs plus the unobserved falloff and heterogeneity.

- :func:`benchmarks._openkbp_files.load_openkbp`: the real OpenKBP data in the
  challenge's layout (:data:`benchmarks._openkbp_files.LAYOUT`); see there for
  the file format and the slicing rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Final

import torch
from torch import Tensor

from benchmarks._images import ImageTasks, smooth_noise

__all__ = [
    "CHANNELS",
    "CT_CLIP",
    "OARS",
    "OAR_PRIORITY",
    "PRESCRIPTIONS",
    "STRUCTURE_CLASSES",
    "TARGETS",
    "TASKS",
    "normalise_ct",
    "oar_labels",
    "ptv_map",
    "roi_masks",
    "synthetic_openkbp",
    "synthetic_slices",
]

TASKS: Final[tuple[str, str]] = ("dose", "structures")
"""Task names in task order: dose regression first, OAR segmentation second."""

CHANNELS: Final[tuple[str, str]] = ("ct", "ptv")
"""Input channels: the normalised CT and the PTV prescription map (``Rx / 70``)."""

OARS: Final[tuple[str, ...]] = (
    "Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible"
)
"""OpenKBP's organs at risk in its order; ``structures`` class ``k`` is ``OARS[k - 1]`` (0 = background)."""

STRUCTURE_CLASSES: Final[int] = len(OARS) + 1
"""``structures`` classes: background and the seven OARs."""

OAR_PRIORITY: Final[tuple[str, ...]] = (
    "SpinalCord", "Brainstem", "Esophagus", "Larynx", "RightParotid", "LeftParotid", "Mandible"
)
"""Which OAR labels a pixel inside several OAR masks: the first one listed here (see the module docstring)."""

TARGETS: Final[tuple[str, str, str]] = ("PTV56", "PTV63", "PTV70")
"""OpenKBP's planning target volumes, by prescription."""

PRESCRIPTIONS: Final[Mapping[str, float]] = {"PTV56": 56.0, "PTV63": 63.0, "PTV70": 70.0}
"""Prescribed dose of each target, Gy (35 fractions)."""

CT_CLIP: Final[float] = 2048.0
"""CT numbers (HU + 1024, air 0) are clipped to [0, CT_CLIP] and divided by it: HU -1024..+1024 to [0, 1]."""

_PTV_SCALE: Final[float] = 70.0  # the ptv channel is Rx / 70
_MIN_SIZE: Final[int] = 32  # the spinal cord (radius 0.05 of the half-width) keeps about 2 pixels at 32


# ---------------------------------------------------------------------------
# Shared by both sources


def normalise_ct(ct_numbers: Tensor) -> Tensor:
    """CT numbers (HU + 1024; air 0, water about 1024) to [0, 1]: clipped to [0, :data:`CT_CLIP`] and scaled.

    Example:
        >>> normalise_ct(torch.tensor([0.0, 1024.0, 3000.0]))
        tensor([0.0000, 0.5000, 1.0000])
    """
    return ct_numbers.float().clamp(0.0, CT_CLIP) / CT_CLIP


def oar_labels(masks: Mapping[str, Tensor]) -> Tensor:
    """One ``structures`` label map from per-OAR bool masks, overlaps resolved by :data:`OAR_PRIORITY`.

    Args:
        masks: ``{OAR name: bool mask}``, all of one shape; absent OARs may be left out.

    Returns:
        int64 labels of that shape: 0 background, ``k`` for ``OARS[k - 1]``.

    Example:
        >>> cord = torch.tensor([True, True, False])
        >>> mandible = torch.tensor([False, True, True])
        >>> oar_labels({"Mandible": mandible, "SpinalCord": cord}).tolist()  # the cord wins the shared pixel
        [2, 2, 7]
    """
    values = {name: OARS.index(name) + 1 for name in reversed(OAR_PRIORITY)}  # highest priority painted last
    return _paint(masks, values, torch.int64, "OARs", OARS, " (an all-False mask for none)")


def ptv_map(masks: Mapping[str, Tensor]) -> Tensor:
    """The ``ptv`` input channel from per-target bool masks: ``Rx / 70`` inside, 0 outside (higher Rx wins).

    Example:
        >>> ptv_map({"PTV70": torch.tensor([True, False, False]), "PTV56": torch.tensor([True, True, False])})
        tensor([1.0000, 0.8000, 0.0000])
    """
    values = {name: PRESCRIPTIONS[name] / _PTV_SCALE for name in TARGETS}  # ascending: the higher painted last
    return _paint(masks, values, torch.float32, "targets", TARGETS)


def _paint(masks: Mapping[str, Tensor], values: Mapping[str, float], dtype: torch.dtype, what: str,
           known: Sequence[str], none_hint: str = "") -> Tensor:
    """A map of ``masks``' shape: 0, then each mask in ``values`` order painted with its value (a later mask
    wins a shared pixel); ``what`` and ``known`` name the structures in errors."""
    unknown = sorted(set(masks) - set(known))
    if unknown:
        raise ValueError(f"masks has unknown {what} {unknown}; the {what} are {list(known)}")
    if not masks:
        raise ValueError(f"masks is empty; give at least one {what[:-1]} mask{none_hint}")
    shape = next(iter(masks.values())).shape
    painted = torch.zeros(shape, dtype=dtype)
    for name, value in values.items():
        if name in masks:
            if masks[name].shape != shape:
                raise ValueError(f"masks[{name!r}] has shape {tuple(masks[name].shape)}, the others {tuple(shape)}")
            painted[masks[name].bool()] = value
    return painted


def roi_masks(inputs: Tensor, structures: Tensor) -> dict[str, Tensor]:
    """Every structure's mask, for the DVH score, from the inputs' ``ptv`` channel and the ``structures`` labels.

    Args:
        inputs: ``[N, 2, H, W]`` inputs (:data:`CHANNELS`).
        structures: ``[N, H, W]`` int64 labels (ground truth: the DVH score reads reference structures).

    Returns:
        ``{name: [N, H, W] bool}`` for the three targets and the seven OARs (all-False
        where absent), as :func:`benchmarks._dose_metrics.dvh_metrics` takes them.
    """
    if inputs.ndim != 4 or inputs.shape[1] != len(CHANNELS):
        raise ValueError(
            f"inputs must be [N, {len(CHANNELS)}, H, W] ({', '.join(CHANNELS)}), got {tuple(inputs.shape)}"
        )
    if structures.shape != inputs[:, 0].shape:
        raise ValueError(f"structures {tuple(structures.shape)} must be [N, H, W] like inputs {tuple(inputs.shape)}")
    ptv = inputs[:, 1]
    rois = {name: (ptv - PRESCRIPTIONS[name] / _PTV_SCALE).abs() < 0.02 for name in TARGETS}
    rois.update({name: structures == k for k, name in enumerate(OARS, start=1)})
    return rois


# ---------------------------------------------------------------------------
# Synthetic slices


def _distance(mask: Tensor) -> Tensor:
    """Exact Euclidean distance in pixels from every pixel to ``mask`` ``[n, H, W]`` (0 inside, inf if empty).

    Separable: the distance along each column to the mask, then per row the minimum over
    columns ``k`` of ``column_distance(k)^2 + (j - k)^2`` (brute force, in chunks of images).
    """
    n, height, width = mask.shape
    rows = torch.arange(height, dtype=torch.float32)
    cols = torch.arange(width, dtype=torch.float32)
    along_column = (rows.view(height, 1) - rows.view(1, height)).abs().view(1, height, height, 1)
    along_row = ((cols.view(width, 1) - cols.view(1, width)) ** 2).view(1, 1, width, width)
    chunk = max(1, 2**23 // (height * max(height, width) * width))
    parts: list[Tensor] = []
    for start in range(0, n, chunk):
        part = mask[start : start + chunk].unsqueeze(1)  # [c, 1, k, W]
        column = torch.where(part, along_column, math.inf).amin(dim=2)  # [c, H, W]
        parts.append((column.unsqueeze(2) ** 2 + along_row).amin(dim=3).sqrt())
    return torch.cat(parts)


def synthetic_slices(n: int, size: int = 64, *, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Generate ``n`` synthetic head-and-neck axial slices with a dose and OAR labels (see the module docstring).

    Args:
        n: number of slices.
        size: height and width in pixels, at least 32.
        seed: everything is drawn from one generator seeded with this.

    Returns:
        ``(inputs [n, 2, S, S] float32 in [0, 1], dose [n, S, S] float32 Gy, NaN outside
        the body, structures [n, S, S] int64 in 0..7)``.

    Example:
        >>> inputs, dose, structures = synthetic_slices(4, 32, seed=0)
        >>> inputs.shape, dose.shape, int(structures.max()) <= 7
        (torch.Size([4, 2, 32, 32]), torch.Size([4, 32, 32]), True)
    """
    if n < 1 or size < _MIN_SIZE:
        raise ValueError(f"need n >= 1 slices of size >= {_MIN_SIZE} pixels, got n={n}, size={size}")
    g = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float) -> Tensor:
        return (low + (high - low) * torch.rand(n, generator=g)).view(n, 1, 1)

    def chance(p: float) -> Tensor:
        return (torch.rand(n, generator=g) < p).view(n, 1, 1)

    coords = torch.linspace(-1.0, 1.0, size)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    scale = uniform(0.9, 1.1)
    x = (cols.expand(n, size, size) - uniform(-0.05, 0.05)) / scale  # patient right (image left) is x < 0
    y = (rows.expand(n, size, size) - uniform(-0.05, 0.05)) / scale  # anterior (image top) is y < 0
    level = uniform(0.0, 1.0)
    spacing = 2.0 / (size - 1) / scale  # [n, 1, 1] body-frame units per pixel

    def radius(cx: Tensor, cy: Tensor, rx: Tensor | float, ry: Tensor | float) -> Tensor:
        return (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2).sqrt()

    angle = torch.atan2(y, x)
    body_rx, body_ry = uniform(0.62, 0.78), uniform(0.52, 0.64)
    wobble = 1 + 0.04 * torch.cos(2 * angle + uniform(0, 2 * math.pi)) + 0.03 * torch.cos(3 * angle + uniform(0, 6.3))
    body_radius = radius(torch.zeros(()), uniform(-0.02, 0.06), body_rx, body_ry) / wobble
    body = body_radius <= 1.0

    cranial = level < 0.3
    cord_x, cord_y = uniform(-0.02, 0.02), uniform(0.36, 0.42)
    cord_r = uniform(0.045, 0.055)
    cord_radius = radius(cord_x, cord_y, cord_r, cord_r)
    stem_rx, stem_ry = uniform(0.09, 0.11), uniform(0.075, 0.09)
    stem_radius = radius(cord_x, cord_y - 0.08, stem_rx, stem_ry)
    taper = 1.0 - 0.5 * (level / 0.55).clamp(max=1.0) ** 2
    parotid_x, parotid_y = uniform(0.43, 0.5) * body_rx / 0.7, uniform(0.1, 0.18)
    parotid_rx, parotid_ry = uniform(0.1, 0.13) * taper, uniform(0.13, 0.17) * taper
    right_radius = radius(-parotid_x + uniform(-0.02, 0.02), parotid_y, parotid_rx, parotid_ry)
    left_radius = radius(parotid_x + uniform(-0.02, 0.02), parotid_y, parotid_rx, parotid_ry)
    jaw_radius = radius(torch.zeros(()), uniform(-0.02, 0.04), uniform(0.4, 0.46), uniform(0.42, 0.5))
    larynx_rx, larynx_ry = uniform(0.11, 0.13), uniform(0.09, 0.11)
    larynx_radius = radius(uniform(-0.02, 0.02), uniform(-0.34, -0.26), larynx_rx, larynx_ry)
    gullet_r = uniform(0.045, 0.06)
    gullet_radius = radius(uniform(-0.03, 0.03), uniform(0.0, 0.06), gullet_r, gullet_r)

    oars = {
        "SpinalCord": ~cranial & (cord_radius <= 1.0),
        "Brainstem": cranial & (stem_radius <= 1.0),
        "RightParotid": (level < 0.55) & (right_radius <= 1.0),
        "LeftParotid": (level < 0.55) & (left_radius <= 1.0),
        "Mandible": (level > 0.12) & (level < 0.6) & (jaw_radius > 0.86) & (jaw_radius <= 1.0) & (y < 0.05),
        "Larynx": (level > 0.45) & (level < 0.85) & (larynx_radius <= 1.0),
        "Esophagus": (level > 0.65) & (gullet_radius <= 1.0),
    }
    oars = {name: mask & body for name, mask in oars.items()}

    # CT in HU: tissue by tissue, the OARs in reverse label priority so that each pixel shows its label's tissue
    hu = torch.full((n, size, size), 45.0) + 15.0 * smooth_noise(n, size, 5, g)[:, 0]
    hu = torch.where(body_radius > 0.9, -90.0, hu)
    spine = ~cranial
    vertebra = radius(cord_x, cord_y - 0.2, 0.1, 0.1)
    hu = torch.where(spine & (vertebra <= 1.0), torch.where(vertebra > 0.85, 1000.0, 500.0), hu)  # cortex, marrow
    arch = radius(cord_x, cord_y, 0.095, 0.095)
    hu = torch.where(spine & (arch <= 1.0), 900.0, hu)
    hu = torch.where(spine & (cord_radius <= 1.35), 10.0, hu)  # CSF in the canal
    skull = radius(cord_x, cord_y - 0.08, stem_rx * 1.7, stem_ry * 1.7)
    hu = torch.where(cranial & (skull <= 1.0) & (skull > 0.78) & (y > cord_y - 0.08), 1000.0, hu)  # occipital bone
    hu = torch.where(cranial & (stem_radius <= 1.3), 5.0, hu)  # CSF around the brainstem
    trachea = radius(uniform(-0.02, 0.02), uniform(-0.32, -0.26), 0.075, 0.065)
    below = level >= 0.85
    hu = torch.where(below & (trachea <= 1.0), 250.0, hu)
    hu = torch.where(below & (trachea <= 0.75), -950.0, hu)
    hu = torch.where((level > 0.65) & (gullet_radius > 1.0) & (gullet_radius <= 1.4), -80.0, hu)  # fat plane
    tissue = {
        "Mandible": torch.tensor(1100.0),
        "LeftParotid": torch.tensor(-15.0),
        "RightParotid": torch.tensor(-15.0),
        "Larynx": torch.where(larynx_radius > 0.75, 250.0, torch.where(larynx_radius > 0.45, 40.0, -900.0)),
        "Esophagus": torch.where(chance(0.5) & (gullet_radius < 0.3), -600.0, 45.0),
        "Brainstem": torch.tensor(35.0),
        "SpinalCord": torch.tensor(35.0),
    }
    for name in reversed(OAR_PRIORITY):
        hu = torch.where(oars[name], tissue[name], hu)
    hu = hu + 20.0 * torch.randn(hu.shape, generator=g)
    hu = torch.where(body, hu, -1000.0 + 10.0 * torch.randn(hu.shape, generator=g))
    ct = normalise_ct(hu + 1024.0)

    # targets: PTV70 always, PTV56 on two thirds, PTV63 on one third; cropped from the skin and the cord
    plan = torch.randint(0, 3, (n, 1, 1), generator=g)
    serial = torch.where(cranial, stem_radius, cord_radius)
    serial_r = torch.where(cranial, (stem_rx + stem_ry) / 2, cord_r)
    serial_distance = ((serial - 1.0) * serial_r).clamp_min(0.0)
    allowed = (body_radius <= 0.9) & (serial_distance > 0.1)

    def blob(cx: Tensor, cy: Tensor, r: Tensor) -> Tensor:
        shape = 1 + 0.12 * torch.cos(2 * angle + uniform(0, 6.3)) + 0.08 * torch.cos(3 * angle + uniform(0, 6.3))
        return (radius(cx, cy, r * uniform(0.85, 1.15), r * uniform(0.85, 1.15)) / shape <= 1.0) & allowed

    c70x, c70y, r70 = uniform(-0.35, 0.35), uniform(-0.3, 0.05), uniform(0.1, 0.2)
    ptv70 = blob(c70x, c70y, r70)
    direction = uniform(0, 2 * math.pi)
    reach = r70 + uniform(0.05, 0.12)
    ptv63 = blob(c70x + reach * torch.cos(direction), c70y + reach * torch.sin(direction), uniform(0.08, 0.14))
    ptv63 = ptv63 & (plan == 2) & ~ptv70
    ptv56 = blob(uniform(-0.3, 0.3), uniform(-0.2, 0.1), uniform(0.22, 0.32)) & (plan >= 1) & ~ptv70 & ~ptv63
    ptvs = {"PTV56": ptv56, "PTV63": ptv63, "PTV70": ptv70}

    # dose: falloff from each PTV or the nine-beam bath, parotid sparing, serial-organ caps, heterogeneity
    falloff = uniform(0.32, 0.4)
    distances = {name: _distance(mask) * spacing for name, mask in ptvs.items()}
    dose = torch.stack([PRESCRIPTIONS[name] * torch.exp(-distances[name] / falloff) for name in TARGETS]).amax(0)
    area = ptv70.sum(dim=(1, 2)).float().clamp_min(1).view(n, 1, 1)
    cx70 = (x * ptv70).sum(dim=(1, 2)).view(n, 1, 1) / area
    cy70 = (y * ptv70).sum(dim=(1, 2)).view(n, 1, 1) / area
    half_width = (area / math.pi).sqrt() * spacing + 0.03
    bath = torch.zeros(n, size, size)
    for beam in range(9):
        theta = math.radians(40.0 * beam)
        across = (-(x - cx70) * math.sin(theta) + (y - cy70) * math.cos(theta)).abs()
        bath = bath + uniform(2.5, 3.5) * torch.sigmoid((half_width - across) / 0.02)
    dose = torch.maximum(dose, bath)
    near_target = torch.stack(list(distances.values())).amin(0)
    fade = (near_target / 0.1).clamp(0.0, 1.0)
    for name, r in (("RightParotid", right_radius), ("LeftParotid", left_radius)):
        bump = torch.sigmoid((1.0 - r) / 0.25) * (level < 0.55)
        dose = dose * (1.0 - uniform(0.3, 0.5) * bump * fade)
    cap = torch.where(cranial, 54.0, 45.0) + 120.0 * serial_distance
    dose = torch.minimum(dose, cap)
    dose = dose * (1.0 + 0.02 * smooth_noise(n, size, 5, g)[:, 0].clamp(-1.0, 1.0))
    dose = torch.where(body, dose.clamp_min(0.0), math.nan)

    inputs = torch.stack((ct, ptv_map(ptvs)), dim=1)
    return inputs, dose.float(), oar_labels(oars)


def synthetic_openkbp(train: int, test: int, size: int, *, seed: int) -> ImageTasks:
    """Synthetic train and test splits of :func:`synthetic_slices`, drawn from ``seed``.

    Example:
        >>> data = synthetic_openkbp(6, 2, 32, seed=0)
        >>> data.train_x.shape, data.test_y["dose"].shape, data.train_y["structures"].dtype
        (torch.Size([6, 2, 32, 32]), torch.Size([2, 32, 32]), torch.int64)
    """
    x_train, d_train, s_train = synthetic_slices(train, size, seed=2 * seed)
    x_test, d_test, s_test = synthetic_slices(test, size, seed=2 * seed + 1)
    return ImageTasks(
        x_train, {"dose": d_train, "structures": s_train}, x_test, {"dose": d_test, "structures": s_test}, "synthetic"
    )
