"""MT-COOL against DDP-Joint on 1 and 2 ranks: time and bytes all-reduced per outer iteration, side by side.

Run ``python -m benchmarks.distributed``. The model pair is the one of
:mod:`benchmarks.step_time`'s method table: timm's resnet18 (no pretrained
weights) with one 5-class linear head per task, two tasks, both learners built
by :func:`benchmarks._learners.build_learner` (SGD, lr 1e-3):

- DDP-Joint: the hard-shared network, one backward of the summed task losses,
  wrapped in ``torch.nn.parallel.DistributedDataParallel``;
- MT-COOL: the same network channel-split between the tasks, one outer
  iteration of :class:`cooperative_opt.CooperativeOptimizer` (L = 1, M = 1),
  which averages each stepping task's gradients over the ranks itself.

Two gloo ranks are spawned, one thread each (``torch.set_num_threads(1)``).
Weak scaling: each task's batch is ``--size`` images per rank in both settings.
"1 rank" is one process without ``torch.distributed`` (rank 0 trains the
learners it built before joining the process group, rank 1 waits at a
barrier): plain Joint and MT-COOL, nothing all-reduced. "2 ranks" is both
processes, each on its own batch; a step's time is the slower rank's. Joint's
"outer iteration" is its one step on the same per-task batches.

Bytes all-reduced are counted, not estimated: a DDP communication hook adds
every bucket's size before handing it to the default all-reduce hook, and
MT-COOL's optimizer counts the gradient bytes it all-reduces. Only gradients
are counted: both methods also keep the BatchNorm buffers equal (DDP
broadcasts rank 0's before each forward, MT-COOL all-reduces their average
after each outer iteration), ``buffer_mib`` in the JSON.

After warm-up rounds, each round runs the six (method, setting) pairs in
rotating order, so machine noise hits all alike; times are medians over
rounds, and a method's overhead of going distributed is the median over
rounds of time(2 ranks) / time(1 rank). Targets: MT-COOL / DDP-Joint <= 1.0
for the bytes per outer iteration and for the overhead, printed with its
95 % bootstrap interval over the run's rounds.

The third setting splits that overhead in two: "2 apart" is both processes
training their own plain copy at once, nothing all-reduced. time(2 apart) /
time(1 rank) is what two processes sharing this machine's cores and memory
bandwidth cost each other (contention, which ranks on separate GPUs would not
pay), and time(2 ranks) / time(2 apart) is what the communication costs.
"""

# No ``from __future__ import annotations``: DistributedDataParallel checks the communication hook's
# annotations at runtime (``bucket: dist.GradBucket``), which must be objects, not strings.

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import torch
import torch.distributed as dist
from torch import Tensor
from torch._C._distributed_c10d import GradBucket  # what dist.GradBucket is; the stubs do not export that name
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.multiprocessing.spawn import spawn
from tqdm import tqdm  # type: ignore[import-untyped]

from benchmarks._cli import POSITIVE_INT, finite
from benchmarks._learners import Batch, CooperativeLearner, JointLearner, Learner
from benchmarks._stats import ratio_of_medians_ci
from benchmarks.step_time import CLASSES, TASKS, _classifier_problem, _learner, _timed

__all__ = ["METHODS", "WORLD", "Settings", "main", "markdown", "measure", "summarise"]

WORLD: Final[int] = 2
"""Ranks of the distributed setting (against one)."""

SETTINGS: Final[tuple[str, ...]] = ("one", "ranks", "apart")
"""How each method is timed: one plain process; WORLD ranks synchronised; WORLD plain processes at once."""

METHODS: Final[Mapping[str, str]] = {"mt_cool": "MT-COOL", "joint": "DDP-Joint"}
"""Learner -> row label. The learners are :func:`benchmarks.step_time.method_labels` rows."""

