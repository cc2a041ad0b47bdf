"""``make gpu-check``: the CUDA tests and the step-time figures on a CUDA device, in one file.

Run ``python -m benchmarks.gpu_check`` on a machine with a CUDA device
(about 5 minutes on one H200; each part has a time budget, 7.5 minutes in
all). It

1. runs every test marked ``cuda`` (``pytest -m cuda``: the tests that are
   skipped without a CUDA device or parametrized with device ``"cuda"``,
   see tests/conftest.py), and fails if any fails or is skipped;
2. runs ``python -m benchmarks.step_time --device cuda --compile``: MT-COOL
   against Joint by size and M (vmap and loop, so the M scaling of both),
   the noise timing, the user-loop, bf16 and compiled comparisons and the
   peak memory;
3. writes everything (environment, test summary, every table, the raw
   step-time JSON) to ``results/gpu_check.txt`` and prints its path.

It exits non-zero, naming the reason, when there is no CUDA device, when a
test fails or is skipped, or when a part overruns its budget. A target that
is not met is reported in the tables, not an error: the figures are the
point. ``--dry-run`` (or ``GPU_CHECK_DRY_RUN=1``) skips the CUDA requirement
and runs the same parts on CPU at the smallest size, to check on a machine
without a GPU that the script starts and runs end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository: pytest and the benchmarks run from here
TEST_BUDGET_S = 180
STEP_TIME_BUDGET_S = 270
DRY_RUN_ENV = "GPU_CHECK_DRY_RUN"


class CheckFailed(RuntimeError):
    """A part of the check failed; the message says which and why."""


@dataclass(frozen=True)
class Part:
    """One subprocess of the check and what it printed."""

    title: str
    command: list[str]
    returncode: int
    output: str
    seconds: float


def require_cuda(dry_run: bool) -> str:
    """The device the check runs on: ``cuda``, or ``cpu`` in a dry run; raises without a CUDA device."""
    if dry_run:
        return "cpu"
    if not torch.cuda.is_available():
        raise CheckFailed(
            f"gpu-check needs a CUDA device, and torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda}). Run it on a machine with a GPU, or pass --dry-run "
            f"({DRY_RUN_ENV}=1) to check the script itself on CPU"
        )
    return "cuda"


def environment(device: str) -> str:
    """Versions and the device, as the file's header."""
    lines = [f"python {platform.python_version()}, torch {torch.__version__}, CUDA build {torch.version.cuda}",
             f"device: {device}, CPU threads: {torch.get_num_threads()}"]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        cudnn = torch.backends.cudnn.version()  # type: ignore[no-untyped-call]
        lines.append(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability "
                     f"{props.major}.{props.minor}, cuDNN {cudnn}")
    return "\n".join(lines)


def run_part(title: str, command: list[str], budget_s: int) -> Part:
    """Run ``command`` (output captured) within ``budget_s`` seconds."""
    print(f"[gpu-check] {title}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=budget_s, check=False, cwd=ROOT)
    except subprocess.TimeoutExpired as error:
        tail = (error.stdout or b"")[-4000:]
        text = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        raise CheckFailed(f"{title} ran past its budget of {budget_s} s; its output so far:\n{text}") from None
    seconds = time.perf_counter() - start
    return Part(title, command, done.returncode, done.stdout + done.stderr, seconds)


def junit_summary(junit: Path) -> tuple[dict[str, int], list[str]]:
    """Counts (tests, failures, errors, skipped) and the ids of the tests that did not pass, from pytest's junit XML."""
    root = ET.parse(junit).getroot()
    suite = root.find("testsuite") if root.tag == "testsuites" else root
    if suite is None:
        raise CheckFailed(f"{junit} holds no <testsuite>; did pytest run?")
    counts = {key: int(suite.get(key, "0")) for key in ("tests", "failures", "errors", "skipped")}
    bad = [f"{case.get('classname')}::{case.get('name')} ({child.tag})"
           for case in suite.iter("testcase") for child in case if child.tag in ("failure", "error", "skipped")]
    return counts, bad


def run_tests(results: Path, dry_run: bool) -> tuple[Part, str]:
    """``pytest -m cuda``; raises if a test failed, or (on a GPU) was skipped."""
    junit = results / "gpu_check_tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-rs", f"--junitxml={junit}"]
    part = run_part("CUDA tests", command, TEST_BUDGET_S)
    if not junit.exists():
        raise CheckFailed(f"pytest wrote no report (exit code {part.returncode}):\n{part.output[-4000:]}")
    counts, bad = junit_summary(junit)
    summary = (f"{counts['tests']} CUDA tests: {counts['failures']} failed, {counts['errors']} errors, "
               f"{counts['skipped']} skipped ({part.seconds:.0f} s)")
    if counts["tests"] == 0:
        raise CheckFailed("pytest -m cuda selected no test; tests/conftest.py marks them, is it loaded?")
    if counts["failures"] or counts["errors"] or (counts["skipped"] and not dry_run):
        raise CheckFailed(f"{summary}:\n" + "\n".join(bad) + f"\n\n{part.output[-6000:]}")
    return part, summary + ("".join(f"\n  {b}" for b in bad) if bad else "")


def step_time_command(device: str, results: Path, dry_run: bool) -> list[str]:
    """The step-time run: the full default run plus ``--compile`` on CUDA; the smallest one in a dry run."""
    command = [sys.executable, "-m", "benchmarks.step_time", "--device", device, "--compile",
               "--out", str(results / "gpu_check_step_time.json")]
    if dry_run:
        command += ["--sizes", "tiny", "--samples", "1,2", "--repeats", "2", "--no-memory",
                    "--compile-backend", "aot_eager"]
    return command


def run_step_time(device: str, results: Path, dry_run: bool) -> Part:
    part = run_part("step time", step_time_command(device, results, dry_run), STEP_TIME_BUDGET_S)
    if part.returncode != 0:
        raise CheckFailed(f"benchmarks.step_time exited with {part.returncode}:\n{part.output[-6000:]}")
    return part


def report(path: Path, header: str, tests: str, step_time: Part, results: Path) -> None:
    """Write the one file with every figure."""
    raw = (results / "gpu_check_step_time.json").read_text()
    lines = ["# gpu-check", "", header, "", "## CUDA tests", "", tests, "",
             f"## step time ({step_time.seconds:.0f} s): {' '.join(step_time.command[1:])}", "",
             step_time.output.strip(), "", "## step time, raw", "", json.dumps(json.loads(raw), indent=1)]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get(DRY_RUN_ENV) == "1",
                        help=f"run on CPU at the smallest size, without requiring CUDA (also {DRY_RUN_ENV}=1)")
    parser.add_argument("--results", default="results", help="folder of the report (results/gpu_check.txt)")
    args = parser.parse_args(argv)
    results = Path(args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    out = results / "gpu_check.txt"
    try:
        device = require_cuda(args.dry_run)
        header = environment(device) + ("\nDRY RUN on CPU: the figures say nothing about a GPU" if args.dry_run else "")
        print(header, flush=True)
        _, tests = run_tests(results, args.dry_run)
        print(f"[gpu-check] {tests}", flush=True)
        step_time = run_step_time(device, results, args.dry_run)
        report(out, header, tests, step_time, results)
    except CheckFailed as error:
        print(f"[gpu-check] FAILED: {error}", file=sys.stderr)
        return 1
    print(step_time.output.strip())
    print(f"\n[gpu-check] all figures: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
