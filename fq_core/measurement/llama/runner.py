"""llama.cpp's tools driven through the one logged subprocess call (fq_core.platform.commands), with
typed results; all parsing of their output is in parse.py."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ...errors import FqError, LlamaFailed, NotDeployable
from ...platform import progress
from ...platform.commands import CommandRecord, run_logged
from ...platform.paths import logs_dir
from ...storage import codec
from ...storage.record import KLD, SequentialStop
from . import parse

__all__ = ["CommandRecord", "run_logged"]  # re-exported: callers that drive llama.cpp

log = logging.getLogger(__name__)


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
    chat_template: str | None = None  # passed to llama-completion (None: the GGUF's own)

    def to_json(self) -> dict:
        return {
            "prompt": self.prompt,
            "chat": self.chat,
            "text": self.text,
            "n_tokens": self.n_tokens,
            "tokens_per_s": self.tokens_per_s,
            "tool": self.tool,
            "chat_template": self.chat_template,
        }


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    ppl_err: float
    chunk_ppls: tuple[float, ...]  # running PPL after each chunk
    n_chunks: int
    ctx: int
    tokens_per_s: float | None
    kld: KLD | None  # the record's own type: what llama.cpp measured is what is stored
    command: CommandRecord
    # the exact engine's result document (its per-token arrays: logits.per_token_path(details))
    details: Path | None = None

    def to_json(self) -> dict:
        return {
            "ppl": self.ppl,
            "ppl_err": self.ppl_err,
            "chunk_ppls": list(self.chunk_ppls),
            "n_chunks": self.n_chunks,
            "ctx": self.ctx,
            "tokens_per_s": self.tokens_per_s,
            "kld": codec.to_builtins(self.kld),
        }


def _kld_stats(block: dict, chunk_means: tuple[float, ...]) -> KLD:
    """llama-perplexity's 'KL divergence statistics' (and its PPL ratio and Δp lines)."""

    def v(key):
        return block[key][0] if key in block else None

    return KLD(
        mean=block["Mean KLD"][0],
        mean_err=block["Mean KLD"][1],
        median=v("Median KLD"),
        p90=v("90.0% KLD"),
        p99=v("99.0% KLD"),
        p999=v("99.9% KLD"),
        max=v("Maximum KLD"),
        same_top_pct=block["Same top p"][0],
        same_top_err=block["Same top p"][1],
        rms_dp_pct=v("RMS Δp"),
        ppl_ratio=v("Mean PPL(Q)/PPL(base)"),
        chunk_means=chunk_means,
    )


_PROGRESS_S = 2.0  # how often a running llama-perplexity's output is read for progress


def _chunk_watch(parser=None) -> Callable[..., None]:
    """A run_logged `watch` turning llama-perplexity's (or, with parse.parse_logits_progress,
    the exact engine's) output into progress.chunks events; the ETA counts down from the
    per-pass time since the last chunk was seen done.
    Never raises: progress must not stop (or kill) the run it reports on."""
    seen = {"done": -1, "at": time.monotonic()}

    def watch(stdout: str, stderr: str, *, final: bool = False) -> None:
        try:
            p = (parser or parse.parse_progress)(stdout, stderr)  # looked up at each call
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


def _exact_kld_stats(k: dict) -> KLD:
    """The exact engine's "kld" block (llama.logits.kld_summary) as the record's KLD."""
    return KLD(
        mean=k["mean"],
        mean_err=k["mean_err"],
        median=k["median"],
        p90=k["p90"],
        p99=k["p99"],
        p999=k["p999"],
        max=k["max"],
        same_top_pct=k["same_top_pct"],
        same_top_err=k["same_top_err"],
        rms_dp_pct=k["rms_dp_pct"],
        ppl_ratio=k["ppl_ratio"],
        chunk_means=tuple(k["chunk_klds"]),
        exact=True,
    )


def _path_of(x) -> Path:
    """A model or corpus given as a path, a ModelRef or a Corpus (anything with .path)."""
    return Path(getattr(x, "path", x))


@dataclass(frozen=True)
class SequentialRun:
    """A sequential exact run: the treatment's and each placebo's figures over the chunks
    the stopping rule used, and why it stopped there."""

    treated: PerplexityResult
    placebos: tuple[PerplexityResult, ...]
    stop: SequentialStop


