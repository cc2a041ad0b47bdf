"""segmentation-models-pytorch models as cooperative multi-task models (extra ``smp``).

The smp encoder (all its down-sampling stages: the paper's shared encoder)
is channel-split between the tasks. Every segmentation task gets its own
decoder and segmentation head; classification tasks get a head on the
deepest encoder features, optionally also reading a segmentation task's
prediction. Works for ``smp.Unet`` and every smp architecture with the same
``encoder`` / ``decoder`` / ``segmentation_head`` structure (FPN, Linknet,
PSPNet, DeepLabV3(+), MAnet, PAN, UnetPlusPlus, UPerNet, Segformer, DPT).
Needs ``pip install 'cooperative-opt[smp]'``; smp is imported when
:func:`multitask` is called.

See ``docs/adapters/smp.md``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from adapters._heads import (
    Classification,
    Deepest,
    FedClassifier,
    Segmentation,
    TaskSpec,
    last_conv,
    parse_tasks,
    with_classes,
)
from adapters._optional import require
from adapters._split import SmallPolicy, split_channels
from adapters._template import Slot, TemplateModel, parameter_like

__all__ = ["Classification", "Segmentation", "SmpMultiTaskModel", "SmpSegmentationHead", "multitask"]


class SmpSegmentationHead(nn.Module):
    """One segmentation task's decoder and segmentation head: ``head(decoder(features))``.

    ``prefix=True`` for encoders returning ``(features, prefix_tokens)`` (DPT),
    whose decoder is called as ``decoder(features, prefix_tokens)``.
    """

    def __init__(self, decoder: nn.Module, segmentation_head: nn.Module, prefix: bool = False) -> None:
        super().__init__()
        self.decoder = decoder
        self.segmentation_head = segmentation_head
        self.prefix = prefix

    def forward(self, features: Any) -> Any:
        if self.prefix:
            maps, tokens = features
            return self.segmentation_head(self.decoder(maps, tokens))
        return self.segmentation_head(self.decoder(features))


class SmpMultiTaskModel(TemplateModel):
    """An smp model split between tasks (built by :func:`multitask`).

    ``model.encoder`` is the smp encoder (returns the multi-scale features),
    ``model.heads[task]`` a :class:`SmpSegmentationHead` or a classification
    head. :meth:`export` gives a segmentation task's smp model back.
    """

    def export(self, task: str, aux: str | None = None) -> nn.Module:
        """The smp model of segmentation task ``task``, with merged parameters.

        Its ``state_dict`` loads into a fresh smp model of the same
        architecture built with ``classes`` = the task's class count and no
        ``aux_params``, or, with ``aux`` naming a classification task that
        reads no segmentation, ``aux_params={"classes": ..., "dropout": ...}``
        with that task's head as smp's classification head.
        """
        self._exportable(task)
        extra: list[tuple[str, nn.Module | None]] = [("classification_head", None)]
        if aux is not None:
            self._check_task(aux)
            head = self.heads[aux]
            if aux in self.feeds or not isinstance(head, Deepest):
                raise ValueError(
                    f"aux={aux!r} must be a classification task on the deepest features that reads no "
                    "segmentation; smp's classification head has no input for a segmentation"
                )
            extra = [("classification_head", copy.deepcopy(head.head))]
        return self._substituted(task, extra)


def _build(model: str | nn.Module, create_kwargs: dict[str, Any]) -> nn.Module:
    smp = require("segmentation_models_pytorch", "smp")
    if isinstance(model, str):
        built = smp.create_model(model, **create_kwargs)
        if not isinstance(built, nn.Module):  # pragma: no cover - smp always returns a module
            raise TypeError(f"smp.create_model({model!r}) returned {type(built).__name__}")
        return built
    if create_kwargs:
        raise TypeError(
            f"keyword arguments {sorted(create_kwargs)} only apply when model is an smp architecture name; "
            "configure the instance before passing it"
        )
    if not isinstance(model, smp.base.SegmentationModel):
        raise TypeError(
            f"model must be an smp SegmentationModel (smp.Unet(...), smp.FPN(...), ...) or an architecture "
            f"name, got {type(model).__name__}; use adapters.multitask(encoder, heads) for other modules"
        )
    copied: nn.Module = copy.deepcopy(model)
    return copied


def multitask(
    model: str | nn.Module,
    tasks: Mapping[str, TaskSpec],
    *,
    dims: Mapping[str, int] | None = None,
    small: SmallPolicy = "split",
    **create_kwargs: Any,
) -> SmpMultiTaskModel:
    """An smp segmentation model as a cooperative multi-task model.

    Works on a copy (``model`` itself is not changed), keeping device, dtype
    and training flag. The encoder is channel-split between the tasks and
    computes exactly what it did (pretrained encoder weights survive).

    - Segmentation tasks (an int, or :class:`adapters.Segmentation`): the first
      one keeps the model's decoder, the others get a copy of it; each gets
      the model's segmentation head, or a copy with a new output convolution
      when its class count differs from the model's ``classes``.
    - Classification tasks (:class:`adapters.Classification`): smp's
      ``ClassificationHead`` on the deepest features (the model's own aux head
      for the first task with its class count, when the model has one); with
      ``fed_by="seg"`` a :class:`adapters.FedClassifier` that also reads the
      segmentation prediction, as in the paper's REFUGE set-up.

    Args:
        model: an smp model instance, or an architecture name for
            ``smp.create_model`` (``"Unet"``, ``"FPN"``, ...).
        tasks: ``{task: spec}``, two or more, in task order.
        dims: splitting-rule overrides (:func:`adapters.split_channels`).
        small: policy for parameters with fewer channels than tasks.
        **create_kwargs: passed to ``smp.create_model`` when ``model`` is a
            name (e.g. ``encoder_name="resnet18", encoder_weights=None``).

    Example:
        >>> net = multitask("Unet", {"seg": 3, "cls": Classification(2, fed_by="seg")},
        ...                 encoder_name="resnet18", encoder_weights=None)  # doctest: +SKIP
    """
    specs = parse_tasks(tasks, "adapters.smp.multitask")
    model = _build(model, dict(create_kwargs))
    missing = [a for a in ("encoder", "decoder", "segmentation_head") if not isinstance(getattr(model, a, None), nn.Module)]
    if missing:
        raise TypeError(f"{type(model).__name__} lacks the smp modules {missing}")
    encoder: nn.Module = getattr(model, "encoder")
    prefix = type(model).__name__ == "DPT"
    index: Sequence[int] = (0, -1) if prefix else (-1,)
    deep_channels = int(getattr(encoder, "out_channels")[-1])
    seg_head: nn.Module = getattr(model, "segmentation_head")
    decoder: nn.Module = getattr(model, "decoder")
    classes = last_conv(seg_head)[1].out_channels
    aux = getattr(model, "classification_head", None)
    smp = require("segmentation_models_pytorch", "smp")

    heads: dict[str, nn.Module] = {}
    head_slots: dict[str, list[Slot]] = {}
    feeds: dict[str, str] = {}
    first_seg = True
    aux_taken = False
    for task, spec in specs.items():
        if isinstance(spec, Segmentation):
            if first_seg:
                dec, out = decoder, (seg_head if spec.classes == classes else with_classes(seg_head, spec.classes))
                first_seg = False
            else:
                dec, out = copy.deepcopy(decoder), with_classes(seg_head, spec.classes)
            heads[task] = SmpSegmentationHead(dec, out, prefix).train(model.training)
            head_slots[task] = [("decoder", "decoder"), ("segmentation_head", "segmentation_head")]
            continue
        if spec.fed_by is not None:
            source = specs[spec.fed_by]
            new: nn.Module = FedClassifier(deep_channels, source.classes, spec.classes, 2, index, spec.dropout)
            heads[task] = parameter_like(new, model)
            feeds[task] = spec.fed_by
        elif isinstance(aux, nn.Module) and not aux_taken and _last_linear_out(aux) == spec.classes:
            heads[task] = Deepest(aux, index).train(model.training)
            aux_taken = True
        else:
            head = smp.base.ClassificationHead(deep_channels, spec.classes, pooling="avg", dropout=spec.dropout)
            heads[task] = parameter_like(Deepest(head, index), model)

    built = SmpMultiTaskModel(
        encoder,
        heads,
        feeds=feeds,
        template=model,
        encoder_slots=[("encoder", "")],
        head_slots=head_slots,
        classes={task: spec.classes for task, spec in specs.items()},
        family="smp",
    )
    split_channels(encoder, list(specs), dims=dims, small=small)
    return built


def _last_linear_out(module: nn.Module) -> int:
    """Output features of the last linear layer in ``module`` (``-1`` if none)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else -1
