"""The every-method table of ``benchmarks.step_time``: row labels and the learners they build."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchjd")

from benchmarks import step_time  # noqa: E402
from benchmarks._methods import METHODS  # noqa: E402
from tests.test_benchmark_methods import _lenet_like_problem  # noqa: E402


def test_every_method_has_a_row_and_mt_cool_one_per_setting() -> None:
    labels = step_time.method_labels()
    assert [label for label in labels if not label.startswith("mt_cool ")] == [m for m in METHODS if m != "mt_cool"]
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
