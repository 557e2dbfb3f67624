"""pytest wiring of the sensitivity sweep (experiments/test_sensitivity.py); logic in
fq_core.experiment.sweep (plan, run, analysis).

- Options: `fq_sweep_*` ini values, each also a `--fq-sweep-…` flag, and `--fq-gpu-layers`.
- Which plan: `fq_sweep_plan = smoke` (default: what plain `pytest` and CI run — Gemma3,
  ffn_norm, layers 0-1, BF16, deployed, 2 chunks, ≈ 1 min) or `full` (`make sweep`: the axes the
  other `fq_sweep_*` values give). A `--fq-sweep-…` axis flag without `--fq-sweep-plan full` is
  a usage error, never silently ignored.
- One test per cell, id naming every axis (`gemma3-270m-ffn_norm-blk03-bf16-deployed`,
  `…-first04-…` for the cumulative curve); all carry the `sweep` marker, so `-m sweep` runs
  only the sweep and `-m "not sweep"` none of it. Ordered by model, variant, format, kind,
  layer (the baseline is made once, first; pytest-split shards get contiguous runs).
- Progress: each cell runs inside `progress.context(stage="sweep i/n · ETA …")`.
- At the end of the session (controller only): reports/sensitivity.html and .md (beside the
  HTML report) from this run's cells, and a section in the pytest-html report.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fq_core.definitions.settings import SWEEP as SETTINGS
from fq_pytest.plugin import SESSION, add_options, refuse
from fq_pytest.plugin import option_values as plugin_option_values

log = logging.getLogger(__name__)

SWEEP = pytest.StashKey["SweepSession"]()


AXIS_OPTIONS = (
    "fq_sweep_models",
    "fq_sweep_kinds",
    "fq_sweep_formats",
    "fq_sweep_layers",
    "fq_sweep_variants",
    "fq_sweep_cumulative",
    "fq_sweep_chunks",
    "fq_sweep_until_decided",
    "fq_sweep_max_chunks",
    "fq_sweep_rank_chunks",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(
        "fq-sweep", "fq-suite sensitivity sweep (experiments/test_sensitivity.py)"
    )
    add_options(parser, group, SETTINGS)


def option_values(config: pytest.Config) -> dict[str, Any]:
    values = plugin_option_values(config, SETTINGS)
    if values["fq_sweep_plan"] != "full":
        given = [
            o.flag
            for o in SETTINGS
            if o.name in AXIS_OPTIONS and config.getoption(o.name) is not None
        ]
        if given:
            raise pytest.UsageError(
                f"{', '.join(given)} set(s) the full sweep's axes: add --fq-sweep-plan full "
                "(the default smoke plan is fixed)"
            )
    return values


def plan_from(values: dict[str, Any], rounding: str):
    from fq_core.experiment.sweep.plan import SMOKE, Plan, parse_formats, parse_variants

    if values["fq_sweep_plan"] == "smoke":
        return SMOKE
    try:
        formats = parse_formats(values["fq_sweep_formats"], rounding)
        variants = parse_variants(values["fq_sweep_variants"])
    except Exception as exc:
        raise pytest.UsageError(str(exc)) from None
    return Plan(
        name="full",
        models=tuple(values["fq_sweep_models"].split()),
        kinds=tuple(values["fq_sweep_kinds"].replace(",", " ").split()),
        formats=formats,
        layers=values["fq_sweep_layers"],
        variants=variants,
        cumulative=values["fq_sweep_cumulative"],
        chunks=values["fq_sweep_chunks"],
        until_decided=values["fq_sweep_max_chunks"] if values["fq_sweep_until_decided"] else None,
        rank_chunks=values["fq_sweep_rank_chunks"],
    )


@dataclass(frozen=True)
class SweepCase:
    model: str  # as given
    model_id: str  # fq_core.measurement.models.model_ids: the stages' ids, never colliding
    cell: Any  # experiment.sweep.plan.Cell, or None when the model was not available at collection
    reason: str | None = None  # why it is skipped: not collected, or it cannot be made

    @property
    def id(self) -> str:
        return self.cell.id if self.cell is not None else f"{self.model_id}-not-collected"


class SweepSession:
    """Per-process state: the plan, the runner (with --fq-gpu-layers), progress counters."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.values = option_values(config)
        self._plan = None
        self._runner = self._tools = None
        self.total = 0  # sweep items selected in this process
        self.done = 0
        self.computed_s: list[float] = []  # wall time of cells not from the cache

    @property
    def fq(self):
        return self.config.stash[SESSION]

    @property
    def plan(self):
        if self._plan is None:
            self._plan = plan_from(self.values, self.fq.values["fq_rounding"])
        return self._plan

    @property
    def tools(self):
        if self._tools is None:
            from fq_core.experiment.sweep.run import tools_for_backend

            self._tools = tools_for_backend(self.fq.tools, self.values["fq_gpu_layers"])
        return self._tools

    @property
    def runner(self):
        if self._runner is None:
            from fq_core.measurement.llama.runner import LlamaRunner

            self._runner = LlamaRunner(self.tools, gpu_layers=self.values["fq_gpu_layers"])
        return self._runner

    def context(self):
        from fq_core.experiment.stages import Context

        fq = self.fq
        return Context(fq.run_id, self.runner, self.tools, fq.corpus, fq.root)

    def cases(self) -> list[SweepCase]:
        from fq_core.errors import FqError
        from fq_core.experiment.sweep.plan import cells_for, refusal, sort_key
        from fq_core.measurement.gguf_index import read_index
        from fq_core.measurement.models import model_ids, resolve_model

        try:
            ids = {m.given: m.id for m in model_ids(self.plan.models)}
        except FqError as exc:
            refuse(self.config, f"sweep models: {exc}")
            return []
        out: list[SweepCase] = []
        for m, mid in ids.items():
            try:  # collection never downloads: `make check` collects offline
                ref = resolve_model(m, fetch=False)
            except FqError as exc:
                out.append(
                    SweepCase(
                        m,
                        mid,
                        None,
                        f"{m} was not available when collected ({exc}); "
                        "`fq fetch` it (or `make setup`) and run again",
                    )
                )
                continue
            try:
                index = read_index(ref.path)
                cells = cells_for(self.plan, mid, index)
            except FqError as exc:
                refuse(self.config, f"sweep plan on {m}: {exc}")
                continue
            out += [SweepCase(m, mid, c, refusal(c, index)) for c in sorted(cells, key=sort_key)]
        return out

    def label(self) -> str:
        """'sweep 3/38 · ETA 4 min 10 s' (ETA from the cells computed so far)."""
        from fq_pytest.progress import duration

        text = f"sweep {self.done + 1}/{self.total}" if self.total else "sweep"
        if self.computed_s and self.total:
            left = max(0, self.total - self.done)
            text += f" · ETA {duration(left * sum(self.computed_s) / len(self.computed_s))}"
        return text


