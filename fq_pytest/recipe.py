"""pytest wiring of the recipe stage (experiments/test_recipe.py); logic in
fq_core.experiment.recipe.

- Options: `fq_recipe_*` ini values, each also a `--fq-recipe-…` flag.
- One test per model of `fq_recipe_models`, id `recipe-<model>` (`pytest -k recipe`), gated on
  that model's Test 1 like stages 2-4; marked `recipe` (`-m "not recipe"` leaves it out).
- At the end of the session (controller only): reports/recipe.md beside the HTML report, and a
  section in the pytest-html report, from this run's recipe records.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

from fq_core.definitions.settings import RECIPE as SETTINGS
from fq_pytest.plugin import SESSION, StageCase, add_options, refuse
from fq_pytest.plugin import option_values as plugin_option_values

log = logging.getLogger(__name__)

RECIPE = pytest.StashKey[dict]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fq-recipe", "fq-suite recipe stage (experiments/test_recipe.py)")
    add_options(parser, group, SETTINGS)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[RECIPE] = plugin_option_values(config, SETTINGS)  # validates them now


@dataclass(frozen=True)
class RecipeCase:
    model: str  # as given
    model_id: str

    @property
    def id(self) -> str:
        return f"recipe-{self.model_id}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "fq_recipe_case" not in metafunc.fixturenames:
        return
    from fq_core.errors import FqError
    from fq_core.measurement.models import model_ids

    try:
        ids = model_ids(metafunc.config.stash[RECIPE]["fq_recipe_models"])
    except FqError as exc:
        refuse(metafunc.config, f"recipe models: {exc}")
        ids = []
    cases = [RecipeCase(m.given, m.id) for m in ids]
    metafunc.parametrize("fq_recipe_case", [pytest.param(c, id=c.id) for c in cases])


@pytest.fixture
def fq_recipe(request: pytest.FixtureRequest, fq_recipe_case: RecipeCase):
    """The stored recipe record of this model (computed now; its cells, files and answers
    come from the cache when measured before); skips with the gate's reason if closed."""
    from fq_core.errors import FqError
    from fq_core.experiment.recipe import RecipePlan, run_recipe
    from fq_core.experiment.stages import Context
    from fq_core.measurement.llama.runner import LlamaRunner
    from fq_core.platform import progress
    from fq_core.storage.recipe_record import recipe_path, save_recipe

    fq = request.config.stash[SESSION]
    case = StageCase("recipe", fq_recipe_case.model, fq_recipe_case.model_id, "intrinsic")
    path = recipe_path(fq.run_id, fq_recipe_case.model_id, fq.root)
    request.node.user_properties += [("fq_run_id", fq.run_id), ("fq_recipe", str(path))]
    try:
        decision = fq.gate(case)
        request.node.user_properties.append(("fq_gate", decision.reason))
        if not decision.open:
            pytest.skip(decision.reason)
        ctx = Context(fq.run_id, LlamaRunner(fq.tools), fq.tools, fq.corpus, fq.root)
        plan = RecipePlan.from_settings(request.config.stash[RECIPE])
        with progress.context(stage="recipe", model=fq_recipe_case.model_id):
            rec = run_recipe(
                fq.model(case),
                fq_recipe_case.model_id,
                ctx,
                fq.experiment,
                plan,
                on_record=lambda r: save_recipe(r, fq.root),
            )
        save_recipe(rec, fq.root)
        return rec
    except FqError as exc:  # a refusal, a missing model or tool: one line, not a traceback
        failure = f"{type(exc).__name__}: {exc}"
    pytest.fail(failure, pytrace=False)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """Write reports/recipe.md from this run's recipe records (controller only)."""
    if hasattr(config, "workerinput"):
        return
    from fq_core.report import recipe as recipe_report
    from fq_core.storage import results
    from fq_core.storage.recipe_record import read_recipe, recipe_paths
    from fq_pytest.sweep import _reports_dir

    fq = config.stash[SESSION]
    paths = recipe_paths(results.run_dir(fq.run_id, fq.root))
    if not paths:
        return
    try:
        out = recipe_report.write_markdown([read_recipe(p) for p in paths], _reports_dir(config))
    except Exception as exc:  # the report must never turn the run into an internal error
        log.exception("recipe report failed")
        terminalreporter.write_line(f"fq recipe: no report ({type(exc).__name__}: {exc})")
        return
    terminalreporter.write_line(f"fq recipe: {out}")
