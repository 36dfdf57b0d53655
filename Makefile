# freezeflow: `make run` trains on the default data, `make test` runs the whole suite.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
VENV ?= .venv
PY := $(VENV)/bin/python
FF := $(VENV)/bin/freezeflow
STAMP := $(VENV)/.installed
PYTHON ?= python3
# pip on this machine lists local mirrors that may be absent; drop that noise, keep real errors
PIPQ := 2>&1 | { grep -v "is ignored: it is neither" || true; }

# no usage analytics from the tools (DVC, Prefect's server, MLflow): nothing leaves the machine
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

.PHONY: run test test-fast install data bench clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock $(PIPQ)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . $(PIPQ)
	$(PY) -c "import freezeflow.app.cli, torch, torchvision, prefect, mlflow, optuna, dvc"
	touch $(STAMP)

install: $(STAMP)

data: $(STAMP)
	$(FF) data digits

run: $(STAMP) data
	$(FF) pipeline
	@echo "results: reports/metrics.json reports/eval.json models/ ; runs: $(FF) ui  (MLflow on http://127.0.0.1:5000)"

test: $(STAMP)
	PYTHONPATH=$(CURDIR) $(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q

test-fast: $(STAMP)
	PYTHONPATH=$(CURDIR) $(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP) data
	$(FF) bench

clean:
	rm -rf prepared cache checkpoints models reports/*.json
