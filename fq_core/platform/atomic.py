"""Every file fq-suite writes goes through here: never a partial file, never an input lost.

Why one place: a model, a manifest, a `--json`, a report or a results record can each
destroy hours of work when written carelessly (`--json` naming the model replaced it with
9 KB of JSON). The rules, once:

- an output that is one of the command's inputs (same device and inode, so links and
  symlinks count) is refused before anything is written;
- the bytes go to a temporary file beside the target (same filesystem, so publishing is
  one rename) named ``.<target>.<pid>.<random>.fq-tmp``;
- without ``force`` the temporary is published with a hard link, which fails if the target
  appeared meanwhile: of two concurrent writers exactly one wins; with ``force`` a rename
  replaces the target in one step;
- the temporary is removed on any exception, Ctrl-C, and (through ``install_signal_cleanup``)
  SIGTERM and SIGHUP; one left by a kill -9 is removed by the next write to the same
  directory once its owner process is gone, and ``stale_temporaries`` lists them;
- a scratch file that must keep its own name while it lives (a fake-quantized model that
  llama.cpp loads, with its manifest beside it) is ``owned``: removed when its block ends,
  whatever ends it, and announced by a marker ``.<name>.<pid>.<random>.fq-owner`` beside it,
  so one left by a kill -9 is found and removed the same way once its owner is gone;
- publishing is never cut in half: Ctrl-C, SIGTERM or SIGHUP arriving while the link or
  rename runs is held until the target is in place and recorded (``published``), then
  delivered as usual; a caller can thus tell "interrupted before" from "done, then
  interrupted" (the CLI exits 0 when every output of its command was published).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..errors import FqError, OutputRefused

TMP_SUFFIX = ".fq-tmp"
OWNER_SUFFIX = ".fq-owner"
_TMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.fq-tmp$")
_OWNER_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.fq-owner$")
# what fq before issue 18 left in a baseline's cache directory on SIGINT/SIGTERM (up to 134 MB)
_OLD_TMP_NAME = re.compile(r"^logits\.kld\.tmp(?P<pid>\d+)$")

_live: set[Path] = set()  # temporaries this process has open, for the signal handler
_live_lock = threading.Lock()
_published: set[tuple[int, ...]] = set()  # _identity() of every file this process published
_listeners: list[Callable[[Path], None]] = []
_HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Terminated(FqError):
    """SIGTERM or SIGHUP arrived; raised so that every cleanup on the way out runs."""

    exit_status = 143


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def refuse_inputs(target: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]]):
    """OutputRefused when ``target`` is (a link to) any of ``inputs``."""
    target = Path(target)
    try:
        st_target = os.stat(target)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputRefused(f"cannot check output {target}: {exc.strerror}") from None
    for given in inputs:
        try:
            st_in = os.stat(given)
        except OSError:
            continue
        if same_file(st_target, st_in):
            how = "" if os.path.abspath(target) == os.path.abspath(given) else " (through a link)"
            raise OutputRefused(f"output {target} is the input {given}{how}; refusing")


def check_target(
    target: str | os.PathLike[str],
    *,
    force: bool,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Every refusal that can be made before any work: input collision, existing file,
    missing or unwritable directory, a name the filesystem cannot hold."""
    target = Path(target)
    refuse_inputs(target, inputs)
    if target.exists() or target.is_symlink():
        if not target.is_file():
            raise OutputRefused(f"output {target} exists and is not a regular file")
        if not force:
            raise OutputRefused(f"output {target} exists; pass --force to replace it")
    parent = target.parent
    if not parent.is_dir():
        raise OutputRefused(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputRefused(f"output directory {parent} is not writable")
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    longest = len(os.fsencode(f".{target.name}.{os.getpid()}.00000000{TMP_SUFFIX}"))
    if longest > limit:
        raise OutputRefused(f"output name {target.name!r} is too long for this filesystem")
    return target


def _owner_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _scan(directory: str | os.PathLike[str]) -> tuple[list[Path], dict[str, list[bool]]]:
    """Dead writers' temporaries and owner markers, and for each owned name whether each of
    its owners is gone."""
    dead: list[Path] = []
    owners: dict[str, list[bool]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            tmp = _TMP_NAME.match(entry.name) or _OLD_TMP_NAME.match(entry.name)
            owner = _OWNER_NAME.match(entry.name)
            m = tmp or owner
            gone = m is not None and _owner_gone(int(m.group("pid")))
            if gone:
                dead.append(Path(entry.path))
            if owner:
                owners.setdefault(owner.group("target"), []).append(gone)
    return dead, owners


def stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """What kill -9'd fq processes left in ``directory``: their temporaries, the markers of
    their owned files, and those files (unless a live process owns the same name now)."""
    found, owners = _scan(directory)
    for name, gone in owners.items():
        target = Path(directory, name)
        if all(gone) and (target.exists() or target.is_symlink()):
            found.append(target)
    return sorted(found)


def _is_owned_file(path: Path) -> bool:
    return not any(r.match(path.name) for r in (_TMP_NAME, _OLD_TMP_NAME, _OWNER_NAME))


def remove_stale(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove ``stale_temporaries(directory)``. An owned file goes only while no live process
    has claimed its name since and it was not written after we began looking."""
    began = time.time()
    removed = []
    # owned files before their markers: a file is never left without the marker naming it
    for path in sorted(stale_temporaries(directory), key=lambda p: not _is_owned_file(p)):
        if _is_owned_file(path):
            _, owners = _scan(directory)  # a new owner may have claimed the name meanwhile
            try:
                if not all(owners.get(path.name, [True])) or path.lstat().st_mtime >= began:
                    continue
            except FileNotFoundError:
                continue
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            path.unlink()
            removed.append(path)
    return removed


def _directories(roots: Iterable, skip: Iterable | None) -> Iterator[str]:
    if skip is None:  # llama.cpp's build and its sources: large, never fq's scratch files
        from .paths import cache_dir

        skip = (cache_dir() / "llama.cpp", cache_dir() / "sdist")
    skipped = {Path(p) for p in skip}
    for root in roots:
        for d, subdirs, _ in os.walk(root):  # symlinks are not followed
            subdirs[:] = [s for s in subdirs if Path(d, s) not in skipped]
            yield d


def stale_under(roots: Iterable[str | os.PathLike[str]], *, skip: Iterable | None = None):
    """``stale_temporaries`` of every directory under ``roots`` (but ``skip``): where
    ``fq doctor`` looks, and what a new pytest session clears."""
    found: dict[Path, None] = {}
    for d in _directories(roots, skip):
        for path in stale_temporaries(d):
            found.setdefault(path.absolute(), None)
    return list(found)


def remove_stale_under(roots: Iterable[str | os.PathLike[str]], *, skip: Iterable | None = None):
    return [p for d in _directories(roots, skip) for p in remove_stale(d)]


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _disk_error(exc: OSError, target: Path) -> FqError:
    if exc.errno == errno.ENOSPC:
        return OutputRefused(f"no space left on the device while writing {target}")
    if exc.errno == errno.EDQUOT:
        return OutputRefused(f"disk quota exceeded while writing {target}")
    if exc.errno == errno.ENAMETOOLONG:
        return OutputRefused(f"output name {target.name!r} is too long for this filesystem")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputRefused(f"cannot write {target}: {exc.strerror}")
    return OutputRefused(f"cannot write {target}: {exc.strerror or exc}")


def output_error(exc: OSError, target: str | os.PathLike[str]) -> FqError:
    """An OSError met while making ``target`` (a file, a directory tree, a rename), as the one
    line the CLI prints: a full or read-only disk, or a file where a directory must be."""
    target = Path(target)
    if exc.errno == errno.ENOTDIR:
        where = f" ({exc.filename})" if exc.filename else ""
        return OutputRefused(f"cannot write {target}: a file is where a directory must be{where}")
    if exc.errno == errno.EBUSY:
        return OutputRefused(f"cannot replace {target}: it is busy (a mount point?)")
    return _disk_error(exc, target)


@contextlib.contextmanager
def output_errors(target: str | os.PathLike[str]) -> Iterator[None]:
    """Turn any OSError inside the block into ``output_error``: one line, never a traceback."""
    try:
        yield
    except OSError as exc:
        raise output_error(exc, target) from exc


def check_directory(path: str | os.PathLike[str], *, what: str = "output directory") -> Path:
    """Refuse, before any work, a directory output that cannot be made or written: a file
    where the directory (or one of its parents) must be, or a read-only place."""
    path = Path(path)
    existing = path
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        if existing == path:
            raise OutputRefused(f"{what} {path} is not a directory")
        raise OutputRefused(f"{what} {path} cannot be made: {existing} is not a directory")
    if not os.access(existing, os.W_OK):
        why = "on a read-only file system" if _read_only(existing) else "not writable"
        raise OutputRefused(f"{what} {path} cannot be written: {existing} is {why}")
    return path


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


@contextlib.contextmanager
def temporary_for(
    target: str | os.PathLike[str],
    *,
    force: bool,
    inputs: Iterable[str | os.PathLike[str]] = (),
    fsync: bool = True,
) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; publish it there when the block succeeds.

    The caller writes the temporary (any way it likes); nothing appears at ``target`` unless
    the block finishes, and nothing is left behind when it does not.
    """
    inputs = tuple(inputs)
    target = check_target(target, force=force, inputs=inputs)
    remove_stale(target.parent)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    with _live_lock:
        _live.add(tmp)
    try:
        try:
            yield tmp
            if fsync and tmp.exists():
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            publish(tmp, target, force=force, inputs=inputs)
            if fsync:
                _fsync_dir(target.parent)
        except OSError as exc:
            raise _disk_error(exc, target) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        with _live_lock:
            _live.discard(tmp)


@contextlib.contextmanager
def owned(path: str | os.PathLike[str], *, keep: bool = False) -> Iterator[Path]:
    """``path`` is this process's scratch file for the block: removed when the block ends
    (kept when it succeeds and ``keep``), on any exception, Ctrl-C or SIGTERM turned into
    one. Its marker lets the next run or ``fq doctor`` find it after a kill -9. Not a
    temporary name: the file is a model llama.cpp loads, with its manifest beside it."""
    path = Path(path)
    marker = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{OWNER_SUFFIX}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except OSError as exc:
        raise _disk_error(exc, path) from exc
    done = False
    try:
        yield path
        done = True
    finally:
        if not (done and keep):
            path.unlink(missing_ok=True)
        marker.unlink(missing_ok=True)


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP wait until the block is done, then are delivered as usual.

    For steps that must not be cut in half (publish a file and record it). Only the main
    thread receives signals, so elsewhere this does nothing. A handler changed inside the
    block (the CLI ignoring signals once its work is complete) stands, and decides what
    becomes of a held signal.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []

    def hold(signum, frame) -> None:
        arrived.append(signum)

    previous: dict[int, object] = {}
    try:
        for sig in _HELD:
            old = signal.getsignal(sig)
            if old is None:  # installed outside Python: cannot be restored, so not held
                continue
            signal.signal(sig, hold)
            previous[sig] = old
    except (ValueError, OSError):  # pragma: no cover - no signal support here
        pass
    try:
        yield
    finally:
        deliver = []
        for sig, old in previous.items():
            if signal.getsignal(sig) is hold:
                signal.signal(sig, old)
                if sig in arrived:
                    deliver.append(sig)
        for sig in deliver:
            signal.raise_signal(sig)


def published(path: str | os.PathLike[str]) -> bool:
    """True when the file now at ``path`` is one this process published."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return _identity(st) in _published


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """Device and inode, plus size and mtime (which a link or rename keeps): a new file that
    reuses a freed inode number is not mistaken for ours."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def add_publish_listener(listener: Callable[[Path], None]) -> None:
    """Call ``listener(target)`` right after each publish, before any held signal."""
    _listeners.append(listener)


def remove_publish_listener(listener: Callable[[Path], None]) -> None:
    with contextlib.suppress(ValueError):
        _listeners.remove(listener)


def publish(tmp: Path, target: Path, *, force: bool, inputs: Iterable = ()) -> None:
    """Make ``tmp`` appear at ``target`` in one step; without force never replace a file."""
    refuse_inputs(target, inputs)  # a link may have been made meanwhile
    with held_signals():
        st = os.stat(tmp)
        if force:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)
            except FileExistsError:
                raise OutputRefused(
                    f"output {target} appeared while it was being written (another writer?); "
                    "pass --force to replace it"
                ) from None
        _published.add(_identity(st))
        for listener in list(_listeners):
            listener(target)
    if not force:
        tmp.unlink()


def write_bytes(
    target: str | os.PathLike[str],
    data: bytes,
    *,
    force: bool = True,
    inputs: Iterable[str | os.PathLike[str]] = (),
    fsync: bool = True,
) -> Path:
    """``data`` at ``target``, atomically, under every rule above."""
    with temporary_for(target, force=force, inputs=inputs, fsync=fsync) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(target)


def write_text(target, text: str, **kwargs) -> Path:
    return write_bytes(target, text.encode("utf-8"), **kwargs)


def _on_signal(signum, frame) -> None:  # pragma: no cover - exercised in subprocess tests
    raise Terminated(f"terminated by {signal.Signals(signum).name}")


def install_signal_cleanup() -> None:
    """SIGTERM and SIGHUP raise Terminated, so every temporary is removed on the way out.

    Only the CLI calls this (a library must not take over a host program's signals).
    """
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):  # not the main thread
            signal.signal(sig, _on_signal)
