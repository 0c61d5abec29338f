# curvmerge — `make help` lists the targets. Every target sets up .venv on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST := $(PY) -m pytest

.DEFAULT_GOAL := help
.PHONY: help install demo test test-slow lint format docs bench gpu-check clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,efficientnet]'
	@# torchvision (pulled by backpack) cannot import on the CPU torch build and breaks transformers
	$(PY) -m pip uninstall -y -q torchvision || true
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install curvmerge with its dev tools

demo: $(STAMP)  ## run the embedded default merge and print its table
	$(PY) -m curvmerge demo --force

test: $(STAMP)  ## fast tests, doctests and gallery smoke tests (< 10 min on 2 cores)
	$(PYTEST) -m "not slow" tests curvmerge

test-slow: $(STAMP)  ## slow tests: real pretrained models, long fine-tunes
	$(PYTEST) -m slow tests

lint: $(STAMP)  ## ruff check and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

docs: $(STAMP)  ## build the Sphinx docs with the gallery, warnings as errors
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

bench: $(STAMP)  ## run the benchmarks (prints ratios measured side by side)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

gpu-check:  ## GPU tests and quick GPU benchmarks in one run (no .venv needed; exit 2 without a GPU)
	bash benchmarks/gpu_check.sh

clean:  ## remove build outputs (keeps .venv)
	rm -rf docs/_build docs/auto_examples docs/gen_modules build *.egg-info .pytest_cache
