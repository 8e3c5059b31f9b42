# The README's two commands are `make serve` and `make test`; both install first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test lint faults sweep bench bench-core bench-service bench-confinement bench-zoo bench-pt2e clean

install: $(STAMP)

# Re-install only when the project's dependency list changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[service,test]'
	touch $(STAMP)

serve: install
	$(BIN)/compactor serve

test: install lint
	$(BIN)/python -m pytest

# Formatting, lint and types (pyproject.toml's [tool.ruff] and [tool.mypy]); part of `make test`, so CI enforces them.
lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

# The fault suite alone (also part of `make test`); prints the table of the README's
# Reliability section and writes it to .pytest_cache/faults.md.
faults: install
	$(BIN)/python -m pytest -m faults tests/faults

# Every torchvision classifier, traced and scripted, through both op-allowlist checkers (~4 min).
sweep: install
	$(BIN)/python -m pytest -m sweep tests/compression/test_graph_check.py

bench: bench-core bench-service bench-confinement bench-zoo bench-pt2e sweep

bench-core: install
	$(BIN)/python -m bench.core
	$(BIN)/python -m bench.core --resnet50

# PT2E + Inductor beside the FX INT8 path (torchao, the bench extra); writes bench/results/pt2e.md.
bench-pt2e: install
	$(BIN)/python -m pip install --quiet -e '.[service,test,bench]'
	$(BIN)/python -m bench.pt2e

bench-service: install
	$(BIN)/python -m bench.service

# One model of every torchvision family (and custom and timm ones) through every upload door,
# channel 30% + static INT8 (~30 min on two cores); writes bench/results/zoo.md.
bench-zoo: install
	$(BIN)/python -m bench.zoo

# What a job's child process costs, confined (TorchScript) or not (state-dict), against the core in-process.
bench-confinement: install
	$(BIN)/python -m bench.confinement

clean:
	rm -rf $(VENV) compactor-data .pytest_cache
