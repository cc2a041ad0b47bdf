"""Running statistics of normalization layers during noisy forward passes.

Evaluating a task under M noise samples runs the model M times; letting each
pass update BatchNorm's running mean and variance would weight those batches
M times and mix in statistics of perturbed weights (a peer-library bug). The
policy decides which passes may write the real buffers:

- ``"once"`` (default): the first sample's forward of each task per inner
  step updates them, the other samples read them but write to throwaway copies;
- ``"every_sample"``: every forward updates them (plain PyTorch behaviour);
- ``"frozen"``: no forward inside ``step`` updates them;
- ``"clean"``: no noisy forward updates them; one extra forward without noise
  and without gradient per task and inner step does (with
  ``consistency_reference="clean"`` the reference's own forward serves, at no
  extra cost). Evaluation runs the model with clean weights, so these are the
  statistics it should normalize with (docs/usage.md, "BatchNorm statistics",
  quotes what statistics gathered under noise cost on the REFUGE benchmark).
  A model without normalization layers skips the extra forward.

Without noise (``variant="vanilla"``) ``"once"`` and ``"clean"`` coincide.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["RunningStats", "RunningStatsPolicy"]

RunningStatsPolicy = Literal["once", "every_sample", "frozen", "clean"]


class RunningStats:
    """The normalization buffers of a model that forward passes update in place."""

    def __init__(self, model: nn.Module) -> None:
        self.names: list[str] = []
        self._slots: list[tuple[nn.Module, str]] = []
        for module_name, module in model.named_modules():
            if isinstance(module, _NormBase) and module.track_running_stats:
                for buffer_name, buffer in module.named_buffers(recurse=False):
                    self.names.append(f"{module_name}.{buffer_name}" if module_name else buffer_name)
                    self._slots.append((module, buffer_name))
        self.buffers: list[Tensor] = []
        self._snapshot: list[Tensor] = []
        self.refresh()

    def refresh(self) -> None:
        """Look the buffer tensors up again (``model.to(...)`` replaces them)."""
        found = [module._buffers[name] for module, name in self._slots]
        buffers = [b for b in found if b is not None]
        if len(buffers) != len(found):
            missing = [n for n, b in zip(self.names, found) if b is None]
            raise RuntimeError(f"normalization buffers {missing} were removed after the optimizer was built")
        if len(buffers) != len(self._snapshot) or any(
            b.shape != s.shape or b.dtype != s.dtype or b.device != s.device for b, s in zip(buffers, self._snapshot)
        ):
            self._snapshot = [b.clone() for b in buffers]
        self.buffers = buffers

    def scratch(self) -> dict[str, Tensor]:
        """Throwaway copies to pass to ``functional_call`` so the real buffers stay untouched."""
        return {n: b.clone() for n, b in zip(self.names, self.buffers)}

    def stacked_scratch(self, samples: int) -> dict[str, Tensor]:
        """``[samples, *shape]`` copies for ``vmap``, one per noise sample."""
        return {n: b.unsqueeze(0).expand(samples, *b.shape).clone() for n, b in zip(self.names, self.buffers)}

    def adopt(self, stacked: dict[str, Tensor], sample: int) -> None:
        """Copy one sample's updated buffers from :meth:`stacked_scratch` into the real buffers."""
        if self.buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, [stacked[n][sample] for n in self.names])

    def save(self) -> None:
        """Remember the current values, to :meth:`restore` if a task's update is abandoned."""
        if self.buffers:
            torch._foreach_copy_(self._snapshot, self.buffers)

    def restore(self) -> None:
        """Put back the values of the last :meth:`save`."""
        if self.buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, self._snapshot)
