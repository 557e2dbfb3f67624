"""Running one sweep cell: its experiment and cache key, the cached measurement
(quantize, evaluate once, delete the GGUF), its placebos (`protocol.run_placebo`, shared with
the stages and across formats: a placebo depends on the selection, not on the format) and
its statistics against them. The measurement is cached by everything that decides its
numbers, so a wider sweep runs only its new cells and an interrupted one resumes:

    cache_dir()/cells/<key>/cell.json    key = model (and twin) SHA-256, corpus SHA-256,
                                         llama.cpp version (+ backend), variant, resolved
                                         tensors, format, rounding, ctx/batch/chunks/engine,
                                         the SHA-256 of the baseline logits

a verified entry (fq_core.storage.cache): one that fails its proof is moved aside and made again.
The fake-quantized GGUF is written beside it, evaluated and deleted (disk stays flat).

Per cell: the treatment's mean KLD with a bootstrap interval over chunks, the paired excess
over its placebos (treatment − mean placebo, chunk by chunk), the floor (the largest placebo
mean KLD) and a one-sided p-value from a one-sample t-test on those per-chunk differences.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from ... import __version__
from ...errors import FqError
from ...storage import cache, codec, results
from ...storage.cell_record import (
    CELL_SCHEMA,
    CellInfo,
    CellNumeric,
    CellPlacebo,
    CellRecord,
    CellTiming,
    CellTreatment,
    Num,
    save_cell,
)
from ...storage.identity import Identity, machine_info
from ...storage.record import Resolution

if TYPE_CHECKING:
    from ...measurement.llama.tools import LlamaTools
    from ...measurement.models import ModelRef
    from ..stages import Context, Experiment
    from .plan import Cell

_GPU_BACKENDS = ("CUDA", "HIP", "VULKAN", "METAL", "SYCL", "MUSA", "OPENCL", "CANN", "KOMPUTE")


def backend(tools: LlamaTools, gpu_layers: int | None) -> str:
    """ "" for the CPU build run on the CPU; else what differs ("cuda; -ngl 99"). GPU kernels
    are not bit-identical to the CPU's, so a backend is part of every cache key and identity."""
    from ...measurement.llama.tools import BASE_CMAKE_ARGS, build_record

    rec = build_record(tools.bin_dir) or {}
    extra = [a for a in rec.get("cmake_args", ()) if a not in BASE_CMAKE_ARGS]
    on = [a for a in extra if a.upper().endswith("=ON")]
    accel = [
        a.removeprefix("-D").split("=")[0].removeprefix("GGML_").lower()
        for a in on
        if any(g in a.upper() for g in _GPU_BACKENDS)
    ]
    parts = accel[:]
    if gpu_layers is not None:
        parts.append(f"-ngl {gpu_layers}")
    if not accel and gpu_layers in (None, 0):
        return ""
    return "; ".join(parts) or " ".join(extra)


def tools_for_backend(tools: LlamaTools, gpu_layers: int | None) -> LlamaTools:
    """The tools as the sweep keys them: the version and the build id name the backend when it
    is not the CPU, so baselines, placebos and cells of a GPU run never mix with CPU references."""
    tag = backend(tools, gpu_layers)
    if not tag:
        return tools
    return replace(tools, version=f"{tools.version} [{tag}]", build_id=f"{tools.build_id} [{tag}]")


def cell_settings(exp: Experiment) -> dict[str, Any]:
    """The settings part of a cell's identity."""
    s = exp.settings
    return {
        "ctx": s.ctx,
        "batch": s.batch,
        "chunks": s.chunks,
        "kld_chunks": s.kld_chunks,
        "engine": getattr(s, "engine", "llama-perplexity"),
        "placebo_seeds": list(exp.placebo_seeds),
        "twin_dtype": exp.twin_dtype if exp.variant == "intrinsic" else None,
    }


