"""HTML fragments of the evidence, for pytest-html's summary and per-test extras.

Every number cell carries the stored value in `data-key`/`data-value`, so the report can be
checked against the results JSON by machine, and shows it rounded for people. Placebo
comparisons are put in words beside each metric ("within engine noise", "1.6× the largest
placebo") so nobody has to divide two small numbers in their head.
"""

from __future__ import annotations

import base64
import math
import shlex
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any

from .. import checks
from ..figures import figure
from . import Decision, RunResults, StageResult
from .charts import Chart

STYLE = """<style>
.fq h2,.fq h3,.fq h4{margin:.8em 0 .3em}
.fq-decision{border:3px solid #888;border-radius:6px;padding:.6em 1em;margin:.6em 0}
.fq-decision[data-verdict="GO"]{border-color:#1e8449;background:#eafaf1}
.fq-decision[data-verdict="NO-GO"]{border-color:#c0392b;background:#fdedec}
.fq-decision[data-verdict="NO DECISION"]{border-color:#b7950b;background:#fef9e7}
.fq-verdict{font-size:1.6em;font-weight:bold;margin-right:.4em}
.fq-decision[data-verdict="GO"] .fq-verdict{color:#1e8449}
.fq-decision[data-verdict="NO-GO"] .fq-verdict{color:#c0392b}
.fq-decision[data-verdict="NO DECISION"] .fq-verdict{color:#9a7d0a}
.fq table{border-collapse:collapse;margin:.4em 0;font-size:12px}
.fq th,.fq td{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}
.fq th{background:#f2f3f4}
.fq td.fq-num{text-align:right;font-family:monospace;white-space:nowrap}
.fq .fq-noise{color:#1e8449;font-weight:bold}
.fq .fq-above{color:#c0392b;font-weight:bold}
.fq .fq-status-passed{color:#1e8449}
.fq .fq-status-failed,.fq .fq-status-error{color:#c0392b;font-weight:bold}
.fq .fq-status-skipped{color:#b7950b}
.fq .fq-status-reported{color:#555}
.fq img.fq-chart{max-width:640px;margin:4px;border:1px solid #ddd}
.fq code{font-size:11px;word-break:break-all}
.fq .fq-note{font-style:italic;color:#555}
</style>"""

_MISSING = "—"


# --- formatting ------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt(x: Any, spec: str) -> str:
    return figure(x, spec) if _finite(x) else _MISSING


def num(key: str, value: Any, spec: str, suffix: str = "", scale: float = 1.0) -> str:
    """A number cell: the stored value in data-value, a rounded (optionally scaled) text."""
    if not _finite(value):
        return f'<td class="fq-num" data-key="{escape(key)}">{_MISSING}</td>'
    text = figure(value * scale if scale != 1.0 else value, spec) + suffix
    return f'<td class="fq-num" data-key="{escape(key)}" data-value="{value!r}">{escape(text)}</td>'


def _range(r: Mapping[str, Any] | None, spec: str, suffix: str = "") -> str:
    if not r or not _finite(r.get("min")) or not _finite(r.get("max")):
        return _MISSING
    return f"{figure(r['min'], spec)}{suffix} … {figure(r['max'], spec)}{suffix}"


def _words(text: str) -> str:
    css = "fq-noise" if "noise" in text or text.startswith("better") else "fq-above"
    if text in ("control not run", _MISSING) or text.startswith("no "):
        css = "fq-note"
    return f'<span class="{css}">{escape(text)}</span>'


def delta_vs_placebo(value: Any, placebo: Mapping[str, Any] | None) -> str:
    """ΔPPL % against the placebo's range: inside it, or how many times its largest |ΔPPL|."""
    if not placebo or not _finite(placebo.get("min")) or not _finite(placebo.get("max")):
        return "control not run"
    if not _finite(value):
        return _MISSING
    largest = max(abs(placebo["min"]), abs(placebo["max"]))
    if placebo["min"] <= value <= placebo["max"] or abs(value) <= largest:
        return "within engine noise"
    if largest == 0:
        return "above the placebo, which changed nothing"
    return f"{abs(value) / largest:.1f}× the largest placebo"


def same_top_vs_placebo(value: Any, placebo: Mapping[str, Any] | None) -> str:
    """Same-top % compared through the drop below 100 %, the way KLD is compared."""
    if not placebo or not _finite(placebo.get("min")):
        return "control not run"
    if not _finite(value):
        return _MISSING
    drop, largest = 100.0 - value, 100.0 - placebo["min"]
    if drop <= largest:
        return "within engine noise"
    if largest <= 0:
        return "above the placebo, which changed nothing"
    return f"{drop / largest:.1f}× the largest placebo drop"


