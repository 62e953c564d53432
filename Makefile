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

.PHONY: help setup java-check test lint format demo bench lock clean

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

lint: setup  ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint  ## lint, then the whole test suite (pytest's "no tests ran" counts as failure)
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi; exit $$rc

demo: setup  ## run the part of the pipeline that exists, for real, and say what it did
	$(PY) examples/protocol_tour.py

bench: setup  ## measure speed and memory; writes docs/benchmarks.md and docs/benchmarks/*.json
	$(PY) -m tests.benchmarks.run $(BENCH_ARGS)

lock: setup  ## regenerate constraints.txt from the current environment
	{ echo '# Locked versions of every package (direct and transitive) for requirements.txt. Regenerate: make lock'; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^fedbucket'; } > constraints.txt

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache demo-output