def cell_key(identity: Identity, cell: Cell, tensors: Sequence[str], base_sha256: str) -> str:
    """Everything that decides a cell's treatment numbers, with the content of the baseline
    logits it is compared with (placebo seeds do not: they are separate cached runs; threads
    do not: llama.cpp is bit-identical across thread counts)."""
    settings = {k: v for k, v in identity.settings.items() if k != "placebo_seeds"}
    return msgspec.structs.replace(
        identity,
        variant=cell.variant,
        tensors=tuple(tensors),
        format=cell.fmt,
        rounding=cell.rounding,
        base_sha256=base_sha256,
        settings=settings,
        fq_version=__version__,
    ).key("sweep-cell", schema=CELL_SCHEMA)


def experiment_for(exp: Experiment, cell: Cell, chunks: int | None = None) -> Experiment:
    """The experiment one cell runs with: its kind, format and variant (engine, seeds)."""
    if chunks:
        exp = replace(exp, settings=replace(exp.settings, chunks=chunks, kld_chunks=chunks))
    exp = replace(exp, tensors=(cell.kind,), fmt=cell.fmt, rounding=cell.rounding)
    return exp.for_variant(cell.variant)


# --- running one cell --------------------------------------------------------------------------


def _measured(model: ModelRef, exp: Experiment) -> ModelRef:
    if exp.variant != "intrinsic":
        return model
    from ...measurement import twin
    from ...platform import progress

    with progress.step("float twin"):
        return twin.twin_for(model, exp.twin_dtype)


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


class _CellMeasurement(msgspec.Struct):
    """The shape of a cell's cache entry (what `_measure` stores): checked when it is read."""

    tensors: list[str]
    n_elements: int
    changed: int
    max_abs: float | None
    max_rel: float | None
    mean_rel: float | None
    identical: bool
    kld_mean: float | None
    chunk_klds: list[float | None]
    same_top_pct: float | None
    kld: dict[str, Any] | None
    chunk_ppls: list[float | None]
    ppl: float | None
    baseline_ppl: float | None
    delta_ppl_pct: float | None
    delta_ppl_pct_err: float | None
    quantize_s: float
    evaluate_s: float
    llama_s: float | None
    commands: list[dict[str, Any]]
    n_became_nonfinite: int = 0


def _cell_measurement(payload: dict) -> dict:
    return dict(payload, **msgspec.structs.asdict(codec.convert(payload, _CellMeasurement)))


def _measure(cell, measured, baseline, ctx, exp, folder: Path) -> dict:
    """The cached part of a cell: quantize, evaluate once, delete the GGUF."""
    from ...measurement import patch
    from ...platform import atomic, progress
    from .. import protocol

    dst = folder / f"{results.safe_name(cell.model)}.{cell.format_label}.gguf"
    # disk flat: the cell's GGUF lives only while evaluated, whatever ends that
    with atomic.owned(dst):
        t0 = time.perf_counter()
        with progress.step("quantize"):
            manifest = patch.fake_quantize_file(
                measured.path,
                dst,
                layers=cell.layers,
                tensors=(cell.kind,),
                fmt=cell.fmt,
                rounding=cell.rounding,
                force=True,
                fsync=False,
            )
        quantize_s = time.perf_counter() - t0
        identical = manifest.output.sha256 == measured.sha256
        t1 = time.perf_counter()
        if identical:  # the SHA-256 proves llama.cpp would rerun the baseline
            kld, ppl, cmd, commands = None, baseline.perplexity, None, []
        else:
            ref = replace(
                measured,
                name=f"{measured.name}+{cell.format_label}",
                path=dst,
                sha256=manifest.output.sha256,
                spec=None,
            )
            with progress.step("treatment"):
                ev = protocol.perplexity_only(ctx, ref, baseline, exp.settings)
            ppl, kld = ev.perplexity, ev.perplexity.kld
            cmd = ev.perplexity.command
            commands = protocol.commands_json("treatment", protocol.ppl_commands(ev))
    evaluate_s = time.perf_counter() - t1
    from ...measurement.evaluate import paired_delta_pct_err

    base = baseline.perplexity
    t = manifest.totals
    return {
        "tensors": [c.name for c in manifest.tensors],
        "n_elements": manifest.total_elements,
        "changed": manifest.total_changed,
        "max_abs": t.max_abs,
        "max_rel": t.max_rel,
        "mean_rel": t.mean_rel,
        "n_became_nonfinite": t.n_became_nonfinite,
        "identical": identical,
        "kld_mean": 0.0 if identical else (kld.mean if kld else None),
        "chunk_klds": (
            [0.0] * len(base.chunk_ppls) if identical else list(kld.chunk_means if kld else ())
        ),
        "same_top_pct": 100.0 if identical else (kld.same_top_pct if kld else None),
        "kld": None if identical else kld,
        "chunk_ppls": list(ppl.chunk_ppls),
        "ppl": ppl.ppl,
        "baseline_ppl": base.ppl,
        "delta_ppl_pct": 100.0 * (ppl.ppl - base.ppl) / base.ppl,
        "delta_ppl_pct_err": None
        if identical
        else paired_delta_pct_err(base.chunk_ppls, ppl.chunk_ppls),
        "quantize_s": quantize_s,
        "evaluate_s": evaluate_s,
        "llama_s": cmd.duration_s if cmd is not None else None,
        "commands": commands,
        "manifest": manifest.path,
    }


