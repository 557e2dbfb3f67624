"""Evaluate a model against a baseline with llama.cpp: load, greedy generation, PPL and KLD.

The baseline (load, generations, one llama-perplexity run that also saves its logits) is
computed once per (model, corpus, llama.cpp version, settings) and cached, because the stage
tests compare many treatments and placebos with the same baseline.

Two engines give PPL and KLD: "llama-perplexity" (the tool; its base stores log-probabilities
in 16 bits, F16 KV cache) and "logits" (fq_core.measurement.llama.logits: llama.cpp's library, raw
float32 logits, F32 KV cache, exact KLD). Load and generations are the same for both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..definitions.settings import default
from ..errors import BadInput, LlamaFailed
from ..figures import figure
from ..platform import atomic, progress
from ..storage import cache, codec
from ..storage.identity import Identity
from ..storage.record import KLD
from .corpus import Corpus
from .llama.runner import (
    CommandRecord,
    Generation,
    LlamaRunner,
    LoadResult,
    PerplexityResult,
)
from .models import ModelRef

log = logging.getLogger(__name__)

_CACHE_SCHEMA = 2  # bumped when what is stored changes (2: generated-token count fix)


@dataclass(frozen=True)
class Prompt:
    text: str
    chat: bool = False


DEFAULT_PROMPTS = (Prompt("Hello", chat=False), Prompt("你好，請介紹一下自己。", chat=True))

DEFAULT_ENGINE = "llama-perplexity"
ENGINES = (DEFAULT_ENGINE, "logits")  # "logits": exact KLD (fq_core.measurement.llama.logits)


@dataclass(frozen=True)
class EvalSettings:
    ctx: int = default("fq_ctx")
    batch: int = default("fq_batch")
    chunks: int = default("fq_chunks")
    # KLD logits cost ~134 MB per chunk for Gemma3 (267 MB: engine="logits")
    kld_chunks: int = default("fq_kld_chunks") or default("fq_chunks")
    threads: int | None = None  # None: all cores (fq_threads = auto)
    gen_tokens: int = default("fq_gen_tokens")
    prompts: tuple[Prompt, ...] = DEFAULT_PROMPTS
    chat_template: str | None = None  # overrides the models' own hint (a copy has none)
    engine: str = DEFAULT_ENGINE  # what computes PPL and KLD: one of ENGINES

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise BadInput(f"unknown engine {self.engine!r} (one of: {', '.join(ENGINES)})")

    @property
    def exact(self) -> bool:
        return self.engine == "logits"

    def key_fields(self) -> dict:
        """What changes the numbers. Threads do not: results are bit-identical for -t 1 and 2.
        The engine is named only when it is not the default, so the keys of baselines (and
        gate records) made before engines existed stay what they were."""
        fields = {
            "ctx": self.ctx,
            "batch": self.batch,
            "chunks": self.chunks,
            "kld_chunks": self.kld_chunks,
            "gen_tokens": self.gen_tokens,
            "prompts": [[p.text, p.chat] for p in self.prompts],
            "chat_template": self.chat_template,
        }
        if self.engine != DEFAULT_ENGINE:
            fields["engine"] = self.engine
        return fields

    def perplexity_fields(self) -> dict:
        """What changes a perplexity-only run's numbers (a placebo's, a sweep cell's): no
        generation, and the engine always named."""
        return {
            "ctx": self.ctx,
            "batch": self.batch,
            "chunks": self.chunks,
            "kld_chunks": self.kld_chunks,
            "engine": self.engine,
        }

    def to_json(self) -> dict:
        return {**self.key_fields(), "threads": self.threads}


@dataclass(frozen=True)
class ModelEvaluation:
    model: ModelRef
    load: LoadResult
    generations: tuple[Generation, ...]
    perplexity: PerplexityResult  # over settings.chunks; .kld set when run against a baseline
    kld_perplexity: PerplexityResult | None = None  # the KLD run (same object when chunks match)

    def commands(self) -> list[CommandRecord]:
        runs = [self.load.command, *(g.command for g in self.generations)]
        runs.append(self.perplexity.command)
        if self.kld_perplexity is not None and self.kld_perplexity is not self.perplexity:
            runs.append(self.kld_perplexity.command)
        return runs


@dataclass(frozen=True)
class BaselineEvaluation(ModelEvaluation):
    corpus: Corpus | None = None
    settings: EvalSettings = field(default_factory=EvalSettings)
    key: str = ""
    cache_path: Path | None = None
    kld_base: Path | None = None  # the saved logits (--kl-divergence-base, or logits' .npy)
    kld_base_bytes: int = 0
    llama_version: str = ""
    cached: bool = False  # True when loaded from the cache instead of computed now
    n_tokens: int | None = None  # the whole corpus under this model's tokenizer
    kld_base_sha256: str = ""  # what every treatment compared with it is keyed by
    provenance: dict | None = None  # its cache entry for the record (cache.Entry.provenance)


# ---------------------------------------------------------------------------------------------
# JSON round trip of the runner's results (the baseline cache)


def _to_plain(obj):
    if isinstance(obj, CommandRecord):
        return obj.to_json()
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_to_plain(x) for x in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


#: A perplexity run cached before the record's KLD was the runner's own type kept the
#: runner's names for it (and more lines of llama.cpp's block, no longer kept).
_CACHED_KLD_NAMES = {
    "mean": "mean_kld",
    "mean_err": "mean_kld_err",
    "median": "median_kld",
    "p90": "p90_kld",
    "p99": "p99_kld",
    "p999": "p999_kld",
    "max": "max_kld",
    "same_top_pct": "same_top_pct",
    "same_top_err": "same_top_err",
    "rms_dp_pct": "rms_dp_pct",
    "ppl_ratio": "ppl_ratio",
    "chunk_means": "chunk_klds",
    "exact": "exact",
}


def _ppl_from(d: dict) -> PerplexityResult:
    """A cached perplexity run. One cached before storage.codec may name its KLD the
    runner's old way and hold a NaN ppl_err as null: both are read forward."""
    kld = d.get("kld")
    if kld and "mean_kld" in kld:
        kld = {new: kld[old] for new, old in _CACHED_KLD_NAMES.items() if old in kld}
    ppl_err = math.nan if d.get("ppl_err", 0.0) is None else d.get("ppl_err")
    return codec.convert(dict(d, kld=kld, ppl_err=ppl_err), PerplexityResult)


