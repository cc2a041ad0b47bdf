"""The paper's ablations (Table 1) as presets: which parts of MT-COOL are on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

__all__ = ["VARIANTS", "Variant", "VariantSpec"]

#: ``"mt_cool"``: noise, clamp and consistency term (the full method).
#: ``"without_reg"``: noise and clamp, no consistency term ("w/o Reg").
#: ``"vanilla"``: alternating updates only: no noise, no clamp, no consistency term.
Variant = Literal["mt_cool", "without_reg", "vanilla"]


@dataclass(frozen=True)
class VariantSpec:
    """Which components a variant switches on."""

    noise: bool
    clamp: bool
    consistency: bool


VARIANTS: dict[str, VariantSpec] = {
    "mt_cool": VariantSpec(noise=True, clamp=True, consistency=True),
    "without_reg": VariantSpec(noise=True, clamp=True, consistency=False),
    "vanilla": VariantSpec(noise=False, clamp=False, consistency=False),
}

if set(VARIANTS) != set(get_args(Variant)):  # pragma: no cover - guards edits of this file
    raise RuntimeError("VARIANTS and Variant disagree")
