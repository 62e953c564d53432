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

.PHONY: help setup java-check spark35-env test lint format demo airflow results bench lock clean

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

java-check:  ## check that Java 17+ is on PATH (Spark needs it)
	@command -v java >/dev/null || { echo "Java 17+ is required for Spark but 'java' is not on PATH. Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless" >&2; exit 1; }
	@v=$$(java -version 2>&1 | awk -F'"' '/version/ {print $$2}' | cut -d. -f1); \
	  if [ "$${v:-0}" -lt 17 ]; then echo "Java $$v found; Spark 4 needs Java 17+. Install openjdk-17-jre-headless and put it first on PATH." >&2; exit 1; fi

setup: java-check $(STAMP)  ## create .venv and install everything (idempotent)

$(STAMP): requirements.txt constraints.txt client_sdk/pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: fedbucket needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps -e client_sdk
	@touch $@
	@echo "fedbucket: environment ready in $(VENV)"

# Spark 3.5 (Dataproc 2.2/2.3 images) beside the main env's Spark 4: the tests run the same jobs on both.
SPARK35_VENV  := .venv-spark35
SPARK35_STAMP := $(SPARK35_VENV)/.fedbucket-installed

spark35-env: $(SPARK35_STAMP)  ## a second env with pyspark 3.5 for the Spark-compatibility tests

$(SPARK35_STAMP): constraints.txt client_sdk/pyproject.toml
	@[ -x $(SPARK35_VENV)/bin/python ] || $(PYTHON) -m venv $(SPARK35_VENV)
	$(SPARK35_VENV)/bin/python -m pip install --quiet --upgrade pip
	grep -v '^pyspark==' constraints.txt > $(SPARK35_VENV)/constraints.txt
	$(SPARK35_VENV)/bin/python -m pip install --quiet pyspark==3.5.8 torch==2.13.0 -e client_sdk -c $(SPARK35_VENV)/constraints.txt
	@touch $@

lint: setup  ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint spark35-env  ## lint, then the whole test suite (pytest's "no tests ran" counts as failure)
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi; exit $$rc

demo: setup  ## a real local federation: 10 simulated clients, 5 rounds of the DAG with Spark (see README)
	$(PY) examples/demo.py $(DEMO_ARGS)

AIRFLOW_LOCAL_HOME ?= $(abspath airflow-home)
FEDBUCKET_CONFIG ?= $(abspath dags/federation.toml)

airflow: setup  ## airflow standalone with the round DAG: http://127.0.0.1:8080 (Ctrl-C stops it)
	$(BIN)/fedbucket init --config $(FEDBUCKET_CONFIG)
	@echo "Airflow UI: http://127.0.0.1:8080  (local login: every user is admin; see docs/operations.md)"
	@echo "Trigger a round: DAG fedbucket_round > Trigger; clients: .venv/bin/fedbucket simulate --bucket <bucket in $(FEDBUCKET_CONFIG)>"
	PATH="$(abspath $(BIN)):$$PATH" AIRFLOW_HOME=$(AIRFLOW_LOCAL_HOME) FEDBUCKET_CONFIG=$(FEDBUCKET_CONFIG) \
	  AIRFLOW__CORE__LOAD_EXAMPLES=False AIRFLOW__CORE__DAGS_FOLDER=$(abspath dags) \
	  AIRFLOW__CORE__PLUGINS_FOLDER=$(abspath plugins) PYTHONPATH=$(abspath plugins) \
	  AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=True \
	  AIRFLOW__API__HOST=127.0.0.1 AIRFLOW__API__PORT=8080 \
	  $(BIN)/airflow standalone

results: setup  ## 20 rounds of the DAG with 10 honest non-IID clients vs central training: docs/results.md
	$(PY) examples/results.py

bench: setup  ## measure speed and memory; writes docs/benchmarks.md and docs/benchmarks/*.json
	$(PY) -m tests.benchmarks.run $(BENCH_ARGS)

lock: setup  ## regenerate constraints.txt from the current environment
	{ echo '# Locked versions of every package (direct and transitive) for requirements.txt. Regenerate: make lock'; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^fedbucket'; } > constraints.txt

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) $(SPARK35_VENV) .pytest_cache .ruff_cache demo-output results-output airflow-home
