"""CooperativeOptimizer's contract: base optimizers, clamp, partial batches, errors, checkpoints, BatchNorm."""

from __future__ import annotations

import copy
import io
import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import adapters
from cooperative_opt import CooperativeOptimizer, StepReport, Task
from tests.conftest import make_batches, make_model, make_tasks, params_of, same

NAMES = ["a", "b"]


def _opt(model: Any, names: list[str] = NAMES, *args: Any, **kwargs: Any) -> CooperativeOptimizer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return CooperativeOptimizer(model, make_tasks(model, names), *args, **kwargs)


def _owned_by(model: Any, opt: CooperativeOptimizer, task: str) -> dict[str, Tensor]:
    ids = {id(p) for tp in opt.task_params if tp.name == task for p in tp.own}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in ids}


# ------------------------------------------------------------------ base optimizers


@pytest.mark.parametrize(
    "factory",
    [
        lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=0.01),
        lambda groups: torch.optim.Adam(groups, lr=1e-2),
        lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1),
        lambda groups: torch.optim.RMSprop(groups, lr=1e-2, momentum=0.5),
        lambda groups: torch.optim.Adagrad(groups, lr=1e-2),
    ],
    ids=["sgd-momentum", "adam", "adamw", "rmsprop", "adagrad"],
)
def test_inactive_task_values_and_state_untouched(factory: Any) -> None:
    model = make_model(NAMES)
    opt = _opt(model, NAMES, factory)
    opt.step(make_batches(NAMES, seed=0))  # both tasks get optimizer state
    a_before = _owned_by(model, opt, "a")
    a_state = {id(p): {k: v.clone() if isinstance(v, Tensor) else v for k, v in opt.base.state[p].items()}
               for tp in opt.task_params if tp.name == "a" for p in tp.own}
    b_before = _owned_by(model, opt, "b")
    report = opt.step({"b": make_batches(NAMES, seed=1)["b"]})
    assert report.skipped == {"a": "no batch"}
    assert same(_owned_by(model, opt, "a"), a_before)
    for tp in opt.task_params:
        if tp.name == "a":
            for p in tp.own:
                for k, v in opt.base.state[p].items():
                    old = a_state[id(p)][k]
                    assert torch.equal(v, old) if isinstance(v, Tensor) else v == old
    assert not same(_owned_by(model, opt, "b"), b_before)


