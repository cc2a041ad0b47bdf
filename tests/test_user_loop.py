"""The torch.optim contract: iteration() / perturb() / step() in the user's own loop.

The user-loop path must compute exactly what ``step(batches)`` computes (one
implementation behind both), and what the plain-loop reference computes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import adapters
from cooperative_opt import CooperativeOptimizer
from tests.conftest import make_batches, make_model, make_tasks, params_of, same
from tests.reference import NoiseLog, ReferenceMTCOOL

NAMES = ["a", "b"]
Batches = dict[str, tuple[Tensor, Tensor]]


def _build(names: list[str], seed: int = 3, **kwargs: Any) -> tuple[Any, CooperativeOptimizer]:
    torch.manual_seed(seed)
    model = make_model(names, batchnorm=kwargs.pop("batchnorm", False))
    optimizer = kwargs.pop("optimizer", torch.optim.SGD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = CooperativeOptimizer(model, make_tasks(model, names), optimizer, seed=7, **kwargs)
    return model, opt


def user_loop(model: Any, opt: CooperativeOptimizer, batches: Batches, backward: Callable[[Tensor], None] | None = None,
              step: Callable[[], Any] | None = None) -> None:
    """One outer iteration written the way the README tells users to write it."""
    samples = opt.settings.samples if opt.settings.noise_bound is not None else 1
    clean_reference = opt.settings.consistency_reference == "clean" and opt.phase == "cooperative"
    for name in opt.iteration([n for n in batches]):
        x, y = batches[name]
        outputs = []
        for _ in range(samples):
            with opt.perturb(name):
                outputs.append(model(x, name))
        loss = torch.stack([F.cross_entropy(o, y) for o in outputs]).mean()
        if opt.phase == "cooperative":
            clean = None
            if clean_reference:
                with torch.no_grad():
                    clean = model(x, name)
            loss = loss + opt.consistency(name, outputs, clean)
        (backward or Tensor.backward)(loss)
        (step or opt.step)()
        opt.zero_grad()


CONFIGS = [
    dict(variant="vanilla"),
    dict(variant="without_reg"),
    dict(variant="mt_cool", samples=1),
    dict(variant="mt_cool", samples=2, consistency_weight=0.5),
    dict(variant="mt_cool", samples=1, consistency_reference="clean", running_stats="clean"),
    dict(variant="without_reg", running_stats="frozen"),
    dict(variant="without_reg", inner_steps=2),
    dict(variant="mt_cool", samples=2, inner_steps=2, noise_scale="relative"),
    dict(variant="mt_cool", samples=2, warmup_steps=2),
    dict(variant="vanilla", warmup_steps=1, inner_steps=2),
    dict(variant="vanilla", update_order="jacobi"),
    dict(variant="mt_cool", samples=2, inner_steps=2, update_order="jacobi"),
]
OPTIMIZERS = {
    "sgd-momentum-wd": dict(optimizer=torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adamw": dict(optimizer=torch.optim.AdamW, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_user_loop_equals_step_batches_bit_for_bit(config: dict[str, Any], optimizer: str) -> None:
    names = ["a", "b", "c"]
    kwargs = {**config, **OPTIMIZERS[optimizer]}
    model_1, opt_1 = _build(names, batchnorm=True, **kwargs)
    model_2, opt_2 = _build(names, batchnorm=True, **kwargs)
    for s in range(4):
        batches = make_batches(names, seed=s)
        if s == 3:
            del batches["b"]  # partial annotation
        opt_1.step(batches)
        user_loop(model_2, opt_2, batches)
        assert same(params_of(model_1), params_of(model_2)), s
        assert same(dict(model_1.named_buffers()), dict(model_2.named_buffers())), s
    state_1, state_2 = opt_1.state_dict(), opt_2.state_dict()
    assert state_1["cooperative"]["steps"] == state_2["cooperative"]["steps"] == 4
    for k, v in state_1["state"].items():
        for key, value in v.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_2["state"][k][key])), (k, key)


@pytest.mark.parametrize(
    "config",
    [dict(samples=1), dict(samples=2, consistency_weight=0.7), dict(samples=2, inner_steps=2), dict(samples=2, warmup_steps=1)],
    ids=["m1", "m2", "m2-l2", "warmup"],
)
def test_user_loop_matches_the_plain_reference(noise_log: NoiseLog, config: dict[str, Any]) -> None:
    names = ["a", "b"]
    model, opt = _build(names, lr=0.2, bound=0.05, sliced_layers=False, consistency_weight=config.get(
        "consistency_weight", 0.0 if config.get("samples", 1) == 1 else 1.0), **{
        k: v for k, v in config.items() if k != "consistency_weight"})
    torch.manual_seed(3)
    ref_model = make_model(names)
    ref = ReferenceMTCOOL(ref_model, make_tasks(ref_model, names), adapters.task_parameters(ref_model), lr=0.2,
                          clamp_bound=0.05, samples=config.get("samples", 1), inner_steps=config.get("inner_steps", 1),
                          consistency_weight=opt.settings.consistency_weight, warmup_steps=config.get("warmup_steps", 0))
    for s in range(3):
        batches = make_batches(names, seed=s)
        user_loop(model, opt, batches)
        ref.step(batches, noise_log)
        for k, v in params_of(model).items():
            torch.testing.assert_close(v, params_of(ref_model)[k], rtol=1e-5, atol=1e-6, msg=k)
    assert noise_log == []


@settings(max_examples=12, deadline=None)
@given(tasks=st.integers(2, 4), samples=st.integers(1, 3), inner=st.integers(1, 2), width=st.integers(2, 9))
def test_user_loop_equals_step_batches_over_shapes(tasks: int, samples: int, inner: int, width: int) -> None:
    names = [f"t{k}" for k in range(tasks)]
    torch.manual_seed(0)
    models = [make_model(names, width=width) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [CooperativeOptimizer(m, make_tasks(m, names), torch.optim.SGD, lr=0.1, samples=samples, inner_steps=inner,
                                 consistency_weight=0.5 if samples > 1 else 0.0, variant="mt_cool" if samples > 1
                                 else "without_reg", seed=1) for m in models]
    for s in range(2):
        batches = make_batches(names, seed=s)
        opts[0].step(batches)
        user_loop(models[1], opts[1], batches)
    assert same(params_of(models[0]), params_of(models[1]))


# ------------------------------------------------------------------ the contract


def test_iteration_yields_names_in_update_order_l_times_and_reports() -> None:
    model, opt = _build(["a", "b", "c"], inner_steps=2, variant="without_reg")
    batches = make_batches(["a", "b", "c"])
    seen = []
    for name in opt.iteration(["c", "a"]):
        assert opt.active_task == name
        seen.append(name)
        with opt.perturb(name):
            loss = F.cross_entropy(model(batches[name][0], name), batches[name][1])
        loss.backward()
        opt.step()
    assert seen == ["a", "a", "c", "c"]
    assert opt.active_task is None and opt.steps_taken == 1
    report = opt.last_report
    assert report is not None and report.skipped == {"b": "no batch"} and report.phase == "cooperative"


def test_perturb_noises_only_the_other_tasks_and_restores_exactly() -> None:
    model, opt = _build(NAMES, bound=0.5)
    slices = adapters.task_parameters(model)
    weight = lambda: model.encoder[0].weight  # noqa: E731 - the parametrized (concatenated) weight
    clean_weight = weight().detach().clone()
    params = {n: (p, p.detach().clone()) for t in NAMES for n, p in slices[t]}
    sizes = [p.shape[0] for _, p in slices["a"] if p.dim() == 4] + [p.shape[0] for _, p in slices["b"] if p.dim() == 4]
    for name in opt.iteration():
        with opt.perturb(name):
            inside = weight().detach().clone()
            own, other = (inside[: sizes[0]], inside[sizes[0]:]) if name == "a" else (inside[sizes[0]:], inside[: sizes[0]])
            clean_own, clean_other = ((clean_weight[: sizes[0]], clean_weight[sizes[0]:]) if name == "a"
                                      else (clean_weight[sizes[0]:], clean_weight[: sizes[0]]))
            assert torch.equal(own, clean_own)  # own slice clean
            delta = (other - clean_other).abs()
            assert float(delta.max()) <= 0.5 and float(delta.min()) > 0  # other slices noised within the bound
            assert all(torch.equal(p, v) for p, v in params.values())  # parameters never hold noise
        assert torch.equal(weight(), clean_weight)  # leaving restores the clean model exactly
        opt.step()  # no gradients: nothing moves, the clamp keeps values
    assert all(torch.equal(p, v) for p, v in params.values())


def test_each_entry_draws_fresh_noise_and_vanilla_perturbs_nothing() -> None:
    model, opt = _build(NAMES, samples=1, bound=0.5, variant="without_reg")
    x = torch.randn(3, 1, 6, 6)
    for name in opt.iteration(["a"]):
        with opt.perturb(name):
            first = model(x, name)
        with opt.perturb(name):
            second = model(x, name)
        assert not torch.equal(first, second)
        opt.step()
    vanilla_model, vanilla = _build(NAMES, variant="vanilla")
    for name in vanilla.iteration(["a"]):
        with vanilla.perturb(name):
            out = vanilla_model(x, name)
        assert torch.equal(out, vanilla_model(x, name))
        vanilla.step()


def test_step_discards_gradients_on_other_tasks_parameters() -> None:
    model, opt = _build(NAMES, optimizer=torch.optim.Adam, lr=0.1, variant="vanilla")
    opt.step(make_batches(NAMES))  # both tasks have Adam state
    b_ids = {id(p) for tp in opt.task_params if tp.name == "b" for p in tp.own}
    b_before = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in b_ids}
    b_state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters() if id(p) in b_ids}
    batches = make_batches(NAMES, seed=2)
    for name in opt.iteration(["a"]):
        with opt.perturb(name):
            out = model(batches[name][0], name)
        plain = model(batches[name][0], "b")  # outside perturb: gradients reach b's slices and head too
        (F.cross_entropy(out, batches[name][1]) + plain.square().mean()).backward()
        assert any(p.grad is not None for p in model.parameters() if id(p) in b_ids)
        opt.step()
    assert same({n: p.detach() for n, p in model.named_parameters() if id(p) in b_ids}, b_before)
    for p in model.parameters():
        if id(p) in b_ids:
            assert all(torch.equal(v, b_state[id(p)][k]) for k, v in opt.state[p].items())


def test_closure_inside_and_outside_an_iteration() -> None:
    batches = make_batches(NAMES)
    model_1, opt_1 = _build(NAMES, samples=1, variant="without_reg")
    model_2, opt_2 = _build(NAMES, samples=1, variant="without_reg")
    opt_1.step(batches)
    calls = []

    def closure() -> Tensor:
        name = opt_2.active_task
        assert name is not None
        calls.append(name)
        opt_2.zero_grad()
        with opt_2.perturb(name):
            loss = F.cross_entropy(model_2(batches[name][0], name), batches[name][1])
        loss.backward()
        return loss

    value = opt_2.step(closure)  # outside an iteration: one whole outer iteration
    assert calls == NAMES and isinstance(value, Tensor)
    assert same(params_of(model_1), params_of(model_2))
    report = opt_2.last_report
    assert report is not None and set(report.losses) == set(NAMES)
    for name in opt_2.iteration():  # inside: called once, its value returned
        assert opt_2.step(closure) is not None
    assert calls == NAMES * 2


def test_step_outside_an_iteration_is_a_plain_base_step() -> None:
    model, opt = _build(NAMES, optimizer=torch.optim.Adam, lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # what torch.distributed.checkpoint does to initialise state
    assert all(len(opt.state[p]) > 0 for p in model.parameters())
    assert opt.steps_taken == 0


def test_gradient_clipping_and_accumulation() -> None:
    batches = make_batches(NAMES, n=8)
    model_1, opt_1 = _build(NAMES, variant="vanilla", lr=0.5)
    model_2, opt_2 = _build(NAMES, variant="vanilla", lr=0.5)
    opt_1.step(batches)
    for name in opt_2.iteration():  # two micro-batches of 4 per task, then one step
        x, y = batches[name]
        for half in (slice(0, 4), slice(4, 8)):
            with opt_2.perturb(name):
                loss = F.cross_entropy(model_2(x[half], name), y[half]) / 2
            loss.backward()
        opt_2.step()
        opt_2.zero_grad()
    for k, v in params_of(model_1).items():
        torch.testing.assert_close(v, params_of(model_2)[k], rtol=1e-5, atol=1e-6)

    model_3, opt_3 = _build(NAMES, variant="vanilla", lr=0.5)
    before = params_of(model_3)
    for name in opt_3.iteration(["a"]):
        with opt_3.perturb(name):
            (F.cross_entropy(model_3(batches[name][0], name), batches[name][1]) * 100).backward()
        norm = torch.nn.utils.clip_grad_norm_(model_3.parameters(), 0.01)
        assert float(norm) > 0.01
        opt_3.step()
    moved = torch.cat([(v - before[k]).flatten() for k, v in params_of(model_3).items()])
    torch.testing.assert_close(moved.norm(), torch.tensor(0.5 * 0.01), rtol=1e-4, atol=1e-7)


def test_lr_schedulers_onecycle_and_plateau() -> None:
    model, opt = _build(NAMES, optimizer=torch.optim.SGD, lr=0.1, momentum=0.9)
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    ours = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=10)
    theirs = torch.optim.lr_scheduler.OneCycleLR(reference, max_lr=0.5, total_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        for s in range(6):
            user_loop(model, opt, make_batches(NAMES, seed=s))
            reference.step()
            ours.step()
            theirs.step()
            assert [g["lr"] for g in opt.param_groups] == [reference.param_groups[0]["lr"]] * 2
            assert [g["momentum"] for g in opt.param_groups] == [reference.param_groups[0]["momentum"]] * 2
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    lr = opt.param_groups[0]["lr"]
    plateau.step(1.0)
    plateau.step(2.0)  # worse: halve
    assert [g["lr"] for g in opt.base.param_groups] == [lr * 0.5] * 2


def test_bf16_autocast_user_loop_trains() -> None:
    model, opt = _build(NAMES, variant="without_reg", lr=0.2)
    batches = make_batches(NAMES)
    losses = []
    for _ in range(8):
        for name in opt.iteration():
            with torch.autocast("cpu", dtype=torch.bfloat16), opt.perturb(name):
                out = model(batches[name][0], name)
            assert out.dtype == torch.bfloat16
            loss = F.cross_entropy(out.float(), batches[name][1])
            losses.append(float(loss.detach()))
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------ bad use


def test_misuse_is_refused_with_a_fix() -> None:
    model, opt = _build(NAMES)
    with pytest.raises(RuntimeError, match="inside an outer iteration"):
        with opt.perturb("a"):
            pass
    with pytest.raises(ValueError, match=r"names='z' is not a task.*\['a', 'b'\]"):
        opt.iteration(["z"])
    with pytest.raises(TypeError, match="iterable of task names"):
        opt.iteration("a")
    with pytest.raises(ValueError, match="names is empty"):
        opt.iteration([])
    with pytest.raises(TypeError, match="takes a closure"):
        opt.step(3)
    it = opt.iteration()
    assert next(it) == "a"
    with pytest.raises(ValueError, match=r"perturb\('b'\) while task 'a' is being updated"):
        with opt.perturb("b"):
            pass
    with pytest.raises(RuntimeError, match="not nested"):
        with opt.perturb("a"), opt.perturb("a"):
            pass
    with pytest.raises(RuntimeError, match="another outer iteration is running"):
        next(opt.iteration())
    opt.step()
    with pytest.raises(RuntimeError, match="already called in this inner step"):
        opt.step()
    with pytest.raises(RuntimeError, match="inside an outer iteration; call it between"):
        opt.load_state_dict(opt.state_dict())
    it.close()
    assert opt.active_task is None and opt.steps_taken == 0


def test_clean_reference_needs_the_clean_prediction() -> None:
    model, opt = _build(NAMES, consistency_reference="clean")
    for name in opt.iteration(["a"]):
        with opt.perturb(name):
            out = model(make_batches(NAMES)["a"][0], name)
        with pytest.raises(ValueError, match="needs the noise-free prediction"):
            opt.consistency(name, [out])
        break


def test_exception_inside_perturb_restores_the_model_and_the_turn() -> None:
    model, opt = _build(NAMES, batchnorm=True, bound=0.5)
    clean = model.encoder[0].weight.detach().clone()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    params = params_of(model)
    with pytest.raises(ZeroDivisionError):
        for name in opt.iteration():
            with opt.perturb(name):
                model(torch.randn(4, 1, 6, 6), name)
                raise ZeroDivisionError
    assert torch.equal(model.encoder[0].weight, clean)
    assert same({n: b.clone() for n, b in model.named_buffers()}, buffers)
    assert same(params_of(model), params)
    assert opt.active_task is None and opt.steps_taken == 0
    user_loop(model, opt, make_batches(NAMES))  # the optimizer is usable again
    assert opt.steps_taken == 1


def test_an_unstepped_turn_skips_the_task_and_restores_its_statistics() -> None:
    model, opt = _build(NAMES, batchnorm=True, optimizer=torch.optim.Adam, lr=0.1)
    batches = make_batches(NAMES)
    a_ids = {id(p) for tp in opt.task_params if tp.name == "a" for p in tp.own}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    at_b: dict[str, Tensor] = {}
    for name in opt.iteration():
        if name == "b":
            at_b = {n: b.clone() for n, b in model.named_buffers()}
        with opt.perturb(name):
            loss = F.cross_entropy(model(batches[name][0], name), batches[name][1])
        loss.backward()
        if name == "a":
            assert not same({n: b.clone() for n, b in model.named_buffers()}, buffers)
            continue  # e.g. GradScaler found inf: no step
        opt.step()
    report = opt.last_report
    assert report is not None and report.skipped == {"a": "not stepped"}
    assert all(len(opt.state[p]) == 0 for p in model.parameters() if id(p) in a_ids)
    assert same(at_b, buffers)  # b's turn started from the statistics as they were before a's


def test_leaving_the_loop_after_a_complete_turn_keeps_it() -> None:
    model, opt = _build(NAMES, batchnorm=True, variant="without_reg")
    batches = make_batches(NAMES)
    params = params_of(model)
    for name in opt.iteration():
        with opt.perturb(name):
            F.cross_entropy(model(batches[name][0], name), batches[name][1]).backward()
        opt.step()
        after_a = ({n: b.clone() for n, b in model.named_buffers()}, params_of(model))
        break  # a's turn is complete: its step and its statistics stay
    assert same({n: b.clone() for n, b in model.named_buffers()}, after_a[0])
    assert same(params_of(model), after_a[1]) and not same(params_of(model), params)
    assert opt.steps_taken == 0 and opt.active_task is None
