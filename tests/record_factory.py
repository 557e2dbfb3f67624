"""A valid stage record as plain data, built without llama.cpp, for store and report tests."""

from __future__ import annotations

import copy
from typing import Any

from fq_core.experiment.checks import CHECKS
from fq_core.storage import record
from fq_core.storage.record import REPORT_ONLY


def _check(status: str = "passed", gates: bool = True, **more: Any) -> dict:
    return {
        "status": status,
        "detail": f"{status} detail",
        "value": 0.5,
        "threshold": 1.0,
        "gates": gates,
        **more,
    }


BASE: dict[str, Any] = {
    "schema": record.SCHEMA,
    "run_id": "R1",
    "stage": "layer0",
    "stage_title": "Test 1",
    "stage_index": 1,
    "layers": "0",
    "model": {"name": "m", "path": "/models/m.gguf", "sha256": "ab" * 32},
    "corpus": {
        "path": "/data/wiki.test.raw",
        "sha256": "cd" * 32,
        "n_bytes": 1290547,
        "n_tokens": 295173,
    },
    "llama": {
        "version": "0.5.0-dev",
        "build_info": "GNU 12",
        "bin_dir": "/llama/bin",
        "build_id": "ef" * 32,
    },
    "fq_version": "0.1.0",
    "machine": {
        "hostname": "h",
        "cpu": "cpu",
        "cores": 2,
        "python": "3.11.7",
        "platform": "Linux",
    },
    "settings": {
        "format": "bf16",
        "rounding": "truncate",
        "tensors": ["ffn_norm"],
        "ctx": 512,
        "batch": 512,
        "chunks": 8,
        "kld_chunks": 8,
        "threads": 2,
        "gen_tokens": 32,
        "prompts": [{"text": "Hello", "chat": False}],
        "placebo_seeds": [1],
    },
    "thresholds": {
        "ppl_delta_max": 0.02,
        "max_rel_error": 0.01,
        "kld_mean_max": 0.02,
        "same_top_min": 0.9,
        "agreement_min": None,
        "noise_factor_max": None,
        "speed_ratio_min": None,
    },
    "checks": {name: _check(gates=name not in REPORT_ONLY) for name in CHECKS},
    "outcome": "passed",
    "started_at": "2026-11-29T00:00:00Z",
    "finished_at": "2026-11-29T00:01:00Z",
}


def make_record(**overrides: Any) -> dict:
    """BASE with top-level fields replaced; a fresh deep copy every call."""
    data = copy.deepcopy(BASE)
    data.update(copy.deepcopy(overrides))
    return data
