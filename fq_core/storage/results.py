"""The results store: run ids, one JSON per stage × model, the gate record, cache keys, locks.

Cached measurements themselves are fq_core.storage.cache's verified entries.

Why a store at all: every check writes its measurements here *before* anything asserts, so a
failing or interrupted run still leaves complete evidence, and the report is built from these
files alone. Writes are atomic (temp file + rename) and serialized by file locks, so parallel
pytest-xdist workers never see half a file or overwrite each other.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from ..errors import BadInput
from ..platform import atomic
from ..platform.paths import results_dir
from . import codec, record
from .identity import Identity

SCHEMA = record.SCHEMA
GATE_FILE = "gate.json"
_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def new_run_id(now: _dt.datetime | None = None) -> str:
    """UTC timestamp (sorts by time) + 6 random hex digits (unique across machines and workers)."""
    now = now or _dt.datetime.now(_dt.UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def safe_name(name: str) -> str:
    """A model or stage name as a single path component (registry names pass unchanged)."""
    cleaned = "".join(c if c in _SAFE else "_" for c in name).strip(".")
    if not cleaned:
        raise BadInput(f"cannot use {name!r} as a file name in the results store")
    return cleaned


def _root(root: str | os.PathLike[str] | None) -> Path:
    return Path(root) if root is not None else results_dir()


def run_dir(run_id: str, root: str | os.PathLike[str] | None = None) -> Path:
    return _root(root) / safe_name(run_id)


def result_path(
    run_id: str, stage: str, model: str, root: str | os.PathLike[str] | None = None
) -> Path:
    """results/<run-id>/<stage>/<model>.json"""
    return run_dir(run_id, root) / safe_name(stage) / f"{safe_name(model)}.json"


def lock_for(path: str | os.PathLike[str], timeout: float = -1) -> FileLock:
    """The lock guarding `path` (a sibling `.lock` file); -1 waits for ever."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock", timeout=timeout)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Replace a store file atomically (fq_core.platform.atomic: temp beside it, one rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic.write_bytes(path, data, force=True)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Any JSON-able value, atomically; NaN/Inf as words (fq_core.storage.codec)."""
    text = codec.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return write_bytes_atomic(path, text.encode("utf-8"))


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_result(rec: record.StageRecord, root: str | os.PathLike[str] | None = None) -> Path:
    """Store one stage × model result atomically (the protocol builds it typed, so a wrong
    field fails where it is written, not later as a blank in a report)."""
    path = result_path(rec.run_id, rec.stage, rec.case, root)
    with lock_for(path):
        write_bytes_atomic(path, record.encode(rec))
    return path


def load_record(
    run_id: str, stage: str, model: str, root: str | os.PathLike[str] | None = None
) -> record.StageRecord | None:
    path = result_path(run_id, stage, model, root)
    if not path.exists():
        return None
    return record.read(path)


def iter_records(
    run_id: str, root: str | os.PathLike[str] | None = None
) -> Iterator[record.StageRecord]:
    """Every stage × model record of one run (for the report and the gate)."""
    base = run_dir(run_id, root)
    if not base.is_dir():
        return
    for path in sorted(base.glob("*/*.json")):
        yield record.read(path)


def latest_run_id(root: str | os.PathLike[str] | None = None) -> str | None:
    base = _root(root)
    if not base.is_dir():
        return None
    runs = sorted(p.name for p in base.iterdir() if p.is_dir() and any(p.glob("*/*.json")))
    return runs[-1] if runs else None


# --- cache keys ------------------------------------------------------------------------------


def canonical_json(data: Any) -> str:
    return codec.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


# --- the gate record -------------------------------------------------------------------------


@dataclass(frozen=True)
class GateEntry:
    key: str
    model: str
    outcome: str  # "passed" | "failed"
    reason: str | None
    run_id: str
    recorded_at: str
    components: Mapping[str, Any]

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "outcome": self.outcome,
            "reason": self.reason,
            "run_id": self.run_id,
            "recorded_at": self.recorded_at,
            "components": dict(self.components),
        }

    @classmethod
    def from_json(cls, key: str, data: Mapping[str, Any]) -> GateEntry:
        return cls(
            key=key,
            model=data.get("model", ""),
            outcome=data.get("outcome", ""),
            reason=data.get("reason"),
            run_id=data.get("run_id", ""),
            recorded_at=data.get("recorded_at", ""),
            components=data.get("components", {}),
        )


def gate_path(root: str | os.PathLike[str] | None = None) -> Path:
    return _root(root) / GATE_FILE


def _read_gate(path: Path) -> dict:
    try:
        data = read_json(path)
    except FileNotFoundError:
        return {"schema": SCHEMA, "entries": {}}
    except ValueError as exc:
        raise BadInput(f"{path} is not valid JSON ({exc}); delete it to reset the gate") from exc
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise BadInput(f"{path} is not an fq-suite gate record; delete it to reset the gate")
    return data


def gate_entries(root: str | os.PathLike[str] | None = None) -> tuple[GateEntry, ...]:
    data = _read_gate(gate_path(root))
    return tuple(GateEntry.from_json(k, v) for k, v in data["entries"].items())


def lookup_gate(
    components: Identity, root: str | os.PathLike[str] | None = None
) -> GateEntry | None:
    data = _read_gate(gate_path(root))
    key = gate_key(components)
    entry = data["entries"].get(key)
    return GateEntry.from_json(key, entry) if entry else None


def gate_key(components: Identity) -> str:
    """The key of a gate record: the identity of the gate stage's Test 1 (with its thresholds)."""
    return components.key(length=32)


def record_gate(
    components: Identity,
    *,
    model: str,
    outcome: str,
    run_id: str,
    reason: str | None = None,
    root: str | os.PathLike[str] | None = None,
) -> GateEntry:
    """Record the latest Test 1 verdict for this key (a later failure replaces an earlier pass)."""
    if outcome not in ("passed", "failed"):
        raise ValueError(f"gate outcome must be passed or failed, not {outcome!r}")
    entry = GateEntry(
        key=gate_key(components),
        model=model,
        outcome=outcome,
        reason=reason,
        run_id=run_id,
        recorded_at=utc_now(),
        components=components.to_json(),
    )
    path = gate_path(root)
    with lock_for(path):
        data = _read_gate(path)
        data["schema"] = SCHEMA
        data["entries"][entry.key] = entry.to_json()
        write_json_atomic(path, data)
    return entry
