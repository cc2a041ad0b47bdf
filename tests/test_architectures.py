"""The networks of `architectures` (HPS, STL, MTAN, CTAN) in 2D and 3D, and their MT-COOL wiring."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any, Union

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import architectures as A
from cooperative_opt import CooperativeOptimizer, task_slices

KINDS = ("joint", "independent", "mtan", "ctan")
DIMS = (2, 3)
TASKS: dict[str, A.TaskSpec] = {"seg": A.PixelTask(2), "cls": A.ImageTask(3)}
pytestmark = pytest.mark.filterwarnings("ignore:with samples=1 and consistency_reference='mean'")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks run faster on one thread, and leave the other core alone
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _backbone(dims: int) -> A.Backbone:
    return A.Backbone(dims, 1, (4, 8, 8)) if dims == 3 else A.Backbone(2, 1, (4, 8, 16))


def _input(dims: int, batch: int = 2) -> Tensor:
    return torch.randn(batch, 1, *((8,) * 3 if dims == 3 else (16, 16)))


Network = Union[A.HardSharingNetwork, A.MTAN, A.CTAN]


def _networks(kind: str, dims: int, tasks: dict[str, A.TaskSpec] | None = None, **kwargs: Any) -> list[Network]:
    """The networks of one method: one multi-task network, or one single-task network per task (STL)."""
    tasks = TASKS if tasks is None else tasks
    backbone = _backbone(dims)
    if kind == "independent":
        return [A.independent(t, s, backbone) for t, s in tasks.items()]
    builders: dict[str, Callable[..., Network]] = {"joint": A.joint, "mtan": A.mtan, "ctan": A.ctan}
    build = builders[kind]
    return [build(tasks, backbone, **kwargs)]


def _expected(spec: A.TaskSpec, x: Tensor) -> tuple[int, ...]:
    if isinstance(spec, A.PixelTask):
        return (x.shape[0], spec.channels, *x.shape[2:])
    return (x.shape[0], spec.outputs)


def _loss(out: Tensor) -> Tensor:
    """A loss whose gradient reaches every output element with a generic (never cancelling) weight."""
    weight = torch.linspace(-1.0, 2.0, out.numel(), device=out.device).reshape(out.shape)
    return (out * weight).sum() + out.square().mean()


def _params(module: nn.Module | None) -> list[nn.Parameter]:
    return [] if module is None else list(module.parameters())


# ------------------------------------------------------------------ shapes, gradients, determinism, checkpoints


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("kind", KINDS)
def test_output_shapes_and_one_pass(kind: str, dims: int) -> None:
    x = _input(dims)
    for net in _networks(kind, dims):
        assert isinstance(net, A.MultiTaskNetwork)
        net.eval()
        outputs = net.forward_all(x)
        assert list(outputs) == list(net.task_names)
        for task, out in outputs.items():
            assert tuple(out.shape) == _expected(TASKS[task], x)
            assert torch.allclose(net(x, task), out, atol=1e-6)
        if kind == "independent":
            (task,) = net.task_names
            assert torch.equal(net(x), outputs[task])
        with pytest.raises(ValueError, match="unknown task"):
            net(x, "nope")


@pytest.mark.parametrize("kind", KINDS)
def test_sizes_that_do_not_halve_evenly(kind: str) -> None:
    x = torch.randn(2, 1, 15, 13)
    for net in _networks(kind, 2):
        for task, out in net.eval().forward_all(x).items():
            assert tuple(out.shape) == _expected(TASKS[task], x)


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_parameter_gets_a_gradient(kind: str, dims: int) -> None:
    x = _input(dims)
    for net in _networks(kind, dims):
        net.train()
        loss = torch.stack([_loss(out) for out in net.forward_all(x).values()]).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        dead = [n for n, p in net.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
        assert not dead, dead


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_network(kind: str, dims: int) -> None:
    x = _input(dims)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append([net.train().forward_all(x) for net in _networks(kind, dims)])
    for first, second in zip(*runs):
        for task in first:
            assert torch.equal(first[task], second[task])
    torch.manual_seed(8)
    other = [net.train().forward_all(x) for net in _networks(kind, dims)]
    assert any(not torch.equal(o[t], r[t]) for o, r in zip(other, runs[0]) for t in o)


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(kind: str, dims: int) -> None:
    x = _input(dims)
    trained = _networks(kind, dims)
    for net in trained:
        net.train().forward_all(_input(dims, 4))  # BatchNorm running statistics move
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    torch.manual_seed(123)
    fresh = _networks(kind, dims)
    for source, target in zip(trained, fresh):
        target.load_state_dict(source.state_dict())
        source.eval()
        target.eval()
        expected, got = source.forward_all(x), target.forward_all(x)
        assert all(torch.equal(expected[t], got[t]) for t in expected)


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("kind", KINDS)
def test_parameters_are_partitioned(kind: str, dims: int) -> None:
    for net in _networks(kind, dims):
        shared = net.shared()
        parts = [("shared", _params(shared))]
        for t in net.task_names:
            parts.append((f"task_encoder({t})", _params(net.task_encoder(t))))
            parts.append((f"task_head({t})", _params(net.task_head(t))))
        owner: dict[int, list[str]] = {}
        for where, params in parts:
            for p in params:
                owner.setdefault(id(p), []).append(where)
        assert all(len(w) == 1 for w in owner.values()), [w for w in owner.values() if len(w) > 1]
        assert set(owner) == {id(p) for p in net.parameters()}
        encoders = [net.task_encoder(t) for t in net.task_names]
        if kind == "ctan":
            assert shared is None and all(e is not None and _params(e) for e in encoders)
        else:
            assert shared is not None and _params(shared) and all(e is None for e in encoders)
        assert all(_params(net.task_head(t)) for t in net.task_names)


# ------------------------------------------------------------------ the architectures themselves


def _stream(net: A.CTAN, task: str) -> Any:
    """Task ``task``'s CTAN stream: ``encoder``, ``attention`` (by stage) and ``bottleneck``."""
    return net.task_encoder(task)