def p_value(
    treatment_chunks: Sequence[Num], placebo_chunks: Sequence[Sequence[Num]]
) -> float | None:
    """One-sided p of "the treatment moves KLD more than its placebos", from the per-chunk
    differences treatment − mean placebo (paired: the same tokens). A t-test, not Wilcoxon:
    with 8 chunks the signed-rank test cannot go below p = 1/256, which Benjamini–Hochberg
    over dozens of cells would need; chunk means of ~255 token KLDs are close to normal."""
    import numpy as np

    runs = [list(p) for p in placebo_chunks if p]
    t = list(treatment_chunks)
    if len(t) < 2 or not runs or any(len(r) != len(t) for r in runs):
        return None
    d = np.asarray(t, dtype=np.float64) - np.nanmean(np.asarray(runs, dtype=np.float64), axis=0)
    d = d[np.isfinite(d)]
    if d.size < 2:
        return None
    if float(d.std()) == 0.0:  # no spread: the sign of the (constant) difference decides
        return 0.0 if float(d.mean()) > 0 else 1.0
    from scipy import stats as sps

    return float(sps.ttest_1samp(d, 0.0, alternative="greater").pvalue)


def cell_statistics(
    engine: str,
    variant: str,
    treatment_chunks: Sequence[Num],
    treatment_mean: Num,
    placebos: Sequence[CellPlacebo],
    *,
    identical: bool = False,
) -> tuple[Resolution, float | None]:
    """The cell's effect against its placebos (fq_core.experiment.stats.resolution: effect and
    paired excess intervals, floor, ratio) and its one-sided p-value."""
    from .. import protocol, stats

    kw = dict(
        engine=protocol.ENGINE_WORDS.get(engine, engine),
        treatment_chunks=list(treatment_chunks),
        treatment_mean=treatment_mean,
        placebo_chunks=[list(p.chunk_klds) for p in placebos],
        placebo_means=[p.kld_mean for p in placebos],
        identical=identical,
        label=protocol.VARIANT_WORDS.get(variant, variant),
    )
    res = stats.resolution(**kw)  # placebos of KLD 0 (Gemma3's last layers): floor 0, no ratio
    p = None if identical else p_value(treatment_chunks, [p.chunk_klds for p in placebos])
    return res, p


