# Developer entry points. Everything installs into .venv with the CPU build of torch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint constraints compose-test

$(BIN)/pso: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build first, so nothing below pulls a multi-GB CUDA build of torch
	$(BIN)/python -m pip install -q torch==2.13.0
	# every other package at the version the tests ran with (the images install the same)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
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

# builds the CPU image and runs the compose CPU profile on a real Docker engine (deploy/ci/compose_test.py);
# skipped, with the reason, where no engine can be had (PSO_COMPOSE_TEST=require makes that a failure)
compose-test: install
	$(BIN)/python deploy/ci/compose_test.py

# after upgrading packages in .venv (and a green test run): pin what the tests now run with
constraints: install
	{ sed -n '1,3p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
