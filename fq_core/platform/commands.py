"""The only place fq-suite starts a subprocess: every call is bounded, logged and cleaned up.

Generic: llama.cpp tools, `pip download`, cmake and ninja all come through here, so
fq_core.measurement.models runs pip without importing anything of llama.cpp's.

Why one function: the plan requires every command, its time and its result to be recorded,
and an interrupted test run must never leave a llama.cpp process eating the machine's cores.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from .paths import logs_dir

log = logging.getLogger(__name__)

# llama.cpp's common argument parser reads LLAMA_ARG_<NAME> as a default for every option, so
# a stray export in the user's shell would silently change results: the runner clears them.
_CLEARED_PREFIX = "LLAMA_ARG_"
_KILL_GRACE_S = 2.0


@dataclass(frozen=True)
class CommandRecord:
    """What ran, where, with which environment changes, how it ended, where its output went."""

    argv: tuple[str, ...]
    cwd: str
    env: dict[str, str]
    started_at: str
    duration_s: float
    exit_status: int | None  # None when the command was killed (timeout or interruption)
    stdout_path: Path
    stderr_path: Path
    timed_out: bool
    tool: str = ""
    cleared_env: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.exit_status == 0 and not self.timed_out

    @property
    def command_line(self) -> str:
        return shlex.join(self.argv)

    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def stderr_tail(self, n_lines: int = 8, sep: str = "\n") -> str:
        """The last non-blank stderr lines; sep=" | " fits them into a one-line error."""
        lines = [ln.strip() for ln in self.stderr().splitlines() if ln.strip()]
        return sep.join(lines[-n_lines:])

    def to_json(self) -> dict:
        return {
            "argv": list(self.argv),
            "tool": self.tool,
            "cwd": self.cwd,
            "env": dict(self.env),
            "cleared_env": list(self.cleared_env),
            "started_at": self.started_at,
            "duration_s": round(self.duration_s, 4),
            "exit_status": self.exit_status,
            "timed_out": self.timed_out,
            "stdout_path": str(self.stdout_path),
            "stderr_path": str(self.stderr_path),
        }


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGKILL the child if fq itself dies without cleaning up (e.g. kill -9)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    """TERM the whole process group, then KILL whatever is left after a short grace."""
    for sig, wait_s in ((signal.SIGTERM, _KILL_GRACE_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    # The leader may be gone while children in its group live on: make sure they do not.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def _tail(path: Path, n_bytes: int = 16384) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - n_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _wait(proc, timeout_s, t0, stdout_path, heartbeat, heartbeat_s, watch=None, stderr_path=None):
    if heartbeat is None and watch is None:
        return proc.wait(timeout=timeout_s)
    deadline = t0 + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise subprocess.TimeoutExpired(proc.args, timeout_s)
        try:
            return proc.wait(timeout=min(heartbeat_s, left))
        except subprocess.TimeoutExpired:
            if heartbeat is not None:
                line = _last_line(stdout_path)
                if line:
                    heartbeat(line)
            if watch is not None:
                watch(_tail(stdout_path), _tail(stderr_path))


def _append_jsonl(record: CommandRecord, log_root: Path) -> None:
    path = log_root / "commands.jsonl"
    with FileLock(str(path) + ".lock"):
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")


def run_logged(
    argv: Sequence[str | os.PathLike[str]],
    *,
    tool: str,
    timeout_s: float,
    cwd: str | os.PathLike[str] | None = None,
    env_overrides: Mapping[str, str] | None = None,
    stdin_devnull: bool = True,
    heartbeat: Callable[[str], None] | None = None,
    heartbeat_s: float = 5.0,
    log_dir: str | os.PathLike[str] | None = None,
    watch: Callable[[str, str], None] | None = None,
) -> CommandRecord:
    """Run argv to completion (or kill it), save its output, log it; never raises on exit status.

    The child gets its own process group, so a timeout, Ctrl-C or any exception here ends the
    child and everything it started. Callers decide what a non-zero exit means.
    `heartbeat`, when given, is called every `heartbeat_s` with the last line of stdout so
    long steps (a llama.cpp build) can show progress. `watch`, when given, is called at the
    same interval with the tails (last 16 KiB) of stdout and stderr written so far: for
    progress that needs both streams (llama-perplexity's chunk counts and per-pass time).
    """
    argv_t = tuple(os.fspath(a) for a in argv)
    log_root = Path(log_dir).resolve() if log_dir is not None else logs_dir().resolve()
    out_dir = log_root / "commands"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.UTC)
    started_at = stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    safe_tool = "".join(c if c.isalnum() or c in "-_." else "_" for c in tool) or "cmd"
    # pid + random suffix: unique across parallel pytest-xdist workers sharing one log dir.
    base = f"{stamp:%Y%m%dT%H%M%S}-{safe_tool}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stdout_path = out_dir / f"{base}.stdout"
    stderr_path = out_dir / f"{base}.stderr"

    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLEARED_PREFIX)}
    cleared = tuple(sorted(k for k in os.environ if k.startswith(_CLEARED_PREFIX)))
    overrides = {str(k): str(v) for k, v in (env_overrides or {}).items()}
    env.update(overrides)
    run_cwd = str(Path(cwd).resolve()) if cwd is not None else os.getcwd()

    log.info("running %s", shlex.join(argv_t))
    t0 = time.monotonic()
    timed_out = False
    exit_status: int | None = None
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        try:
            proc = subprocess.Popen(
                argv_t,
                cwd=run_cwd,
                env=env,
                stdin=subprocess.DEVNULL if stdin_devnull else None,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        except OSError as exc:
            # Not startable (missing, not executable): record it like any other failure.
            err.write(f"fq: cannot start {argv_t[0]}: {exc}\n".encode())
            exit_status = 127
            proc = None
        if proc is not None:
            try:
                exit_status = _wait(
                    proc, timeout_s, t0, stdout_path, heartbeat, heartbeat_s, watch, stderr_path
                )
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                log.warning("timed out after %.0f s: %s", timeout_s, shlex.join(argv_t))
            except BaseException:
                # KeyboardInterrupt, pytest-timeout's exception, anything: no orphans.
                _kill_group(proc)
                record = CommandRecord(
                    argv_t,
                    run_cwd,
                    overrides,
                    started_at,
                    time.monotonic() - t0,
                    None,
                    stdout_path,
                    stderr_path,
                    False,
                    tool,
                    cleared,
                )
                _append_jsonl(record, log_root)
                raise
            else:
                # The leader exited; anything it left running in its group goes too.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
    record = CommandRecord(
        argv=argv_t,
        cwd=run_cwd,
        env=overrides,
        started_at=started_at,
        duration_s=time.monotonic() - t0,
        exit_status=exit_status,
        stdout_path=stdout_path,
        stderr_path=stderr_path,
        timed_out=timed_out,
        tool=tool,
        cleared_env=cleared,
    )
    _append_jsonl(record, log_root)
    return record


# ---------------------------------------------------------------------------------------------
# Typed llama.cpp calls
