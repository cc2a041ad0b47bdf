"""R ranks, one trajectory: MT-COOL under ``torch.distributed``.

With a process group of world size R > 1, :class:`Ranks` keeps every rank on
the trajectory one process would follow on the concatenated batch:

- when the optimizer is built, every rank's tasks and settings are compared
  (one ``all_gather_object``; a mismatch raises the same ``ValueError`` on
  every rank instead of a hang), and parameters and buffers are broadcast
  from rank 0;
- during the stepping task's backward, its gradients (its slices and head,
  nothing else) are averaged over the ranks in buckets of at most
  ``bucket_bytes`` (a quarter of a task's gradients, 1 to 25 MiB), each
  bucket's all-reduce launched asynchronously from a
  post-accumulate-grad hook as soon as it is full, and all of them completed
  when the backward ends (an autograd engine callback), each gradient then a
  view of its averaged bucket, so a ``GradScaler`` or a clipping call after
  the backward sees the averaged gradients;
- a decision one rank cannot take alone (``step(batches)`` skipping a
  non-finite loss) is taken on all ranks together, by a vote started before
  the backward and read after it;
- running statistics of normalization layers are averaged over the ranks at
  the end of every outer iteration (``SyncBatchNorm`` makes them equal
  already; without it this keeps them equal);
- noise is identical on every rank (same seed, same draws) or, with
  ``noise="per_rank"``, each rank's generator is seeded from
  (seed, rank, outer iteration), so the R ranks average R noise samples
  and a resumed run draws the same noise without saving R generator states.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd import Variable

from cooperative_opt._ownership import TaskParameters

if TYPE_CHECKING:
    from cooperative_opt._optimizer import CooperativeOptimizer

__all__ = ["NoiseMode", "Ranks", "default_bucket_bytes", "mix_seed", "per_rank_seeding", "process_group_of",
           "refuse_wrapped"]

NoiseMode = Literal["identical", "per_rank"]

_MASK = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): well spread, the same on every machine."""
    state = 0x9E3779B97F4A7C15
    for v in values:
        state = (state ^ (v & _MASK)) * 0xBF58476D1CE4E5B9 & _MASK
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & _MASK
    return (state ^ (state >> 29)) >> 1


