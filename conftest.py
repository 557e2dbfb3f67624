"""Root conftest: loads the fq-suite pytest wiring; the logic lives in fq_core."""

import os

from hypothesis import HealthCheck, settings

pytest_plugins = [
    "fq_pytest.plugin",
    "fq_pytest.markers",
    "fq_pytest.report",
    "fq_pytest.progress",
    "fq_pytest.regression",
    "fq_pytest.sweep",
    "fq_pytest.interrupts",
]

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