def run_cell(
    cell: Cell,
    model: ModelRef,
    ctx: Context,
    exp: Experiment,
    *,
    chunks: int | None = None,
) -> CellRecord:
    """Measure one cell (cached), its placebos (cached, shared) and its statistics; store the
    record under results/<run-id>/sweep/cells/ and return it. A failure is stored as status
    "error" with the one-line reason, then returned (the caller decides)."""
    from ...measurement import evaluate
    from ...measurement.gguf_index import read_index
    from ...measurement.selection import resolve
    from ...platform import progress
    from .. import protocol

    started = results.utc_now()
    t_start = time.perf_counter()
    exp = experiment_for(exp, cell, chunks)
    info = CellInfo(**{k: v for k, v in cell.to_json().items()})
    ident = Identity(
        model_sha256=model.sha256,
        measured_sha256=model.sha256,
        corpus_sha256=ctx.corpus.sha256,
        llama_version=ctx.tools.version,
        llama_build=ctx.tools.build_id,
        settings=cell_settings(exp),
    )
    base_rec = dict(
        schema=CELL_SCHEMA,
        run_id=ctx.run_id,
        cell=info,
        identity=ident,
        machine=machine_info(),
        started_at=started,
        key="",
    )

    def failed(exc: BaseException, key: str = "") -> CellRecord:
        rec = CellRecord(
            **{**base_rec, "key": key},
            status="error",
            error=_error(exc),
            finished_at=results.utc_now(),
        )
        save_cell(rec, ctx.results_root)
        return rec

    try:
        measured = _measured(model, exp)
        ident = msgspec.structs.replace(ident, measured_sha256=measured.sha256)
        base_rec["identity"] = ident
        sel = resolve(read_index(measured.path), cell.layers, (cell.kind,))
        baseline = evaluate.evaluate_baseline(ctx.runner, measured, ctx.corpus, exp.settings)
        key = cell_key(ident, cell, sel.names, baseline.kld_base_sha256)
        base_rec["key"] = key
        with progress.step("cell"):  # its quantize and treatment steps inside, or "cached"
            entry = cache.verified(
                "cells",
                key,
                "cell.json",
                lambda folder: _measure(cell, measured, baseline, ctx, exp, folder),
                decode=_cell_measurement,
            )
            meas, hit = entry.value, entry.hit
            if hit:
                progress.note("cached")
    except FqError as exc:
        return failed(exc, base_rec["key"])

    placebos: list[CellPlacebo] = []
    t_placebo = time.perf_counter()
    try:
        if not meas["identical"]:  # an identical file has no effect to compare with a control
            n = len(exp.placebo_seeds)
            for i, seed in enumerate(exp.placebo_seeds, start=1):
                with progress.step(f"placebo {i}/{n}"):
                    run, p_entry = protocol.run_placebo(
                        measured, baseline, ctx, exp, cell.layers, seed
                    )
                    p_hit = p_entry.hit
                    if p_hit:
                        progress.note("cached")
                kld = run.get("kld") or {}
                placebos.append(
                    CellPlacebo(
                        seed=seed,
                        key=run.get("key", ""),
                        kld_mean=run.get("kld_mean"),
                        chunk_klds=tuple(kld.get("chunk_means") or ()),
                        same_top_pct=run.get("same_top_pct"),
                        cached=p_hit,
                        measured_at=p_entry.measured_at,
                    )
                )
    except FqError as exc:
        return failed(exc, key)
    placebo_s = time.perf_counter() - t_placebo

    res, p = cell_statistics(
        ident.settings["engine"],
        cell.variant,
        meas["chunk_klds"],
        meas["kld_mean"],
        placebos,
        identical=meas["identical"],
    )
    rec = CellRecord(
        **base_rec,
        status="measured",
        numeric=CellNumeric(
            tensors=tuple(meas["tensors"]),
            n_elements=meas["n_elements"],
            changed=meas["changed"],
            max_abs=meas["max_abs"],
            max_rel=meas["max_rel"],
            mean_rel=meas["mean_rel"],
            n_became_nonfinite=meas.get("n_became_nonfinite", 0),
        ),
        treatment=CellTreatment(
            identical=meas["identical"],
            kld_mean=meas["kld_mean"],
            chunk_klds=tuple(meas["chunk_klds"]),
            same_top_pct=meas["same_top_pct"],
            ppl=meas["ppl"],
            baseline_ppl=meas["baseline_ppl"],
            delta_ppl_pct=meas["delta_ppl_pct"],
            delta_ppl_pct_err=meas["delta_ppl_pct_err"],
        ),
        placebo=tuple(placebos),
        resolution=res,
        p_value=p,
        cached=hit,
        measured_at=entry.measured_at,
        rejected=entry.rejected,
        timing=CellTiming(
            quantize_s=meas["quantize_s"],
            evaluate_s=meas["evaluate_s"],
            llama_s=meas.get("llama_s"),
            placebo_s=placebo_s,
            total_s=time.perf_counter() - t_start,
        ),
        commands=tuple(dict(c, cached=hit) for c in meas.get("commands", ())),
        finished_at=results.utc_now(),
    )
    save_cell(rec, ctx.results_root)
    return rec
