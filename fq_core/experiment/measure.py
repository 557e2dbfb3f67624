"""One measurement: a target fake-quantized, evaluated against the cached baseline, and its
selection-matched placebos, with the resolution they give. A stage and a sweep cell both
call `measure`; a stage adds its checks, generations and speed, a cell its p-value.

Why one: the two used to quantize, evaluate, compute ΔPPL % and the resolution each their
own way, so a number could differ between a stage and the cell measuring the same thing.
Here ΔPPL % and its error come from `evaluate.compare`, the resolution from one
`stats.resolution` call, and the placebos from one `run_placebo`.

Two evaluations, one function: a stage keeps the fake-quantized file (its checks read it,
its speed runs it) and evaluates it fully (load, generations, PPL + KLD; the `treatments`
cache keyed by the file's SHA-256); a cell needs perplexity only and caches quantization
and evaluation together by the target's identity, so a resumed sweep quantizes nothing.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from .. import __version__
from ..errors import BadSelection, FqError
from ..measurement import patch
from ..measurement.llama.parse import KLD_TABLE_DECIMALS
from ..platform import atomic, progress
from ..storage import cache, codec, record, results
from ..storage.identity import Identity

if TYPE_CHECKING:
    from ..measurement.corpus import Corpus
    from ..measurement.evaluate import BaselineEvaluation, EvalComparison, ModelEvaluation
    from ..measurement.llama.tools import LlamaTools
    from ..measurement.models import ModelRef
    from ..measurement.sequential import Rule
    from .stages import Context, Experiment

ENGINE_WORDS = {
    "llama-perplexity": "llama-perplexity --kl-divergence (16-bit base log-probabilities, "
    "F16 KV cache)",
    "logits": "full-precision logits through llama.cpp's library (F32 KV cache)",
}
VARIANT_WORDS = {"deployed": "as deployed", "intrinsic": "intrinsically"}
#: the layout of a perplexity-only treatment (a cell's) in cache_dir()/cells/<key>/cell.json
#: (1: the sweep's own dict before measure())
TREATMENT_SCHEMA = 2


def _evaluate():
    from ..measurement import evaluate

    return evaluate


def error_line(exc: BaseException) -> str:
    """An exception as the one line a record stores."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


@dataclass(frozen=True)
class Target:
    """What one measurement fake-quantizes: `measured` (the model as deployed, or its float
    twin for the intrinsic variant), its `layers`; kinds, format and rounding are the
    experiment's."""

    measured: ModelRef
    layers: str


class Quantized(msgspec.Struct, frozen=True, kw_only=True):
    """What fake quantization did to the measured file (the manifest's totals)."""

    manifest: str
    tensors: tuple[str, ...]
    n_elements: int
    changed: int
    max_abs: float | None
    max_rel: float | None
    mean_rel: float | None
    n_became_nonfinite: int = 0
    output_sha256: str


def _quantized(manifest_path, tensors, totals, output_sha256: str) -> Quantized:
    return Quantized(
        manifest=str(manifest_path),
        tensors=tuple(tensors),
        n_elements=totals.n_elements,
        changed=totals.changed,
        max_abs=totals.max_abs,
        max_rel=totals.max_rel,
        mean_rel=totals.mean_rel,
        n_became_nonfinite=totals.n_became_nonfinite,
        output_sha256=output_sha256,
    )


def quantized_of(manifest: patch.Manifest) -> Quantized:
    return _quantized(
        manifest.path,
        (c.name for c in manifest.tensors),
        manifest.totals,
        manifest.output.sha256,
    )


def quantized_of_real(manifest) -> Quantized:
    """A real file's (twin.make_real): its stored tensors' values read back against the
    values they were made from, the same figures a fake file's manifest gives."""
    from ..measurement.metrics import combine

    stored = manifest.stored
    return _quantized(
        manifest.path,
        (t.name for t in stored),
        combine([t.error for t in stored]),
        manifest.output.sha256,
    )


