"""The sensitivity report: which layers, kinds and formats matter, from stored sweep cells.

Renders an `Analysis` its caller made (`fq_core.experiment.sweep.analysis.analyze_dirs`: the
cells of one or more results directories, the shards of one sweep, merged and checked, then
Benjamini–Hochberg, rank ranges, the sentence, the cost per cell), so the report reads no
cells and computes nothing. This module only draws and renders:

- a heatmap per model × variant × format: layers × kinds of the effect (mean KLD) and of the
  effect against the noise (effect / floor), discoveries starred;
- per kind, the per-layer curve (each layer alone, with its interval) over the placebo band,
  and the cumulative curve (first 1, 2, 4, … N layers);
- the ranked table (rank ranges: overlapping intervals are ties), and the one sentence.

`sensitivity.html` is self-contained (charts as base64 PNG); `sensitivity.md` links
`charts/sensitivity-*.png`; `sensitivity.json` holds the numbers (what merged shards must
reproduce). Written with fq_core.platform.atomic, each file replaced in one step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.colors import LogNorm, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from ..definitions.formats import LLAMA_TYPES
from ..experiment.sweep.analysis import Analysis, SweepRow
from ..figures import interval, sci
from ..platform import atomic
from ..storage import codec
from .charts import PLACEBO, TREATMENT, Chart, chart_key, figure_png
from .render import render

HTML = "sensitivity.html"
MARKDOWN = "sensitivity.md"
NUMBERS = "sensitivity.json"
CHARTS = "charts"
_DPI_SIZE = (7.2, 3.4)


# --- display rows -----------------------------------------------------------------------------


def _p(x: float | None) -> str:
    if x is None:
        return "—"
    return "< 1e-6" if x < 1e-6 else f"{x:.2g}"


def _chunks(rec) -> str:
    """'2 · far above' for a cell run until decided ('6 · far above at 2' when its treatment
    went on to the ranking's chunks after the placebo rested), else its fixed count."""
    t = rec.treatment
    n = len(t.chunk_klds) if t is not None and t.chunk_klds else 0
    s = rec.sequential
    if s is not None:
        return f"{n} · {s.stop} at {s.n_chunks}" if n > s.n_chunks else f"{s.n_chunks} · {s.stop}"
    return str(n) if n else "—"


def _rank(r: SweepRow) -> str:
    if r.rank_lo is None:
        return "—"
    return str(r.rank_lo) if r.rank_lo == r.rank_hi else f"{r.rank_lo}–{r.rank_hi}"


@dataclass(frozen=True)
class RowView:
    id: str
    rank: str
    label: str
    series: str
    changed: str
    effect: str
    placebo: str
    floor: str
    excess: str
    ratio: str
    chunks: str  # chunks used, and why a cell run until decided stopped there
    p: str
    q: str
    verdict: str
    discovery: bool
    cached: bool
    stored: str = "—"  # bytes in the model file → stored as the format
    saved: str = "—"  # bytes saved against the model file (negative: it grows)
    per_mb: str = "—"  # mean KLD per MB saved (lower: the better trade)


def _storage(rec) -> tuple[str, str, str, float]:
    """(stored, saved, KLD per MB saved, the sort key) of a cell that llama.cpp can store."""
    num, t = rec.numeric, rec.treatment
    if num is None or num.bytes_model is None or num.bytes_format is None:
        return "—", "—", "—", math.inf
    saved = num.bytes_model - num.bytes_format
    stored = f"{num.bytes_model:,} → {num.bytes_format:,}"
    kld = t.kld_mean if t is not None and t.kld_mean is not None else math.nan
    if saved <= 0 or not math.isfinite(kld):
        return stored, f"{saved:,}", "—", math.inf
    per_mb = kld / (saved / 1e6)
    return stored, f"{saved:,}", sci(per_mb), per_mb


def row_view(r: SweepRow) -> RowView:
    rec = r.record
    res, t, num = rec.resolution, rec.treatment, rec.numeric
    pl = [p.kld_mean for p in rec.placebo if p.kld_mean is not None]
    placebo = (
        (sci(min(pl)) if len(pl) == 1 or min(pl) == max(pl) else f"{sci(min(pl))} … {sci(max(pl))}")
        if pl
        else "—"
    )
    ratio = res.ratio if res is not None and res.ratio is not None else math.nan
    stored, saved, per_mb, _ = _storage(rec)
    return RowView(
        id=rec.cell.id,
        rank=_rank(r),
        label=r.label,
        series=rec.cell.series,
        changed=f"{num.changed:,}/{num.n_elements:,}" if num else "—",
        effect=interval(res.effect) if res and res.effect else (sci(t.kld_mean) if t else "—"),
        placebo=placebo,
        floor=sci(res.floor) if res is not None and res.floor is not None else "—",
        excess=interval(res.excess) if res else "—",
        ratio=f"{ratio:.2f}×" if math.isfinite(ratio) else "—",
        chunks=_chunks(rec),
        p=_p(rec.p_value),
        q=_p(r.q_value),
        verdict=r.verdict,
        discovery=bool(r.discovery),
        cached=rec.cached,
        stored=stored,
        saved=saved,
        per_mb=per_mb,
    )


@dataclass(frozen=True)
class GroupView:
    key: str
    title: str
    sentence: str
    ranked: tuple[RowView, ...]
    cumulative: tuple[RowView, ...]
    charts: tuple[Chart, ...]
    # cells llama.cpp can store, fewest KLD per MB saved first (empty: none, e.g. fp8)
    storage: tuple[RowView, ...] = ()


# --- charts -------------------------------------------------------------------------------------


def _value(r: SweepRow) -> float:
    t = r.record.treatment
    return math.nan if t is None or t.kld_mean is None else t.kld_mean


def heatmap(key: str, title: str, rows: Sequence[SweepRow]) -> Chart:
    """Layers × kinds: the effect (mean KLD) and the effect against the noise (÷ floor)."""
    single = [r for r in rows if r.cell.series != "cumulative"]
    if not single:
        return Chart(key, title, None, "no single-layer cells to map")
    kinds = list(dict.fromkeys(r.cell.kind for r in single))
    layers = sorted({r.cell.layer for r in single if r.cell.layer is not None})
    whole = any(r.cell.layer is None for r in single)
    cols = [str(n) for n in layers] + (["no layer"] if whole else [])
    idx = {c: i for i, c in enumerate(cols)}
    import numpy as np

    effect = np.full((len(kinds), len(cols)), np.nan)
    ratio = np.full_like(effect, np.nan)
    marks: list[tuple[int, int, str]] = []
    for r in single:
        i, j = (
            kinds.index(r.cell.kind),
            idx["no layer" if r.cell.layer is None else str(r.cell.layer)],
        )
        res = r.record.resolution
        v = _value(r)
        effect[i, j] = v if v > 0 else np.nan
        rt = res.ratio if res is not None and res.ratio is not None else math.nan
        ratio[i, j] = rt if rt > 0 else np.nan
        if r.record.treatment is not None and r.record.treatment.identical:
            marks.append((i, j, "="))
        elif r.discovery:
            marks.append((i, j, "*"))
    w = max(6.4, 0.42 * len(cols) + 3.0)
    h = max(3.4, 2 * (0.38 * len(kinds) + 1.2))
    fig = Figure(figsize=(w, h))
    axes = fig.subplots(2, 1)
    for ax, grid, which in zip(axes, (effect, ratio), ("effect", "ratio"), strict=True):
        finite = grid[np.isfinite(grid)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if which == "effect":  # KLDs span decades across kinds and variants: log when they do
            cmap, label = "viridis", "mean KLD (effect)"
            norm = LogNorm(vmin=lo, vmax=hi) if lo > 0 and hi / lo > 10 else None
        else:  # blue: within the placebos' floor, red: above it
            cmap, label = "RdBu_r", "effect / floor"
            norm = TwoSlopeNorm(vcenter=1.0, vmin=min(lo, 0.99), vmax=max(hi, 1.01))
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, norm=norm)
        cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
        cb.set_label(label, fontsize=7)
        cb.ax.tick_params(labelsize=6, which="both")
        cb.ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks(range(len(kinds)), kinds, fontsize=7)
        ax.set_xticks(range(len(cols)), cols, fontsize=7)
        for i, j, m in marks:
            ax.text(
                j, i, m, ha="center", va="center", color="black", fontsize=11, fontweight="bold"
            )
    axes[1].set_xlabel("layer (* above its placebo after BH; = byte-identical file)", fontsize=7)
    axes[0].set_title(title, fontsize=9)
    return Chart(key, title, figure_png(fig))


def _band(ax, xs, rows: Sequence[SweepRow]) -> None:
    lows, highs = [], []
    for r in rows:
        vals = [p.kld_mean for p in r.record.placebo if p.kld_mean is not None]
        vals = [v for v in vals if math.isfinite(v)]
        lows.append(min(vals) if vals else math.nan)
        highs.append(max(vals) if vals else math.nan)
    if any(math.isfinite(v) for v in lows):
        if len(xs) == 1:
            xs, lows, highs = [xs[0] - 0.4, xs[0] + 0.4], lows * 2, highs * 2
        ax.fill_between(
            xs, lows, highs, color=PLACEBO, alpha=0.3, label="placebo range (min–max over seeds)"
        )


def _errorbars(ax, xs, rows: Sequence[SweepRow], label: str) -> None:
    ys, lo, hi = [], [], []
    for r in rows:
        res = r.record.resolution
        v = _value(r)
        iv = res.effect if res is not None else None
        low = iv.low if iv is not None and iv.low is not None else v
        high = iv.high if iv is not None and iv.high is not None else v
        ys.append(v)
        lo.append(max(0.0, v - low))
        hi.append(max(0.0, high - v))
    ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", color=TREATMENT, capsize=3, label=label, zorder=3)
    found = [(x, y) for x, y, r in zip(xs, ys, rows, strict=True) if r.discovery]
    if found:
        ax.scatter(
            [x for x, _ in found],
            [y for _, y in found],
            marker="*",
            s=120,
            color="black",
            zorder=4,
            label="above placebo (BH)",
        )


def _scale(ax, rows: Sequence[SweepRow]) -> None:
    vals = [_value(r) for r in rows] + [
        p.kld_mean for r in rows for p in r.record.placebo if p.kld_mean is not None
    ]
    vals = [v for v in vals if math.isfinite(v) and v > 0]
    if vals and max(vals) / min(vals) > 30:
        ax.set_yscale("log")


def _excess_panel(ax, xs, rows: Sequence[SweepRow]) -> None:
    """What the ranking compares: treatment − mean placebo, paired per chunk, with its
    interval; zero = no more than the engine's own noise."""
    ys, lo, hi = [], [], []
    for r in rows:
        iv = r.record.resolution.excess if r.record.resolution is not None else None
        v = iv.estimate if iv is not None and iv.estimate is not None else math.nan
        low = iv.low if iv is not None and iv.low is not None else v
        high = iv.high if iv is not None and iv.high is not None else v
        ys.append(v)
        lo.append(max(0.0, v - low) if math.isfinite(v) else 0.0)
        hi.append(max(0.0, high - v) if math.isfinite(v) else 0.0)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.errorbar(
        xs,
        ys,
        yerr=[lo, hi],
        fmt="s",
        color=TREATMENT,
        capsize=3,
        markersize=4,
        label="excess over placebo, paired (95% interval)",
    )
    ax.set_ylabel("excess KLD", fontsize=8)
    ax.legend(fontsize=7)


def layer_curve(key: str, title: str, rows: Sequence[SweepRow], fmt: str) -> Chart:
    rows = sorted((r for r in rows if r.cell.series == "layer"), key=lambda r: r.cell.layer)
    if len(rows) < 2:
        return Chart(key, title, None, "fewer than two single-layer cells: no curve")
    xs = [r.cell.layer for r in rows]
    fig = Figure(figsize=(_DPI_SIZE[0], _DPI_SIZE[1] * 1.6))
    ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    _band(ax, xs, rows)
    _errorbars(ax, xs, rows, f"{fmt}, one layer alone (95% interval)")
    _scale(ax, rows)
    ax.set_ylabel("mean KLD")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    _excess_panel(ax2, xs, rows)
    ax2.set_xlabel("layer")
    ax2.set_xticks(xs)
    for a in (ax, ax2):
        a.tick_params(labelsize=7)
    return Chart(key, title, figure_png(fig))


def cumulative_curve(key: str, title: str, rows: Sequence[SweepRow], fmt: str) -> Chart:
    layer_rows = sorted((r for r in rows if r.cell.series == "layer"), key=lambda r: r.cell.layer)
    cum = sorted((r for r in rows if r.cell.series == "cumulative"), key=lambda r: r.cell.n_layers)
    if not cum:
        return Chart(key, title, None, "no cumulative cells (fq_sweep_cumulative off)")
    pts = ([layer_rows[0]] if layer_rows else []) + cum
    xs = [r.cell.n_layers or 1 for r in pts]
    fig = Figure(figsize=_DPI_SIZE)
    ax = fig.subplots()
    _band(ax, xs, pts)
    _errorbars(ax, xs, pts, f"{fmt}, first n layers (95% interval)")
    _scale(ax, pts)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("layers quantized (first n)")
    ax.set_ylabel("mean KLD")
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return Chart(key, title, figure_png(fig))


def group_views(analysis: Analysis) -> tuple[GroupView, ...]:
    views = []
    for g in analysis.groups:
        rows = [r for r in analysis.rows if r.group == (g.model, g.variant, g.fmt)]
        name = f"{g.model}, {g.variant}, {g.fmt}"
        charts = [
            heatmap(
                chart_key("sensitivity", g.model, g.variant, g.fmt, "heatmap"),
                f"{name}: layers × kinds",
                rows,
            )
        ]
        for kind in dict.fromkeys(r.cell.kind for r in rows):
            kr = [r for r in rows if r.cell.kind == kind]
            slug = chart_key("sensitivity", g.model, g.variant, g.fmt, kind)
            charts.append(
                layer_curve(f"{slug}-layers", f"{name}: {kind}, each layer alone", kr, g.fmt)
            )
            charts.append(
                cumulative_curve(f"{slug}-cumulative", f"{name}: {kind}, more layers", kr, g.fmt)
            )
        views.append(
            GroupView(
                key=chart_key(g.model, g.variant, g.fmt),
                title=name,
                sentence=g.sentence,
                ranked=tuple(row_view(r) for r in rows if r.cell.series != "cumulative"),
                cumulative=tuple(row_view(r) for r in rows if r.cell.series == "cumulative"),
                charts=tuple(charts),
                storage=tuple(
                    row_view(r)
                    for r in sorted(rows, key=lambda r: _storage(r.record)[3])
                    if r.record.numeric and r.record.numeric.bytes_format is not None
                ),
            )
        )
    return tuple(views)


# --- rendering ----------------------------------------------------------------------------------


def _context(analysis: Analysis, groups: Sequence[GroupView]) -> dict:
    identities = []
    for (model, variant), ident in sorted(analysis.identities.items()):
        s = ident.settings
        seeds = ", ".join(map(str, s.get("placebo_seeds", ()))) or "none"
        identities.append(
            {
                "model": model,
                "variant": variant,
                "model_sha256": ident.model_sha256,
                "measured_sha256": ident.measured_sha256,
                "corpus_sha256": ident.corpus_sha256,
                "llama_version": ident.llama_version
                + (f" (build {ident.llama_build[:12]})" if ident.llama_build else ""),
                "settings": f"ctx {s['ctx']}, batch {s['batch']}, {s['chunks']} chunks "
                f"(KLD {s['kld_chunks']}), engine {s['engine']}, placebo seeds {seeds}"
                + (f", twin {s['twin_dtype']}" if s.get("twin_dtype") else ""),
            }
        )
    cost = [
        {
            "variant": v,
            "cells": c["cells"],
            "cell_s": f"{c['cell_s']:.1f} s",
            "llama_s": f"{c['llama_s']:.1f} s",
            "overhead": f"{c['overhead']:.3f}×",
        }
        for v, c in analysis.timing.items()
    ]
    n = len(analysis.rows)
    cached = sum(1 for r in analysis.rows if r.record.cached)
    when = sorted(
        r.record.measured_at for r in analysis.rows if r.record.cached and r.record.measured_at
    )
    cached_when = (
        ""
        if not when
        else f", measured {when[0]}" + (f" … {when[-1]}" if when[-1] != when[0] else "")
    )
    remade = [r for r in analysis.rows if r.record.rejected]
    return {
        "cached_when": cached_when,
        "remade": [{"id": r.cell.id, "why": r.record.rejected} for r in remade],
        "a": analysis,
        "groups": groups,
        "identities": identities,
        "cost": cost,
        "n_cells": n,
        "n_cached": cached,
        "sources": [str(s) for s in analysis.sources],
        "errors": [{"id": r.cell.id, "error": r.record.error} for r in analysis.errors],
        "undeployable": _undeployable(analysis),
        "real": any(
            r.cell.variant == "deployed" and r.cell.format in LLAMA_TYPES
            for r in (*analysis.rows, *analysis.undeployable)
        ),
    }


def _undeployable(analysis: Analysis) -> list[dict]:
    """Real files llama.cpp cannot run, one line per reason: the cells and llama.cpp's words."""
    by_why: dict[str, list[str]] = {}
    for r in analysis.undeployable:
        by_why.setdefault(r.verdict, []).append(r.cell.id)
    return [{"why": why, "ids": ids} for why, ids in by_why.items()]


def render_files(analysis: Analysis) -> dict[str, bytes]:
    """{path relative to the output directory: bytes}: both reports, the numbers, the charts."""
    groups = group_views(analysis)
    ctx = _context(analysis, groups)
    links = {c.key: f"{CHARTS}/{c.key}.png" for g in groups for c in g.charts if c.png}
    files = {f"{CHARTS}/{c.key}.png": c.png for g in groups for c in g.charts if c.png}
    files[HTML] = render("sensitivity.html.j2", **ctx).encode("utf-8")
    files[MARKDOWN] = render("sensitivity.md.j2", links=links, **ctx).encode("utf-8")
    files[NUMBERS] = (codec.dumps(analysis.to_json(), indent=1, ensure_ascii=False) + "\n").encode(
        "utf-8"
    )
    return files


def section_html(analysis: Analysis) -> str:
    """The sensitivity section of the main (pytest-html) report: one fragment."""
    groups = group_views(analysis)
    return render("sensitivity.section.html.j2", **_context(analysis, groups))


@dataclass(frozen=True)
class SensitivityReport:
    html: Path
    markdown: Path
    numbers: Path
    charts: tuple[Path, ...]
    analysis: Analysis


def write_report(analysis: Analysis, output_dir: str | Path) -> SensitivityReport:
    """Write sensitivity.html / .md / .json and charts/sensitivity-*.png into output_dir."""
    files = render_files(analysis)
    out = atomic.check_directory(output_dir)
    with atomic.output_errors(out):
        for rel, data in files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            atomic.write_bytes(out / rel, data, force=True)
    charts = tuple(out / rel for rel in files if rel.startswith(f"{CHARTS}/"))
    return SensitivityReport(out / HTML, out / MARKDOWN, out / NUMBERS, charts, analysis)
