"""Root conftest: loads the fq-suite pytest wiring; the logic lives in fq_core."""

pytest_plugins = ["fq_pytest.plugin", "fq_pytest.report"]