class Treated(msgspec.Struct, frozen=True, kw_only=True):
    """The treatment's figures against the baseline: what a cell caches, what a stage reads."""

    quantized: Quantized
    identical: bool  # byte-identical to the measured file: no llama.cpp run was needed
    ppl: float | None
    ppl_err: float | None
    chunk_ppls: tuple[float | None, ...]
    baseline_ppl: float | None
    delta_ppl_pct: float | None  # evaluate.compare
    delta_ppl_pct_err: float | None
    kld: record.KLD | None
    quantize_s: float = 0.0
    evaluate_s: float = 0.0
    llama_s: float | None = None  # the llama.cpp process alone
    commands: tuple[dict[str, Any], ...] = ()  # role "treatment"; none when identical


@dataclass(frozen=True)
class Treatment:
    """`figures`, and for a stage the full evaluation behind them (load, generations; its
    `model` is the treated file)."""

    figures: Treated
    evaluation: ModelEvaluation | None = None  # a stage's; None for a cell
    comparison: EvalComparison | None = None
    entry: cache.Entry | None = None  # its cache entry; None when identical (nothing ran)


@dataclass(frozen=True)
class PlaceboResult:
    run: record.PlaceboRun  # `cached` set
    commands: tuple[dict[str, Any], ...]
    entry: cache.Entry


@dataclass(frozen=True)
class Measurement:
    target: Target
    baseline: BaselineEvaluation
    treatment: Treatment
    placebos: tuple[PlaceboResult, ...]
    placebo_error: str | None  # a placebo run failed: the runs before it stand
    resolution: record.Resolution
    placebo_s: float = 0.0  # this call's placebo work
    stop: record.SequentialStop | None = None  # evaluated until decided: why it stopped


class Steps:
    """What a caller does between the steps (a stage saves its record after each, so an
    interruption leaves the evidence so far). Each method runs once, in this order."""

    def quantized(self, manifest: patch.Manifest, file: Path) -> None:
        pass

    def baseline(self, baseline: BaselineEvaluation) -> None:
        pass

    def treated(self, treatment: Treatment) -> None:
        pass


# --- the treatment -------------------------------------------------------------------------


def stores_real(exp: Experiment) -> bool:
    """A deployed cell of a llama.cpp type measures the real file: the selected tensors
    stored as that type (any type they had), run by llama.cpp's own kernels for it. Its fake
    file (the twin of the real one) is the intrinsic answer's."""
    from ..definitions.formats import LLAMA_TYPES

    return exp.variant == "deployed" and exp.fmt in LLAMA_TYPES


def _selected(target: Target, exp: Experiment) -> tuple[str, ...]:
    from ..measurement.gguf_index import read_index
    from ..measurement.selection import resolve

    index = read_index(target.measured.path)
    return resolve(index, target.layers, exp.tensors, any_type=stores_real(exp)).names


def _treat(target: Target, dst: Path, names, exp: Experiment, tools) -> Quantized:
    """A cell's treatment file: the real file (stores_real) or the fake-quantized one."""
    if stores_real(exp):
        from ..measurement import twin

        store = dict.fromkeys(names, exp.fmt)
        made = twin.make_real(
            target.measured.path, dst, store, lib_dir=tools.lib_dir, force=True, fsync=False
        )
        return quantized_of_real(made)
    manifest = _quantize(target.measured, dst, target.layers, exp, tools, fsync=False)
    return quantized_of(manifest)


def _quantize(
    measured: ModelRef, dst: Path, layers: str, exp: Experiment, tools, **kw
) -> patch.Manifest:
    """The treatment's file; llama.cpp's types are quantized by this build's ggml."""
    return patch.fake_quantize_file(
        measured.path,
        dst,
        layers=layers,
        tensors=exp.tensors,
        fmt=exp.fmt,
        rounding=exp.rounding,
        force=True,
        lib_dir=tools.lib_dir,
        **kw,
    )


def as_baseline(treated: ModelRef, baseline: BaselineEvaluation) -> ModelEvaluation:
    """The evaluation of a file byte-identical to the baseline's: the baseline's own numbers,
    with the KL divergence of a model against itself (zero, every top token the same)."""

    zero = record.KLD(
        mean=0.0,
        mean_err=0.0,
        median=0.0,
        p90=0.0,
        p99=0.0,
        p999=0.0,
        max=0.0,
        same_top_pct=100.0,
        same_top_err=0.0,
        rms_dp_pct=0.0,
        ppl_ratio=1.0,
    )
    ppl = replace(baseline.perplexity, kld=zero, tokens_per_s=None)
    return _evaluate().ModelEvaluation(treated, baseline.load, baseline.generations, ppl, ppl)


