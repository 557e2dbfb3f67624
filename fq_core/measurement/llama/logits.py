"""The exact engine: full-precision logits from llama.cpp's own library, exact per-token KLD.

Why: llama-perplexity stores the baseline's log-probabilities in 16 bits (a KLD floor of
~1e-6) and evaluates with an F16 KV cache (~8e-7 more); effects of fake-quantizing a few
norm tensors hide under that floor. Here the baseline's raw float32 logits are saved as they
are, the KV cache is F32, flash attention is off, and every log-softmax is computed in
float64 at comparison time, so a model against its own baseline gives KLD exactly 0.

It reproduces llama-perplexity's KL-divergence protocol (tools/perplexity/perplexity.cpp of
the pinned source): the whole corpus is tokenized at once (one trailing newline dropped, BOS
added when the vocabulary says so, special tokens not parsed); n_chunk = min(chunks,
n_tokens // n_ctx); each chunk's first token is replaced by BOS when the model adds one; the
memory is cleared between chunks; only the second half is scored: positions n_ctx/2 ..
n_ctx-2, each predicting the next token (logits are requested for those positions only).

Run as a subprocess, through fq_core.platform.commands.run_logged (LlamaRunner.exact_perplexity), so
it is logged, bounded by a timeout and a crash in C code cannot take the caller down:

    LLAMA_CPP_LIB_PATH=<build>/lib PYTHONPATH=<build>/python \\
    python -m fq_core.measurement.llama.logits --model M --text T --ctx 512 --batch 512 \\
        --chunks 8 [--save-base BASE.npy | --against BASE.npy] --out RESULT.json

The base is a .npy of float32 logits, shape (n_chunk, n_ctx/2 - 1, n_vocab), with a
sidecar BASE.npy.meta.json holding the evaluated tokens (the base's tokens are authoritative,
as in llama-perplexity) and what produced them. The result is a JSON document (--out) plus
an .npz of per-token arrays beside it (kld, dp, same_top, nll, nll_base). stdout gets one
progress line per chunk: `[3/8] 6.1 s` (parse.parse_logits_progress). A known failure ends
with one stderr line `fq-logits: error: ...` and exit status 2 (bad input) or 1 (llama.cpp).

The numeric core (compare_logits, token_nll, the summaries) is plain numpy, importable and
tested without llama.cpp; only main() imports the bindings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BASE_FORMAT = "fq-logits-base/1"
RESULT_FORMAT = "fq-logits-result/1"
META_SUFFIX = ".meta.json"
ERROR_PREFIX = "fq-logits: error: "
_BLOCK_ELEMENTS = 1 << 22  # rows per numpy block: ~32 MiB of float64 per array


def meta_path(base: str | os.PathLike[str]) -> Path:
    """The sidecar of a saved base: BASE.npy -> BASE.npy.meta.json."""
    return Path(f"{os.fspath(base)}{META_SUFFIX}")


def per_token_path(out: str | os.PathLike[str]) -> Path:
    """The per-token arrays beside a result JSON: RESULT.json -> RESULT.npz."""
    return Path(out).with_suffix(".npz")


# ---------------------------------------------------------------------------------------------
# Numeric core


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (a new array)."""
    x = np.array(logits, dtype=np.float64, copy=True)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


@dataclass(frozen=True)
class TokenStats:
    """Per scored token: KL(base ‖ treated), Δp of the next token, same argmax, and both NLLs."""

    kld: np.ndarray  # float64
    dp: np.ndarray  # float64: p_treated(next) − p_base(next)
    same_top: np.ndarray  # bool
    nll: np.ndarray  # float64: −log p_treated(next)
    nll_base: np.ndarray  # float64: −log p_base(next)


def _joined(parts: list[TokenStats]) -> TokenStats:
    """Per-chunk statistics as one run's."""
    return TokenStats(
        *(
            np.concatenate([getattr(p, f) for p in parts])
            for f in ("kld", "dp", "same_top", "nll", "nll_base")
        )
    )


