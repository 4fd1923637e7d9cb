# Two entry points: `make run` (install + the default study) and `make test` (install + tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CORES  ?= all

# pytest-xdist workers for `make test` / `make test-quick` (auto: one per core)
WORKERS ?= auto
PYTEST := PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n $(WORKERS) --dist worksteal

.PHONY: run test test-quick install lint bench readme clean-study gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements-lock.txt -e ".[pipeline,dev]"
	touch $(STAMP)

run: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores $(CORES)

# Every test, the 25 slowest listed at the end (CI runs this through .ci/run).
test: $(STAMP)
	$(PYTEST) --durations=25

# The inner loop while editing: everything not marked slow (about 2 minutes on 2 cores).
test-quick: $(STAMP)
	$(PYTEST) -m "not slow" --durations=10

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

readme: $(STAMP)
	$(BIN)/python -m pipeline.readme

bench: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench

# The prepared GPU check (bench/gpu_check.py, at most 8 minutes on one H100/H200): with the
# project's venv when installed, else the machine's python3; ARGS="--dry" runs it on the CPU.
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m bench.gpu_check $(ARGS)

clean-study:
	rm -rf data/shards data/models data/signals data/evals data/bounds data/checkpoints logs .snakemake
