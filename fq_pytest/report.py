"""pytest-html hooks: the go/no-go summary and per-test evidence.

The summary opens with the decision per model (GO / NO-GO for moving past Test 1 and the
checks that decided it), then every stage × model with its metrics, placebo comparison,
charts, thresholds, environment and commands. Each stage test carries its stage's table,
the charts that belong to its check and the commands it depends on. Everything is read
from the results store of this session's run (fq_pytest.plugin's run id); nothing is
measured here. Charts are also written as PNGs to `charts/` beside the HTML report.
"""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

import pytest

log = logging.getLogger(__name__)

_TITLE = "fq-suite go/no-go report"
_HTML_REPORT = pytest.StashKey[object]()

# Which llama.cpp commands a check's verdict rests on, by the tool's file name.
_PPL_TOOLS = ("llama-perplexity",)
_GEN_TOOLS = ("llama-completion", "llama-cli", "llama-simple", "llama-run")
_CHECK_TOOLS = {
    "perplexity": _PPL_TOOLS,
    "kld": _PPL_TOOLS,
    "speed": _PPL_TOOLS,
    "generate": _GEN_TOOLS,
    "agreement": _GEN_TOOLS,
}


def _html_path(config: pytest.Config) -> Path | None:
    path = config.getoption("htmlpath", default=None)
    if not path:
        return None
    return Path.cwd() / Path(os.path.expandvars(path)).expanduser()


def _run_dir(config: pytest.Config) -> Path | None:
    """This session's results/<run-id>/, or None when the experiment plugin is not loaded."""
    try:
        from fq_pytest.plugin import results_root, run_id

        return results_root(config) / run_id(config)
    except (ImportError, KeyError, AttributeError):  # plugin absent or not configured
        return None


def commands_for(check: str, commands: list[dict]) -> list[dict]:
    """The commands a check's verdict rests on (placebo: the placebo runs; load: the rest)."""
    if check in ("quantize", "numeric"):
        return []
    if check == "placebo":
        return [c for c in commands if str(c.get("role", "")).startswith("placebo")]

    def tool(c: dict) -> str:
        argv = c.get("argv") or [""]
        return Path(str(argv[0])).name

    main = [c for c in commands if not str(c.get("role", "")).startswith("placebo")]
    if check in _CHECK_TOOLS:
        return [c for c in main if tool(c) in _CHECK_TOOLS[check]]
    known = _PPL_TOOLS + _GEN_TOOLS
    return [c for c in main if tool(c) not in known] or main


def _charts_for(check: str, result, run):
    from fq_core.report import charts

    if check in ("quantize", "numeric"):
        return [charts.weight_distribution(result), charts.rel_error_histogram(result),
                charts.per_layer_max_rel_error(result)]  # fmt: skip
    if check == "perplexity":
        return [charts.chunk_ppl(result), charts.effect_vs_layers(run.for_model(result.model),
                                                                   result.model)[0]]  # fmt: skip
    if check in ("kld", "placebo"):
        return [charts.effect_vs_layers(run.for_model(result.model), result.model)[1]]
    return []


def _stage_extras(item: pytest.Item) -> list[dict]:
    """The evidence attached to one stage test, from the stored stage × model result."""
    from pytest_html import extras

    from fq_core.report import html, load_run

    props = dict(item.user_properties)
    path = props.get("fq_result")
    if not path or not Path(path).is_file():
        return []
    run = load_run(Path(path).parent.parent)
    result = next((r for r in run.results if r.path == Path(path)), None)
    if result is None:
        return []
    check = getattr(item, "originalname", item.name).removeprefix("test_")
    c = result.checks.get(check) or {}
    head = (
        f'<div class="fq" data-check="{check}"><p><b>{html.escape(check)}</b>: '
        f'<span class="fq-status-{html.escape(str(c.get("status")))}">'
        f"{html.escape(str(c.get('status', 'not recorded')))}</span> — "
        f"{html.escape(str(c.get('detail', '')))}</p>"
    )
    if result.outcome == "skipped":
        body = f"<p>Not run: {html.escape(str(result.data.get('skip_reason')))}</p>"
    else:
        charts = _charts_for(check, result, run)
        notes = "".join(html.chart_html(ch) for ch in charts if ch.png is None)
        body = (
            html.metrics_table(result)
            + notes
            + "<h4>Commands this check rests on</h4>"
            + html.commands_list(commands_for(check, list(result.data.get("commands") or [])))
        )
    out = [extras.html(html.STYLE + head + body + "</div>")]
    if result.outcome != "skipped":
        for ch in charts:
            if ch.png is not None:
                out.append(extras.png(base64.b64encode(ch.png).decode("ascii"), ch.title))
    return out


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    if "fq_result" not in dict(item.user_properties):
        return
    if report.when != "call" and not (report.when == "setup" and report.skipped):
        return
    if not item.config.pluginmanager.hasplugin("html"):
        return
    try:
        report.extras = list(getattr(report, "extras", [])) + _stage_extras(item)
    except Exception as exc:  # evidence must never turn a verdict into an internal error
        log.warning("no report extras for %s: %s", item.nodeid, exc)


@pytest.hookimpl(optionalhook=True)
def pytest_html_report_title(report) -> None:
    report.title = _TITLE
    report.config.stash[_HTML_REPORT] = report


@pytest.hookimpl(optionalhook=True)
def pytest_html_results_summary(prefix, summary, postfix, session) -> None:
    try:
        _summary(prefix, summary, postfix, session)
    except Exception as exc:  # a broken record must not lose the rest of the HTML report
        from html import escape

        log.exception("fq report summary failed")
        prefix.append(
            f'<p style="color:#c0392b"><b>fq-suite could not build its evidence summary: '
            f"{escape(type(exc).__name__)}: {escape(str(exc))}</b></p>"
        )


def _summary(prefix, summary, postfix, session) -> None:
    from fq_core.report import charts, decisions, html, load_run

    config = session.config
    run_dir = _run_dir(config)
    prefix.append(html.STYLE)
    if run_dir is None or not run_dir.is_dir() or not any(run_dir.glob("*/*.json")):
        prefix.append(
            '<div class="fq"><p class="fq-note">No experiment stage ran in this session, so '
            "there is no go/no-go decision here. <code>pytest -k layer0</code> runs the "
            "gate.</p></div>"
        )
        return
    run = load_run(run_dir)
    decided = decisions(run)
    prefix.append(html.decision_block(decided, run))
    report = config.stash.get(_HTML_REPORT, None)
    if report is not None:
        report.title = f"{_TITLE}: " + ", ".join(f"{d.model} {d.verdict}" for d in decided)
    summary.append(html.overview_table(run))
    all_charts = charts.run_charts(run)
    for model in run.models:
        postfix.append(
            f'<div class="fq"><h2>{html.escape(model)}: effect by number of quantized layers '
            "(grey band: placebo range)</h2>"
            + "".join(html.chart_html(c) for c in all_charts[model])
            + "</div>"
        )
        for r in run.for_model(model):
            postfix.append(html.stage_section(r, all_charts[f"{r.stage}/{model}"]))
    html_path = _html_path(config)
    if html_path is not None:
        out = html_path.parent / "charts"
        written = charts.write_charts((c for cs in all_charts.values() for c in cs), out)
        postfix.append(
            f'<p class="fq-note">{len(written)} charts also written to '
            f"<code>{html.escape(str(out))}</code>; results read from "
            f"<code>{html.escape(str(run_dir))}</code>.</p>"
        )
