"""The report's charts as PNG bytes, drawn from stored results with matplotlib's Agg canvas.

Figures are built with `matplotlib.figure.Figure` (no pyplot state, no display needed: a bare
Figure's `savefig(format="png")` prints through Agg whatever the backend is), so charts can be
drawn in pytest-xdist workers and in the `fq report` command alike. A chart with nothing to
show (a stage that changed no element, a stage that never reached perplexity) comes back with
`png=None` and a note saying why, never as an empty plot. The history chart of a stage × model
is the one chart read beyond the run: every run of the same results store that measured it
(fq_core.storage.history.runs_with), drawn only when there are two.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from math import isfinite, nan
from pathlib import Path

from matplotlib.figure import Figure

from ..storage import history
from ..storage.record import Focus, StageRecord
from . import RunResults, StageResult

_SIZE = (6.4, 3.4)
_DPI = 90
TREATMENT = "#c0392b"
PLACEBO = "#7f8c8d"
BASELINE = "#2c3e50"


@dataclass(frozen=True)
class Chart:
    """One chart; `png` is None when there was nothing to draw and `note` says why."""

    key: str  # file-name safe, unique within a run
    title: str
    png: bytes | None
    note: str | None = None


def figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def chart_key(*parts: str) -> str:
    return "-".join(re.sub(r"[^A-Za-z0-9_.-]+", "_", p) for p in parts if p)


def _label(r: StageResult) -> str:
    return f"{r.model}, {r.stage_title} ({r.stage})"


def _focus(r: StageResult) -> Focus | None:
    numeric = r.record.numeric
    return numeric.focus if numeric is not None else None


def weight_distribution(r: StageResult) -> Chart:
    focus = _focus(r)
    key, title = chart_key(r.stage, r.model, "weights"), "Weight distribution before/after"
    if focus is None or not focus.hist_edges or not focus.hist_before or not focus.hist_after:
        return Chart(key, title, None, "no weight histogram was stored for this stage")
    edges, before, after, layer = focus.hist_edges, focus.hist_before, focus.hist_after, focus.layer
    fig = Figure(figsize=_SIZE)
    ax = fig.subplots()
    ax.stairs(before, edges, label="original F32", color=BASELINE, linewidth=2.2)
    ax.stairs(after, edges, label="fake-quantized", color=TREATMENT, linewidth=1.1, linestyle="--")
    ax.set_xlabel("weight value")
    ax.set_ylabel("elements")
    ax.set_title(f"{_label(r)}: layer {layer} weights", fontsize=9)
    ax.legend(fontsize=8)
    return Chart(key, f"{title} (layer {layer})", figure_png(fig))


def rel_error_histogram(r: StageResult) -> Chart:
    numeric, focus = r.record.numeric, _focus(r)
    key, title = chart_key(r.stage, r.model, "rel-error"), "Relative error of changed elements"
    edges = focus.rel_error_edges if focus is not None else ()
    counts = focus.rel_error_counts if focus is not None else ()
    if (numeric is not None and numeric.changed == 0) or (focus is not None and not any(counts)):
        return Chart(
            key, title, None, "no element changed: every selected weight was already exact"
        )
    if not edges or not counts:
        return Chart(key, title, None, "no relative-error histogram was stored for this stage")
    fig = Figure(figsize=_SIZE)
    ax = fig.subplots()
    ax.stairs(counts, edges, fill=True, color=TREATMENT, alpha=0.75)
    ax.set_xlabel("|new − old| / |old|")
    ax.set_ylabel("elements")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
    ax.set_title(f"{_label(r)}: layer {focus.layer}", fontsize=9)
    return Chart(key, title, figure_png(fig))


def per_layer_max_rel_error(r: StageResult, threshold: float | None = None) -> Chart:
    numeric = r.record.numeric
    per_tensor = [
        t for t in (numeric.per_tensor if numeric is not None else ()) if t.layer is not None
    ]
    key, title = chart_key(r.stage, r.model, "per-layer"), "Max relative error per layer"
    if not per_tensor:
        return Chart(key, title, None, "no per-tensor errors were stored for this stage")
    if not any(t.changed for t in per_tensor):
        return Chart(key, title, None, "no element changed in any layer: nothing to compare")
    layers = [t.layer for t in per_tensor]
    # None: an unchanged tensor, drawn at 0; NaN/inf draw no bar
    values = [0.0 if t.max_rel is None else t.max_rel for t in per_tensor]
    fig = Figure(figsize=_SIZE)
    ax = fig.subplots()
    ax.bar(layers, values, color=TREATMENT, alpha=0.8, label="max relative error")
    threshold = threshold if threshold is not None else r.record.thresholds.max_rel_error
    if threshold:
        ax.axhline(threshold, color="black", linestyle=":", label=f"threshold {threshold:g}")
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("max |rel error|")
    ax.set_title(_label(r), fontsize=9)
    ax.legend(fontsize=8)
    return Chart(key, title, figure_png(fig))


def chunk_ppl(r: StageResult) -> Chart:
    b, t = r.record.baseline, r.record.treatment
    base = [nan if x is None else x for x in (b.chunk_ppls if b is not None else ())]
    treat = [nan if x is None else x for x in (t.chunk_ppls if t is not None else ())]
    key, title = (
        chart_key(r.stage, r.model, "chunk-ppl"),
        "Per-chunk PPL, baseline vs fake-quantized",
    )
    if not base or not treat:
        return Chart(key, title, None, "no per-chunk perplexities were stored for this stage")
    fig = Figure(figsize=_SIZE)
    ax = fig.subplots()
    ax.plot(range(1, len(base) + 1), base, marker="o", color=BASELINE, label="baseline")
    ax.plot(range(1, len(treat) + 1), treat, marker="x", color=TREATMENT, label="fake-quantized")
    ax.set_xlabel("chunk (running PPL as llama-perplexity prints it)")
    ax.set_ylabel("PPL")
    ax.set_title(_label(r), fontsize=9)
    ax.legend(fontsize=8)
    return Chart(key, title, figure_png(fig))


def _placebo_band(ax, xs: Sequence[float], lows: Sequence[float], highs: Sequence[float]) -> None:
    label = "placebo range (min–max over seeds)"
    if len(xs) == 1:
        x = xs[0]
        ax.fill_between(
            [x - 0.5, x + 0.5], lows[0], highs[0], color=PLACEBO, alpha=0.3, label=label
        )
    else:
        ax.fill_between(xs, lows, highs, color=PLACEBO, alpha=0.3, label=label, step=None)


# (key, label, treatment value, placebo range, per-seed value) of the cross-stage charts
_EFFECTS: tuple[tuple[str, str, Callable, Callable, Callable], ...] = (
    (
        "delta-ppl",
        "ΔPPL %",
        lambda t: t.delta_ppl_pct,
        lambda p: p.delta_ppl_pct,
        lambda run: run.delta_ppl_pct,
    ),
    (
        "kld",
        "mean KLD",
        lambda t: t.kld.mean if t.kld is not None else None,
        lambda p: p.kld_mean,
        lambda run: run.kld_mean,
    ),
)


def effect_vs_layers(results: Iterable[StageResult], model: str) -> tuple[Chart, Chart]:
    """ΔPPL % and mean KLD against the number of quantized layers, placebo band behind."""
    rows = [r for r in results if r.n_layers and r.record.treatment is not None]
    out = []
    for metric, label, pick, band_of, seed_of in _EFFECTS:
        key, title = chart_key(model, metric, "vs-layers"), f"{label} against quantized layers"
        pts = [(r.n_layers, pick(r.record.treatment), r) for r in rows]
        pts = [(n, v, r) for n, v, r in pts if v is not None]
        pts = sorted((p for p in pts if isfinite(p[1])), key=lambda p: p[0])
        if not pts:
            out.append(Chart(key, title, None, "no stage reached the perplexity run"))
            continue
        fig = Figure(figsize=_SIZE)
        ax = fig.subplots()
        placebos = [(n, r.record.placebo) for n, _, r in pts if r.record.placebo is not None]
        band = [(n, band_of(p)) for n, p in placebos if band_of(p) is not None]
        seeds = [(n, seed_of(run)) for n, p in placebos for run in p.runs]
        seeds = [(n, v) for n, v in seeds if v is not None]
        seeds = [(n, v) for n, v in seeds if isfinite(v)]
        if seeds:
            ax.scatter(
                [n for n, _ in seeds],
                [v for _, v in seeds],
                marker="_",
                s=200,
                color=PLACEBO,
                label="placebo seeds",
                zorder=2,
            )
        if band:
            _placebo_band(
                ax, [n for n, _ in band], [b.min for _, b in band], [b.max for _, b in band]
            )
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            color=TREATMENT,
            label="BF16 treatment",
            zorder=3,
        )
        for n, v, r in pts:
            ax.annotate(r.stage, (n, v), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if metric == "delta-ppl":
            ax.axhline(0, color="black", linewidth=0.6)
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, 0.0), max(hi, 0.0))  # zero in view: the ratio to the placebo shows
        ax.set_xlabel("number of quantized layers")
        ax.set_ylabel(label)
        ax.set_title(
            f"{model}: {label} by stage" + ("" if band else " (placebo not run)"), fontsize=9
        )
        ax.legend(fontsize=8)
        out.append(Chart(key, title, figure_png(fig)))
    return out[0], out[1]


def stage_charts(r: StageResult) -> tuple[Chart, ...]:
    """The charts that belong to one stage × model."""
    return (
        weight_distribution(r),
        rel_error_histogram(r),
        per_layer_max_rel_error(r),
        chunk_ppl(r),
    )


@dataclass(frozen=True)
class HistoryPoint:
    """One run's record of a stage × case, as the history chart plots it."""

    run_id: str
    started_at: str
    record: StageRecord


