"""Time and memory of a MT-COOL step against a Joint step, measured side by side.

Run ``python -m benchmarks.step_time``. The model is torchvision's resnet18
(``weights=None``) as the shared encoder with one linear head per task and
two tasks. Joint: the same network unsplit, loss = sum of the task losses,
one SGD step. MT-COOL: the encoder channel-split between the tasks, one
outer iteration of :class:`CooperativeOptimizer` (L = 1, M = 1, 2, 4) on the
same per-task batches. Steps of the two methods alternate, so machine noise
hits both alike; the printed ratio is the median over pairs of
(MT-COOL time / Joint time). Peak memory is measured in a fresh subprocess
per method: the peak resident set size of three steps on CPU (reset after
the first step through ``/proc/self/clear_refs``), ``max_memory_allocated``
on CUDA; also shown above the process's size after imports, which counts
the model, the optimizer state, the anchor and the noise buffers.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import adapters
import adapters.timm
from cooperative_opt import CooperativeOptimizer, Task

SIZES = {"small": (16, 64), "large": (32, 128)}  # images per task, side length
TASKS = ("a", "b")
CLASSES = 5


class MultiTaskResNet(nn.Module):
    """resnet18 (no pretrained weights) as the encoder, one linear head per task."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet18  # type: ignore[import-untyped]

        net = resnet18(weights=None)
        net.fc = nn.Identity()
        self.encoder = net
        self.heads = nn.ModuleDict({t: nn.Linear(512, CLASSES) for t in TASKS})

    def forward(self, x: Tensor, task: str) -> Tensor:
        logits: Tensor = self.heads[task](self.encoder(x))
        return logits


