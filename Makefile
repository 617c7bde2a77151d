# The two commands: `make demo` and `make test`. Both create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-more lint clean install

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m examples.demo

test: $(STAMP)  ## the whole suite, on both cores (pytest-xdist); one file: make test T=tests/x.py
	$(BIN)/python -m pytest -q -n 2 $(T)

bench: $(STAMP)  ## 4-12 minutes (by the day's machine): prints tables, writes bench/results/{system,workflows,plugins,security}-*.json
	$(BIN)/python -m bench.system
	$(BIN)/python -m bench.workflows
	$(BIN)/python -m bench.plugins
	$(BIN)/python -m bench.security

bench-more: $(STAMP)  ## the older, narrower benchmarks: raw vs Stack, durability, replay
	$(BIN)/python -m bench.throughput
	$(BIN)/python -m bench.durability
	$(BIN)/python -m bench.replay

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m tests.typecheck_tree >/dev/null
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .jetflow .pytest_cache build