def history_points(root: Path, stage: str, case: str) -> tuple[HistoryPoint, ...]:
    """Every run under the results root with a measured record of this stage × case, oldest
    first (fq_core.storage.history.runs_with: unreadable and unmeasured records are passed over)."""
    found = [
        HistoryPoint(src.run_id or src.path.name, rec.started_at, rec)
        for src, rec in history.runs_with(stage, case, root)
    ]
    return tuple(reversed(found))


_MAX_TICKS = 10


def _tick(p: HistoryPoint) -> str:
    when = p.started_at[:16].replace("T", " ")
    return p.run_id if p.run_id.startswith(p.started_at[:4]) else f"{p.run_id}\n{when}"


# (label, the treatment's value and its error, the placebo's min–max) of the history panels
_HISTORY: tuple[tuple[str, Callable, Callable, Callable], ...] = (
    (
        "mean KLD",
        lambda t: t.kld.mean if t.kld is not None else None,
        lambda t: t.kld.mean_err if t.kld is not None else None,
        lambda p: p.kld_mean,
    ),
    ("ΔPPL %", lambda t: t.delta_ppl_pct, lambda t: t.delta_ppl_pct_err, lambda p: p.delta_ppl_pct),
)


def _finite(x) -> float | None:
    return x if x is not None and isfinite(x) else None