# ---------------------------------------------------------------------------------------------


def _generations(runner, model, settings, chat_template) -> tuple[Generation, ...]:
    return tuple(
        runner.generate(
            model, p.text, settings.gen_tokens, chat=p.chat, chat_template=chat_template
        )
        for p in settings.prompts
    )


def ppl_call(runner: LlamaRunner, settings: EvalSettings):
    """The runner call of the settings' engine at the settings' context and batch: the two
    engines share one signature and one PerplexityResult."""
    call = runner.exact_perplexity if settings.exact else runner.perplexity
    return functools.partial(call, ctx=settings.ctx, batch=settings.batch)


def _logits_name(settings: EvalSettings) -> str:
    return "logits.npy" if settings.exact else "logits.kld"


def _runner_for(runner: LlamaRunner, settings: EvalSettings) -> LlamaRunner:
    if settings.threads and settings.threads != runner.threads:
        return runner.with_threads(settings.threads)
    return runner


def baseline_key(model: ModelRef, corpus: Corpus, llama_build: str, settings) -> str:
    """`llama_build`: the build's id (LlamaTools.build_id), its files by content."""
    return Identity(
        model_sha256=model.sha256,
        corpus_sha256=corpus.sha256,
        llama_build=llama_build,
        settings=settings.key_fields(),
    ).key("baseline", schema=_CACHE_SCHEMA, length=20)


