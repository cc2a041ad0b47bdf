"""The cooperative part of ``CooperativeOptimizer.state_dict()``, and its validation on load.

The state dict is a superset of torch's: the base optimizer's ``state`` and
``param_groups`` at the top level (what ``torch.distributed.checkpoint``,
Lightning, Accelerate and LR-scheduler tooling read), plus ``"cooperative"``:
the outer-iteration counter (and so the phase), the seed, the noise
generators' states, the task names and the settings that define the
trajectory. Checkpoints of version 0.1 (everything under ``"base"``) load too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cooperative_opt._optimizer import CooperativeOptimizer

__all__ = ["cooperative_state", "load_cooperative_state"]

_KEYS = ("steps", "seed", "generators", "tasks", "hyperparameters")


def cooperative_state(opt: CooperativeOptimizer) -> dict[str, Any]:
    """Everything beyond the base optimizer's state that resuming bit-identically needs."""
    return {
        "steps": opt.steps_taken,
        "seed": opt.seed,
        "generators": {str(d): g.get_state() for d, g in opt._generators.items()},
        "tasks": [t.name for t in opt.tasks],
        "hyperparameters": opt.settings.checkpointed(),
    }


def _split(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], Mapping[str, Any]]:
    """(base optimizer state dict, cooperative part) of the current or the 0.1 layout."""
    if "cooperative" in state_dict:
        base = {k: v for k, v in state_dict.items() if k != "cooperative"}
        return base, state_dict["cooperative"]
    if "base" in state_dict:  # version 0.1
        return dict(state_dict["base"]), state_dict
    if "state" in state_dict and "param_groups" in state_dict:
        raise ValueError(
            "state_dict has 'state' and 'param_groups' but no 'cooperative' part: it is a plain optimizer's "
            "state dict; load it into opt.base.load_state_dict, or save with CooperativeOptimizer.state_dict()"
        )
    raise ValueError(
        f"state_dict has keys {sorted(state_dict)[:8]}: it is not from CooperativeOptimizer.state_dict()"
    )


def load_cooperative_state(opt: CooperativeOptimizer, state_dict: Mapping[str, Any]) -> None:
    """Check all of ``state_dict`` against ``opt``, then restore the base optimizer's and the cooperative part."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping from CooperativeOptimizer.state_dict(), got {state_dict!r}")
    base, coop = _split(state_dict)
    missing = [k for k in _KEYS if k not in coop]
    if missing:
        raise ValueError(f"state_dict's cooperative part lacks {missing}; it is not from CooperativeOptimizer.state_dict()")
    tasks = [t.name for t in opt.tasks]
    if list(coop["tasks"]) != tasks:
        raise ValueError(f"state_dict is for tasks {coop['tasks']}, this optimizer has {tasks}")
    mine = opt.settings.checkpointed()
    theirs = {"noise_scale": "absolute", **coop["hyperparameters"]}  # saved before noise_scale existed
    differing = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
    if differing:
        raise ValueError(
            f"state_dict was saved with different settings (saved, current): {differing}; build the "
            "CooperativeOptimizer with the saved settings to resume"
        )
    generators = dict(coop["generators"])
    if sorted(generators) != sorted(str(d) for d in opt._generators):
        raise ValueError(
            f"state_dict has noise generators for devices {sorted(generators)}, the model's slices live on "
            f"{sorted(str(d) for d in opt._generators)}; move the model before loading"
        )
    if opt._iteration.record is not None:
        raise RuntimeError("load_state_dict() was called inside an outer iteration; call it between iterations")
    opt.base.load_state_dict(base)
    for device, generator in opt._generators.items():
        generator.set_state(generators[str(device)])
    opt._iteration.steps = int(coop["steps"])
    opt.seed = int(coop["seed"])