def pytest_configure(config: pytest.Config) -> None:
    config.stash[SWEEP] = SweepSession(config)  # validates every option now


def pytest_report_header(config: pytest.Config) -> list[str]:
    s = config.stash[SWEEP]
    try:
        plan = s.plan.describe()
    except pytest.UsageError as exc:
        return [f"fq sweep: {exc}"]
    gpu = s.values["fq_gpu_layers"]
    return [
        f"fq sweep (pytest -m sweep, in the fq-suite checkout): {plan}"
        + (f"; -ngl {gpu}" if gpu is not None else "")
    ]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "fq_sweep_case" not in metafunc.fixturenames:
        return
    cases = metafunc.config.stash[SWEEP].cases()
    metafunc.parametrize("fq_sweep_case", [pytest.param(c, id=c.id) for c in cases])


def _case(item: pytest.Item) -> SweepCase | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("fq_sweep_case") if callspec is not None else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Sweep items in the plan's order (model, variant, format, kind, layer), where the first
    of them stood; everything else keeps its place."""
    from fq_core.experiment.sweep.plan import sort_key

    pos = [i for i, item in enumerate(items) if _case(item) is not None]
    if not pos:
        return
    ordered = sorted(
        (items[i] for i in pos),
        key=lambda it: (0, sort_key(_case(it).cell)) if _case(it).cell is not None else (1, ()),
    )
    for i, item in zip(pos, ordered, strict=True):
        items[i] = item


def pytest_collection_finish(session: pytest.Session) -> None:
    session.config.stash[SWEEP].total = sum(1 for it in session.items if _case(it) is not None)


@pytest.fixture
def fq_sweep_cell(request: pytest.FixtureRequest, fq_sweep_case: SweepCase):
    """The stored record of this test's cell (measured now, or from the cell cache)."""
    from fq_core.errors import FqError
    from fq_core.experiment.sweep.run import run_cell
    from fq_core.platform import progress
    from fq_core.storage.cell_record import cell_path

    if fq_sweep_case.cell is None or fq_sweep_case.reason:  # not collected, or cannot be made
        pytest.skip(fq_sweep_case.reason)
    s: SweepSession = request.config.stash[SWEEP]
    fq = s.fq
    cell = fq_sweep_case.cell
    request.node.user_properties += [
        ("fq_run_id", fq.run_id),
        ("fq_sweep_cell", cell.id),
        ("fq_sweep_result", str(cell_path(fq.run_id, cell.id, fq.root))),
    ]
    t0 = time.perf_counter()
    try:
        with progress.context(stage=s.label(), model=cell.id):
            ref = fq.model(_stage_case(fq_sweep_case))
            rule = s.plan.rule_for(cell)
            rec = run_cell(cell, ref, s.context(), fq.experiment, chunks=s.plan.chunks, rule=rule)
    except FqError as exc:  # a missing model, corpus or tool: one line, not a traceback
        pytest.fail(f"{type(exc).__name__}: {exc}", pytrace=False)
    finally:
        s.done += 1
    if rec.status == "measured" and not rec.cached:
        s.computed_s.append(time.perf_counter() - t0)
    return rec


