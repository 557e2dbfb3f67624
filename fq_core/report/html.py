"""HTML fragments of the evidence, for pytest-html's summary and per-test extras.

The fragments are the macros of `templates/report.html.j2` (autoescaped), fed with the display
rows of `fq_core.report.rows`, the same rows the markdown reports render. Every number cell
carries the stored value in `data-key`/`data-value`, so the report can be checked against the
results JSON by machine, and shows it rounded for people. Placebo comparisons are the
protocol's words, stored in the record ("within engine noise", "1.6× the largest placebo").
Comparisons with a reference are shown as fq_core.experiment.regression stored them (status,
summary, identity differences, each metric's change, uncertainty and verdict).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from markupsafe import Markup

from ..experiment.stages import GATE_STAGE
from ..storage.record import Check, Command
from . import Decision, RunResults, StageResult, failed_label
from . import rows as rows_mod
from .charts import Chart
from .render import macros

TEMPLATE = "report.html.j2"


def _m():
    return macros(TEMPLATE)


def style() -> Markup:
    return _m().style()


def decision_block(
    decisions: Sequence[Decision], run: RunResults, failed: Sequence[str] = ()
) -> Markup:
    """The first thing a reader sees: per model GO / NO-GO for moving past Test 1, which
    answer gates, the other's verdict beside it, and the session's failed tests above all."""
    views = rows_mod.decision_views(run, decisions)
    return _m().decision_block(views, GATE_STAGE, [failed_label(n) for n in failed])


def reference_block(run: RunResults) -> Markup:
    """Against the reference (`--fq-compare`): per stage × case the status, the summary line
    and what differs in the identity; empty when nothing in the run was compared."""
    block = rows_mod.reference_block(run)
    return Markup("") if block is None else _m().reference_block(block)


def answers_table(run: RunResults) -> Markup:
    """The plan's question per stage, answered as deployed and intrinsically, with floors."""
    return _m().answers_table(rows_mod.answer_rows(run))


def overview_table(run: RunResults) -> Markup:
    """Stage × model outcomes at a glance, with the effect and its placebo comparison."""
    return _m().overview_table(rows_mod.overview_rows(run))


def metrics_table(r: StageResult) -> Markup:
    """Every metric of one stage × model, treatment beside baseline and placebo, with limits."""
    return _m().metrics_table(rows_mod.stage_view(r))


def commands_list(commands: Iterable[Command]) -> Markup:
    """The llama.cpp commands, shell-quoted, with role, duration, exit status and log files."""
    return _m().commands_list(rows_mod.command_rows(commands))


def stage_section(r: StageResult, charts: Sequence[Chart]) -> Markup:
    """Everything about one stage × model, self-contained."""
    return _m().stage_section(rows_mod.stage_view(r), charts)


def model_charts(model: str, charts: Sequence[Chart]) -> Markup:
    """The cross-stage charts of one model (effect against the number of quantized layers)."""
    return _m().model_charts(model, charts)


def check_extra(
    name: str, r: StageResult, charts: Sequence[Chart], commands: Iterable[Command]
) -> Markup:
    """A stage test's evidence: its check, the stage's metrics, chart notes, its commands."""
    check: Check | None = r.record.checks.get(name)
    view = rows_mod.stage_view(r)
    return _m().check_extra(name, check, view, charts, rows_mod.command_rows(commands))


def no_stage_note() -> Markup:
    return _m().no_stage_note(GATE_STAGE)


def charts_note(n_written: int, out: object, run_dir: object) -> Markup:
    return _m().charts_note(n_written, out, run_dir)


def summary_error(message: str) -> Markup:
    return _m().summary_error(message)
