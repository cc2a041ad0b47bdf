"""timm classification models as cooperative multi-task models (extra ``timm``).

The whole timm model up to its classifier is the shared encoder: its output
is timm's pre-logits features, ``forward_head(forward_features(x),
pre_logits=True)`` (pooling, head norm or head convolution included). Each
task gets its own classifier on those features. Needs ``pip install
'cooperative-opt[timm]'``; timm is imported when :func:`multitask` is called.

See ``docs/adapters/timm.md``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn
from torch.nn.modules.conv import _ConvNd

from adapters._optional import require
from adapters._split import SmallPolicy, _merge_all, split_channels
from adapters._multitask import MultiTaskModel
from adapters._template import parameter_like

__all__ = ["TimmMultiTaskModel", "multitask"]

HeadFactory = Callable[[int, int], nn.Module]


def _validate_tasks(tasks: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(tasks, Mapping):
        raise TypeError(f"tasks must map task names to class counts, e.g. {{'even': 5, 'odd': 5}}; got {tasks!r}")
    bad = {k: v for k, v in tasks.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise ValueError(f"tasks must map task names to class counts >= 1, got {bad}")
    names = [k for k in tasks if not isinstance(k, str) or not k or "." in k]
    if names:
        raise ValueError(f"task names must be non-empty strings without '.', got {names!r}")
    if len(tasks) < 2:
        raise ValueError(f"tasks must name at least two tasks, got {list(tasks)}")
    return dict(tasks)


def _classifier(model: nn.Module) -> tuple[str, nn.Module]:
    """The classifier module and its path, through timm's ``get_classifier`` convention."""
    missing = [a for a in ("forward_features", "forward_head", "get_classifier", "num_features") if not hasattr(model, a)]
    if missing:
        raise TypeError(
            f"{type(model).__name__} does not follow timm's classifier conventions (no {missing}); pass a model "
            "from timm.create_model, or use adapters.multitask(encoder, heads) for other modules"
        )
    classifier = getattr(model, "get_classifier")()
    if not isinstance(classifier, nn.Module):
        raise TypeError(
            f"{type(model).__name__}.get_classifier() returned {type(classifier).__name__}, not one module "
            "(distilled models have two classifiers); use a model with a single classifier"
        )
    paths = [n for n, m in model.named_modules() if m is classifier and n]
    if not paths:
        raise TypeError(f"{type(model).__name__}.get_classifier() is not a submodule of the model")
    return paths[0], classifier


def _features(model: nn.Module, classifier: nn.Module) -> int:
    if isinstance(classifier, nn.Linear):
        return classifier.in_features
    if isinstance(classifier, _ConvNd):
        return classifier.in_channels
    width = getattr(model, "head_hidden_size", None) or getattr(model, "num_features")
    return int(width)


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


class TimmMultiTaskModel(MultiTaskModel):
    """A timm model split between tasks, one classifier per task (built by :func:`multitask`).

    ``model.encoder`` is the timm model without its classifier (it still has
    ``forward_features``), ``model.heads[task]`` the task's classifier.
    :meth:`export` puts a task's classifier back in place: the result is the
    timm model with ``num_classes`` set to the task's class count.

    Args:
        encoder: the split timm model, its classifier replaced by ``nn.Identity``.
        heads: ``{task: classifier}``.
        classifier_path: where the classifier sits in the timm model (``"fc"``, ``"head.fc"``).
    """

    def __init__(self, encoder: nn.Module, heads: Mapping[str, nn.Module], classifier_path: str) -> None:
        super().__init__(encoder, heads)
        self.classifier_path = classifier_path

    def export(self, task: str) -> nn.Module:
        """The timm model for ``task``, with merged parameters and the task's classifier in place.

        With the default heads its ``state_dict`` loads into
        ``timm.create_model(name, num_classes=classes)``.
        """
        self._check_task(task)
        out = copy.deepcopy(self.encoder)
        _merge_all(out)
        head = copy.deepcopy(self.heads[task])
        _set(out, self.classifier_path, head)
        out_features = getattr(head, "out_features", None)
        if out_features is not None:
            setattr(out, "num_classes", out_features)
        return out.train(self.training)


