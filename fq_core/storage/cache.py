"""Verified cache entries: a stored measurement is used only when it proves itself.

Why: cached baselines, treatments, placebos and sweep cells decide most reported figures, so
an entry edited by hand, truncated, written by an older fq or left half-made must never be
served as a measurement. Each entry is a folder ``cache_dir()/<kind>/<key>/`` holding one JSON
envelope (its schema, kind, key, when it was measured, the SHA-256 of its payload and of every
file it stands for, e.g. the baseline's logits) and those files. Reading checks all of it; an
entry that fails is a miss, never an error (as in ccache or Nix): the reason goes to the log
in one line, the folder is moved aside to ``cache_dir()/rejected/`` (kept for inspection,
not deleted) and the value is computed again under the entry's lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from filelock import FileLock

from .. import __version__
from ..platform import hashing, progress
from ..platform.paths import cache_dir
from . import codec, results

log = logging.getLogger(__name__)

SCHEMA = 1  # the envelope's layout; what a payload holds is its kind's business (its key)
REJECTED = "rejected"

# what a payload that does not have the shape its reader expects raises while being read
_SHAPE_ERRORS = (
    KeyError,
    TypeError,
    ValueError,
    AttributeError,
    IndexError,
    msgspec.MsgspecError,
)


class Rejected(Exception):
    """An entry that does not prove itself (the message is the one-line reason)."""


@dataclass(frozen=True)
class Entry:
    """A verified value and where it came from."""

    value: Any  # what `decode` made of the payload
    hit: bool  # read from the cache (measured earlier), not computed now
    kind: str
    key: str
    measured_at: str | None  # when the payload was computed (UTC)
    folder: Path
    files: dict[str, str]  # name -> SHA-256 of each file the entry stands for
    rejected: str | None = None  # why an earlier entry at this key was moved aside

    def provenance(self, role: str) -> dict:
        """The record's account of this entry (record.CacheUse)."""
        return {
            "role": role,
            "kind": self.kind,
            "key": self.key,
            "hit": self.hit,
            "measured_at": self.measured_at,
            "rejected": self.rejected,
        }


def folder_for(kind: str, key: str) -> Path:
    return cache_dir() / kind / key


def payload_sha256(payload: Any) -> str:
    return hashlib.sha256(results.canonical_json(payload).encode()).hexdigest()


def _file_digest(path: Path) -> str:
    return hashing.sha256_file(path, verify=True)


def read(
    kind: str,
    key: str,
    name: str,
    decode: Callable[[Any], Any] | None = None,
    files: Sequence[str] = (),
) -> Entry:
    """The entry at kind/key if it proves itself; FileNotFoundError when there is none,
    Rejected (one line) when there is one that fails."""
    folder = folder_for(kind, key)
    path = folder / name
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise Rejected(f"cannot read it ({exc.strerror or exc})") from exc
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise Rejected(f"not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("entry_schema") != SCHEMA:
        found = doc.get("entry_schema") if isinstance(doc, dict) else None
        raise Rejected(f"entry schema {found} is not {SCHEMA} (written by another fq-suite)")
    if doc.get("kind") != kind or doc.get("key") != key:
        raise Rejected(f"it is the entry of {doc.get('kind')} {doc.get('key')}, not this key")
    payload = doc.get("payload")
    if payload_sha256(payload) != doc.get("payload_sha256"):
        raise Rejected("its content does not match its checksum (edited or damaged)")
    stored = doc.get("files")
    if not isinstance(stored, dict) or sorted(stored) != sorted(files):
        raise Rejected(f"it does not list the files it stands for ({', '.join(files)})")
    digests = {}
    for fname in files:
        want = stored[fname]
        fpath = folder / fname
        try:
            size = fpath.stat().st_size
        except OSError:
            raise Rejected(f"{fname} is missing") from None
        if not isinstance(want, dict) or size != want.get("bytes"):
            raise Rejected(f"{fname} has {size} bytes, not {want.get('bytes')}")
        try:
            digests[fname] = _file_digest(fpath)
        except OSError as exc:
            raise Rejected(f"cannot read {fname} ({exc.strerror or exc})") from exc
        if digests[fname] != want.get("sha256"):
            raise Rejected(f"{fname} does not match its SHA-256 (changed since it was measured)")
    try:
        value = decode(payload) if decode else payload
    except _SHAPE_ERRORS as exc:
        raise Rejected(f"its content is not a {kind} entry ({type(exc).__name__}: {exc})") from exc
    return Entry(value, True, kind, key, doc.get("measured_at"), folder, digests)


def move_aside(kind: str, key: str, reason: str) -> Path:
    """Move a failing entry's folder to cache_dir()/rejected/<kind>/ (never delete it)."""
    folder = folder_for(kind, key)
    dest = cache_dir() / REJECTED / kind / f"{key}.{results.new_run_id()}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    while dest.exists():
        dest = dest.with_name(f"{dest.name}-{secrets.token_hex(2)}")
    os.replace(folder, dest)
    log.warning(
        "cache entry %s/%s rejected: %s; moved to %s, measuring again", kind, key, reason, dest
    )
    progress.note(f"cache entry rejected ({reason}), measured again")
    return dest


def verified(
    kind: str,
    key: str,
    name: str,
    compute: Callable[[Path], Any],
    *,
    decode: Callable[[Any], Any] | None = None,
    files: Sequence[str] = (),
) -> Entry:
    """The entry kind/key, or `compute(folder)` once under its lock, sealed and stored.

    `compute` writes `files` (names inside the folder) and returns the JSON payload; a second
    process asking for the same key waits on the lock and then reads the stored entry, so an
    expensive llama.cpp run is never made twice, in parallel or across runs.
    """
    try:
        return read(kind, key, name, decode, files)
    except (FileNotFoundError, Rejected):
        pass
    folder = folder_for(kind, key)
    folder.parent.mkdir(parents=True, exist_ok=True)
    rejected = None
    with FileLock(f"{folder}.lock"):
        try:
            return read(kind, key, name, decode, files)
        except FileNotFoundError:
            pass
        except Rejected as exc:
            rejected = str(exc)
            move_aside(kind, key, rejected)
        folder.mkdir(parents=True, exist_ok=True)
        measured_at = results.utc_now()
        payload = codec.to_builtins(compute(folder))
        listed = {}
        for fname in files:
            fpath = folder / fname
            listed[fname] = {"bytes": fpath.stat().st_size, "sha256": _file_digest(fpath)}
        doc = {
            "entry_schema": SCHEMA,
            "kind": kind,
            "key": key,
            "fq_version": __version__,
            "measured_at": measured_at,
            "finished_at": results.utc_now(),
            "files": listed,
            "payload_sha256": payload_sha256(payload),
            "payload": payload,
        }
        results.write_json_atomic(folder / name, doc)  # last: its presence means complete
    value = decode(payload) if decode else payload
    digests = {f: v["sha256"] for f, v in listed.items()}
    return Entry(value, False, kind, key, measured_at, folder, digests, rejected)