@progress.step("baseline")
def evaluate_baseline(
    runner: LlamaRunner, model: ModelRef, corpus: Corpus, settings: EvalSettings | None = None
) -> BaselineEvaluation:
    """Load, generate and run llama-perplexity once with --kl-divergence-base (or the exact
    engine once with --save-base); a verified cache entry (fq_core.storage.cache) standing for the
    logits, which every treatment is compared with."""
    settings = settings or EvalSettings()
    runner = _runner_for(runner, settings)
    if settings.exact:
        runner.tools.library()  # ToolMissing before any work when the build has no library
    version = runner.tools.version
    key = baseline_key(model, corpus, runner.tools.build_id, settings)
    name = _logits_name(settings)
    files = (name, f"{name}.meta.json") if settings.exact else (name,)
    run_ppl = ppl_call(runner, settings)

    def compute(root: Path) -> dict:
        log.info("computing the baseline for %s (cached in %s)", model.name, root)
        logits = root / name
        load = runner.load(model)
        gens = _generations(runner, model, settings, settings.chat_template or model.chat_template)
        # the exact engine publishes its base atomically itself (the .npy and its .meta.json);
        # llama-perplexity's goes to a temporary that no interruption leaves behind
        scratch = (
            contextlib.nullcontext(logits)
            if settings.exact
            else atomic.temporary_for(logits, force=True, fsync=False)
        )
        with scratch as tmp_logits:
            kld_run = run_ppl(model, corpus.path, chunks=settings.kld_chunks, kl_base=tmp_logits)
            if settings.chunks == settings.kld_chunks:
                ppl = kld_run
            else:
                ppl = run_ppl(model, corpus.path, chunks=settings.chunks)
        n_tokens = runner.count_tokens(model, corpus.path)
        return {
            "key": key,
            "model": {"name": model.name, "path": str(model.path), "sha256": model.sha256},
            "corpus": {"path": str(corpus.path), "sha256": corpus.sha256, "n_tokens": n_tokens},
            "llama_version": version,
            "llama_build": runner.tools.build_id,
            "settings": settings.to_json(),
            "engine": settings.engine,
            "kld_base_bytes": logits.stat().st_size,
            "load": _to_plain(load),
            "generations": _to_plain(gens),
            "perplexity": _to_plain(ppl),
            "kld_perplexity": _to_plain(kld_run),
        }

    def decode(doc: dict) -> BaselineEvaluation:
        kld_run = _ppl_from(doc["kld_perplexity"])
        ppl = kld_run if settings.chunks == settings.kld_chunks else _ppl_from(doc["perplexity"])
        root = cache.folder_for("baselines", key)
        return BaselineEvaluation(
            model=model,
            load=codec.convert(doc["load"], LoadResult),
            generations=tuple(codec.convert(doc["generations"], list[Generation])),
            perplexity=ppl,
            kld_perplexity=kld_run,
            corpus=corpus,
            settings=settings,
            key=key,
            cache_path=root,
            kld_base=root / name,
            kld_base_bytes=doc["kld_base_bytes"],
            llama_version=doc["llama_version"],
            n_tokens=doc["corpus"]["n_tokens"],
        )

    entry = cache.verified("baselines", key, "baseline.json", compute, decode=decode, files=files)
    if entry.hit:
        log.info("baseline %s reused from %s", model.name, entry.folder)
        progress.note("cached")
    return dataclasses.replace(
        entry.value,
        cached=entry.hit,
        kld_base_sha256=entry.files[name],
        provenance=entry.provenance("baseline"),
    )


@progress.step("treatment")
def evaluate_against(
    runner: LlamaRunner,
    model: ModelRef,
    baseline: BaselineEvaluation,
    corpus: Corpus | None = None,
    settings: EvalSettings | None = None,
) -> ModelEvaluation:
    """Load, generate, and one llama-perplexity --kl-divergence run (or one exact-engine run
    --against the baseline's logits) giving PPL and KLD."""
    settings = settings or baseline.settings
    corpus = corpus or baseline.corpus
    if baseline.corpus is not None and corpus.sha256 != baseline.corpus.sha256:
        raise LlamaFailed("the baseline was computed on a different corpus")
    if settings.engine != baseline.settings.engine:
        raise BadInput(
            f"the baseline was computed by the {baseline.settings.engine} engine, "
            f"not {settings.engine}: its logits cannot be compared"
        )
    runner = _runner_for(runner, settings)
    run_ppl = ppl_call(runner, settings)
    load = runner.load(model)
    # A fake-quantized copy has no registry entry: it inherits the baseline's chat template.
    template = settings.chat_template or model.chat_template or baseline.model.chat_template
    gens = _generations(runner, model, settings, template)
    kld_run = run_ppl(model, corpus.path, chunks=settings.kld_chunks, kl_against=baseline.kld_base)
    if settings.chunks == settings.kld_chunks:
        ppl = kld_run
    else:
        plain = run_ppl(model, corpus.path, chunks=settings.chunks)
        ppl = dataclasses.replace(plain, kld=kld_run.kld)
    return ModelEvaluation(model, load, gens, ppl, kld_run)


def treatment_key(
    model: ModelRef, baseline: BaselineEvaluation, settings: EvalSettings, llama_build: str
) -> str:
    """The treated file, the content of the baseline logits it is compared with (not only the
    baseline's key: the same key may hold other logits once an entry is remade), settings."""
    return Identity(
        model_sha256=model.sha256,
        base_sha256=baseline.kld_base_sha256,
        llama_build=llama_build,
        settings=settings.key_fields(),
    ).key("treatment", schema=_CACHE_SCHEMA, baseline_key=baseline.key)


