# Two commands set up and run everything: `make demo` (the method on the generated dataset) and `make test`.
# Each creates or reuses the project's own virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow install browser ui-screenshots clean-runs

install: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	# torchattacks (benchmark reference only) pins requests~=2.25 and would break mlflow's requirements: no deps.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps torchattacks==3.5.1
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m distributed_asac.demo --config configs/demo.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

test-slow: $(STAMP) browser
	$(PY) -m pytest -q -m slow $(ARGS)

# Debian's headless-capable Chromium for the MLflow UI test (tests/test_mlflow_ui.py); sudo unless root.
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

browser: $(CHROMIUM)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-liberation

# docs/mlflow_ui.png, docs/mlflow_ui_runs.png, docs/mlflow_ui_models.png and docs/mlflow_ui_model_version.png: the
# pages the MLflow UI test renders (docs/mlflow.md).
ui-screenshots: $(STAMP) browser
	ASAC_UI_SCREENSHOTS=$(CURDIR)/docs $(PY) -m pytest -q -m slow tests/test_mlflow_ui.py $(ARGS)

clean-runs:
	rm -rf runs mlflow.db mlartifacts
