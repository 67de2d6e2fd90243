# `make demo`: install into .venv, generate the demo world, run the pipeline.  `make test`: the suite.
VENV ?= .venv
PYTHON ?= python3.11
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: install demo test lint format dvc-yaml

install: $(VENV)/.installed

# pip, not uv/poetry: only pip finds the CPU torch wheel on this machine's disk.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' -c constraints.txt
	touch $@

demo: install
	ace data synth --scale demo
	dvc add -q data
	dvc repro
	dvc metrics show
	ace search "red striped dress" --k 5

lint: install
	ruff check .
	ruff format --check .

test: lint
	pytest

format: install
	ruff check --fix .
	ruff format .

dvc-yaml: install
	ace pipeline dvc-yaml
