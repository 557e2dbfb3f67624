"""The only place fq-suite starts a subprocess: every call is bounded, logged and cleaned up.

Why one function: the plan requires every command, its time and its result to be recorded,
and an interrupted test run must never leave a llama.cpp process eating the machine's cores.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import json
import logging
import math
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

from .. import progress
from ..errors import LlamaFailed
from ..paths import logs_dir
from . import parse

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
                    argv_t, run_cwd, overrides, started_at, time.monotonic() - t0, None,
                    stdout_path, stderr_path, False, tool, cleared,
                )  # fmt: skip
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


@dataclass(frozen=True)
class LoadResult:
    ok: bool
    load_time_ms: float | None
    n_params: int | None
    command: CommandRecord
    error: str | None = None


@dataclass(frozen=True)
class Generation:
    prompt: str
    chat: bool
    text: str
    n_tokens: int
    tokens_per_s: float | None
    tool: str
    command: CommandRecord
    token_ids: tuple[int, ...] | None = None  # the generated text re-tokenized (llama-tokenize)

    def to_json(self) -> dict:
        return {
            "prompt": self.prompt,
            "chat": self.chat,
            "text": self.text,
            "n_tokens": self.n_tokens,
            "tokens_per_s": self.tokens_per_s,
            "tool": self.tool,
        }


@dataclass(frozen=True)
class KLDStats:
    """llama-perplexity's 'KL divergence statistics' (and its PPL ratio and Δp lines)."""

    mean_kld: float
    mean_kld_err: float | None
    median_kld: float | None
    p90_kld: float | None
    p99_kld: float | None
    p999_kld: float | None
    max_kld: float | None
    same_top_pct: float
    same_top_err: float | None
    rms_dp_pct: float | None
    rms_dp_err: float | None
    ppl_ratio: float | None  # Mean PPL(Q)/PPL(base) as llama.cpp computes it
    ppl_ratio_err: float | None
    mean_ppl_q: float | None
    raw: dict  # every "name: value ± err" line, as parsed

    def to_json(self) -> dict:
        return {
            "mean": self.mean_kld,
            "mean_err": self.mean_kld_err,
            "median": self.median_kld,
            "p90": self.p90_kld,
            "p99": self.p99_kld,
            "p999": self.p999_kld,
            "max": self.max_kld,
            "same_top_pct": self.same_top_pct,
            "same_top_err": self.same_top_err,
            "rms_dp_pct": self.rms_dp_pct,
            "ppl_ratio": self.ppl_ratio,
        }


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    ppl_err: float
    chunk_ppls: tuple[float, ...]  # running PPL after each chunk
    n_chunks: int
    ctx: int
    tokens_per_s: float | None
    kld: KLDStats | None
    command: CommandRecord

    def to_json(self) -> dict:
        return {
            "ppl": self.ppl,
            "ppl_err": self.ppl_err,
            "chunk_ppls": list(self.chunk_ppls),
            "n_chunks": self.n_chunks,
            "ctx": self.ctx,
            "tokens_per_s": self.tokens_per_s,
            "kld": self.kld.to_json() if self.kld else None,
        }


def _kld_stats(block: dict) -> KLDStats:
    def v(key):
        return block[key][0] if key in block else None

    def e(key):
        return block[key][1] if key in block else None

    return KLDStats(
        mean_kld=block["Mean KLD"][0],
        mean_kld_err=e("Mean KLD"),
        median_kld=v("Median KLD"),
        p90_kld=v("90.0% KLD"),
        p99_kld=v("99.0% KLD"),
        p999_kld=v("99.9% KLD"),
        max_kld=v("Maximum KLD"),
        same_top_pct=block["Same top p"][0],
        same_top_err=e("Same top p"),
        rms_dp_pct=v("RMS Δp"),
        rms_dp_err=e("RMS Δp"),
        ppl_ratio=v("Mean PPL(Q)/PPL(base)"),
        ppl_ratio_err=e("Mean PPL(Q)/PPL(base)"),
        mean_ppl_q=v("Mean PPL(Q)"),
        raw={k: list(val) for k, val in block.items()},
    )


_PROGRESS_S = 2.0  # how often a running llama-perplexity's output is read for progress