_LEARNER_LABELS: Final[Mapping[str, str]] = {"mt_cool": "mt_cool (M=1)", "joint": "joint"}
_CPU: Final[torch.device] = torch.device("cpu")
_DEFAULT_SIZE: Final[tuple[int, int]] = (8, 64)
_QUICK_SIZE: Final[tuple[int, int]] = (2, 32)


@dataclass(frozen=True)
class Settings:
    """One run of the benchmark (what every rank is given; written into the JSON).

    Attributes:
        images: images per task per rank.
        side: image side in pixels.
        repeats: timed rounds (each runs every (method, ranks) setting once).
        warmup: untimed rounds first (allocator, DDP's bucket rebuild, gloo connections).
        progress: whether rank 0 shows a progress bar.
    """

    images: int
    side: int
    repeats: int
    warmup: int
    progress: bool


def _size(text: str) -> tuple[int, int]:
    """argparse type of ``--size``: ``IMAGESxSIDE``, e.g. ``8x64``."""
    parts = text.lower().split("x")
    try:
        images, side = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected IMAGESxSIDE such as 8x64, got {text!r}") from None
    if images < 1 or side < 32:
        raise argparse.ArgumentTypeError(
            f"expected at least 1 image of side >= 32 (resnet18 downsamples by 32), got {text!r}"
        )
    return images, side


def _batches(images: int, side: int, seed: int) -> dict[str, Batch]:
    """One fixed batch per task: ``images`` random images of ``side`` x ``side`` and their labels."""
    g = torch.Generator().manual_seed(seed)
    return {
        t: (torch.randn(images, 3, side, side, generator=g), torch.randint(0, CLASSES, (images,), generator=g))
        for t in TASKS
    }


def _build() -> dict[str, Learner]:
    """Both learners on the resnet18 pair (under ``torch.distributed``: DDP-Joint and MT-COOL over the ranks)."""
    problem = _classifier_problem()
    with warnings.catch_warnings():  # M = 1: the paper's consistency term is zero, as in step_time
        warnings.simplefilter("ignore", UserWarning)
        learners: dict[str, Learner] = {m: _learner(problem, label, _CPU) for m, label in _LEARNER_LABELS.items()}
    return learners


class _ByteCount:
    """State of :func:`_counting_allreduce`: the bytes DDP handed to the all-reduce so far."""

    def __init__(self) -> None:
        self.bytes = 0


