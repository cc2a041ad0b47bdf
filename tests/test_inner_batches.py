"""A fresh batch per inner step: ``step([b_1, ..., b_L])`` against the user loop and the plain reference.

``step(mapping)`` reuses the one batch for all L inner steps of a task;
``step(sequence)`` feeds ``batches[l]`` to inner step l of every task (and
``batches[0]`` to a warm-up step). Both must be what a user loop that picks
those batches computes, bit for bit.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import adapters
from cooperative_opt import CooperativeOptimizer
from tests.conftest import make_batches, make_model, make_tasks, params_of, same
from tests.reference import NoiseLog, ReferenceMTCOOL

NAMES = ["a", "b", "c"]
Batches = Mapping[str, tuple[Tensor, Tensor]]

CONFIGS = [
    dict(variant="vanilla", inner_steps=3),
    dict(variant="without_reg", inner_steps=2),
    dict(samples=2, inner_steps=3, consistency_weight=0.5),
    dict(variant="without_reg", inner_steps=2, warmup_steps=1),
    dict(variant="without_reg", inner_steps=2, update_order="jacobi"),
]
IDS = ["vanilla-l3", "without_reg-l2", "mt_cool-m2-l3", "warmup-l2", "jacobi-l2"]


def _build(seed: int = 3, **kwargs: Any) -> tuple[Any, CooperativeOptimizer]:
    torch.manual_seed(seed)
    model = make_model(NAMES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = CooperativeOptimizer(model, make_tasks(model, NAMES), torch.optim.SGD, lr=0.2, seed=7,
                                   sliced_layers=False, **kwargs)
    return model, opt


def _fresh(steps: int, seed: int, names: Sequence[str] = NAMES) -> list[dict[str, tuple[Tensor, Tensor]]]:
    return [make_batches(names, seed=100 * seed + step) for step in range(steps)]


def _user_loop(model: Any, opt: CooperativeOptimizer, per_step: Sequence[Batches]) -> None:
    """One outer iteration that feeds ``per_step[l]`` to the l-th inner step of each task."""
    noisy = opt.settings.noise_bound is not None
    taken = dict.fromkeys(per_step[0], 0)
    for name in opt.iteration(list(per_step[0])):
        x, y = per_step[taken[name]][name]
        taken[name] += 1
        outputs = []
        for _ in range(opt.settings.samples if noisy else 1):
            with opt.perturb(name):
                outputs.append(model(x, name))
        loss = torch.stack([F.cross_entropy(o, y) for o in outputs]).mean()
        if opt.phase == "cooperative":
            loss = loss + opt.consistency(name, outputs)
        torch.autograd.backward(loss)
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_a_batch_per_inner_step_is_the_user_loop_bit_for_bit(config: dict[str, Any]) -> None:
    model, opt = _build(**config)
    loop_model, loop_opt = _build(**config)
    inner_steps = opt.settings.inner_steps
    for s in range(3):
        per_step = _fresh(inner_steps, s)
        report = opt.step(per_step)
        _user_loop(loop_model, loop_opt, per_step)
        assert same(params_of(model), params_of(loop_model)), f"diverged at outer iteration {s}"
        assert loop_opt.last_report is not None and report.clamped == loop_opt.last_report.clamped
    assert opt.steps_taken == loop_opt.steps_taken == 3


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_a_batch_per_inner_step_matches_the_plain_reference(noise_log: NoiseLog, config: dict[str, Any]) -> None:
    model, opt = _build(**config)
    torch.manual_seed(3)
    ref_model = make_model(NAMES)
    settings = opt.settings
    ref = ReferenceMTCOOL(
        ref_model, make_tasks(ref_model, NAMES), adapters.task_parameters(ref_model), lr=0.2,
        clamp_bound=settings.clamp_bound, samples=settings.samples, inner_steps=settings.inner_steps,
        consistency_weight=settings.consistency_weight, warmup_steps=settings.warmup_steps,
        order=settings.update_order,
    )
    noisy = settings.noise_bound is not None
    for s in range(3):
        per_step = _fresh(settings.inner_steps, s, NAMES if s < 2 else ["a", "c"])  # then a partial batch
        opt.step(per_step)
        ref.step(per_step, noise_log if noisy else None)
        for k, v in params_of(model).items():
            torch.testing.assert_close(v, params_of(ref_model)[k], rtol=1e-5, atol=1e-6, msg=k)
    assert noise_log == []  # the reference consumed exactly the draws the optimizer made


def test_the_vanilla_variant_is_the_reference_bit_for_bit() -> None:
    model, opt = _build(variant="vanilla", inner_steps=3)
    torch.manual_seed(3)
    ref_model = make_model(NAMES)
    ref = ReferenceMTCOOL(ref_model, make_tasks(ref_model, NAMES), adapters.task_parameters(ref_model), lr=0.2,
                          clamp_bound=None, inner_steps=3)
    for s in range(3):
        per_step = _fresh(3, s)
        opt.step(per_step)
        ref.step(per_step, None)
        assert same(params_of(model), params_of(ref_model)), f"diverged at outer iteration {s}"


def test_one_mapping_is_reused_by_every_inner_step() -> None:
    reused, reused_opt = _build(variant="without_reg", inner_steps=3)
    repeated, repeated_opt = _build(variant="without_reg", inner_steps=3)
    fresh, fresh_opt = _build(variant="without_reg", inner_steps=3)
    for s in range(2):
        batches = make_batches(NAMES, seed=s)
        reused_opt.step(batches)
        repeated_opt.step([batches, batches, batches])
        fresh_opt.step([batches] + _fresh(2, s + 10))
    assert same(params_of(reused), params_of(repeated))
    assert not same(params_of(reused), params_of(fresh))  # the later inner steps did see other batches


def test_a_warmup_step_uses_the_first_mapping() -> None:
    sequence, sequence_opt = _build(variant="without_reg", inner_steps=2, warmup_steps=1)
    first, first_opt = _build(variant="without_reg", inner_steps=2, warmup_steps=1)
    per_step = _fresh(2, 0)
    assert sequence_opt.step(per_step).phase == "warmup"
    first_opt.step(per_step[0])
    assert same(params_of(sequence), params_of(first))
    report = sequence_opt.step(per_step)  # the same call runs the cooperative phase
    assert report.phase == "cooperative" and set(report.losses) == set(NAMES)


def test_bad_sequences_are_refused_and_change_nothing() -> None:
    model, opt = _build(variant="without_reg", inner_steps=2)
    before = params_of(model)
    one, two, three = _fresh(3, 0)
    with pytest.raises(ValueError, match=r"batches has 3 mappings but inner_steps=2"):
        opt.step([one, two, three])
    with pytest.raises(ValueError, match=r"batches has 1 mappings but inner_steps=2"):
        opt.step([one])
    with pytest.raises(ValueError, match=r"batches has 0 mappings but inner_steps=2"):
        opt.step([])
    with pytest.raises(TypeError, match=r"batches\[1\] must be a mapping .* got tuple"):
        opt.step([one, two["a"]])
    with pytest.raises(ValueError, match=r"batches\[1\] has the tasks \['a', 'b'\] but batches\[0\] has"):
        opt.step([one, {k: two[k] for k in ("a", "b")}])
    with pytest.raises(ValueError, match=r"batches\[0\] names unknown tasks \['z'\]"):
        opt.step([{**one, "z": one["a"]}, two])
    with pytest.raises(ValueError, match=r"batches\[0\] is empty"):
        opt.step([{}, {}])
    with pytest.raises(TypeError, match="step\\(\\) takes a closure"):
        opt.step("ab")
    assert opt.steps_taken == 0 and same(params_of(model), before)
    assert opt.step((one, two)).step == 1  # a tuple is a sequence too