def perplexity_only(ctx: Context, model: ModelRef, baseline: BaselineEvaluation, settings):
    """A placebo or a cell needs no load or generation: one llama-perplexity run for PPL and
    KLD (two when the KLD covers fewer chunks)."""
    ev = _evaluate()
    s = settings
    perplexity = ev.ppl_call(ctx.runner, s)  # llama-perplexity, or the exact engine
    kld_run = perplexity(model, ctx.corpus.path, chunks=s.kld_chunks, kl_against=baseline.kld_base)
    ppl = kld_run
    if s.chunks != s.kld_chunks:
        plain = perplexity(model, ctx.corpus.path, chunks=s.chunks)
        ppl = replace(plain, kld=kld_run.kld)
    return ev.ModelEvaluation(model, None, (), ppl, kld_run)


def ppl_commands(ev: ModelEvaluation) -> list:
    runs = [ev.perplexity]
    if ev.kld_perplexity is not None and ev.kld_perplexity is not ev.perplexity:
        runs.append(ev.kld_perplexity)
    return [r.command for r in runs]


def commands_json(role: str, commands: Sequence[Any], **extra: Any) -> list[dict]:
    """llama.cpp command records as the record lists them, each with its role."""
    return [dict(c.to_json(), role=role, **extra) for c in commands if c is not None]


def _figures(
    quantized: Quantized,
    identical: bool,
    baseline: BaselineEvaluation,
    ev: ModelEvaluation,
    cmp: EvalComparison,
    commands: Sequence[dict],
    quantize_s: float = 0.0,
    evaluate_s: float = 0.0,
) -> Treated:
    p = ev.perplexity
    cmd = None if identical else p.command
    return Treated(
        quantized=quantized,
        identical=identical,
        ppl=p.ppl,
        ppl_err=p.ppl_err,
        chunk_ppls=tuple(p.chunk_ppls),
        baseline_ppl=baseline.perplexity.ppl,
        delta_ppl_pct=cmp.delta_ppl_pct,
        delta_ppl_pct_err=cmp.delta_ppl_pct_err,
        kld=p.kld,
        quantize_s=quantize_s,
        evaluate_s=evaluate_s,
        llama_s=cmd.duration_s if cmd is not None else None,
        commands=tuple(commands),
    )


def _full_treatment(
    target: Target, file: Path, manifest: patch.Manifest, baseline: BaselineEvaluation, ctx, exp
) -> Treatment:
    """A stage's: load, generations, PPL and KLD of the kept file (cached by its SHA-256)."""
    ev_mod = _evaluate()
    measured = target.measured
    treated = replace(
        measured, name=f"{measured.name}+{exp.fmt}", path=file, sha256=manifest.output.sha256
    )
    identical = manifest.output.sha256 == measured.sha256
    entry = None
    if identical:  # the SHA-256 proves the outcome: llama.cpp would rerun the baseline
        ev = as_baseline(treated, baseline)
        commands: list[dict] = []
    else:
        ev, entry = ev_mod.evaluate_against_cached(
            ctx.runner, treated, baseline, ctx.corpus, exp.settings
        )
        commands = commands_json("treatment", ev.commands(), cached=entry.hit)
    cmp = ev_mod.compare(baseline, ev)
    figures = _figures(quantized_of(manifest), identical, baseline, ev, cmp, commands)
    return Treatment(figures, ev, cmp, entry)


def target_key(
    target: Target, exp: Experiment, tools: LlamaTools, corpus: Corpus, tensors, base_sha256: str
) -> str:
    """Everything that decides a perplexity-only treatment's numbers: the measured file, the
    resolved tensors, format, rounding, settings, and the content of the baseline logits."""
    return Identity(
        variant=exp.variant,
        measured_sha256=target.measured.sha256,
        tensors=tuple(tensors),
        format=exp.fmt,
        rounding=exp.rounding,
        corpus_sha256=corpus.sha256,
        base_sha256=base_sha256,
        llama_version=tools.version,
        llama_build=tools.build_id,
        settings=exp.settings.perplexity_fields(),
        fq_version=__version__,
    ).key("sweep-cell", schema=TREATMENT_SCHEMA, **({"stored": True} if stores_real(exp) else {}))


