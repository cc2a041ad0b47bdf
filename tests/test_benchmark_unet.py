"""The segmentation benchmarks' shared UNet, classifier and losses (benchmarks/_unet.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import _unet


def _every_parameter_gets_a_gradient(model: nn.Module, x: torch.Tensor) -> None:
    model(x).float().square().mean().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []


def test_unet_keeps_only_the_stages_it_runs() -> None:
    torch.manual_seed(0)
    model = _unet.unet(3)
    assert not hasattr(model.encoder, "layer4") and hasattr(model.encoder, "layer3")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3, 32, 32)
    _every_parameter_gets_a_gradient(model, torch.randn(2, 3, 32, 32))


def test_classifier_reads_the_same_encoder() -> None:
    torch.manual_seed(0)
    model = _unet.classifier(2)
    unet = _unet.unet(1)
    assert [n for n, _ in model.encoder.named_parameters()] == [n for n, _ in unet.encoder.named_parameters()]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)
    _every_parameter_gets_a_gradient(model, torch.randn(2, 3, 32, 32))


def test_dice_ce_is_cross_entropy_plus_soft_dice() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    labels = torch.randint(0, 3, (2, 8, 8))
    probabilities = logits.softmax(dim=1)
    one_hot = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    intersection = (probabilities * one_hot).sum(dim=(0, 2, 3))
    cardinality = (probabilities + one_hot).sum(dim=(0, 2, 3))
    dice = 1 - (2 * intersection / cardinality.clamp_min(1e-7)).mean()
    expected = F.cross_entropy(logits, labels) + dice
    torch.testing.assert_close(_unet.dice_ce("multiclass")(logits, labels), expected, rtol=1e-5, atol=1e-5)


def test_dice_ce_binary_and_ignored_pixels() -> None:
    torch.manual_seed(0)
    mask = torch.randint(0, 2, (2, 8, 8))
    perfect = (mask.float() * 2 - 1).unsqueeze(1) * 20
    assert float(_unet.dice_ce("binary")(perfect, mask)) < 1e-3
    assert float(_unet.dice_ce("binary")(-perfect, mask)) > 1.0
    labels = torch.randint(0, 3, (2, 8, 8))
    labels[:, :2] = -100
    logits = torch.randn(2, 3, 8, 8)
    changed = logits.clone()
    changed[:, :, :2] = torch.randn(2, 3, 2, 8) * 5  # only ignored pixels differ
    loss = _unet.dice_ce("multiclass", ignore_index=-100)
    torch.testing.assert_close(loss(logits, labels), loss(changed, labels))


def test_dice_ce_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="mode must be 'multiclass' or 'binary'"):
        _unet.dice_ce("multilabel")
