# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing
# and installs the project with its dev extras first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck unit protos bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing sidemesh and its dev tools into $(VENV) ..."
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sidemesh demo

test: $(STAMP) lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

protos: $(STAMP)
	$(BIN)/python -m sidemesh.api.generate

bench: $(STAMP)
	$(BIN)/python -m bench.ca_sign

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
