"""Fixtures for the library's own tests: real model files, resolved through the registry."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from fq_core.measurement.models import resolve_model

    return resolve_model("smollm2-135m").path


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    from fq_core.measurement.models import resolve_model

    return resolve_model("gemma3-270m").path


@pytest.fixture(scope="session", params=["smollm2-135m", "gemma3-270m"])
def real_gguf(request) -> Path:
    from fq_core.measurement.models import resolve_model

    return resolve_model(request.param).path
