"""Tests for the even/odd digit benchmark: data loaders, LeNet models and the CLI end to end."""

from __future__ import annotations

import gzip
import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from sklearn.datasets import load_digits  # type: ignore[import-untyped]

from benchmarks._data import MNIST_FILES, TASK_DIGITS, load_digits_even_odd, load_mnist_even_odd, read_idx
from benchmarks._learners import count_parameters, label
from benchmarks._models import LeNetMultiTask, LeNetSingle
from benchmarks.even_odd import METHODS, main, parse_args

TASKS = [name for name, _ in TASK_DIGITS]


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same global torch RNG state."""
    torch.manual_seed(0)


# ---------------------------------------------------------------------------
# Digits loader


def _reference_examples(digits: tuple[int, ...]) -> Counter[tuple[bytes, int]]:
    """Multiset of (image bytes, relabelled class) of one task, straight from scikit-learn."""
    bunch = load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    labels = np.asarray(bunch.target)
    return Counter((images[i].tobytes(), int(labels[i]) // 2) for i in np.flatnonzero(np.isin(labels, digits)))


def _examples(x: torch.Tensor, y: torch.Tensor) -> Counter[tuple[bytes, int]]:
    """Multiset of (image bytes, class) of one split."""
    return Counter((x[i].numpy().tobytes(), int(y[i])) for i in range(x.shape[0]))


@pytest.mark.parametrize("seed", [0, 3])
def test_digits_split_is_a_relabelled_partition_of_each_task(seed: int) -> None:
    data = load_digits_even_odd(seed)
    assert list(data) == TASKS
    for name, digits in TASK_DIGITS:
        task = data[name]
        train, test = _examples(task.train_x, task.train_y), _examples(task.test_x, task.test_y)
        # train + test is exactly the task's images with digit d relabelled d // 2: nothing lost,
        # nothing duplicated across the splits, no digit of the other task, labels 0..4.
        assert train + test == _reference_examples(digits)
        assert set(task.train_y.tolist()) == set(range(5))
        assert task.train_x.shape[1:] == (1, 8, 8) and task.train_x.dtype == torch.float32
        assert task.train_y.dtype == torch.int64
        assert 0.0 <= float(task.train_x.min()) and float(task.train_x.max()) <= 1.0


@pytest.mark.parametrize("test_fraction", [0.25, 0.4])
def test_digits_split_is_stratified(test_fraction: float) -> None:
    data = load_digits_even_odd(1, test_fraction=test_fraction)
    for task in data.values():
        train_counts = torch.bincount(task.train_y, minlength=5)
        test_counts = torch.bincount(task.test_y, minlength=5)
        expected = (train_counts + test_counts).double() * test_fraction
        assert torch.all((test_counts.double() - expected).abs() <= 1.0), (test_counts, expected)


def test_digits_split_is_a_function_of_the_seed() -> None:
    first, again, other = load_digits_even_odd(5), load_digits_even_odd(5), load_digits_even_odd(6)
    assert torch.equal(first["odd"].train_x, again["odd"].train_x)
    assert torch.equal(first["odd"].test_y, again["odd"].test_y)
    assert not torch.equal(first["odd"].train_x, other["odd"].train_x)


@pytest.mark.parametrize(("kwargs", "message"), [({"test_fraction": 1.0}, "test_fraction"), ({"seed": -1}, "seed")])
def test_digits_loader_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        load_digits_even_odd(**arguments)


# ---------------------------------------------------------------------------
# MNIST IDX loader


def _idx_bytes(array: npt.NDArray[np.uint8], magic: int | None = None) -> bytes:
    """Serialise ``array`` as an unsigned-byte IDX file (optionally with a wrong magic number)."""
    header = struct.pack(">I", (0x08 << 8 | array.ndim) if magic is None else magic)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write(path: Path, payload: bytes, gz: bool) -> Path:
    """Write ``payload`` to ``path`` (gzipped, with a ``.gz`` suffix, when ``gz``)."""
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def _fake_split(count: int, size: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """``count`` images whose every pixel encodes its digit (``20 * digit + 5``), labels cycling 0..9."""
    labels = (np.arange(count) % 10).astype(np.uint8)
    images = np.broadcast_to((20 * labels + 5)[:, None, None], (count, size, size)).astype(np.uint8)
    return images, labels


def _write_fake_mnist(folder: Path, gz: bool, train: int = 100, test: int = 40, size: int = 28) -> None:
    """Write four tiny MNIST-format files into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = _fake_split(train, size)
    test_images, test_labels = _fake_split(test, size)
    for name, array in zip(MNIST_FILES, (train_images, train_labels, test_images, test_labels), strict=True):
        _write(folder / name, _idx_bytes(array), gz)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_loader_reads_idx_files(tmp_path: Path, gz: bool) -> None:
    _write_fake_mnist(tmp_path, gz=gz)
    data = load_mnist_even_odd(tmp_path)
    assert list(data) == TASKS
    for name, digits in TASK_DIGITS:
        task = data[name]
        assert task.train_x.shape == (50, 1, 28, 28) and task.test_x.shape == (20, 1, 28, 28)
        assert task.train_x.dtype == torch.float32
        for x, y in ((task.train_x, task.train_y), (task.test_x, task.test_y)):
            digit = torch.round(x[:, 0, 0, 0] * 255 - 5).long() // 20  # decode the pixel encoding
            assert set(digit.tolist()) == set(digits)
            assert torch.equal(y, digit // 2)
            assert torch.all(x == x[:, :, :1, :1])  # whole images, not just one pixel, were read


def test_read_idx_round_trips_an_array(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = _write(tmp_path / "a-idx3-ubyte", _idx_bytes(array), gz=True)
    np.testing.assert_array_equal(read_idx(path, ndim=3), array)


def test_mnist_loader_finds_torchvision_layout(tmp_path: Path) -> None:
    _write_fake_mnist(tmp_path / "MNIST" / "raw", gz=True)
    assert load_mnist_even_odd(tmp_path)["odd"].train_y.shape == (50,)


def test_mnist_loader_rejects_bad_magic_number(tmp_path: Path) -> None:
    _write_fake_mnist(tmp_path, gz=False)
    images, _ = _fake_split(10, 28)
    _write(tmp_path / MNIST_FILES[0], _idx_bytes(images, magic=0x00000801), gz=False)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: bad magic number 0x00000801, expected 0x00000803"):
        load_mnist_even_odd(tmp_path)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_loader_rejects_truncated_file(tmp_path: Path, gz: bool) -> None:
    _write_fake_mnist(tmp_path, gz=gz)
    images, _ = _fake_split(40, 28)
    _write(tmp_path / MNIST_FILES[2], _idx_bytes(images)[:-100], gz=gz)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.*truncated"):
        load_mnist_even_odd(tmp_path)


def test_mnist_loader_rejects_truncated_header(tmp_path: Path) -> None:
    _write_fake_mnist(tmp_path, gz=False)
    (tmp_path / MNIST_FILES[1]).write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.*truncated"):
        load_mnist_even_odd(tmp_path)


def test_mnist_loader_rejects_corrupt_gzip(tmp_path: Path) -> None:
    _write_fake_mnist(tmp_path, gz=True)
    path = tmp_path / f"{MNIST_FILES[3]}.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.gz: not a valid gzip file"):
        load_mnist_even_odd(tmp_path)


def test_mnist_loader_rejects_mismatched_counts(tmp_path: Path) -> None:
    _write_fake_mnist(tmp_path, gz=False)
    _, labels = _fake_split(99, 28)
    _write(tmp_path / MNIST_FILES[1], _idx_bytes(labels), gz=False)
    with pytest.raises(ValueError, match=r"100 images but .*train-labels-idx1-ubyte holds 99 labels"):
        load_mnist_even_odd(tmp_path)


def test_mnist_loader_names_missing_file(tmp_path: Path) -> None:
    _write_fake_mnist(tmp_path, gz=False)
    (tmp_path / MNIST_FILES[2]).unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte.*not found"):
        load_mnist_even_odd(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_mnist_even_odd(tmp_path / "nowhere")


# ---------------------------------------------------------------------------
# Models


@pytest.mark.parametrize("size", [8, 28])
def test_lenet_models_produce_logits_per_task(size: int) -> None:
    model = LeNetMultiTask({"even": 5, "odd": 3}, input_size=size)
    x = torch.rand(4, 1, size, size)
    assert model(x, "even").shape == (4, 5) and model(x, "odd").shape == (4, 3)
    assert model.heads["odd"].out_features == 3
    assert LeNetSingle(5, input_size=size)(x).shape == (4, 5)
    with pytest.raises(ValueError, match="task='both'"):
        model(x, "both")
    with pytest.raises(ValueError, match=r"x must have shape \[N, 1"):
        model(torch.rand(4, 1, size + 1, size), "odd")


def test_lenet_on_28x28_is_the_classic_mnist_lenet() -> None:
    model = LeNetMultiTask({"even": 5, "odd": 5}, input_size=28)
    linear = [m for m in model.encoder if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(320, 50)]


def test_independent_has_about_twice_the_parameters_of_joint() -> None:
    joint = count_parameters(LeNetMultiTask({"even": 5, "odd": 5}, input_size=8))
    independent = 2 * count_parameters(LeNetSingle(5, input_size=8))
    assert 1.8 < independent / joint < 2.0


def test_channel_split_preserves_the_lenet_function() -> None:
    adapters = pytest.importorskip("adapters")
    model = LeNetMultiTask({"even": 5, "odd": 5}, input_size=8)
    x = torch.rand(6, 1, 8, 8)
    before = {task: model(x, task) for task in model.tasks}
    parameters = count_parameters(model)
    adapters.split_channels(model.encoder, model.tasks)
    for task in model.tasks:
        torch.testing.assert_close(model(x, task), before[task])
    assert count_parameters(model) == parameters


# ---------------------------------------------------------------------------
# Command line, end to end


def _check_results(results: dict[str, Any], out_dir: Path, methods: tuple[str, ...]) -> None:
    """The returned dict matches the JSON on disk, and both have the documented structure."""
    on_disk = json.loads((out_dir / "even_odd.json").read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(results))
    assert {"benchmark", "config", "notes", "environment", "tasks", "methods", "table", "wall_time_s"} <= set(on_disk)
    assert on_disk["tasks"] == TASKS
    assert on_disk["config"]["warmup_epochs"] == 1 and any("warm-up" in note for note in on_disk["notes"])
    assert list(on_disk["methods"]) == list(methods)
    keys = [f"{task}_acc" for task in TASKS]
    assert [metric["key"] for metric in on_disk["metrics"]] == keys
    for method, summary in on_disk["methods"].items():
        assert summary["params_ratio"] == pytest.approx(1.0 if method != "independent" else 1.95, abs=0.05)
        for key in keys:
            accuracy = summary["metrics"][key]
            assert 0.0 <= accuracy["mean"] <= 1.0 and accuracy["std"] >= 0.0
            assert len(accuracy["per_seed"]) == len(on_disk["config"]["seeds"])
        run = summary["runs"][0]
        assert run["curves"]["epoch"] == list(range(1, on_disk["config"]["epochs"] + 1))
        assert all(len(run["curves"]["train_loss"][task]) == 2 for task in TASKS)
        assert all(len(run["curves"]["test"][key]) == 2 for key in keys)
        assert f"| {label(method)} | {summary['params_ratio']:.2f} |" in on_disk["table"]
        if "independent" in on_disk["methods"]:  # Δm: mean relative accuracy change against Independent, in %
            base = on_disk["methods"]["independent"]["metrics"]
            relative = [(summary["metrics"][k]["mean"] - base[k]["mean"]) / base[k]["mean"] for k in keys]
            assert summary["delta_m"] == pytest.approx(100 * sum(relative) / len(keys), abs=1e-9)
            assert f"| {summary['delta_m']:+.2f} |" in on_disk["table"]
    versus = " Δm − joint [95 % CI] |" if {"independent", "joint"} <= set(on_disk["methods"]) else ""
    assert on_disk["table"].splitlines()[0] == "| method | params | even acc (%) | odd acc (%) | Δm (%) |" + versus
    assert (out_dir / "even_odd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_trains_every_method_and_writes_json_and_png(tmp_path: Path) -> None:
    results = main(["--quick", "--out-dir", str(tmp_path), "--no-progress"])
    _check_results(results, tmp_path, METHODS)
    assert results["data_source"] == "sklearn digits 8x8" and results["config"]["data_dir"] is None
    assert results["config"]["seeds"] == [0] and results["config"]["epochs"] == 2


def test_quick_run_reads_mnist_idx_files(tmp_path: Path) -> None:
    data_dir = tmp_path / "mnist"
    _write_fake_mnist(data_dir, gz=True)
    results = main(["--quick", "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "out"), "--no-progress"])
    _check_results(results, tmp_path / "out", METHODS)
    assert results["data_source"] == str(data_dir)
    assert results["methods"]["joint"]["runs"][0]["train_sizes"] == {"even": 50, "odd": 50}
    assert results["methods"]["joint"]["runs"][0]["test_sizes"] == {"even": 20, "odd": 20}


def test_runs_are_reproducible(tmp_path: Path) -> None:
    argv = ["--quick", "--methods", "joint,independent", "--no-progress", "--out-dir"]
    first = main([*argv, str(tmp_path / "a")])
    second = main([*argv, str(tmp_path / "b")])
    for method in ("independent", "joint"):
        assert first["methods"][method]["runs"][0]["curves"] == second["methods"][method]["runs"][0]["curves"]


def test_batch_size_larger_than_a_task_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--batch-size 300 exceeds"):
        main(["--quick", "--batch-size", "300", "--methods", "joint", "--out-dir", str(tmp_path), "--no-progress"])


def test_parse_args_orders_methods_and_rejects_unknown_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["--methods", "mt_cool,joint"]).methods == ("joint", "mt_cool")
    assert parse_args(["--methods", "graddrop,pcgrad,joint"]).methods == ("joint", "pcgrad", "graddrop")
    with pytest.raises(SystemExit):
        parse_args(["--methods", "joint,sam"])
    assert "unknown method(s) ['sam']" in capsys.readouterr().err


def test_every_paper_method_is_run_by_default() -> None:
    assert METHODS == (
        "independent", "joint", "pcgrad", "mgda", "cagrad", "graddrop",
        "vanilla", "without_reg", "mt_cool", "mt_cool_clean",
    )
    assert parse_args([]).methods == METHODS and len(parse_args([]).seeds) == 5


def test_gradient_methods_train_the_joint_network_differently(tmp_path: Path) -> None:
    results = main(["--quick", "--methods", "joint,pcgrad,mgda,cagrad,graddrop", "--out-dir", str(tmp_path),
                    "--no-progress"])
    joint = results["methods"]["joint"]["runs"][0]["curves"]["train_loss"]
    for method in ("mgda", "cagrad", "graddrop"):
        run = results["methods"][method]["runs"][0]
        assert run["curves"]["train_loss"] != joint, method
        assert run["warmup_steps"] == 0
    for method in ("pcgrad", "mgda", "cagrad", "graddrop"):
        losses = results["methods"][method]["runs"][0]["curves"]["train_loss"]
        assert all(curve[-1] < curve[0] for curve in losses.values()), (method, losses)  # they learn
