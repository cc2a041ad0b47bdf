"""HAM10000-style benchmark: skin-lesion segmentation + 7-class diagnosis on one dermoscopic image.

This is the CTAN paper's (Kim, Purdie, McIntosh, MICCAI 2023 workshops)
pixel-level + image-level pair on HAM10000, run with every method of
:mod:`benchmarks._learners` that a scenario with MTAN and CTAN networks offers:
independent (STL), joint (HPS), mtan, ctan, the gradient methods (PCGrad,
MGDA, CAGrad, GradDrop) on the Joint network, and MT-COOL's variants on the
Joint network and on MTAN / CTAN.

Tasks (:data:`benchmarks._skin.TASKS`):

- ``lesion``: binary segmentation, 1 = lesion (:class:`architectures.PixelTask` ``(1)``, one logit per pixel);
- ``diagnosis``: :data:`benchmarks._skin.DIAGNOSES`, HAM10000's seven classes
  (:class:`architectures.ImageTask` ``(7)``).

Networks (:mod:`architectures`), all on ONE :class:`architectures.Backbone`:
the built-in 2D encoder on 3-channel images with stage widths :data:`WIDTHS`
(no pretrained weights), so the methods differ only in how the tasks share it
and in the update rule:

- joint (HPS, and the gradient methods and MT-COOL on it): ``architectures.joint``,
  one encoder, a UNet decoder for ``lesion``, a pooled linear classifier for ``diagnosis``;
  MT-COOL splits the encoder's channels between the two tasks;
- independent (STL): ``architectures.independent``, the same encoder and head, one network per task;
- mtan: ``architectures.mtan`` (Liu et al. 2019), a shared encoder/decoder with per-task attention;
- ctan: ``architectures.ctan``, this project's reconstruction of CTAN (``docs/architectures.md``):
  one stream per task with cross-task attention in the encoder (CTAE) and at the bottleneck (CTAB);
  MT-COOL on it owns each task's stream, which the other task reads through the attention.

Losses: ``lesion``: binary cross-entropy plus soft Dice (:func:`benchmarks._unet.dice_ce` ``("binary")``).
``diagnosis``: class-weighted cross-entropy (:func:`class_weights`): about two thirds of HAM10000 is
``nv``, and answering "always nv" scores accuracy 0.67 but balanced accuracy 0.14. The
weights are the inverse class frequencies of the seed's training split, normalised so that the mean
weight over the training images is 1 (``N / (K n_c)``, scikit-learn's ``"balanced"``, K the classes
present); this project's choice, so that the loss does not reward "always nv" and balanced accuracy is
meaningful.

Metrics (on the test split after the last epoch, fractions in [0, 1]):

- Dice and IoU of the lesion (logit > 0), per image and averaged (:func:`benchmarks._metrics.dice_iou`);
- accuracy of the diagnosis (argmax);
- balanced accuracy: the mean per-class recall (torchmetrics ``multiclass_recall``) and macro AUROC
  (torchmetrics ``multiclass_auroc``, one-vs-rest), each averaged over the classes PRESENT in the test
  split. torchmetrics' ``average="macro"`` counts a class without test images as recall 0 and AUROC 0;
  this project leaves it out instead (scikit-learn's ``balanced_accuracy_score`` rule), which only
  matters for tiny test sets: the default one holds every class. Macro AUROC is NaN with fewer than
  two classes present.

Data: by default the documented synthetic generator of :mod:`benchmarks._skin`
(:func:`benchmarks._skin.synthetic_ham10000`: HAM10000's class shares, no download; each seed draws
its own images); ``--data-dir`` reads the real HAM10000 release with Tschandl et al.'s lesion masks
(layout :data:`benchmarks._skin.LAYOUT`; split over lesions, stratified by diagnosis, seeded).

Run ``python -m benchmarks.ham10000 --help``. Outputs in ``--out-dir``: ``ham10000.json``
(configuration, seeds, per-seed metrics, curves, Δm), ``ham10000.png`` (bar charts),
``ham10000_curves.png`` and ``ham10000_samples.png`` (lesion masks and diagnoses per method).
"""

from __future__ import annotations

import math
import warnings
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import architectures
from architectures import Backbone, ImageTask, PixelTask, TaskSpec
from benchmarks import _scenario, _unet
from benchmarks._images import ImageTasks
from benchmarks._learners import LossFn, Problem
from benchmarks._metrics import dice_iou
from benchmarks._scenario import Metric, Scenario, ScenarioConfig, SeedData
from benchmarks._stats import TABLE_RESAMPLES, Interval, auroc_ci
from benchmarks._skin import DIAGNOSES, HAM10000_COUNTS, LAYOUT, TASKS, load_ham10000, quota_counts, synthetic_ham10000

