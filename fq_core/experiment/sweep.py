"""The sensitivity sweep: which layers, tensor kinds and formats matter, one cell at a time.

A *cell* is one model × tensor kind × selection × format × variant: the selected tensors
fake-quantized (one layer alone, or the first n layers for the cumulative curve), one
llama.cpp evaluation against the cached baseline, and the selection-matched placebos
(`measure.run_placebo`, shared with the stages and across formats: a placebo depends on the
selection, not on the format). The cell's measurement is cached by everything that decides
its numbers, so a wider sweep runs only its new cells and an interrupted one resumes:

    cache_dir()/cells/<key>/cell.json    key = model (and twin) SHA-256, corpus SHA-256,
                                         llama.cpp version (+ backend), variant, resolved
                                         tensors, format, rounding, ctx/batch/chunks/engine,
                                         the SHA-256 of the baseline logits

a verified entry (fq_core.storage.cache): one that fails its proof is moved aside and made again.

The fake-quantized GGUF is written beside it, evaluated and deleted (disk stays flat).

Each cell's record (`CellRecord`) is stored in the results store at
``results/<run-id>/sweep/cells/<cell-id>.json`` — one level deeper than the stage records, so
the stage report's ``<stage>/<case>.json`` glob never sees it, and shards of one sweep
(pytest-split, other machines) each write their own files, merged by `load_cells`.

Statistics (scipy/numpy, fq_core.experiment.stats): per cell the treatment's mean KLD with a
bootstrap interval over chunks, the paired excess over its placebos (treatment − mean placebo, chunk
by chunk), the floor (the largest placebo mean KLD) and a one-sided p-value from a one-sample
t-test on those per-chunk differences. Across the cells of a report `analyze` controls the
false discovery rate with Benjamini–Hochberg, ranks cells with rank *ranges* (a cell is
only above another when their excess intervals do not overlap: overlapping intervals are
ties) and writes the one sentence naming the most sensitive layers and kinds, or saying
that none stands out. No pytest here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from ..definitions.formats import FORMATS, ROUNDINGS
from ..definitions.settings import default
from ..errors import BadInput, BadSelection, FqError
from ..measurement.selection import format_layers, parse_layers, split_name
from ..storage import results
from ..storage.identity import Identity, MachineInfo, machine_info
from ..storage.record import VARIANTS, Interval, NonFinite, Resolution

if TYPE_CHECKING:
    from ..measurement.llama.tools import LlamaTools
    from ..measurement.models import ModelRef
    from .stages import Context, Experiment

log = logging.getLogger(__name__)

CELL_SCHEMA = 1
SWEEP_DIR = "sweep"
CELLS_DIR = "cells"
#: What a sweep can fake-quantize: every format of definitions.formats but the control itself.
SWEEP_FORMATS = tuple(f for f in FORMATS if f != "placebo")
#: layer = one layer alone; cumulative = the first n layers; whole = a kind outside the blocks
SERIES = ("layer", "cumulative", "whole")
Q_DEFAULT = default("fq_sweep_fdr")  # Benjamini–Hochberg false discovery rate
P_TEST = (
    "one-sided one-sample t-test on the per-chunk differences treatment − mean placebo "
    "(H1: the treatment moves KLD more than its placebos)"
)
Num = float | NonFinite | None


# --- the plan: which cells ---------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One case of the sweep; `id` names every axis (`-k "gemma3-270m and ffn_norm and bf16"`)."""

    model: str  # the model's id (registry name, or a path's stem)
    kind: str
    fmt: str
    rounding: str
    variant: str
    series: str  # one of SERIES
    layers: str  # the selection's --layers spec ("3", "0-3", "all")
    layer: int | None = None  # series "layer": the layer
    n_layers: int | None = None  # layers quantized (1 for "layer"; None for "whole")
    width: int = 2  # digits of layer numbers in the id (blk03, first04)

    @property
    def format_label(self) -> str:
        return self.fmt if self.rounding == "truncate" else f"{self.fmt}-{self.rounding}"

    @property
    def where(self) -> str:
        if self.series == "layer":
            return f"blk{self.layer:0{self.width}d}"
        if self.series == "cumulative":
            return f"first{self.n_layers:0{self.width}d}"
        return ""

    @property
    def id(self) -> str:
        # never "layer": `pytest -k layer0` is the stage gate and must not select sweep cells
        parts = (self.model, self.kind, self.where, self.format_label, self.variant)
        return "-".join(p for p in parts if p)

    @property
    def group(self) -> tuple[str, str, str]:
        """Cells ranked against each other: one model, variant and format."""
        return (self.model, self.variant, self.format_label)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "model": self.model,
            "kind": self.kind,
            "format": self.fmt,
            "rounding": self.rounding,
            "variant": self.variant,
            "series": self.series,
            "layers": self.layers,
            "layer": self.layer,
            "n_layers": self.n_layers,
        }


