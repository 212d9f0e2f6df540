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
# A negative external set in every run where it exists: the Shenzhen X-rays predate COVID-19, so the
# share a model calls COVID is its false-alarm rate on another hospital's images (`EXTERNAL=` drops it).
SHENZHEN := ../shared/data/shenzhen-cxr
SHENZHEN_SET := {"uri": "$(SHENZHEN)", "kind": "negative", "about": "pre-pandemic X-rays from another hospital, none COVID"}
EXTERNAL ?= $(if $(wildcard $(SHENZHEN)),--external-source '$(SHENZHEN_SET)',)
# The shortcut audit and the app's lung outline (README, "Shortcut audit", "The phone app"): off, as a first run
# would pay a lung segmenter trained on the Shenzhen masks (4.7 min) and the audit (2.4 min) on top of its 25, over
# the 30-minute goal; `make run AUDIT=1` turns both on, and later runs on the same store reuse both units at no cost.
AUDIT ?=
AUDIT_ARGS := $(if $(and $(AUDIT),$(wildcard $(SHENZHEN))),--lung-masks $(SHENZHEN),)
ifneq ($(AUDIT),)
ifeq ($(wildcard $(SHENZHEN)),)
$(warning AUDIT=1 needs a mask source at $(SHENZHEN): this run has no shortcut audit)
endif
endif
# ImageNet weights: the shared folder where it exists, else Keras' own cache (~/.keras/models).
export COVID_WEIGHTS_DIR ?= $(if $(wildcard ../shared/weights),$(abspath ../shared/weights),)

.PHONY: install run prepare test lint bench-ingest clean app app-build browser bench-app bench-lighthouse

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The phone app's scripts (app/dist), built with npm when Node.js is there; without it `make run`
# still runs and says the app bundle was skipped.
app-build:
	@if command -v npm >/dev/null 2>&1; then \
		(cd app && { test -d node_modules || npm ci --no-audit --no-fund; } && npm run build --silent); \
	else echo "make: no Node.js/npm: the phone app bundle will be skipped (install Node.js 18+ with npm, e.g. apt-get install nodejs npm)"; fi

# Serve the champion's app bundle on http://127.0.0.1:8000 (RUN=<run id> for another run).
app: $(STAMP) app-build
	$(PY) -m covid_app.serve --store $(COVID_STORE) $(if $(RUN),--run $(RUN),) --port $(or $(PORT),8000)

# Debian's Chromium for the browser tests (as root; CI runs as root).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

run: $(STAMP) app-build
	$(PY) -m flows.retrain --preset $(PRESET) --source $(COVID_DATA_SOURCE) --store $(COVID_STORE) --profile $(PROFILE) $(EXTERNAL) $(AUDIT_ARGS)

prepare: $(STAMP)
	$(PY) -m flows.prepare_data --source $(COVID_DATA_SOURCE) --store $(COVID_STORE) --profile $(PROFILE)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Two workers, a test file each at a time (module fixtures such as the browser tests' published run
# are built once): on 2 cores the suite mostly waits on servers, subprocesses and Prefect runs. Files
# go out longest first (tests/conftest.py, SLOWEST_FIRST), not xdist's most-tests-first.
TEST_WORKERS ?= 2
test: $(STAMP) lint app-build browser
	$(PY) -m pytest -ra -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=20

bench-ingest: $(STAMP)
	$(PY) benchmarks/ingest.py

bench-app: $(STAMP) app-build browser
	$(PY) benchmarks/app.py

# Lighthouse 12.2.3 (pinned in benchmarks/lighthouse/, its own lockfile) on the champion's app, mobile mode.
bench-lighthouse: $(STAMP) app-build browser
	cd benchmarks/lighthouse && { test -d node_modules || npm ci --no-audit --no-fund; }
	$(PY) benchmarks/lighthouse.py

clean:
	rm -rf $(VENV) .store .pytest_cache .ruff_cache app/node_modules app/dist benchmarks/lighthouse/node_modules
