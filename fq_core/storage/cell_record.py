"""The record of one sweep cell, beside the stage's (fq_core.storage.record): the same
identity, machine and resolution parts, stored at
``results/<run-id>/sweep/cells/<cell-id>.json`` — one level deeper than the stage records, so
the stage report's ``<stage>/<case>.json`` glob never sees it, and shards of one sweep
(pytest-split, other machines) each write their own files. This module computes nothing."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgspec

from ..errors import BadInput
from . import codec, results
from .identity import Identity, MachineInfo
from .record import Resolution, SequentialStop

#: None: not measured; NaN and ±Inf stay floats (storage.codec turns them into words in JSON)
Num = float | None

CELL_SCHEMA = 1
#: a cell's status when its real file is one llama.cpp cannot run (its error: llama.cpp's line)
NOT_DEPLOYABLE = "not deployable"
SWEEP_DIR = "sweep"
CELLS_DIR = "cells"
P_TEST = (
    "one-sided one-sample t-test on the per-chunk differences treatment − mean placebo "
    "(H1: the treatment moves KLD more than its placebos)"
)
ANYTIME_P_TEST = (
    "anytime-valid p of the normal-mixture confidence sequence on the per-chunk log ratios "
    "treatment / placebo (H1: above the placebo), valid at whatever chunk the cell stopped"
)


class _Part(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class CellInfo(_Part, kw_only=True):
    id: str
    model: str
    kind: str
    format: str
    rounding: str
    variant: str
    series: str
    layers: str
    layer: int | None = None
    n_layers: int | None = None


class CellNumeric(_Part, kw_only=True):
    tensors: tuple[str, ...]
    n_elements: int
    changed: int
    max_abs: Num
    max_rel: Num
    mean_rel: Num
    n_became_nonfinite: int = 0
    # the selected tensors' bytes in the model file, and stored as the cell's format the way
    # llama.cpp stores it (None: no llama.cpp storage type, e.g. fp8 or int8)
    bytes_model: int | None = None
    bytes_format: int | None = None


class CellTreatment(_Part, kw_only=True):
    identical: bool  # the fake-quantized file is byte-identical: no run, KLD 0 by identity
    kld_mean: Num
    chunk_klds: tuple[Num, ...]
    same_top_pct: Num
    ppl: Num
    baseline_ppl: Num
    delta_ppl_pct: Num
    delta_ppl_pct_err: Num


class CellPlacebo(_Part, kw_only=True):
    seed: int
    key: str
    kld_mean: Num
    chunk_klds: tuple[Num, ...]
    same_top_pct: Num = None
    cached: bool | None = None
    measured_at: str | None = None  # when its cache entry was measured


class CellTiming(_Part, kw_only=True):
    """Seconds of the cell's own work when it was computed (a cache hit keeps these)."""

    quantize_s: float
    evaluate_s: float  # the llama.cpp run, as fq called it
    llama_s: float | None  # the llama.cpp process alone (its CommandRecord)
    placebo_s: float = 0.0  # this run's placebo work (0 when all were cached)
    total_s: float = 0.0  # this run: everything the cell took, cache hits included


class CellRecord(_Part, kw_only=True):
    schema: int
    run_id: str
    cell: CellInfo
    identity: Identity
    status: str  # "measured" | "error" | NOT_DEPLOYABLE
    error: str | None = None
    numeric: CellNumeric | None = None
    treatment: CellTreatment | None = None
    placebo: tuple[CellPlacebo, ...] = ()
    resolution: Resolution | None = None
    p_value: float | None = None  # None: nothing to test (identical file, no placebo, < 2 chunks)
    p_test: str = P_TEST
    sequential: SequentialStop | None = None  # evaluated until decided: where and why it stopped
    key: str  # the cell's cache key
    cached: bool = False  # the treatment was reused from the cell cache
    measured_at: str | None = None  # when the cell's cache entry was measured
    rejected: str | None = None  # an earlier entry at its key failed its proof (moved aside)
    timing: CellTiming | None = None
    machine: MachineInfo | None = None
    commands: tuple[dict[str, Any], ...] = ()
    started_at: str
    finished_at: str | None = None

    @property
    def effect(self) -> float:
        t = self.treatment
        return math.nan if t is None or t.kld_mean is None else t.kld_mean


def read_cell(path: str | Path) -> CellRecord:
    """A stored cell record, validated; BadInput names the file and the field."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"{path}: cannot read sweep cell ({exc.strerror or exc})") from exc
    try:
        data = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadInput(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("schema") != CELL_SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else None
        raise BadInput(f"{path}: not a sweep cell of schema {CELL_SCHEMA} (schema {found!r})")
    if data.get("machine") == {}:  # the default before MachineInfo: nothing was recorded
        data["machine"] = None
    try:
        return codec.convert(data, CellRecord)
    except msgspec.ValidationError as exc:
        raise BadInput(f"{path}: {exc}") from exc


def cell_path(run_id: str, cell_id: str, root=None) -> Path:
    """results/<run-id>/sweep/cells/<cell-id>.json"""
    return (
        results.run_dir(run_id, root) / SWEEP_DIR / CELLS_DIR / f"{results.safe_name(cell_id)}.json"
    )


def save_cell(rec: CellRecord, root=None) -> Path:
    path = cell_path(rec.run_id, rec.cell.id, root)
    text = codec.encode(rec, indent=2) + b"\n"
    with results.lock_for(path):
        results.write_bytes_atomic(path, text)
    return path