def _counting_allreduce(state: _ByteCount, bucket: GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook: count the bucket's bytes, then DDP's default all-reduce (average) of it."""
    buffer = bucket.buffer()
    state.bytes += buffer.numel() * buffer.element_size()
    group = dist.group.WORLD
    if group is None:  # pragma: no cover - the hook runs inside the default process group
        raise RuntimeError("torch.distributed has no default process group")
    return default_hooks.allreduce_hook(group, bucket)


def _byte_counters(learners: Mapping[str, Learner]) -> dict[str, Callable[[], int]]:
    """Per method, a read of the gradient bytes it all-reduced so far."""
    joint, cooperative = learners["joint"], learners["mt_cool"]
    if not isinstance(joint, JointLearner) or joint.ddp is None:
        raise RuntimeError("the Joint learner is not wrapped in DistributedDataParallel; build it after "
                           "torch.distributed.init_process_group with more than one rank")
    if not isinstance(cooperative, CooperativeLearner) or cooperative.optimizer.world_size == 1:
        raise RuntimeError("the MT-COOL learner does not synchronise its ranks; build it after "
                           "torch.distributed.init_process_group with more than one rank")
    count = _ByteCount()
    joint.ddp.register_comm_hook(count, _counting_allreduce)
    optimizer = cooperative.optimizer
    return {"joint": lambda: count.bytes, "mt_cool": lambda: optimizer.bytes_reduced}


def _worker(rank: int, store: str, settings: Settings) -> None:
    """One rank of :func:`measure`; rank 0 writes what was measured to ``store/measured.json``."""
    torch.set_num_threads(1)
    plain = _build()  # built before the process group exists: plain learners (rank 1's only run "2 apart")
    dist.init_process_group("gloo", init_method=f"file://{store}/store", rank=rank, world_size=WORLD)
    try:
        measured = _rounds(rank, plain, settings)
        dist.barrier()  # no rank closes its sockets while another still reads from them
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(store, "measured.json").write_text(json.dumps(measured))


def _rounds(rank: int, plain: Mapping[str, Learner], settings: Settings) -> dict[str, Any]:
    """Warm-up, then ``settings.repeats`` rounds of every (method, ranks) setting in rotating order."""
    ranked = _build()
    counters = _byte_counters(ranked)
    batches = _batches(settings.images, settings.side, seed=rank)  # each rank its own shard
    setups = [(method, setting) for method in METHODS for setting in SETTINGS]

    def run(method: str, setting: str) -> tuple[float, int]:
        learner = (ranked if setting == "ranks" else plain)[method]

        def step() -> None:
            learner.train_step(batches)

        dist.barrier()  # every rank starts together; in the 1-rank setting rank 1 waits here for rank 0
        if setting == "one":
            return (_timed(step, _CPU), 0) if rank == 0 else (math.nan, 0)
        before = counters[method]()
        elapsed = torch.tensor([_timed(step, _CPU)], dtype=torch.float64)
        sent = counters[method]() - before
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step of R processes lasts as long as the slowest
        return float(elapsed.item()), sent

    for _ in range(settings.warmup):
        for setup in setups:
            run(*setup)
    times: dict[str, list[float]] = {_key(*s): [] for s in setups}
    sent: dict[str, list[int]] = {_key(*s): [] for s in setups}
    with tqdm(total=settings.repeats, desc="rounds", disable=not (settings.progress and rank == 0)) as bar:
        for r in range(settings.repeats):
            shift = r % len(setups)
            for setup in setups[shift:] + setups[:shift]:
                elapsed, count = run(*setup)
                times[_key(*setup)].append(elapsed)
                sent[_key(*setup)].append(count)
            bar.update(1)
    return {"times_s": times, "bytes": sent, "buffer_bytes": _buffer_bytes(ranked["joint"])}


def _key(method: str, setting: str) -> str:
    return {"one": f"{method}@1", "ranks": f"{method}@{WORLD}", "apart": f"{method}@{WORLD}apart"}[setting]


def _quartiles(values: list[float]) -> list[float]:
    return statistics.quantiles(values, n=4)[::2] if len(values) > 1 else values * 2


def _buffer_bytes(learner: Learner) -> int:
    """Bytes of the floating-point buffers (BatchNorm running statistics) of the Joint network."""
    if not isinstance(learner, JointLearner):
        raise TypeError(f"expected the Joint learner, got {type(learner).__name__}")
    return sum(b.numel() * b.element_size() for b in learner.model.buffers() if b.is_floating_point())


def measure(settings: Settings) -> dict[str, Any]:
    """Spawn the ranks, run the rounds; return what rank 0 measured (times in s, bytes per outer iteration)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="cooperative_opt_distributed_") as store:
        spawn(_worker, args=(store, settings), nprocs=WORLD, join=True)  # type: ignore[no-untyped-call]
        measured: dict[str, Any] = json.loads(Path(store, "measured.json").read_text())
    return measured


