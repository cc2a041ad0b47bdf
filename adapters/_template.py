"""Export of a family adapter's task back into its library's own architecture.

A family adapter keeps the converted library model as a *template*: its
modules are the multi-task model's encoder stages and the first decoder. To
export task ``t``, the template is deep-copied with its encoder stages
replaced by merged copies of the split encoder and its decoder modules by
copies of task ``t``'s decoder (``copy.deepcopy`` with a pre-filled memo), so
every other reference the library keeps to those modules (DynUNet's skip
layers, MONAI UNet's nested blocks) points at the substitutes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from torch import nn

from adapters._multitask import MultiTaskModel
from adapters._split import _merge_all

__all__ = ["TemplateModel", "parameter_like"]

#: (template path, path inside the multi-task model's encoder or task head; None: drop the template's module)
Slot = tuple[str, Optional[str]]


def parameter_like(module: nn.Module, reference: nn.Module) -> nn.Module:
    """``module`` moved to the device and floating dtype of ``reference``'s first parameter, with its training flag."""
    first = next(reference.parameters(), None)
    if first is not None:
        module.to(device=first.device, dtype=first.dtype)
    return module.train(reference.training)


class TemplateModel(MultiTaskModel):
    """A :class:`MultiTaskModel` whose segmentation tasks export to the library's architecture.

    Args:
        encoder: the split encoder.
        heads: ``{task: head}``.
        feeds: fed classification heads.
        template: the converted library model (held, not registered: its
            modules are this model's).
        encoder_slots: ``(template path, encoder path)`` of every encoder stage.
        head_slots: per exportable task, ``(template path, head path or None)``.
        classes: ``{task: number of classes}``.
        family: the extra's name, for messages.
    """

    def __init__(
        self,
        encoder: nn.Module,
        heads: Mapping[str, nn.Module],
        *,
        feeds: Mapping[str, str] | None,
        template: nn.Module,
        encoder_slots: Sequence[Slot],
        head_slots: Mapping[str, Sequence[Slot]],
        classes: Mapping[str, int],
        family: str,
    ) -> None:
        super().__init__(encoder, heads, feeds=feeds)
        object.__setattr__(self, "_template", template)  # not a submodule: its modules are ours
        self._encoder_slots = tuple(encoder_slots)
        self._head_slots = {task: tuple(slots) for task, slots in head_slots.items()}
        self.classes = dict(classes)
        self._family = family

    def _template_model(self) -> nn.Module:
        """The converted library model whose architecture :meth:`export` reproduces."""
        template: nn.Module = self.__dict__["_template"]
        return template

    def _exportable(self, task: str) -> None:
        self._check_task(task)
        if task not in self._head_slots:
            exportable = sorted(self._head_slots)
            raise ValueError(
                f"task {task!r} is a classification task: {self._family} has no architecture for it alone; "
                f"export one of the segmentation tasks {exportable}, or use model.encoder and "
                f"model.heads[{task!r}] directly"
            )

    def _substituted(self, task: str, extra: Sequence[tuple[str, nn.Module | None]] = ()) -> nn.Module:
        """A copy of the template with merged encoder stages and task ``task``'s head modules."""
        encoder = copy.deepcopy(self.encoder)
        _merge_all(encoder)
        head = copy.deepcopy(self.heads[task])
        template = self._template_model()
        memo: dict[int, Any] = {}
        for template_path, encoder_path in self._encoder_slots:
            memo[id(template.get_submodule(template_path))] = encoder.get_submodule(encoder_path or "")
        replacements: list[tuple[str, nn.Module | None]] = [
            (path, None if inner is None else head.get_submodule(inner)) for path, inner in self._head_slots[task]
        ]
        for path, module in [*replacements, *extra]:
            parent_path, _, leaf = path.rpartition(".")
            current = getattr(template.get_submodule(parent_path), leaf)
            if current is not None:
                memo[id(current)] = module
        out = copy.deepcopy(template, memo)
        for path, module in [*replacements, *extra]:  # a slot the template had empty
            parent_path, _, leaf = path.rpartition(".")
            setattr(out.get_submodule(parent_path), leaf, module)
        return out.train(self.training)

    def export(self, task: str) -> nn.Module:
        self._exportable(task)
        return self._substituted(task)
