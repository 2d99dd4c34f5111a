# The few commands a person needs. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo down test test-long mutation lint typecheck sql-check sql pytest bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## Start PostgreSQL (embedded) and the example peers; prints where to look.
demo: $(STAMP)
	$(BIN)/dejima up

## Stop what `make demo` started.
down: $(STAMP)
	$(BIN)/dejima down

## Regenerate the committed SQL from the manifests.
sql: $(STAMP)
	$(BIN)/python manage.py dejima_sql

## Fails when the committed SQL under sql_triggers/ is stale.
sql-check: $(STAMP)
	$(BIN)/python manage.py dejima_sql --check

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy peer tests manage.py

pytest: $(STAMP)
	$(BIN)/pytest

## The whole suite: generated SQL fresh, lint, types, tests (unit, integration, cluster). Hypothesis is derandomized
## (profile `ci`, tests/conftest.py): every run draws the same examples.
test: sql-check lint typecheck pytest

## By hand: every property test (Hypothesis) with random draws and 20 times its examples (about 10 minutes).
test-long: $(STAMP)
	HYPOTHESIS_PROFILE=long $(BIN)/pytest -m hypothesis

## By hand: the mutation check of the commit log and the merge (peer/dejima/txlog.py, apply.py) against the unit
## tier ([tool.mutmut] in pyproject.toml; about 5 minutes): the counts, then the survivors (`mutmut show NAME`: a diff).
MUTMUT_VERSION := 3.8.1
mutation: $(STAMP)
	$(BIN)/python -m pip install --quiet mutmut==$(MUTMUT_VERSION)
	rm -rf mutants
	$(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut results | grep survived || true

## The quick version of every benchmark (< 5 min); results in bench-results/<name>/ (report.md, result.json, PNGs).
bench: $(STAMP)
	$(BIN)/python -m peer.bench all --quick

clean:
	rm -rf .dejima .pytest_cache .pytest-tmp .mypy_cache .ruff_cache .hypothesis