def _blocks(n_rows: int, n_vocab: int):
    step = max(1, _BLOCK_ELEMENTS // max(1, n_vocab))
    for r0 in range(0, n_rows, step):
        yield r0, min(n_rows, r0 + step)


def compare_logits(
    base: np.ndarray, treated: np.ndarray, targets: np.ndarray, *, threads: int = 1
) -> TokenStats:
    """The exact statistics of two logit arrays (n, n_vocab) for the next tokens `targets` (n,).

    KLD is Σ p_base·(log p_base − log p_treated) per row, as llama-perplexity defines it (base
    first), here from float64 log-softmaxes of the raw logits; identical inputs give exactly 0.
    Same top: the first argmax of both rows agree. Rows are processed in blocks (on `threads`
    threads: numpy releases the GIL; every row is computed the same way whatever the count),
    so a 262k vocabulary needs a few tens of MiB per thread beyond the inputs (may be memmaps).
    """
    base = np.asarray(base)  # no copy, also of a memmap
    treated = np.asarray(treated)
    targets = np.asarray(targets, dtype=np.int64)
    if base.shape != treated.shape or base.ndim != 2 or targets.shape != (base.shape[0],):
        raise ValueError(
            f"shapes differ: base {base.shape}, treated {treated.shape}, targets {targets.shape}"
        )
    n, n_vocab = base.shape
    kld = np.empty(n)
    nll = np.empty(n)
    nll_base = np.empty(n)
    same = np.empty(n, dtype=bool)

    def block(r0: int, r1: int) -> None:
        b = np.asarray(base[r0:r1])
        t = np.asarray(treated[r0:r1])
        same[r0:r1] = np.argmax(b, axis=1) == np.argmax(t, axis=1)
        lb = np.array(b, dtype=np.float64)
        lb -= lb.max(axis=1, keepdims=True)
        pb = np.exp(lb)
        total = pb.sum(axis=1, keepdims=True)
        lb -= np.log(total)
        pb /= total
        lt = log_softmax64(t)
        rows = np.arange(r1 - r0)
        tg = targets[r0:r1]
        nll[r0:r1] = -lt[rows, tg]
        nll_base[r0:r1] = -lb[rows, tg]
        lb -= lt  # log(p_b / p_t), in place
        lb *= pb
        # 0·log(0/q) is 0 (a base probability that underflowed contributes nothing)
        lb[pb == 0.0] = 0.0
        kld[r0:r1] = lb.sum(axis=1)

    spans = list(_blocks(n, n_vocab))
    if threads > 1 and len(spans) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=threads) as pool:
            for f in [pool.submit(block, r0, r1) for r0, r1 in spans]:
                f.result()
    else:
        for r0, r1 in spans:
            block(r0, r1)
    dp = np.exp(-nll) - np.exp(-nll_base)
    return TokenStats(kld, dp, same, nll, nll_base)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """−log softmax(logits)[target] per row, in float64 (the PPL of one model)."""
    logits = np.asarray(logits)
    targets = np.asarray(targets, dtype=np.int64)
    n, n_vocab = logits.shape
    out = np.empty(n)
    for r0, r1 in _blocks(n, n_vocab):
        ls = log_softmax64(np.asarray(logits[r0:r1]))
        out[r0:r1] = -ls[np.arange(r1 - r0), targets[r0:r1]]
    return out