def kld_vs_placebo(r: StageResult) -> str:
    placebo = r.section("placebo")
    if r.section("numeric").get("changed") == 0:
        return "no element changed: the model is identical to the baseline"
    if not placebo or not placebo.get("seeds"):
        return "control not run"
    ratio, verdict = placebo.get("kld_ratio"), str(placebo.get("verdict") or _MISSING)
    if _finite(ratio) and "×" not in verdict:
        return f"{verdict} (ratio {ratio:.2f})"
    return verdict


# --- blocks ----------------------------------------------------------------------------------


def decision_block(decisions: Sequence[Decision], run: RunResults) -> str:
    """The first thing a reader sees: per model GO / NO-GO for moving past Test 1, and why."""
    parts = ['<div class="fq fq-decisions">', "<h2>Decision: moving past Test 1 (layer 0)</h2>"]
    if not decisions:
        parts.append(
            '<p class="fq-note">No stage results in this run: nothing was decided. '
            "Run <code>pytest -k layer0</code> (the go/no-go gate).</p></div>"
        )
        return "\n".join(parts)
    for d in decisions:
        r = run.get("layer0", d.model)
        lines = "".join(
            f'<li><b>{escape(c.name)}</b> <span class="fq-status-{escape(c.status)}">'
            f"{escape(c.status)}</span>: {escape(c.detail)}</li>"
            for c in d.deciding
        )
        reported = "".join(f"<li>{escape(c.name)}: {escape(c.detail)}</li>" for c in d.reported)
        effect = ""
        if r is not None and r.section("treatment"):
            t = r.section("treatment")
            effect = (
                f"<p>Test 1 effect: ΔPPL {fmt(t.get('delta_ppl_pct'), '+.2f')} %, mean KLD "
                f"{fmt((t.get('kld') or {}).get('mean'), '.5f')} — "
                f"{_words(kld_vs_placebo(r))}.</p>"
            )
        parts.append(
            f'<div class="fq-decision" data-model="{escape(d.model)}" '
            f'data-verdict="{escape(d.verdict)}">'
            f'<span class="fq-verdict">{escape(d.verdict)}</span>'
            f"<b>{escape(d.model)}</b> — {escape(d.reason)}{effect}"
            + (f"<p>Deciding checks:</p><ul>{lines}</ul>" if lines else "")
            + (f"<p>Reported, not asserted:</p><ul>{reported}</ul>" if reported else "")
            + "</div>"
        )
    parts.append("</div>")
    return "\n".join(parts)


def overview_table(run: RunResults) -> str:
    """Stage × model outcomes at a glance, with the effect and its placebo comparison."""
    rows = []
    for r in run.in_order():
        stage, model = r.stage, r.model
        t, p = r.section("treatment"), r.section("placebo")
        why = r.data.get("skip_reason") or ", ".join(
            f"{n}: {c.get('detail', '')}"
            for n, c in r.checks.items()
            if c.get("status") in ("failed", "error")
        )
        rows.append(
            f'<tr data-stage="{escape(stage)}" data-model="{escape(model)}">'
            f"<td>{escape(r.stage_title)} <code>{escape(stage)}</code></td>"
            f"<td>{escape(model)}</td>"
            f'<td class="fq-status-{escape(r.outcome)}">{escape(r.outcome)}</td>'
            + num(f"{stage}/{model}/treatment/delta_ppl_pct", t.get("delta_ppl_pct"), "+.2f", " %")
            + num(f"{stage}/{model}/treatment/kld/mean", (t.get("kld") or {}).get("mean"), ".5f")
            + f"<td>{_range(p.get('kld_mean'), '.5f')}</td>"
            f"<td>{_words(kld_vs_placebo(r)) if t else _MISSING}</td>"
            f"<td>{escape(str(why))}</td></tr>"
        )
    return (
        '<div class="fq"><h3>All stages</h3><table class="fq-overview"><tr><th>stage</th>'
        "<th>model</th><th>outcome</th><th>ΔPPL</th><th>mean KLD</th><th>placebo KLD range</th>"
        "<th>vs placebo</th><th>why not passed</th></tr>" + "".join(rows) + "</table></div>"
    )


