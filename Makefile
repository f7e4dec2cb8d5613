# Zalando: the two commands are `make run` and `make test`; both create .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# OpenMP threads spin at most 10k iterations, then sleep: 40% faster training than never spinning
# (OMP_WAIT_POLICY=PASSIVE) on 2 free cores, and no collapse when the cores are shared (see README)
export GOMP_SPINCOUNT ?= 10000
export PREFECT_HOME ?= $(CURDIR)/.zalando/prefect

.PHONY: venv run test test-fast lint bench clean-lake

# (Re)install only when the venv is missing or pyproject.toml changed; quick otherwise.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# Default data source for `make run`: the official mirror, unless a byte-identical copy lies beside
# the checkout (our machines have no route to the mirror). ZALANDO_DATA_SOURCE always wins.
SHARED_FMNIST := $(abspath ../shared/data/fashion-mnist)
RUN_SOURCE := $(if $(wildcard $(SHARED_FMNIST)/SHA256SUMS),$(SHARED_FMNIST),)

## The main job on embedded defaults: ingest -> preprocess -> train -> evaluate -> promote -> score.
run: $(STAMP)
	ZALANDO_DATA_SOURCE="$${ZALANDO_DATA_SOURCE:-$(RUN_SOURCE)}" $(VENV)/bin/zalando run

## Every test (unit, integration against a real SeaweedFS and Prefect, e2e), on TEST_WORKERS
## pytest-xdist workers, test by test (--dist load: every worker starts the session fixtures it needs,
## an e2e stack included; grouping by file put the e2e stack's start beside the heaviest files and
## failed under that load).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m ruff check .
	@mkdir -p "$(PREFECT_HOME)"  # before the workers: both would make it at import, and one would warn
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist load --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

# ---------------------------------------------------------------- the local stack (issue 5, infra/stack.py)
# Prefect server on 127.0.0.1:$(ZALANDO_PREFECT_PORT) (state in .zalando/prefect), the embedded S3
# server and a process worker, in the background; logs and PID files in .zalando/stack/.
.PHONY: up deploy trigger down status
ZALANDO_PREFECT_PORT ?= 4200
export ZALANDO_PREFECT_PORT
TRIGGER_ARGS ?=

up: $(STAMP)
	ZALANDO_DATA_SOURCE="$${ZALANDO_DATA_SOURCE:-$(RUN_SOURCE)}" $(PY) infra/stack.py up

## Register the deployments of prefect.yaml (nightly, retrain, score) and the drift -> retrain automation.
deploy: $(STAMP)
	$(PY) infra/stack.py deploy

## Run the `nightly` deployment now and wait for it (e.g. TRIGGER_ARGS='--param profile=quick').
trigger: $(STAMP)
	$(PY) infra/stack.py trigger $(TRIGGER_ARGS)

down:
	@if [ -x $(PY) ]; then $(PY) infra/stack.py down; fi

status: $(STAMP)
	$(PY) infra/stack.py status