def test_optimizer_instance_and_default() -> None:
    model = make_model(NAMES)
    opt = _opt(model, NAMES, torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert isinstance(opt.base, torch.optim.AdamW)
    default = _opt(model, NAMES)
    assert isinstance(default.base, torch.optim.SGD)
    assert [g["lr"] for g in default.param_groups] == [0.1, 0.1]
    assert [g["task"] for g in default.param_groups] == NAMES
    assert default.settings.noise_bound == 0.05 and default.settings.clamp_bound == 0.05 and default.settings.samples == 1


def test_scheduler_acts_on_wrapper_and_survives_load() -> None:
    model = make_model(NAMES)
    opt = _opt(model, NAMES, torch.optim.SGD, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(make_batches(NAMES))
    sched.step()
    assert [g["lr"] for g in opt.base.param_groups] == [0.05, 0.05]
    opt.load_state_dict(opt.state_dict())
    opt.step(make_batches(NAMES))
    sched.step()
    assert opt.param_groups is opt.base.param_groups
    assert [g["lr"] for g in opt.base.param_groups] == [0.025, 0.025]


# ------------------------------------------------------------------------- clamp


def test_clamp_keeps_slices_within_bound_of_anchor_but_not_heads() -> None:
    model = make_model(NAMES)
    opt = _opt(model, NAMES, torch.optim.SGD, lr=50.0, variant="without_reg", noise_bound=0.01, clamp_bound=0.02)
    slices = adapters.task_parameters(model)
    anchor = {n: p.detach().clone() for t in NAMES for n, p in slices[t]}
    heads_before = params_of(model.heads)
    opt.step(make_batches(NAMES))
    moved_to_bound = 0
    for t in NAMES:
        for n, p in slices[t]:
            delta = (p.detach() - anchor[n]).abs()
            assert float(delta.max()) <= 0.02 + 1e-7, n
            moved_to_bound += int((delta > 0.0199).sum())
    assert moved_to_bound > 0  # lr 50 pushes many entries to the bound: the clamp acted
    head_delta = max(float((p - heads_before[n]).abs().max()) for n, p in params_of(model.heads).items())
    assert head_delta > 0.02


def test_noise_and_clamp_bounds_are_separate() -> None:
    model = make_model(NAMES)
    opt = _opt(model, NAMES, noise_bound=0.3, clamp_bound=0.01)
    assert (opt.settings.noise_bound, opt.settings.clamp_bound) == (0.3, 0.01)
    vanilla = _opt(model, NAMES, variant="vanilla")
    assert vanilla.settings.noise_bound is None and vanilla.settings.clamp_bound is None and vanilla.settings.consistency_weight == 0


# ------------------------------------------------------------------ partial batches


def test_partial_and_unknown_batches() -> None:
    model = make_model(NAMES)
    opt = _opt(model, NAMES)
    report = opt.step({"a": make_batches(NAMES)["a"]})
    assert isinstance(report, StepReport)
    assert set(report.losses) == {"a"} and report.skipped == {"b": "no batch"}
    with pytest.raises(ValueError, match=r"unknown tasks \['c'\]"):
        opt.step({"a": make_batches(NAMES)["a"], "c": None})
    with pytest.raises(ValueError, match="batches is empty"):
        opt.step({})
    with pytest.raises(TypeError, match="mapping"):
        opt.step([make_batches(NAMES)["a"]])  # type: ignore[arg-type]


def test_report_fields() -> None:
    model = make_model(NAMES)
    opt = _opt(model, NAMES, warmup_steps=1)
    first = opt.step(make_batches(NAMES))
    second = opt.step(make_batches(NAMES))
    assert (first.step, first.phase, second.step, second.phase) == (1, "warmup", 2, "cooperative")
    assert all(isinstance(v, float) and v > 0 for v in second.losses.values())
    assert math.isclose(second.total_loss, sum(second.losses.values()))


# -------------------------------------------------------------------- bad input


def test_bad_tasks_and_ownership_errors() -> None:
    model = make_model(NAMES)
    tasks = make_tasks(model, NAMES)
    with pytest.raises(ValueError, match="at least two tasks"):
        CooperativeOptimizer(model, tasks[:1])
    with pytest.raises(ValueError, match=r"unique, \['a'\]"):
        CooperativeOptimizer(model, [tasks[0], tasks[0]])
    with pytest.raises(TypeError, match="Task objects"):
        CooperativeOptimizer(model, [tasks[0], "b"])  # type: ignore[list-item]
    renamed = [Task("a", tasks[0].loss, model.heads["a"]), Task("z", tasks[1].loss, model.heads["b"])]
    with pytest.raises(ValueError, match="do not match the encoder split"):
        CooperativeOptimizer(model, renamed)
    headless = [Task("a", tasks[0].loss, model.heads["a"]), Task("b", tasks[1].loss)]
    with pytest.raises(ValueError, match=r"owned by no task: \['heads.b.weight', 'heads.b.bias'\]"):
        CooperativeOptimizer(model, headless)
    shared = [Task("a", tasks[0].loss, model.heads["a"]), Task("b", tasks[1].loss, model.heads)]
    with pytest.raises(ValueError, match=r"more than one task: \{'heads.a.weight'"):
        CooperativeOptimizer(model, shared)
    with pytest.raises(ValueError, match="no channel-split module"):
        CooperativeOptimizer(make_model(NAMES, split=False), make_tasks(make_model(NAMES), NAMES))


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(bound=0.0), ValueError, "bound must be > 0"),
        (dict(bound=-1.0), ValueError, "bound must be > 0"),
        (dict(noise_bound=0.0), ValueError, "noise_bound must be > 0"),
        (dict(clamp_bound=-0.1), ValueError, "clamp_bound must be > 0"),
        (dict(bound=float("nan")), ValueError, "bound must be a finite number, got nan"),
        (dict(noise_bound=float("inf")), ValueError, "noise_bound must be a finite number"),
        (dict(bound="0.05"), TypeError, "bound must be a number"),
        (dict(consistency_weight=float("nan")), ValueError, "consistency_weight must be a finite number"),
        (dict(samples=0), ValueError, "samples must be >= 1"),
        (dict(samples=1.5), TypeError, "samples must be an int"),
        (dict(inner_steps=0), ValueError, "inner_steps must be >= 1"),
        (dict(consistency_weight=-0.1), ValueError, "consistency_weight must be >= 0"),
        (dict(variant="sam"), ValueError, "variant must be one of"),
        (dict(variant="vanilla", clamp_bound=0.1), ValueError, "conflicts with variant='vanilla', which has no clamp"),
        (dict(variant="without_reg", consistency_weight=1.0), ValueError, "conflicts with variant='without_reg'"),
        (dict(consistency_reference="median"), ValueError, "consistency_reference must be one of"),
        (dict(running_stats="sometimes"), ValueError, "running_stats must be one of"),
        (dict(nonfinite="ignore"), ValueError, "nonfinite must be one of"),
        (dict(warmup_steps=-1), ValueError, "warmup_steps must be >= 0"),
        (dict(noise_scale="per_tensor"), ValueError, "noise_scale must be one of"),
        (dict(variant="vanilla", noise_scale="relative"), ValueError, "noise_scale='relative' conflicts with"),
    ],
)
def test_bad_hyperparameters(kwargs: dict[str, Any], error: type[Exception], pattern: str) -> None:
    model = make_model(NAMES)
    with pytest.raises(error, match=pattern):
        CooperativeOptimizer(model, make_tasks(model, NAMES), **kwargs)