def _cached_treatment(target: Target, baseline: BaselineEvaluation, ctx, exp) -> Treatment:
    """A cell's: quantize, one perplexity-only run, delete the GGUF; cached by the target."""
    measured = target.measured
    names = _selected(target, exp)
    key = target_key(target, exp, ctx.tools, ctx.corpus, names, baseline.kld_base_sha256)

    def compute(folder: Path) -> Treated:
        label = exp.fmt if exp.rounding == "truncate" else f"{exp.fmt}-{exp.rounding}"
        dst = folder / f"{results.safe_name(measured.name)}.{label}.gguf"
        with atomic.owned(dst):  # disk flat: the GGUF lives only while it is evaluated
            t0 = time.perf_counter()
            with progress.step("store" if stores_real(exp) else "quantize"):
                quantized = _treat(target, dst, names, exp, ctx.tools)
            quantize_s = time.perf_counter() - t0
            identical = quantized.output_sha256 == measured.sha256
            ref = replace(
                measured,
                name=f"{measured.name}+{label}",
                path=dst,
                sha256=quantized.output_sha256,
                spec=None,
            )
            t1 = time.perf_counter()
            if identical:  # the SHA-256 proves llama.cpp would rerun the baseline
                ev, commands = as_baseline(ref, baseline), []
            else:
                with progress.step("treatment"):
                    ev = perplexity_only(ctx, ref, baseline, exp.settings)
                commands = commands_json("treatment", ppl_commands(ev))
        cmp = _evaluate().compare(baseline, ev)
        evaluate_s = time.perf_counter() - t1
        return msgspec.to_builtins(
            _figures(quantized, identical, baseline, ev, cmp, commands, quantize_s, evaluate_s)
        )

    entry = _cell_entry(key, compute, Treated)
    return Treatment(entry.value, entry=entry)


def baseline_over(baseline: BaselineEvaluation, n: int) -> BaselineEvaluation:
    """The baseline's perplexity over its first n chunks (its running PPL after chunk n), so a
    run stopped early is compared on the chunks it used."""
    p = baseline.perplexity
    if n >= p.n_chunks:
        return baseline
    short = replace(
        p, ppl=p.chunk_ppls[n - 1], ppl_err=math.nan, chunk_ppls=p.chunk_ppls[:n], n_chunks=n
    )
    return replace(baseline, perplexity=short, kld_perplexity=short)


class UntilDecided(msgspec.Struct, frozen=True, kw_only=True):
    """A cell evaluated until decided: the treatment's figures, its placebos' (over the same
    chunks, in the same process) and the stop; cached together by the target and the rule."""

    treated: Treated
    placebos: tuple[record.PlaceboRun, ...]  # evaluated in the treatment's command
    stop: record.SequentialStop | None  # None: a byte-identical file, nothing ran