class LlamaRunner:
    """llama.cpp's tools as typed calls; every call is bounded by a timeout and logged."""

    def __init__(
        self,
        tools,
        *,
        threads: int | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        timeout_s: float = 3600.0,
        gpu_layers: int | None = None,
    ) -> None:
        self.tools = tools
        self.threads = threads or os.cpu_count() or 1
        self.log_dir = log_dir
        self.timeout_s = timeout_s
        # layers offloaded to a GPU build (-ngl); None passes nothing (llama.cpp's default)
        self.gpu_layers = gpu_layers

    def with_threads(self, threads: int) -> LlamaRunner:
        """The same runner (tools, -ngl, log dir, timeout) with another thread count."""
        other = copy.copy(self)
        other.threads = threads
        return other

    def _ngl(self) -> list[str]:
        return [] if self.gpu_layers is None else ["-ngl", str(self.gpu_layers)]

    # -- plumbing ------------------------------------------------------------------------
    def _run(self, tool: str, args: Sequence, *, timeout_s: float | None = None, watch=None):
        argv = [self.tools.path(tool), *args]
        return run_logged(
            argv,
            tool=tool,
            timeout_s=timeout_s or self.timeout_s,
            log_dir=self.log_dir,
            watch=watch,
            heartbeat_s=_PROGRESS_S,
        )

    @staticmethod
    def failure(rec: CommandRecord, why: str) -> LlamaFailed:
        if not rec.ok and not rec.timed_out:
            unsupported = parse.unsupported_op(rec.stderr())
            if unsupported:
                return NotDeployable(f"not deployable in this llama.cpp: {unsupported}")
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
            + ["-t", str(self.threads), *self._ngl()],
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
        args += ["--no-display-prompt", "-t", str(self.threads), *self._ngl()]
        args += ["-st"] if chat else ["-no-cnv"]
        if chat and chat_template:
            as_file = Path(chat_template).is_file()
            args += ["--chat-template-file" if as_file else "--chat-template", chat_template]
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
            prompt,
            chat,
            text,
            t.n_generated,
            t.tokens_per_s,
            "llama-completion",
            rec,
            ids,
            chat_template if chat else None,
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

    def quantize(
        self,
        src,
        dst,
        default_type: str,
        *,
        tensor_types: Sequence[tuple[str, str]] = (),
        pure: bool = False,
        dry: bool = False,
    ) -> CommandRecord:
        """llama-quantize `src` into `dst` as `default_type`, with `--tensor-type` overrides
        (a regex on tensor names, type; the first that matches a tensor wins). It writes `dst`
        in place: a caller that publishes the file gives a temporary path."""
        args: list = []
        for pattern, type_name in tensor_types:
            args += ["--tensor-type", f"{pattern}={type_name}"]
        if pure:
            args.append("--pure")
        if dry:
            args.append("--dry-run")
        args += [_path_of(src), _path_of(dst), default_type, str(self.threads)]
        rec = self._run("llama-quantize", args)
        self._require_ok(rec)
        return rec

    def quantize_plan(
        self, src, default_type: str, *, tensor_types: Sequence[tuple[str, str]] = ()
    ) -> dict[str, str]:
        """The type llama-quantize would give each tensor (`--dry-run`: nothing written):
        {name: type, lowercase}."""
        with tempfile.TemporaryDirectory(prefix="fq-dry-run-") as tmp:
            rec = self.quantize(
                src, Path(tmp) / "none.gguf", default_type, tensor_types=tensor_types, dry=True
            )
        plan = parse.parse_quantize_plan(rec.stderr())
        if not plan:
            raise self.failure(rec, "printed no tensor plan")
        return plan

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
        args += ["-t", str(self.threads), *self._ngl()]
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

    def exact_perplexity(
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
        """`perplexity` by the exact engine (fq_core.measurement.llama.logits, llama.cpp's library
        in a logged subprocess): kl_base saves the raw float32 logits (.npy + .meta.json),
        kl_against compares with them exactly (KLD.exact, chunk_means)."""
        from . import logits as engine  # numpy only; the bindings load in the subprocess

        if kl_base is not None and kl_against is not None:
            raise ValueError("kl_base and kl_against are exclusive")
        if kl_against is not None and not Path(kl_against).is_file():
            raise LlamaFailed(f"KLD base logits {kl_against} do not exist")
        extra: list = []
        if chunks is not None:
            extra += ["--chunks", str(chunks)]
        if kl_base is not None:
            extra += ["--save-base", Path(kl_base)]
        if kl_against is not None:
            extra += ["--against", Path(kl_against)]
        rec, out = self._run_exact(model, text, ctx, batch, extra)
        try:
            return self._exact_result(
                rec, out, self._exact_doc(rec, out), kld=kl_against is not None
            )
        except BaseException:
            if kl_base is not None:  # never leave a base behind that did not finish
                Path(kl_base).unlink(missing_ok=True)
                engine.meta_path(kl_base).unlink(missing_ok=True)
            raise

    def _run_exact(self, model, text, ctx: int, batch: int, extra: list):
        """One logged run of the exact engine (fq_core.measurement.llama.logits): the record
        and where its result document goes."""
        lib_dir, python_dir = self.tools.library()
        root = Path(self.log_dir).resolve() if self.log_dir is not None else logs_dir().resolve()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        out = root / "logits" / f"{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        argv = [
            sys.executable,
            "-m",
            "fq_core.measurement.llama.logits",
            "--model",
            _path_of(model),
        ]
        if text is not None:
            argv += ["--text", _path_of(text)]
        argv += ["--ctx", str(ctx), "--batch", str(batch), "--threads", str(self.threads)]
        argv += ["--out", out, *extra]
        # the bindings of this build first; fq_core importable wherever the caller runs
        fq_root = Path(__file__).resolve().parents[3]
        paths = [str(python_dir), str(fq_root), os.environ.get("PYTHONPATH", "")]
        env = {
            "LLAMA_CPP_LIB_PATH": str(lib_dir),
            "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        }
        watch = _chunk_watch(parse.parse_logits_progress) if progress.listening() else None
        rec = run_logged(
            argv,
            tool="fq-logits",
            timeout_s=self.timeout_s,
            log_dir=self.log_dir,
            env_overrides=env,
            watch=watch,
            heartbeat_s=_PROGRESS_S,
        )
        if watch is not None and rec.ok:
            watch(rec.stdout(), rec.stderr(), final=True)
        return rec, out

    def exact_until_decided(
        self,
        model,
        placebos,
        *,
        against: str | os.PathLike[str],
        rule: dict,
        ctx: int = 512,
        batch: int = 512,
    ) -> SequentialRun:
        """The exact engine holding `model` and its `placebos` loaded, fed the base's chunks
        one look at a time until the stopping rule (fq_core.measurement.sequential.Rule, as
        its to_json) decides: each one's PPL and KLD over the chunks used, and the stop."""
        argv = ["--against", Path(against), "--until-decided", json.dumps(rule)]
        for placebo in placebos:
            argv += ["--placebo", _path_of(placebo)]
        rec, out = self._run_exact(model, None, ctx, batch, argv)
        doc = self._exact_doc(rec, out)
        treated = self._exact_result(rec, out, doc, kld=True)
        others = tuple(
            self._exact_result(rec, out, dict(doc, **placebo), kld=True)
            for placebo in doc["placebos"]
        )
        try:
            stop = codec.convert(doc["sequential"], SequentialStop)
        except (KeyError, FqError) as exc:
            raise self.failure(rec, f"wrote no readable stop: {exc}") from None
        return SequentialRun(treated, others, stop)

    def _exact_doc(self, rec: CommandRecord, out: Path) -> dict:
        """The exact engine's result document, once it is known to have finished well."""
        if rec.timed_out:
            raise self.failure(rec, f"timed out after {rec.duration_s:.0f} s")
        if rec.exit_status != 0:
            why = parse.parse_logits_error(rec.stderr())
            if why and not parse.unsupported_op(rec.stderr()):
                raise LlamaFailed(f"{rec.tool} failed: {why} ({rec.command_line})")
            raise self.failure(rec, f"exited with status {rec.exit_status}")
        try:
            return json.loads(out.read_text())
        except (OSError, ValueError) as exc:
            raise self.failure(rec, f"wrote no readable result {out}: {exc}") from None

    def _exact_result(
        self, rec: CommandRecord, out: Path, doc: dict, *, kld: bool
    ) -> PerplexityResult:
        """One model's figures from a result document (a sequential run holds several)."""
        ppl, ppl_err = doc["ppl"], doc["ppl_err"]
        chunk_ppls = tuple(doc["chunk_ppls"])
        if not math.isfinite(ppl) or any(not math.isfinite(c) for c in chunk_ppls):
            raise self.failure(rec, f"gave a non-finite perplexity ({ppl}): NaN/Inf logits")
        kld_stats = None
        if kld:
            if "kld" not in doc:
                raise self.failure(rec, "wrote no KL divergence statistics")
            kld_stats = _exact_kld_stats(doc["kld"])
        return PerplexityResult(
            ppl,
            ppl_err if ppl_err is not None else math.nan,
            chunk_ppls,
            doc["n_chunks"],
            doc["n_ctx"],
            doc.get("tokens_per_s"),
            kld_stats,
            rec,
            out,
        )

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
            kld_stats = _kld_stats(block, parse.parse_kld_chunk_klds(out))
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
