"""SHA-256 of large files, remembered by (path, size, mtime, inode, ctime).

A 250 MB model is then hashed once per change, not once per test. The stat key includes the
inode change time, which no unprivileged user can set back: a byte flipped in a file and its
mtime restored with ``os.utime`` still moves the ctime, so the entry no longer matches.
Timestamps are coarse (a clock tick, or a second or two on some filesystems), so, as git
does with its "racily clean" index entries, an entry recorded less than ``RACY_S`` after the
file's last change is not trusted: a change within the same tick would keep the stat key.

Each entry says where its hash came from: ``"bytes"`` when this module read the file and
hashed it, ``"remembered"`` when a writer recorded a hash it computed elsewhere (while
downloading or assembling). ``sha256_file(path, verify=True)`` accepts only the first kind,
so a file is compared with a pin from its own bytes at least once per cache entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import BinaryIO

from filelock import FileLock

from .paths import cache_dir

_CHUNK = 8 * 1024 * 1024


FROM_BYTES = "bytes"  # this module read the file and hashed it
REMEMBERED = "remembered"  # a writer recorded a hash it computed elsewhere
RACY_S = 3.0  # an entry this close to the file's last change (ctime) may not see a change


def stat_key(path: str | os.PathLike[str], st: os.stat_result | None = None) -> str:
    """The cache key of a file as it is now (or as `st` saw it)."""
    path = Path(path)
    st = st or path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"


def _cache_file() -> Path:
    return cache_dir() / "sha256-cache.json"


def _load_cache() -> dict[str, dict]:
    try:
        raw = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    cache = {}
    for key, value in raw.items():
        if isinstance(value, str):  # an entry of the older layout: where it came from is unknown
            value = {"sha256": value, "from": REMEMBERED}
        if isinstance(value, dict) and isinstance(value.get("sha256"), str):
            cache[key] = value
    return cache


def copy_hashing(src: BinaryIO, out: BinaryIO, digest) -> int:
    """Copy src to out, feeding digest the same bytes: what is downloaded or assembled is
    hashed while it is written, never read a second time. Returns the bytes copied."""
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    copied = 0
    while n := src.readinto(buf):
        out.write(view[:n])
        digest.update(view[:n])
        copied += n
    return copied


def sha256_file(
    path: str | os.PathLike[str], *, use_cache: bool = True, verify: bool = False
) -> str:
    """Hex SHA-256 of a file; a cache hit costs one stat().

    ``verify=True`` (checking a file against a pinned hash): a remembered entry is not
    enough, the bytes are read and hashed unless this very entry was computed from them.
    """
    path = Path(path)
    st = path.stat()
    key = stat_key(path, st)
    if use_cache:
        hit = _load_cache().get(key)
        if hit and _trusted(hit, st, verify=verify):
            return hit["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
    hexdigest = digest.hexdigest()
    if use_cache:
        remember_sha256(path, hexdigest, key=key, from_bytes=True)
    return hexdigest


def _trusted(entry: dict, st: os.stat_result, *, verify: bool) -> bool:
    if verify and entry.get("from") != FROM_BYTES:
        return False
    at = entry.get("at")  # when the entry was recorded (entries of the older layout: never)
    return isinstance(at, int) and at - st.st_ctime_ns > RACY_S * 1e9


def remember_sha256(
    path: str | os.PathLike[str],
    hexdigest: str,
    *,
    key: str | None = None,
    from_bytes: bool = False,
) -> None:
    """Record a hash computed elsewhere (e.g. while a file was being written).

    ``from_bytes``: the hash was computed by reading this file's own bytes (as they were
    when `key` was taken), so a later ``verify`` may trust it.
    """
    key = key or stat_key(path)
    cache_file = _cache_file()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_file) + ".lock"):
        cache = _load_cache()
        cache = {k: v for k, v in cache.items() if os.path.exists(k.split("|", 1)[0])}
        cache[key] = {
            "sha256": hexdigest,
            "from": FROM_BYTES if from_bytes else REMEMBERED,
            "at": time.time_ns(),
        }
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
            os.replace(tmp, cache_file)
        finally:
            tmp.unlink(missing_ok=True)