def _attention(net: A.CTAN, task: str, stage: int) -> nn.Module:
    module: nn.Module = _stream(net, task).attention[str(stage)]
    return module


def _heads(net: A.MTAN) -> list[Any]:
    """MTAN's per-task modules: ``encoder_masks``, ``decoder_masks`` and ``output``."""
    return [net.task_head(t) for t in net.task_names]


def _nudge(module: nn.Module, scale: float = 0.2) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def _reads(net: Network, reader: str, nudged: nn.Module | None, x: Tensor) -> bool:
    """Whether ``reader``'s prediction changes when only the parameters of ``nudged`` move.

    In train mode: batch statistics keep every layer's activations at unit scale, whereas the fresh running
    statistics of eval mode let them shrink layer after layer until a deep path's influence is ~1e-9.
    """
    assert nudged is not None
    net.train()
    before = net(x, reader).detach().clone()
    saved = copy.deepcopy(nudged.state_dict())
    _nudge(nudged)
    after = net(x, reader).detach()
    nudged.load_state_dict(saved)
    assert torch.equal(net(x, reader), before)
    return not torch.equal(before, after)


@pytest.mark.parametrize("dims", DIMS)
def test_ctan_tasks_read_each_other(dims: int) -> None:
    x = _input(dims)
    three: dict[str, A.TaskSpec] = {"seg": A.PixelTask(2), "cls": A.ImageTask(3), "aux": A.ImageTask(1)}
    net = A.ctan(three, _backbone(dims))
    assert net.encoder_stages == (1,) and net.staged
    for reader in three:
        for other in three:
            if other != reader:
                assert _reads(net, reader, net.task_encoder(other), x), (reader, other)
                assert not _reads(net, reader, net.task_head(other), x), (reader, other)
    # CTAE feeds the stream: task seg's stage-1 attention changes what cls's attention reads later on
    assert _reads(net, "cls", _attention(net, "seg", 1), x)
    # without any cross-task attention the streams are independent networks
    alone = A.ctan(three, _backbone(dims), encoder_stages=(), bottleneck=False)
    assert not alone.cross_task
    assert not _reads(alone, "seg", alone.task_encoder("cls"), x)
    assert _reads(alone, "seg", alone.task_encoder("seg"), x)
    # each component alone already lets a task read the other
    for stages, bottleneck in (((), True), ((0, 1), False)):
        partial = A.ctan(TASKS, _backbone(dims), encoder_stages=stages, bottleneck=bottleneck)
        assert _reads(partial, "seg", partial.task_encoder("cls"), x), (stages, bottleneck)