def make_batches(size: str, device: torch.device, seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """One fixed batch per task for the given size."""
    n, side = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    return {
        t: (torch.randn(n, 3, side, side, generator=g).to(device), torch.randint(0, CLASSES, (n,), generator=g).to(device))
        for t in TASKS
    }


def joint_stepper(model: nn.Module, batches: dict[str, tuple[Tensor, Tensor]]) -> Callable[[], None]:
    """A Joint training step: sum of the task losses, one SGD step."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = torch.stack([F.cross_entropy(model(x, t), y) for t, (x, y) in batches.items()]).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()

    return step


def _task_inputs(task: str) -> Callable[[tuple[Tensor, Tensor]], tuple[Tensor, str]]:
    """``Task.inputs`` for ``model(x, task)``."""

    def inputs(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, str]:
        return (batch[0], task)

    return inputs


def cooperative_stepper(
    model: MultiTaskResNet, batches: dict[str, tuple[Tensor, Tensor]], samples: int, vectorize: bool
) -> Callable[[], None]:
    """One MT-COOL outer iteration (L = 1) on a channel-split copy of ``model``."""
    adapters.split_channels(model.encoder, list(TASKS))
    tasks = [
        Task(
            t,
            loss=lambda out, batch: F.cross_entropy(out, batch[1]),
            head=model.heads[t],
            inputs=_task_inputs(t),
        )
        for t in TASKS
    ]
    with warnings.catch_warnings():  # M = 1: the paper's consistency term is zero, as in the paper's runs
        warnings.simplefilter("ignore", UserWarning)
        opt = CooperativeOptimizer(model, tasks, torch.optim.SGD, lr=1e-3, samples=samples, vectorize=vectorize, seed=0)

    def step() -> None:
        opt.step(batches)

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


@dataclass
class Timing:
    size: str
    samples: int
    joint_ms: float
    cooperative_ms: float
    ratio: float


def time_pair(size: str, samples: int, repeats: int, device: torch.device, vectorize: bool) -> Timing:
    """Median step times of Joint and MT-COOL, alternating, and the median of their per-pair ratios."""
    torch.manual_seed(0)
    base = MultiTaskResNet().to(device)
    batches = make_batches(size, device)
    joint = joint_stepper(copy.deepcopy(base), batches)
    coop = cooperative_stepper(copy.deepcopy(base), batches, samples, vectorize)
    for _ in range(2):  # warm-up: allocator, kernels, lazy init
        joint()
        coop()
    tj: list[float] = []
    tc: list[float] = []
    for r in range(repeats):
        order = [(joint, tj), (coop, tc)] if r % 2 == 0 else [(coop, tc), (joint, tj)]
        for fn, out in order:
            out.append(_timed(fn, device))
    ratios = [c / j for c, j in zip(tc, tj)]
    return Timing(size, samples, 1e3 * statistics.median(tj), 1e3 * statistics.median(tc), statistics.median(ratios))


def noise_cost(device: torch.device, numel: int = 5_600_000, repeats: int = 15) -> dict[str, float]:
    """Median ns per parameter to draw U(-b, b) noise and add it to the parameters, three ways, side by side."""
    from cooperative_opt._noise import UniformNoise

    param = torch.randn(numel, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    noise = UniformNoise([[("p", param)], [("q", torch.zeros(0, device=device))]], 1, {device: gen})
    view = noise.noise(0, 0)[0]
    out = torch.empty_like(param)

    def ours() -> None:
        noise.draw([0], 0.05)
        view.add_(param)

    def rand() -> None:
        torch.rand(numel, generator=gen, device=device, out=out)
        out.mul_(0.1).sub_(0.05).add_(param)

    def uniform() -> None:
        out.uniform_(-0.05, 0.05, generator=gen)
        out.add_(param)

    times: dict[str, list[float]] = {"cooperative_opt": [], "torch_rand": [], "uniform_": []}
    fns = {"cooperative_opt": ours, "torch_rand": rand, "uniform_": uniform}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn, device))
    return {name: 1e9 * statistics.median(ts) / numel for name, ts in times.items()}


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}; peak memory on CPU needs Linux")


def _peak_memory_child(method: str, size: str, samples: int, device_name: str) -> None:
    """Run in a subprocess: print the peak memory (MiB) of three training steps of one method as JSON.

    On CPU the peak resident set size is reset (``/proc/self/clear_refs``) after the model,
    the optimizer and one step exist, so the figure is the peak of the steps themselves.
    """
    device = torch.device(device_name)
    start = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else _status_mib("VmRSS")
    torch.manual_seed(0)
    model = MultiTaskResNet().to(device)
    batches = make_batches(size, device)
    step = joint_stepper(model, batches) if method == "joint" else cooperative_stepper(model, batches, samples, True)
    step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")
    for _ in range(3):
        step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = _status_mib("VmHWM")
    print(json.dumps({"peak_mib": peak, "start_mib": start}))


def peak_memory(method: str, size: str, samples: int, device: torch.device) -> tuple[float, float]:
    """(peak, peak above the process's start after imports) in MiB, of a fresh process running ``method``."""
    cmd = [sys.executable, "-m", "benchmarks.step_time", "--_child", method, size, str(samples), str(device)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ}).stdout
    record = json.loads(out.strip().splitlines()[-1])
    return float(record["peak_mib"]), float(record["peak_mib"] - record["start_mib"])


# --------------------------------------------------------------- every method, side by side

MT_COOL_SAMPLES = (1, 2, 4)


def _classifier_problem() -> Any:
    """Two 5-class tasks on a timm resnet18 (hard-shared for Joint), each with its own batch."""
    from benchmarks._methods import Problem

    def multi_task() -> nn.Module:
        net = adapters.timm.multitask("resnet18", {t: CLASSES for t in TASKS})
        adapters.merge(net.encoder)  # Joint shares plain parameters; the MT-COOL learners re-split them
        return net

    def single_task(task: str) -> nn.Module:
        import timm

        net: nn.Module = timm.create_model("resnet18", pretrained=False, num_classes=CLASSES)
        return net

    return Problem(tasks=TASKS, multi_task=multi_task, single_task=single_task,
                   losses={t: F.cross_entropy for t in TASKS})


def _problem_and_batches(name: str, device: torch.device) -> tuple[Any, dict[str, tuple[Tensor, Tensor]]]:
    """The model pair and fixed batches of one ``--problems`` entry."""
    g = torch.Generator().manual_seed(0)
    if name == "resnet18":
        batches = make_batches("small", device)
        return _classifier_problem(), batches
    if name == "unet":
        from benchmarks import refuge
        from benchmarks._fundus import REFUGE_CLASSES

        x = torch.randn(8, 3, 64, 64, generator=g).to(device)  # one image batch shared by both tasks
        masks = torch.randint(0, REFUGE_CLASSES, (8, 64, 64), generator=g).to(device)
        labels = torch.randint(0, 2, (8,), generator=g).to(device)
        return refuge.problem(), {"disc_cup": (x, masks), "glaucoma": (x, labels)}
    raise ValueError(f"--problems: unknown {name!r}; choose from resnet18, unet")


def method_labels() -> list[str]:
    """Row labels of the every-method table: each method, MT-COOL at each M of :data:`MT_COOL_SAMPLES`
    with ``running_stats="once"`` (the plain-PyTorch cost), and once more at M = 1 with ``"clean"``."""
    from benchmarks._methods import METHODS

    labels: list[str] = []
    for method in METHODS:
        if method == "mt_cool":
            labels += [f"mt_cool (M={m})" for m in MT_COOL_SAMPLES]
            labels += ["mt_cool (M=1, whole layers)", "mt_cool (M=1, clean stats)"]
        else:
            labels.append(method)
    return labels


def _learner(problem: Any, label: str, device: torch.device) -> Any:
    """The learner a :func:`method_labels` row times (and its memory subprocess measures)."""
    from benchmarks._methods import Training, build_learner

    method, _, options = label.partition(" (")
    samples = 1
    running_stats: Literal["once", "clean"] = "once"
    sliced_layers = True
    for option in filter(None, options.rstrip(")").split(", ")):
        if option.startswith("M="):
            samples = int(option[2:])
        elif option == "clean stats":
            running_stats = "clean"
        elif option == "whole layers":
            sliced_layers = False
        else:
            raise ValueError(f"method label {label!r}: unknown option {option!r}; see method_labels()")
    training = Training(
        lr=1e-3, samples=samples, running_stats=running_stats, sliced_layers=sliced_layers, device=str(device)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return build_learner(method, problem, training)


def _learners(problem: Any, device: torch.device) -> dict[str, Any]:
    """Every row's learner on ``problem`` (see :func:`method_labels`)."""
    return {label: _learner(problem, label, device) for label in method_labels()}


def method_table(problem_name: str, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """Median time per step of every method and its median per-round ratio to Joint, side by side."""
    problem, batches = _problem_and_batches(problem_name, device)
    learners = _learners(problem, device)
    for learner in learners.values():
        learner.train_step(batches)  # lazy initialisation, allocator warm-up
    times: dict[str, list[float]] = {name: [] for name in learners}
    names = list(learners)
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:  # rotate the order: drift hits every method alike
            times[name].append(_timed(lambda: learners[name].train_step(batches), device))
    rows = []
    for name in names:
        ratios = [t / j for t, j in zip(times[name], times["joint"])]
        rows.append({"problem": problem_name, "method": name, "ms": 1e3 * statistics.median(times[name]),
                     "ratio_to_joint": statistics.median(ratios),
                     "parameters": learners[name].num_parameters,
                     "parameter_ratio": learners[name].num_parameters / learners["joint"].num_parameters})
    return rows


def _method_peak_child(problem_name: str, method: str, device_name: str) -> None:
    """Subprocess: peak memory (MiB) of three steps of one method, as JSON (see :func:`_peak_memory_child`)."""
    device = torch.device(device_name)
    problem, batches = _problem_and_batches(problem_name, device)
    learner = _learner(problem, method, device)
    learner.train_step(batches)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")
    for _ in range(3):
        learner.train_step(batches)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _status_mib("VmHWM")
    print(json.dumps({"peak_mib": peak}))


def method_peak_memory(problem_name: str, method: str, device: torch.device) -> float:
    """Peak memory (MiB) of three steps of ``method`` in a fresh process."""
    cmd = [sys.executable, "-m", "benchmarks.step_time", "--_method_child", problem_name, method, str(device)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["peak_mib"])


def print_method_tables(problems: list[str], repeats: int, device: torch.device, memory: bool) -> list[dict[str, Any]]:
    """Run :func:`method_table` (and peak memory) for each problem and print one markdown table each."""
    rows: list[dict[str, Any]] = []
    for problem_name in problems:
        table = method_table(problem_name, repeats, device)
        if memory:
            joint_peak = method_peak_memory(problem_name, "joint", device)
            for row in table:
                row["peak_mib"] = joint_peak if row["method"] == "joint" else method_peak_memory(
                    problem_name, row["method"], device)
                row["peak_ratio_to_joint"] = row["peak_mib"] / joint_peak
        by_name = {row["method"]: row for row in table}
        print(f"\n{problem_name}: every method on the same model and batches, {repeats} rotating rounds")
        print("| method | params (x Joint) | ms / step | time (x Joint) | peak MiB | memory (x Joint) |")
        print("|---|---|---|---|---|---|")
        for row in table:
            peak = f"{row['peak_mib']:.0f} | {row['peak_ratio_to_joint']:.2f}" if memory else "- | -"
            print(f"| {row['method']} | {row['parameter_ratio']:.2f} | {row['ms']:.0f} | "
                  f"{row['ratio_to_joint']:.2f} | {peak} |")
        mt = by_name["mt_cool (M=1)"]
        for rival in ("pcgrad", "mgda"):  # both measured against Joint in the same rounds
            share = mt["ratio_to_joint"] / by_name[rival]["ratio_to_joint"]
            print(f"MT-COOL (M=1) step / {rival} step: {share:.2f} (target <= 0.55)")
        rows += table
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small,large", help="comma list of: " + ", ".join(SIZES))
    parser.add_argument("--samples", default="1,2,4", help="M values timed at the first size (M = 1 at every size)")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per method and setting")
    parser.add_argument("--no-loop", action="store_true", help="time M > 1 with vmap only (default: vmap and loop)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="results/step_time.json")
    parser.add_argument("--methods", action="store_true",
                        help="also time every method of benchmarks._methods side by side (issue 4's table)")
    parser.add_argument("--problems", default="resnet18,unet", help="with --methods: resnet18 and/or unet")
    parser.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--_method_child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._method_child:
        _method_peak_child(*args._method_child)
        return {}
    if args._child:
        method, size, samples, device_name = args._child
        _peak_memory_child(method, size, int(samples), device_name)
        return {}
    device = torch.device(args.device)
    sizes = [s for s in args.sizes.split(",") if s]
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        parser.error(f"--sizes: unknown {bad}; choose from {list(SIZES)}")
    samples = [int(m) for m in args.samples.split(",")]
    results: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads(), "timings": [], "memory": []}
    print(f"resnet18, 2 tasks, {device}, {torch.get_num_threads()} threads, {args.repeats} alternating steps each")
    print("| size | M | samples run by | Joint ms | MT-COOL ms | ratio (median of pairs) |")
    print("|---|---|---|---|---|---|")
    for index, size in enumerate(sizes):
        for m in samples if index == 0 else [1]:
            for vectorize in [True] if m == 1 or args.no_loop else [True, False]:
                t = time_pair(size, m, args.repeats, device, vectorize)
                results["timings"].append({**t.__dict__, "vmap": vectorize and m > 1})
                n, side = SIZES[size]
                how = "-" if m == 1 else ("vmap" if vectorize else "loop")
                print(
                    f"| {size} ({n}x{side}x{side}/task) | {m} | {how} | {t.joint_ms:.1f} | {t.cooperative_ms:.1f} "
                    f"| {t.ratio:.3f} |"
                )
    noise = noise_cost(device)
    results["noise_ns_per_parameter"] = noise
    print(
        f"\nnoise draw + add, ns per parameter: cooperative_opt {noise['cooperative_opt']:.2f}, "
        f"torch.rand baseline {noise['torch_rand']:.2f}, uniform_ baseline {noise['uniform_']:.2f}"
    )
    if not args.no_memory:
        print("\n| size | Joint peak MiB | MT-COOL (M=1) peak MiB | ratio | above start: Joint | MT-COOL | ratio |")
        print("|---|---|---|---|---|---|---|")
        for size in sizes:
            pj, dj = peak_memory("joint", size, 1, device)
            pc, dc = peak_memory("cooperative", size, 1, device)
            results["memory"].append(
                {"size": size, "joint_mib": pj, "cooperative_mib": pc, "ratio": pc / pj,
                 "joint_above_start_mib": dj, "cooperative_above_start_mib": dc, "above_start_ratio": dc / dj}
            )
            print(f"| {size} | {pj:.0f} | {pc:.0f} | {pc / pj:.3f} | {dj:.0f} | {dc:.0f} | {dc / dj:.3f} |")
    if args.methods:
        problems = [p for p in args.problems.split(",") if p]
        results["methods"] = print_method_tables(problems, args.repeats, device, not args.no_memory)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
