"""Command-line pieces shared by every benchmark: argument types, the device check, strict-JSON values."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import torch

from benchmarks._methods import METHODS

__all__ = ["NON_NEGATIVE", "NON_NEGATIVE_INT", "POSITIVE", "POSITIVE_INT", "finite", "method_list", "number",
           "resolve_device"]


def number(kind: Callable[[str], Any], minimum: float, inclusive: bool, what: str) -> Callable[[str], Any]:
    """argparse type: ``kind(text)`` that is finite and at least (or above) ``minimum``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (not inclusive and value == minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


POSITIVE_INT = number(int, 1, True, "a positive integer")
NON_NEGATIVE_INT = number(int, 0, True, "a non-negative integer")
NON_NEGATIVE = number(float, 0.0, True, "a finite non-negative number")
POSITIVE = number(float, 0.0, False, "a finite positive number")


def method_list(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated method names, returned in :data:`METHODS` order."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(names - set(METHODS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {unknown or text!r}; give a comma list drawn from {','.join(METHODS)}"
        )
    return tuple(method for method in METHODS if method in names)


def resolve_device(text: str) -> str:
    """Check that ``--device`` names a usable torch device and return it."""
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise ValueError(f"--device {text!r} is not a torch device ({error}); use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text!r} asks for CUDA but torch.cuda.is_available() is False; use --device cpu")
    return str(device)


def finite(value: Any) -> Any:
    """``value`` with non-finite floats (diverged losses) replaced by ``None``, for strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value
