"""MT-COOL's settings and their validation: one frozen record, checked once when the optimizer is built."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from cooperative_opt._running_stats import RunningStatsPolicy
from cooperative_opt._variants import VARIANTS, Variant

__all__ = ["Settings", "Vectorize", "positive_int"]

Vectorize = bool | Literal["auto"]


def positive_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, or a ``TypeError`` / ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _finite_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _choice(name: str, value: object, options: Sequence[object]) -> Any:
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")
    return value


def _bound(variant: str, name: str, value: float | None, bound: float, enabled: bool) -> float | None:
    if not enabled:
        if value is not None:
            raise ValueError(
                f"{name}={value} conflicts with variant={variant!r}, which has no "
                f"{name.removesuffix('_bound')}; drop {name} or choose another variant"
            )
        return None
    shown = name if value is not None else "bound"
    b = _finite_float(shown, value if value is not None else bound)
    if b <= 0:
        raise ValueError(
            f"{shown} must be > 0 while noise/clamp is on, got {b}; use variant='vanilla' to turn noise and clamp off"
        )
    return b


def _consistency_weight(variant: str, value: float | None, enabled: bool) -> float:
    if value is None:
        return 1.0 if enabled else 0.0
    weight = _finite_float("consistency_weight", value)
    if weight < 0:
        raise ValueError(f"consistency_weight must be >= 0, got {weight}")
    if weight > 0 and not enabled:
        raise ValueError(
            f"consistency_weight={weight} conflicts with variant={variant!r}, which has no "
            "consistency term; use variant='mt_cool'"
        )
    return weight


@dataclass(frozen=True)
class Settings:
    """Every MT-COOL setting of one optimizer, validated (see ``CooperativeOptimizer`` for their meaning).

    ``noise_bound`` / ``clamp_bound`` are ``None`` where the variant has no noise / clamp.
    """

    variant: Variant
    noise_bound: float | None
    clamp_bound: float | None
    noise_scale: Literal["absolute", "relative"]
    samples: int
    inner_steps: int
    consistency_weight: float
    consistency_reference: Literal["mean", "clean"]
    warmup_steps: int
    running_stats: RunningStatsPolicy
    vectorize: Vectorize
    nonfinite: Literal["skip", "raise"]
    sliced_layers: bool
    noise: Literal["identical", "per_rank"] = "identical"
    update_order: Literal["gauss_seidel", "jacobi"] = "gauss_seidel"

    @staticmethod
    def build(
        *,
        variant: object,
        bound: float,
        noise_bound: float | None,
        clamp_bound: float | None,
        noise_scale: object,
        samples: object,
        inner_steps: object,
        consistency_weight: float | None,
        consistency_reference: object,
        warmup_steps: object,
        running_stats: object,
        vectorize: object,
        nonfinite: object,
        sliced_layers: object,
        noise: object = "identical",
        update_order: object = "gauss_seidel",
    ) -> Settings:
        """Validate the keyword arguments of ``CooperativeOptimizer``; errors name the argument and the fix."""
        name: Variant = _choice("variant", variant, list(VARIANTS))
        spec = VARIANTS[name]
        scale = _choice("noise_scale", noise_scale, ["absolute", "relative"])
        if scale == "relative" and not spec.noise:
            raise ValueError(
                f"noise_scale='relative' conflicts with variant={name!r}, which has no noise; "
                "drop noise_scale or choose another variant"
            )
        mode = _choice("noise", noise, ["identical", "per_rank"])
        if mode == "per_rank" and not spec.noise:
            raise ValueError(
                f"noise='per_rank' conflicts with variant={name!r}, which has no noise; drop it or choose another variant"
            )
        order = _choice("update_order", update_order, ["gauss_seidel", "jacobi"])
        reference = _choice("consistency_reference", consistency_reference, ["mean", "clean"])
        if order == "jacobi" and reference == "clean" and spec.consistency and consistency_weight != 0:
            raise ValueError(
                "update_order='jacobi' with consistency_reference='clean' is not supported: the noise-free "
                "reference would have to be evaluated at the other tasks' previous iterate; use the paper's "
                "consistency_reference='mean' (samples > 1) with Jacobi order"
            )
        if not isinstance(sliced_layers, bool):
            raise TypeError(f"sliced_layers must be True or False, got {sliced_layers!r}")
        return Settings(
            variant=name,
            noise_bound=_bound(name, "noise_bound", noise_bound, bound, spec.noise),
            clamp_bound=_bound(name, "clamp_bound", clamp_bound, bound, spec.clamp),
            noise_scale=scale,
            samples=positive_int("samples", samples, 1),
            inner_steps=positive_int("inner_steps", inner_steps, 1),
            consistency_weight=_consistency_weight(name, consistency_weight, spec.consistency),
            consistency_reference=reference,
            warmup_steps=positive_int("warmup_steps", warmup_steps, 0),
            running_stats=_choice("running_stats", running_stats, ["once", "every_sample", "frozen", "clean"]),
            vectorize=_choice("vectorize", vectorize, ["auto", True, False]),
            nonfinite=_choice("nonfinite", nonfinite, ["skip", "raise"]),
            sliced_layers=sliced_layers,
            noise=mode,
            update_order=order,
        )

    @property
    def consistency_active(self) -> bool:
        """Whether the consistency term can be non-zero: a weight, noise, and M > 1 or the clean reference."""
        return (
            self.consistency_weight > 0
            and self.noise_bound is not None
            and (self.samples > 1 or self.consistency_reference == "clean")
        )

    def warn_inactive_consistency(self) -> None:
        """The paper's formula at M = 1 is identically zero: say so once, when the optimizer is built."""
        if self.consistency_weight > 0 and self.noise_bound is not None and not self.consistency_active:
            warnings.warn(
                "with samples=1 and consistency_reference='mean' (the paper's formula) the consistency term is "
                "identically zero; pass consistency_reference='clean' or samples>1 to make it active "
                "(docs/method.md, 'The M = 1 gap')",
                UserWarning,
                stacklevel=4,
            )

    def checkpointed(self) -> dict[str, Any]:
        """The settings a checkpoint must agree with to resume bit-identically."""
        saved = asdict(self)
        for key in ("vectorize", "nonfinite", "sliced_layers"):  # do not change the trajectory's definition
            saved.pop(key)
        for key, default in (("noise", "identical"), ("update_order", "gauss_seidel")):
            if saved[key] == default:
                saved.pop(key)  # checkpoints from before the option stay loadable
        return saved