__all__ = ["SCENARIO", "WIDTHS", "backbone", "class_weights", "evaluate", "intervals", "main", "problem", "sample_score",
           "task_specs"]

WIDTHS: Final[tuple[int, ...]] = (16, 32, 64, 128)
"""Channels of the four encoder stages every method's network is built on (stage s at 1 / 2**s)."""

_METRICS: Final[tuple[Metric, ...]] = (
    Metric("dice", "Dice (%)"),
    Metric("iou", "IoU (%)"),
    Metric("accuracy", "Acc (%)"),
    Metric("balanced_accuracy", "BAcc (%)"),
    Metric("auroc", "AUROC", percent=False),
)


def task_specs() -> dict[str, TaskSpec]:
    """``{"lesion": PixelTask(1), "diagnosis": ImageTask(7)}``, in task order."""
    return {"lesion": PixelTask(1), "diagnosis": ImageTask(len(DIAGNOSES))}


def backbone() -> Backbone:
    """The one encoder recipe of every method: built-in 2D stages of :data:`WIDTHS` on RGB images."""
    return Backbone(dims=2, in_channels=3, widths=WIDTHS)


def class_weights(labels: Tensor, classes: int = len(DIAGNOSES)) -> Tensor:
    """Inverse-frequency class weights, normalised to a mean weight of 1 over ``labels``.

    ``w_c = N / (K n_c)`` for the ``K`` classes with ``n_c > 0`` training labels
    (scikit-learn's ``class_weight="balanced"``), so ``sum_c n_c w_c = N``; a class
    without labels gets 0 (it never is a target, so its weight never enters the loss).

    Args:
        labels: ``[N]`` int64 class indices in ``0..classes-1``.
        classes: number of classes.

    Returns:
        ``[classes]`` float32 weights.

    Example:
        >>> [round(w, 4) for w in class_weights(torch.tensor([0, 0, 0, 1]), 3).tolist()]
        [0.6667, 2.0, 0.0]
    """
    if labels.ndim != 1 or labels.numel() == 0 or labels.dtype != torch.int64:
        raise ValueError(f"labels must be a non-empty [N] int64 tensor, got shape {tuple(labels.shape)} {labels.dtype}")
    if int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise ValueError(f"labels must lie in 0..{classes - 1}, got {int(labels.min())}..{int(labels.max())}")
    counts = torch.bincount(labels.cpu(), minlength=classes).double()
    present = counts > 0
    weights = torch.zeros(classes, dtype=torch.float64)
    weights[present] = labels.numel() / (int(present.sum()) * counts[present])
    return weights.float()


def _weighted_cross_entropy(weights: Tensor) -> LossFn:
    def loss(logits: Tensor, label: Tensor) -> Tensor:
        return F.cross_entropy(logits, label, weight=weights.to(logits.device))

    return loss


def _multi_task() -> nn.Module:
    return architectures.joint(task_specs(), backbone())


def _single_task(task: str) -> nn.Module:
    specs = task_specs()
    if task not in specs:
        raise ValueError(f"task={task!r} is not one of {TASKS}")
    return architectures.independent(task, specs[task], backbone())


def _mtan() -> nn.Module:
    return architectures.mtan(task_specs(), backbone())


def _ctan() -> nn.Module:
    return architectures.ctan(task_specs(), backbone())


def _training_labels(data: SeedData | None) -> Tensor | None:
    if isinstance(data, ImageTasks):
        return data.train_y["diagnosis"]
    return None


def problem(config: ScenarioConfig | None = None, data: SeedData | None = None) -> Problem:
    """The HAM10000 networks and losses; the diagnosis weights come from ``data``'s training labels.

    Without ``data`` the weights are those of HAM10000's own class counts
    (:data:`benchmarks._skin.HAM10000_COUNTS`), which a synthetic training split reproduces up to rounding.
    """
    labels = _training_labels(data)
    if labels is None:
        counts = quota_counts(sum(HAM10000_COUNTS), HAM10000_COUNTS)
        labels = torch.repeat_interleave(torch.arange(len(DIAGNOSES)), torch.tensor(counts))
    return Problem(
        tasks=TASKS,
        multi_task=_multi_task,
        single_task=_single_task,
        losses={"lesion": _unet.dice_ce("binary"), "diagnosis": _weighted_cross_entropy(class_weights(labels))},
        networks={"mtan": _mtan, "ctan": _ctan},
    )