def metrics_table(r: StageResult) -> str:
    """Every metric of one stage × model, treatment beside baseline and placebo, with limits."""
    n, b, t, p = (r.section(k) for k in ("numeric", "baseline", "treatment", "placebo"))
    th, checks = r.section("thresholds"), r.checks
    kld = t.get("kld") or {}
    agr = t.get("agreement") or {}
    k = f"{r.stage}/{r.model}"

    def status(name: str) -> str:
        c = checks.get(name) or {}
        s = str(c.get("status") or _MISSING)
        return f'<td class="fq-status-{escape(s)}">{escape(s)}</td>'

    def limit(text: str) -> str:
        return f"<td>{escape(text)}</td>"

    def thr(key: str, spec: str, scale: float = 1.0, suffix: str = "", op: str = "<") -> str:
        v = th.get(key)
        return f"{op} {format(v * scale, spec)}{suffix}" if _finite(v) else "reported only"

    placebo_changed = [x.get("changed") for x in p.get("runs") or [] if _finite(x.get("changed"))]
    changed_range = (
        f"{min(placebo_changed):,} … {max(placebo_changed):,}" if placebo_changed else _MISSING
    )
    frac = (
        f" ({100 * n['changed'] / n['n_elements']:.2f} %)"
        if _finite(n.get("changed")) and n.get("n_elements")
        else ""
    )
    changed_note = (
        " — no element changed: the weights were already exact" if n.get("changed") == 0 else ""
    )
    rows = [
        "<tr><th>metric</th><th>baseline</th><th>fake-quantized</th><th>placebo range</th>"
        "<th>treatment vs placebo</th><th>threshold</th><th>check</th></tr>",
        f"<tr><td>elements changed{escape(changed_note)}</td><td>{_MISSING}</td>"
        + num(f"{k}/numeric/changed", n.get("changed"), ",d").replace(
            "</td>", f" of {fmt(n.get('n_elements'), ',d')}{frac}</td>", 1
        )
        + f"<td>{changed_range}</td><td>{_MISSING}</td><td>{_MISSING}</td>"
        + f"{status('quantize')}</tr>",
    ]
    for key, label in (("max_abs", "max abs error"), ("mean_abs", "mean abs error"),
                       ("max_rel", "max rel error"), ("mean_rel", "mean rel error")):  # fmt: skip
        rows.append(
            f"<tr><td>{label}</td><td>{_MISSING}</td>"
            + num(f"{k}/numeric/{key}", n.get(key), ".3e")
            + f"<td>{_MISSING}</td><td>{_MISSING}</td>"
            + (
                limit(thr("max_rel_error", "g")) + status("numeric")
                if key == "max_rel"
                else "<td></td><td></td>"
            )  # fmt: skip
            + "</tr>"
        )
    rows.append(
        "<tr><td>PPL</td>"
        + num(f"{k}/baseline/ppl", b.get("ppl"), ".4f").replace(
            "</td>", f" ± {fmt(b.get('ppl_err'), '.4f')}</td>", 1
        )
        + num(f"{k}/treatment/ppl", t.get("ppl"), ".4f").replace(
            "</td>", f" ± {fmt(t.get('ppl_err'), '.4f')}</td>", 1
        )
        + f"<td>{_range({'min': _pmin(p, 'ppl'), 'max': _pmax(p, 'ppl')}, '.4f')}</td>"
        f"<td>{_MISSING}</td><td></td><td></td></tr>"
    )
    rows.append(
        f"<tr><td>ΔPPL (absolute)</td><td>{_MISSING}</td>"
        + num(f"{k}/treatment/delta_ppl", t.get("delta_ppl"), "+.4f")
        + f"<td>{_MISSING}</td><td>{_MISSING}</td><td></td><td></td></tr>"
    )
    rows.append(
        f"<tr><td>ΔPPL %  (± paired uncertainty)</td><td>{_MISSING}</td>"
        + num(f"{k}/treatment/delta_ppl_pct", t.get("delta_ppl_pct"), "+.2f", " %").replace(
            "</td>", f" ± {fmt(t.get('delta_ppl_pct_err'), '.2f')} %</td>", 1
        )
        + f"<td>{_range(p.get('delta_ppl_pct'), '+.2f', ' %')}</td>"
        f"<td>{_words(delta_vs_placebo(t.get('delta_ppl_pct'), p.get('delta_ppl_pct')))}</td>"
        + limit(thr("ppl_delta_max", ".1f", 100, " %", "|Δ| <"))
        + status("perplexity")
        + "</tr>"
    )
    rows.append(
        f"<tr><td>mean KLD (± err)</td><td>{_MISSING}</td>"
        + num(f"{k}/treatment/kld/mean", kld.get("mean"), ".5f").replace(
            "</td>", f" ± {fmt(kld.get('mean_err'), '.5f')}</td>", 1
        )
        + f"<td>{_range(p.get('kld_mean'), '.5f')}</td>"
        f"<td>{_words(kld_vs_placebo(r)) if kld else _MISSING}</td>"
        + limit(thr("kld_mean_max", "g", op="≤"))
        + status("kld")
        + "</tr>"
    )
    for key in ("median", "p90", "p99", "max"):
        if key in kld:
            rows.append(
                f"<tr><td>KLD {key}</td><td>{_MISSING}</td>"
                + num(f"{k}/treatment/kld/{key}", kld.get(key), ".5f")
                + f"<td>{_MISSING}</td><td>{_MISSING}</td><td></td><td></td></tr>"
            )
    rows.append(
        f"<tr><td>same top token</td><td>{_MISSING}</td>"
        + num(f"{k}/treatment/kld/same_top_pct", kld.get("same_top_pct"), ".2f", " %")
        + f"<td>{_range(p.get('same_top_pct'), '.2f', ' %')}</td>"
        f"<td>{_words(same_top_vs_placebo(kld.get('same_top_pct'), p.get('same_top_pct')))}</td>"
        + limit(thr("same_top_min", ".1f", 100, " %", "≥"))
        + status("kld")
        + "</tr>"
    )
    rows.append(
        f"<tr><td>greedy generation agreement ({escape(_divergence(agr))})</td>"
        f"<td>{_MISSING}</td>"
        + num(
            f"{k}/treatment/agreement/token_agreement", agr.get("token_agreement"), ".1f", " %", 100
        )  # fmt: skip
        + f"<td>{_MISSING}</td><td>{_MISSING}</td>"
        + limit(thr("agreement_min", ".1f", 100, " %", "≥"))
        + status("agreement")
        + "</tr>"
    )
    ratio = t.get("speed_ratio")
    rows.append(
        "<tr><td>tokens/s (llama-perplexity)</td>"
        + num(f"{k}/baseline/tokens_per_s", b.get("tokens_per_s"), ".1f")
        + num(f"{k}/treatment/tokens_per_s", t.get("tokens_per_s"), ".1f").replace(
            "</td>", f" ({fmt(ratio, '.2f')}×)</td>", 1
        )
        + f"<td>{_MISSING}</td><td>{_MISSING}</td><td>recorded, never asserted</td>"
        + status("speed")
        + "</tr>"
    )
    return (
        f'<table class="fq-metrics" data-stage="{escape(r.stage)}" data-model="{escape(r.model)}">'
        + "".join(rows)
        + "</table>"
    )