def summarise(measured: Mapping[str, Any]) -> dict[str, Any]:
    """Rows of the table (medians), each method's overhead, and the two MT-COOL / DDP-Joint ratios."""
    times, sent = measured["times_s"], measured["bytes"]
    rows: list[dict[str, Any]] = []
    overheads: dict[str, list[float]] = {}  # per method, per round: time(WORLD ranks) / time(1 rank)
    overhead: dict[str, float] = {}
    contention: dict[str, float] = {}
    communication: dict[str, list[float]] = {}
    for method, label in METHODS.items():
        one, many, apart = (times[_key(method, s)] for s in SETTINGS)
        overheads[method] = [m / o for m, o in zip(many, one, strict=True)]
        overhead[method] = statistics.median(overheads[method])
        contention[method] = statistics.median(a / o for a, o in zip(apart, one, strict=True))
        communication[method] = [m / a for m, a in zip(many, apart, strict=True)]
        for setting, ranks in (("one", 1), ("ranks", WORLD)):
            per_iteration = statistics.median(sent[_key(method, setting)])
            rows.append({
                "method": label, "learner": method, "ranks": ranks,
                "ms_per_outer_iteration": 1e3 * statistics.median(times[_key(method, setting)]),
                "bytes_per_outer_iteration": int(per_iteration),
                "mib_per_outer_iteration": per_iteration / 2**20,
                "overhead_vs_1_rank": overhead[method] if ranks == WORLD else 1.0,
            })
    bytes_by = {row["learner"]: row["bytes_per_outer_iteration"] for row in rows if row["ranks"] == WORLD}
    bytes_ratio = bytes_by["mt_cool"] / bytes_by["joint"]
    overhead_ratio = overhead["mt_cool"] / overhead["joint"]
    per_round = [m / j for m, j in zip(overheads["mt_cool"], overheads["joint"], strict=True)]
    interval = ratio_of_medians_ci(overheads["mt_cool"], overheads["joint"], resamples=2000)
    ratios = {
        "bytes": {"value": bytes_ratio, "target": "<= 1.0", "pass": bytes_ratio <= 1.0},
        "overhead": {"value": overhead_ratio, "target": "<= 1.0", "pass": overhead_ratio <= 1.0,
                     "per_round_quartiles": _quartiles(per_round), "interval_95": [interval.low, interval.high]},
    }
    per_round_communication = [m / j for m, j in zip(communication["mt_cool"], communication["joint"], strict=True)]
    split = {
        "contention": contention,
        "communication": {m: statistics.median(v) for m, v in communication.items()},
        "communication_ratio": statistics.median(per_round_communication),
        "communication_ratio_quartiles": _quartiles(per_round_communication),
        "apart_ms_per_outer_iteration": {m: 1e3 * statistics.median(times[_key(m, "apart")]) for m in METHODS},
    }
    return {"rows": rows, "ratios": ratios, "overhead_split": split}