def history_chart(
    r: StageResult,
    root: Path,
    *,
    points: Sequence[HistoryPoint] | None = None,
    reference_run: str | None = None,
) -> Chart | None:
    """Mean KLD and ΔPPL % of one stage × case over every run in the results store, each
    run's placebo min–max as a grey band behind its point. None with fewer than two runs."""
    pts = tuple(points) if points is not None else history_points(root, r.stage, r.model)
    if len(pts) < 2:
        return None
    key, title = chart_key(r.stage, r.model, "history"), "Mean KLD and ΔPPL % over the runs"
    xs = list(range(len(pts)))
    fig = Figure(figsize=(_SIZE[0], 5.2))
    axes = fig.subplots(2, 1, sharex=True)
    for ax, (label, pick, err_of, band_of) in zip(axes, _HISTORY, strict=True):
        banded = False
        vals: list[tuple[int, float, float | None]] = []
        for x, p in zip(xs, pts, strict=True):
            t, pl = p.record.treatment, p.record.placebo
            band = band_of(pl) if pl is not None else None
            lo, hi = (_finite(band.min), _finite(band.max)) if band is not None else (None, None)
            if lo is not None and hi is not None:
                ax.bar(
                    x,
                    hi - lo,
                    bottom=lo,
                    width=0.6,
                    color=PLACEBO,
                    alpha=0.3,
                    label=None if banded else "placebo range (min–max over seeds)",
                )
                banded = True
            v = _finite(pick(t)) if t is not None else None
            if v is not None:
                vals.append((x, v, _finite(err_of(t))))
        if vals:
            errs = [e if e is not None else 0.0 for _, _, e in vals]
            ax.errorbar(
                [x for x, _, _ in vals],
                [v for _, v, _ in vals],
                yerr=errs,
                marker="o",
                color=TREATMENT,
                capsize=3,
                label="treatment (± s.e.)",
                zorder=3,
            )
        for x, p in zip(xs, pts, strict=True):
            if p.run_id == reference_run:
                ax.axvline(x, color=BASELINE, linestyle=":", linewidth=1, label="reference run")
        if pts[-1].run_id == r.record.run_id:
            ax.axvspan(xs[-1] - 0.4, xs[-1] + 0.4, color=TREATMENT, alpha=0.06)
        if label.startswith("Δ"):
            ax.axhline(0, color="black", linewidth=0.6)
        if not vals:
            ax.text(
                0.5,
                0.5,
                f"no run measured {label}",
                transform=ax.transAxes,
                ha="center",
                va="center",
                fontsize=8,
                color=PLACEBO,
            )
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, 0.0), max(hi, 0.0))  # zero in view, as in the by-stage charts
        ax.set_ylabel(label)
    handles = [h for ax in axes for h in ax.get_legend_handles_labels()[0]]
    if handles:
        by_label = {}
        for ax in axes:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                by_label.setdefault(lab, h)
        axes[0].legend(by_label.values(), by_label.keys(), fontsize=7)
    step = -(-len(pts) // _MAX_TICKS)  # at most _MAX_TICKS labels; the newest always named
    ticks = sorted(set(xs[::step]) | {xs[-1]})
    if len(ticks) > 1 and ticks[-1] - ticks[-2] < step:
        ticks.pop(-2)
    axes[-1].set_xticks(
        ticks,
        [_tick(pts[x]) for x in ticks],
        rotation=30 if len(ticks) > 3 else 0,
        ha="right" if len(ticks) > 3 else "center",
        fontsize=7,
    )
    axes[-1].set_xlabel("run (oldest first; shaded: this run)")
    axes[0].set_title(f"{_label(r)}: {len(pts)} runs", fontsize=9)
    return Chart(key, f"{title} ({len(pts)} runs)", figure_png(fig))


def run_charts(run: RunResults) -> dict[str, tuple[Chart, ...]]:
    """Every chart of a run, keyed by "<stage>/<model>" and "<model>" for the cross-stage ones.
    A stage × model measured in two runs or more of the results store also gets its history
    chart (mean KLD and ΔPPL % run by run)."""
    charts: dict[str, tuple[Chart, ...]] = {}
    for model in run.models:
        charts[model] = effect_vs_layers(run.for_model(model), model)
        for r in run.for_model(model):
            ref = r.comparison.reference_run_id if r.comparison is not None else None
            past = history_chart(r, run.results_root, reference_run=ref)
            charts[f"{r.stage}/{model}"] = stage_charts(r) + ((past,) if past else ())
    return charts


def write_charts(charts: Iterable[Chart], out_dir: Path, *, prune: bool = False) -> list[Path]:
    """Write the drawable charts as `<key>.png`; the written paths, in order. `prune`: the
    directory is the report's own, so a PNG this report no longer draws is removed (a
    rewritten report never sits beside stale charts)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for chart in charts:
        if chart.png is None:
            continue
        path = out_dir / f"{chart.key}.png"
        tmp = path.with_suffix(".png.tmp")
        tmp.write_bytes(chart.png)
        tmp.replace(path)
        paths.append(path)
    if prune:
        for stale in set(out_dir.glob("*.png")) - set(paths):
            stale.unlink(missing_ok=True)
    return paths