def _divergence(agr: Mapping[str, Any]) -> str:
    if not agr:
        return "not measured"
    fd = agr.get("first_divergence")
    return "no divergence" if fd is None else f"first divergence at token {fd}"


def _pmin(p: Mapping[str, Any], key: str) -> float | None:
    vals = [x.get(key) for x in p.get("runs") or [] if _finite(x.get(key))]
    return min(vals) if vals else None


def _pmax(p: Mapping[str, Any], key: str) -> float | None:
    vals = [x.get(key) for x in p.get("runs") or [] if _finite(x.get(key))]
    return max(vals) if vals else None


def checks_table(r: StageResult) -> str:
    typed = {name: checks.as_check(c) for name, c in r.checks.items()}
    rows = "".join(
        f'<tr data-check="{escape(name)}"><td>{escape(name)}</td>'
        f'<td class="fq-status-{escape(c.status)}">{escape(c.status)}</td>'
        f"<td>{'gates' if c.gates else 'reported only'}</td>"
        f"<td>{escape(c.detail)}</td></tr>"
        for name, c in typed.items()
    )
    return (
        '<table class="fq-checks"><tr><th>check</th><th>status</th><th></th><th>detail</th></tr>'
        + rows
        + "</table>"
    )


def thresholds_table(r: StageResult) -> str:
    th, s = r.section("thresholds"), r.section("settings")
    items = [(k, "unset (report only)" if v is None else v) for k, v in th.items()]
    items += [(f"setting {k}", v) for k, v in s.items() if k != "prompts"]
    rows = "".join(f"<tr><td>{escape(str(k))}</td><td>{escape(str(v))}</td></tr>" for k, v in items)
    head = "<tr><th>threshold / setting</th><th>value</th></tr>"
    return f'<table class="fq-thresholds">{head}{rows}</table>'


