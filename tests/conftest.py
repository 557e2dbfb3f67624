"""Fixtures for the library's own tests: real model files, resolved through the registry."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from fq_core.models import resolve_model

    return resolve_model("smollm2-135m").path


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    from fq_core.models import resolve_model

    return resolve_model("gemma3-270m").path


@pytest.fixture(scope="session", params=["smollm2-135m", "gemma3-270m"])
def real_gguf(request) -> Path:
    from fq_core.models import resolve_model

    return resolve_model(request.param).path


# Hypothesis profiles: `ci` is derandomized (same examples every run, no flaky gate);
# `deep` explores far more widely for local runs: HYPOTHESIS_PROFILE=deep pytest ...
import os  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", derandomize=True, max_examples=300, deadline=None)
settings.register_profile(
    "deep",
    max_examples=3_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
