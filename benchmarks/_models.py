"""LeNet networks for the even/odd digit benchmark (paper Section 3.1).

The paper uses "the widely used LeNet architecture for MNIST, of which the last
layer contains 50 hidden units, followed by a final prediction output". That is
the classic PyTorch MNIST LeNet: two 5x5 convolutions with 10 and 20 channels,
each followed by ReLU and 2x2 max-pooling, then a 50-unit hidden layer. Here the
whole stack up to and including the 50 hidden units is the shared ``encoder``
and the final prediction layer is a per-task ``head``. Dropout is left out so
every method sees the same deterministic network.

The convolutions are unpadded when the input is large enough (28x28 MNIST gives
the classic 20 * 4 * 4 = 320 flattened features) and use "same" padding
(``kernel_size // 2``) otherwise (8x8 digits give 20 * 2 * 2 = 80).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

__all__ = ["LeNetMultiTask", "LeNetSingle", "lenet_encoder"]


def _pair(size: int | tuple[int, int], name: str) -> tuple[int, int]:
    """Normalise an image size to ``(height, width)`` and check it is positive."""
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair of them, got {size!r}")
    return (pair[0], pair[1])


def _conv_pool_size(size: int, kernel_size: int, padding: int) -> int:
    """Spatial size after one conv (stride 1) followed by 2x2 max-pooling."""
    return (size + 2 * padding - kernel_size + 1) // 2


def _feature_map_size(size: int, kernel_size: int, padding: int) -> int:
    """Spatial size after the encoder's two conv/pool stages."""
    return _conv_pool_size(_conv_pool_size(size, kernel_size, padding), kernel_size, padding)


def _default_padding(height: int, width: int, kernel_size: int) -> int:
    """Zero padding (classic LeNet) when the image is large enough for it, else "same" padding."""
    if min(_feature_map_size(height, kernel_size, 0), _feature_map_size(width, kernel_size, 0)) >= 1:
        return 0
    return kernel_size // 2


def lenet_encoder(
    *,
    in_channels: int = 1,
    input_size: int | tuple[int, int] = 28,
    channels: tuple[int, int] = (10, 20),
    hidden: int = 50,
    kernel_size: int = 5,
    padding: int | None = None,
) -> nn.Sequential:
    """Build the LeNet feature extractor: conv-ReLU-pool twice, flatten, linear-ReLU.

    The output is ``[N, hidden]``. Only ``nn.Conv2d`` and ``nn.Linear`` hold
    parameters, so the encoder can be channel-split by ``adapters.split_channels``.

    Args:
        in_channels: image channels (1 for digits and MNIST).
        input_size: image size the network will see, ``int`` or ``(height, width)``;
            fixes the flattened feature count.
        channels: output channels of the two convolutions.
        hidden: units of the hidden linear layer (the paper's 50).
        kernel_size: convolution kernel size.
        padding: convolution zero padding; ``None`` picks 0 when the image is large
            enough and ``kernel_size // 2`` otherwise.

    Example:
        >>> import torch
        >>> lenet_encoder(input_size=8)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 50])
    """
    height, width = _pair(input_size, "input_size")
    for name, value in (("in_channels", in_channels), ("hidden", hidden), ("kernel_size", kernel_size)):
        if value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if len(channels) != 2 or min(channels) < 1:
        raise ValueError(f"channels must be two positive ints (conv1, conv2), got {channels!r}")
    pad = _default_padding(height, width, kernel_size) if padding is None else padding
    out_h = _feature_map_size(height, kernel_size, pad)
    out_w = _feature_map_size(width, kernel_size, pad)
    if pad < 0 or out_h < 1 or out_w < 1:
        raise ValueError(
            f"input_size={input_size!r} is too small for kernel_size={kernel_size} with padding={pad}; "
            f"use a smaller kernel_size or more padding"
        )
    return nn.Sequential(
        nn.Conv2d(in_channels, channels[0], kernel_size, padding=pad),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(channels[0], channels[1], kernel_size, padding=pad),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(channels[1] * out_h * out_w, hidden),
        nn.ReLU(),
    )