def mean_and_err(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error as llama-perplexity computes them (0 for ≤ 10 values)."""
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    if n < 1:
        return 0.0, 0.0
    mean = float(v.mean())
    var = float(v.var())
    return mean, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def ppl_summary(nll: np.ndarray) -> dict:
    """PPL ± err ('Final estimate'), the running PPL after each chunk and each chunk's mean
    NLL, from the per-token NLLs of shape (n_chunk, n_scored)."""
    nll = np.asarray(nll, dtype=np.float64)
    flat = nll.reshape(-1)
    mean = float(flat.mean())
    ppl = math.exp(mean)
    var = float(flat.var())
    err = math.sqrt(var / (flat.size - 1)) * ppl if var > 0 and flat.size > 1 else math.nan
    per_chunk = nll.mean(axis=1)
    running = np.cumsum(nll.sum(axis=1)) / (nll.shape[1] * np.arange(1, nll.shape[0] + 1))
    return {
        "ppl": ppl,
        "ppl_err": err,
        "chunk_ppls": [math.exp(x) for x in running],
        "chunk_nlls": per_chunk.tolist(),
    }


def _pct(x: float) -> float:
    return 100.0 * x


def kld_summary(stats: TokenStats, n_chunk: int) -> dict:
    """The 'KL divergence statistics', 'Token probability statistics' and PPL ratio of
    llama-perplexity, from exact per-token values; plus per-chunk means."""
    kld = stats.kld
    n = kld.size
    mean, err = mean_and_err(kld)
    p90, p99, p999 = (float(x) for x in np.percentile(kld, [90.0, 99.0, 99.9]))
    same_p = float(stats.same_top.mean())
    same_err = math.sqrt(same_p * (1.0 - same_p) / (n - 1)) if n > 1 else 0.0
    dp2 = stats.dp * stats.dp
    mse, mse_err = mean_and_err(dp2)
    rms = math.sqrt(mse)
    rms_err = 0.5 / rms * mse_err if rms > 0 else 0.0
    mean_dp, mean_dp_err = mean_and_err(stats.dp)
    d = stats.nll - stats.nll_base
    ln_ratio, ln_ratio_err = mean_and_err(d)
    ppl_q, ppl_q_err = mean_and_err(stats.nll)
    ppl_b, ppl_b_err = mean_and_err(stats.nll_base)
    by_chunk = lambda a: a.reshape(n_chunk, -1).mean(axis=1).tolist()  # noqa: E731
    return {
        "mean": mean,
        "mean_err": err,
        "median": float(np.median(kld)),
        "p90": p90,
        "p99": p99,
        "p999": p999,
        "max": float(kld.max()),
        "min": float(kld.min()),
        "same_top_pct": _pct(same_p),
        "same_top_err": _pct(same_err),
        "rms_dp_pct": _pct(rms),
        "rms_dp_err": _pct(rms_err),
        "mean_dp_pct": _pct(mean_dp),
        "mean_dp_err": _pct(mean_dp_err),
        "max_abs_dp_pct": _pct(float(np.abs(stats.dp).max())),
        "ln_ppl_ratio": ln_ratio,
        "ln_ppl_ratio_err": ln_ratio_err,
        "ppl_ratio": math.exp(ln_ratio),
        "ppl_ratio_err": math.exp(ln_ratio) * ln_ratio_err,
        "ppl_q": math.exp(ppl_q),
        "ppl_q_err": math.exp(ppl_q) * ppl_q_err,
        "ppl_base": math.exp(ppl_b),
        "ppl_base_err": math.exp(ppl_b) * ppl_b_err,
        "n_tokens": int(n),
        "chunk_klds": by_chunk(kld),
        "chunk_same_top_pct": [_pct(x) for x in by_chunk(stats.same_top.astype(np.float64))],
        "chunk_nlls": by_chunk(stats.nll),
        "chunk_nlls_base": by_chunk(stats.nll_base),
    }


# ---------------------------------------------------------------------------------------------
# The saved base


class InputError(Exception):
    """A bad argument, base file or corpus: exit status 2."""


class LlamaError(Exception):
    """llama.cpp could not load, tokenize or decode: exit status 1."""


def read_base(path: Path) -> tuple[np.ndarray, dict]:
    """The saved logits (memmap) and their sidecar, validated against each other."""
    meta_file = meta_path(path)
    if not path.is_file():
        raise InputError(f"KLD base {path} does not exist")
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise InputError(
            f"{meta_file} is missing: {path} is not a base saved by "
            "fq_core.measurement.llama.logits"
        ) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{meta_file} is unreadable: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != BASE_FORMAT:
        raise InputError(f"{meta_file} is not an {BASE_FORMAT} description")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path} is not a .npy of logits (or is truncated): {exc}") from None
    try:
        want = (int(meta["n_chunk"]), int(meta["n_scored"]), int(meta["n_vocab"]))
        tokens = np.asarray(meta["tokens"], dtype=np.int64)
        n_ctx = int(meta["n_ctx"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{meta_file} lacks a field: {exc}") from None
    if arr.dtype != np.float32 or arr.shape != want:
        raise InputError(
            f"{path} holds {arr.dtype} {arr.shape}, its description says float32 {want}"
        )
    if tokens.shape != (want[0] * n_ctx,) or want[1] != n_ctx - 1 - n_ctx // 2:
        raise InputError(f"{meta_file}: tokens or n_scored do not fit n_ctx={n_ctx}")
    return arr, meta


# ---------------------------------------------------------------------------------------------
# The worker (imports the bindings: only under `python -m`)


class _Engine:
    """A model and a context made for exact logits: F32 KV cache, no flash attention."""

    def __init__(self, model_path: Path, *, n_ctx: int, n_batch: int, threads: int) -> None:
        import logging

        try:
            import llama_cpp.llama_cpp as L
        except Exception as exc:  # missing lib, mismatched bindings: say which
            raise LlamaError(
                f"cannot load llama.cpp's Python bindings / libllama "
                f"(LLAMA_CPP_LIB_PATH={os.environ.get('LLAMA_CPP_LIB_PATH')}): {exc}"
            ) from None
        logging.getLogger("llama-cpp-python").setLevel(logging.WARNING)  # llama.cpp's info logs
        self.L = L
        _backend_init(L)
        mparams = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(os.fsencode(model_path), mparams)
        if not self.model:
            raise LlamaError(f"llama.cpp could not load the model {model_path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        if L.llama_vocab_get_add_eos(self.vocab):
            raise LlamaError("the vocabulary adds EOS: llama-perplexity refuses such models too")
        self.bos = int(L.llama_vocab_bos(self.vocab))
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        cp.n_seq_max = 1
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.type_k = L.GGML_TYPE_F32
        cp.type_v = L.GGML_TYPE_F32
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.swa_full = False  # as llama-perplexity (common_params' default)
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise LlamaError("llama.cpp could not create a context")
        self.n_ctx, self.n_batch = n_ctx, n_batch
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        self._tok = np.ctypeslib.as_array(self.batch.token, shape=(n_batch,))
        self._pos = np.ctypeslib.as_array(self.batch.pos, shape=(n_batch,))
        self._nseq = np.ctypeslib.as_array(self.batch.n_seq_id, shape=(n_batch,))
        self._out = np.ctypeslib.as_array(self.batch.logits, shape=(n_batch,))
        for k in range(n_batch):
            self.batch.seq_id[k][0] = 0
        self._nseq[:] = 1

    def tokenize(self, text: bytes) -> np.ndarray:
        """common_tokenize(ctx, text, add_special=true, parse_special=false)."""
        L = self.L
        n_max = len(text) + 2
        buf = (L.llama_token * n_max)()
        n = L.llama_tokenize(self.vocab, text, len(text), buf, n_max, True, False)
        if n < 0:
            n_max = -n
            buf = (L.llama_token * n_max)()
            n = L.llama_tokenize(self.vocab, text, len(text), buf, n_max, True, False)
        if n < 0:
            raise LlamaError(f"tokenization failed ({n})")
        return np.frombuffer(buf, dtype=np.int32, count=n).astype(np.int64)

    def chunk_logits(self, tokens: np.ndarray, first: int, out: np.ndarray) -> None:
        """Decode one chunk from an empty memory; the logits of positions first .. n_ctx-2
        (out: (n_ctx-1-first, n_vocab) float32)."""
        L = self.L
        n_ctx, n_batch, n_vocab = self.n_ctx, self.n_batch, self.n_vocab
        tokens = tokens.copy()
        if self.add_bos:
            tokens[0] = self.bos
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        row = 0
        for b0 in range(0, n_ctx, n_batch):
            size = min(n_ctx - b0, n_batch)
            pos = np.arange(b0, b0 + size)
            want = (pos >= first) & (pos <= n_ctx - 2)
            self._tok[:size] = tokens[b0 : b0 + size]
            self._pos[:size] = pos
            self._out[:size] = want
            self.batch.n_tokens = size
            rc = L.llama_decode(self.ctx, self.batch)
            if rc != 0:
                raise LlamaError(f"llama_decode failed (status {rc}) at position {b0}")
            n_out = int(want.sum())
            if n_out:
                ptr = L.llama_get_logits(self.ctx)
                got = np.ctypeslib.as_array(ptr, shape=(n_out * n_vocab,))
                out[row : row + n_out] = got.reshape(n_out, n_vocab)
                row += n_out
        if row != out.shape[0]:
            raise LlamaError(f"got logits for {row} positions, expected {out.shape[0]}")

    def close(self) -> None:
        """Frees this model; the backend stays up for the process's other engines (a sequential
        run holds the treatment and its placebos at once)."""
        L = self.L
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)


_BACKEND: list = []


def _backend_init(L) -> None:
    if not _BACKEND:
        L.llama_backend_init()
        _BACKEND.append(L)


def _read_text(path: Path) -> bytes:
    """The corpus as llama-perplexity's -f reads it: bytes, one trailing newline dropped."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the text {path}: {exc.strerror or exc}") from None
    return data[:-1] if data.endswith(b"\n") else data