def test_ctan_without_attention_is_independent() -> None:
    """With CTAE and CTAB off, each task's prediction is that of its STL network with the same weights."""
    x = _input(2)
    net = A.ctan(TASKS, _backbone(2), encoder_stages=(), bottleneck=False).eval()
    for task, spec in TASKS.items():
        single = A.independent(task, spec, _backbone(2)).eval()
        single.encoder.load_state_dict(_stream(net, task).encoder.state_dict())
        single.heads[task].load_state_dict(net.task_head(task).state_dict())
        assert torch.equal(single(x), net(x, task))


def test_cross_task_attention_reads_the_sources() -> None:
    attend = A.CrossTaskAttention(8, heads=2, tokens=2)
    x, a, b = torch.randn(2, 8, 5, 6), torch.randn(2, 8, 5, 6), torch.randn(2, 8, 3, 3)
    assert not torch.allclose(attend(x, [a]), attend(x, [b]))
    assert not torch.allclose(attend(x, [a]), attend(x, [a, b]))
    # two sources equal to one: the same tokens twice give the same softmax average
    assert torch.allclose(attend(x, [a]), attend(x, [a, a]), atol=1e-6)
    with torch.no_grad():
        attend.scale.zero_()
    assert torch.equal(attend(x, [a]), x)  # the residual branch is all that is added


class _Ones(nn.Module):
    """An attention mask of ones (broadcast over channels): MTAN without attention."""

    def forward(self, x: Tensor) -> Tensor:
        return x.new_ones(x.shape[0], 1, *x.shape[2:])


@pytest.mark.parametrize("dims", DIMS)
def test_mtan_with_unit_masks_is_the_shared_network(dims: int) -> None:
    """Masks of ones make every task read the shared encoder and decoder unchanged (differential test)."""
    x = _input(dims)
    net = A.mtan(TASKS, _backbone(dims)).eval()
    with torch.no_grad():
        full = net.forward_all(x)
    for head in _heads(net):
        head.encoder_masks = nn.ModuleList(_Ones() for _ in head.encoder_masks)
        if head.decoder_masks is not None:
            head.decoder_masks = nn.ModuleList(_Ones() for _ in head.decoder_masks)
    shared = net.shared_network
    features = shared.encoder(x)
    assert shared.decoder is not None
    heads = dict(zip(net.task_names, _heads(net)))
    assert torch.allclose(net(x, "cls"), heads["cls"].output(features[-1]))
    assert torch.allclose(net(x, "seg"), heads["seg"].output(shared.decoder(features)))
    assert not torch.allclose(full["seg"], net(x, "seg"))  # the real masks do something


def test_mtan_attention_is_private() -> None:
    x = _input(2)
    net = A.mtan(TASKS, _backbone(2))
    assert _reads(net, "seg", _heads(net)[0].encoder_masks[1], x)
    assert not _reads(net, "seg", net.task_head("cls"), x)
    assert _reads(net, "cls", net.shared_network.encoder, x)
    only_images = A.mtan({"a": A.ImageTask(2), "b": A.ImageTask(2)}, _backbone(2))
    assert only_images.shared_network.decoder is None  # nothing would read it


# ------------------------------------------------------------------ MT-COOL


def _batches(net: Network, dims: int) -> dict[str, tuple[Tensor, Tensor]]:
    batches = {}
    for task in net.task_names:
        x = _input(dims, 4)
        batches[task] = (x, torch.randn(*_expected(TASKS[task], x)))
    return batches


