# Two commands for a newcomer: `make run` (the main job) and `make test` (every test).
# Each creates .venv and installs what it needs first.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SHARED_SAMPLE := ../shared/data/covid19-radiography-sample

# The data source of `make run`: the shared sample where it exists, else the Kaggle download.
COVID_DATA_SOURCE ?= $(if $(wildcard $(SHARED_SAMPLE)),$(SHARED_SAMPLE),kaggle)
COVID_STORE ?= .store
PROFILE ?= $(if $(wildcard $(SHARED_SAMPLE)),shared-sample,kaggle)
PRESET ?= cpu
# ImageNet weights: the shared folder where it exists, else Keras' own cache (~/.keras/models).
export COVID_WEIGHTS_DIR ?= $(if $(wildcard ../shared/weights),$(abspath ../shared/weights),)

.PHONY: install run prepare test lint bench-ingest clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m flows.retrain --preset $(PRESET) --source $(COVID_DATA_SOURCE) --store $(COVID_STORE) --profile $(PROFILE)

prepare: $(STAMP)
	$(PY) -m flows.prepare_data --source $(COVID_DATA_SOURCE) --store $(COVID_STORE) --profile $(PROFILE)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) lint
	$(PY) -m pytest -ra

bench-ingest: $(STAMP)
	$(PY) benchmarks/ingest.py

clean:
	rm -rf $(VENV) .store .pytest_cache .ruff_cache
