"""Tests for the STOIC-style benchmark: networks and losses, metrics, CLI end to end (synthetic and real layout)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import architectures
from benchmarks._chest import COVID_FRACTION, SEVERE_FRACTION, TASKS
from benchmarks._learners import label as method_label, offered_methods
from benchmarks.stoic import SCENARIO, SEVERE_WEIGHTS, WIDTHS, evaluate, main, problem
from tests.test_data_chest import _PATIENTS, _write_stoic

pytest.importorskip("torchmetrics")


# ---------------------------------------------------------------------------
# Networks and losses


def _widths(module: object, encoder: str = "encoder") -> object:
    """The stage widths of ``module``'s encoder attribute."""
    return getattr(getattr(module, encoder), "out_channels")


def test_every_network_is_built_on_the_same_3d_backbone() -> None:
    built = problem()
    x = torch.randn(2, 1, 8, 8, 8)
    joint = built.multi_task()
    assert isinstance(joint, architectures.HardSharingNetwork)
    assert _widths(joint) == WIDTHS
    for task in TASKS:
        single = built.single_task(task)
        assert _widths(single) == WIDTHS
        assert tuple(single(x).shape) == (2, 2)
    mtan, ctan = built.networks["mtan"](), built.networks["ctan"]()
    assert isinstance(mtan, architectures.MTAN) and isinstance(ctan, architectures.CTAN)
    assert _widths(mtan.shared_network) == WIDTHS
    # CTAN: one stream per task, cross-task attention at the middle stage (8^3 of 16^3) and the bottleneck
    assert ctan.channels == WIDTHS and ctan.encoder_stages == (1,) and ctan.bottleneck
    assert all(_widths(ctan.task_encoder(task)) == WIDTHS for task in TASKS)
    for net in (joint, mtan, ctan):
        assert {t: tuple(y.shape) for t, y in net.forward_all(x).items()} == {t: (2, 2) for t in TASKS}
    with pytest.raises(ValueError, match="task='dose' is not one of"):
        built.single_task("dose")


def test_severe_loss_is_weighted_by_the_inverse_prevalence() -> None:
    share = COVID_FRACTION * SEVERE_FRACTION
    assert SEVERE_WEIGHTS[0] == 1.0 and SEVERE_WEIGHTS[1] == pytest.approx((1 - share) / share)
    assert 9.4 < SEVERE_WEIGHTS[1] < 9.6
    logits, labels = torch.randn(6, 2), torch.tensor([0, 1, 0, 0, 1, 0])
    losses = problem().losses
    # hand-computed weighted mean: sum_i w_{y_i} * ce_i / sum_i w_{y_i}
    each = F.cross_entropy(logits, labels, reduction="none")
    weights = torch.tensor(SEVERE_WEIGHTS)[labels]
    assert float(losses["severe"](logits, labels)) == pytest.approx(float((weights * each).sum() / weights.sum()))
    assert float(losses["covid"](logits, labels)) == pytest.approx(float(each.mean()))


# ---------------------------------------------------------------------------
# Metrics


def _logits(probabilities: list[float]) -> torch.Tensor:
    """Two-class logits whose softmax gives ``probabilities`` for class 1."""
    p = torch.tensor(probabilities)
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], dim=1)


def test_metrics_against_a_hand_computed_case() -> None:
    outputs = {"covid": _logits([0.1, 0.6, 0.4, 0.9, 0.7]), "severe": _logits([0.2, 0.7, 0.3, 0.8, 0.3])}
    targets = {"covid": torch.tensor([0, 0, 1, 1, 1]), "severe": torch.tensor([0, 0, 0, 1, 1])}
    scores = evaluate(outputs, targets)
    assert list(scores) == [metric.key for metric in SCENARIO.metrics]
    # covid: positives 0.4, 0.9, 0.7 against negatives 0.1, 0.6: 0.4 beats 0.1 only -> 5 of 6 pairs
    assert scores["covid_auroc"] == pytest.approx(5 / 6)
    # severe: positives 0.8, 0.3 against negatives 0.2, 0.7, 0.3: 0.8 beats all 3, 0.3 beats 0.2 and ties 0.3
    assert scores["severe_auroc"] == pytest.approx((3 + 1 + 0.5) / 6)
    # threshold 0.5: covid predicts 0 1 0 1 1 (3 of 5 right), severe 0 1 0 1 0 (3 of 5 right)
    assert scores["covid_accuracy"] == pytest.approx(3 / 5)
    assert scores["severe_accuracy"] == pytest.approx(3 / 5)


