"""A task: its name, its loss, its private head and how its batch reaches the model."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from torch import Tensor, nn

__all__ = ["ConsistencySpec", "Task"]

#: How a task's consistency term D is computed: ``"auto"`` (softmax KL over dim 1 for
#: multi-channel logits, Bernoulli KL for one-logit outputs), ``"softmax"``,
#: ``"bernoulli"``, a callable ``fn(outputs, clean) -> Tensor`` or ``None`` (no term).
ConsistencySpec = Union[Literal["auto", "softmax", "bernoulli"], Callable[[list[Any], Any], Tensor], None]


def _first_element(batch: Any) -> tuple[Any, ...]:
    """Default ``Task.inputs``: the model is called as ``model(batch[0])``."""
    return (batch[0],)


@dataclass(frozen=True, eq=False)
class Task:
    """One task of a cooperative multi-task model.

    Args:
        name: the task's name; must match the names the encoder was split with.
        loss: ``loss(output, batch) -> scalar Tensor``; ``output`` is what
            ``model(*inputs(batch))`` returns.
        head: the task's private parameters (phi_i): a module or an iterable of
            parameters. ``None`` when the task has no private parameters.
        inputs: ``inputs(batch) -> tuple`` of positional arguments for the
            model's forward; defaults to ``(batch[0],)``.
        consistency: how the consistency term is computed for this task's
            outputs (see :data:`ConsistencySpec`).

    Example:
        >>> import torch.nn.functional as F
        >>> t = Task("even", loss=lambda out, b: F.cross_entropy(out, b[1]),
        ...          inputs=lambda b: (b[0], "even"))
    """

    name: str
    loss: Callable[[Any, Any], Tensor]
    head: nn.Module | Iterable[nn.Parameter] | None = None
    inputs: Callable[[Any], tuple[Any, ...]] = field(default=_first_element)
    consistency: ConsistencySpec = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Task name must be a non-empty string, got {self.name!r}")
        if not callable(self.loss):
            raise TypeError(f"Task {self.name!r}: loss must be callable as loss(output, batch), got {self.loss!r}")
        if not callable(self.inputs):
            raise TypeError(
                f"Task {self.name!r}: inputs must be callable as inputs(batch) -> tuple, got {self.inputs!r}"
            )
        if self.consistency not in ("auto", "softmax", "bernoulli", None) and not callable(self.consistency):
            raise ValueError(
                f"Task {self.name!r}: consistency must be 'auto', 'softmax', 'bernoulli', a callable "
                f"fn(outputs, clean) -> Tensor, or None; got {self.consistency!r}"
            )
        head = self.head
        if head is not None and not isinstance(head, nn.Module):
            if isinstance(head, Tensor) or not isinstance(head, Iterable):
                raise TypeError(
                    f"Task {self.name!r}: head must be an nn.Module or an iterable of parameters, "
                    f"got {type(head).__name__}"
                )
            params = tuple(head)
            bad = [type(p).__name__ for p in params if not isinstance(p, Tensor)]
            if bad:
                raise TypeError(f"Task {self.name!r}: head iterable must hold parameters, found {bad}")
            object.__setattr__(self, "head", params)

    def head_parameters(self) -> tuple[nn.Parameter, ...]:
        """The head's parameters (phi_i), in a fixed order."""
        if self.head is None:
            return ()
        if isinstance(self.head, nn.Module):
            return tuple(self.head.parameters())
        return tuple(self.head)
