# bshm-watchd — `make setup` (idempotent), `make run`, `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= dev,gpu
comma  := ,
STAMP  := $(VENV)/.stamp-$(subst $(comma),-,$(EXTRAS))
CONFIG ?= config/example.yaml

.PHONY: setup models run test lint typecheck pytest soak clean

setup: $(STAMP) models

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python >= 3.11 needed"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	@touch $(STAMP)

models: $(STAMP)
	$(BIN)/bshm-watchd models fetch

run: setup
	@mkdir -p var/inbox var/outbox var/failed var/state
	@echo "bshm-watchd: drop scans into $(CURDIR)/var/inbox; cut-outs appear in $(CURDIR)/var/outbox (Ctrl-C stops)"
	$(BIN)/bshm-watchd run -c $(CONFIG)

lint: setup
	$(BIN)/ruff check bshm_watchd tests benchmarks

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/python -m pytest -q -ra

test: lint typecheck pytest

soak: setup
	$(BIN)/python -m pytest -q -ra -m soak

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
