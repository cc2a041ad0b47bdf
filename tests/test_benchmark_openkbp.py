"""Tests for the OpenKBP-style benchmark: networks, loss, metrics by hand, loader, CLI end to end."""

from __future__ import annotations

import doctest
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import benchmarks.openkbp as openkbp
from benchmarks._dose import OARS, STRUCTURE_CLASSES, TASKS, synthetic_openkbp
from benchmarks._openkbp_files import VOLUME_SHAPE
from benchmarks._learners import label as method_label
from benchmarks._scenario import cli, parse_args
from benchmarks.openkbp import DOSE_SCALE, PTV_KEY, SCENARIO, WIDTHS, dose_loss, evaluate, main, problem
from tests.test_data_dose import _patient

pytest.importorskip("segmentation_models_pytorch")
pytest.importorskip("torchmetrics")

NAN = math.nan
CORD = OARS.index("SpinalCord") + 1
MANDIBLE = OARS.index("Mandible") + 1


def _logits(classes: Tensor) -> Tensor:
    return F.one_hot(classes, STRUCTURE_CLASSES).movedim(-1, 1).float() * 10


# ---------------------------------------------------------------------------
# Networks and loss


def test_every_network_reads_the_two_channels_on_the_same_backbone() -> None:
    built = problem()
    x = torch.randn(2, 2, 32, 32)
    networks: dict[str, Any] = {name: build() for name, build in built.networks.items()}
    networks["joint"] = built.multi_task()
    assert sorted(built.networks) == sorted(SCENARIO.networks) == ["ctan", "mtan"]
    for name, net in networks.items():
        outputs = net.eval().forward_all(x)
        assert {t: tuple(y.shape) for t, y in outputs.items()} == {
            "dose": (2, 1, 32, 32), "structures": (2, STRUCTURE_CLASSES, 32, 32)}, name
        first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        assert first.in_channels == 2, name  # CT and PTV map
    assert tuple(networks["joint"].encoder.out_channels) == WIDTHS
    for task in TASKS:
        single: Any = built.single_task(task)
        assert tuple(single.encoder.out_channels) == WIDTHS
        assert single.eval()(x).shape[1] == (1 if task == "dose" else STRUCTURE_CLASSES)
    with pytest.raises(ValueError, match="not one of"):
        built.single_task("ptv")


def test_dose_loss_is_the_masked_absolute_error_in_prescription_units() -> None:
    target = torch.rand(3, 8, 8) * 70
    target[:, :2] = NAN
    output = torch.rand(3, 1, 8, 8, requires_grad=True)
    loss = dose_loss(output, target)
    inside = torch.isfinite(target)
    expected = (DOSE_SCALE * output[:, 0] - target)[inside].abs().mean() / DOSE_SCALE
    assert torch.allclose(loss, expected)
    (gradient,) = torch.autograd.grad(loss, output)
    assert bool((gradient[:, 0][~inside] == 0).all()) and bool((gradient[:, 0][inside] != 0).all())


# ---------------------------------------------------------------------------
# Metrics


