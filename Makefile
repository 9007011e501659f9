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

# $(call apt_install,COMMAND,PACKAGE,WHAT HAPPENS WITHOUT IT): install a Debian package
# when its command is missing and apt exists (as root or with passwordless sudo).
# Never fatal: the tests that need the tool say what is missing.
define apt_install
	@command -v $(1) >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	    echo "installing $(2) (Debian package) ..."; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      $$SUDO apt-get install -y -qq --no-install-recommends $(2) >/dev/null \
	    || echo "could not install $(2): $(3)"; \
	  else echo "no apt-get: install $(2) yourself; $(3)"; fi; }
endef

.PHONY: help venv run test chaos lint clean test-tools exporter-venv

help:
	@echo "make run   - install into .venv and start Redis, mock LLM, worker and API (Ctrl-C stops)"
	@echo "make test  - install into .venv and run the whole test suite against real services"
	@echo "make chaos - only the chaos suite (worker kills, Redis restart, provider outage)"
	@echo "make lint  - ruff check, format check and mypy (make test runs it first)"

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

# Two passes, both always run: the modules that assert no timing, two at a time (each
# module on one xdist worker: its fixtures start its own services on free ports); then the
# `serial` ones, which assert latencies or rates, alone. `pytest` alone runs everything in one.
test: lint test-tools bench-tools
	@rc=0; \
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not serial" || rc=1; \
	$(BIN)/python -m pytest -m serial || rc=1; \
	exit $$rc

# celery-exporter (PyPI prometheus-exporter-celery) pins prometheus-client<0.22 and
# redis<6, which conflict with ours: it gets its own venv. kombu 5.7 needs redis>=6.1,
# hence the older Celery there.
EXPORTER_VENV  := .venv-exporter
EXPORTER_STAMP := $(EXPORTER_VENV)/.installed

$(EXPORTER_STAMP):
	@test -n "$(PYTHON)" || { echo "Python 3.11+ not found on PATH (set PYTHON=/path/to/python3.11)"; exit 1; }
	@echo "creating $(EXPORTER_VENV) for celery-exporter ..."
	$(PYTHON) -m venv $(EXPORTER_VENV)
	$(EXPORTER_VENV)/bin/python -m pip install --quiet \
	  'prometheus-exporter-celery==0.11.2' 'celery>=5.5.2,<5.6' 'kombu<5.6' packaging
	@touch $@

exporter-venv: $(EXPORTER_STAMP)

# What the monitoring tests need besides .venv: promtool and prometheus (Debian package `prometheus`,
# installed where apt exists) and the exporter's venv; rabbitmq-server for the RabbitMQ chaos
# tests (they start a private node of it, never the system one). Fast no-op once present.
test-tools: $(EXPORTER_STAMP)
	$(call apt_install,promtool,prometheus,its tests skip off CI and fail when CI=true)
	$(call apt_install,rabbitmq-server,rabbitmq-server,tests/chaos/test_rabbitmq.py skips off CI and fails when CI=true)
	$(call apt_install,chromium,chromium,the /docs test skips off CI and fails when CI=true)

# The chaos suite alone, with its figures printed (make test runs it too).
chaos: venv test-tools
	$(BIN)/python -m pytest tests/chaos -s -p no:cacheprovider

# Lint and types: ruff (style, imports) and mypy (dspy_fleet, api, worker; pyproject.toml).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# --- deployment (Dockerfiles, compose, Helm chart) ---------------------------------
# docker-build / compose-* need a Docker engine with the compose plugin; helm-install
# needs a helm binary and a cluster. helm-lint / helm-template use the Helm library
# from .venv (helm-python-sdk), so they run anywhere `make test` does.
HELM_VALUES ?=
HELM_RELEASE ?= dspy-fleet
HELM_NAMESPACE ?= dspy-fleet
IMAGE_TAG ?= local

.PHONY: docker-build compose-up compose-down helm-lint helm-template helm-install

docker-build:
	docker build -f Dockerfile.api -t dspy-fleet-api:$(IMAGE_TAG) .
	docker build -f Dockerfile.worker -t dspy-fleet-worker:$(IMAGE_TAG) .

compose-up:
	docker compose up -d --build --wait

compose-down:
	docker compose down

helm-lint: venv
	$(BIN)/python helm/chart.py lint
	$(BIN)/python helm/chart.py lint -f helm/examples/values-production.yaml

helm-template: venv
	$(BIN)/python helm/chart.py template --name $(HELM_RELEASE) --namespace $(HELM_NAMESPACE) $(if $(HELM_VALUES),-f $(HELM_VALUES))

helm-install:
	@command -v helm >/dev/null || { echo "helm-install needs the helm binary (https://helm.sh) and a cluster"; exit 1; }
	helm upgrade --install $(HELM_RELEASE) helm/dspy-fleet --namespace $(HELM_NAMESPACE) --create-namespace $(if $(HELM_VALUES),-f $(HELM_VALUES)) --wait
	helm test $(HELM_RELEASE) --namespace $(HELM_NAMESPACE)

# --- benchmarks (bench/) -----------------------------------------------------------
# Each run starts its own Redis, mock LLM, workers and APIs (ours and bare baselines) on
# free ports and prints one line per figure. Load comes from wrk (Debian package, installed
# where apt exists); without it bench/ falls back to a slower Python client.
.PHONY: bench bench-quick bench-tools bench-peer bench-profile

bench-tools:
	$(call apt_install,wrk,wrk,bench/ uses its slower Python load generator)

bench: venv bench-tools
	$(BIN)/python -m bench

bench-quick: venv bench-tools
	$(BIN)/python -m bench --quick

# The LiteLLM proxy as a peer (issue 18): its own venv, since litellm[proxy] pins what ours
# does not need. 1.108.7 is the newest release whose proxy extra resolves from the registry.
PEER_VENV  := .venv-peer
PEER_STAMP := $(PEER_VENV)/.installed

$(PEER_STAMP):
	@test -n "$(PYTHON)" || { echo "Python 3.11+ not found on PATH (set PYTHON=/path/to/python3.11)"; exit 1; }
	@echo "creating $(PEER_VENV) for the LiteLLM proxy ..."
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install --quiet 'litellm[proxy]==1.108.7'
	@touch $@

bench-peer: venv bench-tools $(PEER_STAMP)
	$(BIN)/python -m bench.peer $(BENCH_PEER_ARGS)

# Where one prediction's CPU goes, API and worker apart (py-spy, sampled while holding the GIL).
bench-profile: venv
	$(BIN)/python -m pip install --quiet 'py-spy>=0.4'
	$(BIN)/python -m bench.profile
