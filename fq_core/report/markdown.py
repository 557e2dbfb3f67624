"""`fq report RESULTS_DIR OUTPUT_DIR`: the plan's markdown reports from a stored run.

`test1_results.md` is the gate decision and its evidence; `experiment_results.md` compares
all stages. Both link the same PNG charts (written to OUTPUT_DIR/charts/). A run with only
Test 1 is normal (`pytest -k layer0`): the experiment report then says stages 2–4 have no
results instead of failing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import OutputRefused
from ..figures import figure
from . import GATE_STAGE, RunResults, StageResult, decisions, load_run, resolve_run_dir
from . import charts as charts_mod
from .html import _divergence, delta_vs_placebo, kld_vs_placebo, same_top_vs_placebo

_M = "—"


@dataclass(frozen=True)
class MarkdownReports:
    test1: Path
    experiment: Path
    charts: tuple[Path, ...]
    run_dir: Path
    later_stages: bool


def _f(x: Any, spec: str, suffix: str = "") -> str:
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return figure(x, spec) + suffix if ok else _M


def _rng(r: Mapping[str, Any] | None, spec: str, suffix: str = "") -> str:
    if not r or r.get("min") is None or r.get("max") is None:
        return _M
    return f"{_f(r['min'], spec, suffix)} … {_f(r['max'], spec, suffix)}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    header = list(header)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def metrics_rows(r: StageResult) -> list[list[str]]:
    """The same metrics as the HTML table: baseline, treatment, placebo range, words, limit."""
    n, b, t, p = (r.section(k) for k in ("numeric", "baseline", "treatment", "placebo"))
    th, kld, agr = r.section("thresholds"), t.get("kld") or {}, t.get("agreement") or {}

    def lim(key: str, spec: str, scale: float = 1.0, suffix: str = "", op: str = "<") -> str:
        v = th.get(key)
        return f"{op} {format(v * scale, spec)}{suffix}" if v is not None else "reported only"

    agreement = agr.get("token_agreement")
    return [
        ["elements changed", _M, f"{_f(n.get('changed'), ',d')} of {_f(n.get('n_elements'), ',d')}"
         + (" (no element changed)" if n.get("changed") == 0 else ""), _M, _M, _M],
        ["max abs error", _M, _f(n.get("max_abs"), ".3e"), _M, _M, _M],
        ["mean abs error", _M, _f(n.get("mean_abs"), ".3e"), _M, _M, _M],
        ["max rel error", _M, _f(n.get("max_rel"), ".3e"), _M, _M, lim("max_rel_error", "g")],
        ["mean rel error", _M, _f(n.get("mean_rel"), ".3e"), _M, _M, _M],
        ["PPL", f"{_f(b.get('ppl'), '.4f')} ± {_f(b.get('ppl_err'), '.4f')}",
         f"{_f(t.get('ppl'), '.4f')} ± {_f(t.get('ppl_err'), '.4f')}", _M, _M, _M],
        ["ΔPPL (absolute)", _M, _f(t.get("delta_ppl"), "+.4f"), _M, _M, _M],
        ["ΔPPL %", _M, f"{_f(t.get('delta_ppl_pct'), '+.2f', ' %')} ± "
         f"{_f(t.get('delta_ppl_pct_err'), '.2f', ' %')}",
         _rng(p.get("delta_ppl_pct"), "+.2f", " %"),
         f"**{delta_vs_placebo(t.get('delta_ppl_pct'), p.get('delta_ppl_pct'))}**",
         lim("ppl_delta_max", ".1f", 100, " %", "|Δ| <")],
        ["mean KLD", _M, f"{_f(kld.get('mean'), '.5f')} ± {_f(kld.get('mean_err'), '.5f')}",
         _rng(p.get("kld_mean"), ".5f"), f"**{kld_vs_placebo(r) if kld else _M}**",
         lim("kld_mean_max", "g", op="≤")],
        ["KLD median / p99 / max", _M,
         " / ".join(_f(kld.get(k), ".5f") for k in ("median", "p99", "max")),
         _M, _M, _M],
        ["same top token", _M, _f(kld.get("same_top_pct"), ".2f", " %"),
         _rng(p.get("same_top_pct"), ".2f", " %"),
         f"**{same_top_vs_placebo(kld.get('same_top_pct'), p.get('same_top_pct'))}**",
         lim("same_top_min", ".1f", 100, " %", "≥")],
        ["greedy agreement (first divergence)", _M,
         f"{_f(agreement * 100 if agreement is not None else None, '.1f', ' %')} "
         f"({_divergence(agr)})", _M, _M,
         lim("agreement_min", ".1f", 100, " %", "≥")],
        ["tokens/s (llama-perplexity)", _f(b.get("tokens_per_s"), ".1f"),
         f"{_f(t.get('tokens_per_s'), '.1f')} ({_f(t.get('speed_ratio'), '.2f')}×)", _M, _M,
         "recorded, never asserted"],
    ]  # fmt: skip


def _stage_block(r: StageResult, chart_paths: Mapping[str, Path], out_dir: Path) -> list[str]:
    lines = [f"### {r.stage_title} (`{r.stage}`, layers {r.data.get('layers')}) — {r.model}: "
             f"**{r.outcome}**", ""]  # fmt: skip
    if r.outcome == "skipped":
        return lines + [f"Not run: {r.data.get('skip_reason')}", ""]
    lines += _table(
        ["metric", "baseline", "fake-quantized", "placebo range", "treatment vs placebo",
         "threshold"], metrics_rows(r),
    )  # fmt: skip
    lines += ["", "Checks:", ""]
    lines += [f"- **{n}** {c.get('status')}: {c.get('detail')}" for n, c in r.checks.items()]
    lines.append("")
    for chart in charts_mod.stage_charts(r):
        lines.append(_chart_md(chart, chart_paths, out_dir))
    lines.append("")
    m, c, ll = r.section("model"), r.section("corpus"), r.section("llama")
    lines += [
        "Environment: "
        f"model `{m.get('path')}` (SHA-256 `{m.get('sha256')}`); corpus `{c.get('path')}` "
        f"(SHA-256 `{c.get('sha256')}`); llama.cpp {ll.get('version')} ({ll.get('build_info')}); "
        f"fq {r.data.get('fq_version')}; machine "
        + ", ".join(f"{k} {v}" for k, v in r.section("machine").items()),
        "",
        "Commands:",
        "",
    ]
    for cmd in r.data.get("commands") or []:
        argv = " ".join(str(a) for a in cmd.get("argv") or [])
        lines.append(f"- [{cmd.get('role', '')}] exit {cmd.get('exit_status')}: `{argv}`")
    return lines + [""]


def _chart_md(chart: charts_mod.Chart, paths: Mapping[str, Path], out_dir: Path) -> str:
    path = paths.get(chart.key)
    if path is None:
        return f"*{chart.title}: {chart.note or 'nothing to draw'}*  "
    return f"![{chart.title}]({os.path.relpath(path, out_dir)})"


def _header(run: RunResults, title: str) -> list[str]:
    return [f"# {title}", "", f"Run `{run.run_id}` — results read from `{run.run_dir}`.", ""]


def _decision_lines(run: RunResults) -> list[str]:
    lines = ["## Decision: moving past Test 1", ""]
    for d in decisions(run):
        lines.append(f"- **{d.model}: {d.verdict}** — {d.reason}")
        for c in d.deciding:
            lines.append(f"  - {c.name} {c.status}: {c.detail}")
        r = run.get(GATE_STAGE, d.model)
        if r is not None and r.section("treatment"):
            lines.append(f"  - effect against the placebo: **{kld_vs_placebo(r)}**")
    return lines + [""]


def write_reports(results_dir: str | Path, output_dir: str | Path) -> MarkdownReports:
    """Write both markdown reports and their charts; returns what was written."""
    run_dir = resolve_run_dir(results_dir)
    run = load_run(run_dir)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputRefused(f"output directory is a file: {out}")
    out.mkdir(parents=True, exist_ok=True)
    all_charts = charts_mod.run_charts(run)
    chart_list = [c for cs in all_charts.values() for c in cs]
    written = charts_mod.write_charts(chart_list, out / "charts")
    paths = {p.stem: p for p in written}

    t1 = _header(run, "Test 1 (layer 0): go/no-go") + _decision_lines(run)
    for model in run.models:
        r = run.get(GATE_STAGE, model)
        if r is not None:
            t1 += _stage_block(r, paths, out)
        else:
            t1 += [f"### {model}: Test 1 was not run in this run", ""]

    later = run.later_stages_present()
    ex = _header(run, "Experiment: all stages compared") + _decision_lines(run)
    if not later:
        ex += [
            "**No results for stages 2–4 in this run** (Test 2 `layers0-2`, Test 3 `layers0-9`, "
            "Test 4 `all-layers`): only Test 1 ran, or the gate closed them. Run `pytest` (all "
            "stages) to compare them.",
            "",
        ]
    rows = []
    for r in run.in_order():
        stage, model = r.stage, r.model
        t, p = r.section("treatment"), r.section("placebo")
        kld = (t.get("kld") or {}).get("mean")
        rows.append([
            f"{r.stage_title} `{stage}`", model, r.outcome,
            _f(r.section("numeric").get("changed"), ",d"),
            _f(t.get("delta_ppl_pct"), "+.2f", " %"),
            _rng(p.get("delta_ppl_pct"), "+.2f", " %"),
            _f(kld, ".5f"), _rng(p.get("kld_mean"), ".5f"),
            f"**{kld_vs_placebo(r)}**" if t else (r.data.get("skip_reason") or _M),
        ])  # fmt: skip
    ex += ["## All stages", ""]
    ex += _table(
        ["stage", "model", "outcome", "changed", "ΔPPL", "placebo ΔPPL", "mean KLD",
         "placebo KLD", "vs placebo"], rows,
    )  # fmt: skip
    ex.append("")
    for model in run.models:
        ex += [f"## {model}", ""]
        ex += [_chart_md(c, paths, out) for c in all_charts[model]] + [""]
        for r in run.for_model(model):
            ex += _stage_block(r, paths, out)

    test1 = out / "test1_results.md"
    experiment = out / "experiment_results.md"
    for path, lines in ((test1, t1), (experiment, ex)):
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(path)
    return MarkdownReports(test1, experiment, tuple(written), run_dir, later)