def test_bad_optimizer_arguments() -> None:
    model = make_model(NAMES)
    tasks = make_tasks(model, NAMES)
    with pytest.raises(TypeError, match=r"already an instance; the keyword arguments \['lr'\]"):
        CooperativeOptimizer(model, tasks, torch.optim.SGD(model.parameters(), lr=0.1), lr=0.2)
    partial = torch.optim.SGD(model.heads.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="does not hold these task parameters"):
        CooperativeOptimizer(model, tasks, partial)
    with pytest.raises(TypeError, match="optimizer must be"):
        CooperativeOptimizer(model, tasks, "adam")  # type: ignore[arg-type]


def test_bad_loss_and_inputs() -> None:
    model = make_model(NAMES)
    per_sample = [Task(n, loss=lambda out, b: F.cross_entropy(out, b[1], reduction="none"), head=model.heads[n],
                       inputs=lambda b, n=n: (b[0], n)) for n in NAMES]
    opt = CooperativeOptimizer(model, per_sample, variant="vanilla")
    with pytest.raises(TypeError, match=r"task 'a': loss must return a scalar \(0-dim\) tensor, got \(8,\)"):
        opt.step(make_batches(NAMES))
    listy = [Task(n, loss=lambda out, b: F.cross_entropy(out, b[1]), head=model.heads[n],
                  inputs=lambda b, n=n: [b[0], n]) for n in NAMES]  # type: ignore[arg-type,return-value]
    opt = CooperativeOptimizer(model, listy, variant="vanilla")
    with pytest.raises(TypeError, match="must return a tuple"):
        opt.step(make_batches(NAMES))
    with pytest.raises(TypeError, match="loss must be callable"):
        Task("a", loss=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="head must be an nn.Module or an iterable"):
        Task("a", loss=F.mse_loss, head=torch.zeros(3))  # type: ignore[arg-type]


def test_add_param_group_refused() -> None:
    model = make_model(NAMES)
    opt = _opt(model)
    with pytest.raises(RuntimeError, match="build a new"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})


# ------------------------------------------------------------------- non-finite


def _nan_tasks(model: Any, poisoned: str) -> list[Task]:
    def loss(task: str) -> Any:
        def fn(out: Tensor, batch: Any) -> Tensor:
            value = F.cross_entropy(out, batch[1])
            return value * float("nan") if task == poisoned else value
        return fn

    return [Task(n, loss=loss(n), head=model.heads[n], inputs=lambda b, n=n: (b[0], n)) for n in NAMES]


