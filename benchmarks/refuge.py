"""REFUGE-style benchmark: optic disc/cup segmentation + glaucoma classification on one image.

This mirrors the MT-COOL paper's Table 2 (REFUGE2018) with every method of
:mod:`benchmarks._learners` (Independent, Joint, PCGrad, MGDA, CAGrad, GradDrop,
MT-COOL's ablations). The network is the small smp UNet of
:mod:`benchmarks._unet` (resnet18 encoder cut to four stages, no pretrained
weights: nothing is downloaded), made multi-task by ``adapters.smp.multitask``:

- ``disc_cup`` (3 classes: background, disc rim, cup) keeps the UNet decoder;
- ``glaucoma`` (2 classes) is an :class:`adapters.FedClassifier` reading the
  deepest encoder features and the segmentation prediction, as in the paper
  ("the output of segmentation and the features from the bottom layers are
  taken as the input of the decoder for classification").

Joint and the gradient methods train this network with a hard-shared
(unsplit) encoder; MT-COOL splits the encoder's channels between the two
tasks. Independent trains a full UNet for ``disc_cup`` and the same encoder
with smp's classification head for ``glaucoma``.

Losses: cross-entropy plus soft Dice per pixel for ``disc_cup``; class-weighted
cross-entropy for ``glaucoma`` (weights 1 and 9, the inverse of REFUGE's 1:9
imbalance, so the 0.5 threshold of sensitivity/specificity is meaningful).

Metrics (``torchmetrics``, on the test split after the last epoch): Dice of
the cup and of the disc (per image, averaged), accuracy, AUROC, sensitivity
and specificity of the glaucoma prediction (probability threshold 0.5).

Data: by default the documented synthetic generator of
:mod:`benchmarks._fundus` (no download; each seed draws its own images);
``--data-dir`` reads the real REFUGE2018 training release (layout in
:data:`benchmarks._fundus.LAYOUT`, disc crops, seeded stratified split).

Run ``python -m benchmarks.refuge --help``; ``torchrun --nproc-per-node R -m
benchmarks.refuge --distributed`` trains on R ranks (:mod:`benchmarks._scenario`). Outputs in ``--out-dir``:
``refuge.json`` (configuration, seeds, per-seed metrics, curves), ``refuge.png``
(bar charts), ``refuge_curves.png`` and ``refuge_samples.png`` (predictions
per method, like the paper's Fig. 2).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import _scenario, _unet
from benchmarks._fundus import LAYOUT, REFUGE_CLASSES, TASKS, load_refuge, synthetic_refuge
from benchmarks._images import ImageTasks
from benchmarks._metrics import dice_iou
from benchmarks._learners import Problem
from benchmarks._scenario import Metric, Scenario, ScenarioConfig, SeedData
from benchmarks._stats import TABLE_RESAMPLES, Interval, auroc_ci

__all__ = ["SCENARIO", "evaluate", "intervals", "main", "problem", "sample_score"]

GLAUCOMA_WEIGHTS: Final[tuple[float, float]] = (1.0, 9.0)
"""Class weights of the glaucoma cross-entropy: the inverse of the 1:9 class ratio."""

_METRICS: Final[tuple[Metric, ...]] = (
    Metric("dice_cup", "Dice cup (%)"),
    Metric("dice_disc", "Dice disc (%)"),
    Metric("accuracy", "Acc (%)"),
    Metric("auroc", "AUROC", percent=False),
    Metric("sensitivity", "Sen (%)"),
    Metric("specificity", "Spe (%)"),
)


def _multi_task() -> nn.Module:
    """The hard-shared REFUGE network (unsplit encoder): UNet for disc_cup, FedClassifier for glaucoma."""
    import adapters
    import adapters.smp
    from adapters import Classification

    net = adapters.smp.multitask(
        _unet.unet(REFUGE_CLASSES), {"disc_cup": REFUGE_CLASSES, "glaucoma": Classification(2, fed_by="disc_cup")}
    )
    adapters.merge(net.encoder)  # Joint shares plain parameters; MT-COOL re-splits them
    return net


def _single_task(task: str) -> nn.Module:
    if task == "disc_cup":
        return _unet.unet(REFUGE_CLASSES)
    if task == "glaucoma":
        return _unet.classifier(2)
    raise ValueError(f"task={task!r} is not one of {TASKS}")


def _glaucoma_loss(logits: Tensor, label: Tensor) -> Tensor:
    return F.cross_entropy(logits, label, weight=torch.tensor(GLAUCOMA_WEIGHTS, device=logits.device))


def problem(config: ScenarioConfig | None = None, data: SeedData | None = None) -> Problem:
    """The REFUGE networks and losses (the same for every configuration)."""
    return Problem(
        tasks=TASKS,
        multi_task=_multi_task,
        single_task=_single_task,
        losses={"disc_cup": _unet.dice_ce("multiclass"), "glaucoma": _glaucoma_loss},
    )


def _load(config: ScenarioConfig, seed: int) -> ImageTasks:
    if config.data_dir is None:
        return synthetic_refuge(config.train_size or 1, config.test_size or 1, config.side, seed=seed)
    data = load_refuge(config.data_dir, config.side, test_fraction=config.test_fraction, seed=seed)
    return data.capped(config.train_size, config.test_size)


def evaluate(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, float]:
    """REFUGE metrics with torchmetrics: Dice (cup, disc), accuracy, AUROC, sensitivity, specificity.

    Args:
        outputs: ``disc_cup`` logits ``[N, 3, H, W]`` and ``glaucoma`` logits ``[N, 2]``.
        targets: ``disc_cup`` masks ``[N, H, W]`` (0 background, 1 rim, 2 cup) and ``glaucoma`` labels ``[N]``.

    Returns:
        Fractions in [0, 1] (AUROC too); Dice is computed per image and averaged (an image
        whose true and predicted region are both empty scores 1: :func:`benchmarks._metrics.dice_iou`).
    """
    from torchmetrics.functional.classification import (
        binary_accuracy,
        binary_auroc,
        binary_recall,
        binary_specificity,
    )
    predicted = outputs["disc_cup"].argmax(dim=1)
    mask = targets["disc_cup"]
    # per image; an image whose true and predicted region are both empty scores 1 (benchmarks._metrics)
    dice_disc, _ = dice_iou(predicted >= 1, mask >= 1)
    dice_cup, _ = dice_iou(predicted == 2, mask == 2)
    probability = outputs["glaucoma"].softmax(dim=1)[:, 1]
    label = targets["glaucoma"]
    return {
        "dice_cup": float(dice_cup.mean()),
        "dice_disc": float(dice_disc.mean()),
        "accuracy": float(binary_accuracy(probability, label)),
        "auroc": float(binary_auroc(probability, label)) if 0 < int(label.sum()) < label.numel() else float("nan"),
        "sensitivity": float(binary_recall(probability, label)),
        "specificity": float(binary_specificity(probability, label)),
    }


def intervals(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, Interval]:
    """The glaucoma AUROC with its 95 % bootstrap interval over the test images (stratified by class:
    :func:`benchmarks._stats.auroc_ci`, :data:`benchmarks._stats.TABLE_RESAMPLES` resamples)."""
    probability = outputs["glaucoma"].softmax(dim=1)[:, 1]
    return {"auroc": auroc_ci(probability, targets["glaucoma"], resamples=TABLE_RESAMPLES, stratified=True)}


def sample_score(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Tensor:
    """Per test image, the mean of its disc and cup Dice (the samples figure's quartiles)."""
    predicted, mask = outputs["disc_cup"].argmax(dim=1), targets["disc_cup"]
    return 0.5 * (dice_iou(predicted >= 1, mask >= 1)[0] + dice_iou(predicted == 2, mask == 2)[0])


_PALETTE: Final[npt.NDArray[np.float32]] = np.array(
    [[0.0, 0.0, 0.0], [0.95, 0.75, 0.2], [0.2, 0.6, 1.0]], dtype=np.float32
)


def _draw(task: str, value: Tensor) -> npt.NDArray[np.float32]:
    """Segmentation as colours: background black, disc rim yellow, cup blue."""
    classes = value.argmax(dim=0) if value.ndim == 3 else value
    colours: npt.NDArray[np.float32] = _PALETTE[classes.clamp(0, 2).numpy()]
    return colours


def _caption(task: str, value: Tensor) -> str:
    if value.ndim == 0:
        return f"glaucoma={int(value)}"
    return f"p(glaucoma)={float(value.softmax(dim=0)[1]):.2f}"


def _notes(config: ScenarioConfig) -> list[str]:
    notes = [
        "Metrics are fractions in [0, 1] on the test split after the last epoch (no model selection); mean and "
        "sample standard deviation over seeds. Dice is per image, averaged; the disc is rim + cup.",
        "Sensitivity and specificity use the 0.5 threshold on p(glaucoma); the glaucoma loss is weighted 1:9 "
        "against the class imbalance. AUROC is threshold-free.",
        f"Every method uses the same UNet ({_unet.ENCODER} encoder cut to {_unet.ENCODER_DEPTH} stages, no "
        f"pretrained weights, decoder channels {list(_unet.DECODER_CHANNELS)}; loss cross-entropy + Dice), the "
        "same data, batches and base optimizer; params_ratio is relative to joint. "
        "Independent = UNet for disc_cup + the UNet's encoder with a classification head for glaucoma.",
        f"MT-COOL warm-up lasts warmup_epochs = {config.warmup_epochs} epoch(s), counted inside epochs.",
    ]
    if config.data_dir is None:
        notes.append(
            "Synthetic data (benchmarks/_fundus.py): each seed draws its own train and test images; 10 % are "
            "glaucoma, whose cup-to-disc ratio is drawn from N(0.65, 0.08) against N(0.40, 0.08), so the label "
            "is a noisy function of the CDR. Small test sets: one glaucoma image moves sensitivity by "
            f"{100 / max(1, round(0.1 * (config.test_size or 1))):.0f} points."
        )
    if config.samples == 1:
        notes.append(
            "With samples = 1 the paper's consistency term is identically zero, so mt_cool trains like "
            "without_reg; mt_cool_clean keeps the term active (docs/method.md, 'The M = 1 gap')."
        )
    return notes


SCENARIO: Final[Scenario] = Scenario(
    name="refuge",
    title="REFUGE-style disc/cup segmentation + glaucoma (paper Table 2)",
    description="Optic disc/cup segmentation and glaucoma classification on one fundus image with a shared/split "
    "UNet encoder: Independent, Joint, PCGrad, MGDA, CAGrad, GradDrop and MT-COOL's ablations "
    "(the MT-COOL paper's Table 2). Synthetic fundus images by default; --data-dir for real REFUGE2018.",
    tasks=TASKS,
    pixel_tasks=("disc_cup",),
    intervals=intervals,
    sample_score=sample_score,
    metrics=_METRICS,
    curve_metric={"disc_cup": "dice_cup", "glaucoma": "auroc"},
    defaults={
        "seeds": 3, "epochs": 4, "train_size": 128, "test_size": 80, "image_size": 48, "warmup_epochs": 1,
        "batch_size": 4, "optimizer": "adam", "lr": 2e-3, "schedule": "cosine",
    },
    quick={"seeds": 1, "epochs": 2, "train_size": 20, "test_size": 20, "image_size": 32, "warmup_epochs": 1},
    problem=problem,
    load=_load,
    evaluate=evaluate,
    draw=_draw,
    caption=_caption,
    layout=LAYOUT,
    notes=_notes,
)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the REFUGE benchmark; print the table, write JSON and figures, return the results.

    Example:
        >>> results = main(["--quick", "--out-dir", "/tmp/refuge"])  # doctest: +SKIP
    """
    return _scenario.main(SCENARIO, argv)


if __name__ == "__main__":
    sys.exit(_scenario.cli(SCENARIO))
