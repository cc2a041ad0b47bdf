"""adapters.timm: function preservation over a zoo of timm models, export, training."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests._adapters_support import (  # noqa: F401
    TOLERANCE,
    check_ownership,
    deviation,
    one_thread,
    perturb_slices,
    state_dict_round_trip,
    train_lowers_losses,
)

timm = pytest.importorskip("timm")
import adapters  # noqa: E402
import adapters.timm  # noqa: E402

ZOO: dict[str, dict[str, Any]] = {
    "resnet18": {},
    "convnext_atto": {},
    "efficientnet_b0": {},
    "mobilenetv3_small_050": {},
    "regnetx_002": {},
    "vit_tiny_patch16_224": {"img_size": 32},
}


def _create(name: str, **kwargs: Any) -> nn.Module:
    model: nn.Module = timm.create_model(name, pretrained=False, **ZOO[name], **kwargs)
    return model


@pytest.fixture(scope="module")
def zoo() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: _create(name).eval() for name in ZOO}


def _tasks(count: int) -> dict[str, int]:
    return {f"t{i}": 1000 if i == 0 else 3 + i for i in range(count)}  # t0 keeps the model's classifier


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_is_function_preserving(zoo: dict[str, nn.Module], name: str, dtype: torch.dtype) -> None:
    model = copy.deepcopy(zoo[name]).to(dtype)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
    total = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(_classifier_path(model)))
    for count in (2, 3, 4):
        net = adapters.timm.multitask(model, _tasks(count))
        with torch.no_grad():
            assert deviation(net.encoder(x), features) <= TOLERANCE
            assert deviation(net(x, "t0"), logits) <= TOLERANCE
            assert net(x, "t1").shape == (2, 4)
        assert net.heads["t0"].weight.dtype == dtype and net.heads["t1"].weight.dtype == dtype
        assert not net.training
        assert not any(m.training for m in net.modules())  # the model's eval mode is kept
        check_ownership(net, total)
    assert all(".parametrizations." not in n for n, _ in model.named_parameters())  # the user's model untouched


def _classifier_path(model: nn.Module) -> str:
    classifier = model.get_classifier()
    return next(n for n, m in model.named_modules() if m is classifier and n)


@pytest.mark.parametrize("name", list(ZOO))
def test_export_loads_into_a_fresh_timm_model(zoo: dict[str, nn.Module], name: str) -> None:
    net = adapters.timm.multitask(zoo[name], {"a": 1000, "b": 5})
    perturb_slices(net)
    with torch.no_grad():
        for p in net.heads["b"].parameters():
            p.add_(0.1)
    plain = net.export("b")
    assert plain.num_classes == 5
    assert not any(".parametrizations." in n for n, _ in plain.named_parameters())
    fresh = _create(name, num_classes=5).eval()
    fresh.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert deviation(fresh(x), net(x, "b")) == 0.0
        assert deviation(plain(x), net(x, "b")) == 0.0


def test_training_lowers_every_task_loss() -> None:
    net = adapters.timm.multitask("resnet18", {"even": 5, "odd": 5})
    g = torch.Generator().manual_seed(3)
    batches = {t: (torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g))
               for t in ("even", "odd")}
    result = train_lowers_losses(net, batches, {"even": F.cross_entropy, "odd": F.cross_entropy}, steps=6,
                                 lr=0.02, warmup_steps=1)
    for task, (before, after) in result.items():
        assert after < before, (task, before, after)


def test_dtype_and_state_dict_round_trip() -> None:
    net = adapters.timm.multitask("vit_tiny_patch16_224", {"a": 3, "b": 4}, img_size=32).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert net(x, "a").dtype == torch.float64
    perturb_slices(net)
    fresh = adapters.timm.multitask("vit_tiny_patch16_224", {"a": 3, "b": 4}, img_size=32).double()
    state_dict_round_trip(net, fresh, x, "b")


def test_vit_rules() -> None:
    net = adapters.timm.multitask("vit_tiny_patch16_224", {"a": 3, "b": 4, "c": 2}, img_size=32)
    plan = {p.name: p for p in adapters.split_plan(_create("vit_tiny_patch16_224").eval(), ["a", "b", "c"])}
    assert plan["pos_embed"].dim == 2 and plan["cls_token"].dim == 2
    assert plan["blocks.0.attn.qkv.weight"].chunks == 3
    assert plan["patch_embed.proj.weight"].kind == "conv"
    assert "pos_embed" not in dict(net.encoder.named_parameters())


def test_custom_head_factory_and_kept_classifier() -> None:
    model = _create("resnet18").eval()
    net = adapters.timm.multitask(model, {"a": 1000, "b": 1000}, head=lambda features, classes: nn.Sequential(
        nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes)))
    assert isinstance(net.heads["a"], nn.Sequential) and isinstance(net.heads["b"], nn.Sequential)
    kept = adapters.timm.multitask(model, {"a": 7, "b": 1000, "c": 1000})
    assert torch.equal(kept.heads["b"].weight, model.fc.weight)
    assert kept.heads["c"].weight.shape == (1000, 512) and not torch.equal(kept.heads["c"].weight, model.fc.weight)


def test_export_goes_through_torch_export() -> None:
    net = adapters.timm.multitask("resnet18", {"a": 2, "b": 3}).eval()
    perturb_slices(net)
    x = torch.randn(1, 3, 32, 32)
    exported = torch.export.export(net.export("b"), (x,)).module()
    with torch.no_grad():
        assert deviation(exported(x), net(x, "b")) == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_conversion_keeps_the_cuda_device() -> None:
    net = adapters.timm.multitask(_create("convnext_atto").cuda(), {"a": 2, "b": 3})
    assert {p.device.type for p in net.parameters()} == {"cuda"}
    assert net(torch.randn(2, 3, 32, 32, device="cuda"), "b").shape == (2, 3)


def test_errors() -> None:
    with pytest.raises(ValueError, match="class counts >= 1"):
        adapters.timm.multitask("resnet18", {"a": 0, "b": 2})
    with pytest.raises(ValueError, match="at least two tasks"):
        adapters.timm.multitask("resnet18", {"a": 2})
    with pytest.raises(TypeError, match="only apply when model is a timm model name"):
        adapters.timm.multitask(_create("resnet18"), {"a": 2, "b": 2}, img_size=32)
    with pytest.raises(TypeError, match="two classifiers"):
        adapters.timm.multitask("deit_tiny_distilled_patch16_224", {"a": 2, "b": 2}, img_size=32)
    with pytest.raises(TypeError, match="timm's classifier conventions"):
        adapters.timm.multitask(nn.Linear(2, 2), {"a": 2, "b": 2})
    model = _create("resnet18")
    before = {n: id(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="dims names parameters not in ResNet"):
        adapters.timm.multitask(model, {"a": 2, "b": 2}, dims={"nope": 0})
    assert {n: id(p) for n, p in model.named_parameters()} == before