@pytest.mark.parametrize("warmup", [0, 1])
def test_nonfinite_loss_skips_that_task(warmup: int) -> None:
    model = make_model(NAMES, batchnorm=True)
    opt = CooperativeOptimizer(model, _nan_tasks(model, "a"), torch.optim.Adam, lr=1e-2, warmup_steps=warmup,
                               variant="without_reg")
    a_before = _owned_by(model, opt, "a")
    b_before = _owned_by(model, opt, "b")
    report = opt.step(make_batches(NAMES))
    assert report.skipped == {"a": "non-finite loss"} and set(report.losses) == {"b"}
    if not warmup:  # in warm-up task b's loss moves the shared encoder, a's slices included
        assert same(_owned_by(model, opt, "a"), a_before)
        assert all(len(opt.base.state[p]) == 0 for tp in opt.task_params if tp.name == "a" for p in tp.own)
    assert not same(_owned_by(model, opt, "b"), b_before)


def test_nonfinite_loss_can_raise() -> None:
    model = make_model(NAMES)
    opt = CooperativeOptimizer(model, _nan_tasks(model, "b"), nonfinite="raise", variant="vanilla")
    before = params_of(model)
    with pytest.raises(FloatingPointError, match="task 'b': loss is nan"):
        opt.step(make_batches(NAMES))
    after = params_of(model)
    assert not same({k: v for k, v in after.items() if "heads.a" in k}, {k: v for k, v in before.items() if "heads.a" in k})
    assert same({k: v for k, v in after.items() if "heads.b" in k}, {k: v for k, v in before.items() if "heads.b" in k})


# ---------------------------------------------------------------- exception safety


class Boom(Exception):
    pass


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_exception_in_user_code_leaves_failing_task_as_before(inner_steps: int) -> None:
    model = make_model(NAMES, batchnorm=True)
    calls = {"b": 0}

    def loss_b(out: Tensor, batch: Any) -> Tensor:
        calls["b"] += 1
        if calls["b"] == inner_steps:  # fail in the last inner step, after earlier updates of b
            raise Boom()
        return F.cross_entropy(out, batch[1])

    tasks = make_tasks(model, NAMES)
    tasks[1] = Task("b", loss=loss_b, head=model.heads["b"], inputs=lambda b: (b[0], "b"))
    opt = CooperativeOptimizer(model, tasks, torch.optim.SGD, lr=0.3, inner_steps=inner_steps,
                               variant="without_reg")
    opt.step({"a": make_batches(NAMES)["a"]})
    a_before, b_before = _owned_by(model, opt, "a"), _owned_by(model, opt, "b")
    with pytest.raises(Boom):
        opt.step(make_batches(NAMES))
    assert not same(_owned_by(model, opt, "a"), a_before)  # a's completed update stays
    assert same(_owned_by(model, opt, "b"), b_before)
    assert all(p.grad is None for p in model.parameters())
    calls["b"] = 0
    buffers_before = {n: b.clone() for n, b in model.named_buffers()}
    with pytest.raises(Boom):
        opt.step({"b": make_batches(NAMES)["b"]})
    assert same(_owned_by(model, opt, "b"), b_before)
    assert same({n: b.clone() for n, b in model.named_buffers()}, buffers_before)


# ---------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "config",
    [
        dict(optimizer=torch.optim.Adam, lr=1e-2, samples=2, warmup_steps=12),
        dict(optimizer=torch.optim.SGD, lr=0.1, momentum=0.9, samples=1, consistency_reference="clean"),
        dict(optimizer=torch.optim.SGD, lr=0.1, samples=2, noise_scale="relative"),
    ],
    ids=["adam-m2-warmup-crossing", "sgd-momentum-clean", "sgd-m2-relative-noise"],
)
def test_checkpoint_resume_is_bit_identical(config: dict[str, Any]) -> None:
    names = ["a", "b", "c"]

    def build() -> tuple[Any, CooperativeOptimizer]:
        torch.manual_seed(5)
        model = make_model(names, batchnorm=True)
        return model, _opt(model, names, seed=11, **config)

    batches = [make_batches(names, seed=s) for s in range(20)]
    model, opt = build()
    for b in batches[:10]:
        opt.step(b)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    for b in batches[10:]:
        opt.step(b)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed_model, resumed = build()
    torch.manual_seed(999)  # global RNG state must not matter
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["opt"])
    assert resumed.steps_taken == 10
    for b in batches[10:]:
        resumed.step(b)
    assert same(params_of(model), params_of(resumed_model))
    assert same(dict(model.named_buffers()), dict(resumed_model.named_buffers()))


