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

Then, on the same resnet18 pair at the first size (``--compare-sizes``
chooses others: ``small,large`` shows where the targets hold), three comparisons, each
side by side in one run with the same alternating pairs: the user-loop path
(``for name in opt.iteration(): with opt.perturb(name): ...``) against
``opt.step(batches)`` (target <= 1.02), MT-COOL against Joint with both
forwards under ``torch.autocast(dtype=torch.bfloat16)`` (target <= 1.00),
and, with ``--compile``, MT-COOL against Joint with both models under
``torch.compile`` (target <= 1.00; the first steps, which compile, are
warm-up and not timed).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import adapters
import adapters.timm
from benchmarks._cli import POSITIVE_INT, resolve_device
from cooperative_opt import CooperativeOptimizer

SIZES = {"small": (16, 64), "large": (32, 128), "tiny": (2, 32)}  # images per task, side length; tiny: smoke tests
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


Batches = dict[str, tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Setup:
    """How both sides of a comparison run: the forward under autocast, the model under ``torch.compile``."""

    autocast: torch.dtype | None = None
    compile_backend: str | None = None  # None: eager

    def compiled(self, model: nn.Module) -> nn.Module:
        """``model``, or ``torch.compile(model)`` with the setup's backend."""
        if self.compile_backend is None:
            return model
        compiled: nn.Module = torch.compile(model, backend=self.compile_backend)  # type: ignore[assignment]
        return compiled

    def forward_context(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """What the forward (and the loss) runs under."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)


EAGER = Setup()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def joint_stepper(model: nn.Module, batches: Batches, setup: Setup = EAGER) -> Callable[[], None]:
    """A Joint training step: sum of the task losses, one SGD step."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    forward, device = setup.compiled(model), _device_of(model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with setup.forward_context(device):
            outputs = {t: forward(x, t) for t, (x, _) in batches.items()}
        loss = torch.stack([F.cross_entropy(outputs[t].float(), y) for t, (_, y) in batches.items()]).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()

    return step


def cooperative_optimizer(model: MultiTaskResNet, samples: int, vectorize: bool, setup: Setup = EAGER
                          ) -> CooperativeOptimizer:
    """MT-COOL (L = 1) on ``model``, channel-split in place; a compiled setup gives it ``torch.compile(model)``."""
    adapters.split_channels(model.encoder, list(TASKS))
    tasks = adapters.make_tasks(model, dict.fromkeys(TASKS, F.cross_entropy), heads=dict(model.heads.items()))
    with warnings.catch_warnings():  # M = 1: the paper's consistency term is zero, as in the paper's runs
        warnings.simplefilter("ignore", UserWarning)
        return CooperativeOptimizer(setup.compiled(model), tasks, torch.optim.SGD, lr=1e-3, samples=samples,
                                    vectorize=vectorize, seed=0)


def cooperative_stepper(
    model: MultiTaskResNet, batches: Batches, samples: int, vectorize: bool, setup: Setup = EAGER
) -> Callable[[], None]:
    """One MT-COOL outer iteration (L = 1) through ``opt.step(batches)`` on a channel-split ``model``."""
    if setup.autocast is not None:
        raise ValueError(
            f"cooperative_stepper: setup.autocast={setup.autocast} would wrap the backward and the step as well; "
            "use user_loop_stepper, which autocasts the forward only"
        )
    opt = cooperative_optimizer(model, samples, vectorize, setup)

    def step() -> None:
        opt.step(batches)

    return step


def user_loop_stepper(model: MultiTaskResNet, batches: Batches, samples: int = 1, setup: Setup = EAGER
                      ) -> Callable[[], None]:
    """One MT-COOL outer iteration written as a user's own loop (docs/usage.md), the forward under the setup."""
    opt = cooperative_optimizer(model, samples, vectorize=False, setup=setup)
    forward, device = opt.model, _device_of(model)

    def step() -> None:
        for name in opt.iteration():
            x, y = batches[name]
            outputs = []
            for _ in range(samples):
                with setup.forward_context(device), opt.perturb(name):
                    outputs.append(forward(x, name))
            loss = torch.stack([F.cross_entropy(o.float(), y) for o in outputs]).mean()
            loss = loss + opt.consistency(name, outputs)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            opt.zero_grad()

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


def alternate(first: Callable[[], None], second: Callable[[], None], repeats: int, device: torch.device,
              warmup: int = 2) -> tuple[float, float, float]:
    """Median ms of ``first`` and of ``second``, timed in alternating pairs (the order flips every pair),
    and the median over pairs of their ratio first / second. ``warmup`` untimed pairs come first
    (allocator, kernels, lazy initialisation, compilation)."""
    for _ in range(warmup):
        first()
        second()
    t1: list[float] = []
    t2: list[float] = []
    for r in range(repeats):
        order = [(first, t1), (second, t2)] if r % 2 == 0 else [(second, t2), (first, t1)]
        for fn, out in order:
            out.append(_timed(fn, device))
    ratios = [a / b for a, b in zip(t1, t2)]
    return 1e3 * statistics.median(t1), 1e3 * statistics.median(t2), statistics.median(ratios)


def time_pair(size: str, samples: int, repeats: int, device: torch.device, vectorize: bool) -> Timing:
    """Median step times of Joint and MT-COOL, alternating, and the median of their per-pair ratios."""
    torch.manual_seed(0)
    base = MultiTaskResNet().to(device)
    batches = make_batches(size, device)
    joint = joint_stepper(copy.deepcopy(base), batches)
    coop = cooperative_stepper(copy.deepcopy(base), batches, samples, vectorize)
    coop_ms, joint_ms, ratio = alternate(coop, joint, repeats, device)
    return Timing(size, samples, joint_ms, coop_ms, ratio)


# --------------------------------------------------------------- paths and precisions, side by side

Stepper = Callable[[MultiTaskResNet, Batches], Callable[[], None]]


@dataclass(frozen=True)
class Comparison:
    """Two ways of training the same resnet18 pair, timed against each other."""

    key: str  # the --compare name
    label: str  # "first / second"
    target: float  # the ratio first / second should not exceed
    first: Stepper
    second: Stepper


def comparisons(compile_backend: str = "inductor") -> dict[str, Comparison]:
    """The comparisons ``--compare`` chooses from, by key."""
    bf16 = Setup(autocast=torch.bfloat16)
    compiled = Setup(compile_backend=compile_backend)
    rows = [
        Comparison("user-loop", "MT-COOL user loop / step(batches)", 1.02,
                   lambda m, b: user_loop_stepper(m, b), lambda m, b: cooperative_stepper(m, b, 1, False)),
        Comparison("bf16", "bf16 MT-COOL / bf16 Joint", 1.00,
                   lambda m, b: user_loop_stepper(m, b, setup=bf16), lambda m, b: joint_stepper(m, b, bf16)),
        Comparison("compile", f"compiled MT-COOL / compiled Joint ({compile_backend})", 1.00,
                   lambda m, b: cooperative_stepper(m, b, 1, False, compiled),
                   lambda m, b: joint_stepper(m, b, compiled)),
    ]
    return {row.key: row for row in rows}


@dataclass
class ComparisonRow:
    """One printed comparison: median ms of each side, the median per-pair ratio, and its target."""

    comparison: str
    size: str
    first_ms: float
    second_ms: float
    ratio: float
    target: float
    met: bool = field(init=False)

    def __post_init__(self) -> None:
        self.met = self.ratio <= self.target


def time_comparison(comparison: Comparison, size: str, repeats: int, device: torch.device) -> ComparisonRow:
    """Both sides of ``comparison`` on copies of one resnet18 pair and one set of batches, alternating."""
    torch.manual_seed(0)
    base = MultiTaskResNet().to(device)
    batches = make_batches(size, device)
    first = comparison.first(copy.deepcopy(base), batches)
    second = comparison.second(copy.deepcopy(base), batches)
    first_ms, second_ms, ratio = alternate(first, second, repeats, device)
    return ComparisonRow(comparison.label, size, first_ms, second_ms, ratio, comparison.target)


def print_comparisons(keys: list[str], size: str, repeats: int, device: torch.device,
                      compile_backend: str) -> list[dict[str, Any]]:
    """Run and print the chosen comparisons as one markdown table."""
    table = comparisons(compile_backend)
    n, side = SIZES[size]
    print(f"\nresnet18 pair, {size} ({n}x{side}x{side}/task), {repeats} alternating pairs per comparison")
    print("| comparison | first ms | second ms | ratio first / second (median of pairs) | target |")
    print("|---|---|---|---|---|")
    rows = []
    for key in keys:
        row = time_comparison(table[key], size, repeats, device)
        print(f"| {row.comparison} | {row.first_ms:.1f} | {row.second_ms:.1f} | {row.ratio:.3f} | "
              f"<= {row.target:.2f} ({'met' if row.met else 'not met'}) |")
        rows.append(row.__dict__)
    return rows


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
    from benchmarks._learners import Problem

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
    from benchmarks._learners import offered_methods

    labels: list[str] = []
    for method in offered_methods(()):  # the method table's problems build no Problem.networks
        if method == "mt_cool":
            labels += [f"mt_cool (M={m})" for m in MT_COOL_SAMPLES]
            labels += ["mt_cool (M=1, whole layers)", "mt_cool (M=1, clean stats)"]
        else:
            labels.append(method)
    return labels


def _learner(problem: Any, label: str, device: torch.device) -> Any:
    """The learner a :func:`method_labels` row times (and its memory subprocess measures)."""
    from benchmarks._learners import Training, build_learner

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


def _size_names(parser: argparse.ArgumentParser, option: str, text: str) -> list[str]:
    """The size names of a comma list given to ``option``; an unknown or empty list is a usage error."""
    names = [s for s in text.split(",") if s]
    bad = [s for s in names if s not in SIZES]
    if bad or not names:
        parser.error(f"{option}: unknown {bad or text!r}; choose from {list(SIZES)}")
    return names


def _compare_keys(parser: argparse.ArgumentParser, text: str, compile_too: bool) -> list[str]:
    """The ``--compare`` keys in table order, ``compile`` added by ``--compile``."""
    known = list(comparisons())
    keys = {key.strip() for key in text.split(",") if key.strip()} | ({"compile"} if compile_too else set())
    unknown = sorted(keys - set(known))
    if unknown:
        parser.error(f"--compare: unknown {unknown}; give a comma list drawn from {','.join(known)}")
    return [key for key in known if key in keys]


def _print_pairs(results: dict[str, Any], sizes: list[str], samples: list[int], repeats: int, device: torch.device,
                 no_loop: bool) -> None:
    """The MT-COOL / Joint table by size and M (vmap and loop), then the noise timing."""
    print(f"resnet18, 2 tasks, {device}, {torch.get_num_threads()} threads, {repeats} alternating steps each")
    print("| size | M | samples run by | Joint ms | MT-COOL ms | ratio (median of pairs) |")
    print("|---|---|---|---|---|---|")
    for index, size in enumerate(sizes):
        for m in samples if index == 0 else [1]:
            for vectorize in [True] if m == 1 or no_loop else [True, False]:
                t = time_pair(size, m, repeats, device, vectorize)
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


def _print_memory(results: dict[str, Any], sizes: list[str], device: torch.device) -> None:
    """Peak memory of Joint and MT-COOL (M = 1) at each size, each in a fresh process."""
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small,large", help="comma list of: " + ", ".join(SIZES))
    parser.add_argument("--samples", default="1,2,4", help="M values timed at the first size (M = 1 at every size)")
    parser.add_argument("--repeats", type=POSITIVE_INT, default=15, help="timed steps per method and setting")
    parser.add_argument("--no-loop", action="store_true", help="time M > 1 with vmap only (default: vmap and loop)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--compare", default="user-loop,bf16",
                        help="comparisons timed at the first size, comma list of: " + ", ".join(comparisons())
                        + " (empty: none)")
    parser.add_argument("--compare-sizes", default=None,
                        help="comma list of sizes the comparisons are timed at (default: the first of --sizes)")
    parser.add_argument("--compile", action="store_true", help="also time compiled MT-COOL against compiled Joint")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --compile")
    parser.add_argument("--no-pairs", action="store_true",
                        help="skip the MT-COOL / Joint table by size and M and the noise timing")
    parser.add_argument("--out", default="results/step_time.json")
    parser.add_argument("--methods", action="store_true",
                        help="also time every method of benchmarks._learners side by side (issue 4's table)")
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
    try:
        device = torch.device(resolve_device(args.device))
    except ValueError as error:
        parser.error(str(error))
    sizes = _size_names(parser, "--sizes", args.sizes)
    compare = _compare_keys(parser, args.compare, args.compile)
    compare_sizes = sizes[:1] if args.compare_sizes is None else _size_names(parser, "--compare-sizes",
                                                                              args.compare_sizes)
    samples = [int(m) for m in args.samples.split(",")]
    results: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads(), "timings": [], "memory": []}
    if not args.no_pairs:
        _print_pairs(results, sizes, samples, args.repeats, device, args.no_loop)
    if compare:
        results["comparisons"] = [row for size in compare_sizes
                                  for row in print_comparisons(compare, size, args.repeats, device, args.compile_backend)]
    if not args.no_memory:
        _print_memory(results, sizes, device)
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
