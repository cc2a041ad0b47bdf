"""Tests for the HAM10000-style benchmark: metrics, class weights, networks, CLI end to end (synthetic and real layout)."""

from __future__ import annotations

import doctest
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import benchmarks.ham10000 as ham
from benchmarks._learners import label as method_label, offered_methods
from benchmarks._learners._joint import encoder_of
from benchmarks._scenario import cli, parse_args
from benchmarks._skin import DIAGNOSES, TASKS, synthetic_ham10000
from benchmarks.ham10000 import SCENARIO, WIDTHS, class_weights, evaluate, main, problem
from tests.test_data_skin import _IMAGES, _write_ham

pytest.importorskip("torchmetrics")
pytest.importorskip("segmentation_models_pytorch")  # the soft Dice loss of benchmarks._unet.dice_ce


def test_documented_examples_run() -> None:
    result = doctest.testmod(ham, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 2 and result.failed == 0


# ---------------------------------------------------------------------------
# Metrics


def _logits(rows: list[dict[int, float]]) -> torch.Tensor:
    """``[N, 7]`` logits: -10 everywhere but the given classes."""
    logits = torch.full((len(rows), len(DIAGNOSES)), -10.0)
    for i, row in enumerate(rows):
        for c, value in row.items():
            logits[i, c] = value
    return logits


def test_evaluate_matches_a_hand_computed_case() -> None:
    nv, akiec = DIAGNOSES.index("nv"), DIAGNOSES.index("akiec")
    mask = torch.zeros(4, 4, 4, dtype=torch.int64)
    mask[0, 0, :] = 1  # 4 lesion pixels
    mask[2:, 1:3, 1:3] = 1
    predicted = mask.clone()
    predicted[0, 0, 2:] = 0  # image 0: 2 of its 4 pixels found ...
    predicted[0, 3, :2] = 1  # ... and 2 false positives: Dice 2*2/(4+4) = 1/2, IoU 2/6 = 1/3
    # image 1: both empty (1, 1); images 2, 3: perfect (1, 1)
    lesion = predicted.float().unsqueeze(1) * 20 - 10
    labels = torch.tensor([nv, nv, nv, akiec])
    # argmax nv, nv, akiec, akiec: accuracy 3/4, recall nv 2/3, akiec 1 -> balanced (2/3 + 1) / 2 = 5/6
    # p(nv) ranks the negative (image 3) above the positive image 2: AUROC nv 2/3; p(akiec) ranks the
    # positive (image 3) below image 2 only: AUROC akiec 2/3; macro over the two present classes: 2/3
    diagnosis = _logits([{nv: 2, akiec: 0}, {nv: 1, akiec: 0}, {nv: 0, akiec: 2}, {nv: 0, akiec: 1}])
    scores = evaluate({"lesion": lesion, "diagnosis": diagnosis}, {"lesion": mask, "diagnosis": labels})
    assert scores == pytest.approx(
        {"dice": (0.5 + 3) / 4, "iou": (1 / 3 + 3) / 4, "accuracy": 0.75, "balanced_accuracy": 5 / 6, "auroc": 2 / 3}
    )


def test_balanced_accuracy_and_auroc_agree_with_scikit_learn_when_every_class_is_present() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    from torchmetrics.functional.classification import multiclass_auroc, multiclass_recall

    generator = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.arange(7), torch.randint(0, 7, (53,), generator=generator)])
    logits = torch.randn(60, 7, generator=generator) + 2 * F.one_hot(labels, 7)  # informative, not perfect
    masks = torch.randint(0, 2, (60, 8, 8), generator=generator)
    scores = evaluate({"lesion": torch.randn(60, 1, 8, 8, generator=generator), "diagnosis": logits},
                      {"lesion": masks, "diagnosis": labels})
    probability = logits.softmax(1)
    assert scores["accuracy"] == pytest.approx(metrics.accuracy_score(labels, logits.argmax(1)))
    assert scores["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy_score(labels, logits.argmax(1)))
    assert scores["auroc"] == pytest.approx(metrics.roc_auc_score(labels, probability, multi_class="ovr"), abs=1e-5)
    # with every class present the rule is torchmetrics' macro average
    macro = multiclass_recall(probability, labels, num_classes=7, average="macro")
    assert scores["balanced_accuracy"] == pytest.approx(float(macro))
    assert scores["auroc"] == pytest.approx(float(multiclass_auroc(probability, labels, num_classes=7)), abs=1e-6)
    assert 0.3 < scores["balanced_accuracy"] < 1.0 and 0.0 <= scores["dice"] <= 1.0


def test_absent_classes_are_left_out_of_the_class_averages() -> None:
    labels = torch.tensor([5, 5, 0, 0])
    logits = _logits([{5: 1}, {2: 1}, {0: 1}, {0: 1}])  # one nv predicted as bkl, a class absent from the test set
    masks = torch.ones(4, 4, 4, dtype=torch.int64)
    scores = evaluate({"lesion": torch.ones(4, 1, 4, 4), "diagnosis": logits}, {"lesion": masks, "diagnosis": labels})
    assert scores["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)  # torchmetrics' macro: 1.5 / 7
    only_nv = evaluate({"lesion": torch.ones(2, 1, 4, 4), "diagnosis": logits[:2]},
                       {"lesion": masks[:2], "diagnosis": labels[:2]})
    assert math.isnan(only_nv["auroc"]) and only_nv["balanced_accuracy"] == pytest.approx(0.5)


def test_evaluate_rejects_outputs_of_the_wrong_shape() -> None:
    masks, labels = torch.ones(2, 4, 4, dtype=torch.int64), torch.tensor([0, 5])
    with pytest.raises(ValueError, match=r"outputs\['lesion'\] must be logits \[N, 1, H, W\]"):
        evaluate({"lesion": torch.ones(2, 2, 4, 4), "diagnosis": _logits([{}, {}])}, {"lesion": masks, "diagnosis": labels})
    with pytest.raises(ValueError, match=r"outputs\['diagnosis'\] must be logits \[N, 7\]"):
        evaluate({"lesion": torch.ones(2, 1, 4, 4), "diagnosis": torch.zeros(2, 3)}, {"lesion": masks, "diagnosis": labels})


# ---------------------------------------------------------------------------
# Class weights, losses, networks


def test_class_weights_are_scikit_learns_balanced_weights_with_zero_for_absent_classes() -> None:
    utils = pytest.importorskip("sklearn.utils.class_weight")
    labels = torch.tensor([5] * 13 + [4] * 3 + [2] * 3 + [1] + [0])  # no df (3), no vasc (6)
    weights = class_weights(labels)
    present = sorted(set(labels.tolist()))
    expected = utils.compute_class_weight("balanced", classes=torch.tensor(present).numpy(), y=labels.numpy())
    assert weights[present].tolist() == pytest.approx(expected.tolist())
    assert weights[[3, 6]].tolist() == [0.0, 0.0]
    assert float((weights[labels]).mean()) == pytest.approx(1.0)  # mean weight over the training labels


@pytest.mark.parametrize(
    ("labels", "message"),
    [(torch.tensor([0, 7]), r"0\.\.6"), (torch.tensor([-1]), r"0\.\.6"), (torch.zeros(0, dtype=torch.int64), "non-empty"),
     (torch.tensor([[0, 1]]), r"\[N\] int64"), (torch.tensor([0.0, 1.0]), "int64")],
)
def test_class_weights_reject_bad_labels(labels: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        class_weights(labels)


def test_problem_weights_the_diagnosis_loss_by_the_seeds_training_split_and_shares_one_backbone() -> None:
    data = synthetic_ham10000(40, 8, 32, seed=1)
    built = problem(None, data)
    assert built.tasks == TASKS and sorted(built.networks) == ["ctan", "mtan"]
    logits = torch.randn(8, 7)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 5])
    weights = class_weights(data.train_y["diagnosis"])
    assert float(built.losses["diagnosis"](logits, labels)) == pytest.approx(
        float(F.cross_entropy(logits, labels, weight=weights))
    )
    assert float(built.losses["diagnosis"](logits, labels)) != pytest.approx(float(F.cross_entropy(logits, labels)))
    # every method's network reads the same encoder widths
    assert encoder_of(built.multi_task()).out_channels == WIDTHS
    assert all(encoder_of(built.single_task(t)).out_channels == WIDTHS for t in TASKS)
    assert getattr(built.networks["ctan"](), "channels") == WIDTHS
    mtan = built.networks["mtan"]()
    x = torch.randn(2, 3, 32, 32)
    assert mtan(x, "lesion").shape == (2, 1, 32, 32) and mtan(x, "diagnosis").shape == (2, 7)
    with pytest.raises(ValueError, match="not one of"):
        built.single_task("age")


# ---------------------------------------------------------------------------
# Command line, end to end


def _check_outputs(results: dict[str, Any], out_dir: Path, methods: tuple[str, ...]) -> None:
    on_disk = json.loads((out_dir / "ham10000.json").read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(results))
    assert list(on_disk["methods"]) == list(methods) and on_disk["tasks"] == list(TASKS)
    assert on_disk["delta_m"]["baseline"] == "independent"
    keys = [metric.key for metric in SCENARIO.metrics]
    for method, summary in on_disk["methods"].items():
        assert set(summary["metrics"]) == set(keys)
        run = summary["runs"][0]
        assert run["curves"]["epoch"] == list(range(1, on_disk["config"]["epochs"] + 1))
        assert all(len(run["curves"]["test"][key]) == on_disk["config"]["epochs"] for key in keys)
        for key in ("dice", "iou", "accuracy", "balanced_accuracy"):
            assert 0.0 <= summary["metrics"][key]["mean"] <= 1.0
        assert summary["metrics"]["iou"]["mean"] <= summary["metrics"]["dice"]["mean"] + 1e-6
        assert f"| {method_label(method)} |" in on_disk["table"]
    assert "| method | params | Dice (%) | IoU (%) | Acc (%) | BAcc (%) | AUROC | Δm (%) |" in on_disk["table"]
    for name in ("ham10000.png", "ham10000_curves.png", "ham10000_samples.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_trains_stl_hps_and_ctan_with_mt_cool_and_reports_delta_m(tmp_path: Path) -> None:
    methods = ("independent", "joint", "ctan", "ctan_mt_cool")
    results = main(["--quick", "--methods", ",".join(methods), "--out-dir", str(tmp_path), "--no-progress"])
    _check_outputs(results, tmp_path, methods)
    assert results["data_source"] == "synthetic"
    summaries = results["methods"]
    assert summaries["independent"]["delta_m"] == 0.0
    assert all(math.isfinite(summaries[m]["delta_m"]) for m in methods)
    # CTAN has one stream per task; MT-COOL on it is the same network, trained after one warm-up epoch
    assert summaries["ctan"]["params"] == summaries["ctan_mt_cool"]["params"] > summaries["joint"]["params"]
    steps = summaries["ctan_mt_cool"]["runs"][0]["steps_per_epoch"]
    assert summaries["ctan_mt_cool"]["runs"][0]["warmup_steps"] == steps == 3  # 24 images in batches of 8
    ctan, cooperative = (summaries[m]["runs"][0]["curves"]["train_loss"] for m in ("ctan", "ctan_mt_cool"))
    # the same initial network, in warm-up trained jointly (at noisy weights) ...
    assert ctan["lesion"][0] == pytest.approx(cooperative["lesion"][0], rel=0.1)
    assert ctan["lesion"][1] != cooperative["lesion"][1]  # ... then a different update rule
    assert any("diagnosis weights" in note for note in results["notes"])
    # the macro AUROC carries its bootstrap interval over the test images; the samples sit at STL's Dice quartiles
    for method in methods:
        [interval] = summaries[method]["metrics"]["auroc"]["intervals"]
        assert interval["estimate"] == pytest.approx(summaries[method]["metrics"]["auroc"]["mean"]) and interval["n"] == 24
    assert len(results["samples"]["indices"]) == 3 and "AUROC, per seed [95 % CI]" in results["interval_table"]


def test_default_methods_are_every_method_offered_with_mtan_and_ctan() -> None:
    config = parse_args(SCENARIO, [])
    assert config.methods == offered_methods(("mtan", "ctan"))
    assert {"ctan_mt_cool", "mtan_mt_cool", "mt_cool_clean", "cagrad"} <= set(config.methods)
    assert (config.train_size, config.test_size, config.image_size, config.epochs) == (320, 160, 32, 4)


def test_quick_run_reads_the_real_layout(tmp_path: Path) -> None:
    _write_ham(tmp_path / "HAM10000")
    argv = ["--quick", "--methods", "independent,mtan", "--data-dir", str(tmp_path / "HAM10000"),
            "--test-fraction", "0.3", "--batch-size", "4"]
    results = main([*argv, "--out-dir", str(tmp_path / "out"), "--no-progress"])
    _check_outputs(results, tmp_path / "out", ("independent", "mtan"))
    assert results["data_source"] == str(tmp_path / "HAM10000")
    sizes = results["methods"]["mtan"]["runs"][0]
    assert sizes["train_sizes"]["lesion"] + sizes["test_sizes"]["lesion"] == len(_IMAGES)
    assert not any("Synthetic data" in note for note in results["notes"])


def test_bad_options_are_rejected_with_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="--image-size must be a multiple of 8"):
        main(["--quick", "--image-size", "36", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--methods", "joint,sam"])
    assert "unknown method(s) ['sam']" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="HAM10000_metadata.csv"):
        main(["--quick", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "out")])
    assert ham.SCENARIO.image_multiple == 8
    status = cli(SCENARIO, ["--quick", "--test-fraction", "1.5", "--out-dir", str(tmp_path)])
    assert status == 2 and "--test-fraction must be in (0, 1)" in capsys.readouterr().err
