"""The sweep's analysis over every cell of a report: the cells of one or more results
directories (the shards of one sweep) merged and checked to belong together, then the false
discovery rate controlled with Benjamini–Hochberg, cells ranked with rank *ranges* (a cell is
only above another when their excess intervals do not overlap: overlapping intervals are
ties) and the one sentence naming the most sensitive layers and kinds, or saying that none
stands out. The report renders what this returns."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgspec

from ...definitions.settings import default
from ...errors import BadInput
from ...measurement.selection import format_layers
from ...storage.cell_record import (
    CELLS_DIR,
    NOT_DEPLOYABLE,
    SWEEP_DIR,
    CellInfo,
    CellRecord,
    read_cell,
)
from ...storage.identity import Identity
from ...storage.record import VARIANTS, Interval
from .plan import Cell, sort_key

Q_DEFAULT = default("fq_sweep_fdr")  # Benjamini–Hochberg false discovery rate


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
class SweepRow:
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
    discoveries: tuple[SweepRow, ...]
    leaders: tuple[SweepRow, ...]  # discoveries nothing is clearly above, clearly above another
    sentence: str


@dataclass(frozen=True)
class Analysis:
    rows: tuple[SweepRow, ...]  # every measured cell, ranked cells first, by group and rank
    errors: tuple[SweepRow, ...]  # cells whose measurement failed (named in the report)
    groups: tuple[GroupSummary, ...]
    q: float
    n_tested: int  # cells with a p-value: the Benjamini–Hochberg family
    sentence: str
    identities: dict[tuple[str, str], Identity]
    sources: tuple[Path, ...]
    machines: tuple[str, ...]
    run_ids: tuple[str, ...]
    # real files llama.cpp cannot run: their answer is its line (named in the report)
    undeployable: tuple[SweepRow, ...] = ()

    @property
    def empty(self) -> bool:
        """No cell to report (a recipe's pricing cells are not the sweep's)."""
        return not (self.rows or self.errors or self.undeployable)

    @property
    def timing(self) -> Mapping[str, Any]:
        """The cost per computed cell, so the report shows it without computing it."""
        return summarize_timing(self.rows)

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
            "not_deployable": [{"id": r.cell.id, "why": r.record.error} for r in self.undeployable],
            "identities": {
                f"{m}/{v}": msgspec.to_builtins(i) for (m, v), i in sorted(self.identities.items())
            },
        }


def _rank_ranges(rows: Sequence[SweepRow]) -> dict[str, tuple[int, int]]:
    """Rank ranges by non-overlapping intervals: above = cells whose lower bound lies above
    this one's upper bound. Overlapping intervals are ties, so a rank is often a range."""
    ivs = {}
    for r in rows:
        iv = r.interval
        est = iv.estimate if iv is not None and iv.estimate is not None else math.nan
        lo = iv.low if iv is not None and iv.low is not None else est
        hi = iv.high if iv is not None and iv.high is not None else est
        ivs[r.cell.id] = (lo, hi)
    n = len(rows)
    by_id = {r.cell.id: r for r in rows}

    def clearly_above(a: str, b: str) -> bool:
        paired = _paired_above(by_id[a], by_id[b])
        return paired if paired is not None else ivs[a][0] > ivs[b][1]

    out = {}
    for cid in ivs:
        above = sum(1 for o in ivs if o != cid and clearly_above(o, cid))
        below = sum(1 for o in ivs if o != cid and clearly_above(cid, o))
        out[cid] = (1 + above, n - below)
    return out


def _paired_above(a: SweepRow, b: SweepRow) -> bool | None:
    """Whether a's KLD is clearly above b's, compared on the chunks both used (cells run until
    decided stop at different counts): the per-chunk log ratios of their treatment KLDs (same
    baseline, same tokens: paired). Cells whose rule fixed their treatment's chunks in advance
    (rank_chunks) are compared on those first chunks with a paired t-interval (a fixed n:
    valid as any fixed design); otherwise on the chunks they share, bounded by the cells'
    confidence sequence with σ√2 (two cells' spreads). None when either cell was not run
    until decided: the intervals decide."""
    sa, sb = a.record.sequential, b.record.sequential
    ta, tb = a.record.treatment, b.record.treatment
    if sa is None or sb is None or ta is None or tb is None:
        return None
    from ...measurement.sequential import Rule

    pairs = [(x, y) for x, y in zip(ta.chunk_klds, tb.chunk_klds, strict=False) if x and y]
    if not pairs or any(not (x > 0 and y > 0) for x, y in pairs):
        return None
    fixed = min(int(sa.rule.get("rank_chunks", 0)), int(sb.rule.get("rank_chunks", 0)))
    if fixed >= 2 and len(pairs) >= fixed:
        return _t_low([math.log(x / y) for x, y in pairs[:fixed]]) > 0
    diff = [math.log(x / y) for x, y in pairs]
    rule = Rule(**{**sa.rule, "sigma": sa.rule["sigma"] * math.sqrt(2)})
    return math.fsum(diff) / len(diff) - rule.half_width(len(diff)) > 0


def _t_low(values: Sequence[float]) -> float:
    """The lower bound of the two-sided 95 % t-interval of the mean (the ranks' level)."""
    from scipy import stats as sps

    n = len(values)
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean - float(sps.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def _names(rows: Sequence[SweepRow]) -> str:
    """'ffn_norm layers 0-3, 6 and 8-9; attn_norm layer 2'"""
    by_kind: dict[str, list[SweepRow]] = {}
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


def _verdict(r: SweepRow, q: float) -> str:
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
    from .. import stats

    cells = [c for c in cells if c.record.cell.series != "group"]  # a recipe's prices
    measured = [SweepRow(c.path, c.record) for c in cells if c.record.status == "measured"]
    errors = tuple(
        SweepRow(c.path, c.record, verdict=f"error: {c.record.error}")
        for c in cells
        if c.record.status not in ("measured", NOT_DEPLOYABLE)
    )
    undeployable = tuple(
        SweepRow(c.path, c.record, verdict=c.record.error or NOT_DEPLOYABLE)
        for c in cells
        if c.record.status == NOT_DEPLOYABLE
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

    groups: dict[tuple[str, str, str], list[SweepRow]] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    ranked: list[SweepRow] = []
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
        undeployable=undeployable,
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
    x = iv.estimate if iv is not None and iv.estimate is not None else math.nan
    return x if math.isfinite(x) else -math.inf


def _group_summary(g, single: list[SweepRow], q: float) -> GroupSummary:
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


def summarize_timing(rows: Sequence[SweepRow]) -> Mapping[str, Any]:
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
