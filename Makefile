# Two front doors: `make gate` (Test 1 and its report) and `make test` (everything).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fq-installed
PYTEST_ARGS ?=

.PHONY: gate test setup doctor lint clean

$(STAMP): pyproject.toml scripts/bootstrap-system.sh
	bash scripts/bootstrap-system.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(STAMP)
	$(BIN)/fq setup

gate: setup
	$(BIN)/pytest -k layer0 $(PYTEST_ARGS)

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

doctor: $(STAMP)
	$(BIN)/fq doctor

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .benchmarks