@dataclass(frozen=True)
class Plan:
    """The axes of a sweep. `kinds` ("all",) = every F32 kind the model has."""

    name: str
    models: tuple[str, ...]
    kinds: tuple[str, ...]
    formats: tuple[tuple[str, str], ...]  # (format, rounding)
    layers: str  # --layers grammar, applied to every kind that lives in the blocks
    variants: tuple[str, ...]
    cumulative: bool = True
    chunks: int | None = None  # None: the experiment's chunks (and KLD chunks)

    def describe(self) -> str:
        fmts = " ".join(f if r == "truncate" else f"{f}/{r}" for f, r in self.formats)
        chunks = f"; {self.chunks} chunks" if self.chunks else ""
        cum = "; cumulative curve" if self.cumulative else ""
        return (
            f"{self.name}: models {' '.join(self.models)}; kinds {' '.join(self.kinds)}; "
            f"formats {fmts}; layers {self.layers}; {' + '.join(self.variants)}{chunks}{cum}"
        )


#: What the default `pytest` run (CI, `make test`) sweeps: enough to exercise the machinery.
SMOKE = Plan(
    name="smoke",
    models=("gemma3-270m",),
    kinds=("ffn_norm",),
    formats=(("bf16", "truncate"),),
    layers="0-1",
    variants=("deployed",),
    cumulative=True,
    chunks=2,
)


def parse_formats(text: str | Sequence[str], default_rounding: str = "truncate"):
    """`bf16 fp8_e4m3/nearest`, or `all` (every format but placebo) -> ((format, rounding), ...)."""
    items = text.split() if isinstance(text, str) else list(text)
    items = [p.strip() for i in items for p in i.replace(",", " ").split() if p.strip()]
    if not items:
        raise BadInput("no format given; choose from " + ", ".join(SWEEP_FORMATS) + " or all")
    out: list[tuple[str, str]] = []
    for item in items:
        if item == "all":
            out += [(f, default_rounding) for f in SWEEP_FORMATS]
            continue
        fmt, _, rounding = item.partition("/")
        rounding = rounding or default_rounding
        if fmt not in SWEEP_FORMATS:
            raise BadInput(f"unknown sweep format {fmt!r}; choose from {', '.join(SWEEP_FORMATS)}")
        if rounding not in ROUNDINGS:
            raise BadInput(
                f"unknown rounding {rounding!r} in {item!r}; one of {', '.join(ROUNDINGS)}"
            )
        out.append((fmt, rounding))
    return tuple(dict.fromkeys(out))


def parse_variants(text: str) -> tuple[str, ...]:
    words = text.replace(",", " ").split()
    if words == ["both"] or words == ["all"]:
        return VARIANTS
    bad = [w for w in words if w not in VARIANTS]
    if bad or not words:
        raise BadInput(f"variants {text!r}: choose deployed, intrinsic or both")
    return tuple(dict.fromkeys(words))


def kinds_of(index) -> tuple[str, ...]:
    """Every kind with an F32 tensor: those in the blocks in blk order, then the others."""
    in_blocks: dict[str, None] = {}
    outside: dict[str, None] = {}
    for t in index.tensors:
        if t.type_name != "F32":
            continue
        layer, kind = split_name(t.name)
        (outside if layer is None else in_blocks).setdefault(kind, None)
    return tuple(in_blocks) + tuple(k for k in outside if k not in in_blocks)


def _kind_layers(index, kind: str) -> tuple[int, ...]:
    return tuple(
        sorted(
            {
                layer
                for t in index.tensors
                if t.type_name == "F32"
                for layer, k in [split_name(t.name)]
                if k == kind and layer is not None
            }
        )
    )


def _block_count(index) -> int:
    bc = getattr(index, "block_count", None)
    if bc is not None:
        return int(bc)
    layers = [split_name(t.name)[0] for t in index.tensors]
    return max((n for n in layers if n is not None), default=-1) + 1


