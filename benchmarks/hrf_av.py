"""HRF-AV-style benchmark: artery/vein segmentation + binary vessel segmentation on one image.

This mirrors the MT-COOL paper's Table 3 (HRF-AV) with every method of
:mod:`benchmarks._learners`. The network is the small smp UNet of
:mod:`benchmarks._unet` (resnet18 encoder cut to four stages, no pretrained
weights) made multi-task by ``adapters.smp.multitask``: the
``artery_vein`` task (3 classes: background, artery, vein) keeps the UNet
decoder, the ``vessel`` task (1 logit) gets its own copy. Joint and the
gradient methods share the encoder's parameters, MT-COOL splits its channels;
Independent trains one full UNet per task.

Losses: cross-entropy plus soft Dice (:func:`benchmarks._unet.dice_ce`) for
both tasks; ``artery_vein`` pixels labelled :data:`benchmarks._vessels.IGNORE`
are skipped.

Metrics (``torchmetrics``, test split, after the last epoch), as fractions:

- Artery, Vein: pixel accuracy and F1 of "artery" (resp. "vein") against the
  rest, from the ``artery_vein`` prediction, over every pixel;
- A/V: on the ground-truth vessel pixels, accuracy and macro F1 of artery vs.
  vein, deciding between the artery and vein logits only (the usual A/V
  classification score, independent of vessel detection);
- Vessel: pixel accuracy and F1 of the ``vessel`` task (threshold 0.5).

Data: the documented synthetic vessel-tree generator of
:mod:`benchmarks._vessels` by default (no download); ``--data-dir`` reads real
HRF-AV data laid out as :data:`benchmarks._vessels.LAYOUT`.

Run ``python -m benchmarks.hrf_av --help``; ``torchrun --nproc-per-node R -m
benchmarks.hrf_av --distributed`` trains on R ranks (:mod:`benchmarks._scenario`). Outputs in ``--out-dir``:
``hrf_av.json``, ``hrf_av.png``, ``hrf_av_curves.png``, ``hrf_av_samples.png``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from benchmarks import _scenario, _unet
from benchmarks._images import ImageTasks
from benchmarks._learners import Problem
from benchmarks._metrics import dice_iou
from benchmarks._scenario import Metric, Scenario, ScenarioConfig, SeedData
from benchmarks._vessels import IGNORE, LAYOUT, TASKS, load_hrf_av, synthetic_hrf_av

__all__ = ["SCENARIO", "evaluate", "main", "problem", "sample_score"]

_METRICS: Final[tuple[Metric, ...]] = (
    Metric("artery_acc", "Acc A (%)"),
    Metric("artery_f1", "F1 A (%)"),
    Metric("vein_acc", "Acc V (%)"),
    Metric("vein_f1", "F1 V (%)"),
    Metric("av_acc", "Acc A/V (%)"),
    Metric("av_f1", "F1 A/V (%)"),
    Metric("vessel_acc", "Acc vessel (%)"),
    Metric("vessel_f1", "F1 vessel (%)"),
)


def _multi_task() -> nn.Module:
    """The hard-shared HRF-AV network: one UNet encoder, a decoder per task."""
    import adapters
    import adapters.smp

    net = adapters.smp.multitask(_unet.unet(3), {"artery_vein": 3, "vessel": 1})
    adapters.merge(net.encoder)  # Joint shares plain parameters; MT-COOL re-splits them
    return net


def _single_task(task: str) -> nn.Module:
    if task == "artery_vein":
        return _unet.unet(3)
    if task == "vessel":
        return _unet.unet(1)
    raise ValueError(f"task={task!r} is not one of {TASKS}")


def problem(config: ScenarioConfig | None = None, data: SeedData | None = None) -> Problem:
    """The HRF-AV networks and losses (the same for every configuration)."""
    return Problem(
        tasks=TASKS,
        multi_task=_multi_task,
        single_task=_single_task,
        losses={"artery_vein": _unet.dice_ce("multiclass", ignore_index=IGNORE), "vessel": _unet.dice_ce("binary")},
    )


def _load(config: ScenarioConfig, seed: int) -> ImageTasks:
    if config.data_dir is None:
        return synthetic_hrf_av(config.train_size or 1, config.test_size or 1, config.side, seed=seed)
    data = load_hrf_av(config.data_dir, config.side, test_fraction=config.test_fraction, seed=seed)
    return data.capped(config.train_size, config.test_size)


def evaluate(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, float]:
    """HRF-AV metrics with torchmetrics: accuracy and F1 of artery, vein, A/V and vessel.

    Args:
        outputs: ``artery_vein`` logits ``[N, 3, H, W]`` and ``vessel`` logits ``[N, 1, H, W]``.
        targets: ``artery_vein`` labels ``[N, H, W]`` (0, 1, 2 or :data:`IGNORE`) and ``vessel`` masks ``[N, H, W]``.
    """
    from torchmetrics.functional.classification import binary_accuracy, binary_f1_score

    logits = outputs["artery_vein"]
    labels = targets["artery_vein"]
    valid = labels != IGNORE
    predicted = logits.argmax(dim=1)
    scores: dict[str, float] = {}
    for name, value in (("artery", 1), ("vein", 2)):
        pred, true = (predicted[valid] == value).long(), (labels[valid] == value).long()
        scores[f"{name}_acc"] = float(binary_accuracy(pred, true))
        scores[f"{name}_f1"] = float(binary_f1_score(pred, true))
    on_vessels = (labels == 1) | (labels == 2)
    vein_rather_than_artery = (logits[:, 2] > logits[:, 1])[on_vessels].long()
    true_vein = (labels[on_vessels] == 2).long()
    scores["av_acc"] = float(binary_accuracy(vein_rather_than_artery, true_vein))
    scores["av_f1"] = 0.5 * float(binary_f1_score(vein_rather_than_artery, true_vein) + binary_f1_score(
        1 - vein_rather_than_artery, 1 - true_vein))
    vessel_probability = outputs["vessel"][:, 0].sigmoid()
    scores["vessel_acc"] = float(binary_accuracy(vessel_probability, targets["vessel"]))
    scores["vessel_f1"] = float(binary_f1_score(vessel_probability, targets["vessel"]))
    return scores


def sample_score(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Tensor:
    """Per test image, the Dice (= F1) of its vessel map, p(vessel) > 0.5 (the samples figure's quartiles)."""
    return dice_iou(outputs["vessel"][:, 0] > 0, targets["vessel"] > 0)[0]


_PALETTE: Final[npt.NDArray[np.float32]] = np.array(
    [[0.0, 0.0, 0.0], [0.95, 0.15, 0.1], [0.15, 0.35, 1.0], [0.5, 0.5, 0.5]], dtype=np.float32
)


def _draw(task: str, value: Tensor) -> npt.NDArray[np.float32]:
    """A/V as red (artery) / blue (vein), uncertain grey; vessels white on black."""
    if task == "vessel":
        mask = (value[0] > 0) if value.ndim == 3 else (value > 0)
        gray: npt.NDArray[np.float32] = np.repeat(mask.numpy().astype(np.float32)[..., None], 3, axis=2)
        return gray
    classes = value.argmax(dim=0) if value.ndim == 3 else torch.where(value == IGNORE, 3, value)
    colours: npt.NDArray[np.float32] = _PALETTE[classes.numpy()]
    return colours


def _caption(task: str, value: Tensor) -> str:
    return ""


def _notes(config: ScenarioConfig) -> list[str]:
    notes = [
        "Metrics are fractions in [0, 1] on the test split after the last epoch (no model selection); mean and "
        "sample standard deviation over seeds. Artery / vein: one class against the rest over all pixels; "
        "A/V: artery vs vein on ground-truth vessel pixels (macro F1); vessel: the binary task.",
        "Pixel accuracies are dominated by the background; F1 is the informative column.",
        f"Every method uses the same UNet ({_unet.ENCODER} encoder cut to {_unet.ENCODER_DEPTH} stages, no "
        f"pretrained weights, decoder channels {list(_unet.DECODER_CHANNELS)}; loss cross-entropy + Dice), the "
        "same data, batches and base optimizer; params_ratio is relative to joint. "
        "Independent = one UNet per task.",
        f"MT-COOL warm-up lasts warmup_epochs = {config.warmup_epochs} epoch(s), counted inside epochs.",
    ]
    if config.data_dir is None:
        notes.append(
            "Synthetic data (benchmarks/_vessels.py): each seed draws its own train and test images; arteries "
            "and veins differ in colour, width and central reflex, with per-image contrast."
        )
    if config.samples == 1:
        notes.append(
            "With samples = 1 the paper's consistency term is identically zero, so mt_cool trains like "
            "without_reg; mt_cool_clean keeps the term active (docs/method.md, 'The M = 1 gap')."
        )
    return notes


SCENARIO: Final[Scenario] = Scenario(
    name="hrf_av",
    title="HRF-AV-style artery/vein + vessel segmentation (paper Table 3)",
    description="Artery/vein and binary vessel segmentation on one fundus image with a shared/split UNet encoder: "
    "Independent, Joint, PCGrad, MGDA, CAGrad, GradDrop and MT-COOL's ablations (the MT-COOL paper's Table 3). "
    "Synthetic vessel trees by default; --data-dir for real HRF-AV.",
    tasks=TASKS,
    pixel_tasks=TASKS,
    sample_score=sample_score,
    metrics=_METRICS,
    curve_metric={"artery_vein": "av_f1", "vessel": "vessel_f1"},
    defaults={
        "seeds": 3, "epochs": 4, "train_size": 96, "test_size": 32, "image_size": 64, "warmup_epochs": 1,
        "batch_size": 4, "optimizer": "adam", "lr": 2e-3, "schedule": "cosine",
    },
    quick={"seeds": 1, "epochs": 2, "train_size": 8, "test_size": 4, "image_size": 32, "warmup_epochs": 1},
    problem=problem,
    load=_load,
    evaluate=evaluate,
    draw=_draw,
    caption=_caption,
    layout=LAYOUT,
    notes=_notes,
)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the HRF-AV benchmark; print the table, write JSON and figures, return the results.

    Example:
        >>> results = main(["--quick", "--out-dir", "/tmp/hrf_av"])  # doctest: +SKIP
    """
    return _scenario.main(SCENARIO, argv)


if __name__ == "__main__":
    sys.exit(_scenario.cli(SCENARIO))
