"""The cooperative part of ``CooperativeOptimizer.state_dict()``, and its validation on load.

The state dict is a superset of torch's: the base optimizer's ``state`` and
``param_groups`` at the top level (what ``torch.distributed.checkpoint``,
Lightning, Accelerate and LR-scheduler tooling read), plus ``"cooperative"``:
the outer-iteration counter (and so the phase), the seed, the noise
generators' states, the task names and the settings that define the
trajectory. Checkpoints of version 0.1 (everything under ``"base"``) load too.

``torch.distributed.checkpoint.state_dict.get_state_dict`` keeps only
``state`` and ``param_groups``; save the ``"cooperative"`` part beside it
(docs/usage.md, "Checkpoints").
"""

from __future__ import annotations

import warnings
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


_TORCH_LAYOUT_WARNING = (
    "state_dict holds the base optimizer's 'state' and 'param_groups' but no 'cooperative' part (what "
    "torch.distributed.checkpoint.state_dict.set_state_dict passes): loaded those; the outer-iteration counter "
    "and the noise generators are unchanged. Save opt.state_dict()['cooperative'] beside it and restore it with "
    "opt.load_state_dict({'cooperative': saved}) to resume bit-identically"
)


def _split(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any] | None, Mapping[str, Any] | None]:
    """(base optimizer state dict, cooperative part) of the current or the 0.1 layout; either may be absent."""
    if "base" in state_dict:  # version 0.1
        return dict(state_dict["base"]), state_dict
    base = {k: v for k, v in state_dict.items() if k != "cooperative"}
    has_base = "state" in base and "param_groups" in base
    if base and not has_base:
        raise ValueError(
            f"state_dict has keys {sorted(state_dict)[:8]}: it is not from CooperativeOptimizer.state_dict()"
        )
    coop = state_dict.get("cooperative")
    if coop is None and not has_base:
        raise ValueError("state_dict is empty: it is not from CooperativeOptimizer.state_dict()")
    return (base if has_base else None), coop


def load_cooperative_state(opt: CooperativeOptimizer, state_dict: Mapping[str, Any]) -> None:
    """Check all of ``state_dict`` against ``opt``, then restore the base optimizer's and the cooperative part.

    Either part alone loads too: ``{"cooperative": ...}`` restores only the cooperative part, and a plain
    ``{"state", "param_groups"}`` dict (``torch.distributed.checkpoint``) only the base optimizer's, with a
    warning that says how to carry the rest.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping from CooperativeOptimizer.state_dict(), got {state_dict!r}")
    if opt._iteration.record is not None:
        raise RuntimeError("load_state_dict() was called inside an outer iteration; call it between iterations")
    base, coop = _split(state_dict)
    if coop is None:
        warnings.warn(_TORCH_LAYOUT_WARNING, UserWarning, stacklevel=3)
    else:
        _check(opt, coop)
    if base is not None:
        opt.base.load_state_dict(base)
    if coop is not None:
        generators = dict(coop["generators"])
        for device, generator in opt._generators.items():
            generator.set_state(generators[str(device)])
        opt._iteration.steps = int(coop["steps"])
        opt.seed = int(coop["seed"])


def _check(opt: CooperativeOptimizer, coop: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming what in the cooperative part does not match ``opt``."""
    missing = [k for k in _KEYS if k not in coop]
    if missing:
        raise ValueError(f"state_dict's cooperative part lacks {missing}; it is not from CooperativeOptimizer.state_dict()")
    tasks = [t.name for t in opt.tasks]
    if list(coop["tasks"]) != tasks:
        raise ValueError(f"state_dict is for tasks {coop['tasks']}, this optimizer has {tasks}")
    # settings added after 0.1 are saved only when they differ from their default, which an older or a
    # default-valued checkpoint means
    defaults = {"noise_scale": "absolute", "noise": "identical", "update_order": "gauss_seidel"}
    mine = {**defaults, **opt.settings.checkpointed()}
    theirs = {**defaults, **coop["hyperparameters"]}
    differing = {k: (theirs.get(k), mine.get(k)) for k in sorted({*mine, *theirs}) if theirs.get(k) != mine.get(k)}
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
