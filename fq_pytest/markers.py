"""What each test needs, as markers added from the fixtures it uses (before -m selects).

`models` = the default models (model cache, else a PyPI download), `llama` = a real
llama.cpp tool (the build `fq setup` makes), `benchmark` = pytest-benchmark measurements.
A test that reaches a model, llama.cpp or the network another way (resolve_model,
find_tools, `pip download`, a pytest subprocess) carries the marker itself; the
`network` and `browser` markers are only ever explicit. So `-m "not (models or llama)"`
runs with an empty cache and builds and downloads nothing (`make check`).
"""

from __future__ import annotations

import pytest

#: Every marker the suite uses, registered by the plugin (not pytest.ini) so that the installed
#: stage tests run under --strict-markers from any repository.
MARKERS: dict[str, str] = {
    "slow": "long-running (exhaustive sweeps); make test runs them",
    "models": "needs the default models (model cache, else a PyPI download)",
    "llama": "runs a real llama.cpp tool (needs the llama.cpp build and the corpus)",
    "network": "needs the network (pip downloads from PyPI)",
    "browser": "needs headless Chromium (scripts/bootstrap-system.sh installs it)",
    "benchmark": "pytest-benchmark measurements",
    "stage": "a stage of the experiment (Test 1-4)",
    "sweep": "a cell of the sensitivity sweep (experiments/test_sensitivity.py; "
    "make sweep = -m sweep --fq-sweep-plan full)",
    "recipe": "the recipe stage (experiments/test_recipe.py: a mixed-precision recipe "
    "built and measured against the stock preset)",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, meaning in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")


# fixture name (anywhere in a test's fixture closure) -> markers it implies
FIXTURE_MARKERS: dict[str, tuple[str, ...]] = {
    "smollm2_gguf": ("models",),  # tests/conftest.py: resolve_model(...)
    "gemma3_gguf": ("models",),
    "real_gguf": ("models",),
    "fq_result": ("models", "llama"),  # a stage × model result (fq_pytest.plugin)
    "fq_recipe": ("models", "llama"),  # a recipe record (fq_pytest.recipe)
    "real_run": ("models", "llama"),  # tests/test_report.py: a real `pytest -k layer0` run
    "benchmark": ("benchmark",),
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects (the mark plugin's own hook)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            for name in FIXTURE_MARKERS.get(fixture, ()):
                if item.get_closest_marker(name) is None:
                    item.add_marker(name)
