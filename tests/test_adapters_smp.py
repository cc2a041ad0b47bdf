"""adapters.smp: function preservation, segmentation + classification, two segmentations, export, training."""

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
    numel,
    one_thread,
    perturb_slices,
    state_dict_round_trip,
    train_lowers_losses,
)

smp = pytest.importorskip("segmentation_models_pytorch")
import adapters  # noqa: E402
import adapters.smp  # noqa: E402
from adapters import Classification, Segmentation  # noqa: E402

ENCODERS = ["resnet18", "tu-regnetx_002"]


def _unet(encoder: str, classes: int = 2, **kwargs: Any) -> nn.Module:
    model: nn.Module = smp.Unet(encoder, encoder_weights=None, classes=classes, **kwargs)
    return model


@pytest.fixture(scope="module")
def unets() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: _unet(name).eval() for name in ENCODERS}


TASK_SETS = {
    2: {"seg": 2, "cls": Classification(3, fed_by="seg")},
    3: {"seg": 2, "vessel": Segmentation(1), "cls": Classification(3)},
    4: {"seg": 2, "av": 3, "cls": Classification(2, fed_by="av"), "quality": Classification(4)},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_zoo_is_function_preserving(unets: dict[str, nn.Module], encoder: str, dtype: torch.dtype) -> None:
    model = copy.deepcopy(unets[encoder]).to(dtype)
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    with torch.no_grad():
        features = model.encoder(x)
        masks = model(x)
    for count, tasks in TASK_SETS.items():
        net = adapters.smp.multitask(model, tasks)
        assert len(net.task_names) == count and not net.training
        assert not any(m.training for m in net.modules())  # the model's eval mode is kept
        with torch.no_grad():
            assert deviation(net.encoder(x), features) <= TOLERANCE
            assert deviation(net(x, "seg"), masks) <= TOLERANCE  # the first task keeps the decoder and head
            outputs = net.forward_tasks(x)
        for task, spec in tasks.items():
            shape = (2, spec) if isinstance(spec, int) else (2, spec.classes)
            assert tuple(outputs[task].shape[:2]) == shape
            assert outputs[task].dtype == dtype
        check_ownership(net, numel(model.encoder))
    assert all(".parametrizations." not in n for n, _ in model.named_parameters())


@pytest.mark.parametrize(
    ("arch", "size", "kwargs"),
    [
        ("FPN", 64, {}),
        ("Linknet", 64, {}),
        ("PSPNet", 64, {}),
        ("DeepLabV3Plus", 64, {}),
        ("MAnet", 64, {}),
        ("PAN", 128, {}),
        ("UnetPlusPlus", 64, {}),
        ("UPerNet", 64, {}),
        ("Segformer", 64, {}),
        ("DPT", 64, {"encoder_name": "tu-vit_tiny_patch16_224", "dynamic_img_size": True}),
    ],
)
def test_other_architectures(arch: str, size: int, kwargs: dict[str, Any]) -> None:
    kwargs = {"encoder_name": "resnet18", **kwargs}
    model = smp.create_model(arch, encoder_weights=None, classes=2, **kwargs).eval()
    x = torch.randn(1, 3, size, size)
    net = adapters.smp.multitask(model, {"a": 2, "b": 3, "c": Classification(2, fed_by="a")})
    with torch.no_grad():
        assert deviation(net(x, "a"), model(x)) <= TOLERANCE
        assert net(x, "c").shape == (1, 2)
    perturb_slices(net)
    fresh = smp.create_model(arch, encoder_weights=None, classes=3, **kwargs).eval()
    fresh.load_state_dict(net.export("b").state_dict())
    with torch.no_grad():
        assert deviation(fresh(x), net(x, "b")) <= TOLERANCE


@pytest.mark.parametrize("encoder", ENCODERS)
def test_export_with_and_without_aux(unets: dict[str, nn.Module], encoder: str) -> None:
    net = adapters.smp.multitask(unets[encoder], TASK_SETS[4])
    perturb_slices(net)
    x = torch.randn(2, 3, 64, 64)
    plain = net.export("av")
    assert plain.classification_head is None
    fresh = _unet(encoder, classes=3).eval()
    fresh.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert deviation(fresh(x), net(x, "av")) == 0.0
    with_aux = net.export("seg", aux="quality")
    fresh = _unet(encoder, classes=2, aux_params={"classes": 4, "dropout": 0.0}).eval()
    fresh.load_state_dict(with_aux.state_dict())
    with torch.no_grad():
        mask, quality = fresh(x)
        assert deviation(mask, net(x, "seg")) == 0.0
        assert deviation(quality, net(x, "quality")) == 0.0
    with pytest.raises(ValueError, match="'cls' is a classification task"):
        net.export("cls")
    with pytest.raises(ValueError, match="reads no segmentation"):
        net.export("seg", aux="cls")
    assert all(".parametrizations." in n for n, _ in net.encoder.named_parameters())  # still split


def test_model_aux_head_is_kept() -> None:
    model = _unet("resnet18", aux_params={"classes": 4}).eval()
    net = adapters.smp.multitask(model, {"seg": 2, "grade": Classification(4), "other": Classification(4)})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, labels = model(x)
        assert deviation(net(x, "grade"), labels) == 0.0


@pytest.mark.parametrize(
    "tasks",
    [{"seg": 2, "cls": Classification(2, fed_by="seg")}, {"av": 3, "vessel": 2}],
    ids=["segmentation+classification", "two-segmentations"],
)
def test_training_lowers_every_task_loss(tasks: dict[str, Any]) -> None:
    net = adapters.smp.multitask("Unet", tasks, encoder_name="resnet18", encoder_weights=None, encoder_depth=3,
                                 decoder_channels=(32, 16, 8))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 32, 32, generator=g)
    targets = {"seg": torch.randint(0, 2, (4, 32, 32), generator=g), "cls": torch.tensor([0, 1, 1, 0]),
               "av": torch.randint(0, 3, (4, 32, 32), generator=g), "vessel": torch.randint(0, 2, (4, 32, 32), generator=g)}
    batches = {t: (x, targets[t]) for t in tasks}
    result = train_lowers_losses(net, batches, {t: F.cross_entropy for t in tasks}, steps=6, lr=0.05)
    for task, (before, after) in result.items():
        assert after < before, (task, before, after)


