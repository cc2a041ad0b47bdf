"""OpenKBP-style benchmark: radiotherapy dose prediction + organ-at-risk segmentation on one CT slice.

This is the CTAN paper's pixel-level scenario (Kim et al., MICCAI 2023
workshops: dose prediction on OpenKBP, Babier et al., Med. Phys. 2021) with
every method of :mod:`benchmarks._learners`: independent (STL), joint (HPS),
MTAN, CTAN, the gradient methods and MT-COOL's variants on the Joint network
and on MTAN / CTAN.

Tasks, on one 2D axial head-and-neck slice (data: :mod:`benchmarks._dose`):

- ``dose`` (:class:`architectures.PixelTask` with 1 map): the dose of the
  plan in Gy at every pixel, a regression; the target is NaN outside the
  possible-dose mask (the pixels the plan can reach).
- ``structures`` (``PixelTask(8)``): segmentation of the seven OpenKBP
  organs at risk (OARs) and the background.

Why OAR segmentation is the second task (issue 12 asks for a second
pixel-level task a planner would pair with the dose, stated and justified).
A planner gets the CT and the targets with their prescriptions, and two
things must come from them: the contours of the organs to spare, drawn on
the CT before planning, and the dose. The two are tied the way they are in a
plan: the dose falls off from the targets and is pulled down where an OAR
is spared (the parotids, the spinal cord's and brainstem's caps), so where
the OARs are is evidence for the dose, and the dose's cold spots are
evidence for the OARs. OpenKBP itself feeds the OAR masks to the network
as inputs; here they are the task instead (:mod:`benchmarks._dose`,
"Why these inputs"), so the inputs ``[N, 2, H, W]`` are the CT and the PTV
prescription map ``Rx / 70`` (:data:`benchmarks._dose.CHANNELS`).

Networks (:mod:`architectures`), all from one :class:`architectures.Backbone`
(built-in encoder, :data:`WIDTHS` channels per stage, no pretrained weights),
so the methods differ only in how the tasks share and how they are updated:
``joint`` (HPS: one encoder, a UNet decoder per task), ``independent`` (STL:
one such network per task), ``mtan`` and ``ctan``; the gradient methods and
MT-COOL's Joint variants train the Joint network (MT-COOL channel-splits its
encoder), ``mtan_mt_cool`` and ``ctan_*`` the network of their prefix.

Losses (summed with weight 1 by the multi-task methods):

- ``dose``: :func:`dose_loss`, the mean absolute error inside the
  possible-dose mask (:func:`benchmarks._dose_metrics.masked_l1`, the error
  OpenKBP's dose score measures) in units of the 70 Gy prescription. This
  project's choices: the network predicts the dose in those units (Gy /
  :data:`DOSE_SCALE`, the unit of the PTV input channel), since its last layer
  is a 1x1 convolution of batch-normalised features whose output starts at a
  scale of about 1; a target in Gy (0-70) first needs that layer's weights to
  grow some 70-fold, which took most of a short CPU run in trials, while in
  prescription units the target is O(1) from the first step. The loss is in
  the same units, not in Gy: with equal task weights, an error in Gy would
  send the dose 70 times the gradient into the parameters the tasks share and
  starve the OAR task. In calibration runs (2 seeds of 7 epochs, the defaults
  otherwise) the Gy loss cost HPS 4, CTAN 12 and ``mt_cool_clean`` 4 points of
  OAR Dice, while the dose scores moved by 0.16 Gy or less; the independent
  networks, which share nothing, train alike either way (Adam is invariant to
  a loss's scale).
- ``structures``: cross-entropy plus soft Dice (:func:`benchmarks._unet.dice_ce`),
  which keeps the small OARs (the cord is a pixel or two at 32 pixels) from
  drowning in the background.

Metrics (test split, after the last epoch; no model selection):

- dose score (Gy, lower is better): :func:`benchmarks._dose_metrics.dose_score`,
  per slice the mean absolute error inside the possible-dose mask, averaged;
- DVH score (Gy, lower is better): :func:`benchmarks._dose_metrics.dvh_score`,
  the mean absolute error of the dose-volume-histogram points of the three
  PTVs (D99, D95, D1) and the OARs (D2 on a slice instead of D0.1cc, and the
  mean), over the reference structures (:func:`benchmarks._dose.roi_masks`);
- mean OAR Dice (%): per slice and OAR, :func:`benchmarks._metrics.dice_iou`
  of the argmax prediction (an OAR absent from both the slice and the
  prediction scores 1), averaged over the seven OARs and the slices.

The DVH score needs the PTV masks, which are an input, not a target:
:func:`evaluate` sees targets only, so the test targets carry one entry that
is not a task, :data:`PTV_KEY` (the PTV channel of the test inputs), which no
loss reads.

Data: by default the documented synthetic head-and-neck generator
:func:`benchmarks._dose.synthetic_openkbp` (no download; each seed draws its
own slices); ``--data-dir`` reads the real OpenKBP challenge data
(:data:`benchmarks._openkbp_files.LAYOUT`; 8 slices with a PTV per patient, cropped
around the body, split by patient with the seed).

Run size (this project's choice, timed with one thread): a default run trains
16 methods on 2 seeds for 9 epochs of 128 slices of 32 x 32 pixels (288 steps
of batch 4 per run, Adam at 5e-3 with a cosine decay), 10.5 minutes on one
idle core. The OAR task is the slow one: at about the cost of 7 such epochs,
the 3 seeds of 4 epochs of 48-pixel slices at 2e-3 first tried left HPS and
``mt_cool_clean`` at the all-background level of OAR Dice (51-55 % on these
test sets, see the notes) and STL and CTAN at 58-59 %, against 61-69 % for
STL, HPS and CTAN with the defaults. At 32 pixels (about 1.7 times cheaper
per step) the longer runs learn the mandible and the parotids (the larynx
now and then); the brainstem, the cord and the esophagus (a few pixels
each) are not learned by any network in this budget. So the budget goes to
steps per run rather than to a third seed: the spread over 2 seeds is a
rough one.

Run ``python -m benchmarks.openkbp --help``. Outputs in ``--out-dir``:
``openkbp.json`` (configuration, seeds, per-seed metrics, curves),
``openkbp.png`` (bar charts), ``openkbp_curves.png`` and ``openkbp_samples.png``
(the first test slices: the CT, the ground truth and every method's dose and OARs).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

import architectures
from architectures import Backbone, PixelTask, TaskSpec
from benchmarks import _scenario, _unet
from benchmarks._dose import CHANNELS, OARS, STRUCTURE_CLASSES, TASKS, roi_masks, synthetic_openkbp
from benchmarks._dose_metrics import OAR_NEAR_MAX, dose_score, dvh_score, masked_l1
from benchmarks._images import ImageTasks
from benchmarks._learners import Problem
from benchmarks._metrics import dice_iou
from benchmarks._openkbp_files import LAYOUT, load_openkbp
from benchmarks._scenario import Metric, Scenario, ScenarioConfig, SeedData

__all__ = ["DOSE_SCALE", "PTV_KEY", "SCENARIO", "WIDTHS", "dose_loss", "evaluate", "main", "problem",
           "sample_score", "validation"]

DOSE_SCALE: Final[float] = 70.0
"""Gy per unit of the ``dose`` output: the network predicts the dose as a fraction of the 70 Gy prescription."""

WIDTHS: Final[tuple[int, ...]] = (16, 32, 64, 128)
"""Channels of the four encoder stages of every network (stage ``s`` at ``1 / 2**s`` of the slice)."""

PTV_KEY: Final[str] = "ptv"
"""The test-target entry that is not a task: the PTV channel ``Rx / 70`` of the test inputs ``[M, H, W]``,
from which :func:`evaluate` rebuilds the target masks of the DVH score."""

_METRICS: Final[tuple[Metric, ...]] = (
    Metric("dose_score", "Dose score (Gy)", percent=False, higher_is_better=False),
    Metric("dvh_score", "DVH score (Gy)", percent=False, higher_is_better=False),
    Metric("oar_dice", "OAR Dice (%)"),
)


def _specs() -> dict[str, TaskSpec]:
    return {"dose": PixelTask(1), "structures": PixelTask(STRUCTURE_CLASSES)}


def _backbone() -> Backbone:
    return Backbone(dims=2, in_channels=len(CHANNELS), widths=WIDTHS)


def _joint() -> nn.Module:
    return architectures.joint(_specs(), _backbone())


def _independent(task: str) -> nn.Module:
    specs = _specs()
    if task not in specs:
        raise ValueError(f"task={task!r} is not one of {TASKS}")
    return architectures.independent(task, specs[task], _backbone())


def _mtan() -> nn.Module:
    return architectures.mtan(_specs(), _backbone())


def _ctan() -> nn.Module:
    return architectures.ctan(_specs(), _backbone())


def dose_loss(output: Tensor, target: Tensor) -> Tensor:
    """The ``dose`` loss: mean absolute error inside the possible-dose mask, in units of :data:`DOSE_SCALE` Gy.

    Args:
        output: ``[N, 1, H, W]`` network output, in units of :data:`DOSE_SCALE` Gy.
        target: ``[N, H, W]`` dose in Gy, NaN outside the possible-dose mask.

    Returns:
        The masked mean absolute error in Gy divided by :data:`DOSE_SCALE` (differentiable scalar).

    Example:
        >>> target = torch.tensor([[[70.0, float("nan")]]])
        >>> float(dose_loss(torch.tensor([[[[0.5, 9.0]]]]), target))  # 35 Gy off 70 Gy: half the prescription
        0.5
    """
    return masked_l1(DOSE_SCALE * output, target) / DOSE_SCALE


def problem(config: ScenarioConfig | None = None, data: SeedData | None = None) -> Problem:
    """The OpenKBP networks and losses (the same for every configuration)."""
    return Problem(
        tasks=TASKS,
        multi_task=_joint,
        single_task=_independent,
        losses={"dose": dose_loss, "structures": _unet.dice_ce("multiclass")},
        networks={"mtan": _mtan, "ctan": _ctan},
    )


def _with_ptv(data: ImageTasks) -> ImageTasks:
    """``data`` with :data:`PTV_KEY` added to the test targets."""
    test_y = {**data.test_y, PTV_KEY: data.test_x[:, CHANNELS.index("ptv")].clone()}
    return ImageTasks(data.train_x, data.train_y, data.test_x, test_y, data.source)


def _slices(config: ScenarioConfig, seed: int) -> ImageTasks:
    if config.data_dir is None:
        return synthetic_openkbp(config.train_size or 1, config.test_size or 1, config.side, seed=seed)
    data = load_openkbp(config.data_dir, config.side, test_fraction=config.test_fraction, seed=seed)
    return data.capped(config.train_size, config.test_size)


def _load(config: ScenarioConfig, seed: int) -> ImageTasks:
    return _with_ptv(_slices(config, seed))


def validation(config: ScenarioConfig, seed: int) -> ImageTasks:
    """A quarter of the seed's training slices held out (``ImageTasks.validation_split``), the PTV map
    added to them for the DVH score; the test slices are never read (``python -m benchmarks.sweep``)."""
    return _with_ptv(_slices(config, seed).validation_split(0.25, seed))


def _oar_dice(predicted: Tensor, labels: Tensor) -> Tensor:
    """Per slice and OAR, the Dice of ``predicted`` against ``labels`` (both ``[N, H, W]`` int64): ``[N, 7]``."""
    return torch.stack([dice_iou(predicted == k, labels == k)[0] for k in range(1, len(OARS) + 1)], dim=1)


def sample_score(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Tensor:
    """Per test slice, the mean OAR Dice (the samples figure's quartiles)."""
    return _oar_dice(outputs["structures"].argmax(dim=1), targets["structures"]).mean(dim=1)


def evaluate(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, float]:
    """OpenKBP metrics on slices: dose score and DVH score (Gy), mean OAR Dice (fraction).

    Args:
        outputs: ``dose`` ``[N, 1, H, W]`` in units of :data:`DOSE_SCALE` Gy and ``structures``
            logits ``[N, 8, H, W]``.
        targets: ``dose`` ``[N, H, W]`` Gy (NaN outside the possible-dose mask), ``structures``
            labels ``[N, H, W]`` (0 background, ``k`` the OAR ``OARS[k - 1]``) and :data:`PTV_KEY`
            ``[N, H, W]`` (``Rx / 70`` inside each PTV, 0 elsewhere).

    Returns:
        ``dose_score`` and ``dvh_score`` in Gy (lower is better) and ``oar_dice`` in [0, 1].

    Raises:
        ValueError: when ``targets`` lacks :data:`PTV_KEY` (the scenario's loader adds it).
    """
    if PTV_KEY not in targets:
        raise ValueError(
            f"targets has no {PTV_KEY!r} entry (keys {sorted(targets)}); the DVH score needs the PTV masks: give "
            f"the test inputs' PTV channel as targets[{PTV_KEY!r}] (benchmarks.openkbp's loader adds it to test_y, "
            "and the driver must pass every test_y entry to evaluate)"
        )
    dose = DOSE_SCALE * outputs["dose"]
    reference = targets["dose"]
    labels = targets["structures"]
    ptv = targets[PTV_KEY]
    # roi_masks reads the PTV levels from channel 1 of the inputs; channel 0 (the CT) is not read
    rois = roi_masks(torch.stack((torch.zeros_like(ptv), ptv), dim=1), labels)
    dice = _oar_dice(outputs["structures"].argmax(dim=1), labels)
    return {
        "dose_score": dose_score(dose, reference),
        "dvh_score": dvh_score(dose, reference, rois),
        "oar_dice": float(dice.mean()),
    }


# Background black, then Brainstem, SpinalCord, RightParotid, LeftParotid, Esophagus, Larynx, Mandible.
_PALETTE: Final[npt.NDArray[np.float32]] = np.array(
    [
        [0.0, 0.0, 0.0],
        [0.6, 0.3, 0.9],
        [1.0, 0.2, 0.2],
        [0.2, 0.8, 0.3],
        [0.1, 0.6, 1.0],
        [1.0, 0.6, 0.1],
        [1.0, 0.95, 0.3],
        [0.9, 0.9, 0.9],
    ],
    dtype=np.float32,
)


def _draw(task: str, value: Tensor) -> npt.NDArray[np.float32]:
    """The dose on a 0-72 Gy colour scale (black outside the possible-dose mask), the OARs in colour."""
    if task == "dose":
        from matplotlib import colormaps

        gy = value if value.ndim == 2 else DOSE_SCALE * value[0]  # a target [H, W] or an output [1, H, W]
        fraction = (gy.float() / 72.0).clamp(0.0, 1.0)
        colours: npt.NDArray[np.float32] = colormaps["inferno"](fraction.numpy())[..., :3].astype(np.float32)
        colours[~np.isfinite(gy.numpy())] = 0.0
        return colours
    classes = value.argmax(dim=0) if value.ndim == 3 else value
    labelled: npt.NDArray[np.float32] = _PALETTE[classes.clamp(0, len(OARS)).numpy()]
    return labelled


def _background_note(config: ScenarioConfig) -> str:
    """The all-background OAR Dice of the synthetic test sets, the floor a segmentation must beat."""
    if config.data_dir is not None:
        return ""
    levels = [
        float(_oar_dice(torch.zeros_like(labels), labels).mean())
        for labels in (synthetic_openkbp(1, config.test_size or 1, config.side, seed=s).test_y["structures"]
                       for s in config.seeds)
    ]
    return f": {100 * sum(levels) / len(levels):.1f} % on these test sets (mean over seeds)"


def _notes(config: ScenarioConfig) -> list[str]:
    notes = [
        "Metrics on the test split after the last epoch (no model selection); mean and sample standard deviation "
        "over seeds. An image (one axial slice) plays the part of a patient: the dose score is the per-slice mean "
        "absolute dose error inside the possible-dose mask, averaged; the DVH score the mean absolute error of "
        f"the PTVs' D99, D95, D1 and the OARs' D{OAR_NEAR_MAX:g} (in place of D0.1cc) and mean dose "
        "(benchmarks/_dose_metrics.py). Both in Gy, lower is better.",
        "OAR Dice: per slice and OAR, argmax prediction against the labels; an OAR absent from both scores 1 "
        "(benchmarks/_metrics.py), so a slice's absent organs count as found and a network that predicts only "
        "background scores the share of absent (slice, OAR) pairs" + _background_note(config) + ".",
        f"Every method uses the same built-in encoder (widths {list(WIDTHS)}, no pretrained weights) with UNet "
        "decoders; joint = HPS, independent = STL (one network per task), mtan, ctan (one stream per task with "
        "cross-task attention). params_ratio is relative to joint. The dose output and its loss (the masked L1 "
        f"error) are in units of {DOSE_SCALE:g} Gy, the prescription; structures: cross-entropy + Dice.",
        f"MT-COOL warm-up lasts warmup_epochs = {config.warmup_epochs} epoch(s), counted inside epochs.",
    ]
    if config.data_dir is None:
        notes.append(
            "Synthetic data (benchmarks/_dose.py): each seed draws its own train and test slices of a "
            "head-and-neck phantom with a PTV70 on every slice, PTV56 / PTV63 on two thirds, a dose falling "
            "off from the PTVs with parotid sparing and serial-organ caps."
        )
    if config.samples == 1:
        notes.append(
            "With samples = 1 the paper's consistency term is identically zero, so mt_cool trains like "
            "without_reg; mt_cool_clean keeps the term active (docs/method.md, 'The M = 1 gap')."
        )
    return notes


SCENARIO: Final[Scenario] = Scenario(
    name="openkbp",
    title="OpenKBP-style dose prediction + OAR segmentation (CTAN paper)",
    description="Radiotherapy dose prediction (Gy per pixel) and organ-at-risk segmentation on one head-and-neck "
    "CT slice with the CT and the PTV prescription map as inputs: STL, HPS, MTAN, CTAN, the gradient methods and "
    "MT-COOL on the HPS, MTAN and CTAN networks. Synthetic slices by default; --data-dir for the real OpenKBP data.",
    tasks=TASKS,
    pixel_tasks=TASKS,
    sample_score=sample_score,
    validation=validation,
    networks=("mtan", "ctan"),
    metrics=_METRICS,
    curve_metric={"dose": "dose_score", "structures": "oar_dice"},
    defaults={
        "seeds": 2, "epochs": 9, "train_size": 128, "test_size": 48, "image_size": 32, "warmup_epochs": 1,
        "batch_size": 4, "optimizer": "adam", "lr": 5e-3, "schedule": "cosine",
    },
    quick={"seeds": 1, "epochs": 2, "train_size": 16, "test_size": 8, "image_size": 32, "warmup_epochs": 1},
    problem=problem,
    load=_load,
    evaluate=evaluate,
    draw=_draw,
    layout=LAYOUT,
    notes=_notes,
    default_data="synthetic head-and-neck slices (benchmarks/_dose.py)",
    image_multiple=2 ** (len(WIDTHS) - 1),
)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the OpenKBP benchmark; print the table, write JSON and figures, return the results.

    Example:
        >>> results = main(["--quick", "--out-dir", "/tmp/openkbp"])  # doctest: +SKIP
    """
    return _scenario.main(SCENARIO, argv)


if __name__ == "__main__":
    sys.exit(_scenario.cli(SCENARIO))
