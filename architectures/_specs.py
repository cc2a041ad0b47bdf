"""What a task of a multi-task network predicts: a map per pixel (voxel) or one vector per image."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Union

__all__ = ["ImageTask", "PixelTask", "TaskSpec", "parse_tasks"]


def _check_count(value: object, owner: str, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{field} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class PixelTask:
    """A pixel-level (voxel-level) task: a decoder giving ``[N, channels, *spatial]`` at input resolution.

    ``channels`` is the number of output maps: class logits for a segmentation,
    one map for a regression such as a radiotherapy dose.

    Example:
        >>> PixelTask(3)
        PixelTask(channels=3)
    """

    channels: int

    def __post_init__(self) -> None:
        _check_count(self.channels, "PixelTask", "channels")


@dataclass(frozen=True)
class ImageTask:
    """An image-level task: global average pooling of the deepest features and a linear layer, ``[N, outputs]``.

    ``outputs`` is the number of logits (a diagnosis) or regressed values (a severity score).

    Example:
        >>> ImageTask(2)
        ImageTask(outputs=2)
    """

    outputs: int

    def __post_init__(self) -> None:
        _check_count(self.outputs, "ImageTask", "outputs")


#: A task of a network of :mod:`architectures`.
TaskSpec = Union[PixelTask, ImageTask]


def parse_tasks(tasks: Mapping[str, TaskSpec], owner: str, minimum: int = 2) -> dict[str, TaskSpec]:
    """Validate ``{task name: PixelTask | ImageTask}`` (at least ``minimum`` tasks), in the given order."""
    if not isinstance(tasks, Mapping):
        raise TypeError(
            f"{owner}: tasks must map task names to PixelTask / ImageTask specs, e.g. "
            f"{{'seg': PixelTask(2), 'cls': ImageTask(3)}}; got {type(tasks).__name__}"
        )
    parsed: dict[str, TaskSpec] = {}
    for name, spec in tasks.items():
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"{owner}: task names must be non-empty strings without '.', got {name!r}")
        if not isinstance(spec, (PixelTask, ImageTask)):
            raise TypeError(
                f"{owner}: tasks[{name!r}] must be a PixelTask(channels) or an ImageTask(outputs), "
                f"got {type(spec).__name__} {spec!r}"
            )
        parsed[name] = spec
    if len(parsed) < minimum:
        hint = "; a single task is architectures.independent(task, spec, backbone)" if minimum > 1 else ""
        raise ValueError(f"{owner}: tasks must name at least {minimum} task(s), got {list(parsed)}{hint}")
    return parsed
