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