def _chunk_watch() -> Callable[..., None]:
    """A run_logged `watch` turning llama-perplexity's output into progress.chunks events;
    the ETA counts down from llama.cpp's per-pass time since the last chunk was seen done.
    Never raises: progress must not stop (or kill) the run it reports on."""
    seen = {"done": -1, "at": time.monotonic()}

    def watch(stdout: str, stderr: str, *, final: bool = False) -> None:
        try:
            p = parse.parse_progress(stdout, stderr)
            if p is None:
                return
            now = time.monotonic()
            if p.done != seen["done"]:
                seen["done"], seen["at"] = p.done, now
            eta = 0.0 if final else p.eta_s()
            if eta and p.total is not None and p.done < p.total:
                eta = max(0.0, eta - (now - seen["at"]))
            progress.chunks(p.done, p.total, p.seconds_per_pass, eta_s=eta)
        except Exception:
            log.warning("cannot report llama-perplexity's progress", exc_info=True)

    return watch


def _path_of(x) -> Path:
    """A model or corpus given as a path, a ModelRef or a Corpus (anything with .path)."""
    return Path(getattr(x, "path", x))


class LlamaRunner:
    """llama.cpp's tools as typed calls; every call is bounded by a timeout and logged."""

    def __init__(
        self,
        tools,
        *,
        threads: int | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        timeout_s: float = 3600.0,
    ) -> None:
        self.tools = tools
        self.threads = threads or os.cpu_count() or 1
        self.log_dir = log_dir
        self.timeout_s = timeout_s

    # -- plumbing ------------------------------------------------------------------------
    def _run(self, tool: str, args: Sequence, *, timeout_s: float | None = None, watch=None):
        argv = [self.tools.path(tool), *args]
        return run_logged(
            argv, tool=tool, timeout_s=timeout_s or self.timeout_s, log_dir=self.log_dir,
            watch=watch, heartbeat_s=_PROGRESS_S,
        )  # fmt: skip

    @staticmethod
    def failure(rec: CommandRecord, why: str) -> LlamaFailed:
        tail = rec.stderr_tail(4, sep=" | ") or "(stderr empty)"
        return LlamaFailed(f"{rec.tool} {why}: {rec.command_line} -- stderr: {tail}")

    def _require_ok(self, rec: CommandRecord) -> None:
        if rec.timed_out:
            raise self.failure(rec, f"timed out after {rec.duration_s:.0f} s")
        if rec.exit_status != 0:
            raise self.failure(rec, f"exited with status {rec.exit_status}")

    # -- calls ---------------------------------------------------------------------------
    def load(self, model, *, check: bool = True) -> LoadResult:
        """Load the model with --check-tensors (NaN/Inf in any tensor fails) and stop."""
        m = _path_of(model)
        rec = self._run(
            "llama-completion",
            ["-m", m, "--check-tensors", "-p", " ", "-n", "0", "-no-cnv", "--temp", "0"]
            + ["-t", str(self.threads)],
            timeout_s=min(self.timeout_s, 600),
        )
        err = rec.stderr()
        if not rec.ok:
            exc = self.failure(
                rec, "could not load the model" if not rec.timed_out else "timed out"
            )
            if check:
                raise exc
            return LoadResult(False, None, None, rec, str(exc))
        t = parse.parse_timings(err)
        return LoadResult(True, t.load_time_ms, parse.parse_n_params(err), rec)

    def generate(
        self,
        model,
        prompt: str,
        n_tokens: int,
        *,
        chat: bool = False,
        chat_template: str | None = None,
        seed: int = 1,
        ignore_eos: bool = False,
        tokenize: bool = True,
    ) -> Generation:
        """Greedy generation of n_tokens (fewer only at end-of-text); never reads stdin."""
        m = _path_of(model)
        if chat and chat_template is None:
            hint = getattr(model, "chat_template", None)
            chat_template = hint() if callable(hint) else hint
        args = ["-m", m, "-p", prompt, "-n", str(n_tokens), "--temp", "0", "--seed", str(seed)]
        args += ["--no-display-prompt", "-t", str(self.threads)]
        args += ["-st"] if chat else ["-no-cnv"]
        if chat and chat_template:
            args += ["--chat-template", chat_template]
        if ignore_eos:
            args += ["--ignore-eos"]
        rec = self._run("llama-completion", args)
        self._require_ok(rec)
        text = parse.generation_text(rec.stdout())
        t = parse.parse_timings(rec.stderr())
        if t.n_generated is None:
            raise self.failure(rec, "printed no timings (unparsable output)")
        ids = (
            self.tokenize(m, text, add_bos=False)
            if tokenize and self.tools.has("llama-tokenize")
            else None
        )
        return Generation(
            prompt, chat, text, t.n_generated, t.tokens_per_s, "llama-completion", rec, ids
        )

    def tokenize(self, model, text: str, *, add_bos: bool = False) -> tuple[int, ...]:
        args = ["-m", _path_of(model), "-p", text, "--ids", "--log-disable"]
        if not add_bos:
            args.append("--no-bos")
        rec = self._run("llama-tokenize", args, timeout_s=min(self.timeout_s, 300))
        self._require_ok(rec)
        ids = parse.parse_token_ids(rec.stdout())
        if ids is None:
            raise self.failure(rec, "printed no token ids")
        return ids

    def count_tokens(self, model, text) -> int:
        """Tokens in a corpus file under this model's tokenizer (recorded with the corpus)."""
        rec = self._run(
            "llama-tokenize",
            ["-m", _path_of(model), "-f", _path_of(text), "--show-count", "--ids", "--log-disable"],
            timeout_s=min(self.timeout_s, 900),
        )
        self._require_ok(rec)
        n = parse.parse_token_count(rec.stdout())
        if n is None:
            raise self.failure(rec, "printed no token count")
        return n

    def perplexity(
        self,
        model,
        text,
        *,
        ctx: int = 512,
        batch: int = 512,
        chunks: int | None = None,
        kl_base: str | os.PathLike[str] | None = None,
        kl_against: str | os.PathLike[str] | None = None,
    ) -> PerplexityResult:
        """PPL over `chunks` contexts; kl_base saves the logits, kl_against compares with them."""
        if kl_base is not None and kl_against is not None:
            raise ValueError("kl_base and kl_against are exclusive")
        args = ["-m", _path_of(model), "-f", _path_of(text), "-c", str(ctx), "-b", str(batch)]
        args += ["-t", str(self.threads)]
        if chunks is not None:
            args += ["--chunks", str(chunks)]
        if kl_base is not None:
            args += ["--kl-divergence-base", Path(kl_base)]
        if kl_against is not None:
            if not Path(kl_against).is_file():
                raise LlamaFailed(f"KLD base logits {kl_against} do not exist")
            args += ["--kl-divergence-base", Path(kl_against), "--kl-divergence"]
        watch = _chunk_watch() if progress.listening() else None
        rec = self._run("llama-perplexity", args, watch=watch)
        if watch is not None and rec.ok:  # the last chunks may have finished between looks
            watch(rec.stdout(), rec.stderr(), final=True)
        try:
            return self._perplexity_result(rec, ctx, kld=kl_against is not None)
        except BaseException:
            if kl_base is not None:  # never leave half-written logits behind
                Path(kl_base).unlink(missing_ok=True)
            raise

    def _perplexity_result(self, rec: CommandRecord, ctx: int, *, kld: bool) -> PerplexityResult:
        self._require_ok(rec)
        out, err = rec.stdout(), rec.stderr()
        calc = parse.parse_calc(err)
        kld_stats = None
        if kld:
            # A vocabulary mismatch is logged as an error, yet the run goes on and exits 0.
            errors = parse.error_lines(err)
            if errors:
                raise self.failure(rec, f"reported an error: {errors[0]}")
            block = parse.parse_kld_block(out)
            if block is None or "Mean KLD" not in block or "Same top p" not in block:
                raise self.failure(rec, "printed no KL divergence statistics")
            kld_stats = _kld_stats(block)
            if "Mean PPL(Q)" not in block:
                raise self.failure(rec, "printed no Mean PPL(Q)")
            ppl, ppl_err = block["Mean PPL(Q)"]
            chunk_ppls = parse.parse_kld_chunk_ppls(out)
            ppl_err = ppl_err if ppl_err is not None else math.nan
        else:
            final = parse.parse_final_ppl(err)
            chunk_ppls = parse.parse_chunk_ppls(out)
            if final is None:
                why = "printed no 'Final estimate'"
                if calc is None:
                    why += " (the text may be shorter than one context of tokens)"
                elif any(not math.isfinite(c) for c in chunk_ppls):
                    why += " (non-finite perplexity: NaN/Inf logits)"
                raise self.failure(rec, why)
            ppl, ppl_err = final
        if not math.isfinite(ppl) or any(not math.isfinite(c) for c in chunk_ppls):
            raise self.failure(rec, f"gave a non-finite perplexity ({ppl})")
        n_chunks = calc[0] if calc else len(chunk_ppls)
        n_ctx = calc[1] if calc else ctx
        tps = None
        if calc is not None and rec.duration_s > calc[2]:
            tps = n_chunks * n_ctx / (rec.duration_s - calc[2])
        return PerplexityResult(
            ppl, ppl_err, tuple(chunk_ppls), n_chunks, n_ctx, tps, kld_stats, rec
        )
