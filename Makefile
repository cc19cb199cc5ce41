# Metergate: everything a developer, CI and a load tester run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench check fmt clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	METERGATE_COMPILE=0 $(BIN)/pip install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

# The request's hot path compiled with mypyc in place (gateway/compiled.py): about 10-30%
# less CPU per request, by the CPU. Again whenever a file of gateway/ or config/ (its types
# come from there) changes, or one is added or deleted (the directories change). Without a
# C compiler it stays source, with a warning, and the next make tries again: the step
# counts as done only when this Python's compiled modules are there and current. PURE=1
# runs the source although compiled. Built apart from build/lib, which a wheel would take in.
COMPILED := $(VENV)/.compiled
COMPILED_OK := import sys; from gateway import compiled as c; \
	sys.exit(bool(c.stale()) or not c.extension_files())
$(COMPILED): $(STAMP) setup.py gateway config $(wildcard gateway/*.py config/*.py)
	$(BIN)/python setup.py --quiet build_ext --inplace --build-lib build/inplace
	if $(BIN)/python -W ignore -c '$(COMPILED_OK)'; then touch $(COMPILED); fi

ifneq ($(filter-out 0,$(PURE)),)
export METERGATE_PURE_PYTHON := 1
endif

# Everything at once: Redis (embedded unless METERGATE_REDIS_URL is set), a demo signals
# backend on :9000, the gateway on :8080 and the admin app on :8081.
run: $(COMPILED)
	$(BIN)/metergate up

# The whole suite against a real Redis: METERGATE_TEST_REDIS_URL (database 15 only)
# when set and reachable, else an embedded redis-server started for the run.
test: $(COMPILED)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

check: $(COMPILED)
	$(BIN)/metergate check

# wrk and nginx from the OS (apt-get install -y nginx wrk); e.g. BENCH_ARGS="--scaling".
bench: $(COMPILED)
	$(BIN)/python -m loadtests.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var build .pytest_cache .mypy_cache .ruff_cache gateway/*.so gateway/_hot_sources*.json
