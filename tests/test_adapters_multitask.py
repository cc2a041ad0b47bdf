"""The plain adapter (any encoder + the user's heads), MultiTaskModel, make_tasks and optional extras."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapters
from cooperative_opt import CooperativeOptimizer
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


def _encoder() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 7, 3), nn.BatchNorm2d(7), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(28, 11), nn.ReLU())


def _heads(names: list[str]) -> dict[str, nn.Module]:
    return {n: nn.Linear(11, 3 + i) for i, n in enumerate(names)}


@pytest.mark.parametrize("tasks", [2, 3, 4])
def test_plain_encoder_is_preserved_owned_and_trains(tasks: int) -> None:
    names = [f"t{i}" for i in range(tasks)]
    encoder = _encoder().eval()
    reference = copy.deepcopy(encoder)
    x = torch.randn(4, 1, 8, 8)
    net = adapters.multitask(encoder, _heads(names))
    assert net.encoder is encoder and net.task_names == tuple(names)
    assert deviation(net.encoder(x), reference(x)) == 0.0
    check_ownership(net, numel(reference))
    net.train()
    batches = {n: (torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))) for n in names}
    result = train_lowers_losses(net, batches, {n: F.cross_entropy for n in names}, steps=10, lr=0.1)
    for task, (before, after) in result.items():
        assert after < before, (task, before, after)


def test_torchvision_resnet18_zoo() -> None:
    torchvision = pytest.importorskip("torchvision")
    for dtype in (torch.float32, torch.float64):
        for tasks in (2, 3, 4):
            backbone = torchvision.models.resnet18(weights=None)
            backbone.fc = nn.Identity()
            backbone = backbone.to(dtype).eval()
            x = torch.randn(2, 3, 32, 32, dtype=dtype)
            with torch.no_grad():
                before = backbone(x)
            total = numel(backbone)
            names = [f"t{i}" for i in range(tasks)]
            net = adapters.multitask(backbone, {n: nn.Linear(512, 2) for n in names}).to(dtype)
            with torch.no_grad():
                assert deviation(net.encoder(x), before) <= TOLERANCE
            check_ownership(net, total)
    perturb_slices(net)
    with torch.no_grad():
        trained = net.encoder(x)
    adapters.merge(net)
    fresh = torchvision.models.resnet18(weights=None)
    fresh.fc = nn.Identity()
    fresh = fresh.to(torch.float64).eval()
    fresh.load_state_dict(net.encoder.state_dict())
    with torch.no_grad():
        assert deviation(fresh(x), trained) == 0.0


def test_feeds_forward_tasks_and_export() -> None:
    class Fed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(11 + 3, 2)

        def forward(self, features: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
            return self.linear(torch.cat([features, source], 1))

    net = adapters.multitask(_encoder(), {"seg": nn.Linear(11, 3), "cls": Fed()}, feeds={"cls": "seg"}).eval()
    x = torch.randn(3, 1, 8, 8)
    outputs = net.forward_tasks(x)
    assert list(outputs) == ["seg", "cls"]
    assert torch.equal(outputs["cls"], net(x, "cls"))
    perturb_slices(net)
    plain = net.export("cls")
    assert isinstance(plain, adapters.TaskModel)
    assert not any(".parametrizations." in n for n, _ in plain.named_parameters())
    assert deviation(plain(x), net(x, "cls")) == 0.0
    assert adapters.export(net, "seg")(x).shape == (3, 3)


def test_dtype_device_and_state_dict_round_trip() -> None:
    net = adapters.multitask(_encoder(), _heads(["a", "b"])).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    assert net(x, "a").dtype == torch.float64
    net = net.to("cpu")
    fresh = adapters.multitask(_encoder(), _heads(["a", "b"])).double()
    perturb_slices(net)
    state_dict_round_trip(net, fresh, x, "b")


def test_make_tasks_plugs_into_the_optimizer() -> None:
    net = adapters.multitask(_encoder(), _heads(["a", "b"]))
    tasks = adapters.make_tasks(net, {"a": F.cross_entropy, "b": F.cross_entropy}, consistency={"a": None, "b": "auto"})
    assert [t.name for t in tasks] == ["a", "b"]
    assert tasks[0].consistency is None and tasks[0].head is net.heads["a"]
    assert tasks[1].inputs((torch.zeros(1), torch.zeros(1)))[1] == "b"
    CooperativeOptimizer(net, tasks, torch.optim.SGD, lr=0.1, consistency_reference="clean")
    with pytest.raises(ValueError, match=r"one loss per task \['a', 'b'\]"):
        adapters.make_tasks(net, {"a": F.cross_entropy})
    with pytest.raises(ValueError, match=r"consistency has no entry for tasks \['b'\]"):
        adapters.make_tasks(net, {"a": F.cross_entropy, "b": F.cross_entropy}, consistency={"a": None})
    with pytest.raises(TypeError, match=r"losses of tasks \['b'\] are not callable"):
        adapters.make_tasks(net, {"a": F.cross_entropy, "b": 3})  # type: ignore[dict-item]


def test_make_tasks_pickle() -> None:
    import pickle

    net = adapters.multitask(_encoder(), _heads(["a", "b"]))
    again = pickle.loads(pickle.dumps(adapters.make_tasks(net, {"a": F.cross_entropy, "b": F.cross_entropy})))
    x, y = torch.randn(3, 2), torch.tensor([0, 1, 1])
    assert again[1].inputs((x, y)) == (x, "b")
    torch.testing.assert_close(again[0].loss(x, (x, y)), F.cross_entropy(x, y))


def test_make_tasks_takes_the_heads_of_any_model() -> None:
    net = adapters.multitask(_encoder(), _heads(["a", "b"]))
    plain = nn.Module()
    tasks = adapters.make_tasks(plain, {"b": F.cross_entropy, "a": F.cross_entropy},
                                heads={"b": net.heads["b"], "a": net.heads["a"]})
    assert [t.name for t in tasks] == ["b", "a"] and tasks[0].head is net.heads["b"]
    with pytest.raises(TypeError, match="for another model pass heads="):
        adapters.make_tasks(plain, {"a": F.cross_entropy})
    with pytest.raises(TypeError, match="non-empty mapping"):
        adapters.make_tasks(plain, {}, heads={})


def test_validation_errors_leave_the_encoder_unsplit() -> None:
    encoder = _encoder()
    shared = nn.Linear(11, 2)
    with pytest.raises(ValueError, match="heads.a.weight"):
        adapters.multitask(encoder, {"a": shared, "b": shared})
    with pytest.raises(ValueError, match="encoder.5.weight"):
        adapters.multitask(encoder, {"a": encoder[5], "b": nn.Linear(11, 2)})
    with pytest.raises(ValueError, match="at least two tasks"):
        adapters.multitask(encoder, {"a": nn.Linear(11, 2)})
    with pytest.raises(ValueError, match="without '.'"):
        adapters.multitask(encoder, {"a.b": nn.Linear(11, 2), "c": nn.Linear(11, 2)})
    with pytest.raises(TypeError, match="nn.Module instances"):
        adapters.multitask(encoder, {"a": nn.Linear(11, 2), "b": "head"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="feeds"):
        adapters.multitask(encoder, _heads(["a", "b"]), feeds={"a": "z"})
    with pytest.raises(ValueError, match="reads 'b', which itself reads"):
        adapters.multitask(encoder, _heads(["a", "b", "c"]), feeds={"a": "b", "b": "c"})
    assert not any(".parametrizations." in n for n, _ in encoder.named_parameters())
    net = adapters.multitask(encoder, _heads(["a", "b"]))
    with pytest.raises(ValueError, match=r"unknown task 'z'; this model's tasks are \['a', 'b'\]"):
        net(torch.zeros(1, 1, 8, 8), "z")


def test_unsplit_model_is_the_joint_baseline() -> None:
    net = adapters.MultiTaskModel(_encoder(), _heads(["a", "b"]))
    with pytest.raises(ValueError, match="holds no channel-split module"):
        adapters.task_parameters(net)


def test_import_adapters_needs_only_torch() -> None:
    code = (
        "import sys, adapters, adapters.timm, adapters.smp, adapters.monai; "
        "bad = [m for m in ('timm', 'segmentation_models_pytorch', 'monai') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("family", "module", "call"),
    [
        ("timm", "timm", lambda m: m.multitask("resnet18", {"a": 2, "b": 2})),
        ("smp", "segmentation_models_pytorch", lambda m: m.multitask("Unet", {"a": 2, "b": 2})),
        ("monai", "monai.networks.nets", lambda m: m.multitask(nn.Linear(1, 1), {"a": 2, "b": 2})),
    ],
)
def test_missing_extra_names_what_to_install(monkeypatch: pytest.MonkeyPatch, family: str, module: str,
                                            call: object) -> None:
    import importlib

    adapter = importlib.import_module(f"adapters.{family}")
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ImportError, match=rf"pip install 'cooperative-opt\[{family}\]'"):
        call(adapter)  # type: ignore[operator]
    assert getattr(adapters, family) is adapter


def test_fed_classifier_survives_a_mixing_layer_driven_negative() -> None:
    """Regression: with large segmentation logits an Adam step can push every mixed unit below zero; the
    ReLU then dies and the head outputs one constant for every image (seen on the REFUGE benchmark).
    The batch normalization after the mixing convolution re-centres the units, so the signal survives."""
    from adapters import FedClassifier

    torch.manual_seed(0)
    fed = FedClassifier(8, 3, 2)
    with torch.no_grad():
        fed.mix.weight[:, 8:] = -1.0  # every unit now reads minus the (positive, large) segmentation logits
    deep = [torch.randn(6, 8, 4, 4).relu()]
    source = 50.0 + torch.rand(6, 3, 16, 16)
    with torch.no_grad():
        logits = fed(deep, source)
    assert float(logits.std(dim=0).min()) > 1e-6  # images are told apart (a dead head gives exactly 0)
    pre_activation = fed.norm(fed.mix(torch.cat([deep[0], F.adaptive_avg_pool2d(source, (4, 4))], 1)))
    active = (pre_activation > 0).float().mean(dim=(0, 2, 3))
    assert bool(((active > 0.2) & (active < 0.8)).all())
