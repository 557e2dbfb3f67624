"""pytest-html hooks: the go/no-go summary and per-test evidence.

The summary opens with the decision per model (GO / NO-GO for moving past Test 1 and the
checks that decided it) and, after `--fq-compare`, the comparison with the reference (status,
summary, identity differences); then every stage × model with its metrics, placebo comparison,
charts, thresholds, environment and commands. Each stage test carries its stage's table,
the charts that belong to its check and the commands it depends on. Everything is read
from the results store of this session's run (fq_pytest.plugin's run id); nothing is
measured here. Charts are also written as PNGs to `charts/` beside the run's own HTML report
(results/<run>/report.html; the --html path asked for gets a copy).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from fq_core.storage.record import Command

log = logging.getLogger(__name__)

_TITLE = "fq-suite go/no-go report"
_HTML_REPORT = pytest.StashKey[object]()


class _Errors:
    """The tests (and collectors) of this session that ended in an error: a session with
    any states no GO, whatever its records say (fq_core.experiment.checks.decide)."""

    def __init__(self) -> None:
        self.nodeids: list[str] = []
        self.failed: list[str] = []  # every failed test, any phase: what the title counts

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed and report.when != "call":
            self.nodeids.append(report.nodeid)
        if report.failed and report.nodeid not in self.failed:
            self.failed.append(report.nodeid)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.nodeids.append(report.nodeid or "collection")


_ERRORS = pytest.StashKey[_Errors]()


@pytest.hookimpl(tryfirst=True)  # before pytest-html's, which opens the path it is given
def pytest_configure(config: pytest.Config) -> None:
    config.stash[_ERRORS] = errors = _Errors()
    config.pluginmanager.register(errors, "fq-session-errors")
    _report_with_the_run(config)


# --- where the pytest-html report goes ---------------------------------------------------------

_ASKED = pytest.StashKey[Path]()  # the --html path asked for, when redirected to the run
_STARTED = pytest.StashKey[float]()
_MADE = pytest.StashKey[list[Path]]()  # folders that did not exist before this session


def _ini_html(config: pytest.Config) -> str | None:
    """The --html of pytest.ini's addopts: the gate's report, which only a stage run replaces."""
    for arg in config.getini("addopts"):
        if arg.startswith("--html="):
            return arg.removeprefix("--html=")
    return None


def _report_with_the_run(config: pytest.Config) -> None:
    """pytest-html writes into results/<run>/report.html, so each run keeps its own report;
    the path asked for gets a copy at the end (`_publish_report`). The run id is fixed here
    for fq_pytest.plugin, which reads it after this hook."""
    asked = _html_path(config)
    if hasattr(config, "workerinput") or not config.pluginmanager.hasplugin("html"):
        return
    try:
        from fq_core.errors import FqError
        from fq_core.platform.atomic import check_directory
        from fq_core.storage.results import new_run_id
        from fq_pytest.plugin import results_root

        rid = config.getoption("fq_run_id") or os.environ.get("FQ_RUN_ID") or new_run_id()
        root = results_root(config)
    except (ImportError, ValueError):  # the experiment plugin is not loaded
        return
    try:
        check_directory(root / rid)
    except FqError:  # the results store refuses the session in one line (fq_pytest.plugin)
        return
    config.option.fq_run_id = rid
    config.option.htmlpath = str(root / rid / "report.html")
    config.stash[_MADE] = [d for d in (root / rid, root) if not d.exists()]
    if asked is None:  # outside the checkout (no pytest.ini): the run's report, self-contained
        config.option.self_contained_html = True
    else:
        config.stash[_ASKED] = asked


@pytest.hookimpl(trylast=True)  # after fq_pytest.plugin has seen the selection
def pytest_collection_finish(session: pytest.Session) -> None:
    """No report for a collection, nor one nobody asked for of a session without stages:
    pytest-html is told before it writes (and before it says it did)."""
    config = session.config
    if _MADE not in config.stash:
        return
    from fq_pytest.plugin import stage_case

    stages = any(stage_case(item) is not None for item in session.items)
    if not (config.option.collectonly or (_ASKED not in config.stash and not stages)):
        return
    from pytest_html.basereport import BaseReport

    for plugin in config.pluginmanager.get_plugins():
        if isinstance(plugin, BaseReport):
            config.pluginmanager.unregister(plugin)
    for made in config.stash[_MADE]:  # the folders pytest-html made for it, when still empty
        with contextlib.suppress(OSError):
            made.rmdir()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    import time

    session.config.stash[_STARTED] = time.time()


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """Publish the run's report where it was asked for; after every pytest_sessionfinish
    (pytest-html writes there), which the terminal reporter's wrapper runs first."""
    asked = config.stash.get(_ASKED, None)
    written = _html_path(config)
    if written is None or not written.is_file():
        return
    say = terminalreporter.write_line
    ran_stages = _ran_stages(written.parent, config.stash.get(_STARTED, 0.0))
    say(f"fq: report {written}")
    if asked is None:
        return
    gate = _ini_html(config)
    ini = _as_path(gate) if gate else None
    if asked == ini and not ran_stages:
        say(f"fq: {asked} left as it was: this session stored no stage results")
        return
    from fq_core.platform.atomic import write_bytes

    asked.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(asked, written.read_bytes(), force=True)
    say(f"fq: {asked} is a copy of this run's report, {written}")


