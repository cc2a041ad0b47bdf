"""Optional dependencies, imported only when an adapter for them is used."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise ``ImportError`` naming the extra that installs it.

    >>> require("torch", "dev").__name__
    'torch'
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"adapters.{extra} needs the optional dependency {module!r}, which is not installed; "
            f"install it with: pip install 'cooperative-opt[{extra}]'"
        ) from error