def cumulative_sizes(n: int) -> tuple[int, ...]:
    """1, 2, 4, … up to n, and n itself: the x axis of "more layers, more error"."""
    sizes, k = [], 1
    while k < n:
        sizes.append(k)
        k *= 2
    return (*sizes, n) if n else ()


def cells_for(plan: Plan, model_id: str, index) -> tuple[Cell, ...]:
    """Every cell of `plan` for one model (its GGUF index gives the kinds and layers)."""
    available = kinds_of(index)
    kinds = available if plan.kinds == ("all",) else plan.kinds
    missing = [k for k in kinds if k not in available]
    if missing:
        raise BadSelection(
            f"{model_id} has no F32 tensor of kind {', '.join(missing)}; "
            f"its F32 kinds: {', '.join(available) or 'none'}"
        )
    blocks = _block_count(index)
    wanted = set(parse_layers(plan.layers, blocks)) if blocks > 0 else set()
    width = max(2, len(str(max(blocks - 1, 0))))
    out: list[Cell] = []
    for variant in plan.variants:
        for fmt, rounding in plan.formats:
            for kind in kinds:
                base = dict(
                    model=model_id,
                    kind=kind,
                    fmt=fmt,
                    rounding=rounding,
                    variant=variant,
                    width=width,
                )
                layers = _kind_layers(index, kind)
                if not layers:
                    out.append(Cell(series="whole", layers="all", **base))
                    continue
                chosen = [n for n in layers if n in wanted]
                out += [
                    Cell(series="layer", layers=str(n), layer=n, n_layers=1, **base) for n in chosen
                ]
                if plan.cumulative:
                    for n in cumulative_sizes(len(chosen)):
                        if n == 1:  # the first layer's own cell is that point of the curve
                            continue
                        first = chosen[:n]
                        spec = "all" if first == list(range(blocks)) else format_layers(first)
                        out.append(Cell(series="cumulative", layers=spec, n_layers=n, **base))
    return tuple(out)


def sort_key(cell: Cell) -> tuple:
    """Model, variant, format, kind, then layers in order, cumulative after single layers:
    the baseline is made once, first, and shards of pytest-split get contiguous runs."""
    return (
        cell.model,
        VARIANTS.index(cell.variant) if cell.variant in VARIANTS else 9,
        cell.format_label,
        cell.kind,
        SERIES.index(cell.series),
        cell.layer or 0,
        cell.n_layers or 0,
    )


# --- the record of one cell --------------------------------------------------------------------