def test_auroc_is_nan_when_the_test_labels_have_one_class() -> None:
    outputs = {task: _logits([0.2, 0.9, 0.6]) for task in TASKS}
    scores = evaluate(outputs, {"covid": torch.tensor([0, 1, 1]), "severe": torch.zeros(3, dtype=torch.int64)})
    assert scores["covid_auroc"] == pytest.approx(1.0)
    assert math.isnan(scores["severe_auroc"]) and scores["severe_accuracy"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------
# Command line, end to end


def _check_outputs(results: dict[str, Any], out_dir: Path, methods: tuple[str, ...]) -> None:
    on_disk = json.loads((out_dir / "stoic.json").read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(results))
    assert list(on_disk["methods"]) == list(methods) and on_disk["tasks"] == list(TASKS)
    keys = [metric.key for metric in SCENARIO.metrics]
    assert on_disk["delta_m"]["baseline"] == "independent"
    for method, summary in on_disk["methods"].items():
        assert set(summary["metrics"]) == set(keys)
        run = summary["runs"][0]
        assert all(len(run["curves"]["test"][key]) == on_disk["config"]["epochs"] for key in keys)
        for key in keys:
            assert 0.0 <= summary["metrics"][key]["mean"] <= 1.0
        assert f"| {method_label(method)} |" in on_disk["table"]
        assert isinstance(summary["delta_m"], float)
    assert on_disk["methods"]["independent"]["delta_m"] == 0.0
    header = "| method | params | AUROC covid | AUROC severe | Acc covid (%) | Acc severe (%) | Δm (%) |"
    assert header in on_disk["table"]
    for name in ("stoic.png", "stoic_curves.png", "stoic_samples.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_trains_stl_hps_ctan_and_mt_cool_on_ctan(tmp_path: Path) -> None:
    methods = ("independent", "joint", "ctan", "mt_cool_clean", "ctan_mt_cool")
    results = main(["--quick", "--methods", ",".join(methods), "--out-dir", str(tmp_path), "--no-progress"])
    _check_outputs(results, tmp_path, methods)
    assert results["data_source"] == "synthetic"
    config = results["config"]
    assert (config["image_size"], config["train_size"], config["test_size"]) == (8, 16, 16)
    summaries = results["methods"]
    # Independent: two encoders and two heads against Joint's one encoder and two heads; CTAN adds attention
    assert 1.9 < summaries["independent"]["params_ratio"] < 2.0
    assert summaries["ctan"]["params_ratio"] > 2.0
    assert summaries["ctan_mt_cool"]["params"] == summaries["ctan"]["params"]
    # MT-COOL on CTAN really ran its warm-up epoch, then cooperative steps that differ from plain CTAN
    steps = summaries["ctan_mt_cool"]["runs"][0]["steps_per_epoch"]
    assert summaries["ctan_mt_cool"]["runs"][0]["warmup_steps"] == steps == 16 // 8
    ctan_loss = summaries["ctan"]["runs"][0]["curves"]["train_loss"]
    assert summaries["ctan_mt_cool"]["runs"][0]["curves"]["train_loss"] != ctan_loss
    assert set(summaries["ctan"]["runs"][0]["final"]) == {metric.key for metric in SCENARIO.metrics}
    for key in ("covid_auroc", "severe_auroc"):  # each AUROC with its stratified bootstrap interval over the scans
        [interval] = summaries["joint"]["metrics"][key]["intervals"]
        assert interval["estimate"] == pytest.approx(summaries["joint"]["metrics"][key]["mean"]) and interval["n"] == 16
    assert results["samples"]["indices"] is None  # no pixel-level task: the first scans


def test_every_method_is_offered_by_default() -> None:
    from benchmarks._scenario import parse_args

    methods = parse_args(SCENARIO, ["--quick"]).methods
    assert methods == offered_methods(("mtan", "ctan"))
    assert {"mtan", "ctan", "mtan_mt_cool", "ctan_vanilla", "ctan_without_reg", "ctan_mt_cool"} <= set(methods)


def test_quick_run_reads_the_real_layout(tmp_path: Path) -> None:
    _write_stoic(tmp_path / "STOIC")
    argv = ["--quick", "--methods", "independent,ctan_mt_cool", "--data-dir", str(tmp_path / "STOIC")]
    results = main([*argv, "--out-dir", str(tmp_path / "out"), "--no-progress"])
    _check_outputs(results, tmp_path / "out", ("independent", "ctan_mt_cool"))
    assert results["data_source"] == str(tmp_path / "STOIC")
    run = results["methods"]["independent"]["runs"][0]
    # 12 scans, a quarter of each (covid, severe) group held out, all within the quick caps of 16 + 16
    assert sum(run["train_sizes"].values()) // 2 + sum(run["test_sizes"].values()) // 2 == len(_PATIENTS)
    assert run["test_sizes"]["covid"] == run["test_sizes"]["severe"] >= 3


def test_bad_options_are_rejected_with_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="--image-size must be a multiple of 4"):
        main(["--quick", "--image-size", "10", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--methods", "joint,sam"])
    assert "unknown method(s) ['sam']" in capsys.readouterr().err
    from benchmarks._scenario import cli

    assert cli(SCENARIO, ["--quick", "--data-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path)]) == 2
    assert "is not a directory; expected the layout" in capsys.readouterr().err