def evaluate_against_cached(
    runner: LlamaRunner,
    model: ModelRef,
    baseline: BaselineEvaluation,
    corpus: Corpus | None = None,
    settings: EvalSettings | None = None,
) -> tuple[ModelEvaluation, cache.Entry]:
    """`evaluate_against`, a verified cache entry keyed by the treated file's SHA-256 and the
    SHA-256 of the baseline logits it was compared with: (evaluation, its cache entry).

    Why: those two files and the settings decide every number (llama.cpp is bit-reproducible
    on one build and CPU), so a second run of the same treatment repeats nothing — this is
    what keeps a warm `make gate` short when a twin run costs a minute."""
    settings = settings or baseline.settings
    key = treatment_key(model, baseline, settings, runner.tools.build_id)

    def compute(_folder: Path) -> dict:
        ev = evaluate_against.__wrapped__(runner, model, baseline, corpus, settings)
        return {
            "key": key,
            "load": _to_plain(ev.load),
            "generations": _to_plain(ev.generations),
            "perplexity": _to_plain(ev.perplexity),
            "kld_perplexity": _to_plain(ev.kld_perplexity),
        }

    def decode(doc: dict) -> ModelEvaluation:
        ppl = _ppl_from(doc["perplexity"])
        kld_run = _ppl_from(doc["kld_perplexity"]) if doc["kld_perplexity"] else None
        if kld_run is not None and doc["kld_perplexity"] == doc["perplexity"]:
            kld_run = ppl
        gens = tuple(codec.convert(doc["generations"], list[Generation]))
        return ModelEvaluation(model, codec.convert(doc["load"], LoadResult), gens, ppl, kld_run)

    with progress.step("treatment"):
        entry = cache.verified("treatments", key, "evaluation.json", compute, decode=decode)
        if entry.hit:
            progress.note("cached")
    return entry.value, entry


# ---------------------------------------------------------------------------------------------
# Comparison


@dataclass(frozen=True)
class Agreement:
    prompt: str
    chat: bool
    same_text: bool
    first_divergence: int | None  # index of the first differing token; None when identical
    token_agreement: float  # matching positions / the longer sequence


@dataclass(frozen=True)
class EvalComparison:
    baseline_ppl: float
    baseline_ppl_err: float
    ppl: float
    ppl_err: float
    delta_ppl: float
    delta_ppl_pct: float
    delta_ppl_pct_err: float | None  # paired, from the per-chunk NLLs of both runs
    n_chunks: int
    kld: KLD | None
    same_top_pct: float | None
    agreement: tuple[Agreement, ...]
    baseline_gen_tokens_per_s: float | None
    gen_tokens_per_s: float | None
    baseline_ppl_tokens_per_s: float | None
    ppl_tokens_per_s: float | None

    def to_json(self) -> dict:
        return _to_plain(self) | {"kld": codec.to_builtins(self.kld)}


def chunk_nlls(running_ppls) -> list[float]:
    """Mean NLL of each chunk from llama-perplexity's running PPLs:
    k·ln(PPL_k) − (k−1)·ln(PPL_{k−1}), since every chunk scores the same number of tokens."""
    out, prev = [], 0.0
    for k, p in enumerate(running_ppls, start=1):
        cur = k * math.log(p)
        out.append(cur - prev)
        prev = cur
    return out


