# stockflow's entry points. `make demo` and `make test` do all the set-up on a fresh machine:
# the virtual environment, the system packages, and the local stack (cached per machine).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv system-deps demo test test-fast chaos bench bench-scale lint format up down status clean

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

venv: $(STAMP) ## Create .venv and install stockflow with its dev tools

system-deps: ## Install missing system packages the stack needs (redis-server, PostgreSQL, kcat, JDK, Maven)
	@bash scripts/system-deps.sh

demo: $(STAMP) system-deps ## Run the seed's pipeline end to end on the local stack
	$(BIN)/stockflow demo

test: $(STAMP) system-deps lint ## Lint, the whole suite on the real stack (started if needed), chaos at 1/10 size
	$(BIN)/stockflow stack up
	$(BIN)/python -m pytest --reruns 1 $(PYTEST_ARGS)
	STOCKFLOW_CHAOS_SCALE=0.1 $(BIN)/python -m pytest tests/chaos -m "chaos and not full_size_only" $(PYTEST_ARGS)

chaos: $(STAMP) system-deps ## Chaos scenarios at full size (STOCKFLOW_CHAOS_SCALE=1): kill -9, outages, bad input
	$(BIN)/stockflow stack up
	STOCKFLOW_CHAOS_SCALE=$${STOCKFLOW_CHAOS_SCALE:-1} $(BIN)/python -m pytest tests/chaos -m chaos -s $(PYTEST_ARGS)

bench: $(STAMP) system-deps ## The benchmark: seed's design vs stockflow vs ceilings, FerretDB with and without its compare-and-set patch (~20 min); writes bench/results and docs/performance.md
	$(BIN)/stockflow stack up
	$(BIN)/python -m bench.run --write-docs $(BENCH_ARGS)

bench-scale: $(STAMP) system-deps ## 1-3 worker processes, one broker vs three (~10 min); writes bench/results/scaling.json and docs/scaling.md
	$(BIN)/stockflow stack up
	$(BIN)/python -m bench.scaling --write-docs $(BENCH_ARGS)

test-fast: $(STAMP) ## Unit tests only (no services)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

lint: $(STAMP) ## ruff and mypy --strict
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

format: $(STAMP) ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

up: $(STAMP) system-deps ## Start the local stack
	$(BIN)/stockflow stack up

down: $(STAMP) ## Stop the local stack
	$(BIN)/stockflow stack down

status: $(STAMP) ## Show the local stack
	$(BIN)/stockflow stack status

clean: down ## Stop the stack and delete its state (data, logs); the download cache stays
	@loc=$$(cat .stack/postgres/data-location 2>/dev/null); \
	case "$$loc" in */stockflow-postgres-*) rm -rf "$$loc";; esac
	rm -rf .stack
