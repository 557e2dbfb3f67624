# Two front doors: `make gate` (Test 1 and its report) and `make test` (everything);
# `make check` is the fast offline tier (no llama.cpp, models, network or browser).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fq-installed
SYSTEM := $(VENV)/.fq-system
PYTEST_ARGS ?=
REPORTS ?= reports

.PHONY: recipe gate test check sweep test-latest lock lock-upgrade setup doctor lint clean

# The venv is built by uv from the hash-locked requirements.txt, so a run next month
# installs exactly what this one did; a changed lock rebuilds it. System packages (apt) come
# first; a changed bootstrap script runs again without rebuilding the venv (order-only).
$(STAMP): pyproject.toml requirements.txt requirements-uv.txt scripts/python-env.sh | $(SYSTEM)
	PYTHON=$(PYTHON) bash scripts/python-env.sh locked $(VENV)
	touch $(SYSTEM) $@

$(SYSTEM): scripts/bootstrap-system.sh
	bash scripts/bootstrap-system.sh
	mkdir -p $(VENV) && touch $@

setup: $(STAMP)
	$(BIN)/fq setup

# The plan's markdown reports are written even on NO-GO; the exit status stays pytest's.
# They come from this session's run (FQ_RUN_ID, else a new id) and no other: a session that
# stored nothing (a usage error: exit 4) leaves the reports of an older run as they were.
gate: setup
	@run=$${FQ_RUN_ID:-$$($(BIN)/python -c 'from fq_core.storage.results import new_run_id as n; print(n())')}; \
	dir=$${FQ_RESULTS_DIR:-results}/$$run; \
	echo "FQ_RUN_ID=$$run $(BIN)/pytest -k layer0 $(PYTEST_ARGS)"; \
	FQ_RUN_ID=$$run $(BIN)/pytest -k layer0 $(PYTEST_ARGS); status=$$?; \
	if [ -d "$$dir" ]; then $(BIN)/fq report "$$dir" $(REPORTS) || true; \
	else echo "make gate: run $$run stored no results (pytest exit $$status):" \
	  "$(REPORTS)/ not rewritten" >&2; fi; \
	exit $$status

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

# The sensitivity sweep (experiments/test_sensitivity.py): the full plan the fq_sweep_* values
# describe (default Gemma3, ffn_norm, every layer alone + the cumulative curve, BF16, the
# intrinsic answer, each cell run until decided) -> reports/sensitivity.html, .md, .json and charts/. Cells are cached: a wider or
# interrupted sweep runs only new cells. Its pytest-html report goes to reports/sweep.html.
sweep: setup
	$(BIN)/pytest -m sweep --fq-sweep-plan full --html=reports/sweep.html \
	  --benchmark-json=reports/sweep-benchmark.json $(PYTEST_ARGS)

# The full recipe of Gemma3-270M: every weight matrix in 3 runs of layers, priced, chosen within
# Q4_K_M's bytes, built and measured against Q4_K_M (about an hour on 2 cores; Test 1 first).
RECIPE_KINDS := attn_q attn_k attn_v attn_output ffn_gate ffn_up ffn_down token_embd
recipe: setup
	$(BIN)/pytest experiments -k "layer0 or recipe" --fq-model gemma3-270m \
	  --fq-recipe-models gemma3-270m --fq-recipe-kinds "$(RECIPE_KINDS)" --fq-recipe-groups 3 \
	  --fq-recipe-price-chunks 6 --fq-recipe-rank-chunks 4 --fq-recipe-chunks 8 \
	  --html=reports/recipe.html --benchmark-json=reports/recipe-benchmark.json $(PYTEST_ARGS)

# The offline tier: builds nothing, downloads nothing (empty cache and no network are fine).
# Its report and benchmark figures go beside, not over, those of `make gate` / `make test`.
CHECK_MARKERS := not (models or llama or network or browser or slow)
check: $(STAMP)
	$(BIN)/pytest -m "$(CHECK_MARKERS)" --html=reports/check.html \
	  --benchmark-json=reports/check-benchmark.json $(PYTEST_ARGS)

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

# lint-imports: the layers of fq_core (pyproject.toml [tool.importlinter], docs/architecture.md).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .venv-latest .pytest_cache .hypothesis .benchmarks
