"""pytest wiring for fq-suite: options, fixtures, the gate and report hooks.

The library (fq_core) never imports pytest; everything pytest-shaped lives here. Installed,
this package is a pytest plugin (the `pytest11` entry point `fq_pytest`) that loads the modules
below; the stage tests ship with it: `pytest --pyargs fq_pytest.stages -k layer0`.
"""

pytest_plugins = [
    "fq_pytest.rootdir",
    "fq_pytest.plugin",
    "fq_pytest.markers",
    "fq_pytest.report",
    "fq_pytest.progress",
    "fq_pytest.regression",
    "fq_pytest.sweep",
    "fq_pytest.recipe",
    "fq_pytest.interrupts",
]
