"""torch.distributed.checkpoint (single process): state init, get/set_state_dict, save/load, resume."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from cooperative_opt import CooperativeOptimizer
from tests.conftest import make_batches, make_model, make_tasks, params_of, same

NAMES = ["a", "b"]


def _build(seed: int) -> tuple[Any, CooperativeOptimizer]:
    torch.manual_seed(0)
    model = make_model(NAMES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return model, CooperativeOptimizer(model, make_tasks(model, NAMES), torch.optim.AdamW, lr=1e-2, seed=seed,
                                           samples=2, consistency_weight=0.5)


def test_get_state_dict_initialises_state_without_moving_anything() -> None:
    model, opt = _build(1)
    before = params_of(model)
    _, osd = get_state_dict(model, opt)  # calls opt.step(closure=None) on zero gradients with lr 0
    assert set(osd) == {"state", "param_groups"} and len(osd["state"]) == len(list(model.parameters()))
    assert same(params_of(model), before) and opt.steps_taken == 0


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_dcp_save_and_load_resume_bit_identically(tmp_path: Path) -> None:
    batches = [make_batches(NAMES, seed=s) for s in range(6)]
    model, opt = _build(1)
    for b in batches[:3]:
        opt.step(b)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd, "cooperative": opt.state_dict()["cooperative"]}, checkpoint_id=tmp_path)
    for b in batches[3:]:
        opt.step(b)

    resumed_model, resumed = _build(99)
    msd2, osd2 = get_state_dict(resumed_model, resumed)
    loaded = {"model": msd2, "optim": osd2, "cooperative": resumed.state_dict()["cooperative"]}
    dcp.load(loaded, checkpoint_id=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_state_dict(resumed_model, resumed, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    assert any("no 'cooperative' part" in str(w.message) for w in caught)  # says how to carry the rest
    resumed.load_state_dict({"cooperative": loaded["cooperative"]})
    assert resumed.steps_taken == 3 and resumed.seed == 1
    for b in batches[3:]:
        resumed.step(b)
    assert same(params_of(model), params_of(resumed_model))