def test_load_state_dict_validates() -> None:
    model = make_model(NAMES)
    opt = _opt(model, seed=1)
    state = opt.state_dict()
    other = _opt(model, bound=0.1)
    with pytest.raises(ValueError, match="different settings"):
        other.load_state_dict(state)
    with pytest.warns(UserWarning, match="no 'cooperative' part"):
        opt.load_state_dict(opt.base.state_dict())  # torch.distributed.checkpoint's layout: the base part only
    with pytest.raises(ValueError, match="not from CooperativeOptimizer.state_dict"):
        opt.load_state_dict({"weights": 1})
    with pytest.raises(ValueError, match="is empty"):
        opt.load_state_dict({})
    with pytest.raises(ValueError, match="cooperative part lacks \\['seed'"):
        opt.load_state_dict(dict(state, cooperative={k: v for k, v in state["cooperative"].items() if k != "seed"}))
    with pytest.raises(ValueError, match="'noise_scale': \\('absolute', 'relative'\\)"):
        _opt(model, seed=1, noise_scale="relative").load_state_dict(state)
    coop = state["cooperative"]
    before_noise_scale = dict(coop, hyperparameters={k: v for k, v in coop["hyperparameters"].items()
                                                     if k != "noise_scale"})
    _opt(model, seed=1).load_state_dict(dict(state, cooperative=before_noise_scale))  # before the option: absolute
    wrong_tasks = dict(state, cooperative=dict(coop, tasks=["x", "y"]))
    with pytest.raises(ValueError, match=r"for tasks \['x', 'y'\]"):
        opt.load_state_dict(wrong_tasks)


def test_state_dict_is_a_superset_of_torchs_and_loads_version_0_1() -> None:
    model = make_model(NAMES)
    opt = _opt(model, NAMES, torch.optim.SGD, lr=0.1, momentum=0.9, seed=3)
    for s in range(2):
        opt.step(make_batches(NAMES, seed=s))
    state = opt.state_dict()
    base = opt.base.state_dict()
    assert set(state) == {"state", "param_groups", "cooperative"}
    assert state["param_groups"] == base["param_groups"] and state["state"].keys() == base["state"].keys()
    assert all(torch.equal(state["state"][k]["momentum_buffer"], base["state"][k]["momentum_buffer"])
               for k in base["state"])
    old_layout = {"base": base, **state["cooperative"], "vectorized": True}  # what version 0.1 saved
    fresh_model = make_model(NAMES)
    fresh = _opt(fresh_model, NAMES, torch.optim.SGD, lr=0.1, momentum=0.9, seed=0)
    fresh.load_state_dict(old_layout)
    assert fresh.steps_taken == 2 and fresh.seed == 3
    assert fresh.param_groups is fresh.base.param_groups


def test_seed_makes_runs_reproducible_and_differs_otherwise() -> None:
    def run(seed: int) -> dict[str, Tensor]:
        torch.manual_seed(0)
        model = make_model(NAMES)
        opt = _opt(model, seed=seed, bound=0.5)
        for s in range(3):
            opt.step(make_batches(NAMES, seed=s))
        return params_of(model)

    assert same(run(1), run(1))
    assert not same(run(1), run(2))


# ----------------------------------------------------------------------- BatchNorm


@pytest.mark.parametrize(
    "policy, vectorize, per_task",
    [
        ("once", False, 1), ("once", True, 1), ("every_sample", False, 3), ("frozen", False, 0), ("frozen", True, 0),
        ("clean", False, 1), ("clean", True, 1),
    ],
)
def test_running_stats_policy(policy: str, vectorize: bool, per_task: int) -> None:
    model = make_model(NAMES, batchnorm=True)
    opt = _opt(model, samples=3, running_stats=policy, vectorize=vectorize, inner_steps=2)
    bn = model.encoder[1]
    assert isinstance(bn, nn.BatchNorm2d)
    mean_before = bn.running_mean.clone()
    opt.step(make_batches(NAMES))
    assert int(bn.num_batches_tracked) == per_task * 2 * len(NAMES)  # per sample x inner steps x tasks
    assert torch.equal(bn.running_mean, mean_before) == (per_task == 0)


