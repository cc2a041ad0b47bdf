"""The consistency term D between predictions under different noise samples.

``D(yhat_j || ref)`` is averaged over samples j, the batch and any spatial
positions. ``ref`` is the mean of the M predicted distributions (the paper's
formula; identically zero at M = 1) or the prediction without noise
("clean", computed without gradient).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cooperative_opt._task import ConsistencySpec

__all__ = ["bernoulli_kl", "consistency_term", "softmax_kl"]


def _log_mean_prob(log_probs: Sequence[Tensor]) -> Tensor:
    """log(mean_j exp(log_probs[j])), computed stably."""
    stacked = torch.stack(list(log_probs))
    return torch.logsumexp(stacked, dim=0) - math.log(len(log_probs))


def softmax_kl(outputs: Sequence[Tensor], clean: Tensor | None = None) -> Tensor:
    """Mean over samples of KL(softmax(out_j) || reference) over class dim 1.

    ``outputs``: M logit tensors of shape ``[B, C, *spatial]``. ``clean``:
    logits of the reference prediction, or ``None`` for the mean of the M
    predicted distributions. Averaged over the batch and spatial positions.
    """
    log_p = [F.log_softmax(o, dim=1) for o in outputs]
    log_ref = F.log_softmax(clean, dim=1) if clean is not None else _log_mean_prob(log_p)
    kls = [(lp.exp() * (lp - log_ref)).sum(dim=1).mean() for lp in log_p]
    return torch.stack(kls).mean()


def bernoulli_kl(outputs: Sequence[Tensor], clean: Tensor | None = None) -> Tensor:
    """Mean over samples of the Bernoulli KL between sigmoid probabilities.

    ``outputs``: M logit tensors of any shape (one logit per element).
    ``clean``: reference logits, or ``None`` for the mean probability.
    """
    log_p = [F.logsigmoid(o) for o in outputs]
    log_q = [F.logsigmoid(-o) for o in outputs]
    if clean is not None:
        log_ref_p, log_ref_q = F.logsigmoid(clean), F.logsigmoid(-clean)
    else:
        log_ref_p, log_ref_q = _log_mean_prob(log_p), _log_mean_prob(log_q)
    kls = [
        (lp.exp() * (lp - log_ref_p) + lq.exp() * (lq - log_ref_q)).mean() for lp, lq in zip(log_p, log_q)
    ]
    return torch.stack(kls).mean()


def _auto_kind(task: str, output: Any) -> str:
    if not isinstance(output, Tensor):
        raise TypeError(
            f"task {task!r}: consistency='auto' needs a logits tensor but the model returned "
            f"{type(output).__name__}; pass Task(consistency=fn) with fn(outputs, clean) -> Tensor, or None"
        )
    if output.dim() == 0:
        raise ValueError(f"task {task!r}: consistency='auto' cannot use a 0-dim output; pass a callable or None")
    if output.dim() >= 2 and output.shape[1] > 1:
        return "softmax"
    return "bernoulli"


def consistency_term(task: str, spec: ConsistencySpec, outputs: list[Any], clean: Any | None) -> Tensor | None:
    """D for one task's M outputs under ``spec``; ``None`` when ``spec`` is ``None``."""
    if spec is None:
        return None
    if callable(spec):
        value = spec(outputs, clean)
        if not isinstance(value, Tensor) or value.dim() != 0:
            raise TypeError(f"task {task!r}: the consistency callable must return a scalar tensor, got {value!r}")
        return value
    kind = _auto_kind(task, outputs[0]) if spec == "auto" else spec
    if kind == "softmax":
        return softmax_kl(outputs, clean)
    return bernoulli_kl(outputs, clean)
