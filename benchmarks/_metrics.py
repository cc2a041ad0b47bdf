"""Per-image overlap metrics shared by the segmentation scenarios, with one rule for empty masks.

torchmetrics' ``dice_score`` and ``mean_iou`` (used here) leave an image whose
true and predicted masks are both empty undefined (Dice NaN, IoU -1). The
benchmarks read such an image as a perfect answer: nothing to find, nothing
found, score 1. (Before 0.3 they counted it as 0, which penalised a method for
correctly predicting that a small structure is absent.) An image where only one
of the two masks is empty scores 0, as the formulas give.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dice_iou"]


def dice_iou(predicted: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image Dice and IoU of binary masks, 1.0 where both masks are empty.

    Args:
        predicted: ``[N, *spatial]`` bool or {0, 1} masks.
        target: the true masks, same shape.

    Returns:
        ``(dice, iou)``, each ``[N]`` float32 in [0, 1].

    Example:
        >>> p = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
        >>> t = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
        >>> dice, iou = dice_iou(p, t)
        >>> [round(v, 4) for v in dice.tolist()], [round(v, 4) for v in iou.tolist()]
        ([0.6667, 1.0, 0.0], [0.5, 1.0, 0.0])
    """
    from torchmetrics.functional.segmentation import dice_score, mean_iou

    if predicted.shape != target.shape or predicted.ndim < 2:
        raise ValueError(
            f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} must be masks of one shape "
            "[N, *spatial]"
        )
    preds = predicted.bool().long().unsqueeze(1)
    truth = target.bool().long().unsqueeze(1)
    dice = dice_score(preds, truth, num_classes=1, include_background=True, average="none", input_format="one-hot")
    iou = mean_iou(preds, truth, num_classes=1, include_background=True, per_class=True, input_format="one-hot")
    empty = (preds.flatten(1).sum(1) == 0) & (truth.flatten(1).sum(1) == 0)
    one = torch.ones((), dtype=torch.float32, device=preds.device)
    return (
        torch.where(empty, one, dice.reshape(-1).float()),
        torch.where(empty, one, iou.reshape(-1).float()),
    )