def _clean_statistics(model: Any, batches: dict[str, tuple[Tensor, Tensor]], passes: int) -> dict[str, Tensor]:
    """Reference: a copy of ``model`` (weights untouched) runs plain train-mode forwards, task by task."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for task, (x, _) in batches.items():
            for _ in range(passes):
                reference(x, task)
    return {n: b.clone() for n, b in reference.named_buffers()}


@pytest.mark.parametrize("warmup", [0, 1])
@pytest.mark.parametrize("reference", ["mean", "clean"])
@pytest.mark.parametrize("vectorize", [False, True])
def test_clean_running_stats_equal_noise_free_forwards(warmup: int, reference: str, vectorize: bool) -> None:
    """lr = 0 keeps the weights fixed, so "clean" statistics must equal those of plain forwards exactly,
    counted once per task and inner step even when the clean consistency reference runs its own pass."""
    torch.manual_seed(0)
    model = make_model(NAMES, batchnorm=True)
    batches = make_batches(NAMES)
    inner = 1 if warmup else 2
    expected = _clean_statistics(model, batches, inner)
    opt = _opt(model, lr=0.0, bound=0.5, samples=3, inner_steps=inner, warmup_steps=warmup,
               consistency_reference=reference, running_stats="clean", vectorize=vectorize)
    opt.step(batches)
    buffers = dict(model.named_buffers())
    for name, value in expected.items():
        torch.testing.assert_close(buffers[name], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("warmup", [0, 1])
def test_clean_running_stats_cost_nothing_without_normalization_layers(warmup: int) -> None:
    """No BatchNorm, no statistics to keep clean: "clean" runs exactly the forwards of "once"."""
    counts = {}
    for policy in ("once", "clean"):
        torch.manual_seed(0)
        model = make_model(NAMES)
        calls = [0]
        model.encoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        _opt(model, running_stats=policy, warmup_steps=warmup).step(make_batches(NAMES))
        counts[policy] = calls[0]
    assert counts["clean"] == counts["once"] > 0
    torch.manual_seed(0)
    with_bn = make_model(NAMES, batchnorm=True)
    calls = [0]
    with_bn.encoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    _opt(with_bn, running_stats="clean", warmup_steps=warmup).step(make_batches(NAMES))
    assert calls[0] == 2 * counts["once"]  # with BatchNorm: one extra clean forward per task


def test_once_running_stats_see_the_noise_and_clean_ones_do_not() -> None:
    torch.manual_seed(0)
    model = make_model(NAMES, batchnorm=True)
    batches = make_batches(NAMES)
    expected = _clean_statistics(model, batches, 1)
    _opt(model, lr=0.0, bound=0.5, running_stats="once").step(batches)
    assert not torch.allclose(dict(model.named_buffers())["encoder.1.running_var"], expected["encoder.1.running_var"])


def test_vmap_and_loop_agree() -> None:
    results = []
    for vectorize in (False, True):
        torch.manual_seed(0)
        model = make_model(NAMES, batchnorm=True)
        opt = _opt(model, samples=3, vectorize=vectorize, seed=4, consistency_weight=0.5)
        for s in range(3):
            opt.step(make_batches(NAMES, seed=s))
        results.append((params_of(model), dict(model.named_buffers())))
    for (p1, b1), (p2, b2) in [tuple(results)]:
        for k in p1:
            torch.testing.assert_close(p1[k], p2[k], rtol=1e-5, atol=1e-6)
        for k in b1:
            torch.testing.assert_close(b1[k], b2[k], rtol=1e-5, atol=1e-6)


def test_vectorize_auto_loops_and_true_never_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    class Itemy(nn.Module):  # .item() inside forward cannot be vmapped
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(4, 4)
            self.heads = nn.ModuleDict({n: nn.Linear(4, 2) for n in NAMES})

        def forward(self, x: Tensor, task: str) -> Tensor:
            h = self.encoder(x)
            return self.heads[task](h * float(h.abs().max().item() > -1))

    model = Itemy()
    adapters.split_channels(model.encoder, NAMES)
    tasks = [Task(n, loss=lambda out, b: F.cross_entropy(out, b[1]), head=model.heads[n],
                  inputs=lambda b, n=n: (b[0], n)) for n in NAMES]
    batches = {n: (torch.randn(5, 4), torch.randint(0, 2, (5,))) for n in NAMES}
    from cooperative_opt._perturb import Perturber

    vmapped: list[int] = []
    original = Perturber.vmapped
    monkeypatch.setattr(Perturber, "vmapped", lambda self, *a: vmapped.append(1) or original(self, *a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CooperativeOptimizer(model, tasks, samples=2).step(batches)  # "auto": the loop, measured faster
    assert vmapped == []
    strict = CooperativeOptimizer(model, tasks, samples=2, vectorize=True)
    with pytest.raises(RuntimeError):
        strict.step(batches)
    assert vmapped == [1]


def test_m1_mean_consistency_warns() -> None:
    model = make_model(NAMES)
    with pytest.warns(UserWarning, match="identically zero"):
        CooperativeOptimizer(model, make_tasks(model, NAMES))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CooperativeOptimizer(model, make_tasks(model, NAMES), consistency_reference="clean")
        CooperativeOptimizer(model, make_tasks(model, NAMES), variant="without_reg")


def test_repr_and_merge_round_trip() -> None:
    model = make_model(NAMES)
    opt = _opt(model)
    assert "variant='mt_cool'" in repr(opt) and "base=SGD" in repr(opt)
    for s in range(2):
        opt.step(make_batches(NAMES, seed=s))
    x = torch.randn(4, 1, 6, 6)
    before = model(x, "a")
    adapters.merge(model.encoder)
    assert torch.equal(model(x, "a"), before)
    plain = make_model(NAMES, split=False)
    plain.load_state_dict(model.state_dict())
    assert torch.equal(plain(x, "a"), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda() -> None:
    model = make_model(NAMES, batchnorm=True).cuda()
    opt = _opt(model, samples=2)
    batches = {k: (x.cuda(), y.cuda()) for k, (x, y) in make_batches(NAMES).items()}
    report = opt.step(batches)
    assert set(report.losses) == set(NAMES)
    assert all(p.device.type == "cuda" for p in model.parameters())


class TiedNet(nn.Module):
    """An encoder whose two linear layers share one weight (tied parameters)."""

    def __init__(self, alias_module: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        self.encoder[2].weight = self.encoder[0].weight
        self.heads = nn.ModuleDict({n: nn.Linear(6, 2) for n in NAMES})
        if alias_module:
            self.again = self.encoder  # the same module under a second name

    def forward(self, x: Tensor, task: str) -> Tensor:
        return self.heads[task](self.encoder(x))


def test_tied_slices_stay_tied_through_training() -> None:
    model = TiedNet()
    adapters.split_channels(model.encoder, NAMES)
    tasks = [Task(n, loss=lambda out, b: F.cross_entropy(out, b[1]), head=model.heads[n],
                  inputs=lambda b, n=n: (b[0], n)) for n in NAMES]
    opt = CooperativeOptimizer(model, tasks, samples=2, consistency_reference="clean", seed=0)
    assert opt._perturber._tie
    batches = {n: (torch.randn(8, 6), torch.randint(0, 2, (8,))) for n in NAMES}
    for _ in range(3):
        opt.step(batches)
    torch.testing.assert_close(model.encoder[0].weight, model.encoder[2].weight, rtol=0, atol=0)
    adapters.merge(model.encoder)
    assert model.encoder[2].weight is model.encoder[0].weight


def test_module_registered_twice_with_tied_slices_is_refused() -> None:
    model = TiedNet(alias_module=True)
    adapters.split_channels(model.encoder, NAMES)
    tasks = [Task(n, loss=lambda out, b: F.cross_entropy(out, b[1]), head=model.heads[n],
                  inputs=lambda b, n=n: (b[0], n)) for n in NAMES]
    with pytest.raises(ValueError, match="registered again as 'again'"):
        CooperativeOptimizer(model, tasks, variant="vanilla")