def multitask(
    model: str | nn.Module,
    tasks: Mapping[str, int],
    *,
    head: HeadFactory | None = None,
    dims: Mapping[str, int] | None = None,
    small: SmallPolicy = "split",
    **create_kwargs: Any,
) -> TimmMultiTaskModel:
    """A timm classification model as a cooperative multi-task model, one classifier per task.

    The model (a copy of it: ``model`` itself is not changed) loses its
    classifier and becomes the channel-split encoder, computing timm's
    pre-logits features exactly as before (pretrained weights survive). Each
    task gets a classifier: the first task whose class count equals the
    model's ``num_classes`` keeps the model's own (trained) classifier, the
    others get a new ``nn.Linear(features, classes)`` (or ``head(features,
    classes)``). The model keeps its device, dtype and training flag.

    Args:
        model: a timm model, or a timm model name for ``timm.create_model``.
        tasks: ``{task: number of classes}``, two or more, in task order.
        head: optional factory ``head(in_features, classes) -> nn.Module``
            for the new classifiers.
        dims: splitting-rule overrides (:func:`adapters.split_channels`).
        small: policy for parameters with fewer channels than tasks.
        **create_kwargs: passed to ``timm.create_model`` when ``model`` is a
            name (e.g. ``pretrained=False``, ``img_size=32``).

    Returns:
        a :class:`TimmMultiTaskModel`; ``net(x, task)`` gives task's logits.

    Example:
        >>> net = multitask("resnet18", {"even": 5, "odd": 5})  # doctest: +SKIP
        >>> net(torch.randn(2, 3, 32, 32), "odd").shape  # doctest: +SKIP
        torch.Size([2, 5])
    """
    timm = require("timm", "timm")
    checked = _validate_tasks(tasks)
    if isinstance(model, str):
        built = timm.create_model(model, **create_kwargs)
        if not isinstance(built, nn.Module):  # pragma: no cover - timm always returns a module
            raise TypeError(f"timm.create_model({model!r}) returned {type(built).__name__}")
        encoder: nn.Module = built
    elif isinstance(model, nn.Module):
        if create_kwargs:
            raise TypeError(
                f"keyword arguments {sorted(create_kwargs)} only apply when model is a timm model name; "
                "configure the instance before passing it"
            )
        encoder = model
    else:
        raise TypeError(f"model must be a timm model or a timm model name, got {type(model).__name__}")
    if head is not None and not callable(head):
        raise TypeError(f"head must be a callable head(in_features, classes) -> nn.Module, got {head!r}")

    path, classifier = _classifier(encoder)
    if encoder is model:
        encoder = copy.deepcopy(encoder)
        path, classifier = _classifier(encoder)
    width = _features(encoder, classifier)
    original_classes = int(getattr(encoder, "num_classes", -1))
    keep = None
    if head is None and isinstance(classifier, nn.Linear):
        keep = next((t for t, c in checked.items() if c == original_classes), None)

    heads: dict[str, nn.Module] = {}
    for task, classes in checked.items():
        if task == keep:
            heads[task] = classifier
            continue
        new = head(width, classes) if head is not None else nn.Linear(width, classes)
        if not isinstance(new, nn.Module):
            raise TypeError(f"head({width}, {classes}) must return an nn.Module, got {type(new).__name__}")
        heads[task] = parameter_like(new, encoder)

    stripped = nn.Identity().train(classifier.training)
    _set(encoder, path, stripped)
    try:
        split_channels(encoder, list(checked), dims=dims, small=small)
    except BaseException:
        _set(encoder, path, classifier)
        raise
    setattr(encoder, "num_classes", 0)  # as timm's reset_classifier(0) would: the model now returns features
    return TimmMultiTaskModel(encoder, heads, path)
