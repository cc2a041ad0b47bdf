"""The method registry (``benchmarks._learners``) and the architecture methods (``mtan``, ``ctan``,
``mtan_mt_cool``, ``ctan_*``) on tiny fake networks of the ``architectures`` protocol."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import adapters
from benchmarks._learners import (
    REGISTRY,
    COOPERATIVE_METHODS,
    DISTRIBUTED_METHODS,
    GRADIENT_METHODS,
    METHODS,
    NETWORK_METHODS,
    Batch,
    CooperativeLearner,
    JointLearner,
    Problem,
    Training,
    build_learner,
    check_offered,
    label,
    offered_methods,
)
import architectures
from tests.test_benchmark_methods import TASKS, _batches, _lenet_like_problem, _parameters


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def _encoder() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 12), nn.Tanh())


class FakeMTAN(nn.Module):
    """MTAN-like: a shared encoder every task reads (``shared()``), one private head per task.

    Built in the order of ``_lenet_like_problem``'s Joint network (encoder, head a, head b) and with its
    attribute names, so one seed gives both the same weights."""

    task_names = TASKS

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _encoder()
        self.heads = nn.ModuleDict({"a": nn.Linear(12, 3), "b": nn.Linear(12, 4)})
        self.calls: list[str] = []

    def forward(self, x: Tensor, task: str) -> Tensor:
        self.calls.append(f"forward:{task}")
        out: Tensor = self.heads[task](self.encoder(x))
        return out

    def forward_all(self, x: Tensor) -> dict[str, Tensor]:
        self.calls.append("forward_all")
        features = self.encoder(x)
        return {task: self.heads[task](features) for task in self.task_names}

    def shared(self) -> nn.Module | None:
        return self.encoder

    def task_encoder(self, task: str) -> nn.Module | None:
        return None

    def task_head(self, task: str) -> nn.Module:
        head: nn.Module = self.heads[task]
        return head


class FakeCTAN(nn.Module):
    """CTAN-like: no shared parameters; each task has its own stream (``task_encoder``) that the other
    task's head also reads (the cross-task part), and a private head."""

    task_names = TASKS

    def __init__(self) -> None:
        super().__init__()
        self.streams = nn.ModuleDict({t: nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh()) for t in TASKS})
        self.heads = nn.ModuleDict({"a": nn.Linear(16, 3), "b": nn.Linear(16, 4)})

    def _features(self, x: Tensor) -> Tensor:
        return torch.cat([self.streams[t](x) for t in self.task_names], dim=1)

    def forward(self, x: Tensor, task: str) -> Tensor:
        out: Tensor = self.heads[task](self._features(x))
        return out

    def forward_all(self, x: Tensor) -> dict[str, Tensor]:
        features = self._features(x)
        return {task: self.heads[task](features) for task in self.task_names}

    def shared(self) -> nn.Module | None:
        return None

    def task_encoder(self, task: str) -> nn.Module | None:
        stream: nn.Module = self.streams[task]
        return stream

    def task_head(self, task: str) -> nn.Module:
        head: nn.Module = self.heads[task]
        return head


def _network_problem() -> Problem:
    base = _lenet_like_problem()
    return Problem(base.tasks, base.multi_task, base.single_task, base.losses,
                   networks={"mtan": FakeMTAN, "ctan": FakeCTAN})


# ---------------------------------------------------------------------------
# Registry


def test_table_order_and_families() -> None:
    assert METHODS == (
        "independent", "joint", "mtan", "ctan", "pcgrad", "mgda", "cagrad", "graddrop", "vanilla", "without_reg",
        "mt_cool", "mt_cool_clean", "mt_cool_m2", "mt_cool_m4", "mt_cool_m2_l10", "mt_cool_m2_jacobi",
        "mtan_mt_cool", "ctan_vanilla", "ctan_without_reg", "ctan_mt_cool",
    )
    assert dict(NETWORK_METHODS) == {"mtan": "mtan", "ctan": "ctan", "mtan_mt_cool": "mtan", "ctan_vanilla": "ctan",
                                     "ctan_without_reg": "ctan", "ctan_mt_cool": "ctan"}
    assert COOPERATIVE_METHODS["ctan_without_reg"] == ("without_reg", "mean")
    assert COOPERATIVE_METHODS["mt_cool_clean"] == ("mt_cool", "clean")
    assert set(DISTRIBUTED_METHODS) == set(METHODS) - set(GRADIENT_METHODS)
    assert offered_methods(()) == tuple(m for m in METHODS if m not in NETWORK_METHODS and not REGISTRY[m].opt_in)
    assert offered_methods(["mtan"]) == tuple(
        m for m in METHODS if NETWORK_METHODS.get(m, "mtan") == "mtan" and not REGISTRY[m].opt_in)
    assert [label(m) for m in ("independent", "joint", "ctan")] == ["independent (STL)", "joint (HPS)", "ctan"]


def test_a_problem_without_the_network_refuses_its_methods_naming_those_it_offers() -> None:
    plain = ",".join(offered_methods(()))
    for method in NETWORK_METHODS:
        with pytest.raises(ValueError, match=rf"\['{method}'\].*Problem.networks.*choose --methods from {plain}$"):
            build_learner(method, _lenet_like_problem(), Training())
    with pytest.raises(ValueError, match=r"methods \['ctan'\] train the \['ctan'\] network.*it has \['mtan'\]"):
        check_offered(["joint", "ctan", "mtan"], ["mtan"])
    check_offered(list(offered_methods(["mtan"])), ["mtan"])  # nothing refused


