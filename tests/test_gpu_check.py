"""``make gpu-check`` (benchmarks/gpu_check.py): it refuses to run without CUDA and judges the test report.

The check itself needs a GPU; these tests run its decisions on CPU. The whole
script is exercised on CPU by ``GPU_CHECK_DRY_RUN=1 python -m benchmarks.gpu_check``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="{failures}" skipped="{skipped}" tests="3">
<testcase classname="tests.test_cuda" name="test_a[cuda]"/>
<testcase classname="tests.test_cuda" name="test_b[cuda]">{b}</testcase>
<testcase classname="tests.test_optimizer" name="test_runs_on_cuda"/>
</testsuite></testsuites>
"""


def _junit(tmp_path: Path, skipped: int = 0, failures: int = 0) -> Path:
    b = '<skipped message="needs a CUDA device"/>' if skipped else ('<failure message="x"/>' if failures else "")
    (tmp_path / "gpu_check_tests.xml").write_text(JUNIT.format(failures=failures, skipped=skipped, b=b))
    return tmp_path


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_fails_loudly_and_names_the_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(gpu_check.DRY_RUN_ENV, raising=False)
    assert gpu_check.main(["--results", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and "--dry-run" in err and "GPU_CHECK_DRY_RUN=1" in err
    assert not (tmp_path / "gpu_check.txt").exists()


def test_the_junit_report_is_counted_and_the_bad_tests_named(tmp_path: Path) -> None:
    counts, bad = gpu_check.junit_summary(_junit(tmp_path, skipped=1) / "gpu_check_tests.xml")
    assert counts == {"tests": 3, "failures": 0, "errors": 0, "skipped": 1}
    assert bad == ["tests.test_cuda::test_b[cuda] (skipped)"]


@pytest.mark.parametrize(("skipped", "failures", "dry_run", "fails"),
                         [(0, 0, False, False), (1, 0, False, True), (1, 0, True, False), (0, 1, True, True)])
def test_a_skipped_cuda_test_fails_the_check_on_a_gpu_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, skipped: int, failures: int, dry_run: bool, fails: bool
) -> None:
    _junit(tmp_path, skipped, failures)
    part = gpu_check.Part("CUDA tests", [], int(bool(failures)), "pytest output", 1.0)
    monkeypatch.setattr(gpu_check, "run_part", lambda *args: part)
    if fails:
        with pytest.raises(gpu_check.CheckFailed, match=r"test_b\[cuda\]"):
            gpu_check.run_tests(tmp_path, dry_run)
    else:
        _, summary = gpu_check.run_tests(tmp_path, dry_run)
        assert summary.startswith(f"3 CUDA tests: 0 failed, 0 errors, {skipped} skipped")


def test_the_step_time_run_includes_every_row_on_cuda(tmp_path: Path) -> None:
    command = gpu_check.step_time_command("cuda", tmp_path, dry_run=False)
    assert command[1:3] == ["-m", "benchmarks.step_time"]
    assert "--compile" in command and command[command.index("--device") + 1] == "cuda"
    assert not {"--no-memory", "--sizes", "--samples", "--no-pairs", "--compare"} & set(command)  # the full default run
