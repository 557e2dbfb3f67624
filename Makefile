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

# The plan's markdown reports are written even on NO-GO; the exit status stays pytest's.
gate: setup
	$(BIN)/pytest -k layer0 $(PYTEST_ARGS); status=$$?; \
	$(BIN)/fq report $${FQ_RESULTS_DIR:-results} reports || true; exit $$status

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

doctor: $(STAMP)
	$(BIN)/fq doctor

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .benchmarks