def _until_decided(target: Target, baseline: BaselineEvaluation, ctx, exp, rule) -> cache.Entry:
    """Quantize the treatment and its placebos, run them side by side chunk by chunk until the
    rule decides (runner.exact_until_decided), delete the GGUFs; cached by target and rule."""
    measured = target.measured
    names = _selected(target, exp)
    key = Identity(measured_sha256=measured.sha256, base_sha256=baseline.kld_base_sha256).key(
        "until-decided",
        target=target_key(target, exp, ctx.tools, ctx.corpus, names, baseline.kld_base_sha256),
        placebo_seeds=list(exp.placebo_seeds),
        rule=rule.to_json(),
    )
    label = exp.fmt if exp.rounding == "truncate" else f"{exp.fmt}-{exp.rounding}"

    def compute(folder: Path) -> dict:
        dst = folder / f"{results.safe_name(measured.name)}.{label}.gguf"
        placebo_files = [
            folder / f"{results.safe_name(measured.name)}.placebo{seed}.gguf"
            for seed in exp.placebo_seeds
        ]
        with contextlib.ExitStack() as owned:  # disk flat: the GGUFs live only while evaluated
            for f in (dst, *placebo_files):
                owned.enter_context(atomic.owned(f))
            t0 = time.perf_counter()
            with progress.step("quantize"):
                manifest = _quantize(measured, dst, target.layers, exp, ctx.tools, fsync=False)
                placebo_manifests = [
                    _quantize_placebo(measured, f, target.layers, exp, seed)
                    for f, seed in zip(placebo_files, exp.placebo_seeds, strict=True)
                ]
            quantize_s = time.perf_counter() - t0
            ref = replace(measured, path=dst, sha256=manifest.output.sha256, spec=None)
            if manifest.output.sha256 == measured.sha256:  # the SHA-256 proves: no effect
                ev = as_baseline(ref, baseline)
                cmp = _evaluate().compare(baseline, ev)
                figures = _figures(quantized_of(manifest), True, baseline, ev, cmp, [], quantize_s)
                return msgspec.to_builtins(UntilDecided(treated=figures, placebos=(), stop=None))
            t1 = time.perf_counter()
            with progress.step("until decided"):
                run = ctx.runner.exact_until_decided(
                    dst,
                    placebo_files,
                    against=baseline.kld_base,
                    rule=rule.to_json(),
                    ctx=exp.settings.ctx,
                    batch=exp.settings.batch,
                )
        ev_mod = _evaluate()
        base_n = baseline_over(baseline, run.treated.n_chunks)
        ev = ev_mod.ModelEvaluation(ref, None, (), run.treated, run.treated)
        commands = commands_json("treatment", [run.treated.command])
        figures = _figures(
            quantized_of(manifest),
            False,
            base_n,
            ev,
            ev_mod.compare(base_n, ev),
            commands,
            quantize_s,
            time.perf_counter() - t1,
        )
        placebos = []
        for seed, pm, pr in zip(exp.placebo_seeds, placebo_manifests, run.placebos, strict=True):
            pev = ev_mod.ModelEvaluation(ref, None, (), pr, pr)
            cmp = ev_mod.compare(baseline_over(baseline, pr.n_chunks), pev)  # it may rest first
            placebos.append(_placebo_record(seed, key, target.layers, pm, pr, cmp))
        done = UntilDecided(treated=figures, placebos=tuple(placebos), stop=run.stop)
        return msgspec.to_builtins(done)

    return _cell_entry(key, compute, UntilDecided)


def _cell_entry(key: str, compute, kind: type) -> cache.Entry:
    """A cell's cache entry (cache_dir()/cells/<key>/cell.json), computed or read back as `kind`."""
    with progress.step("cell"):  # its quantize and treatment steps inside, or "cached"
        entry = cache.verified(
            "cells", key, "cell.json", compute, decode=lambda payload: codec.convert(payload, kind)
        )
        if entry.hit:
            progress.note("cached")
    return entry


# --- the placebos --------------------------------------------------------------------------


def placebo_key(
    model: ModelRef,
    corpus: Corpus,
    tools: LlamaTools,
    exp: Experiment,
    layers: str,
    seed: int,
    *,
    base_sha256: str,
) -> str:
    """`base_sha256`: the baseline logits the placebo is compared with (its numbers depend
    on their content, not on the baseline's key)."""
    return Identity(
        model_sha256=model.sha256,
        layers=layers,
        tensors=tuple(exp.tensors),
        seed=seed,
        corpus_sha256=corpus.sha256,
        base_sha256=base_sha256,
        llama_build=tools.build_id,
        settings=exp.settings.perplexity_fields(),
        fq_version=__version__,
    ).key("placebo")


def _placebo_entry(payload: dict) -> tuple[record.PlaceboRun, tuple[dict, ...]]:
    """A cached placebo has the record's shape (record.PlaceboRun) and its commands, or is
    not one."""
    commands = payload.get("commands", [])
    if not isinstance(commands, list):
        raise TypeError("commands is not a list")
    run = codec.convert({k: v for k, v in payload.items() if k != "commands"}, record.PlaceboRun)
    return run, tuple(commands)


