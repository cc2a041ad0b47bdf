"""adapters.monai: BasicUNet, UNet and DynUNet in 2D and 3D."""

from __future__ import annotations

import copy
from collections.abc import Callable

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

nets = pytest.importorskip("monai.networks.nets")
import adapters  # noqa: E402
import adapters.monai  # noqa: E402
from adapters import Classification, Segmentation  # noqa: E402

Factory = Callable[[int], nn.Module]

ZOO: dict[str, tuple[Factory, tuple[int, ...]]] = {
    "BasicUNet-2d": (lambda k: nets.BasicUNet(2, 1, k, features=(4, 4, 8, 8, 16, 4)), (2, 1, 32, 32)),
    "BasicUNet-3d": (lambda k: nets.BasicUNet(3, 1, k, features=(4, 4, 8, 8, 16, 4)), (1, 1, 32, 32, 32)),
    "UNet-2d-residual": (lambda k: nets.UNet(2, 1, k, channels=(4, 8, 16), strides=(2, 2), num_res_units=2),
                         (2, 1, 32, 32)),
    "UNet-3d": (lambda k: nets.UNet(3, 1, k, channels=(4, 8, 16, 16), strides=(2, 2, 2), num_res_units=0),
                (1, 1, 16, 16, 16)),
    "DynUNet-2d": (lambda k: nets.DynUNet(2, 1, k, kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2],
                                          upsample_kernel_size=[2, 2, 2], filters=[4, 8, 16, 16]), (2, 1, 32, 32)),
    "DynUNet-3d": (lambda k: nets.DynUNet(3, 1, k, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                                          upsample_kernel_size=[2, 2], filters=[4, 8, 8], res_block=True),
                   (1, 1, 16, 16, 16)),
}

TASK_SETS = {
    2: {"a": 2, "cls": Classification(3, fed_by="a")},
    3: {"a": 2, "b": Segmentation(3), "cls": Classification(2)},
    4: {"a": 2, "b": 1, "cls": Classification(2, fed_by="b"), "grade": Classification(4)},
}


@pytest.fixture(scope="module")
def zoo() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: make(2).eval() for name, (make, _) in ZOO.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_is_function_preserving(zoo: dict[str, nn.Module], name: str, dtype: torch.dtype) -> None:
    model = copy.deepcopy(zoo[name]).to(dtype)
    x = torch.randn(*ZOO[name][1], dtype=dtype)
    with torch.no_grad():
        before = model(x)
    for count, tasks in TASK_SETS.items():
        net = adapters.monai.multitask(model, tasks)
        assert len(net.task_names) == count and not net.training
        assert not any(m.training for m in net.modules())  # the model's eval mode is kept
        encoder_numel = numel(net.encoder)
        with torch.no_grad():
            assert deviation(net(x, "a"), before) <= TOLERANCE  # the first task keeps the up path
            outputs = net.forward_tasks(x)
        for task, spec in tasks.items():
            classes = spec if isinstance(spec, int) else spec.classes
            assert outputs[task].shape[:2] == (x.shape[0], classes) and outputs[task].dtype == dtype
            if not isinstance(spec, Classification):
                assert outputs[task].shape[2:] == x.shape[2:]
        check_ownership(net, encoder_numel)
    assert all(".parametrizations." not in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("name", list(ZOO))
def test_export_loads_into_a_fresh_network(zoo: dict[str, nn.Module], name: str) -> None:
    make, shape = ZOO[name]
    net = adapters.monai.multitask(zoo[name], {"a": 2, "b": 3, "c": Classification(2, fed_by="b")})
    perturb_slices(net)
    with torch.no_grad():
        for p in net.heads["b"].parameters():
            p.add_(0.01)
    x = torch.randn(*shape)
    for task, classes in (("a", 2), ("b", 3)):
        plain = net.export(task)
        assert not any(".parametrizations." in n for n, _ in plain.named_parameters())
        assert getattr(plain, "out_channels", classes) == classes
        fresh = make(classes).eval()
        fresh.load_state_dict(plain.state_dict())
        with torch.no_grad():
            assert deviation(fresh(x), net(x, task)) == 0.0
    with pytest.raises(ValueError, match="'c' is a classification task"):
        net.export("c")


@pytest.mark.parametrize("name", ["BasicUNet-2d", "UNet-3d", "DynUNet-2d"])
def test_training_lowers_every_task_loss(name: str) -> None:
    make, shape = ZOO[name]
    net = adapters.monai.multitask(make(2), {"seg": 2, "cls": Classification(2, fed_by="seg"), "other": 3})
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 if len(shape) == 5 else 4, *shape[1:], generator=g)
    targets = {"seg": torch.randint(0, 2, (x.shape[0], *x.shape[2:]), generator=g),
               "other": torch.randint(0, 3, (x.shape[0], *x.shape[2:]), generator=g),
               "cls": torch.arange(x.shape[0]) % 2}
    batches = {t: (x, y) for t, y in targets.items()}
    result = train_lowers_losses(net, batches, {t: F.cross_entropy for t in targets}, steps=6, lr=0.05)
    for task, (before, after) in result.items():
        assert after < before, (task, before, after)


def test_dtype_and_state_dict_round_trip() -> None:
    make, shape = ZOO["UNet-2d-residual"]

    def build() -> adapters.MultiTaskModel:
        torch.manual_seed(4)
        return adapters.monai.multitask(make(2), TASK_SETS[4]).double()

    net = build()
    x = torch.randn(*shape, dtype=torch.float64)
    assert net(x, "cls").dtype == torch.float64
    perturb_slices(net)
    state_dict_round_trip(net, build(), x, "b")


def test_export_goes_through_torch_export(zoo: dict[str, nn.Module]) -> None:
    net = adapters.monai.multitask(zoo["BasicUNet-2d"], {"a": 2, "b": 3}).eval()
    perturb_slices(net)
    x = torch.randn(*ZOO["BasicUNet-2d"][1])
    exported = torch.export.export(net.export("b"), (x,)).module()
    with torch.no_grad():
        assert deviation(exported(x), net(x, "b")) == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_conversion_keeps_the_cuda_device() -> None:
    make, shape = ZOO["UNet-2d-residual"]
    net = adapters.monai.multitask(make(2).cuda(), {"a": 2, "b": 3, "c": Classification(2, fed_by="b")})
    assert {p.device.type for p in net.parameters()} == {"cuda"}
    x = torch.randn(*shape, device="cuda")
    assert net(x, "c").device.type == "cuda"
    assert {p.device.type for p in net.export("b").parameters()} == {"cuda"}
    net.cpu()
    assert net(x.cpu(), "b").device.type == "cpu"


def test_errors() -> None:
    with pytest.raises(TypeError, match="BasicUNet, UNet or DynUNet"):
        adapters.monai.multitask(nn.Conv2d(1, 1, 1), {"a": 2, "b": 2})
    supervised = nets.DynUNet(2, 1, 2, kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2],
                              upsample_kernel_size=[2, 2, 2], deep_supervision=True, deep_supr_num=1)
    with pytest.raises(TypeError, match="deep_supervision=False"):
        adapters.monai.multitask(supervised, {"a": 2, "b": 2})
    with pytest.raises(ValueError, match="at least two tasks"):
        adapters.monai.multitask(ZOO["UNet-3d"][0](2), {"a": 2})