def _write_json(path: Path, doc: dict) -> None:
    """Atomically, into a folder made if need be (a result's folder under logs/ is not made
    by anyone else when its baseline was cached)."""
    from ...platform.atomic import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(doc, indent=1) + "\n", force=True)


def _run(args: argparse.Namespace) -> dict:
    from ...platform.atomic import temporary_for

    n_ctx, threads = args.ctx, args.threads or os.cpu_count() or 1
    if n_ctx < 8 or n_ctx % 2:
        raise InputError(f"--ctx {n_ctx}: an even context of at least 8 tokens is needed")
    n_batch = min(args.batch, n_ctx)
    if n_batch < 1:
        raise InputError(f"--batch {args.batch} must be positive")
    first = n_ctx // 2
    n_scored = n_ctx - 1 - first

    base = meta = None
    if args.against is not None:
        base, meta = read_base(Path(args.against))
        if int(meta["n_ctx"]) != n_ctx:
            raise InputError(f"the base was saved with ctx={meta['n_ctx']}, not {n_ctx}")

    t0 = time.monotonic()
    eng = _Engine(Path(args.model), n_ctx=n_ctx, n_batch=n_batch, threads=threads)
    t_load = time.monotonic() - t0
    try:
        if meta is not None and int(meta["n_vocab"]) != eng.n_vocab:
            raise InputError(
                f"vocabulary mismatch: the base {args.against} has {meta['n_vocab']} tokens, "
                f"the model {args.model} has {eng.n_vocab}"
            )
        t1 = time.monotonic()
        n_corpus = None
        if args.text is not None:
            all_tokens = eng.tokenize(_read_text(Path(args.text)))
            n_corpus = int(all_tokens.size)
        t_tok = time.monotonic() - t1
        if meta is not None:
            tokens = np.asarray(meta["tokens"], dtype=np.int64)
            n_chunk = int(meta["n_chunk"])
            if args.chunks is not None:
                n_chunk = min(n_chunk, args.chunks)
            if n_corpus is not None:
                mine = all_tokens[: n_chunk * n_ctx]
                if not np.array_equal(mine, tokens[: n_chunk * n_ctx]):
                    raise InputError(
                        "the base's tokens differ from this model's tokenization of the text "
                        "(another corpus or tokenizer)"
                    )
        else:
            if n_corpus is None:
                raise InputError("--text is needed without --against")
            if n_corpus < 2 * n_ctx:
                raise InputError(
                    f"the text tokenizes to only {n_corpus} tokens; a context of {n_ctx} needs "
                    f"at least {2 * n_ctx}"
                )
            n_chunk_max = n_corpus // n_ctx
            n_chunk = n_chunk_max if args.chunks is None else min(args.chunks, n_chunk_max)
            tokens = all_tokens[: n_chunk * n_ctx]
        if n_chunk < 1:
            raise InputError("no chunk to evaluate")
        print(f"[0/{n_chunk}] n_ctx={n_ctx} n_vocab={eng.n_vocab} tokens={n_corpus}", flush=True)

        targets = np.stack(
            [tokens[i * n_ctx + first + 1 : (i + 1) * n_ctx] for i in range(n_chunk)]
        )
        logits = np.empty((n_scored, eng.n_vocab), dtype=np.float32)
        nll = np.empty((n_chunk, n_scored))
        parts: list[TokenStats] = []
        secs: list[float] = []
        decode_s = 0.0
        saved = None
        doc_extra: dict = {}

        def evaluate_all(sink) -> None:
            nonlocal decode_s
            for i in range(n_chunk):
                tc = time.monotonic()
                eng.chunk_logits(tokens[i * n_ctx : (i + 1) * n_ctx], first, logits)
                decode_s += time.monotonic() - tc
                if sink is not None:
                    sink[i] = logits
                if base is not None:
                    st = compare_logits(base[i], logits, targets[i], threads=threads)
                    parts.append(st)
                    nll[i] = st.nll
                else:
                    nll[i] = token_nll(logits, targets[i])
                if not np.all(np.isfinite(nll[i])):
                    bad = int(np.count_nonzero(~np.isfinite(nll[i])))
                    print(
                        f"fq-logits: warning: chunk {i + 1}: {bad} non-finite NLLs",
                        file=sys.stderr,
                        flush=True,
                    )
                secs.append(time.monotonic() - tc)
                print(f"[{i + 1}/{n_chunk}] {secs[-1]:.2f} s", flush=True)

        t2 = time.monotonic()
        if args.save_base is not None:
            target = Path(args.save_base)
            target.parent.mkdir(parents=True, exist_ok=True)
            with temporary_for(target, force=True) as tmp:
                saved = np.lib.format.open_memmap(
                    tmp, mode="w+", dtype=np.float32, shape=(n_chunk, n_scored, eng.n_vocab)
                )
                evaluate_all(saved)
                saved.flush()
                del saved
                _write_json(
                    meta_path(target),
                    {
                        "format": BASE_FORMAT,
                        "n_ctx": n_ctx,
                        "n_batch": n_batch,
                        "n_chunk": n_chunk,
                        "n_scored": n_scored,
                        "n_vocab": eng.n_vocab,
                        "add_bos": eng.add_bos,
                        "bos": eng.bos,
                        "dtype": "float32",
                        "model": str(args.model),
                        "model_bytes": os.path.getsize(args.model),
                        "text": str(args.text),
                        "n_tokens_corpus": n_corpus,
                        "tokens": tokens.tolist(),
                    },
                )
            doc_extra["base"] = str(target)
            doc_extra["base_bytes"] = target.stat().st_size
        else:
            evaluate_all(None)
        eval_s = time.monotonic() - t2
    finally:
        eng.close()

    doc = {
        "format": RESULT_FORMAT,
        "mode": "against" if base is not None else ("base" if args.save_base else "ppl"),
        "model": str(args.model),
        "text": str(args.text) if args.text else None,
        "against": str(args.against) if args.against else None,
        "n_ctx": n_ctx,
        "n_batch": n_batch,
        "n_chunks": n_chunk,
        "n_scored_per_chunk": n_scored,
        "n_vocab": eng.n_vocab,
        "n_tokens_corpus": n_corpus,
        "add_bos": eng.add_bos,
        "threads": threads,
        "kv_type": "f32",
        "flash_attn": False,
        **ppl_summary(nll),
        "load_seconds": t_load,
        "tokenize_seconds": t_tok,
        "eval_seconds": eval_s,
        "decode_seconds": decode_s,
        "seconds_per_chunk": secs,
        "tokens_per_s": n_chunk * n_ctx / eval_s if eval_s > 0 else None,
        **doc_extra,
    }
    arrays = {"nll": nll.astype(np.float64)}
    if base is not None:
        st = _joined(parts)
        doc["kld"] = kld_summary(st, n_chunk)
        arrays.update(
            kld=st.kld.reshape(n_chunk, n_scored),
            dp=st.dp.reshape(n_chunk, n_scored),
            same_top=st.same_top.reshape(n_chunk, n_scored),
            nll_base=st.nll_base.reshape(n_chunk, n_scored),
        )
    if args.out is not None:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        npz = per_token_path(out)
        with temporary_for(npz, force=True) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, targets=targets.astype(np.int32), **arrays)
        doc["per_token"] = str(npz)
        _write_json(out, doc)
    return doc


