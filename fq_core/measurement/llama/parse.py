"""All parsing of llama.cpp's printed output lives here, tested on captured real output.

Parsers return None / empty values for what is absent; deciding that an absence is a failure
(no Final line, no KLD block) is the runner's job, so the message can name the command.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_NUM = r"([-+]?(?:nan|inf|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?))"

_VERSION = re.compile(r"^version:\s*(.+?)\s*$", re.M)
_BUILT = re.compile(r"^(built with .+?)\s*$", re.M)
_FINAL = re.compile(rf"Final estimate: PPL = {_NUM} \+/- {_NUM}", re.I)
_CHUNK = re.compile(rf"\[(\d+)\]{_NUM}", re.I)
_KLD_ROW = re.compile(rf"^\s*(\d+)\s+{_NUM}\s+±", re.M | re.I)
# a KLD table row: chunk, PPL(Q) ± e, ln(PPL(Q)/PPL(base)) ± e, KL divergence ± e, ...
_KLD_ROW_KLD = re.compile(
    rf"^\s*(\d+)\s+{_NUM}\s+±\s+{_NUM}\s+{_NUM}\s+±\s+{_NUM}\s+{_NUM}\s+±", re.M | re.I
)
_CALC = re.compile(
    r"^(\d+)\.(\d+)\.(\d+)\.(\d+) I (?:perplexity: calculating perplexity|kl_divergence: computing)"
    r" over (\d+) chunks, n_ctx=(\d+)",
    re.M,
)
_LOAD = re.compile(rf"load time =\s*{_NUM} ms")
_EVAL = re.compile(rf"^.*\beval time =\s*{_NUM} ms /\s*(\d+) runs.*?{_NUM} tokens per second", re.M)
_SAMPLERS = re.compile(r"samplers time =\s*[\d.]+ ms /\s*(\d+) tokens")
_PROMPT = re.compile(r"prompt eval time =\s*[\d.]+ ms /\s*(\d+) tokens")
_ERROR_LINE = re.compile(r"^[\d.]+ E (.+)$", re.M)
# ggml aborts when a backend has no kernel for an operation's tensor types
_UNSUPPORTED = re.compile(r"^(?:.*?: )?(\w+: unsupported types?:.*?)\s*$", re.M)
_PARAMS = re.compile(rf"model params\s*=\s*{_NUM}\s*([KMB])", re.I)


def _f(s: str) -> float:
    return float(s)


def parse_version(text: str) -> tuple[str, str]:
    """('0.5.0-dev (build 1, commit 0c1e570)', 'built with GNU 12.2.0 for Linux x86_64')."""
    v = _VERSION.search(text)
    b = _BUILT.search(text)
    return (v.group(1) if v else ""), (b.group(1) if b else "")


def parse_final_ppl(stderr: str) -> tuple[float, float] | None:
    """`Final estimate: PPL = X +/- Y` (stderr); None when llama-perplexity printed none."""
    m = _FINAL.search(stderr)
    return (_f(m.group(1)), _f(m.group(2))) if m else None


def parse_chunk_ppls(stdout: str) -> tuple[float, ...]:
    """The running PPL after each chunk: `[1]12.6138,[2]21.3795,` (nan kept as nan)."""
    vals: dict[int, float] = {}
    for m in _CHUNK.finditer(stdout):
        vals[int(m.group(1))] = _f(m.group(2))
    return tuple(vals[k] for k in sorted(vals))


def parse_kld_chunk_ppls(stdout: str) -> tuple[float, ...]:
    """Running PPL(Q) per chunk from the KLD table (`   1      12.6138 ±    2.4322 ...`)."""
    head = stdout.split("======", 1)[0]
    return tuple(_f(m.group(2)) for m in _KLD_ROW.finditer(head))


#: llama-perplexity's KLD table prints its running means to this many decimals: per-chunk
#: KLDs recovered from it are rounded at the source, so "0" there means "below 5e-6", not 0.
KLD_TABLE_DECIMALS = 5


def parse_kld_chunk_klds(stdout: str) -> tuple[float, ...]:
    """Each chunk's own mean KLD, recovered from the table's running means (r_i = mean of
    chunks 1..i, so chunk i is i·r_i − (i−1)·r_(i−1)). The table prints 5 decimals, so each
    value carries up to ±i·5e-6 of print rounding: fine for effects of 1e-3, not below 1e-4."""
    head = stdout.split("======", 1)[0]
    running = [(int(m.group(1)), _f(m.group(6))) for m in _KLD_ROW_KLD.finditer(head)]
    out, prev = [], 0.0
    for i, r in running:
        out.append(i * r - (i - 1) * prev)
        prev = r
    return tuple(out)


def _stamp_s(m: re.Match) -> float:
    mins, secs, ms, us = (int(g) for g in m.groups()[:4])
    return mins * 60 + secs + ms / 1e3 + us / 1e6


def parse_calc(stderr: str) -> tuple[int, int, float] | None:
    """(n_chunks, n_ctx, seconds since start) of the 'calculating … over N chunks' line: what
    llama-perplexity will evaluate, and when loading and tokenizing were over."""
    m = _CALC.search(stderr)
    return (int(m.group(5)), int(m.group(6)), _stamp_s(m)) if m else None


@dataclass(frozen=True)
class Timings:
    """common_perf_print lines of llama-completion (stderr)."""

    load_time_ms: float | None
    eval_ms: float | None
    eval_runs: int | None
    tokens_per_s: float | None
    n_generated: int | None  # sampled tokens minus prompt tokens: what -n counts


def parse_timings(stderr: str) -> Timings:
    load = _LOAD.search(stderr)
    ev = None
    for m in _EVAL.finditer(stderr):
        if "prompt eval" not in m.group(0):
            ev = m
    tps = _f(ev.group(3)) if ev else None
    return Timings(
        load_time_ms=_f(load.group(1)) if load else None,
        eval_ms=_f(ev.group(1)) if ev else None,
        eval_runs=int(ev.group(2)) if ev else None,
        tokens_per_s=tps if tps is not None and math.isfinite(tps) else None,
        n_generated=_generated(stderr),
    )


def _generated(stderr: str) -> int | None:
    sampled, prompt = _SAMPLERS.search(stderr), _PROMPT.search(stderr)
    if not (sampled and prompt):
        return None
    return int(sampled.group(1)) - int(prompt.group(1))


def error_lines(stderr: str) -> list[str]:
    """llama.cpp's error-level log lines (`0.03.926 E kl_divergence: inconsistent vocabulary…`):
    some errors are logged while the tool carries on and exits 0."""
    return [m.group(1).strip() for m in _ERROR_LINE.finditer(stderr)]


def unsupported_op(stderr: str) -> str | None:
    """ggml's line for an operation it cannot run on these types
    (`binary_op: unsupported types: dst: f32, src0: f32, src1: bf16`), or None."""
    m = _UNSUPPORTED.search(stderr)
    return m.group(1) if m else None


_QUANTIZE_ROW = re.compile(
    r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size =[^\n(]*?"
    r"(?:\((\w+)\))?\s*$",
    re.M,
)


def parse_quantize_plan(stderr: str) -> dict[str, str]:
    """llama-quantize's row per tensor (`[  8/ 272] blk.0.ffn_down.weight - [ 1536, 576, …],
    type = f32, size = 3.38 MiB -> 0.90 MiB (q8_0)`): {name: the type it writes, lowercase};
    a tensor it does not quantize keeps its type."""
    return {m.group(1): (m.group(3) or m.group(2)).lower() for m in _QUANTIZE_ROW.finditer(stderr)}


def parse_n_params(stderr: str) -> int | None:
    """`model params = 134.52 M` when llama.cpp printed it (verbose logs only)."""
    m = _PARAMS.search(stderr)
    if not m:
        return None
    return int(round(_f(m.group(1)) * {"K": 1e3, "M": 1e6, "B": 1e9}[m.group(2).upper()]))


def generation_text(stdout: str) -> str:
    """llama-completion's stdout is the text plus one trailing blank line it adds."""
    return stdout[:-1] if stdout.endswith("\n") else stdout


# "Mean    KLD:   0.000000 ±   0.000000", "99.0%   KLD:   0.000028", "Same top p: 100.000 ± 0.000 %"
_H = r"[ \t]*"
_STAT = re.compile(rf"^{_H}([^:\n]+?){_H}:{_H}{_NUM}{_H}%?(?:{_H}±{_H}{_NUM})?", re.M | re.I)


def parse_kld_block(stdout: str) -> dict[str, tuple[float, float | None]] | None:
    """Every `name: value [± err]` line of the statistics blocks after a --kl-divergence run,
    keyed like 'Mean KLD', '99.0% KLD', 'Same top p', 'Mean PPL(Q)'. None without the
    'KL divergence statistics' block (llama.cpp's only sign of success)."""
    if "KL divergence statistics" not in stdout:
        return None
    tail = stdout[stdout.index("======") :]
    out: dict[str, tuple[float, float | None]] = {}
    for m in _STAT.finditer(tail):
        key = " ".join(m.group(1).split())
        if key.startswith("="):
            continue
        out[key] = (_f(m.group(2)), _f(m.group(3)) if m.group(3) else None)
    return out


_IDS = re.compile(r"^\[([\d,\s]*)\]\s*$", re.M)
_COUNT = re.compile(r"Total number of tokens:\s*(\d+)")


def parse_token_ids(stdout: str) -> tuple[int, ...] | None:
    """`llama-tokenize --ids`: a Python-style list `[19556, 905]`."""
    m = _IDS.search(stdout)
    if not m:
        return None
    return tuple(int(x) for x in m.group(1).replace(",", " ").split())


def parse_token_count(stdout: str) -> int | None:
    """`llama-tokenize --show-count`: `Total number of tokens: 304830`."""
    m = _COUNT.search(stdout)
    return int(m.group(1)) if m else None


# --- progress of a running llama-perplexity (read while it runs) ------------------------------
# stderr: "perplexity: calculating perplexity over 8 chunks, n_ctx=512, batch_size=512, n_seq=1"
#    (KLD: "kl_divergence: computing over 8 chunks, …"), after the first pass
#    "perplexity: 1.63 seconds per pass - ETA " (the ETA itself goes to stdout: "0.20 minutes");
# stdout: "[1]17.0123,[2]…," (KLD: one table row per chunk, "   1      12.6138 ± …").
_RUN = re.compile(
    r"(?:calculating perplexity|computing) over (\d+) chunks, n_ctx=\d+(?:, batch_size=\d+)?"
    r"(?:, n_seq=(\d+))?"
)
_PER_PASS = re.compile(rf"\b{_NUM} seconds per pass - ETA", re.I)


@dataclass(frozen=True)
class ChunkProgress:
    """How far a llama-perplexity run is: chunks done of total, and its own per-pass time."""

    done: int
    total: int | None  # None until llama-perplexity has said how many chunks it will run
    seconds_per_pass: float | None  # printed after the first pass
    n_seq: int = 1  # chunks evaluated per pass (n_batch / n_ctx)

    def eta_s(self) -> float | None:
        """Seconds left by llama.cpp's own per-pass time: passes left × seconds per pass."""
        if self.total is None or self.seconds_per_pass is None:
            return None
        passes_left = -(-max(0, self.total - self.done) // max(1, self.n_seq))
        return passes_left * self.seconds_per_pass


def _last_match(pattern: re.Pattern, text: str) -> re.Match | None:
    found = list(pattern.finditer(text))
    return found[-1] if found else None


def parse_progress(stdout: str, stderr: str) -> ChunkProgress | None:
    """Progress from what a running (or finished) llama-perplexity has printed so far; also
    works on the tails of both streams. None before it has started on the chunks."""
    run = _last_match(_RUN, stderr)
    per_pass = _last_match(_PER_PASS, stderr)
    head = stdout.split("======", 1)[0]  # KLD: the statistics blocks are not chunk rows
    done = max((int(m.group(1)) for m in _CHUNK.finditer(head)), default=0)
    done = max(done, max((int(m.group(1)) for m in _KLD_ROW.finditer(head)), default=0))
    if run is None and per_pass is None and done == 0:
        return None
    return ChunkProgress(
        done=done,
        total=int(run.group(1)) if run else None,
        seconds_per_pass=_f(per_pass.group(1)) if per_pass else None,
        n_seq=int(run.group(2)) if run and run.group(2) else 1,
    )


# --- the exact engine (fq_core.measurement.llama.logits) ------------------------------------------
# stdout: "[0/8] n_ctx=512 n_vocab=49152 tokens=304830" when it starts on the chunks, then one
# "[3/8] 6.12 s" per chunk; a known failure ends stderr with "fq-logits: error: <one line>".
_LOGITS_STEP = re.compile(rf"^\[(\d+)/(\d+)\](?:\s+{_NUM} s\b)?", re.M)
_LOGITS_ERROR = re.compile(r"^fq-logits: error: (.+?)\s*$", re.M)


def parse_logits_progress(stdout: str, stderr: str = "") -> ChunkProgress | None:
    """Progress of a running fq_core.measurement.llama.logits worker: chunks done of total, and the
    mean seconds per chunk so far. None before it has started on the chunks."""
    found = list(_LOGITS_STEP.finditer(stdout))
    if not found:
        return None
    last = found[-1]
    secs = [_f(m.group(3)) for m in found if m.group(3) is not None]
    return ChunkProgress(
        done=int(last.group(1)),
        total=int(last.group(2)),
        seconds_per_pass=sum(secs) / len(secs) if secs else None,
    )


def parse_logits_error(stderr: str) -> str | None:
    """The worker's own one-line reason for failing (the last one), if it gave one."""
    found = _LOGITS_ERROR.findall(stderr)
    return found[-1] if found else None