def _owned_by(net: Network, owned: dict[str, list[tuple[str, nn.Parameter]]] | None, task: str) -> set[int]:
    slices = task_slices(net)[task] if owned is None else owned[task]
    return {id(p) for _, p in slices} | {id(p) for p in net.task_head(task).parameters()}


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("kind", ["joint", "mtan", "ctan"])
def test_mt_cool_moves_only_the_stepping_tasks_parameters(kind: str, dims: int) -> None:
    (net,) = _networks(kind, dims)
    x = _input(dims)
    net.eval()
    with torch.no_grad():
        before = net.forward_all(x)
    tasks, owned = A.cooperative(net, {t: F.mse_loss for t in net.task_names})
    assert (owned is None) == (kind != "ctan")
    with torch.no_grad():
        after = net.forward_all(x)
    assert all(torch.allclose(before[t], after[t], atol=1e-5) for t in before)  # the split preserves the function
    net.train()
    opt = CooperativeOptimizer(net, tasks, torch.optim.SGD, task_parameters=owned, lr=0.1, seed=0)
    batches = _batches(net, dims)
    for task in net.task_names:
        own = _owned_by(net, owned, task)
        values = {id(p): p.detach().clone() for p in net.parameters()}
        report = opt.step({task: batches[task]})
        assert task in report.losses and report.skipped == {t: "no batch" for t in net.task_names if t != task}
        moved = {id(p) for p in net.parameters() if not torch.equal(values[id(p)], p)}
        assert moved and moved <= own, (task, len(moved - own))
    report = opt.step(batches)
    assert sorted(report.losses) == sorted(net.task_names) and not report.skipped


@pytest.mark.parametrize("attention", [True, False])
def test_mt_cool_noise_on_other_ctan_streams_changes_the_loss(attention: bool) -> None:
    net = A.ctan(TASKS, _backbone(2), encoder_stages=None if attention else (), bottleneck=attention).eval()
    tasks, owned = A.cooperative(net, {t: F.mse_loss for t in net.task_names})
    opt = CooperativeOptimizer(net, tasks, torch.optim.SGD, task_parameters=owned, lr=0.1, seed=0)
    batches = _batches(net, 2)
    for name in opt.iteration():
        x, y = batches[name]
        with torch.no_grad():
            clean = F.mse_loss(net(x, name), y)
        with opt.perturb(name):
            noisy = F.mse_loss(net(x, name), y)
        assert (not torch.equal(clean, noisy)) == attention, name
        noisy.backward()  # type: ignore[no-untyped-call]
        opt.step()
        opt.zero_grad()


def test_cooperative_validates_and_is_idempotent() -> None:
    net = A.joint(TASKS, _backbone(2))
    losses = {t: F.mse_loss for t in TASKS}
    with pytest.raises(ValueError, match="losses"):
        A.cooperative(net, {"seg": F.mse_loss})
    with pytest.raises(ValueError, match="consistency"):
        A.cooperative(net, losses, consistency={"seg": None})
    with pytest.raises(TypeError, match="net"):
        A.cooperative(nn.Linear(2, 2), losses)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="single task"):
        A.cooperative(A.independent("seg", TASKS["seg"], _backbone(2)), {"seg": F.mse_loss})
    with pytest.raises(ValueError, match="unknown task"):
        net.task_head("nope")
    A.cooperative(net, losses)
    tasks, owned = A.cooperative(net, losses, consistency={"seg": None, "cls": "auto"})  # already split: kept
    assert owned is None and [t.consistency for t in tasks] == [None, "auto"]
    assert sorted(task_slices(net)) == sorted(TASKS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["joint", "mtan", "ctan"])
def test_runs_on_device_with_any_optimizer(kind: str, device: str) -> None:
    (net,) = _networks(kind, 2)
    net.to(device).train()
    x = _input(2, 4).to(device)
    targets = {t: torch.randn(*_expected(s, x), device=device) for t, s in TASKS.items()}
    base = torch.optim.AdamW(net.parameters(), lr=1e-2)

    def loss() -> Tensor:
        return torch.stack([F.mse_loss(out, targets[t]) for t, out in net.forward_all(x).items()]).sum()

    first = float(loss().detach())
    for _ in range(6):
        base.zero_grad()
        loss().backward()  # type: ignore[no-untyped-call]
        base.step()
    assert float(loss().detach()) < first
    tasks, owned = A.cooperative(net, {t: F.mse_loss for t in TASKS})
    opt = CooperativeOptimizer(net, tasks, torch.optim.Adam, task_parameters=owned, lr=1e-3, seed=0)
    report = opt.step({t: (x, targets[t]) for t in TASKS})
    assert sorted(report.losses) == sorted(TASKS)


