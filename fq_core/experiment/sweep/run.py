"""Running one sweep cell: its experiment, the one measurement a stage also makes
(`experiment.measure.measure`: quantize, evaluate once, delete the GGUF; the selection-matched
placebos, shared with the stages and across formats) and its statistics against them. The
measurement is cached by everything that decides its numbers (`measure.target_key`), so a wider
sweep runs only its new cells and an interrupted one resumes.

Per cell: the treatment's mean KLD with a bootstrap interval over chunks, the paired excess
over its placebos (treatment − mean placebo, chunk by chunk), the floor (the largest placebo
mean KLD) and a one-sided p-value from a one-sample t-test on those per-chunk differences.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import msgspec

from ...errors import FqError, NotDeployable
from ...storage import results
from ...storage.cell_record import (
    ANYTIME_P_TEST,
    CELL_SCHEMA,
    NOT_DEPLOYABLE,
    P_TEST,
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

if TYPE_CHECKING:
    from ...measurement.llama.tools import LlamaTools
    from ...measurement.models import ModelRef
    from ...measurement.sequential import Rule
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


def cell_settings(exp: Experiment, rule: Rule | None = None) -> dict[str, Any]:
    """The settings part of a cell's identity."""
    s = exp.settings
    return {
        "until_decided": rule.to_json() if rule is not None else None,
        "ctx": s.ctx,
        "batch": s.batch,
        "chunks": s.chunks,
        "kld_chunks": s.kld_chunks,
        "engine": getattr(s, "engine", "llama-perplexity"),
        "placebo_seeds": list(exp.placebo_seeds),
        "twin_dtype": exp.twin_dtype if exp.variant == "intrinsic" else None,
    }


def experiment_for(
    exp: Experiment, cell: Cell, chunks: int | None = None, rule: Rule | None = None
) -> Experiment:
    """The experiment one cell runs with: its kind, format and variant (engine, seeds); a cell
    evaluated until decided has a baseline of the rule's cap in chunks."""
    if rule is not None:
        chunks = rule.max_chunks
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


def _bytes(model: ModelRef, names: Sequence[str], fmt: str) -> dict[str, int | None]:
    """What the cell's tensors take in the model file and would take stored as `fmt`: the
    other half of a mixed-precision choice (KLD per byte saved)."""
    from ...measurement.ggml_types import stored_bytes
    from ...measurement.gguf_index import read_index

    infos = {t.name: t for t in read_index(model.path).tensors}
    found = [infos[n] for n in names if n in infos]
    if len(found) != len(names):
        return {}
    as_fmt = [stored_bytes(fmt, tuple(t.shape)) for t in found]
    return {
        "bytes_model": sum(t.n_bytes for t in found),
        "bytes_format": None if None in as_fmt else sum(b for b in as_fmt if b is not None),
    }


def _running(rule: Rule | None, cell: Cell) -> Rule | None:
    """The rule a cell runs by: the sweep's, but a cumulative cell is not ranked, so its
    treatment rests with its placebo instead of going on to the ranking's chunks."""
    if rule is None or cell.series != "cumulative":
        return rule
    return replace(rule, rank_chunks=0)


