"""Model adapters: turn a user's encoder into a channel-split, per-task model.

``split_channels`` partitions every parameter of an encoder between tasks
(function-preserving), ``task_parameters`` lists the slices each task owns,
and ``merge`` returns the model to plain parameters.
"""

from adapters._split import ChannelSplit, channel_dim, merge, slice_sizes, split_channels, task_parameters

__all__ = ["ChannelSplit", "channel_dim", "merge", "slice_sizes", "split_channels", "task_parameters"]