def paired_delta_pct_err(base_ppls, cand_ppls) -> float | None:
    """Standard error of ΔPPL% from the per-chunk NLL differences (chunks are shared, so the
    chunk-to-chunk difficulty cancels; far tighter than the two ± errors combined)."""
    n = min(len(base_ppls), len(cand_ppls))
    if n < 2:
        return None
    d = [c - b for b, c in zip(chunk_nlls(base_ppls[:n]), chunk_nlls(cand_ppls[:n]), strict=True)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    return 100.0 * math.exp(mean) * math.sqrt(var / n)


def _agreement(a: Generation, b: Generation) -> Agreement:
    ta = a.token_ids if a.token_ids is not None else tuple(a.text)
    tb = b.token_ids if b.token_ids is not None else tuple(b.text)
    first = next((i for i, (x, y) in enumerate(zip(ta, tb, strict=False)) if x != y), None)
    if first is None and len(ta) != len(tb):
        first = min(len(ta), len(tb))
    longest = max(len(ta), len(tb)) or 1
    same = sum(1 for x, y in zip(ta, tb, strict=False) if x == y)
    return Agreement(a.prompt, a.chat, a.text == b.text, first, same / longest)


def _mean_tps(gens) -> float | None:
    vals = [g.tokens_per_s for g in gens if g.tokens_per_s]
    return sum(vals) / len(vals) if vals else None


def compare(baseline: ModelEvaluation, candidate: ModelEvaluation) -> EvalComparison:
    b, c = baseline.perplexity, candidate.perplexity
    delta = c.ppl - b.ppl
    kld = candidate.perplexity.kld or (
        candidate.kld_perplexity.kld if candidate.kld_perplexity else None
    )
    return EvalComparison(
        baseline_ppl=b.ppl,
        baseline_ppl_err=b.ppl_err,
        ppl=c.ppl,
        ppl_err=c.ppl_err,
        delta_ppl=delta,
        delta_ppl_pct=100.0 * delta / b.ppl,
        delta_ppl_pct_err=paired_delta_pct_err(b.chunk_ppls, c.chunk_ppls),
        n_chunks=min(b.n_chunks, c.n_chunks),
        kld=kld,
        same_top_pct=kld.same_top_pct if kld else None,
        agreement=tuple(map(_agreement, baseline.generations, candidate.generations)),
        baseline_gen_tokens_per_s=_mean_tps(baseline.generations),
        gen_tokens_per_s=_mean_tps(candidate.generations),
        baseline_ppl_tokens_per_s=b.tokens_per_s,
        ppl_tokens_per_s=c.tokens_per_s,
    )


def _fmt(x, spec=".4f", none="-") -> str:
    return none if x is None else figure(x, spec)


def side_by_side(base: BaselineEvaluation, cand: ModelEvaluation, cmp: EvalComparison) -> str:
    """The table `fq evaluate` prints: baseline and candidate in two columns."""
    s = base.settings
    rows: list[tuple[str, str, str]] = [
        ("model", base.model.name, cand.model.name),
        ("sha256", base.model.sha256[:16], cand.model.sha256[:16]),
        ("load", "ok" if base.load.ok else "FAILED", "ok" if cand.load.ok else "FAILED"),
        ("load time ms", _fmt(base.load.load_time_ms, ".0f"), _fmt(cand.load.load_time_ms, ".0f")),
    ]
    for bg, cg, ag in zip(base.generations, cand.generations, cmp.agreement, strict=False):
        label = ("chat " if bg.chat else "") + repr(bg.prompt)
        rows.append((f"gen {label}", _short(bg.text), _short(cg.text)))
        rows.append(
            (
                "  tokens, tok/s",
                f"{bg.n_tokens}, {_fmt(bg.tokens_per_s, '.1f')}",
                f"{cg.n_tokens}, {_fmt(cg.tokens_per_s, '.1f')}",
            )
        )
        div = "identical" if ag.first_divergence is None else f"token {ag.first_divergence}"
        rows.append(("  agreement", "", f"{100 * ag.token_agreement:.1f}% (diverges: {div})"))
    rows += [
        (
            f"PPL ({cmp.n_chunks}×{s.ctx})",
            f"{cmp.baseline_ppl:.4f} ± {cmp.baseline_ppl_err:.4f}",
            f"{cmp.ppl:.4f} ± {cmp.ppl_err:.4f}",
        ),
        ("ΔPPL", "", figure(cmp.delta_ppl, "+.4f")),
        (
            "ΔPPL %",
            "",
            f"{_fmt(cmp.delta_ppl_pct, '+.4f')}% ± {_fmt(cmp.delta_ppl_pct_err)}% (paired)",
        ),
        (
            "PPL tok/s",
            _fmt(cmp.baseline_ppl_tokens_per_s, ".1f"),
            _fmt(cmp.ppl_tokens_per_s, ".1f"),
        ),
    ]
    k = cmp.kld
    if k is not None:
        rows += [
            (
                f"KLD mean ({s.kld_chunks} chunks)",
                "",
                f"{k.mean:.6f} ± {_fmt(k.mean_err, '.6f')}",
            ),
            (
                "KLD median / p99 / max",
                "",
                " / ".join(_fmt(x, ".6f") for x in (k.median, k.p99, k.max)),
            ),
            ("same top %", "", f"{k.same_top_pct:.3f} ± {_fmt(k.same_top_err, '.3f')}"),
            ("RMS Δp %", "", _fmt(k.rms_dp_pct, ".3f")),
        ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows + [("", "baseline", "")])
    lines = [f"{'':{w0}}  {'baseline':{w1}}  candidate"]
    lines += [f"{a:{w0}}  {b:{w1}}  {c}".rstrip() for a, b, c in rows]
    cached = "reused from the cache" if base.cached else "computed now"
    lines.append(f"baseline {cached}: {base.cache_path}")
    return "\n".join(lines)


def _short(text: str, n: int = 40) -> str:
    t = " ".join(text.split())
    return repr(t if len(t) <= n else t[: n - 1] + "…")