def run_cell(
    cell: Cell,
    model: ModelRef,
    ctx: Context,
    exp: Experiment,
    *,
    chunks: int | None = None,
    rule: Rule | None = None,
) -> CellRecord:
    """Measure one cell (measure.measure: the treatment cached by its target, the placebos
    cached and shared), add its p-value; store the record under results/<run-id>/sweep/cells/
    and return it. A failure is stored as status "error" with the one-line reason, then
    returned (the caller decides); a real file llama.cpp cannot run as "not deployable", with
    llama.cpp's line: that is the cell's answer."""
    from ..measure import Target, error_line, measure

    started = results.utc_now()
    t_start = time.perf_counter()
    exp = experiment_for(exp, cell, chunks, rule)
    ident = Identity(
        model_sha256=model.sha256,
        measured_sha256=model.sha256,
        corpus_sha256=ctx.corpus.sha256,
        llama_version=ctx.tools.version,
        llama_build=ctx.tools.build_id,
        settings=cell_settings(exp, rule),
    )
    rec = CellRecord(
        schema=CELL_SCHEMA,
        run_id=ctx.run_id,
        cell=CellInfo(**cell.to_json()),
        identity=ident,
        machine=machine_info(),
        started_at=started,
        key="",
        status="error",
    )

    def failed(error: str, status: str = "error") -> CellRecord:
        done = msgspec.structs.replace(
            rec, status=status, error=error, finished_at=results.utc_now()
        )
        save_cell(done, ctx.results_root)
        return done

    try:
        measured = _measured(model, exp)
        rec = msgspec.structs.replace(
            rec, identity=msgspec.structs.replace(ident, measured_sha256=measured.sha256)
        )
        m = measure(Target(measured, cell.layers), ctx, exp, until_decided=_running(rule, cell))
    except NotDeployable as exc:  # the real file's answer: llama.cpp cannot run its types
        return failed(str(exc), NOT_DEPLOYABLE)
    except FqError as exc:
        return failed(error_line(exc))
    entry, f = m.treatment.entry, m.treatment.figures
    rec = msgspec.structs.replace(rec, key=entry.key)
    if m.placebo_error is not None:
        return failed(m.placebo_error)
    placebos = tuple(
        CellPlacebo(
            seed=p.run.seed,
            key=p.run.key,
            kld_mean=p.run.kld_mean,
            chunk_klds=tuple(p.run.kld.chunk_means) if p.run.kld else (),
            same_top_pct=p.run.same_top_pct,
            cached=p.entry.hit,
            measured_at=p.entry.measured_at,
        )
        for p in m.placebos
    )
    kld, q = f.kld, f.quantized
    # a byte-identical file: KLD 0 in every chunk, and no paired error to state
    chunk_klds = (0.0,) * len(f.chunk_ppls) if f.identical else (kld.chunk_means if kld else ())
    if f.identical:
        p = None
    elif m.stop is not None:  # anytime-valid: the cell was looked at after every chunk
        p = m.stop.p_value
    else:
        p = p_value(chunk_klds, [c.chunk_klds for c in placebos])
    rec = msgspec.structs.replace(
        rec,
        status="measured",
        numeric=CellNumeric(
            tensors=q.tensors,
            n_elements=q.n_elements,
            changed=q.changed,
            max_abs=(q.max_abs),
            max_rel=(q.max_rel),
            mean_rel=(q.mean_rel),
            n_became_nonfinite=q.n_became_nonfinite,
            **_bytes(model, q.tensors, cell.fmt),
        ),
        treatment=CellTreatment(
            identical=f.identical,
            kld_mean=(kld.mean if kld else None),
            chunk_klds=tuple(chunk_klds),
            same_top_pct=(kld.same_top_pct if kld else None),
            ppl=(f.ppl),
            baseline_ppl=(f.baseline_ppl),
            delta_ppl_pct=(f.delta_ppl_pct),
            delta_ppl_pct_err=None if f.identical else (f.delta_ppl_pct_err),
        ),
        placebo=placebos,
        resolution=m.resolution,
        p_value=p,
        p_test=P_TEST if m.stop is None else ANYTIME_P_TEST,
        sequential=m.stop,
        cached=entry.hit,
        measured_at=entry.measured_at,
        rejected=entry.rejected,
        timing=CellTiming(
            quantize_s=f.quantize_s,
            evaluate_s=f.evaluate_s,
            llama_s=f.llama_s,
            placebo_s=m.placebo_s,
            total_s=time.perf_counter() - t_start,
        ),
        commands=tuple(dict(c, cached=entry.hit) for c in f.commands),
        finished_at=results.utc_now(),
    )
    save_cell(rec, ctx.results_root)
    return rec
