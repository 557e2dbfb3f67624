"""Root conftest of the checkout: the fq-suite wiring and the Hypothesis profiles."""

import os

from hypothesis import HealthCheck, settings

# The wiring is the installed plugin (entry point `fq_pytest`); named here too for a checkout
# used without installing it, and skipped by pytest when the entry point already loaded it.
pytest_plugins = ["fq_pytest"]

# Hypothesis profiles for tests/ and experiments/: `ci` is derandomized (same examples every
# run, so the gate never flakes); `deep` explores far wider locally: HYPOTHESIS_PROFILE=deep.
settings.register_profile("ci", derandomize=True, max_examples=300, deadline=None)
settings.register_profile(
    "deep",
    max_examples=3_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
