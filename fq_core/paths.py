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
    return Path(os.environ.get("FQ_RESULTS_DIR") or "results")
