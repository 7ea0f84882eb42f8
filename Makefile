# The README's two commands: `make demo` (set up + run the bundled demo audit), `make test` (set up + tests).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test setup setup-test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q -e .

setup-test: $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'

demo: setup
	$(BIN)/xaudit run data/demo_audit.yaml data/demo_audit_candidate.yaml data/demo_audit_stamp.yaml

test: setup-test
	$(BIN)/python -m pytest

bench: setup-test
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python benchmarks/metrics.py
	$(BIN)/python benchmarks/attribution.py

clean:
	rm -rf runs .prefect .pytest_cache
