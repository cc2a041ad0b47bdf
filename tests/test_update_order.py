"""update_order: Gauss-Seidel (Eq. 4, the default) and Jacobi (Algorithm 1, line 12)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import adapters
from cooperative_opt import CooperativeOptimizer
from tests.conftest import make_batches, make_model, make_tasks, params_of, same
from tests.reference import NoiseLog, ReferenceMTCOOL

NAMES = ["a", "b", "c"]


def _opt(model: Any, names: list[str], **kwargs: Any) -> CooperativeOptimizer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return CooperativeOptimizer(model, make_tasks(model, names), torch.optim.SGD, lr=0.2, seed=3, **kwargs)


@pytest.mark.parametrize(
    "config",
    [dict(variant="vanilla"), dict(variant="without_reg", inner_steps=2), dict(samples=2, consistency_weight=0.5)],
    ids=["vanilla", "without_reg-l2", "mt_cool-m2"],
)
def test_jacobi_matches_the_plain_reference(noise_log: NoiseLog, config: dict[str, Any]) -> None:
    torch.manual_seed(3)
    model = make_model(NAMES)
    torch.manual_seed(3)
    ref_model = make_model(NAMES)
    opt = _opt(model, NAMES, update_order="jacobi", sliced_layers=False, **config)
    noisy = config.get("variant", "mt_cool") != "vanilla"
    ref = ReferenceMTCOOL(ref_model, make_tasks(ref_model, NAMES), adapters.task_parameters(ref_model), lr=0.2,
                          clamp_bound=0.05 if noisy else None, samples=config.get("samples", 1),
                          inner_steps=config.get("inner_steps", 1),
                          consistency_weight=opt.settings.consistency_weight, order="jacobi")
    for s in range(3):
        batches = make_batches(NAMES, seed=s)
        opt.step(batches)
        ref.step(batches, noise_log if noisy else None)
        for k, v in params_of(model).items():
            torch.testing.assert_close(v, params_of(ref_model)[k], rtol=1e-5, atol=1e-6, msg=k)
    assert noise_log == []


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_jacobi_does_not_depend_on_the_task_order(inner_steps: int) -> None:
    results = []
    for order in (NAMES, ["c", "a", "b"]):
        torch.manual_seed(0)
        model = make_model(NAMES)  # no BatchNorm: its running statistics are updated in task order
        opt = _opt(model, order, variant="vanilla", update_order="jacobi", inner_steps=inner_steps)
        for s in range(3):
            opt.step(make_batches(NAMES, seed=s))
        results.append(params_of(model))
    assert same(results[0], results[1])
    torch.manual_seed(0)
    gauss_seidel = make_model(NAMES)
    opt = _opt(gauss_seidel, NAMES, variant="vanilla", inner_steps=inner_steps)
    for s in range(3):
        opt.step(make_batches(NAMES, seed=s))
    assert not same(params_of(gauss_seidel), results[0])  # the default order does see earlier updates


def test_jacobi_reads_the_other_tasks_at_the_previous_iterate() -> None:
    torch.manual_seed(0)
    model = make_model(NAMES)
    opt = _opt(model, NAMES, variant="vanilla", update_order="jacobi")
    start = params_of(model)
    batches = make_batches(NAMES)
    weight = lambda: model.encoder[0].weight.detach().clone()  # noqa: E731 - the concatenated split weight
    seen = {}
    for name in opt.iteration():
        with opt.perturb(name):
            seen[name] = weight()
        torch.nn.functional.cross_entropy(model(batches[name][0], name), batches[name][1]).backward()
        opt.step()
        opt.zero_grad()
    sizes = [p.shape[0] for _, p in ((n, p) for n, p in adapters.task_parameters(model)["a"] if p.dim() == 4)]
    first = sizes[0]
    a_start = start["encoder.0.parametrizations.weight.original0"]
    assert torch.equal(seen["c"][:first], a_start)  # c's forward saw a's slice as it was, though a has stepped
    assert not torch.equal(params_of(model)["encoder.0.parametrizations.weight.original0"], a_start)


def test_update_order_is_validated_and_checkpointed() -> None:
    model = make_model(NAMES)
    with pytest.raises(ValueError, match="update_order must be one of"):
        _opt(model, NAMES, update_order="random")
    with pytest.raises(ValueError, match="jacobi' with consistency_reference='clean' is not supported"):
        _opt(model, NAMES, update_order="jacobi", consistency_reference="clean")
    jacobi = _opt(model, NAMES, update_order="jacobi")
    state = jacobi.state_dict()
    with pytest.raises(ValueError, match="'update_order': \\('jacobi', 'gauss_seidel'\\)"):
        _opt(model, NAMES).load_state_dict(state)
    _opt(model, NAMES, update_order="jacobi").load_state_dict(state)
