"""``benchmarks.step_time``: the every-method table's rows and learners, and the side-by-side comparisons."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch._dynamo

pytest.importorskip("torchjd")

from benchmarks import step_time  # noqa: E402
from benchmarks._learners import offered_methods  # noqa: E402
from tests.test_benchmark_methods import _lenet_like_problem  # noqa: E402


def test_every_method_has_a_row_and_mt_cool_one_per_setting() -> None:
    labels = step_time.method_labels()
    assert [label for label in labels if not label.startswith("mt_cool ")] == [m for m in offered_methods(()) if m != "mt_cool"]
    assert [label for label in labels if label.startswith("mt_cool ")] == [
        "mt_cool (M=1)", "mt_cool (M=2)", "mt_cool (M=4)", "mt_cool (M=1, whole layers)",
        "mt_cool (M=1, clean stats)"]


@pytest.mark.parametrize(
    ("label", "samples", "running_stats", "sliced"),
    [("mt_cool (M=1)", 1, "once", True), ("mt_cool (M=4)", 4, "once", True),
     ("mt_cool (M=1, whole layers)", 1, "once", False), ("mt_cool (M=1, clean stats)", 1, "clean", True),
     ("without_reg", 1, "once", True)],
)
def test_the_memory_child_builds_the_learner_its_row_times(
    label: str, samples: int, running_stats: str, sliced: bool
) -> None:
    # The timing rows and the peak-memory subprocess go through the same builder, so a row's two
    # columns measure one configuration.
    learner = step_time._learner(_lenet_like_problem(), label, torch.device("cpu"))
    assert learner.optimizer.settings.samples == samples
    assert learner.optimizer.settings.running_stats == running_stats
    assert learner.optimizer.settings.sliced_layers is sliced


def test_unknown_label_option_is_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="unknown option 'fast'"):
        step_time._learner(_lenet_like_problem(), "mt_cool (fast)", torch.device("cpu"))


# ------------------------------------------------------- the comparisons: user loop, bf16, compiled


class _TinyPair(torch.nn.Module):
    """Stands in for resnet18 in the smoke tests: the same interface (encoder, heads, forward(x, task))."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 512))
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(512, step_time.CLASSES) for t in step_time.TASKS})

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        out: torch.Tensor = self.heads[task](self.encoder(x))
        return out


@pytest.fixture
def tiny_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(step_time, "MultiTaskResNet", _TinyPair)


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("tiny_pair", "fresh_dynamo")
def test_every_comparison_prints_a_finite_ratio_and_its_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "step_time.json"
    results = step_time.main(["--sizes", "tiny", "--repeats", "2", "--no-memory", "--no-pairs", "--device", "cpu",
                              "--compare", "user-loop,bf16", "--compile", "--compile-backend", "aot_eager",
                              "--out", str(out)])
    rows = results["comparisons"]
    labels = ["MT-COOL user loop / step(batches)", "bf16 MT-COOL / bf16 Joint",
              "compiled MT-COOL / compiled Joint (aot_eager)"]
    assert [row["comparison"] for row in rows] == labels
    assert [row["target"] for row in rows] == [1.02, 1.00, 1.00]
    for row in rows:
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("first_ms", "second_ms", "ratio")), row
        assert row["met"] == (row["ratio"] <= row["target"])
    printed = capsys.readouterr().out
    assert all(f"| {label} |" in printed for label in labels)
    assert json.loads(out.read_text())["comparisons"] == rows


@pytest.mark.usefixtures("tiny_pair")
def test_comparisons_are_timed_at_every_size_asked_for(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = step_time.main(["--sizes", "tiny", "--compare-sizes", "tiny,small", "--repeats", "2", "--no-memory",
                              "--no-pairs", "--device", "cpu", "--compare", "user-loop", "--out",
                              str(tmp_path / "st.json")])
    assert [(row["size"], row["comparison"]) for row in results["comparisons"]] == [
        ("tiny", "MT-COOL user loop / step(batches)"), ("small", "MT-COOL user loop / step(batches)")]
    printed = capsys.readouterr().out
    assert "resnet18 pair, tiny (2x32x32/task)" in printed and "resnet18 pair, small (16x64x64/task)" in printed


def test_the_user_loop_and_step_batches_train_alike() -> None:
    # The user-loop row times the same computation as step(batches): same parameters after two steps.
    torch.manual_seed(0)
    base = _TinyPair()
    batches = step_time.make_batches("tiny", torch.device("cpu"))
    models = [copy.deepcopy(base), copy.deepcopy(base)]
    loop, driver = step_time.user_loop_stepper(models[0], batches), step_time.cooperative_stepper(
        models[1], batches, 1, False)
    for _ in range(2):
        loop()
        driver()
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert torch.equal(a, b), name


def test_bad_comparison_options_are_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        step_time.main(["--compare", "user-loop,fp8", "--device", "cpu"])
    assert "--compare: unknown ['fp8']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        step_time.main(["--compare-sizes", "small,huge", "--device", "cpu"])
    assert "--compare-sizes: unknown ['huge']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="use user_loop_stepper"):
        step_time.cooperative_stepper(_TinyPair(), {}, 1, False, step_time.Setup(autocast=torch.bfloat16))
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            step_time.main(["--device", "cuda"])
        assert "--device 'cuda' asks for CUDA" in capsys.readouterr().err
