# `make demo`: install into .venv, generate the demo world, run the pipeline.  `make test`: the suite.
VENV ?= .venv
PYTHON ?= python3.11
SHELL := /bin/bash
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: install demo test test-fast lint format dvc-yaml

install: $(VENV)/.installed

# pip, not uv/poetry: only pip finds the CPU torch wheel on this machine's disk.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' -c constraints.txt
	touch $@

# `dvc repro` ends every run that did something with "Use `dvc push` to send your updates to
# remote storage": this project has no DVC remote (data and models stay in this checkout), so
# the line is dropped; pipefail keeps repro's exit status.
demo: install
	ace data synth --scale demo
	dvc add -q data
	set -o pipefail; dvc repro | grep -v '^Use `dvc push`'
	ace search "red striped dress" --k 5
	ace report

lint: install
	ruff check .
	ruff format --check .

# One worker per core (at most 4), each test file whole on one worker (module fixtures built once).
test: lint
	pytest -n auto --maxprocesses 4 --dist loadfile

# The inner loop: everything but the tests marked slow (end-to-end runs of stages and servers).
test-fast: install
	pytest -n auto --maxprocesses 4 --dist loadfile -m "not slow"

format: install
	ruff check --fix .
	ruff format .

dvc-yaml: install
	ace pipeline dvc-yaml