def _run_sequential(args: argparse.Namespace) -> dict:
    """The treatment and its placebos held loaded at once and fed the base's chunks in order,
    one chunk each per look, until the rule (fq_core.measurement.sequential) stops: the paired
    per-chunk KLDs are all the rule reads, and nothing is evaluated past its decision."""
    from ..sequential import Rule, anytime_p, log_ratios, look, words

    try:
        rule = Rule(**json.loads(args.until_decided))
    except (TypeError, ValueError) as exc:
        raise InputError(f"--until-decided: not a stopping rule: {exc}") from None
    if args.against is None or not args.placebo:
        raise InputError("--until-decided needs --against and at least one --placebo")
    n_ctx, threads = args.ctx, args.threads or os.cpu_count() or 1
    first = n_ctx // 2
    base, meta = read_base(Path(args.against))
    if int(meta["n_ctx"]) != n_ctx:
        raise InputError(f"the base was saved with ctx={meta['n_ctx']}, not {n_ctx}")
    cap = min(int(meta["n_chunk"]), rule.max_chunks)
    if cap < rule.min_chunks:
        raise InputError(
            f"the base holds {meta['n_chunk']} chunks; the rule needs at least {rule.min_chunks}"
        )
    if cap < rule.max_chunks:  # the base's chunks are the cap: the rule stops there, as "cap"
        rule = dataclasses.replace(rule, max_chunks=cap, rank_chunks=min(rule.rank_chunks, cap))
    tokens = np.asarray(meta["tokens"], dtype=np.int64)
    n_batch = min(args.batch, n_ctx)
    paths = [Path(args.model), *(Path(p) for p in args.placebo)]
    t0 = time.monotonic()
    engines: list[_Engine] = []
    try:
        for path in paths:
            engines.append(_Engine(path, n_ctx=n_ctx, n_batch=n_batch, threads=threads))
            if engines[-1].n_vocab != int(meta["n_vocab"]):
                raise InputError(f"vocabulary mismatch: {path} and the base {args.against}")
        t_load = time.monotonic() - t0
        n_scored = n_ctx - 1 - first
        logits = np.empty((n_scored, engines[0].n_vocab), dtype=np.float32)
        parts: list[list[TokenStats]] = [[] for _ in engines]
        secs: list[float] = []
        print(f"[0/{cap}] n_ctx={n_ctx} models={len(engines)} until decided", flush=True)
        t2 = time.monotonic()
        stopped = None
        for i in range(cap):
            tc = time.monotonic()
            chunk = tokens[i * n_ctx : (i + 1) * n_ctx]
            target = chunk[first + 1 :]
            # once decided, the placebos rest; the treatment goes on to the ranking's chunks
            running = engines if stopped is None else engines[:1]
            for eng, acc in zip(running, parts, strict=False):
                eng.chunk_logits(chunk, first, logits)
                acc.append(compare_logits(base[i], logits, target, threads=threads))
            secs.append(time.monotonic() - tc)
            print(f"[{i + 1}/{cap}] {secs[-1]:.2f} s", flush=True)
            if stopped is None:
                treated = [float(st.kld.mean()) for st in parts[0]]
                placebo = [
                    float(np.mean([float(acc[k].kld.mean()) for acc in parts[1:]]))
                    for k in range(i + 1)
                ]
                ratios = log_ratios(treated, placebo)
                look_now = look(rule, ratios)
                stopped = look_now if look_now.stop else None
            if stopped is not None and i + 1 >= rule.rank_chunks:
                break
        eval_s = time.monotonic() - t2
    finally:
        for eng in engines:
            eng.close()
    n_chunk = len(secs)
    if stopped is None:  # the loop ends at the cap, where look() always stops
        raise AssertionError("a sequential run ended without a stop")

    def summary(acc: list[TokenStats], path: Path) -> dict:
        st, n = _joined(acc), len(acc)
        return {
            "model": str(path),
            "n_chunks": n,
            **ppl_summary(st.nll.reshape(n, -1)),
            "kld": kld_summary(st, n),
        }

    treated_doc = summary(parts[0], paths[0])
    return {
        "format": RESULT_FORMAT,
        "mode": "until-decided",
        "text": None,
        "against": str(args.against),
        "n_ctx": n_ctx,
        "n_batch": n_batch,
        "n_chunks": n_chunk,
        "n_scored_per_chunk": n_scored,
        "n_vocab": engines[0].n_vocab,
        "n_tokens_corpus": meta.get("n_tokens_corpus"),
        "add_bos": engines[0].add_bos,
        "threads": threads,
        "kv_type": "f32",
        "flash_attn": False,
        **treated_doc,
        "placebos": [summary(acc, p) for acc, p in zip(parts[1:], paths[1:], strict=True)],
        "sequential": {
            "rule": rule.to_json(),
            "n_chunks": stopped.n,
            "cap": cap,
            "stop": stopped.stop,
            "ratio": stopped.ratio,
            "low": stopped.low,
            "high": stopped.high,
            "spread": stopped.spread,
            "p_value": anytime_p(rule, ratios),
            "log_ratios": ratios,
            "words": words(stopped, rule),
        },
        "load_seconds": t_load,
        "eval_seconds": eval_s,
        "seconds_per_chunk": secs,
        "tokens_per_s": sum(map(len, parts)) * n_ctx / eval_s if eval_s > 0 else None,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fq_core.measurement.llama.logits",
        description="Exact PPL and KL divergence from llama.cpp's library (full-precision logits).",
    )
    p.add_argument("--model", required=True, help="the GGUF to evaluate")
    p.add_argument("--text", help="the corpus (needed unless --against gives the tokens)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--chunks", type=int, help="at most this many chunks (default: all)")
    p.add_argument("--threads", type=int)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--save-base", metavar="FILE.npy", help="save the raw float32 logits")
    g.add_argument("--against", metavar="FILE.npy", help="compare with a saved base")
    p.add_argument("--out", metavar="RESULT.json", help="the result document (atomic)")
    p.add_argument(
        "--placebo",
        action="append",
        metavar="GGUF",
        help="with --until-decided: a placebo evaluated chunk by chunk beside the model",
    )
    p.add_argument(
        "--until-decided",
        metavar="RULE.json",
        help="evaluate the model and its placebos against --against one chunk at a time until "
        "this stopping rule (fq_core.measurement.sequential.Rule, as JSON) decides",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ...platform.atomic import install_signal_cleanup

    install_signal_cleanup()  # SIGTERM from a timeout removes the temporaries
    try:
        if args.until_decided is not None:
            doc = _run_sequential(args)
            if args.out is not None:
                _write_json(Path(args.out), doc)
        else:
            doc = _run(args)
    except InputError as exc:
        print(ERROR_PREFIX + str(exc), file=sys.stderr, flush=True)
        return 2
    except LlamaError as exc:
        print(ERROR_PREFIX + str(exc), file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # FqError from atomic (disk full ...) and the unexpected
        import traceback

        traceback.print_exc()
        print(ERROR_PREFIX + f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    if args.out is None:
        print(json.dumps({k: v for k, v in doc.items() if k != "kld"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
