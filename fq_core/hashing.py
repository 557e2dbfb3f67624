"""SHA-256 of large files, remembered by (path, size, mtime, inode).

A 250 MB model is then hashed once per change, not once per test.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import BinaryIO

from filelock import FileLock

from .paths import cache_dir

_CHUNK = 8 * 1024 * 1024


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _cache_file() -> Path:
    return cache_dir() / "sha256-cache.json"


def _load_cache() -> dict[str, str]:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


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


def sha256_file(path: str | os.PathLike[str], *, use_cache: bool = True) -> str:
    """Hex SHA-256 of a file; a cache hit costs one stat()."""
    path = Path(path)
    key = _stat_key(path)
    if use_cache:
        hit = _load_cache().get(key)
        if hit:
            return hit
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
    hexdigest = digest.hexdigest()
    if use_cache:
        remember_sha256(path, hexdigest, key=key)
    return hexdigest


def remember_sha256(path: Path, hexdigest: str, *, key: str | None = None) -> None:
    """Record a hash computed elsewhere (e.g. while a file was being written)."""
    key = key or _stat_key(Path(path))
    cache_file = _cache_file()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_file) + ".lock"):
        cache = _load_cache()
        cache = {k: v for k, v in cache.items() if os.path.exists(k.split("|", 1)[0])}
        cache[key] = hexdigest
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
        os.replace(tmp, cache_file)
