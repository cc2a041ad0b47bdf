"""Spawned gloo ranks for the multi-process tests: one way to start, run, report and end a rank.

Each rank runs ``work(rank, world, folder)`` and saves what it returns (or the
traceback of what it raised) to ``folder/rank{r}.pt`` before anything else can
go wrong. It then waits for the other ranks (so that none closes its sockets
while another still reads from them), destroys the process group and leaves
with ``os._exit(0)``: the interpreter's teardown, where torch's C++ threads
can abort a process that has already finished its work, is skipped.
A rank that crashes cannot hang the test: collectives time out after 60 s.
"""

from __future__ import annotations

import datetime
import os
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Work = Callable[[int, int, Path], dict[str, Any]]


def _rank(rank: int, world: int, folder: str, work: Work) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = work(rank, world, Path(folder))
    except BaseException:
        result = {"crash": traceback.format_exc()}
    torch.save(result, f"{folder}/rank{rank}.pt")
    try:
        if "crash" not in result:
            dist.barrier()
        dist.destroy_process_group()
    finally:
        os._exit(0)


def spawn_ranks(work: Work, world: int, folder: Path) -> list[dict[str, Any]]:
    """Run ``work`` on ``world`` gloo ranks; what each returned, after asserting none crashed."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    (folder / "store").unlink(missing_ok=True)
    mp.spawn(_rank, args=(world, str(folder), work), nprocs=world, join=True)
    results = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]
    crashes = [r["crash"] for r in results if "crash" in r]
    assert not crashes, crashes[0]
    return results