def test_dtype_and_state_dict_round_trip() -> None:
    def build() -> adapters.MultiTaskModel:
        torch.manual_seed(5)
        return adapters.smp.multitask(_unet("resnet18"), TASK_SETS[2]).double()

    net = build()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    assert net(x, "cls").dtype == torch.float64
    perturb_slices(net)
    state_dict_round_trip(net, build(), x, "cls")


def test_export_goes_through_torch_export(unets: dict[str, nn.Module]) -> None:
    net = adapters.smp.multitask(unets["resnet18"], {"a": 2, "b": 3}).eval()
    perturb_slices(net)
    x = torch.randn(1, 3, 64, 64)
    exported = torch.export.export(net.export("b"), (x,)).module()
    with torch.no_grad():
        assert deviation(exported(x), net(x, "b")) == 0.0


def test_merge_in_place_gives_the_smp_encoder_back(unets: dict[str, nn.Module]) -> None:
    net = adapters.smp.multitask(unets["resnet18"], {"seg": 2, "vessel": 1})
    perturb_slices(net)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        trained = net(x, "vessel")
    adapters.merge(net)
    assert not any(".parametrizations." in n for n, _ in net.named_parameters())
    fresh = _unet("resnet18").eval()
    fresh.encoder.load_state_dict(net.encoder.state_dict())
    with torch.no_grad():
        assert deviation(net(x, "vessel"), trained) == 0.0
        assert deviation(fresh.encoder(x), net.encoder(x)) == 0.0
        assert deviation(net.export("vessel")(x), trained) == 0.0


def test_errors() -> None:
    with pytest.raises(TypeError, match="smp SegmentationModel"):
        adapters.smp.multitask(nn.Linear(2, 2), {"a": 2, "b": 2})
    with pytest.raises(ValueError, match="fed_by='x', which is not a segmentation task"):
        adapters.smp.multitask("Unet", {"a": 2, "b": Classification(2, fed_by="x")}, encoder_weights=None)
    with pytest.raises(TypeError, match="must be an int"):
        adapters.smp.multitask("Unet", {"a": 2, "b": "seg"}, encoder_weights=None)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="classes must be an int >= 1"):
        Segmentation(0)
    with pytest.raises(TypeError, match="only apply when model is an smp architecture name"):
        adapters.smp.multitask(_unet("resnet18"), {"a": 2, "b": 2}, classes=3)