def markdown(summary: Mapping[str, Any]) -> str:
    """The table and the two criteria, as printed."""
    lines = [
        "| method | ranks | ms / outer iteration | MiB all-reduced / outer iteration | overhead vs 1 rank |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in summary["rows"]:
        lines.append(f"| {row['method']} | {row['ranks']} | {row['ms_per_outer_iteration']:.1f} | "
                     f"{row['mib_per_outer_iteration']:.2f} | {row['overhead_vs_1_rank']:.3f} |")
    bytes_ratio, overhead_ratio = summary["ratios"]["bytes"], summary["ratios"]["overhead"]
    low, high = overhead_ratio["per_round_quartiles"]
    ci_low, ci_high = overhead_ratio["interval_95"]
    lines += [
        "",
        f"MT-COOL / DDP-Joint, bytes all-reduced per outer iteration ({WORLD} ranks): {bytes_ratio['value']:.3f} "
        f"(target <= 1.0): {'PASS' if bytes_ratio['pass'] else 'FAIL'}",
        f"MT-COOL / DDP-Joint, time overhead of going distributed ({WORLD} ranks / 1): {overhead_ratio['value']:.3f} "
        f"(target <= 1.0): {'PASS' if overhead_ratio['pass'] else 'FAIL'}; 95 % interval {ci_low:.3f} - "
        f"{ci_high:.3f} (bootstrap over this run's rounds); the same ratio round by round: quartiles {low:.3f} - "
        f"{high:.3f}",
        "",
        f"Where the overhead comes from ({WORLD} apart: {WORLD} processes, each training its own copy at once, "
        "nothing all-reduced):",
        f"| method | ms / outer iteration, {WORLD} apart | contention ({WORLD} apart / 1 rank) | "
        f"communication ({WORLD} ranks / {WORLD} apart) |",
        "|---|---:|---:|---:|",
    ]
    split = summary["overhead_split"]
    for method, label in METHODS.items():
        lines.append(f"| {label} | {split['apart_ms_per_outer_iteration'][method]:.1f} | "
                     f"{split['contention'][method]:.3f} | {split['communication'][method]:.3f} |")
    low, high = split["communication_ratio_quartiles"]
    lines.append(f"MT-COOL / DDP-Joint, communication overhead alone: {split['communication_ratio']:.3f} "
                 f"(round by round: quartiles {low:.3f} - {high:.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark: print the table and the criteria, write ``<out-dir>/distributed.json``, return it."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=POSITIVE_INT, default=None, help="timed rounds (default 20; --quick: 3)")
    parser.add_argument("--size", type=_size, default=None,
                        help="IMAGESxSIDE: images per task per rank and their side (default 8x64; --quick: 2x32)")
    parser.add_argument("--quick", action="store_true", help="tiny run for the tests: 2x32 images, 3 rounds")
    parser.add_argument("--out-dir", default="results", help="output folder (default results)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    images, side = args.size or (_QUICK_SIZE if args.quick else _DEFAULT_SIZE)
    repeats = args.repeats or (3 if args.quick else 20)
    settings = Settings(images=images, side=side, repeats=repeats, warmup=1 if args.quick else 2,
                        progress=not args.no_progress)
    print(f"resnet18 (timm, no pretrained weights), 2 tasks, {images} images of {side}x{side} per task per rank, "
          f"gloo, 1 thread per rank; 1 rank = one process without torch.distributed; "
          f"{repeats} rotating rounds after {settings.warmup} warm-up, medians", flush=True)
    measured = measure(settings)
    summary = summarise(measured)
    table = markdown(summary)
    print(table)
    results = {
        "benchmark": "distributed",
        "config": {**asdict(settings), "world_size": WORLD, "threads_per_rank": 1, "backend": "gloo",
                   "model": "timm resnet18, no pretrained weights, one 5-class linear head per task",
                   "optimizer": "SGD lr 1e-3; MT-COOL L = 1, M = 1, running_stats='once'"},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "platform": platform.platform(), "cpus": os.cpu_count()},
        "notes": [
            "1 rank: one process without torch.distributed (plain Joint and MT-COOL), nothing all-reduced; "
            f"{WORLD} ranks: DDP-Joint and MT-COOL over a gloo group, each rank on its own batch of the same size.",
            "ms: the slower rank's time of one outer iteration (MT-COOL: every task one step; Joint: one step), "
            "median over rounds; overhead: median over rounds of time(2 ranks) / time(1 rank) of the method; "
            "ratios.overhead.per_round_quartiles: first and third quartiles over rounds of that round's "
            "MT-COOL overhead / DDP-Joint overhead (how far noise moves the criterion); "
            "ratios.overhead.interval_95: percentile-bootstrap interval of the criterion, resampling the rounds "
            "(2000 resamples; the spread between runs on a shared machine can be larger).",
            "bytes: gradient bytes handed to all-reduce, counted (DDP: a comm hook on every bucket; MT-COOL: the "
            "optimizer's counter). BatchNorm buffers, kept equal by both methods, are not counted: buffer_mib.",
            f"overhead_split: {WORLD} apart = {WORLD} plain processes training at once, nothing all-reduced; "
            f"contention = median of time({WORLD} apart) / time(1 rank), communication = median of "
            f"time({WORLD} ranks) / time({WORLD} apart); communication_ratio: median over rounds of MT-COOL's "
            "communication overhead / DDP-Joint's.",
        ],
        **summary,
        "buffer_mib": measured["buffer_bytes"] / 2**20,
        "rounds": {"times_s": measured["times_s"], "bytes": measured["bytes"]},
        "table": table,
    }
    out = Path(args.out_dir) / "distributed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = finite(results)
    out.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")
    return dict(results)


if __name__ == "__main__":
    main()
