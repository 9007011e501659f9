# dspy-fleet — the two commands of the README (`make run`, `make test`) plus lint.
# Needs only Python 3.11+ and make; everything else is installed into .venv.

SHELL := /bin/bash
VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

# The newest python3.x >= 3.11 on PATH, unless PYTHON=... is given.
PYTHON ?= $(shell for p in python3.12 python3.11 python3.13 python3; do \
	  command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	  2>/dev/null && { echo $$p; break; }; done)

.PHONY: help venv run test lint clean

help:
	@echo "make run   - install into .venv and start Redis, mock LLM, worker and API (Ctrl-C stops)"
	@echo "make test  - install into .venv and run the whole test suite against real services"
	@echo "make lint  - ruff check and format check"

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.11+ not found on PATH (set PYTHON=/path/to/python3.11)"; exit 1; }
	@echo "creating $(VENV) with $(PYTHON) ..."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

run: venv
	$(BIN)/dspy-fleet dev

test: venv
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
