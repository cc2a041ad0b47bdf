"""The small smp UNet and the segmentation losses shared by the REFUGE and HRF-AV benchmarks.

Every method of a segmentation scenario trains networks built here, so the
comparison differs only in the update rule:

- :func:`unet`: ``smp.Unet`` with a resnet18 encoder (no pretrained weights:
  nothing is downloaded) cut to :data:`ENCODER_DEPTH` down-sampling stages,
  and a slimmed decoder (:data:`DECODER_CHANNELS`). smp keeps the stages
  beyond ``encoder_depth`` as unused modules; they are removed here so that
  no method carries (or, for MT-COOL, perturbs and clamps) parameters the
  forward never reads.
- :func:`classifier`: the same encoder with smp's classification head
  (Independent's network for an image-level task).
- :func:`dice_ce`: cross-entropy plus smp's soft Dice loss, the usual
  medical-segmentation loss; Dice keeps small structures (the optic cup,
  thin arteries) from being drowned by the background within a short
  CPU budget.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DECODER_CHANNELS", "ENCODER", "ENCODER_DEPTH", "classifier", "dice_ce", "smp", "unet"]

ENCODER: Final[str] = "resnet18"
"""smp encoder name (random initialisation)."""

ENCODER_DEPTH: Final[int] = 4
"""Down-sampling stages used: stem, layer1, layer2, layer3.

The deepest map is 1/16 of the image side: 3 x 3 at 48 px, 4 x 4 at 64 px.
"""

DECODER_CHANNELS: Final[tuple[int, ...]] = (64, 32, 16, 8)
"""UNet decoder widths, one per stage (smp's default for depth 4 is 256, 128, 64, 32)."""


def smp(benchmark: str = "the segmentation benchmarks") -> Any:
    """Import segmentation-models-pytorch, or raise an error that says how to install it."""
    try:
        import segmentation_models_pytorch  # type: ignore[import-untyped]
    except ImportError as error:
        raise RuntimeError(
            f"{benchmark} need(s) segmentation-models-pytorch ({error}); pip install -e '.[bench]'"
        ) from error
    return segmentation_models_pytorch


def _drop_unused_stages(encoder: nn.Module) -> None:
    """Delete the resnet stages smp builds but never runs at :data:`ENCODER_DEPTH` (``layer4`` at depth 4)."""
    for stage in range(ENCODER_DEPTH, 5):  # layer k runs from depth k + 1 on
        name = f"layer{stage}"
        if hasattr(encoder, name):
            delattr(encoder, name)


def unet(classes: int) -> nn.Module:
    """The benchmark UNet with ``classes`` output channels (see the module docstring)."""
    model: nn.Module = smp().Unet(
        ENCODER,
        encoder_weights=None,
        encoder_depth=ENCODER_DEPTH,
        classes=classes,
        decoder_channels=DECODER_CHANNELS,
    )
    _drop_unused_stages(getattr(model, "encoder"))
    return model


class Classifier(nn.Module):
    """The UNet's encoder with smp's classification head: an image-level task trained on its own."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        library = smp()
        self.encoder = library.encoders.get_encoder(ENCODER, weights=None, depth=ENCODER_DEPTH)
        _drop_unused_stages(self.encoder)
        self.head = library.base.ClassificationHead(self.encoder.out_channels[-1], classes, dropout=0.0)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.head(self.encoder(x)[-1])
        return logits


def classifier(classes: int) -> nn.Module:
    """Independent's classifier: the UNet's encoder and smp's classification head."""
    return Classifier(classes)


def dice_ce(mode: str, *, ignore_index: int | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """Cross-entropy plus smp's soft Dice loss (equal weights).

    Args:
        mode: ``"multiclass"`` (logits ``[N, C, H, W]``, labels ``[N, H, W]``) or
            ``"binary"`` (logits ``[N, 1, H, W]``, masks ``[N, H, W]`` in {0, 1}).
        ignore_index: multiclass label left out of both terms (e.g. uncertain vessel pixels).
    """
    if mode not in ("multiclass", "binary"):
        raise ValueError(f"mode must be 'multiclass' or 'binary', got {mode!r}")
    dice = smp().losses.DiceLoss(mode, from_logits=True, ignore_index=ignore_index)

    def multiclass(logits: Tensor, labels: Tensor) -> Tensor:
        ce = F.cross_entropy(logits, labels, ignore_index=-100 if ignore_index is None else ignore_index)
        loss: Tensor = ce + dice(logits, labels)
        return loss

    def binary(logits: Tensor, mask: Tensor) -> Tensor:
        bce = F.binary_cross_entropy_with_logits(logits[:, 0], mask.to(logits.dtype))
        loss: Tensor = bce + dice(logits, mask.unsqueeze(1))
        return loss

    return multiclass if mode == "multiclass" else binary