def _check_input(x: Tensor, in_channels: int, input_size: tuple[int, int]) -> None:
    """Raise a clear error when ``x`` is not ``[N, in_channels, H, W]`` of the built size."""
    if x.ndim != 4 or x.shape[1] != in_channels or tuple(x.shape[2:]) != input_size:
        raise ValueError(
            f"x must have shape [N, {in_channels}, {input_size[0]}, {input_size[1]}] "
            f"(the in_channels and input_size this model was built with), got {tuple(x.shape)}"
        )


class LeNetMultiTask(nn.Module):
    """LeNet with a shared encoder and one linear head per task (hard parameter sharing).

    Used by the Joint baseline as is, and by MT-COOL after
    ``adapters.split_channels(model.encoder, task_names)`` turns the encoder into
    per-task channel slices.

    Args:
        num_classes: task name -> number of classes, in task order. Names must be
            valid module names (non-empty, no ``"."``).
        in_channels, input_size, channels, hidden, kernel_size, padding: passed to
            :func:`lenet_encoder`.

    Example:
        >>> import torch
        >>> model = LeNetMultiTask({"even": 5, "odd": 5}, input_size=8)
        >>> model(torch.zeros(3, 1, 8, 8), "odd").shape
        torch.Size([3, 5])
    """

    def __init__(
        self,
        num_classes: Mapping[str, int],
        *,
        in_channels: int = 1,
        input_size: int | tuple[int, int] = 28,
        channels: tuple[int, int] = (10, 20),
        hidden: int = 50,
        kernel_size: int = 5,
        padding: int | None = None,
    ) -> None:
        super().__init__()
        if len(num_classes) == 0:
            raise ValueError('num_classes must name at least one task, e.g. {"even": 5, "odd": 5}')
        for task, classes in num_classes.items():
            if not isinstance(task, str) or not task or "." in task:
                raise ValueError(f"task names must be non-empty strings without '.', got {task!r}")
            if classes < 1:
                raise ValueError(f"num_classes[{task!r}] must be a positive int, got {classes!r}")
        self.in_channels = in_channels
        self.input_size = _pair(input_size, "input_size")
        self.encoder = lenet_encoder(
            in_channels=in_channels,
            input_size=input_size,
            channels=channels,
            hidden=hidden,
            kernel_size=kernel_size,
            padding=padding,
        )
        self.heads = nn.ModuleDict({task: nn.Linear(hidden, classes) for task, classes in num_classes.items()})

    @property
    def tasks(self) -> list[str]:
        """Task names in task order."""
        return list(self.heads.keys())

    def forward(self, x: Tensor, task: str) -> Tensor:
        """Logits ``[N, num_classes[task]]`` of ``task`` for images ``x`` of shape ``[N, C, H, W]``."""
        if task not in self.heads:
            raise ValueError(f"task={task!r} is not one of this model's tasks {self.tasks}")
        _check_input(x, self.in_channels, self.input_size)
        return self.head_forward(self.encoder(x), task)

    def head_forward(self, features: Tensor, task: str) -> Tensor:
        """Logits of ``task`` from encoder features ``[N, hidden]`` (the gradient methods' split point)."""
        if task not in self.heads:
            raise ValueError(f"task={task!r} is not one of this model's tasks {self.tasks}")
        head: nn.Module = self.heads[task]
        logits: Tensor = head(features)
        return logits


class LeNetSingle(nn.Module):
    """LeNet for one task: the same encoder as :class:`LeNetMultiTask` plus one head.

    The Independent baseline trains one of these per task, so it has about T
    times the parameters of the multi-task network.

    Example:
        >>> import torch
        >>> LeNetSingle(5, input_size=8)(torch.zeros(3, 1, 8, 8)).shape
        torch.Size([3, 5])
    """

    def __init__(
        self,
        num_classes: int,
        *,
        in_channels: int = 1,
        input_size: int | tuple[int, int] = 28,
        channels: tuple[int, int] = (10, 20),
        hidden: int = 50,
        kernel_size: int = 5,
        padding: int | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.in_channels = in_channels
        self.input_size = _pair(input_size, "input_size")
        self.encoder = lenet_encoder(
            in_channels=in_channels,
            input_size=input_size,
            channels=channels,
            hidden=hidden,
            kernel_size=kernel_size,
            padding=padding,
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` for images ``x`` of shape ``[N, C, H, W]``."""
        _check_input(x, self.in_channels, self.input_size)
        logits: Tensor = self.head(self.encoder(x))
        return logits