# ------------------------------------------------------------------ smp encoders


def test_smp_encoder_backbone() -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    backbone = A.Backbone(2, 3, encoder=lambda: smp.encoders.get_encoder("resnet18", weights=None, depth=4))
    x = torch.randn(2, 3, 32, 32)
    for build in (A.joint, A.ctan):
        net: Network = build(TASKS, backbone)
        outputs = net.forward_all(x)
        assert {t: tuple(o.shape) for t, o in outputs.items()} == {"seg": (2, 2, 32, 32), "cls": (2, 3)}
        torch.stack([_loss(o) for o in outputs.values()]).sum().backward()  # type: ignore[no-untyped-call]
    assert isinstance(net, A.CTAN) and not net.staged and net.encoder_stages == (1, 2, 3)
    assert _reads(net, "seg", net.task_encoder("cls"), x)
    # an opaque encoder runs whole: CTAE acts on the maps it returns, which only the task itself reads further
    assert _reads(net, "seg", _attention(net, "seg", 2), x)
    assert not _reads(net, "seg", _attention(net, "cls", 2), x)


# ------------------------------------------------------------------ bad input


def test_bad_input_names_the_argument() -> None:
    good = _backbone(2)
    with pytest.raises(ValueError, match="dims"):
        A.Backbone(4, 1)
    with pytest.raises(ValueError, match="dims"):
        A.Backbone(True, 1)
    with pytest.raises(ValueError, match="in_channels"):
        A.Backbone(2, 0)
    with pytest.raises(ValueError, match="widths"):
        A.Backbone(2, 1, ())
    with pytest.raises(ValueError, match="widths"):
        A.Backbone(2, 1, (4, -8))
    with pytest.raises(TypeError, match="encoder"):
        A.Backbone(2, 1, encoder=nn.Conv2d(1, 4, 3))  # a module is callable, but not a factory
    with pytest.raises(TypeError, match="out_channels"):
        A.joint(TASKS, A.Backbone(2, 1, encoder=lambda: nn.Conv2d(1, 4, 3)))
    shared = A.Backbone(2, 1).build()
    with pytest.raises(ValueError, match="new encoder on every call"):
        A.ctan(TASKS, A.Backbone(2, 1, encoder=lambda: shared))
    with pytest.raises(ValueError, match="PixelTask.channels"):
        A.PixelTask(0)
    with pytest.raises(ValueError, match="ImageTask.outputs"):
        A.ImageTask(True)
    builders: tuple[Callable[..., Network], ...] = (A.joint, A.mtan, A.ctan)
    for build in builders:
        with pytest.raises(ValueError, match="tasks"):
            build({}, good)
        with pytest.raises(ValueError, match="at least 2"):
            build({"seg": A.PixelTask(1)}, good)
        with pytest.raises(TypeError, match=r"tasks\['seg'\]"):
            build({"seg": 3, "cls": A.ImageTask(2)}, good)
        with pytest.raises(TypeError, match="tasks must map"):
            build([("seg", A.PixelTask(1))], good)
        with pytest.raises(TypeError, match="backbone"):
            build(TASKS, "resnet18")
    with pytest.raises(TypeError, match="PixelTask"):
        A.independent("seg", 2, good)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backbone has encoder"):
        A.mtan(TASKS, A.Backbone(2, 1, encoder=lambda: A.Backbone(2, 1).build()))
    with pytest.raises(ValueError, match="encoder_stages"):
        A.ctan(TASKS, good, encoder_stages=(2,))  # the deepest stage is the bottleneck's
    with pytest.raises(ValueError, match="encoder_stages"):
        A.ctan(TASKS, good, encoder_stages=(1, 1))
    with pytest.raises(TypeError, match="encoder_stages"):
        A.ctan(TASKS, good, encoder_stages=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="heads"):
        A.ctan(TASKS, good, heads=0)
    with pytest.raises(ValueError, match="tokens"):
        A.ctan(TASKS, good, tokens=0)
    with pytest.raises(TypeError, match="bottleneck"):
        A.ctan(TASKS, good, bottleneck=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="task must name"):
        A.joint(TASKS, good)(_input(2))
