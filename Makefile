# Two commands: `make demo` and `make test`. Both create the virtualenv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.a3x-installed
DEMO_HOME ?= $(CURDIR)/demo-home
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint clean-demo

setup: $(STAMP)

# torch is installed first and pinned: its CPU build of 2.13.0 is what the
# project is tested with, and a range left open pulls a multi-GB CUDA build.
# llama-cpp-python compiles from source (about 7 minutes on 2 cores) and pip
# caches the wheel afterwards.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	A3X_HOME=$(DEMO_HOME) $(BIN)/a3x cycle
	@echo "Read the journal: $(DEMO_HOME)/journal/index.md, or: A3X_HOME=$(DEMO_HOME) $(BIN)/a3x journal"

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/pytest -m 'not slow' $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check daemon runtime journal evaluators knowledge lora bench tests
	$(BIN)/mypy daemon runtime journal evaluators knowledge lora bench

clean-demo:
	rm -rf $(DEMO_HOME)