def refuse_wrapped(model: nn.Module) -> None:
    """``ValueError`` for a model the optimizer cannot keep in step: DDP-wrapped, or with DTensor parameters."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "model is wrapped in DistributedDataParallel; pass the module itself (model.module) and call it "
            "directly: CooperativeOptimizer averages each stepping task's gradients over the ranks itself, "
            "which DDP cannot do without find_unused_parameters (docs/distributed.md)"
        )
    if not dist.is_available():
        return
    from torch.distributed.tensor import DTensor

    sharded = [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
    if sharded:
        raise ValueError(
            f"model has DTensor parameters ({sharded[:3]}...): FSDP2 (fully_shard) and tensor parallelism are "
            "not supported yet; train with one full copy of the model per rank (the optimizer averages the "
            "gradients itself). docs/distributed.md, 'FSDP2', says why and what it would take"
        )


def process_group_of(process_group: object) -> dist.ProcessGroup | None:
    """The group to synchronise over: ``None`` outside ``torch.distributed``, or for a default group of one rank."""
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup or None (the default group), "
            f"got {type(process_group).__name__}"
        )
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError("process_group was given but torch.distributed is not initialized")
        return None
    if process_group is not None:
        return process_group  # asked for explicitly: used even with one rank (the collective path runs)
    group = dist.group.WORLD
    if group is None or dist.get_world_size(group) == 1:
        return None
    return group


class Ranks:
    """What keeps R ranks bit-identical (see the module docstring).

    Args:
        group: the process group.
        model: the model whose parameters and buffers are broadcast from rank 0.
        task_params: each task's parameters, in task order.
        base: the base optimizer (its class and hyperparameters must agree too).
        signature: what else every rank must agree on (tasks, settings, seed).
        bucket_bytes: the size at which a bucket's all-reduce is launched; by default a quarter of the
            largest task's gradient bytes, between 1 and 25 MiB (see :func:`default_bucket_bytes`).
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        model: nn.Module,
        task_params: Sequence[TaskParameters],
        base: torch.optim.Optimizer,
        signature: dict[str, Any],
        bucket_bytes: int | None = None,
    ) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.bucket_bytes = default_bucket_bytes(task_params) if bucket_bytes is None else bucket_bytes
        groups = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
        self._check({
            **signature,
            "parameters": [(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()],
            "optimizer": (type(base).__name__, repr(groups)),
        })
        self._broadcast([*model.parameters(), *model.buffers()])
        self._owned = [p for tp in task_params for p in tp.own]
        self._active: set[int] = set()
        # per (device, dtype): the parameters whose gradient the backward produced, with that gradient
        self._buckets: dict[tuple[torch.device, torch.dtype], list[tuple[Tensor, Tensor]]] = {}
        self._filled: dict[tuple[torch.device, torch.dtype], int] = {}
        self._inflight: list[tuple[Any, Tensor, list[tuple[Tensor, Tensor]]]] = []
        self._queued = False
        self._syncing = True
        self.bytes_reduced = 0  # gradient bytes all-reduced so far (the benchmark reads it)
        ready = weakref.WeakMethod(self._ready)  # the parameters must not keep the process group alive

        def hook(p: Tensor) -> None:
            method = ready()
            if method is not None:
                method(p)

        self._hooks = [p.register_post_accumulate_grad_hook(hook) for p in self._owned]  # type: ignore[no-untyped-call]

    # ------------------------------------------------------------ agreement

    def _check(self, signature: dict[str, Any]) -> None:
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, signature, group=self.group)
        differing = {
            key: {rank: s.get(key) for rank, s in enumerate(gathered)}
            for key in signature
            if any(s.get(key) != gathered[0].get(key) for s in gathered)
        }
        if differing:
            raise ValueError(
                f"the ranks built CooperativeOptimizer differently: {differing}; build it with the same tasks, "
                "settings and model on every rank (seed=None draws the seed on rank 0 and shares it)"
            )

    def _broadcast(self, tensors: Sequence[Tensor]) -> None:
        """Rank 0's values on every rank, one broadcast per (device, dtype)."""
        with torch.no_grad():
            for group in _by_kind(list(tensors)).values():
                flat = _flatten(group)
                dist.broadcast(flat, src=dist.get_global_rank(self.group, 0), group=self.group)
                torch._foreach_copy_(group, list(_unflatten(flat, group)))

    def shared_seed(self, seed: int | None) -> int:
        """``seed``, or one drawn on rank 0 and shared, so every rank draws the same noise."""
        if seed is not None:
            return seed
        drawn = [int(torch.randint(0, 2**62, (), dtype=torch.int64).item())]
        dist.broadcast_object_list(drawn, src=dist.get_global_rank(self.group, 0), group=self.group)
        return int(drawn[0])

    def vote(self, flag: bool) -> Callable[[], bool]:
        """Start finding out whether ``flag`` holds on every rank (a collective: every rank must call it);
        the returned function waits for the answer."""
        value = torch.tensor([1.0 if flag else 0.0])
        work = dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group, async_op=True)

        def agreed() -> bool:
            if work is not None:
                work.wait()
            return bool(value.item() == 1.0)

        return agreed

    def average(self, tensors: Sequence[Tensor]) -> None:
        """Average floating tensors (running statistics) over the ranks, in place."""
        floating = [t for t in tensors if t.is_floating_point()]
        with torch.no_grad():
            for group in _by_kind(floating).values():
                flat = _flatten(group)
                dist.all_reduce(flat, group=self.group)
                flat.div_(self.world)
                torch._foreach_copy_(group, list(_unflatten(flat, group)))

    # ------------------------------------------------------------ gradients

    def activate(self, params: Sequence[Tensor]) -> None:
        """The parameters whose gradients the coming backward passes average (the stepping task's)."""
        self._active = {id(p) for p in params}

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backwards inside accumulate gradients locally; the first one after it averages the sum."""
        previous, self._syncing = self._syncing, False
        try:
            yield
        finally:
            self._syncing = previous

    def _ready(self, p: Tensor) -> None:
        if not self._syncing or id(p) not in self._active or p.grad is None:
            return
        if not self._queued:
            Variable._execution_engine.queue_callback(self._finish)
            self._queued = True
        kind = (p.grad.device, p.grad.dtype)
        bucket = self._buckets.setdefault(kind, [])
        bucket.append((p, p.grad))
        self._filled[kind] = self._filled.get(kind, 0) + p.grad.numel() * p.grad.element_size()
        if self._filled[kind] >= self.bucket_bytes:
            self._launch(kind)

    def _launch(self, kind: tuple[torch.device, torch.dtype]) -> None:
        entries = self._buckets.pop(kind, [])
        self._filled.pop(kind, None)
        if not entries:
            return
        flat = _flatten([grad for _, grad in entries])
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._inflight.append((work, flat, entries))
        self.bytes_reduced += flat.numel() * flat.element_size()

    def _finish(self) -> None:
        """End of the backward: launch what is left, wait, and make each gradient a view of its averaged bucket
        (as DDP's ``gradient_as_bucket_view``: no copy back)."""
        self._queued = False
        for kind in list(self._buckets):
            self._launch(kind)
        for work, flat, entries in self._inflight:
            work.wait()
            flat.div_(self.world)
            for (p, _), average in zip(entries, _unflatten(flat, [grad for _, grad in entries])):
                p.grad = average
        self._inflight.clear()

    def close(self) -> None:
        """Remove the gradient hooks (the optimizer is no longer used)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


_MIB = 2**20


def default_bucket_bytes(task_params: Sequence[TaskParameters]) -> int:
    """A quarter of the largest task's gradient bytes, at least 1 MiB and at most DDP's 25 MiB.

    A task steps on 1/T of the model, so DDP's 25 MiB would often hold all of a task's gradients in one
    bucket, launched only when its backward ends: nothing would overlap with the backward. Four buckets
    per task let the first ones be reduced while the backward goes on, where the backend can overlap.
    """
    largest = max((sum(p.numel() * p.element_size() for p in tp.own) for tp in task_params), default=0)
    return min(25 * _MIB, max(_MIB, -(-largest // 4)))


def _by_kind(tensors: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    kinds: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        kinds.setdefault((t.device, t.dtype), []).append(t)
    return kinds


def _flatten(tensors: Sequence[Tensor]) -> Tensor:
    """One contiguous copy of ``tensors`` (same device and dtype), for one collective call."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Views of ``flat`` shaped like ``like``."""
    return [v.view_as(t) for v, t in zip(torch.split(flat, [t.numel() for t in like]), like)]


def per_rank_seeding(opt: CooperativeOptimizer) -> Callable[[int], None]:
    """``noise="per_rank"``: what seeds this rank's noise generators at the start of outer iteration ``steps``.

    It holds the optimizer weakly, so the optimizer (and its process group) is freed as soon as it is unused.
    """
    ref = weakref.ref(opt)
    rank = opt._ranks.rank if opt._ranks is not None else 0

    def reseed(steps: int) -> None:
        owner = ref()
        if owner is not None:
            for g in owner._generators.values():
                g.manual_seed(mix_seed(owner.seed, rank, steps))

    return reseed