def _quantize_placebo(model: ModelRef, dst: Path, layers: str, exp, seed: int) -> patch.Manifest:
    """The lowest mantissa bit flipped in the selection's changed-to-be elements (seeded)."""
    return patch.fake_quantize_file(
        model.path,
        dst,
        layers=layers,
        tensors=exp.tensors,
        fmt="placebo",
        seed=seed,
        force=True,
        fsync=False,
    )


def _placebo_record(seed, key, layers, manifest, perplexity, cmp) -> record.PlaceboRun:
    kld = perplexity.kld
    return record.PlaceboRun(
        seed=seed,
        key=key,
        layers=layers,
        manifest=str(manifest.path),
        changed=manifest.total_changed,
        n_elements=manifest.total_elements,
        ppl=perplexity.ppl,
        ppl_err=perplexity.ppl_err,
        delta_ppl_pct=cmp.delta_ppl_pct,
        delta_ppl_pct_err=cmp.delta_ppl_pct_err,
        kld_mean=kld.mean if kld else None,
        same_top_pct=kld.same_top_pct if kld else None,
        kld=kld,
    )


def run_placebo(
    model: ModelRef,
    baseline: BaselineEvaluation,
    ctx: Context,
    exp: Experiment,
    layers: str,
    seed: int,
) -> PlaceboResult:
    """One placebo run, a verified cache entry shared across stages, cells, runs and workers."""
    key = placebo_key(
        model, ctx.corpus, ctx.tools, exp, layers, seed, base_sha256=baseline.kld_base_sha256
    )

    def compute(folder: Path) -> dict:
        dst = folder / f"{results.safe_name(model.name)}.placebo{seed}.gguf"
        with atomic.owned(dst):  # the GGUF lives only while it is evaluated
            manifest = _quantize_placebo(model, dst, layers, exp, seed)
            ref = replace(
                model,
                name=f"{model.name}+placebo{seed}",
                path=dst,
                sha256=manifest.output.sha256,
                spec=None,
            )
            ev = perplexity_only(ctx, ref, baseline, exp.settings)
            cmp = _evaluate().compare(baseline, ev)
        run = _placebo_record(seed, key, layers, manifest, ev.perplexity, cmp)
        commands = commands_json(f"placebo seed {seed}", ppl_commands(ev))
        return {**msgspec.to_builtins(run), "commands": commands}

    entry = cache.verified("placebos", key, "placebo.json", compute, decode=_placebo_entry)
    run, commands = entry.value
    run = msgspec.structs.replace(run, cached=entry.hit)
    return PlaceboResult(run, tuple(dict(c, cached=entry.hit) for c in commands), entry)


def placebo_experiment(target: Target, exp: Experiment) -> Experiment:
    """The placebos' selection: the treatment's own tensors (their lowest bit flipped) when
    they are F32. A real file's quantized tensors have no lowest bit to flip, so the F32
    tensors of the same layers stand in (outside the blocks: those outside the blocks) — the
    smallest change llama.cpp can see in that place, and what any change there costs it."""
    if not stores_real(exp):
        return exp
    from ..measurement.gguf_index import read_index
    from ..measurement.selection import resolve, split_name

    index = read_index(target.measured.path)
    selected = resolve(index, target.layers, exp.tensors, any_type=True).tensors
    if all(s.info.type_name == "F32" for s in selected):
        return exp
    layers = {s.layer for s in selected}
    kinds = {
        kind
        for t in index.tensors
        if t.type_name == "F32"
        for layer, kind in [split_name(t.name)]
        if layer in layers
    }
    if not kinds:
        raise BadSelection(
            f"no F32 tensor in the layers of {selected[0].info.name} to flip as its placebo"
        )
    return replace(exp, tensors=tuple(sorted(kinds)))


def _placebos(target, baseline, ctx, exp) -> tuple[list[PlaceboResult], str | None]:
    """Every seed's run; a failure ends the series (the runs before it stand) with its line."""
    exp = placebo_experiment(target, exp)
    out: list[PlaceboResult] = []
    n = len(exp.placebo_seeds)
    try:
        for i, seed in enumerate(exp.placebo_seeds, start=1):
            with progress.step(f"placebo {i}/{n}"):
                got = run_placebo(target.measured, baseline, ctx, exp, target.layers, seed)
                if got.entry.hit:
                    progress.note("cached")
            out.append(got)
    except FqError as exc:
        return out, error_line(exc)
    return out, None


