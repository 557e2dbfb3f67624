"""Where fq-suite keeps things: a per-user cache outside the clone, per-project outputs inside."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Slow-to-make things (llama.cpp builds, models, KLD logits), shared by clones and runs."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fq-suite"


def logs_dir() -> Path:
    """The command log lives with the project outputs, overridable for tests."""
    return Path(os.environ.get("FQ_LOG_DIR") or "logs")


def results_dir() -> Path:
    """The results store; a file in its place is refused here, once, for every user of it."""
    path = Path(os.environ.get("FQ_RESULTS_DIR") or "results")
    if path.exists() and not path.is_dir():
        from ..errors import OutputRefused

        name = "FQ_RESULTS_DIR=" if os.environ.get("FQ_RESULTS_DIR") else "the results store "
        raise OutputRefused(f"{name}{path} is not a directory")
    return path


#: The cache_dir() entries worth keeping between CI runs (docs/ci-example.yml caches exactly
#: these): slow to make or fetch, and small (≈ 0.45 GB with the two default models). Left out:
#: `baselines` (each entry holds the exact baseline logits, up to 2.1 GB per model; remade in a
#: few minutes, and deterministic on one build and CPU, so the cached treatments keyed by
#: their SHA-256 still hit), `twins` (an F32 copy of each model, remade from it), `recipes`
#: (recipe and preset GGUFs, remade by llama-quantize in seconds) and `rejected`.
CI_CACHED = (
    "llama.cpp",
    "sdist",
    "models",
    "corpus",
    "placebos",
    "treatments",
    "cells",
    "deployable",
    "recipe-answers",
    "sha256-cache.json",
)
#: What CI_CACHED may add up to (docs/ci-example.yml states it; GitHub keeps 10 GB per repo).
CI_CACHE_BUDGET_GB = 2
