"""Which dimension of a parameter holds its channels: the splitting rule per layer kind.

Splitting any dimension is function-preserving, because the layer reads the
concatenation of the slices. The rule decides *ownership*: which task owns
which output channels. It follows each layer's own storage convention:

=====================================================  ==========================  ==========
parameter                                              split along                 chunks
=====================================================  ==========================  ==========
0-dim tensor                                           none: owned by task 0       1
conv 1d/2d/3d ``weight`` ``[out, in/groups, *k]``,     dim 0 (output channels)     1
grouped and depthwise included; ``bias``
transposed conv ``weight`` ``[in, out/groups, *k]``    dim 1 (output channels)     1
linear ``weight`` ``[out, in]`` and ``bias``           dim 0 (output features)     1
fused projection: linear named ``qkv`` / ``kv``        dim 0, each of q, k, v      3 / 2
MultiheadAttention ``in_proj_weight`` / ``_bias``      dim 0, each of q, k, v      3
MultiheadAttention ``bias_k`` / ``bias_v`` [1, 1, E]   dim 2 (embedding)           1
LSTM / GRU / RNN (cells too) gate weights and biases   dim 0, each gate            4 / 3 / 1
BatchNorm / InstanceNorm / GroupNorm / LayerNorm /     dim 0 (channels)            1
RMSNorm affine ``weight`` / ``bias``
Embedding / EmbeddingBag ``weight`` ``[num, dim]``     dim 1 (embedding channels)  1
``weight`` / ``bias`` of any other module              dim 0 (PyTorch convention)  1
any other parameter (``pos_embed`` [1, N, C],          its only dim of size > 1,   1
``cls_token`` [1, 1, C], layer-scale ``gamma`` [C])    else the last dim
=====================================================  ==========================  ==========

With ``chunks > 1`` the dimension is first cut into ``chunks`` equal blocks
(q, k and v; or the gates of a recurrent layer) and each block is split
between the tasks, so every task owns its share of each block.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

__all__ = ["SplitRule", "channel_dim", "slice_sizes", "split_rule"]

#: sentinel ``dim`` of a parameter owned whole by the first task (0-dim tensors)
WHOLE = -1

_NORMS: tuple[type[nn.Module], ...] = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
_FUSED_LINEAR = {"qkv": 3, "kv": 2}
_RNN_PREFIXES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


@dataclass(frozen=True)
class SplitRule:
    """How one parameter is split.

    Attributes:
        dim: the channel dimension (``-1``: a 0-dim tensor owned whole by the first task).
        chunks: number of equal blocks along ``dim`` split separately (fused q/k/v, RNN gates).
        kind: the row of the rule table that applied, for messages and :func:`adapters.split_plan`.
    """

    dim: int
    chunks: int = 1
    kind: str = "other"


def slice_sizes(channels: int, tasks: int) -> tuple[int, ...]:
    """Sizes of the ``tasks`` contiguous slices of ``channels`` channels.

    Task ``i`` gets ``channels // tasks`` channels plus one more for the first
    ``channels % tasks`` tasks, so sizes differ by at most one; with fewer
    channels than tasks the last tasks get empty slices (see ``small`` in
    :func:`adapters.split_channels`).

    >>> slice_sizes(10, 3)
    (4, 3, 3)
    >>> slice_sizes(2, 4)
    (1, 1, 0, 0)
    """
    if tasks < 1:
        raise ValueError(f"tasks must be >= 1, got {tasks}")
    if channels < 0:
        raise ValueError(f"channels must be >= 0, got {channels}")
    base, extra = divmod(channels, tasks)
    return tuple(base + (1 if i < extra else 0) for i in range(tasks))


def _rnn_gates(module: nn.Module) -> int:
    mode = getattr(module, "mode", None)  # nn.RNNBase stores "LSTM", "GRU", "RNN_TANH", "RNN_RELU"
    if isinstance(module, (nn.LSTM, nn.LSTMCell)) or mode == "LSTM":
        return 4
    if isinstance(module, (nn.GRU, nn.GRUCell)) or mode == "GRU":
        return 3
    return 1


def _free_dim(tensor: Tensor) -> int:
    """Channels of a free parameter: its only non-singleton dim, else the last (channels-last tokens)."""
    big = [d for d, size in enumerate(tensor.shape) if size > 1]
    return big[0] if len(big) == 1 else tensor.dim() - 1


def split_rule(module: nn.Module, name: str, tensor: Tensor, module_name: str = "") -> SplitRule:
    """The rule (dim, chunks) splitting ``module.<name>``; see the table in this module's docstring.

    Args:
        module: the module the parameter is registered on.
        name: the parameter's name on ``module`` (``"weight"``, ``"pos_embed"``).
        tensor: the parameter.
        module_name: the module's qualified name; its last part identifies
            fused projections (``"blocks.0.attn.qkv"``).

    Example:
        >>> split_rule(nn.ConvTranspose2d(4, 6, 3), "weight", nn.ConvTranspose2d(4, 6, 3).weight).dim
        1
    """
    if tensor.dim() == 0:
        return SplitRule(WHOLE, 1, "0-dim")
    leaf = module_name.rsplit(".", 1)[-1]
    if isinstance(module, _ConvTransposeNd):
        return SplitRule(1 if name == "weight" else 0, 1, "transposed conv")
    if isinstance(module, _ConvNd):
        return SplitRule(0, 1, "conv")
    if isinstance(module, nn.Linear):
        chunks = _FUSED_LINEAR.get(leaf, 1)
        if chunks > 1 and tensor.shape[0] % chunks == 0:
            return SplitRule(0, chunks, f"fused linear ({leaf})")
        return SplitRule(0, 1, "linear")
    if isinstance(module, nn.MultiheadAttention):
        if name in ("in_proj_weight", "in_proj_bias"):
            return SplitRule(0, 3, "attention in_proj (q, k, v)")
        if name in ("bias_k", "bias_v"):
            return SplitRule(tensor.dim() - 1, 1, "attention bias_k/bias_v")
        return SplitRule(0, 1, "attention projection")
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        if name.startswith(_RNN_PREFIXES):
            return SplitRule(0, _rnn_gates(module), "recurrent gates")
        return SplitRule(0, 1, "recurrent projection")
    if isinstance(module, _NORMS):
        return SplitRule(0, 1, "norm affine")
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and name == "weight":
        return SplitRule(1, 1, "embedding")
    if name in ("weight", "bias"):
        return SplitRule(0, 1, "weight/bias")
    return SplitRule(_free_dim(tensor), 1, "free parameter")


def channel_dim(module: nn.Module, name: str, tensor: Tensor) -> int:
    """The channel dimension along which ``module.<name>`` is split (``-1``: 0-dim, owned by task 0).

    Output channels are dim 0 for convolutions, linear layers and norm affine
    parameters; transposed convolutions store their output channels in dim 1;
    position embeddings and class tokens ``[1, N, C]`` in their last dim.
    See :func:`split_rule` for the full table.
    """
    return split_rule(module, name, tensor).dim
