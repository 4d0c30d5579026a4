# Developer entry points. Everything installs into .venv with the CPU build of torch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint

$(BIN)/pso: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build first, so nothing below pulls a multi-GB CUDA build of torch
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	# the original ImageReward model code, only for the test that proves our port scores the same;
	# its own dependencies (timm, fairscale, clip, torchvision) do not work with current libraries
	$(BIN)/python -m pip install -q --no-deps image-reward==1.5
	touch $(BIN)/pso

install: $(BIN)/pso

demo: install
	$(BIN)/pso up -c configs/tiny.yaml

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q
