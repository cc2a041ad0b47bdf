"""Tests for the REFUGE-style benchmark: synthetic generator, real-layout loader, metrics, CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks._fundus import (
    TASKS,
    disc_crop,
    load_refuge,
    mask_from_refuge,
    synthetic_fundus,
    synthetic_refuge,
)
from benchmarks._learners import label as method_label, offered_methods
from benchmarks.refuge import SCENARIO, evaluate, main

pytest.importorskip("segmentation_models_pytorch")
pytest.importorskip("torchmetrics")


# ---------------------------------------------------------------------------
# Synthetic generator


def _vertical_extent(mask: torch.Tensor) -> int:
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    return int(rows.max() - rows.min() + 1) if rows.numel() else 0


def test_synthetic_fundus_has_the_refuge_imbalance_and_nested_regions() -> None:
    images, masks, labels, cdr = synthetic_fundus(200, 64, seed=3)
    assert images.shape == (200, 3, 64, 64) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert int(labels.sum()) == 20  # exactly 1:9
    assert set(torch.unique(masks).tolist()) == {0, 1, 2}
    for mask in masks:
        assert bool((mask == 2).any()) and bool((mask == 1).any())  # every image has a cup inside a rim
    # the label follows the cup-to-disc ratio, with overlap (label noise)
    assert float(cdr[labels == 1].mean()) > float(cdr[labels == 0].mean()) + 0.15
    assert float(cdr[labels == 1].min()) < float(cdr[labels == 0].max())
    measured = torch.tensor([_vertical_extent(m == 2) / _vertical_extent(m >= 1) for m in masks])
    assert torch.corrcoef(torch.stack([measured, cdr]))[0, 1] > 0.9  # the masks draw the CDR they claim


def test_cup_is_brighter_than_the_rim_and_the_disc_than_the_background() -> None:
    images, masks, _, _ = synthetic_fundus(50, 64, seed=1)
    green = images[:, 1]
    assert float(green[masks == 2].mean()) > float(green[masks == 1].mean()) > float(green[masks == 0].mean())


def test_synthetic_data_is_a_function_of_the_seed() -> None:
    first, again, other = synthetic_refuge(8, 4, 32, seed=2), synthetic_refuge(8, 4, 32, seed=2), synthetic_refuge(8, 4, 32, seed=3)
    assert torch.equal(first.train_x, again.train_x) and torch.equal(first.test_y["disc_cup"], again.test_y["disc_cup"])
    assert not torch.equal(first.train_x, other.train_x)
    assert not torch.equal(first.train_x[:4], first.test_x)  # train and test are different draws


@pytest.mark.parametrize(("kwargs", "message"), [({"n": 0}, "n >= 1"), ({"positive_fraction": 1.5}, "positive_fraction")])
def test_synthetic_fundus_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"n": 4, "size": 32, **kwargs}
    with pytest.raises(ValueError, match=message):
        synthetic_fundus(**arguments)


# ---------------------------------------------------------------------------
# Real REFUGE2018 layout


def test_mask_values_follow_the_refuge_convention() -> None:
    values = torch.tensor([[0, 10, 128, 130], [255, 250, 60, 200]], dtype=torch.uint8)
    assert mask_from_refuge(values).tolist() == [[2, 2, 1, 1], [0, 0, 2, 0]]


def test_disc_crop_is_a_square_around_the_disc_clipped_to_the_image() -> None:
    mask = torch.zeros(100, 120, dtype=torch.int64)
    mask[40:50, 60:70] = 1
    assert disc_crop(mask) == (55, 35, 75, 55)  # twice the 10 px extent, centred on (65, 45)
    mask = torch.zeros(100, 120, dtype=torch.int64)
    mask[0:10, 0:10] = 1
    left, top, right, bottom = disc_crop(mask)
    assert (left, top) == (0, 0) and right - left == bottom - top == 20
    assert disc_crop(torch.zeros(30, 40, dtype=torch.int64)) == (0, 0, 40, 30)


def _write_refuge(root: Path, glaucoma: int = 3, normal: int = 7, size: tuple[int, int] = (48, 40)) -> dict[str, int]:
    """Tiny REFUGE2018-layout files; the cup of image i is (i + 2) pixels tall. Returns name -> label."""
    width, height = size
    labels: dict[str, int] = {}
    for folder, prefix, count, label in (("Glaucoma", "g", glaucoma, 1), ("Non-Glaucoma", "n", normal, 0)):
        image_dir = root / "Training400" / folder
        mask_dir = root / "Annotation-Training400" / "Disc_Cup_Masks" / folder
        image_dir.mkdir(parents=True)
        mask_dir.mkdir(parents=True)
        for i in range(count):
            name = f"{prefix}{i + 1:04d}"
            mask = np.full((height, width), 255, dtype=np.uint8)
            mask[10:30, 14:34] = 128
            mask[14 : 14 + 2 + i, 20:28] = 0
            pixels = np.zeros((height, width, 3), dtype=np.uint8)
            pixels[..., 0] = 200
            pixels[mask == 128] = (240, 200, 100)
            pixels[mask == 0] = (255, 250, 230)
            Image.fromarray(pixels).save(image_dir / f"{name}.jpg", quality=95)
            Image.fromarray(mask).save(mask_dir / f"{name}.bmp")
            labels[name] = label
    return labels


@pytest.mark.parametrize("crop", [False, True])
def test_refuge_loader_reads_the_real_layout(tmp_path: Path, crop: bool) -> None:
    _write_refuge(tmp_path)
    data = load_refuge(tmp_path, size=32, test_fraction=0.3, seed=0, crop=crop)
    assert data.source == str(tmp_path)
    assert data.train_x.shape[1:] == (3, 32, 32) and data.train_x.shape[0] + data.test_x.shape[0] == 10
    labels = torch.cat([data.train_y["glaucoma"], data.test_y["glaucoma"]])
    assert int(labels.sum()) == 3
    assert int(data.test_y["glaucoma"].sum()) >= 1 and int(data.train_y["glaucoma"].sum()) >= 1  # stratified
    masks = torch.cat([data.train_y["disc_cup"], data.test_y["disc_cup"]])
    assert set(torch.unique(masks).tolist()) == {0, 1, 2}
    x = torch.cat([data.train_x, data.test_x])
    # the image's brightest region is where the mask says cup
    assert float(x[:, 2][masks == 2].mean()) > float(x[:, 2][masks == 1].mean()) > float(x[:, 2][masks == 0].mean())
    disc_share = float((masks >= 1).float().mean())
    assert disc_share > 0.2 if crop else disc_share < 0.25  # the crop zooms in on the disc


def test_refuge_loader_split_is_a_function_of_the_seed(tmp_path: Path) -> None:
    _write_refuge(tmp_path, glaucoma=4, normal=8)
    a, b = load_refuge(tmp_path, 32, seed=1), load_refuge(tmp_path, 32, seed=2)
    assert torch.equal(a.train_x, load_refuge(tmp_path, 32, seed=1).train_x)
    assert not torch.equal(a.test_x, b.test_x)


def test_refuge_loader_names_what_is_missing_or_wrong(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Training400"):
        load_refuge(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no REFUGE images"):
        load_refuge(tmp_path)
    _write_refuge(tmp_path)
    (tmp_path / "Annotation-Training400" / "Disc_Cup_Masks" / "Glaucoma" / "g0002.bmp").unlink()
    with pytest.raises(FileNotFoundError, match=r"REFUGE mask for 'g0002' not found"):
        load_refuge(tmp_path)
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(
        tmp_path / "Annotation-Training400" / "Disc_Cup_Masks" / "Glaucoma" / "g0002.bmp"
    )
    with pytest.raises(ValueError, match=r"g0002.bmp is 10x10 but its image .*g0002.jpg is 48x40"):
        load_refuge(tmp_path)
    (tmp_path / "Training400" / "Glaucoma" / "g0003.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="g000[23]"):
        load_refuge(tmp_path)


# ---------------------------------------------------------------------------
# Metrics


def _one_hot_logits(classes: torch.Tensor, count: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(classes, count).movedim(-1, 1).float() * 10


def test_metrics_of_perfect_and_of_wrong_predictions() -> None:
    _, masks, labels, _ = synthetic_fundus(20, 32, seed=0)
    perfect = {"disc_cup": _one_hot_logits(masks, 3), "glaucoma": _one_hot_logits(labels, 2)}
    scores = evaluate(perfect, {"disc_cup": masks, "glaucoma": labels})
    assert scores == pytest.approx(dict.fromkeys(scores, 1.0))
    # predict "disc" (rim) everywhere on the disc, and the opposite label
    rim_only = torch.where(masks == 2, 1, masks)
    wrong = {"disc_cup": _one_hot_logits(rim_only, 3), "glaucoma": _one_hot_logits(1 - labels, 2)}
    scores = evaluate(wrong, {"disc_cup": masks, "glaucoma": labels})
    assert scores["dice_disc"] == pytest.approx(1.0) and scores["dice_cup"] == pytest.approx(0.0)
    assert scores["accuracy"] == pytest.approx(0.0) and scores["auroc"] == pytest.approx(0.0)
    assert scores["sensitivity"] == pytest.approx(0.0) and scores["specificity"] == pytest.approx(0.0)


def test_dice_is_per_image_and_counts_the_cup_in_the_disc() -> None:
    mask = torch.zeros(2, 8, 8, dtype=torch.int64)
    mask[:, 2:6, 2:6] = 1
    mask[:, 3:5, 3:5] = 2
    predicted = mask.clone()
    predicted[1, 3:5, 3:5] = 1  # second image: cup missed entirely, disc still right
    labels = torch.tensor([0, 1])
    scores = evaluate(
        {"disc_cup": _one_hot_logits(predicted, 3), "glaucoma": _one_hot_logits(labels, 2)},
        {"disc_cup": mask, "glaucoma": labels},
    )
    assert scores["dice_disc"] == pytest.approx(1.0)
    assert scores["dice_cup"] == pytest.approx(0.5)
    # an image without a cup, and none predicted, is a right answer (it scored 0 before 0.3)
    no_cup = torch.where(mask == 2, 1, mask)
    scores = evaluate(
        {"disc_cup": _one_hot_logits(no_cup, 3), "glaucoma": _one_hot_logits(labels, 2)},
        {"disc_cup": no_cup, "glaucoma": labels},
    )
    assert scores["dice_cup"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------
# Command line, end to end


def _check_outputs(results: dict[str, Any], out_dir: Path, methods: tuple[str, ...]) -> None:
    on_disk = json.loads((out_dir / "refuge.json").read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(results))
    assert list(on_disk["methods"]) == list(methods)
    assert on_disk["config"]["seeds"] == [0]
    keys = [metric.key for metric in SCENARIO.metrics]
    for method, summary in on_disk["methods"].items():
        ratio = summary["params_ratio"]
        assert (1.4 < ratio < 2.0) if method == "independent" else ratio == pytest.approx(1.0)
        assert set(summary["metrics"]) == set(keys)
        run = summary["runs"][0]
        assert run["curves"]["epoch"] == list(range(1, on_disk["config"]["epochs"] + 1))
        assert all(len(run["curves"]["test"][key]) == on_disk["config"]["epochs"] for key in keys)
        for key in ("dice_cup", "dice_disc", "accuracy", "sensitivity", "specificity"):
            assert 0.0 <= summary["metrics"][key]["mean"] <= 1.0
        assert f"| {method_label(method)} |" in on_disk["table"]
    assert "| method | params | Dice cup (%) | Dice disc (%) | Acc (%) | AUROC | Sen (%) | Spe (%) | Δm (%) |" in on_disk["table"]
    for name in ("refuge.png", "refuge_curves.png", "refuge_samples.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_trains_every_method_and_writes_json_and_figures(tmp_path: Path) -> None:
    results = main(["--quick", "--out-dir", str(tmp_path), "--no-progress"])
    _check_outputs(results, tmp_path, offered_methods(()))
    assert results["data_source"] == "synthetic" and results["tasks"] == list(TASKS)
    # MT-COOL really ran its warm-up then cooperative steps; the gradient methods are not Joint in disguise
    # quick: 20 training images in batches of 4 = 5 steps per epoch, warm-up one epoch
    assert results["config"]["train_size"] == 20 and results["config"]["batch_size"] == 4
    assert results["methods"]["mt_cool"]["runs"][0]["warmup_steps"] == 5
    joint = results["methods"]["joint"]["runs"][0]["curves"]["train_loss"]
    assert results["methods"]["mgda"]["runs"][0]["curves"]["train_loss"] != joint


def test_quick_run_reads_the_real_layout(tmp_path: Path) -> None:
    _write_refuge(tmp_path / "REFUGE", glaucoma=3, normal=9)
    argv = ["--quick", "--methods", "joint,mt_cool_clean", "--data-dir", str(tmp_path / "REFUGE"), "--batch-size", "4"]
    results = main([*argv, "--out-dir", str(tmp_path / "out"), "--no-progress"])
    _check_outputs(results, tmp_path / "out", ("joint", "mt_cool_clean"))
    assert results["data_source"] == str(tmp_path / "REFUGE")
    assert results["methods"]["joint"]["runs"][0]["train_sizes"] == {"disc_cup": 9, "glaucoma": 9}


def test_bad_options_are_rejected_with_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="--image-size must be a multiple of 16"):
        main(["--quick", "--image-size", "40", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--methods", "joint,sam"])
    assert "unknown method(s) ['sam']" in capsys.readouterr().err


def test_cosine_schedule_is_the_default_and_changes_training(tmp_path: Path) -> None:
    def run(*extra: str) -> dict[str, Any]:
        argv = ["--quick", "--methods", "joint,mt_cool", *extra, "--out-dir", str(tmp_path), "--no-progress"]
        return main(argv)

    cosine, constant = run(), run("--schedule", "constant")
    assert cosine["config"]["schedule"] == "cosine" and constant["config"]["schedule"] == "constant"
    for method in ("joint", "mt_cool"):
        first = cosine["methods"][method]["runs"][0]["curves"]["train_loss"]
        second = constant["methods"][method]["runs"][0]["curves"]["train_loss"]
        assert first != second  # the schedule reached every method's optimizer


def test_noise_bound_reaches_the_optimizer_and_leaves_the_clamp_at_bound() -> None:
    from benchmarks._learners import build_learner
    from benchmarks._runs import _training
    from benchmarks._scenario import parse_args
    from tests.test_benchmark_methods import _lenet_like_problem

    config = parse_args(SCENARIO, ["--quick", "--noise-bound", "0.001", "--bound", "0.04"])
    assert (config.noise_bound, config.bound) == (0.001, 0.04)
    learner = build_learner("mt_cool", _lenet_like_problem(), _training(config, seed=0, warmup_steps=0))
    assert (learner.optimizer.settings.noise_bound, learner.optimizer.settings.clamp_bound) == (0.001, 0.04)
    default = parse_args(SCENARIO, ["--quick"])
    learner = build_learner("mt_cool", _lenet_like_problem(), _training(default, seed=0, warmup_steps=0))
    assert learner.optimizer.settings.noise_bound == learner.optimizer.settings.clamp_bound == default.bound


def test_noise_options_reach_the_noisy_variants_and_spare_vanilla() -> None:
    from benchmarks._learners import COOPERATIVE_METHODS, build_learner
    from benchmarks._runs import _training
    from benchmarks._scenario import parse_args
    from tests.test_benchmark_methods import _lenet_like_problem

    config = parse_args(
        SCENARIO, ["--quick", "--noise-bound", "0.01", "--noise-scale", "relative", "--consistency-weight", "0.5"]
    )
    assert config.noise_scale == "relative"
    # vanilla has no noise, without_reg no consistency term: both still build
    for method in [m for m in COOPERATIVE_METHODS if m in offered_methods(())]:
        optimizer = build_learner(method, _lenet_like_problem(), _training(config, seed=0, warmup_steps=0)).optimizer
        noisy = method != "vanilla"
        assert (optimizer.settings.noise_bound, optimizer.settings.noise_scale) == ((0.01, "relative") if noisy else (None, "absolute"))
        assert optimizer.settings.consistency_weight == (0.5 if method.startswith("mt_cool") else 0)
    assert parse_args(SCENARIO, ["--quick"]).noise_scale == "absolute"



def test_the_paper_preset_sets_the_papers_optimizer_and_explicit_flags_override_it() -> None:
    from benchmarks import refuge
    from benchmarks._scenario import parse_args

    plain = parse_args(refuge.SCENARIO, ["--quick"])
    assert (plain.optimizer, plain.lr, plain.preset) == ("adam", 2e-3, None)
    paper = parse_args(refuge.SCENARIO, ["--quick", "--preset", "paper"])
    assert (paper.optimizer, paper.lr, paper.bound, paper.samples, paper.schedule, paper.momentum) == (
        "sgd", 0.1, 0.05, 1, "constant", 0.0)
    assert paper.preset == "paper" and paper.seeds == plain.seeds  # run sizes are not the preset's business
    mine = parse_args(refuge.SCENARIO, ["--quick", "--preset", "paper", "--lr", "0.05", "--samples", "2"])
    assert (mine.optimizer, mine.lr, mine.samples) == ("sgd", 0.05, 2)
