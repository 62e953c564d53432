# fedbucket — every entry point a developer or CI needs. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.fedbucket-installed

export PYSPARK_PYTHON := $(abspath $(PY))
export SPARK_LOCAL_IP := 127.0.0.1

.PHONY: browser ui-screenshots rounds help setup java-check spark35-env tools-env test lint format demo airflow results package deploy bench lock clean

help:  ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

java-check:  ## check that Java 17+ is on PATH (Spark needs it)
	@command -v java >/dev/null || { echo "Java 17+ is required for Spark but 'java' is not on PATH. Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless" >&2; exit 1; }
	@v=$$(java -version 2>&1 | awk -F'"' '/version/ {print $$2}' | cut -d. -f1); \
	  if [ "$${v:-0}" -lt 17 ]; then echo "Java $$v found; Spark 4 needs Java 17+. Install openjdk-17-jre-headless and put it first on PATH." >&2; exit 1; fi

DP_ACCOUNTING := 0.6.0

setup: java-check $(STAMP)  ## create .venv and install everything (idempotent)

$(STAMP): requirements.txt constraints.txt client_sdk/pyproject.toml examples/text_classification/pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: fedbucket needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps dp-accounting==$(DP_ACCOUNTING)  # why --no-deps: requirements.txt
	$(PY) -m pip install --quiet --no-deps -e client_sdk
	$(PY) -m pip install --quiet --no-deps -e examples/text_classification  # the example task package
	@touch $@
	@echo "fedbucket: environment ready in $(VENV)"

# Spark 3.5 (Dataproc 2.2/2.3 images) beside the main env's Spark 4: the tests run the same jobs on both.
SPARK35_VENV  := .venv-spark35
SPARK35_STAMP := $(SPARK35_VENV)/.fedbucket-installed

spark35-env: $(SPARK35_STAMP)  ## a second env with pyspark 3.5 for the Spark-compatibility tests

$(SPARK35_STAMP): constraints.txt client_sdk/pyproject.toml
	@[ -x $(SPARK35_VENV)/bin/python ] || $(PYTHON) -m venv $(SPARK35_VENV)
	$(SPARK35_VENV)/bin/python -m pip install --quiet --upgrade pip
	grep -v -e '^pyspark==' -e '^attrs==' constraints.txt > $(SPARK35_VENV)/constraints.txt  # no Airflow here
	$(SPARK35_VENV)/bin/python -m pip install --quiet pyspark==3.5.8 torch==2.13.0 -e 'client_sdk[server]' -c $(SPARK35_VENV)/constraints.txt
	@touch $@

# Security and static tools with dependency trees that clash with Airflow's live in their own env.
TOOLS_VENV  := .tools-venv
TOOLS_STAMP := $(TOOLS_VENV)/.fedbucket-installed

tools-env: $(TOOLS_STAMP)  ## checkov, in its own env (with Airflow's deps its resolver backtracks for minutes)

$(TOOLS_STAMP): Makefile
	@command -v terraform >/dev/null || { echo "terraform is required for 'terraform fmt' checks: install Terraform >= 1.5" >&2; exit 1; }
	@[ -x $(TOOLS_VENV)/bin/python ] || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TOOLS_VENV)/bin/python -m pip install --quiet checkov==3.3.30
	@touch $@

lint: setup  ## ruff check + format check + the package's import layering (import-linter)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd client_sdk/src && ../../$(BIN)/lint-imports ../../pyproject.toml --no-cache

format: setup  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

browser:  ## Debian's Chromium for the UI test (installed with apt-get when missing and this is root)
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium for the browser test (apt-get)"; \
	    apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null; }; \
	  else echo "Chromium not found: the browser test will be skipped; install it with: sudo apt-get install -y chromium" >&2; fi; }

test: lint spark35-env tools-env browser  ## lint, then the whole test suite (pytest's "no tests ran" counts as failure)
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi; exit $$rc

ROUNDS ?= 1
rounds: setup  ## run ROUNDS real DAG rounds locally with dag.test() for FEDBUCKET_CONFIG (start clients yourself)
	PYTHONPATH=$(abspath plugins) $(PY) -m fedbucket_airflow.local --config $(FEDBUCKET_CONFIG) --rounds $(ROUNDS) --home $(abspath airflow-rounds)

demo: setup  ## a real local federation: 10 simulated clients, 5 rounds of the DAG with Spark (see README)
	$(PY) examples/demo.py $(DEMO_ARGS)

AIRFLOW_LOCAL_HOME ?= $(abspath airflow-home)
FEDBUCKET_CONFIG ?= $(abspath dags/federation.toml)

airflow: setup  ## airflow standalone with the round DAG: http://127.0.0.1:8080 (Ctrl-C stops it)
	$(BIN)/fedbucket init --config $(FEDBUCKET_CONFIG)
	@echo "Airflow UI: http://127.0.0.1:8080  (local login: every user is admin; see docs/operations.md)"
	@echo "Federation page: http://127.0.0.1:8080/plugin/federation for $(FEDBUCKET_CONFIG) (the demo's rounds: make airflow FEDBUCKET_CONFIG=$(abspath demo-output/federation.toml))"
	@echo "The DAG starts paused: unpause fedbucket_round, then Trigger (with parameters); clients: .venv/bin/fedbucket simulate --bucket <bucket in $(FEDBUCKET_CONFIG)>"
	PATH="$(abspath $(BIN)):$$PATH" AIRFLOW_HOME=$(AIRFLOW_LOCAL_HOME) FEDBUCKET_CONFIG=$(FEDBUCKET_CONFIG) \
	  AIRFLOW__CORE__LOAD_EXAMPLES=False AIRFLOW__CORE__DAGS_FOLDER=$(abspath dags) \
	  AIRFLOW__CORE__PLUGINS_FOLDER=$(abspath plugins) PYTHONPATH=$(abspath plugins) \
	  AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=True \
	  AIRFLOW__API__HOST=127.0.0.1 AIRFLOW__API__PORT=8080 \
	  $(BIN)/airflow standalone

