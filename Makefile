# Two front doors: `make gate` (Test 1 and its report) and `make test` (everything).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fq-installed
PYTEST_ARGS ?=

.PHONY: gate test test-latest lock lock-upgrade setup doctor lint clean

# The venv is built by uv from the hash-locked requirements/lock.txt, so a run next month
# installs exactly what this one did; a changed lock rebuilds it.
$(STAMP): pyproject.toml requirements/lock.txt requirements/uv.txt scripts/bootstrap-system.sh scripts/python-env.sh
	bash scripts/bootstrap-system.sh
	PYTHON=$(PYTHON) bash scripts/python-env.sh locked $(VENV)
	touch $@

setup: $(STAMP)
	$(BIN)/fq setup

# The plan's markdown reports are written even on NO-GO; the exit status stays pytest's.
gate: setup
	$(BIN)/pytest -k layer0 $(PYTEST_ARGS); status=$$?; \
	$(BIN)/fq report $${FQ_RESULTS_DIR:-results} reports || true; exit $$status

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

# Upgrades on purpose: the whole suite against the newest releases pyproject.toml allows,
# in a venv of its own (.venv-latest); the lock and .venv are left alone.
test-latest:
	bash scripts/bootstrap-system.sh
	PYTHON=$(PYTHON) bash scripts/python-env.sh latest .venv-latest
	.venv-latest/bin/fq setup
	.venv-latest/bin/pytest $(PYTEST_ARGS)

# Refresh the lock: `make lock` keeps every pin that still fits pyproject.toml (after a
# dependency was added), `make lock-upgrade` moves every pin to the newest release.
lock:
	PYTHON=$(PYTHON) bash scripts/python-env.sh lock

lock-upgrade:
	PYTHON=$(PYTHON) bash scripts/python-env.sh lock --upgrade

doctor: $(STAMP)
	$(BIN)/fq doctor

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .venv-latest .pytest_cache .hypothesis .benchmarks