def _load(config: ScenarioConfig, seed: int) -> ImageTasks:
    if config.data_dir is None:
        return synthetic_ham10000(config.train_size or 1, config.test_size or 1, config.side, seed=seed)
    data = load_ham10000(config.data_dir, config.side, test_fraction=config.test_fraction, seed=seed)
    return data.capped(config.train_size, config.test_size)


def evaluate(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, float]:
    """HAM10000 metrics: lesion Dice and IoU, diagnosis accuracy, balanced accuracy and macro AUROC.

    Args:
        outputs: ``lesion`` logits ``[N, 1, H, W]`` and ``diagnosis`` logits ``[N, 7]``.
        targets: ``lesion`` masks ``[N, H, W]`` in {0, 1} and ``diagnosis`` labels ``[N]``.

    Returns:
        Fractions in [0, 1] (AUROC too). Dice and IoU are per image, averaged
        (both masks empty: 1). Balanced accuracy (mean recall) and macro AUROC
        (one-vs-rest) average over the classes present in ``targets``; AUROC is
        NaN when fewer than two are.

    Example:
        >>> masks, labels = torch.ones(2, 4, 4, dtype=torch.int64), torch.tensor([5, 0])
        >>> logits = torch.nn.functional.one_hot(labels, 7).float()
        >>> evaluate({"lesion": torch.ones(2, 1, 4, 4), "diagnosis": logits}, {"lesion": masks, "diagnosis": labels})
        {'dice': 1.0, 'iou': 1.0, 'accuracy': 1.0, 'balanced_accuracy': 1.0, 'auroc': 1.0}
    """
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_auroc, multiclass_recall

    lesion, mask = outputs["lesion"], targets["lesion"]
    if lesion.ndim != mask.ndim + 1 or lesion.shape[1] != 1:
        raise ValueError(
            f"outputs['lesion'] must be logits [N, 1, H, W] for masks {tuple(mask.shape)}, got {tuple(lesion.shape)}"
        )
    dice, iou = dice_iou(lesion[:, 0] > 0, mask)
    logits, label = outputs["diagnosis"], targets["diagnosis"]
    classes = len(DIAGNOSES)
    if logits.ndim != 2 or logits.shape[1] != classes or logits.shape[0] != label.shape[0]:
        raise ValueError(
            f"outputs['diagnosis'] must be logits [N, {classes}] for labels {tuple(label.shape)}, got "
            f"{tuple(logits.shape)}"
        )
    probability = logits.float().softmax(dim=1)
    present = torch.bincount(label, minlength=classes) > 0
    recall = multiclass_recall(probability, label, num_classes=classes, average="none")
    auroc = math.nan
    if int(present.sum()) >= 2:
        with warnings.catch_warnings():
            # absent classes: torchmetrics warns and scores them 0; they are masked out below
            warnings.filterwarnings("ignore", message=r".*positive samples", category=UserWarning)
            per_class = multiclass_auroc(probability, label, num_classes=classes, average="none")
        auroc = float(per_class[present].mean())
    return {
        "dice": float(dice.mean()),
        "iou": float(iou.mean()),
        "accuracy": float(multiclass_accuracy(probability, label, num_classes=classes, average="micro")),
        "balanced_accuracy": float(recall[present].mean()),
        "auroc": auroc,
    }


def intervals(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, Interval]:
    """The macro AUROC with its 95 % bootstrap interval over the test images (stratified by class:
    :func:`benchmarks._stats.auroc_ci`, :data:`benchmarks._stats.TABLE_RESAMPLES` resamples)."""
    probability = outputs["diagnosis"].float().softmax(dim=1)
    return {"auroc": auroc_ci(probability, targets["diagnosis"], resamples=TABLE_RESAMPLES, stratified=True)}