results: setup  ## learning quality: digits (20 DAG rounds), the text example, DP at 1,000 clients and DP-SGD -> docs/results.md
	$(PY) examples/results.py
	$(PY) examples/text_results.py
	$(PY) examples/dp_results.py

VERSION = $(shell $(PY) -c "import fedbucket; print(fedbucket.__version__)")+g$(shell git rev-parse --short HEAD)
ARTIFACTS_DIR = dist/artifacts/$(VERSION)

# Task packages the cluster must import (the federation's model.task): each directory is built into the
# wheelhouse and installed on every node by the init action. Override: make package TASK_PACKAGES="path/a path/b".
TASK_PACKAGES ?= examples/text_classification

package: setup  ## build the code Dataproc runs into dist/artifacts/<version>/ (spark_jobs + wheelhouse + task packages)
	rm -rf $(ARTIFACTS_DIR) && mkdir -p $(ARTIFACTS_DIR)/spark_jobs $(ARTIFACTS_DIR)/wheels
	cp spark_jobs/*.py $(ARTIFACTS_DIR)/spark_jobs/
	$(PY) -m pip wheel --quiet --no-deps -w $(ARTIFACTS_DIR)/wheels ./client_sdk
	grep -v '^fedbucket' spark_jobs/requirements-cluster.txt > $(ARTIFACTS_DIR)/wheels/requirements-cluster.txt
	echo "fedbucket==$$($(PY) -c 'import fedbucket; print(fedbucket.__version__)')" >> $(ARTIFACTS_DIR)/wheels/requirements-cluster.txt
	for task in $(TASK_PACKAGES); do \
	  $(PY) -m pip wheel --quiet --no-deps -w $(ARTIFACTS_DIR)/wheels ./$$task && \
	  $(PY) -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1] + "/pyproject.toml", "rb"))["project"]; print(p["name"] + "==" + p["version"])' $$task \
	    >> $(ARTIFACTS_DIR)/wheels/requirements-cluster.txt || exit 1; \
	done
	grep -v '^attrs==' constraints.txt > $(ARTIFACTS_DIR)/constraints-cluster.txt  # no Airflow on the cluster
	$(PY) -m pip download --quiet --only-binary=:all: -d $(ARTIFACTS_DIR)/wheels -c $(ARTIFACTS_DIR)/constraints-cluster.txt \
	  -r $(ARTIFACTS_DIR)/wheels/requirements-cluster.txt --find-links $(ARTIFACTS_DIR)/wheels
	@echo "packaged fedbucket $(VERSION) in $(ARTIFACTS_DIR); upload it with: make deploy ARTIFACTS_BUCKET=gs://<bucket>-artifacts"

deploy: package  ## upload artifacts + DAG to GCP (needs gcloud and credentials; see docs/deploy.md)
	@[ -n "$(ARTIFACTS_BUCKET)" ] || { echo "set ARTIFACTS_BUCKET=gs://<bucket>-artifacts (terraform output artifacts_root)" >&2; exit 1; }
	gcloud storage cp --recursive $(ARTIFACTS_DIR)/spark_jobs $(ARTIFACTS_DIR)/wheels $(ARTIFACTS_BUCKET)/fedbucket/$(VERSION)/
	@[ -z "$(COMPOSER_ENV)" ] || { \
	  rm -rf dist/composer-plugins && mkdir -p dist/composer-plugins && \
	  cp -r plugins/fedbucket_airflow client_sdk/src/fedbucket dist/composer-plugins/ && \
	  cp -r $$($(PY) -c 'import dp_accounting, os; print(os.path.dirname(dp_accounting.__file__))') dist/composer-plugins/ && \
	  gcloud composer environments storage dags import --environment $(COMPOSER_ENV) --location $(REGION) --source dags/ && \
	  gcloud composer environments storage plugins import --environment $(COMPOSER_ENV) --location $(REGION) \
	    --source dist/composer-plugins/; }

ui-screenshots: setup browser  ## screenshots of the Federation pages (real API server, real Chromium) -> docs/ui/
	mkdir -p docs/ui
	FEDBUCKET_UI_SCREENSHOTS=$(abspath docs/ui) $(PY) -m pytest -q tests/test_ui.py -k browser

bench: setup  ## measure speed and memory; writes docs/benchmarks.md and docs/benchmarks/*.json
	$(PY) -m tests.benchmarks.run $(BENCH_ARGS)

lock: setup  ## regenerate constraints.txt from the current environment
	{ echo '# Locked versions of every package (direct and transitive) for requirements.txt. Regenerate: make lock'; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^fedbucket'; } > constraints.txt

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) $(SPARK35_VENV) $(TOOLS_VENV) .pytest_cache .ruff_cache demo-output results-output airflow-home