def test_a_network_off_the_protocol_or_its_tasks_is_refused_by_name() -> None:
    base = _lenet_like_problem()
    broken = Problem(base.tasks, base.multi_task, base.single_task, base.losses,
                     networks={"ctan": lambda: nn.Linear(2, 2)})
    with pytest.raises(TypeError, match=r"networks\['ctan'\] built a Linear without \['task_names', 'forward_all'"):
        build_learner("ctan", broken, Training())

    class OtherTasks(FakeCTAN):
        task_names = ("a", "c")

    wrong = Problem(base.tasks, base.multi_task, base.single_task, base.losses, networks={"ctan": OtherTasks})
    with pytest.raises(ValueError, match=r"for tasks \['a', 'c'\], the problem's tasks are \['a', 'b'\]"):
        build_learner("ctan_mt_cool", wrong, Training())


# ---------------------------------------------------------------------------
# Architecture methods, trained like Joint


def _steps(method: str, problem: Problem, batches: Mapping[str, Batch], steps: int = 3, **kwargs: float) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        learner = build_learner(method, problem, Training(lr=0.1, seed=4, **kwargs))  # type: ignore[arg-type]
    for _ in range(steps):
        losses = learner.train_step(batches)
        assert set(losses) == set(TASKS) and all(torch.isfinite(torch.tensor(list(losses.values()))))
    model: nn.Module = getattr(learner, "model")
    return model


@pytest.mark.parametrize("shared", [False, True])
def test_mtan_trains_like_joint_on_the_same_network(shared: bool) -> None:
    """The fake MTAN is Joint's network under other method names: the two learners must agree exactly."""
    problem, batches = _network_problem(), _batches(shared)
    mtan, joint = _steps("mtan", problem, batches), _steps("joint", problem, batches)
    assert isinstance(mtan, FakeMTAN)
    calls = {"forward_all"} if shared else {"forward:a", "forward:b"}
    assert set(mtan.calls) == calls  # one pass for a shared input, one per task otherwise
    reference = _parameters(joint)
    assert all(torch.equal(p, reference[name]) for name, p in _parameters(mtan).items())


def test_ctan_takes_one_sgd_step_on_the_sum_of_the_task_losses() -> None:
    problem, batches = _network_problem(), _batches(shared=True)
    torch.manual_seed(4)
    reference = FakeCTAN()
    total = sum(F.cross_entropy(out, batches[t][1]) for t, out in reference.forward_all(batches["a"][0]).items())
    grads = torch.autograd.grad(total, list(reference.parameters()))
    model = _steps("ctan", problem, batches, steps=1)
    for (name, p), q, g in zip(model.named_parameters(), reference.parameters(), grads, strict=True):
        torch.testing.assert_close(p, q - 0.1 * g, msg=name)


# ---------------------------------------------------------------------------
# Architecture methods, trained by CooperativeOptimizer


@pytest.mark.parametrize("shared", [False, True])
def test_mtan_mt_cool_splits_the_shared_part_like_mt_cool_splits_the_encoder(shared: bool) -> None:
    problem, batches = _network_problem(), _batches(shared)
    mtan = _steps("mtan_mt_cool", problem, batches, warmup_steps=1)
    joint = _steps("mt_cool", problem, batches, warmup_steps=1)
    assert set(adapters.task_parameters(mtan)) == set(TASKS)  # net.shared() was channel-split
    reference = _parameters(joint)
    assert _parameters(mtan).keys() == reference.keys()
    assert all(torch.equal(p, reference[name]) for name, p in _parameters(mtan).items())


def test_architectures_cooperative_gives_each_ctan_task_its_stream_and_head() -> None:
    net = FakeCTAN()
    tasks, owned = architectures.cooperative(net, dict.fromkeys(TASKS, F.cross_entropy))
    assert [t.name for t in tasks] == list(TASKS)
    assert owned is not None
    assert {t: [n for n, _ in params] for t, params in owned.items()} == {
        t: [f"streams.{t}.1.weight", f"streams.{t}.1.bias"] for t in TASKS}
    assert all(p is dict(net.named_parameters())[n] for params in owned.values() for n, p in params)
    assert list(tasks[1].head_parameters()) == list(net.heads["b"].parameters())


def test_ctan_vanilla_moves_only_the_stepping_task_and_ctan_mt_cool_trains() -> None:
    problem, batches = _network_problem(), _batches(shared=True)
    learner = build_learner("ctan_vanilla", problem, Training(lr=0.1, seed=4))
    assert isinstance(learner, CooperativeLearner) and isinstance(learner.model, FakeCTAN)
    before = _parameters(learner.model)
    # Only task a's batch: a vanilla outer iteration steps task a alone, so b's stream and head stay put.
    learner.train_step({"a": batches["a"]})
    after = _parameters(learner.model)
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved == {"streams.a.1.weight", "streams.a.1.bias", "heads.a.weight", "heads.a.bias"}
    model = _steps("ctan_mt_cool", problem, batches, steps=3, bound=0.01)
    assert isinstance(model, FakeCTAN)


def test_architecture_learners_count_the_architecture_parameters() -> None:
    problem = _network_problem()
    for method, network in NETWORK_METHODS.items():
        learner = build_learner(method, problem, Training())
        expected = sum(p.numel() for p in problem.networks[network]().parameters())
        assert learner.num_parameters == expected, method
        assert isinstance(learner, JointLearner if method in ("mtan", "ctan") else CooperativeLearner)
