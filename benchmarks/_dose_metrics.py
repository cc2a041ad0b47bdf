"""The OpenKBP dose-prediction metrics on 2D slices, and the masked loss that goes with them.

OpenKBP (Babier et al., "OpenKBP: The open-access knowledge-based planning
grand challenge", Med. Phys. 2021; reference code ``ababier/open-kbp``,
``provided_code/dose_evaluation_class.py``) ranks dose predictions by two scores,
both in Gy, lower is better:

- the **dose score**: per patient, the mean absolute difference between the
  predicted and the reference dose over the voxels of the *possible-dose mask*
  (where the plan can deposit dose), then the mean over patients;
- the **DVH score**: the mean absolute difference between the predicted and the
  reference value of a set of dose-volume-histogram points, over every
  (patient, structure, point) where the structure exists. Targets (PTVs):
  D99, D95 and D1 (``D_x`` is the dose the hottest ``x`` % of the structure
  receives at least: ``D_99`` is the 1st percentile of the structure's dose,
  ``D_1`` the 99th). Organs at risk: ``D_0.1_cc`` (the dose of the hottest
  0.1 cm³, a near-maximum) and the mean dose.

Here an image (one axial slice) plays the part of a patient, which changes two
things, both deliberate:

- the dose score averages per image, not per patient;
- an OAR's near-maximum is :data:`OAR_NEAR_MAX` = ``D_2`` (the dose of the hottest
  2 % of its pixels, ICRU report 83's near-maximum dose) instead of ``D_0.1_cc``:
  a slice has no volume, and 0.1 cm³ is a voxel count that only makes sense for a
  whole 3D structure. Percentiles interpolate linearly between order
  statistics, like ``numpy.percentile`` in the reference code.

The possible-dose mask travels inside the reference dose itself: the dose
targets of :mod:`benchmarks._dose` are ``NaN`` outside the mask (see its module
docstring), so every function here takes the mask to be ``isfinite(reference)``.
A NaN can never be mistaken for a dose, is moved, indexed and batched with the
target for free, and makes an unmasked loss fail loudly instead of silently
training on the air around the patient. The OpenKBP code sums the error over all
voxels but divides by the mask's size; that is the same number as the mean
inside the mask because predictions must be zero outside it (the challenge
zeroes them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import torch
from torch import Tensor

__all__ = [
    "OAR_NEAR_MAX",
    "TARGET_POINTS",
    "dose_score",
    "dvh_metrics",
    "dvh_score",
    "masked_l1",
    "possible_dose_mask",
]

TARGET_POINTS: Final[tuple[float, ...]] = (99.0, 95.0, 1.0)
"""DVH points of a target: ``D_99``, ``D_95``, ``D_1`` (percent of the target's pixels at or above the dose)."""

OAR_NEAR_MAX: Final[float] = 2.0
"""An OAR's near-maximum point, ``D_2`` (ICRU 83), in place of OpenKBP's ``D_0.1_cc`` on 2D slices."""


def _dose_maps(output: Tensor, name: str) -> Tensor:
    """``[N, H, W]`` from ``[N, H, W]`` or a one-channel network output ``[N, 1, H, W]``."""
    if output.ndim == 4 and output.shape[1] == 1:
        return output[:, 0]
    if output.ndim != 3:
        raise ValueError(f"{name} must be dose maps [N, H, W] or [N, 1, H, W], got shape {tuple(output.shape)}")
    return output


def _pair(predicted: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    predicted, reference = _dose_maps(predicted, "predicted"), _dose_maps(reference, "reference")
    if predicted.shape != reference.shape:
        raise ValueError(
            f"predicted {tuple(predicted.shape)} and reference {tuple(reference.shape)} must have the same shape"
        )
    return predicted, reference


def possible_dose_mask(reference: Tensor) -> Tensor:
    """The possible-dose mask of NaN-encoded reference doses: ``isfinite(reference)``, bool, same shape."""
    return torch.isfinite(reference)


def masked_l1(predicted: Tensor, reference: Tensor) -> Tensor:
    """Mean absolute error over the pixels where ``reference`` is finite: the training loss of the dose task.

    Args:
        predicted: ``[N, 1, H, W]`` network output or ``[N, H, W]``, Gy.
        reference: ``[N, H, W]`` dose, Gy, NaN outside the possible-dose mask.

    Returns:
        A differentiable scalar, pooled over every masked pixel of the batch
        (0 with a zero gradient when no pixel is masked in).

    Example:
        >>> reference = torch.tensor([[[1.0, float("nan")], [3.0, 5.0]]])
        >>> float(masked_l1(torch.tensor([[[2.0, 100.0], [3.0, 3.0]]]), reference))
        1.0
    """
    predicted, reference = _pair(predicted, reference)
    inside = possible_dose_mask(reference)
    difference = (predicted - torch.where(inside, reference, predicted)).abs()
    return difference.sum() / inside.sum().clamp_min(1)


def dose_score(predicted: Tensor, reference: Tensor) -> float:
    """OpenKBP's dose score on slices: per image the mean absolute error inside the mask, then the mean (Gy).

    Args:
        predicted: ``[N, 1, H, W]`` or ``[N, H, W]``, Gy.
        reference: ``[N, H, W]``, Gy, NaN outside the possible-dose mask.

    Images whose mask is empty are left out; NaN when every mask is empty.

    Example:
        >>> reference = torch.tensor([[[10.0, float("nan")]], [[0.0, 4.0]]])
        >>> dose_score(torch.tensor([[[12.0, 0.0]], [[1.0, 4.0]]]), reference)  # (2 + 0.5) / 2
        1.25
    """
    predicted, reference = _pair(predicted, reference)
    inside = possible_dose_mask(reference)
    error = torch.where(inside, (predicted.float() - reference.float()).abs(), 0.0).sum(dim=(1, 2))
    count = inside.sum(dim=(1, 2))
    kept = count > 0
    if not bool(kept.any()):
        return float("nan")
    return float((error[kept] / count[kept]).mean())


def _check_rois(rois: Mapping[str, Tensor], shape: torch.Size) -> None:
    for name, roi in rois.items():
        if roi.dtype != torch.bool or roi.shape != shape:
            raise ValueError(
                f"rois[{name!r}] must be a bool mask of shape {tuple(shape)}, got {roi.dtype} {tuple(roi.shape)}; "
                "build them with benchmarks._dose.roi_masks"
            )


def dvh_metrics(dose: Tensor, rois: Mapping[str, Tensor], inside: Tensor | None = None) -> dict[str, Tensor]:
    """The DVH points of every structure on every image.

    Args:
        dose: ``[N, 1, H, W]`` or ``[N, H, W]``, Gy.
        rois: ``{name: [N, H, W] bool}``; names starting with ``"PTV"`` are targets
            (:data:`TARGET_POINTS`), the others organs at risk (``D_2`` and mean).
        inside: optional ``[N, H, W]`` bool mask the structures are cut to (the
            possible-dose mask); ``None`` keeps them whole.

    Returns:
        ``{"<point> <name>": [N] float}`` with points ``D_99``, ``D_95``, ``D_1`` for
        targets and ``D_2``, ``mean`` for OARs; NaN where the structure has no pixel
        on the image.

    Example:
        >>> dose = torch.arange(5.0).mul(10).view(1, 1, 5)  # 0, 10, 20, 30, 40 Gy
        >>> points = dvh_metrics(dose, {"PTV70": torch.ones(1, 1, 5, dtype=torch.bool)})
        >>> [round(float(points[k][0]), 2) for k in ("D_99 PTV70", "D_95 PTV70", "D_1 PTV70")]
        [0.4, 2.0, 39.6]
    """
    dose = _dose_maps(dose, "dose").float()
    _check_rois(rois, dose.shape)
    if inside is not None:
        _check_rois({"inside": inside}, dose.shape)
    points: dict[str, Tensor] = {}
    for name, roi in rois.items():
        target = name.upper().startswith("PTV")
        # quantile q of the structure's doses is D_(100 - 100 q)
        quantiles = [1.0 - p / 100.0 for p in TARGET_POINTS] if target else [1.0 - OAR_NEAR_MAX / 100.0]
        labels = [f"D_{p:g} {name}" for p in TARGET_POINTS] if target else [f"D_{OAR_NEAR_MAX:g} {name}"]
        values = torch.full((dose.shape[0], len(quantiles) + (0 if target else 1)), float("nan"))
        region = roi if inside is None else roi & inside
        for i in range(dose.shape[0]):
            pixels = dose[i][region[i]]
            if pixels.numel() == 0:
                continue
            values[i, : len(quantiles)] = torch.quantile(pixels, torch.tensor(quantiles))
            if not target:
                values[i, -1] = pixels.mean()
        for column, label in enumerate(labels + ([] if target else [f"mean {name}"])):
            points[label] = values[:, column]
    return points


def dvh_score(predicted: Tensor, reference: Tensor, rois: Mapping[str, Tensor]) -> float:
    """OpenKBP's DVH score on slices: the mean absolute difference of every DVH point that exists (Gy).

    Both doses are read inside the reference's possible-dose mask (its finite
    pixels), so structures are cut to it.

    Args:
        predicted: ``[N, 1, H, W]`` or ``[N, H, W]``, Gy.
        reference: ``[N, H, W]``, Gy, NaN outside the possible-dose mask.
        rois: ``{name: [N, H, W] bool}`` as for :func:`dvh_metrics`.

    Returns:
        The mean over (image, structure, point) of ``|predicted - reference|``;
        NaN when no structure has a pixel inside the mask.

    Example:
        >>> reference = torch.tensor([[[70.0, 70.0, 20.0, float("nan")]]])
        >>> rois = {"PTV70": torch.tensor([[[True, True, False, False]]]),
        ...         "SpinalCord": torch.tensor([[[False, False, True, True]]])}
        >>> dvh_score(reference + 1.0, reference, rois)  # every point moves by 1 Gy
        1.0
    """
    predicted, reference = _pair(predicted, reference)
    inside = possible_dose_mask(reference)
    mine = dvh_metrics(predicted, rois, inside)
    theirs = dvh_metrics(torch.where(inside, reference, 0.0), rois, inside)
    differences = torch.cat([(mine[key] - theirs[key]).abs() for key in theirs]) if theirs else torch.zeros(0)
    kept = differences[torch.isfinite(differences)]
    return float(kept.mean()) if kept.numel() else float("nan")