def environment_table(r: StageResult) -> str:
    m, c, ll, mach = (r.section(k) for k in ("model", "corpus", "llama", "machine"))
    rows = [
        ("model", m.get("name")), ("model path", m.get("path")), ("model SHA-256", m.get("sha256")),
        ("corpus path", c.get("path")), ("corpus SHA-256", c.get("sha256")),
        ("corpus bytes / tokens", f"{c.get('n_bytes')} / {c.get('n_tokens')}"),
        ("llama.cpp version", ll.get("version")), ("llama.cpp build", ll.get("build_info")),
        ("llama.cpp bin dir", ll.get("bin_dir")), ("fq version", r.data.get("fq_version")),
        ("machine", ", ".join(f"{k} {v}" for k, v in mach.items())),
        ("run id", r.data.get("run_id")), ("started / finished",
         f"{r.data.get('started_at')} / {r.data.get('finished_at')}"),
        ("manifest", r.section("numeric").get("manifest")),
    ]  # fmt: skip
    body = "".join(
        f"<tr><td>{escape(k)}</td><td><code>{escape(str(v))}</code></td></tr>" for k, v in rows
    )
    return f'<table class="fq-environment"><tr><th>environment</th><th></th></tr>{body}</table>'


def commands_list(commands: Iterable[Mapping[str, Any]]) -> str:
    """The llama.cpp commands, shell-quoted, with role, duration, exit status and log files."""
    items = []
    for c in commands:
        argv = " ".join(shlex.quote(str(a)) for a in c.get("argv") or [])
        cached = " (cached: run by an earlier test or run)" if c.get("cached") else ""
        items.append(
            f"<li>[{escape(str(c.get('role', '')))}] exit {escape(str(c.get('exit_status')))}, "
            f"{fmt(c.get('duration_s'), '.1f')} s{escape(cached)}<br><code>{escape(argv)}</code>"
            f"<br><small>stdout {escape(str(c.get('stdout_path')))} · stderr "
            f"{escape(str(c.get('stderr_path')))}</small></li>"
        )
    if not items:
        return '<p class="fq-note">No external command (this check runs in-process in fq).</p>'
    return '<ol class="fq-commands">' + "".join(items) + "</ol>"


def chart_html(chart: Chart) -> str:
    if chart.png is None:
        return (
            f'<p class="fq-note fq-chart-note" data-chart="{escape(chart.key)}">'
            f"{escape(chart.title)}: {escape(chart.note or 'nothing to draw')}</p>"
        )
    data = base64.b64encode(chart.png).decode("ascii")
    return (
        f'<img class="fq-chart" data-chart="{escape(chart.key)}" alt="{escape(chart.title)}" '
        f'title="{escape(chart.title)}" src="data:image/png;base64,{data}">'
    )


def generations_table(r: StageResult) -> str:
    b, t = r.section("baseline"), r.section("treatment")
    rows = []
    for gb, gt in zip(b.get("generations") or [], t.get("generations") or [], strict=False):
        rows.append(
            f"<tr><td>{escape(str(gb.get('prompt')))}{' (chat)' if gb.get('chat') else ''}</td>"
            f"<td>{escape(str(gb.get('text')))}</td><td>{escape(str(gt.get('text')))}</td></tr>"
        )
    if not rows:
        return ""
    return ("<table class=\"fq-generations\"><tr><th>prompt</th><th>baseline output</th>"
            "<th>fake-quantized output</th></tr>" + "".join(rows) + "</table>")  # fmt: skip


def stage_section(r: StageResult, charts: Sequence[Chart]) -> str:
    """Everything about one stage × model, self-contained."""
    head = (
        f'<div class="fq fq-stage" data-stage="{escape(r.stage)}" data-model="{escape(r.model)}">'
        f"<h3>{escape(r.stage_title)} ({escape(r.stage)}, "
        f"layers {escape(str(r.data.get('layers')))})"
        f" — {escape(r.model)}: "
        f'<span class="fq-status-{escape(r.outcome)}">{escape(r.outcome)}</span></h3>'
    )
    if r.outcome == "skipped":
        return head + f"<p>Not run: {escape(str(r.data.get('skip_reason')))}</p></div>"
    return (
        head
        + metrics_table(r)
        + checks_table(r)
        + generations_table(r)
        + "".join(chart_html(c) for c in charts)
        + "<details><summary>thresholds, settings and environment</summary>"
        + thresholds_table(r)
        + environment_table(r)
        + "</details><details><summary>commands run for this stage</summary>"
        + commands_list(r.data.get("commands") or [])
        + "</details></div>"
    )