def sample_score(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Tensor:
    """Per test image, the lesion Dice (the samples figure's quartiles)."""
    return dice_iou(outputs["lesion"][:, 0] > 0, targets["lesion"])[0]


_LESION: Final[npt.NDArray[np.float32]] = np.array([[0.0, 0.0, 0.0], [0.95, 0.75, 0.2]], dtype=np.float32)


def _draw(task: str, value: Tensor) -> npt.NDArray[np.float32]:
    """The lesion mask (a prediction: logit > 0) in yellow on black."""
    mask = (value[0] > 0).long() if value.ndim == 3 else value.clamp(0, 1)
    colours: npt.NDArray[np.float32] = _LESION[mask.numpy()]
    return colours


def _caption(task: str, value: Tensor) -> str:
    if value.ndim == 0:
        return DIAGNOSES[int(value)]
    probability = value.softmax(dim=0)
    return f"{DIAGNOSES[int(probability.argmax())]} {float(probability.max()):.2f}"


def _notes(config: ScenarioConfig) -> list[str]:
    notes = [
        "Metrics are fractions in [0, 1] on the test split after the last epoch (no model selection); mean and "
        "sample standard deviation over seeds. Dice and IoU: lesion logit > 0, per image, averaged.",
        "Balanced accuracy = mean per-class recall, macro AUROC = mean one-vs-rest AUROC, both over the "
        "diagnoses present in the test split (torchmetrics' average='macro' would count an absent class as 0).",
        "Diagnosis loss: cross-entropy weighted by the inverse class frequency of each seed's training split, "
        "normalised to a mean weight of 1 over the training images (N / (K n_c), K the classes present).",
        f"Every method is built on the same encoder (architectures.Backbone, built-in 2D stages {list(WIDTHS)}, "
        "no pretrained weights): joint = architectures.joint (UNet decoder for lesion, pooled linear classifier "
        "for diagnosis), independent = one such network per task, mtan = architectures.mtan, ctan = "
        "architectures.ctan (this project's reconstruction, docs/architectures.md). Same data, batches and base "
        "optimizer; params_ratio is relative to joint.",
        "MT-COOL: vanilla/without_reg/mt_cool/mt_cool_clean split the Joint encoder's channels between the tasks; "
        "mtan_mt_cool splits MTAN's shared network; ctan_* give each task its own stream (with its cross-task "
        "attention modules), which the other task's update perturbs. "
        f"Warm-up lasts warmup_epochs = {config.warmup_epochs} epoch(s), counted inside epochs.",
    ]
    if config.data_dir is None:
        train = quota_counts(config.train_size or 1, HAM10000_COUNTS)
        test = quota_counts(config.test_size or 1, HAM10000_COUNTS)
        weights = class_weights(torch.repeat_interleave(torch.arange(len(DIAGNOSES)), torch.tensor(train)))
        rare = min(c for c in test if c > 0)
        present = sum(1 for c in test if c > 0)
        notes.append(
            "Synthetic data (benchmarks/_skin.py): each seed draws its own train and test images with HAM10000's "
            f"class shares ({dict(zip(DIAGNOSES, train))} training, {dict(zip(DIAGNOSES, test))} test images), "
            f"so the diagnosis weights are {dict(zip(DIAGNOSES, [round(float(w), 2) for w in weights]))}. "
            f"The rarest test classes have {rare} image(s): one of them moves that class's recall by "
            f"{100 / rare:.0f} points and balanced accuracy by {100 / (rare * present):.1f}."
        )
    if config.samples == 1:
        notes.append(
            "With samples = 1 the paper's consistency term is identically zero, so mt_cool trains like "
            "without_reg, ctan_mt_cool like ctan_without_reg, and mtan_mt_cool without the term; mt_cool_clean "
            "keeps the term active (docs/method.md, 'The M = 1 gap')."
        )
    return notes


SCENARIO: Final[Scenario] = Scenario(
    name="ham10000",
    title="HAM10000-style lesion segmentation + 7-class diagnosis (CTAN paper)",
    description="Skin-lesion segmentation and 7-class diagnosis on one dermoscopic image (the CTAN paper's "
    "HAM10000 pair): independent (STL), joint (HPS), MTAN, CTAN, the gradient methods and MT-COOL on the "
    "Joint, MTAN and CTAN networks, all on one encoder. Synthetic lesions with HAM10000's class imbalance by "
    "default; --data-dir for the real HAM10000 release.",
    tasks=TASKS,
    pixel_tasks=("lesion",),
    intervals=intervals,
    sample_score=sample_score,
    networks=("mtan", "ctan"),
    metrics=_METRICS,
    curve_metric={"lesion": "dice", "diagnosis": "balanced_accuracy"},
    defaults={
        "seeds": 3, "epochs": 4, "train_size": 320, "test_size": 160, "image_size": 32, "warmup_epochs": 1,
        "batch_size": 8, "optimizer": "adam", "lr": 2e-3, "schedule": "cosine",
    },
    quick={"seeds": 1, "epochs": 2, "train_size": 24, "test_size": 24, "image_size": 32, "warmup_epochs": 1},
    problem=problem,
    load=_load,
    evaluate=evaluate,
    draw=_draw,
    caption=_caption,
    layout=LAYOUT,
    notes=_notes,
    image_multiple=2 ** (len(WIDTHS) - 1),
)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the HAM10000 benchmark; print the table, write JSON and figures, return the results.

    Example:
        >>> results = main(["--quick", "--out-dir", "/tmp/ham10000"])  # doctest: +SKIP
    """
    return _scenario.main(SCENARIO, argv)


if __name__ == "__main__":
    sys.exit(_scenario.cli(SCENARIO))
