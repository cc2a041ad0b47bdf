# The README's two commands: `make run` (set up, then the even/odd comparison) and
# `make test` (set up, then mypy --strict and the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned as a matching pair (timm needs torchvision).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: run test setup bench-step-time gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]" $(TORCH)
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/python -m benchmarks.even_odd

test: setup
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

bench-step-time: setup
	$(BIN)/python -m benchmarks.step_time

# On a machine with a CUDA device (fails without one; CI never runs it): the CUDA tests and the
# step-time figures, written to results/gpu_check.txt. GPU_CHECK_DRY_RUN=1 runs it on CPU instead.
gpu-check: setup
	$(BIN)/python -m benchmarks.gpu_check

clean:
	rm -rf $(VENV) results .mypy_cache .pytest_cache .hypothesis
