"""Command-line pieces shared by every benchmark: argument types, the device check, strict-JSON values,
and the ``--distributed`` launch under ``torchrun`` (process group, rank, sharded batch order)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from benchmarks._learners import DISTRIBUTED_METHODS, METHODS, check_distributed_methods, check_offered, offered_methods

__all__ = ["NON_NEGATIVE", "NON_NEGATIVE_INT", "POSITIVE", "POSITIVE_INT", "TORCHRUN_VARIABLES", "Launch",
           "add_distributed_flag", "config_record", "distributed_launch", "finite", "method_list", "number", "resolve_device",
           "resolve_methods", "run_command", "sharded_schedule"]


def number(kind: Callable[[str], Any], minimum: float, inclusive: bool, what: str) -> Callable[[str], Any]:
    """argparse type: ``kind(text)`` that is finite and at least (or above) ``minimum``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (not inclusive and value == minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


POSITIVE_INT = number(int, 1, True, "a positive integer")
NON_NEGATIVE_INT = number(int, 0, True, "a non-negative integer")
NON_NEGATIVE = number(float, 0.0, True, "a finite non-negative number")
POSITIVE = number(float, 0.0, False, "a finite positive number")


def method_list(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated method names, returned in :data:`METHODS` order."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(names - set(METHODS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {unknown or text!r}; give a comma list drawn from {','.join(METHODS)}"
        )
    return tuple(method for method in METHODS if method in names)


def resolve_methods(given: tuple[str, ...] | None, distributed: bool, networks: Iterable[str] = ()) -> tuple[str, ...]:
    """``--methods`` (parsed by :func:`method_list`), or its default when ``None``: every method a problem with
    these ``Problem.networks`` names offers (:func:`benchmarks._learners.offered_methods`), or with
    ``--distributed`` those of them that train on several ranks.

    Raises:
        ValueError: for a method the networks do not offer (naming those they do), or with ``--distributed``
            for one that cannot train on several ranks.
    """
    offered = offered_methods(networks)
    if given is None:
        return tuple(m for m in offered if m in DISTRIBUTED_METHODS) if distributed else offered
    check_offered(given, networks)
    if distributed:
        check_distributed_methods(given, offered)
    return given


def resolve_device(text: str) -> str:
    """Check that ``--device`` names a usable torch device and return it."""
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise ValueError(f"--device {text!r} is not a torch device ({error}); use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text!r} asks for CUDA but torch.cuda.is_available() is False; use --device cpu")
    return str(device)


def finite(value: Any) -> Any:
    """``value`` with non-finite floats (diverged losses) replaced by ``None``, for strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


# ---------------------------------------------------------------------------
# --distributed: torchrun's process group, this rank's share of the batches

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""The environment ``torchrun`` gives every rank (``init_process_group("env://")`` reads it)."""


def add_distributed_flag(parser: argparse.ArgumentParser) -> None:
    """``--distributed``, the same for every training benchmark."""
    parser.add_argument(
        "--distributed", action="store_true",
        help="train on the ranks of torchrun --nproc-per-node R (gloo on CPU, nccl on CUDA): --batch-size is per "
             "rank, each task's training data is sharded by DistributedSampler, rank 0 evaluates and writes the "
             f"results; --methods from {','.join(DISTRIBUTED_METHODS)} (the default then)",
    )


@dataclass(frozen=True)
class Launch:
    """Where this process runs: its rank among ``world`` ranks (0 of 1 without ``--distributed``).

    Attributes:
        rank: this process's rank in the default group.
        world: number of ranks.
        device: the torch device this rank trains on (``cuda:LOCAL_RANK`` for ``--device cuda``).
        backend: the process group's backend (``gloo`` on CPU, ``nccl`` on CUDA), ``None`` without one.
    """

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    backend: str | None = None

    @property
    def main(self) -> bool:
        """Whether this process evaluates, prints and writes the results (rank 0)."""
        return self.rank == 0

    def note(self, batch: str, steps: str, evaluated: str) -> str:
        """How to read a ``--distributed`` run's results (a line of the JSON's notes)."""
        return (
            f"--distributed on {self.world} rank(s): each step trains on {batch} per rank ({self.world} times as "
            f"many in all) drawn from each rank's DistributedSampler shard, so an epoch has {steps} steps; joint and "
            "independent average their gradients through DistributedDataParallel, the MT-COOL methods through "
            f"CooperativeOptimizer; rank 0 evaluated {evaluated}."
        )

    def record(self, batch_size: int) -> dict[str, Any]:
        """What the results JSON says about the launch."""
        return {"world_size": self.world, "backend": self.backend, "batch_size_per_rank": batch_size,
                "global_batch_size": batch_size * self.world,
                "sampler": "torch.utils.data.DistributedSampler over each training set (shuffled, seeded from "
                           "the run seed, set_epoch before each pass over the data)"}


@contextlib.contextmanager
def distributed_launch(distributed: bool, device: str, command: str) -> Iterator[Launch]:
    """Join ``torchrun``'s process group for the block when ``distributed`` (``--distributed``), else do nothing.

    The backend is ``gloo`` for a CPU ``device`` and ``nccl`` for CUDA, where each rank takes the GPU
    ``LOCAL_RANK``. On a normal exit every rank waits for the others (rank 0 writes the results last)
    before the group is destroyed.

    Raises:
        RuntimeError: ``--distributed`` without torchrun's environment, or several ranks without ``--distributed``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not distributed:
        if world > 1:
            raise RuntimeError(
                f"started as one of WORLD_SIZE={world} ranks (torchrun) without --distributed: every rank would run "
                f"the whole benchmark alone and write the same files; add --distributed, or run {command} without "
                "torchrun"
            )
        yield Launch(device=device)
        return
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"--distributed needs the environment torchrun gives each rank ({', '.join(missing)} not set); launch "
            f"it as torchrun --standalone --nproc-per-node 2 -m {command.removeprefix('python -m ')} --distributed "
            "..., or drop --distributed"
        )
    if torch.device(device).type == "cuda":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    try:
        yield Launch(rank=dist.get_rank(), world=dist.get_world_size(), device=device, backend=backend)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def sharded_schedule(size: int, batch_size: int, steps: int, seed: int, launch: Launch) -> Tensor:
    """This rank's training indices ``[steps, batch_size]`` into a training set of ``size`` examples.

    The distributed counterpart of back-to-back seeded permutations: back-to-back passes of a
    ``DistributedSampler`` (shuffled with ``seed``, ``set_epoch(p)`` before pass ``p``), each pass giving
    this rank its ``ceil(size / world)`` indices, disjoint from the other ranks' but for the sampler's
    padding; a training epoch of ``ceil(ceil(size / world) / batch_size)`` steps is about one pass.
    """
    sampler: DistributedSampler[int] = DistributedSampler(
        cast(Dataset[int], range(size)), num_replicas=launch.world, rank=launch.rank, shuffle=True, seed=seed
    )
    needed = steps * batch_size
    passes: list[Tensor] = [torch.empty(0, dtype=torch.int64)]
    drawn = 0
    while drawn < needed:
        sampler.set_epoch(len(passes) - 1)
        passes.append(torch.tensor(list(sampler), dtype=torch.int64))
        drawn += passes[-1].numel()
    return torch.cat(passes)[:needed].view(steps, batch_size)


def run_command(main: Callable[[], object], prog: str) -> int:
    """Run a benchmark's ``main``: configuration errors (``ValueError``, ``FileNotFoundError``,
    ``RuntimeError``) become one line ``<prog>: error: ...`` on stderr and exit status 2; success is 0."""
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


def config_record(config: Any) -> dict[str, Any]:
    """A run's configuration dataclass as JSON, without ``distributed`` when it is off (the files stay as
    they were before ``--distributed`` existed)."""
    record = asdict(config)
    if not record.get("distributed", False):
        record.pop("distributed", None)
    return record