def _stage_case(case: SweepCase):
    from fq_pytest.plugin import StageCase

    return StageCase("sweep", case.model, case.model_id)


# --- the reports at the end ----------------------------------------------------------------------


def _cells_dir(config: pytest.Config) -> Path | None:
    from fq_core.storage.cell_record import cell_path

    fq = config.stash[SESSION]
    d = cell_path(fq.run_id, "x", fq.root).parent
    return d if d.is_dir() and any(d.glob("*.json")) else None


def _reports_dir(config: pytest.Config) -> Path:
    """Beside the --html report asked for (not the run's own copy in results/<run>/, which
    holds stage records only), else reports/."""
    from fq_pytest.report import asked_html_path

    html = asked_html_path(config)
    return html.parent if html is not None else config.rootpath / "reports"


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """Write reports/sensitivity.{html,md,json} from this run's cells (controller only)."""
    if hasattr(config, "workerinput"):
        return
    cells = _cells_dir(config)
    if cells is None:
        return
    from fq_core.experiment.sweep.analysis import analyze_dirs
    from fq_core.report import sensitivity

    fq = config.stash[SESSION]
    try:
        analysis = analyze_dirs([cells], q=config.stash[SWEEP].values["fq_sweep_fdr"])
        if analysis.empty:
            return
        out = sensitivity.write_report(analysis, _reports_dir(config))
    except Exception as exc:  # the report must never turn the run into an internal error
        log.exception("sensitivity report failed")
        terminalreporter.write_line(
            f"fq sweep: no sensitivity report ({type(exc).__name__}: {exc})"
        )
        return
    if config.get_verbosity() >= 0:
        terminalreporter.write_line(f"fq sweep: {out.analysis.sentence}")
        terminalreporter.write_line(
            f"fq sweep: {len(out.analysis.rows)} cells of run {fq.run_id} -> {out.html}, "
            f"{out.markdown}"
        )


@pytest.hookimpl(optionalhook=True, trylast=True)
def pytest_html_results_summary(prefix, summary, postfix, session) -> None:
    """The sensitivity section in the main HTML report, after the stages (when cells exist)."""
    config = session.config
    cells = _cells_dir(config)
    if cells is None:
        return
    try:
        from fq_core.experiment.sweep.analysis import analyze_dirs
        from fq_core.report import sensitivity

        analysis = analyze_dirs([cells], q=config.stash[SWEEP].values["fq_sweep_fdr"])
        if analysis.empty:
            return
        postfix.append(sensitivity.section_html(analysis))
    except Exception as exc:
        log.warning("no sensitivity section in the HTML report: %s", exc)