def test_evaluate_by_hand() -> None:
    # slice 0: PTV70 on pixels 0-1, the cord on pixels 2-3, pixel 3 outside the possible-dose mask
    # slice 1: no structure, flat 10 Gy
    reference = torch.tensor([[[70.0, 70.0, 20.0, NAN]], [[10.0, 10.0, 10.0, 10.0]]])
    ptv = torch.tensor([[[1.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[[0, 0, CORD, CORD]], [[0, 0, 0, 0]]])
    predicted_gy = torch.tensor([[[71.0, 71.0, 24.0, 50.0]], [[10.0, 10.0, 10.0, 10.0]]])
    predicted_labels = torch.tensor([[[CORD, 0, CORD, 0]], [[0, MANDIBLE, 0, 0]]])
    outputs = {"dose": (predicted_gy / DOSE_SCALE).unsqueeze(1), "structures": _logits(predicted_labels)}
    scores = evaluate(outputs, {"dose": reference, "structures": labels, PTV_KEY: ptv})
    # dose score: slice 0 errors 1, 1, 4 inside the mask -> 2; slice 1 -> 0; mean 1
    assert scores["dose_score"] == pytest.approx(1.0)
    # DVH: PTV70 D99, D95, D1 each off by 1; the cord (cut to the mask: pixel 2) D2 and mean off by 4
    assert scores["dvh_score"] == pytest.approx((3 * 1 + 2 * 4) / 5)
    # Dice: slice 0 cord 2 * 1 / (2 + 2) = 0.5, six absent OARs 1; slice 1 mandible predicted, absent: 0
    assert scores["oar_dice"] == pytest.approx(((0.5 + 6) / 7 + 6 / 7) / 2)


def test_evaluate_of_the_truth_and_of_an_all_background_guess() -> None:
    data = synthetic_openkbp(1, 12, 32, seed=1)
    targets = {**data.test_y, PTV_KEY: data.test_x[:, 1]}
    truth = {"dose": (data.test_y["dose"].nan_to_num(0.0) / DOSE_SCALE).unsqueeze(1),
             "structures": _logits(data.test_y["structures"])}
    assert evaluate(truth, targets) == pytest.approx({"dose_score": 0.0, "dvh_score": 0.0, "oar_dice": 1.0}, abs=1e-4)
    background = {"dose": torch.zeros(12, 1, 32, 32), "structures": _logits(torch.zeros(12, 32, 32, dtype=torch.long))}
    scores = evaluate(background, targets)
    labels = data.test_y["structures"]
    absent = [not bool((labels[i] == k).any()) for i in range(12) for k in range(1, len(OARS) + 1)]
    assert scores["oar_dice"] == pytest.approx(sum(absent) / len(absent))  # found what is absent, nothing else
    inside = torch.isfinite(data.test_y["dose"])
    per_slice = [float(data.test_y["dose"][i][inside[i]].mean()) for i in range(12)]
    assert scores["dose_score"] == pytest.approx(sum(per_slice) / 12, rel=1e-5)
    assert scores["dvh_score"] > 20.0


def test_evaluate_needs_the_ptv_entry() -> None:
    data = synthetic_openkbp(1, 2, 32, seed=0)
    outputs = {"dose": torch.zeros(2, 1, 32, 32), "structures": torch.zeros(2, STRUCTURE_CLASSES, 32, 32)}
    with pytest.raises(ValueError, match=r"targets has no 'ptv' entry .*every test_y entry"):
        evaluate(outputs, data.test_y)


def test_load_adds_the_ptv_channel_to_the_test_targets_only() -> None:
    config = parse_args(SCENARIO, ["--quick"])
    data = openkbp._load(config, 3)
    plain = synthetic_openkbp(config.train_size or 0, config.test_size or 0, config.side, seed=3)
    assert sorted(data.train_y) == sorted(TASKS) and sorted(data.test_y) == sorted([*TASKS, PTV_KEY])
    assert torch.equal(data.test_y[PTV_KEY], plain.test_x[:, 1])
    assert torch.equal(data.train_x, plain.train_x)
    assert all(torch.equal(data.test_y[t].nan_to_num(-1), plain.test_y[t].nan_to_num(-1)) for t in TASKS)


def test_draw_colours_dose_and_structures() -> None:
    dose = torch.tensor([[0.0, 72.0], [NAN, 36.0]])
    drawn = openkbp._draw("dose", dose)
    assert drawn.shape == (2, 2, 3) and drawn.dtype == np.float32
    assert float(drawn.min()) >= 0.0 and float(drawn.max()) <= 1.0
    assert np.all(drawn[1, 0] == 0.0) and drawn[0, 1].sum() > drawn[1, 1].sum() > drawn[0, 0].sum()
    np.testing.assert_allclose(openkbp._draw("dose", (dose / DOSE_SCALE).nan_to_num(0.0)[None])[0], drawn[0])
    labels = torch.arange(STRUCTURE_CLASSES).view(2, 4)
    from_logits = openkbp._draw("structures", _logits(labels[None])[0])
    np.testing.assert_array_equal(openkbp._draw("structures", labels), from_logits)
    assert len({tuple(c) for c in openkbp._draw("structures", labels).reshape(-1, 3).tolist()}) == STRUCTURE_CLASSES


@pytest.mark.parametrize("module", [openkbp])
def test_documented_examples_run(module: object) -> None:
    failures, attempted = doctest.testmod(module)  # type: ignore[arg-type]
    assert attempted >= 2 and failures == 0


# ---------------------------------------------------------------------------
# Command line, end to end


def _check_outputs(results: dict[str, Any], out_dir: Path, methods: tuple[str, ...]) -> None:
    on_disk = json.loads((out_dir / "openkbp.json").read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(results))
    assert list(on_disk["methods"]) == list(methods) and on_disk["tasks"] == list(TASKS)
    keys = [metric.key for metric in SCENARIO.metrics]
    assert on_disk["delta_m"]["metrics"] == keys  # every metric finite, so every one enters Δm
    for method, summary in on_disk["methods"].items():
        assert set(summary["metrics"]) == set(keys)
        run = summary["runs"][0]
        assert set(run["curves"]["train_loss"]) == set(TASKS)  # PTV_KEY is no task: neither trained nor plotted
        assert all(len(run["curves"]["test"][key]) == on_disk["config"]["epochs"] for key in keys)
        means = {key: summary["metrics"][key]["mean"] for key in keys}
        assert 0.0 < means["dose_score"] < 75.0 and 0.0 < means["dvh_score"] < 75.0
        assert 0.0 <= means["oar_dice"] <= 1.0
        # Δm by hand: the dose and DVH scores are errors (an increase counts against the method)
        baseline = {key: on_disk["methods"]["independent"]["metrics"][key]["mean"] for key in keys}
        signs = {"dose_score": -1.0, "dvh_score": -1.0, "oar_dice": 1.0}
        expected = 100 / 3 * sum(signs[k] * (means[k] - baseline[k]) / abs(baseline[k]) for k in keys)
        assert summary["delta_m"] == pytest.approx(expected, abs=1e-9)
        assert f"| {method_label(method)} |" in on_disk["table"]
    assert "| method | params | Dose score (Gy) | DVH score (Gy) | OAR Dice (%) | Δm (%) |" in on_disk["table"]
    for name in ("openkbp.png", "openkbp_curves.png", "openkbp_samples.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_trains_the_architectures_and_writes_json_and_figures(tmp_path: Path) -> None:
    methods = ("independent", "joint", "ctan", "ctan_mt_cool")
    results = main(["--quick", "--methods", ",".join(methods), "--out-dir", str(tmp_path), "--no-progress"])
    _check_outputs(results, tmp_path, methods)
    assert results["data_source"] == "synthetic"
    params = {m: results["methods"][m]["params"] for m in methods}
    assert params["ctan"] == params["ctan_mt_cool"] > params["independent"] > params["joint"]
    assert results["methods"]["ctan_mt_cool"]["runs"][0]["warmup_steps"] == 4  # 16 slices, batch 4, 1 epoch
    ctan, cooperative = (results["methods"][m]["runs"][0]["curves"]["train_loss"] for m in ("ctan", "ctan_mt_cool"))
    assert ctan["dose"][1] != cooperative["dose"][1]  # the same network, trained by MT-COOL after the warm-up
    assert any("on these test sets" in note for note in results["notes"])


def test_quick_run_reads_the_real_layout(tmp_path: Path) -> None:
    root = tmp_path / "provided-data"
    for folder, number in (("train-pats", 1), ("train-pats", 2), ("validation-pats", 3), ("test-pats", 4)):
        _patient(root / folder / f"pt_{number}", number, VOLUME_SHAPE)
    argv = ["--quick", "--methods", "independent,mtan", "--data-dir", str(root), "--out-dir", str(tmp_path / "out")]
    results = main([*argv, "--no-progress"])
    _check_outputs(results, tmp_path / "out", ("independent", "mtan"))
    assert results["data_source"] == str(root)
    run = results["methods"]["mtan"]["runs"][0]
    # split by patient: 3 train patients' 7 PTV slices each (21) capped at --quick's 16, the fourth's 7 for testing
    assert run["train_sizes"] == {"dose": 16, "structures": 16}
    assert run["test_sizes"] == {"dose": 7, "structures": 7}
    assert not any("on these test sets" in note for note in results["notes"])


def test_bad_options_are_rejected_with_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="--image-size must be a multiple of 8"):
        main(["--quick", "--image-size", "36", "--out-dir", str(tmp_path)])
    assert cli(SCENARIO, ["--quick", "--image-size", "24", "--out-dir", str(tmp_path)]) == 2
    assert "size >= 32" in capsys.readouterr().err  # the phantom's smallest organs need 32 pixels
    with pytest.raises(SystemExit):
        main(["--methods", "joint,sam"])
    assert "unknown method(s) ['sam']" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        main(["--quick", "--data-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path)])


def test_defaults_offer_every_method_of_both_networks() -> None:
    config = parse_args(SCENARIO, [])
    assert len(config.methods) == 16 and {"ctan_mt_cool", "mtan_mt_cool", "mtan", "ctan"} <= set(config.methods)
    assert (len(config.seeds), config.epochs, config.image_size, config.lr) == (2, 9, 32, 5e-3)
