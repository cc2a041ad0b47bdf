"""Tests for the HRF-AV-style benchmark: vessel-tree generator, real-layout loader, metrics, CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks._vessels import IGNORE, TASKS, load_hrf_av, masks_from_av_colours, synthetic_hrf_av, synthetic_vessels
from benchmarks._learners import label as method_label
from benchmarks.hrf_av import SCENARIO, evaluate, main

pytest.importorskip("segmentation_models_pytorch")
pytest.importorskip("torchmetrics")


def test_synthetic_vessels_draw_artery_and_vein_trees() -> None:
    images, labels = synthetic_vessels(12, 64, seed=4)
    assert images.shape == (12, 3, 64, 64) and labels.shape == (12, 64, 64)
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    for label in labels:
        share = float((label > 0).float().mean())
        assert 0.03 < share < 0.35  # thin structures, not blobs or nothing
        assert bool((label == 1).any()) and bool((label == 2).any())
    red = images[:, 0]
    fov = images.sum(dim=1) > 0.05  # inside the field of view
    # veins are darker than arteries, both darker than the background
    vein, artery, background = (float(red[(labels == k) & fov].mean()) for k in (2, 1, 0))
    assert vein < artery < background
    vein_share, artery_share = float((labels == 2).float().mean()), float((labels == 1).float().mean())
    assert vein_share > artery_share  # veins are wider


def test_synthetic_vessels_are_a_function_of_the_seed() -> None:
    a, b, c = synthetic_hrf_av(3, 2, 32, seed=1), synthetic_hrf_av(3, 2, 32, seed=1), synthetic_hrf_av(3, 2, 32, seed=2)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y["artery_vein"], b.test_y["artery_vein"])
    assert not torch.equal(a.train_x, c.train_x)
    assert torch.equal(a.train_y["vessel"], (a.train_y["artery_vein"] > 0).long())


def test_av_colour_masks_follow_the_documented_convention() -> None:
    rgb = torch.tensor([[[255, 0, 0], [0, 0, 255], [0, 255, 0], [255, 255, 255], [0, 0, 0], [200, 30, 20]]],
                       dtype=torch.uint8)
    artery_vein, vessel = masks_from_av_colours(rgb)
    assert artery_vein.tolist() == [[1, 2, IGNORE, IGNORE, 0, 1]]
    assert vessel.tolist() == [[1, 1, 1, 1, 0, 1]]


def _write_hrf_av(root: Path, count: int = 5, vessel_folder: str | None = "vessel") -> None:
    """Tiny HRF-AV-layout files: a red artery column, a blue vein column, a green crossing pixel."""
    (root / "images").mkdir(parents=True)
    (root / "av").mkdir()
    if vessel_folder:
        (root / vessel_folder).mkdir()
    for i in range(count):
        av = np.zeros((40, 48, 3), dtype=np.uint8)
        av[:, 8 + i : 12 + i] = (255, 0, 0)
        av[:, 30:36] = (0, 0, 255)
        av[0:4, 30:36] = (0, 255, 0)
        image = np.full((40, 48, 3), (200, 90, 40), dtype=np.uint8)
        image[av[..., 0] > 0] = (170, 50, 30)
        image[av[..., 2] > 0] = (90, 20, 20)
        name = f"{i + 1:02d}_h"
        Image.fromarray(image).save(root / "images" / f"{name}.JPG", quality=95)
        Image.fromarray(av).save(root / "av" / f"{name}.png")
        if vessel_folder:
            Image.fromarray(((av.max(axis=2) > 0) * 255).astype(np.uint8)).save(root / vessel_folder / f"{name}.tif")


@pytest.mark.parametrize("vessel_folder", ["vessel", "manual1", None])
def test_hrf_av_loader_reads_the_layout(tmp_path: Path, vessel_folder: str | None) -> None:
    _write_hrf_av(tmp_path, vessel_folder=vessel_folder)
    data = load_hrf_av(tmp_path, size=32, test_fraction=0.4, seed=0)
    assert data.train_x.shape == (3, 3, 32, 32) and data.test_x.shape == (2, 3, 32, 32)
    av = torch.cat([data.train_y["artery_vein"], data.test_y["artery_vein"]])
    vessel = torch.cat([data.train_y["vessel"], data.test_y["vessel"]])
    assert set(torch.unique(av).tolist()) == {IGNORE, 0, 1, 2}
    assert torch.equal(vessel, (av != 0).long())  # crossings are vessel but no A/V label
    x = torch.cat([data.train_x, data.test_x])
    assert float(x[:, 0][av == 2].mean()) < float(x[:, 0][av == 1].mean()) < float(x[:, 0][av == 0].mean())


def test_hrf_av_loader_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="images"):
        load_hrf_av(tmp_path)
    _write_hrf_av(tmp_path)
    (tmp_path / "av" / "03_h.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"A/V mask for '03_h' not found"):
        load_hrf_av(tmp_path)


def test_metrics_of_perfect_and_swapped_predictions() -> None:
    _, labels = synthetic_vessels(3, 32, seed=0)
    vessel = (labels > 0).long()
    logits = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float() * 10
    vessel_logits = (vessel.float() * 20 - 10).unsqueeze(1)
    perfect = evaluate({"artery_vein": logits, "vessel": vessel_logits}, {"artery_vein": labels, "vessel": vessel})
    assert perfect == pytest.approx(dict.fromkeys(perfect, 1.0))
    swapped = logits[:, [0, 2, 1]]  # arteries called veins and the other way round
    scores = evaluate({"artery_vein": swapped, "vessel": -vessel_logits}, {"artery_vein": labels, "vessel": vessel})
    assert scores["av_acc"] == pytest.approx(0.0) and scores["av_f1"] == pytest.approx(0.0)
    assert scores["artery_f1"] == pytest.approx(0.0) and scores["vein_f1"] == pytest.approx(0.0)
    assert scores["vessel_f1"] == pytest.approx(0.0)
    assert scores["vessel_acc"] == pytest.approx(0.0)  # every pixel flipped


def test_ignored_pixels_do_not_count() -> None:
    labels = torch.tensor([[[1, 2, IGNORE, 0]]])
    logits = torch.nn.functional.one_hot(torch.tensor([[[1, 2, 1, 0]]]), 3).movedim(-1, 1).float()
    vessel = torch.tensor([[[1, 1, 1, 0]]])
    scores = evaluate({"artery_vein": logits, "vessel": vessel.unsqueeze(1).float() * 2 - 1},
                      {"artery_vein": labels, "vessel": vessel})
    assert scores["artery_acc"] == pytest.approx(1.0) and scores["av_acc"] == pytest.approx(1.0)


def test_quick_run_trains_every_method_and_writes_json_and_figures(tmp_path: Path) -> None:
    results = main(["--quick", "--out-dir", str(tmp_path), "--no-progress"])
    on_disk = json.loads((tmp_path / "hrf_av.json").read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(results))
    assert results["tasks"] == list(TASKS)
    keys = {metric.key for metric in SCENARIO.metrics}
    for method, summary in on_disk["methods"].items():
        assert set(summary["metrics"]) == keys
        ratio = summary["params_ratio"]
        assert (1.8 < ratio < 2.1) if method == "independent" else ratio == pytest.approx(1.0)
        assert all(0.0 <= summary["metrics"][key]["mean"] <= 1.0 for key in keys)
        assert f"| {method_label(method)} |" in on_disk["table"]
    assert "F1 A (%)" in on_disk["table"] and "F1 vessel (%)" in on_disk["table"]
    for name in ("hrf_av.png", "hrf_av_curves.png", "hrf_av_samples.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_reads_the_real_layout(tmp_path: Path) -> None:
    _write_hrf_av(tmp_path / "HRF", count=6)
    argv = ["--quick", "--methods", "independent,pcgrad,mt_cool", "--data-dir", str(tmp_path / "HRF")]
    results: dict[str, Any] = main([*argv, "--out-dir", str(tmp_path / "out"), "--no-progress", "--batch-size", "2"])
    assert list(results["methods"]) == ["independent", "pcgrad", "mt_cool"]
    assert results["methods"]["pcgrad"]["runs"][0]["train_sizes"] == {"artery_vein": 4, "vessel": 4}