def _ran_stages(run_dir: Path, since: float) -> bool:
    from fq_core.report import record_files

    return (
        any(p.stat().st_mtime >= since for p in record_files(run_dir))
        if run_dir.is_dir()
        else False
    )


# Which llama.cpp commands a check's verdict rests on, by the tool's file name.
_PPL_TOOLS = ("llama-perplexity", "fq-logits")  # fq-logits: the exact engine (twin answer)
_GEN_TOOLS = ("llama-completion", "llama-cli", "llama-simple", "llama-run")
_CHECK_TOOLS = {
    "perplexity": _PPL_TOOLS,
    "kld": _PPL_TOOLS,
    "speed": _PPL_TOOLS,
    "generate": _GEN_TOOLS,
    "agreement": _GEN_TOOLS,
}


def asked_html_path(config: pytest.Config) -> Path | None:
    """The --html path the user asked for (pytest-html itself writes into the run's directory):
    where reports that go beside it (the sensitivity report) belong."""
    return config.stash.get(_ASKED, None) or _html_path(config)


def _as_path(option: str) -> Path:
    """An --html value as pytest-html resolves it: variables and ~ expanded, from the cwd."""
    return Path.cwd() / Path(os.path.expandvars(option)).expanduser()


def _html_path(config: pytest.Config) -> Path | None:
    path = config.getoption("htmlpath", default=None)
    return _as_path(path) if path else None


def _run_dir(config: pytest.Config) -> Path | None:
    """This session's results/<run-id>/, or None when the experiment plugin is not loaded."""
    try:
        from fq_pytest.plugin import results_root, run_id

        return results_root(config) / run_id(config)
    except (ImportError, KeyError, AttributeError):  # plugin absent or not configured
        return None


def commands_for(check: str, commands: Sequence[Command]) -> list[Command]:
    """The commands a check's verdict rests on (placebo: the placebo runs; load: the rest)."""
    if check in ("quantize", "numeric"):
        return []

    def placebo(c: Command) -> bool:
        return (c.role or "").startswith("placebo")

    if check == "placebo":
        return [c for c in commands if placebo(c)]

    def tool(c: Command) -> str:
        return c.tool or (Path(c.argv[0]).name if c.argv else "")

    main = [c for c in commands if not placebo(c)]
    if check in _CHECK_TOOLS:
        return [c for c in main if tool(c) in _CHECK_TOOLS[check]]
    known = _PPL_TOOLS + _GEN_TOOLS
    return [c for c in main if tool(c) not in known] or main


def _charts_for(check: str, result, run):
    from fq_core.report import charts

    if check in ("quantize", "numeric"):
        return [
            charts.weight_distribution(result),
            charts.rel_error_histogram(result),
            charts.per_layer_max_rel_error(result),
        ]
    if check == "perplexity":
        return [
            charts.chunk_ppl(result),
            charts.effect_vs_layers(run.for_model(result.model), result.model)[0],
        ]
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
    if check == "regression":  # not a check of the record: its comparison is in the summary
        return []
    charts = _charts_for(check, result, run) if result.outcome != "skipped" else []
    commands = commands_for(check, result.record.commands)
    out = [extras.html(str(html.check_extra(check, result, charts, commands)))]
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
        from fq_core.report import html

        log.exception("fq report summary failed")
        prefix.append(str(html.summary_error(f"{type(exc).__name__}: {exc}")))


def _summary(prefix, summary, postfix, session) -> None:
    from fq_core.report import charts, decisions, html, load_run, session_title

    config = session.config
    run_dir = _run_dir(config)
    prefix.append(str(html.style()))
    if run_dir is None or not run_dir.is_dir() or not any(run_dir.glob("*/*.json")):
        prefix.append(str(html.no_stage_note()))
        if run_dir is not None and run_dir.is_dir():
            postfix.append(_recipe_section(run_dir))  # "" without recipes
        return
    run = load_run(run_dir)
    seen = config.stash.get(_ERRORS, None)
    errors, failed = (seen.nodeids, seen.failed) if seen is not None else ([], [])
    decided = decisions(run, errors)
    prefix.append(str(html.decision_block(decided, run, failed)))
    against = str(html.reference_block(run))  # empty unless --fq-compare stored comparisons
    if against:
        prefix.append(against)
    report = config.stash.get(_HTML_REPORT, None)
    if report is not None:
        report.title = f"{_TITLE}: {session_title(decided, failed)}"
    summary.append(str(html.answers_table(run)))
    summary.append(str(html.overview_table(run)))
    all_charts = charts.run_charts(run)
    for model in run.models:
        postfix.append(str(html.model_charts(model, all_charts[model])))
        for r in run.for_model(model):
            postfix.append(str(html.stage_section(r, all_charts[f"{r.stage}/{model}"])))
    postfix.append(_recipe_section(run_dir))
    html_path = _html_path(config)
    if html_path is not None:
        out = html_path.parent / "charts"
        drawn = (c for cs in all_charts.values() for c in cs)  # pruned: in the run's own dir
        written = charts.write_charts(drawn, out, prune=_ASKED in config.stash)
        postfix.append(str(html.charts_note(len(written), out, run_dir)))


def _recipe_section(run_dir) -> str:
    """The recipe stage's records of this run as a section ("" when there are none)."""
    from fq_core.report import recipe
    from fq_core.storage.recipe_record import read_recipe, recipe_paths

    paths = recipe_paths(run_dir)
    return recipe.html_section([read_recipe(p) for p in paths]) if paths else ""