class _Part(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class CellInfo(_Part, kw_only=True):
    id: str
    model: str
    kind: str
    format: str
    rounding: str
    variant: str
    series: str
    layers: str
    layer: int | None = None
    n_layers: int | None = None


class CellNumeric(_Part, kw_only=True):
    tensors: tuple[str, ...]
    n_elements: int
    changed: int
    max_abs: Num
    max_rel: Num
    mean_rel: Num
    n_became_nonfinite: int = 0


class CellTreatment(_Part, kw_only=True):
    identical: bool  # the fake-quantized file is byte-identical: no run, KLD 0 by identity
    kld_mean: Num
    chunk_klds: tuple[Num, ...]
    same_top_pct: Num
    ppl: Num
    baseline_ppl: Num
    delta_ppl_pct: Num
    delta_ppl_pct_err: Num


class CellPlacebo(_Part, kw_only=True):
    seed: int
    key: str
    kld_mean: Num
    chunk_klds: tuple[Num, ...]
    same_top_pct: Num = None
    cached: bool | None = None
    measured_at: str | None = None  # when its cache entry was measured


class CellTiming(_Part, kw_only=True):
    """Seconds of the cell's own work when it was computed (a cache hit keeps these)."""

    quantize_s: float
    evaluate_s: float  # the llama.cpp run, as fq called it
    llama_s: float | None  # the llama.cpp process alone (its CommandRecord)
    placebo_s: float = 0.0  # this run's placebo work (0 when all were cached)
    total_s: float = 0.0  # this run: everything the cell took, cache hits included


class CellRecord(_Part, kw_only=True):
    schema: int
    run_id: str
    cell: CellInfo
    identity: Identity
    status: str  # "measured" | "error"
    error: str | None = None
    numeric: CellNumeric | None = None
    treatment: CellTreatment | None = None
    placebo: tuple[CellPlacebo, ...] = ()
    resolution: Resolution | None = None
    p_value: float | None = None  # None: nothing to test (identical file, no placebo, < 2 chunks)
    p_test: str = P_TEST
    key: str  # the cell's cache key
    cached: bool = False  # the treatment was reused from the cell cache
    measured_at: str | None = None  # when the cell's cache entry was measured
    rejected: str | None = None  # an earlier entry at its key failed its proof (moved aside)
    timing: CellTiming | None = None
    machine: MachineInfo | None = None
    commands: tuple[dict[str, Any], ...] = ()
    started_at: str
    finished_at: str | None = None

    @property
    def effect(self) -> float:
        t = self.treatment
        return _f(t.kld_mean) if t is not None else math.nan


def _f(x) -> float:
    from ..storage.record import as_float

    return as_float(x)


def read_cell(path: str | Path) -> CellRecord:
    """A stored cell record, validated; BadInput names the file and the field."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"{path}: cannot read sweep cell ({exc.strerror or exc})") from exc
    try:
        data = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadInput(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("schema") != CELL_SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else None
        raise BadInput(f"{path}: not a sweep cell of schema {CELL_SCHEMA} (schema {found!r})")
    if data.get("machine") == {}:  # the default before MachineInfo: nothing was recorded
        data["machine"] = None
    try:
        return msgspec.convert(data, CellRecord)
    except msgspec.ValidationError as exc:
        raise BadInput(f"{path}: {exc}") from exc


def cell_path(run_id: str, cell_id: str, root=None) -> Path:
    """results/<run-id>/sweep/cells/<cell-id>.json"""
    return (
        results.run_dir(run_id, root) / SWEEP_DIR / CELLS_DIR / f"{results.safe_name(cell_id)}.json"
    )


def save_cell(rec: CellRecord, root=None) -> Path:
    path = cell_path(rec.run_id, rec.cell.id, root)
    data = results.jsonable(msgspec.to_builtins(rec), words=True)
    text = msgspec.json.format(msgspec.json.encode(data), indent=2) + b"\n"
    with results.lock_for(path):
        results.write_bytes_atomic(path, text)
    return path


# --- identity, keys and the backend ------------------------------------------------------------


_GPU_BACKENDS = ("CUDA", "HIP", "VULKAN", "METAL", "SYCL", "MUSA", "OPENCL", "CANN", "KOMPUTE")


def backend(tools: LlamaTools, gpu_layers: int | None) -> str:
    """ "" for the CPU build run on the CPU; else what differs ("cuda; -ngl 99"). GPU kernels
    are not bit-identical to the CPU's, so a backend is part of every cache key and identity."""
    from ..measurement.llama.tools import BASE_CMAKE_ARGS, build_record

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
    from ..measurement import twin
    from ..platform import progress

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

    runs = [[_f(v) for v in p] for p in placebo_chunks if p]
    t = [_f(v) for v in treatment_chunks]
    if len(t) < 2 or not runs or any(len(r) != len(t) for r in runs):
        return None
    d = np.asarray(t) - np.nanmean(np.asarray(runs, dtype=np.float64), axis=0)
    d = d[np.isfinite(d)]
    if d.size < 2:
        return None
    if float(d.std()) == 0.0:  # no spread: the sign of the (constant) difference decides
        return 0.0 if float(d.mean()) > 0 else 1.0
    from scipy import stats as sps

    return float(sps.ttest_1samp(d, 0.0, alternative="greater").pvalue)


def run_cell(
    cell: Cell,
    model: ModelRef,
    ctx: Context,
    exp: Experiment,
    *,
    chunks: int | None = None,
) -> CellRecord:
    """Measure one cell (measure.measure: the treatment cached by its target, the placebos
    cached and shared), add its p-value; store the record under results/<run-id>/sweep/cells/
    and return it. A failure is stored as status "error" with the one-line reason, then
    returned (the caller decides)."""
    from .measure import Target, error_line, measure

    started = results.utc_now()
    t_start = time.perf_counter()
    exp = experiment_for(exp, cell, chunks)
    ident = Identity(
        model_sha256=model.sha256,
        measured_sha256=model.sha256,
        corpus_sha256=ctx.corpus.sha256,
        llama_version=ctx.tools.version,
        llama_build=ctx.tools.build_id,
        settings=cell_settings(exp),
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

    def failed(error: str) -> CellRecord:
        done = msgspec.structs.replace(rec, error=error, finished_at=results.utc_now())
        save_cell(done, ctx.results_root)
        return done

    try:
        measured = _measured(model, exp)
        rec = msgspec.structs.replace(
            rec, identity=msgspec.structs.replace(ident, measured_sha256=measured.sha256)
        )
        m = measure(Target(measured, cell.layers), ctx, exp)
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
    p = None if f.identical else p_value(chunk_klds, [c.chunk_klds for c in placebos])
    rec = msgspec.structs.replace(
        rec,
        status="measured",
        numeric=CellNumeric(
            tensors=q.tensors,
            n_elements=q.n_elements,
            changed=q.changed,
            max_abs=_num(q.max_abs),
            max_rel=_num(q.max_rel),
            mean_rel=_num(q.mean_rel),
            n_became_nonfinite=q.n_became_nonfinite,
        ),
        treatment=CellTreatment(
            identical=f.identical,
            kld_mean=_num(kld.mean if kld else None),
            chunk_klds=tuple(_num(v) for v in chunk_klds),
            same_top_pct=_num(kld.same_top_pct if kld else None),
            ppl=_num(f.ppl),
            baseline_ppl=_num(f.baseline_ppl),
            delta_ppl_pct=_num(f.delta_ppl_pct),
            delta_ppl_pct_err=None if f.identical else _num(f.delta_ppl_pct_err),
        ),
        placebo=placebos,
        resolution=m.resolution,
        p_value=p,
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


def _num(x):
    if x is None:
        return None
    if isinstance(x, str):
        return x
    x = float(x)
    return x if math.isfinite(x) else ("nan" if x != x else ("inf" if x > 0 else "-inf"))


# --- finding and merging the cells of one or more results directories --------------------------


def _cells_in(path: Path) -> list[Path]:
    return sorted(path.glob("*.json")) if path.is_dir() else []


def cells_dir(path: str | Path) -> Path | None:
    """The sweep cells a results path holds: given a results root (its newest run with sweep
    cells), a run directory, its sweep/ or sweep/cells/ directory; None when there are none."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"results directory not found: {path}")
    for candidate in (path, path / CELLS_DIR, path / SWEEP_DIR / CELLS_DIR):
        if candidate.name == CELLS_DIR and _cells_in(candidate):
            return candidate
    runs = (
        [p / SWEEP_DIR / CELLS_DIR for p in path.iterdir() if p.is_dir()] if path.is_dir() else []
    )
    runs = [r for r in runs if _cells_in(r)]
    if not runs:
        return None
    return max(runs, key=lambda r: max(p.stat().st_mtime for p in _cells_in(r)))


@dataclass(frozen=True)
class Loaded:
    path: Path
    record: CellRecord


def load_cells(paths: Iterable[str | Path]) -> tuple[list[Loaded], list[Path]]:
    """Every cell of the given results directories (shards), checked to belong together:
    one identity per model × variant across all of them, else BadInput naming the difference
    in one line. A cell in two shards is kept once (refused if its numbers differ).
    Returns (cells, the cells directories read)."""
    dirs: list[Path] = []
    for p in paths:
        d = cells_dir(p)
        if d is None:
            raise BadInput(f"no sweep cells (sweep/cells/*.json) under {p}")
        if d not in dirs:
            dirs.append(d)
    seen: dict[str, Loaded] = {}
    ident: dict[tuple[str, str], Loaded] = {}
    for d in dirs:
        for f in _cells_in(d):
            rec = read_cell(f)
            group = (rec.cell.model, rec.cell.variant)
            first = ident.setdefault(group, Loaded(f, rec))
            why = first.record.identity.differences(rec.identity)
            if why:
                raise BadInput(
                    f"cannot merge {first.path.parent} and {f.parent}: {rec.cell.model} "
                    f"({rec.cell.variant}) differs: {why[0].text}"
                )
            old = seen.get(rec.cell.id)
            if old is not None:
                if _numbers(old.record) != _numbers(rec):
                    raise BadInput(
                        f"cell {rec.cell.id} was measured differently in {old.path} and {f}"
                    )
                continue
            seen[rec.cell.id] = Loaded(f, rec)
    cells = sorted(seen.values(), key=lambda c: sort_key(_as_cell(c.record.cell)))
    return cells, dirs


def _numbers(rec: CellRecord):
    return (
        (
            rec.status,
            msgspec.to_builtins(rec.treatment),
            [msgspec.to_builtins(p) for p in rec.placebo],
        )
        if rec.status == "measured"
        else (rec.status,)
    )


def _as_cell(info: CellInfo) -> Cell:
    return Cell(
        model=info.model,
        kind=info.kind,
        fmt=info.format,
        rounding=info.rounding,
        variant=info.variant,
        series=info.series,
        layers=info.layers,
        layer=info.layer,
        n_layers=info.n_layers,
    )


# --- analysis: false discoveries, rank ranges, the sentence -------------------------------------


@dataclass(frozen=True)
class Row:
    """One measured cell as the report shows it (every number from its record)."""

    path: Path
    record: CellRecord
    q_value: float | None = None  # Benjamini–Hochberg adjusted p
    discovery: bool | None = None  # above its placebo at the report's false discovery rate
    rank_lo: int | None = None  # best rank it could have (1 + cells clearly above it)
    rank_hi: int | None = None  # worst rank (n − cells clearly below it)
    verdict: str = ""

    @property
    def cell(self) -> CellInfo:
        return self.record.cell

    @property
    def group(self) -> tuple[str, str, str]:
        c = self.cell
        return (
            c.model,
            c.variant,
            c.format if c.rounding == "truncate" else f"{c.format}-{c.rounding}",
        )

    @property
    def interval(self) -> Interval | None:
        """What the ranking compares: the paired excess over the placebos, else the effect
        (a byte-identical file: exactly zero)."""
        res, t = self.record.resolution, self.record.treatment
        if t is not None and t.identical:
            return Interval(estimate=0.0, low=0.0, high=0.0, n=0, method="identical file")
        if res is None:
            return None
        return res.excess if res.excess is not None else res.effect

    @property
    def label(self) -> str:
        c = self.cell
        if c.series == "layer":
            return f"{c.kind} layer {c.layer}"
        if c.series == "cumulative":
            return f"{c.kind} first {c.n_layers} layers"
        return c.kind


@dataclass(frozen=True)
class GroupSummary:
    model: str
    variant: str
    fmt: str
    n: int  # ranked cells (single layers and layer-less kinds)
    discoveries: tuple[Row, ...]
    leaders: tuple[Row, ...]  # discoveries nothing is clearly above, clearly above another
    sentence: str


@dataclass(frozen=True)
class Analysis:
    rows: tuple[Row, ...]  # every measured cell, ranked cells first, by group and rank
    errors: tuple[Row, ...]  # cells whose measurement failed (named in the report)
    groups: tuple[GroupSummary, ...]
    q: float
    n_tested: int  # cells with a p-value: the Benjamini–Hochberg family
    sentence: str
    identities: dict[tuple[str, str], Identity]
    sources: tuple[Path, ...]
    machines: tuple[str, ...]
    run_ids: tuple[str, ...]

    def to_json(self) -> dict:
        """The numbers of the report (what shards merged must reproduce exactly)."""

        def iv(x: Interval | None):
            return None if x is None else [x.estimate, x.low, x.high]

        rows = []
        for r in self.rows:
            res, t = r.record.resolution, r.record.treatment
            rows.append(
                {
                    "id": r.cell.id,
                    "series": r.cell.series,
                    "kld": t.kld_mean if t else None,
                    "effect": iv(res.effect) if res else None,
                    "excess": iv(res.excess) if res else None,
                    "floor": res.floor if res else None,
                    "ratio": res.ratio if res else None,
                    "p": r.record.p_value,
                    "q": r.q_value,
                    "discovery": r.discovery,
                    "rank": [r.rank_lo, r.rank_hi],
                    "verdict": r.verdict,
                    "changed": r.record.numeric.changed if r.record.numeric else None,
                }
            )
        return {
            "q": self.q,
            "n_tested": self.n_tested,
            "sentence": self.sentence,
            "groups": [g.sentence for g in self.groups],
            "cells": rows,
            "errors": [{"id": r.cell.id, "error": r.record.error} for r in self.errors],
            "identities": {
                f"{m}/{v}": msgspec.to_builtins(i) for (m, v), i in sorted(self.identities.items())
            },
        }


def _rank_ranges(rows: Sequence[Row]) -> dict[str, tuple[int, int]]:
    """Rank ranges by non-overlapping intervals: above = cells whose lower bound lies above
    this one's upper bound. Overlapping intervals are ties, so a rank is often a range."""
    ivs = {}
    for r in rows:
        iv = r.interval
        est = _f(iv.estimate) if iv is not None else math.nan
        lo = _f(iv.low) if iv is not None and iv.low is not None else est
        hi = _f(iv.high) if iv is not None and iv.high is not None else est
        ivs[r.cell.id] = (lo, hi)
    n = len(rows)
    out = {}
    for cid, (lo, hi) in ivs.items():
        above = sum(1 for o, (l2, _) in ivs.items() if o != cid and l2 > hi)
        below = sum(1 for o, (_, h2) in ivs.items() if o != cid and h2 < lo)
        out[cid] = (1 + above, n - below)
    return out


def _names(rows: Sequence[Row]) -> str:
    """'ffn_norm layers 0-3, 6 and 8-9; attn_norm layer 2'"""
    by_kind: dict[str, list[Row]] = {}
    for r in rows:
        by_kind.setdefault(r.cell.kind, []).append(r)
    parts = []
    for kind, rs in by_kind.items():
        layers = [r.cell.layer for r in rs if r.cell.series == "layer"]
        whole = [r for r in rs if r.cell.series != "layer"]
        if layers:  # runs compressed: layers 0-3, 6 and 8-9
            items = format_layers(layers).split(",")
            listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
            parts.append(f"{kind} layer{'s' if len(layers) > 1 else ''} {listed}")
        parts += [r.label for r in whole]
    return "; ".join(parts)


def _verdict(r: Row, q: float) -> str:
    rec = r.record
    if rec.treatment is not None and rec.treatment.identical:
        return "identical file: no element changed"
    if rec.p_value is None:
        return "no placebo: not tested" if not rec.placebo else "not tested (too few chunks)"
    if r.discovery:
        return f"above its placebo (BH q = {q:g})"
    return "not distinguishable from its placebo"


def analyze(
    cells: Sequence[Loaded], *, q: float = Q_DEFAULT, sources: Sequence[Path] = ()
) -> Analysis:
    """The report's statistics over all cells given (every shard merged)."""
    from . import stats

    measured = [Row(c.path, c.record) for c in cells if c.record.status == "measured"]
    errors = tuple(
        Row(c.path, c.record, verdict=f"error: {c.record.error}")
        for c in cells
        if c.record.status != "measured"
    )
    tested = [r for r in measured if r.record.p_value is not None]
    # BH needs adjusted values too (shown as q): scipy's false_discovery_control gives them
    qs: dict[str, float] = {}
    if tested:
        import numpy as np
        from scipy import stats as sps

        p = np.clip(np.asarray([r.record.p_value for r in tested], dtype=np.float64), 0, 1)
        adj = sps.false_discovery_control(p, method="bh")
        found = stats.false_discoveries(list(p), q)
        qs = {r.cell.id: float(a) for r, a in zip(tested, adj, strict=True)}
        disc = {r.cell.id: f for r, f in zip(tested, found, strict=True)}
    else:
        disc = {}
    rows = [replace(r, q_value=qs.get(r.cell.id), discovery=disc.get(r.cell.id)) for r in measured]

    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    ranked: list[Row] = []
    summaries = []
    for g, rs in groups.items():
        single = [r for r in rs if r.cell.series != "cumulative"]
        cum = [r for r in rs if r.cell.series == "cumulative"]
        ranks = _rank_ranges(single)
        single = [
            replace(r, rank_lo=ranks[r.cell.id][0], rank_hi=ranks[r.cell.id][1]) for r in single
        ]
        single = [replace(r, verdict=_verdict(r, q)) for r in single]
        cum = [replace(r, verdict=_verdict(r, q)) for r in cum]
        single.sort(key=lambda r: (-_safe(r.interval), r.cell.kind, r.cell.layer or 0))
        cum.sort(key=lambda r: (r.cell.kind, r.cell.n_layers or 0))
        ranked += single + cum
        summaries.append(_group_summary(g, single, q))
    n_tested = len(tested)
    run_ids = tuple(sorted({c.record.run_id for c in cells}))
    machines = tuple(sorted({c.record.machine.cpu if c.record.machine else "?" for c in cells}))
    identities = {}
    for c in cells:
        identities.setdefault((c.record.cell.model, c.record.cell.variant), c.record.identity)
    return Analysis(
        rows=tuple(ranked),
        errors=errors,
        groups=tuple(summaries),
        q=q,
        n_tested=n_tested,
        sentence=_headline(summaries, n_tested, q),
        identities=identities,
        sources=tuple(sources),
        machines=machines,
        run_ids=run_ids,
    )


def _safe(iv: Interval | None) -> float:
    x = _f(iv.estimate) if iv is not None else math.nan
    return x if math.isfinite(x) else -math.inf


def _group_summary(g, single: list[Row], q: float) -> GroupSummary:
    """The group's sentence. A cell *stands out* when it is above its placebo after BH, no
    cell is clearly above it, and it is clearly above at least one other cell."""
    model, variant, fmt = g
    label = f"{model} ({variant}, {fmt})"
    n = len(single)
    disc = tuple(r for r in single if r.discovery)
    leaders = tuple(r for r in disc if r.rank_lo == 1)
    standouts = tuple(r for r in leaders if n == 1 or (r.rank_hi or n) < n)
    bh = f"after Benjamini–Hochberg (q = {q:g})"
    if not single:
        sentence = f"{label}: only cumulative cells, nothing to rank."
    elif not disc:
        identical = sum(1 for r in single if r.record.treatment and r.record.treatment.identical)
        why = (
            f"all {n} cells are byte-identical to the model"
            if identical == n
            else f"none of the {n} cells is distinguishable from its placebo {bh}"
        )
        sentence = f"{label}: no layer or kind stands out — {why}."
    elif not standouts:
        some = f"all {n}" if len(disc) == n else f"{len(disc)} of {n}"
        sentence = (
            f"{label}: no layer or kind stands out — {some} cells are above their placebo "
            f"{bh}, but no cell's interval lies clearly above another's: a tie, not a ranking."
        )
    else:
        clear = max(n - r.rank_hi for r in standouts)
        above = f", clearly above {clear} other cell{'s' if clear != 1 else ''}" if clear else ""
        tie = "; tied with each other" if len(standouts) > 1 else ""
        sentence = (
            f"{label}: most sensitive {_names(standouts)}{above}{tie} "
            f"({len(disc)} of {n} cells above their placebo {bh}; overlapping intervals tie)."
        )
    return GroupSummary(model, variant, fmt, n, disc, standouts, sentence)


def _headline(groups: Sequence[GroupSummary], n_tested: int, q: float) -> str:
    """One sentence: the most sensitive layers and kinds, or that none stands out."""
    if not groups:
        return "No sweep cell was measured."
    bh = f"Benjamini–Hochberg (q = {q:g})"
    leading = [g for g in groups if g.leaders]
    n_disc = sum(len(g.discoveries) for g in groups)
    if not leading:
        if n_disc:
            return (
                f"No layer or tensor kind stands out: {n_disc} of the {n_tested} tested cells "
                f"are above their placebos after {bh}, but their intervals overlap — a tie, "
                "not a ranking."
            )
        return (
            f"No layer or tensor kind stands out: none of the {n_tested} tested cells is "
            f"distinguishable from its placebo after {bh}."
        )
    parts = [f"{_names(g.leaders)} ({g.model}, {g.variant}, {g.fmt})" for g in leading]
    quiet = [f"{g.model} {g.variant} {g.fmt}" for g in groups if not g.leaders]
    tail = f"; no layer or kind stands out in {', '.join(quiet)}" if quiet else ""
    return (
        f"Most sensitive: {'; '.join(parts)} — above their placebos after {bh} and clearly "
        f"above other cells (overlapping intervals tie){tail}."
    )


def analyze_dirs(paths: Sequence[str | Path], *, q: float = Q_DEFAULT) -> Analysis:
    cells, dirs = load_cells(paths)
    return analyze(cells, q=q, sources=dirs)


def summarize_timing(rows: Sequence[Row]) -> Mapping[str, Any]:
    """Cost per computed cell (the ones not from the cache), by variant."""
    out: dict[str, Any] = {}
    for variant in VARIANTS:
        ts = [
            r.record.timing
            for r in rows
            if r.cell.variant == variant and r.record.timing and r.record.timing.llama_s
        ]
        if not ts:
            continue
        cell_s = [t.quantize_s + t.evaluate_s for t in ts]
        llama_s = [t.llama_s for t in ts]
        out[variant] = {
            "cells": len(ts),
            "cell_s": sum(cell_s) / len(ts),
            "llama_s": sum(llama_s) / len(ts),
            "overhead": sum(cell_s) / sum(llama_s),
        }
    return out
