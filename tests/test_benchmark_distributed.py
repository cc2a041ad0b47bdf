"""Distributed launch of the benchmarks: ``benchmarks.distributed``, ``--distributed`` under torchrun, the
learners of ``benchmarks._learners`` on several ranks, and the torchrun user-loop example of the docs.

Every test here but the argument checks starts processes (gloo on CPU): ``torch.multiprocessing.spawn`` with a
file store, or ``torchrun --standalone`` as a subprocess.
"""

from __future__ import annotations

import json
import math
import statistics
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import adapters
from tests._ranks import spawn_ranks
from tests.test_benchmark_methods import _lenet_like_problem
from benchmarks import distributed, even_odd
from benchmarks._cli import TORCHRUN_VARIABLES, Launch, sharded_schedule
from benchmarks._learners import DISTRIBUTED_METHODS, GRADIENT_METHODS, Batch, Training, build_learner, offered_methods
from benchmarks.step_time import TASKS, _classifier_problem

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(*args: str, tmp_path: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` from the repository root; fails the test on a non-zero exit."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def _trainable_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------
# python -m benchmarks.distributed


def test_quick_run_reports_finite_times_and_counts_every_parameter_byte_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = distributed.main(["--quick", "--out-dir", str(tmp_path), "--no-progress"])
    printed = capsys.readouterr().out
    written = json.loads((tmp_path / "distributed.json").read_text())
    assert written == results
    rows = {(row["learner"], row["ranks"]): row for row in written["rows"]}
    assert set(rows) == {(m, r) for m in distributed.METHODS for r in (1, 2)}
    for row in rows.values():
        assert math.isfinite(row["ms_per_outer_iteration"]) and row["ms_per_outer_iteration"] > 0
        assert math.isfinite(row["overhead_vs_1_rank"]) and row["overhead_vs_1_rank"] > 0
        assert f"| {row['method']} | {row['ranks']} | {row['ms_per_outer_iteration']:.1f} |" in printed
    low, high = written["ratios"]["overhead"]["interval_95"]
    assert math.isfinite(low) and low <= high and f"95 % interval {low:.3f} - {high:.3f}" in printed

    # Counted, not estimated: at L = 1 each task's gradients are all-reduced once per outer iteration, so
    # MT-COOL sends every trainable parameter of the split network once; DDP every parameter of Joint's.
    split = _classifier_problem().multi_task()
    adapters.split_channels(split.encoder, list(TASKS))
    expected = {"mt_cool": _trainable_bytes(split), "joint": _trainable_bytes(_classifier_problem().multi_task())}
    for method, size in expected.items():
        assert rows[(method, 2)]["bytes_per_outer_iteration"] == size
        assert written["rounds"]["bytes"][f"{method}@2"] == [size] * written["config"]["repeats"]  # every round
        assert rows[(method, 1)]["bytes_per_outer_iteration"] == 0  # one process, no torch.distributed
    assert written["ratios"]["bytes"]["value"] == pytest.approx(expected["mt_cool"] / expected["joint"])
    for name in ("bytes", "overhead"):
        ratio = written["ratios"][name]
        assert math.isfinite(ratio["value"]) and ratio["pass"] == (ratio["value"] <= 1.0)
    assert "target <= 1.0): PASS" in printed or "target <= 1.0): FAIL" in printed

    # The overhead split: both processes training apart at once, then the communication on top of that.
    split = written["overhead_split"]
    apart = written["rounds"]["times_s"]
    for method in distributed.METHODS:
        assert written["rounds"]["bytes"][f"{method}@2apart"] == [0] * written["config"]["repeats"]  # nothing sent
        one, ranks, both = apart[f"{method}@1"], apart[f"{method}@2"], apart[f"{method}@2apart"]
        assert split["contention"][method] == pytest.approx(statistics.median(b / o for b, o in zip(both, one)))
        assert split["communication"][method] == pytest.approx(statistics.median(r / b for r, b in zip(ranks, both)))
        assert f"| {distributed.METHODS[method]} | {split['apart_ms_per_outer_iteration'][method]:.1f} |" in printed
    assert math.isfinite(split["communication_ratio"]) and "communication overhead alone" in printed


def test_size_flag_names_the_format() -> None:
    with pytest.raises(SystemExit):
        distributed.main(["--size", "8"])
    with pytest.raises(SystemExit):
        distributed.main(["--size", "8x16"])


# ---------------------------------------------------------------------------
# The learners on two ranks compute what one process computes on the whole batch




_LEARNER_METHODS = ("independent", "joint", "without_reg")
_STEPS = 3
_BATCH = 8  # per step, over both ranks


def _whole_batches(step: int) -> dict[str, Batch]:
    g = torch.Generator().manual_seed(step)
    return {task: (torch.randn(_BATCH, 1, 4, 4, generator=g), torch.randint(0, 3, (_BATCH,), generator=g))
            for task in ("a", "b")}


def _train(method: str, rank: int = 0, world: int = 1, steps: int = _STEPS) -> dict[str, Tensor]:
    """The parameters after ``steps`` steps on this rank's share of every step's batch."""
    learner = build_learner(method, _lenet_like_problem(), Training(lr=0.2, momentum=0.5, warmup_steps=1))
    share = _BATCH // world
    for step in range(steps):
        learner.train_step({task: (x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share])
                            for task, (x, y) in _whole_batches(step).items()})
    modules = learner.models if method == "independent" else {"": learner.model}  # type: ignore[attr-defined]
    return {f"{key}.{name}": p.detach().clone() for key, m in modules.items() for name, p in m.named_parameters()}


def _learners_on_ranks(rank: int, world: int, folder: Path) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result: dict[str, Any] = {method: _train(method, rank, world) for method in _LEARNER_METHODS}
    refused: dict[str, str | None] = {}
    for method in GRADIENT_METHODS[:1]:
        try:
            build_learner(method, _lenet_like_problem(), Training())
            refused[method] = None
        except ValueError as error:
            refused[method] = str(error)
    result["refused"] = refused
    return result


def test_learners_on_two_ranks_equal_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    ranks = spawn_ranks(_learners_on_ranks, 2, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for method in _LEARNER_METHODS:
            alone = _train(method)
            for r in ranks:
                assert r[method].keys() == alone.keys()
                for name, value in alone.items():
                    torch.testing.assert_close(r[method][name], value, rtol=1e-5, atol=1e-6, msg=f"{method} {name}")
            untrained = _train(method, steps=0)
            assert any(not torch.equal(value, untrained[name]) for name, value in alone.items())
    for r in ranks:
        message = r["refused"][GRADIENT_METHODS[0]]
        offered = [m for m in offered_methods(()) if m in DISTRIBUTED_METHODS]  # the LeNet problem has no networks
        assert message is not None and message.endswith(f"choose --methods from {','.join(offered)}")


# ---------------------------------------------------------------------------
# --distributed: data sharding and errors


@pytest.mark.parametrize("size, world, batch", [(10, 2, 3), (7, 3, 2), (256, 2, 32)])
def test_sharded_schedule_gives_each_pass_to_the_ranks_disjointly(size: int, world: int, batch: int) -> None:
    shard = math.ceil(size / world)
    passes = 3
    steps = passes * shard // batch
    schedules = [sharded_schedule(size, batch, steps, seed=4, launch=Launch(rank=r, world=world)) for r in range(world)]
    assert all(s.shape == (steps, batch) for s in schedules)
    flat = [s.flatten() for s in schedules]
    for p in range(steps * batch // shard):  # each pass: the ranks' shards cover the data, padding aside
        covered = torch.cat([f[p * shard:(p + 1) * shard] for f in flat])
        assert set(covered.tolist()) == set(range(size))
        assert covered.numel() == shard * world
    assert not torch.equal(flat[0][:shard], flat[0][shard:2 * shard])  # set_epoch reshuffles each pass
    again = sharded_schedule(size, batch, steps, seed=4, launch=Launch(rank=0, world=world))
    assert torch.equal(again, schedules[0])


def test_distributed_refuses_methods_that_cannot_average_over_ranks() -> None:
    with pytest.raises(ValueError, match=r"--distributed: methods \['pcgrad'\].*choose --methods from independent,"):
        even_odd.parse_args(["--distributed", "--methods", "joint,pcgrad"])
    assert even_odd.parse_args(["--distributed"]).methods == tuple(m for m in even_odd.METHODS if m in DISTRIBUTED_METHODS)
    assert set(even_odd.METHODS) - set(even_odd.parse_args(["--distributed"]).methods) == set(GRADIENT_METHODS)
    assert even_odd.parse_args([]).methods == even_odd.METHODS


def test_distributed_without_torchrun_and_torchrun_without_distributed_are_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="--distributed needs the environment torchrun.*torchrun --standalone"):
        even_odd.main(["--distributed", "--quick", "--out-dir", str(tmp_path)])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 ranks .* without --distributed"):
        even_odd.main(["--quick", "--out-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------
# torchrun --standalone --nproc-per-node 2


def test_torchrun_even_odd_distributed_trains_on_shards_and_rank_0_writes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _torchrun("-m", "benchmarks.even_odd", "--distributed", "--quick", "--methods", "joint,mt_cool",
                     "--out-dir", str(out), "--no-progress", tmp_path=tmp_path, timeout=120)
    results = json.loads((out / "even_odd.json").read_text())
    assert results["distributed"]["world_size"] == 2 and results["config"]["distributed"] is True
    assert list(results["methods"]) == ["joint", "mt_cool"]
    for summary in results["methods"].values():
        run = summary["runs"][0]
        # --quick: 256 training examples per task, 32 per rank and step: 128 per rank, 4 steps (8 on one process)
        assert run["train_sizes"] == {"even": 256, "odd": 256} and run["steps_per_epoch"] == 4
        assert all(0.0 <= a["mean"] <= 1.0 for a in summary["metrics"].values())
    assert done.stdout.count("| method |") == 1  # only rank 0 prints the table


def test_torchrun_refuge_distributed_runs_through_the_shared_scenario_driver(tmp_path: Path) -> None:
    pytest.importorskip("segmentation_models_pytorch")
    out = tmp_path / "out"
    _torchrun("-m", "benchmarks.refuge", "--distributed", "--quick", "--methods", "independent,mt_cool",
              "--out-dir", str(out), "--no-progress", tmp_path=tmp_path, timeout=120)
    results = json.loads((out / "refuge.json").read_text())
    assert results["distributed"]["world_size"] == 2
    for summary in results["methods"].values():
        run = summary["runs"][0]
        size = max(run["train_sizes"].values())
        assert run["steps_per_epoch"] == math.ceil(math.ceil(size / 2) / results["config"]["batch_size"])
        assert all(math.isfinite(m["mean"]) for m in summary["metrics"].values())
    assert (out / "refuge_samples.png").exists()


def test_torchrun_user_loop_example_runs_on_two_synchronised_ranks(tmp_path: Path) -> None:
    done = _torchrun(str(ROOT / "docs" / "examples" / "torchrun_user_loop.py"), tmp_path=tmp_path, timeout=90)
    lines = [line for line in done.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 0", "epoch 1", "epoch 2"]  # rank 0 alone prints
    assert all("world_size=2" in line for line in lines)
    first, last = (float(line.rsplit("odd ", 1)[1]) for line in (lines[0], lines[-1]))
    assert last < first