def resolution(
    exp: Experiment, treated: Treated, placebos: Sequence[record.PlaceboRun]
) -> record.Resolution:
    """The treatment's KLD against the floor this variant's own method measured."""
    from . import stats

    kld = treated.kld
    engine = getattr(exp.settings, "engine", "llama-perplexity")
    return stats.resolution(
        engine=ENGINE_WORDS.get(engine, engine),
        decimals=KLD_TABLE_DECIMALS if engine == "llama-perplexity" else None,
        treatment_chunks=list(kld.chunk_means) if kld else [],
        treatment_mean=kld.mean if kld else None,
        placebo_chunks=[list(r.kld.chunk_means) if r.kld else [] for r in placebos],
        placebo_means=[r.kld_mean for r in placebos],
        identical=treated.identical,
        label=VARIANT_WORDS.get(exp.variant, exp.variant),
    )


# --- the one measurement -------------------------------------------------------------------


def measure(
    target: Target,
    ctx: Context,
    exp: Experiment,
    *,
    file: Path | None = None,
    steps: Steps | None = None,
    until_decided: Rule | None = None,
) -> Measurement:
    """Fake-quantize `target`, evaluate it against the cached baseline of the measured file,
    run its placebos (none for a byte-identical file: there is no effect to compare with the
    engine's noise) and state the resolution.

    `file` given (a stage): the fake-quantized GGUF is written there and kept for the
    caller's checks and speed runs (the caller removes it); the treatment is evaluated in
    full (load, generations). Without (a cell): perplexity only, quantization and evaluation
    cached together by the target. An FqError from quantization, the baseline or the
    treatment propagates (`steps` says how far it got); one from a placebo is stated in
    `placebo_error`. `until_decided` given (a cell on the exact engine): the treatment and its
    placebos run side by side, chunk by chunk, until that stopping rule decides."""
    steps = steps or Steps()
    ev = _evaluate()
    if until_decided is not None:
        if file is not None or not exp.settings.exact:
            raise ValueError("until_decided: a cell's perplexity-only run on the exact engine")
        baseline = ev.evaluate_baseline(ctx.runner, target.measured, ctx.corpus, exp.settings)
        steps.baseline(baseline)
        entry = _until_decided(target, baseline, ctx, exp, until_decided)
        done: UntilDecided = entry.value
        treatment = Treatment(done.treated, entry=entry)
        steps.treated(treatment)
        placebos = tuple(
            PlaceboResult(msgspec.structs.replace(r, cached=entry.hit), (), entry)
            for r in done.placebos
        )
        return Measurement(
            target=target,
            baseline=baseline,
            treatment=treatment,
            placebos=placebos,
            placebo_error=None,
            resolution=resolution(exp, done.treated, done.placebos),
            stop=done.stop,
        )
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        manifest = _quantize(target.measured, file, target.layers, exp, ctx.tools)
        steps.quantized(manifest, file)
        baseline = ev.evaluate_baseline(ctx.runner, target.measured, ctx.corpus, exp.settings)
        steps.baseline(baseline)
        treatment = _full_treatment(target, file, manifest, baseline, ctx, exp)
    else:
        baseline = ev.evaluate_baseline(ctx.runner, target.measured, ctx.corpus, exp.settings)
        steps.baseline(baseline)
        treatment = _cached_treatment(target, baseline, ctx, exp)
    steps.treated(treatment)
    t0 = time.perf_counter()
    if treatment.figures.identical:
        placebos, error = [], None
    else:
        placebos, error = _placebos(target, baseline, ctx, exp)
    return Measurement(
        target=target,
        baseline=baseline,
        treatment=treatment,
        placebos=tuple(placebos),
        placebo_error=error,
        resolution=resolution(exp, treatment.figures, [p.run for p in placebos]),
        placebo_s=time.perf_counter() - t0,
    )
