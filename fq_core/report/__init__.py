"""The evidence: reads a stored results tree and turns it into decisions, tables and charts.

Nothing here runs llama.cpp or computes a metric; every figure comes from
`results/<run-id>/<stage>/<model>.json` as the stage protocol stored it, so a report can be
rebuilt from a results directory alone, on another machine, long after the run. A
comparison with a reference (`--fq-compare`) is read the same way, from
`results/<run-id>/<stage>/regression/<case>.json`, as fq_core.experiment.regression stored it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput
from ..experiment import checks, regression
from ..experiment.checks import Decision, Verdict
from ..experiment.regression import RunComparison
from ..experiment.stages import GATE_STAGE, STAGES
from ..storage import history
from ..storage import record as record_mod
from ..storage.record import StageRecord

log = logging.getLogger(__name__)

_STAGE_IDS = tuple(s.id for s in STAGES)  # the plan's order; unknown ids sort after, by name


@dataclass(frozen=True)
class StageResult:
    """One stage × model record as stored, typed (fq_core.storage.record.StageRecord)."""

    path: Path
    record: StageRecord
    #: the regression check's result for this stage × case (`--fq-compare`, `fq diff` stores
    #: none), read from results/<run>/<stage>/regression/<case>.json; None when not compared
    comparison: RunComparison | None = None

    @property
    def stage(self) -> str:
        return self.record.stage

    @property
    def stage_title(self) -> str:
        return self.record.stage_title

    @property
    def model(self) -> str:
        """The model as every table names it: `gemma3-270m`, or `gemma3-270m-twin` for the
        intrinsic answer (its float twin), so each answer has its own rows and charts."""
        return self.record.case

    @property
    def base_model(self) -> str:
        return self.record.model.name

    @property
    def variant(self) -> str:
        return self.record.variant

    @property
    def outcome(self) -> str:
        return self.record.outcome

    @property
    def n_layers(self) -> int | None:
        return self.record.n_layers


@dataclass(frozen=True)
class RunResults:
    """Every stage × model record of one run."""

    run_dir: Path
    run_id: str
    results: tuple[StageResult, ...]

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(sorted({r.model for r in self.results}))

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(sorted({r.stage for r in self.results}, key=stage_sort_key))

    def get(self, stage: str, model: str) -> StageResult | None:
        for r in self.results:
            if r.stage == stage and r.model == model:
                return r
        return None

    def in_order(self) -> tuple[StageResult, ...]:
        """Stage by stage (Test 1 first), models alphabetical: the order every table uses."""
        return tuple(sorted(self.results, key=lambda r: (stage_sort_key(r.stage), r.model)))

    def for_model(self, model: str) -> tuple[StageResult, ...]:
        return tuple(
            sorted(
                (r for r in self.results if r.model == model), key=lambda r: stage_sort_key(r.stage)
            )
        )

    @property
    def results_root(self) -> Path:
        """The results store this run lives in (its earlier runs are the history charts')."""
        return self.run_dir.parent

    def compared(self) -> tuple[StageResult, ...]:
        """The stage × case records that carry a comparison with a reference, in order."""
        return tuple(r for r in self.in_order() if r.comparison is not None)

    def later_stages_present(self) -> bool:
        """True when any stage after Test 1 has a record that is not a gate skip."""
        return any(r.stage != GATE_STAGE.id and r.outcome != "skipped" for r in self.results)


def stage_sort_key(stage: str) -> tuple[int, str]:
    if stage in _STAGE_IDS:
        return (_STAGE_IDS.index(stage), "")
    return (len(_STAGE_IDS), stage)


def record_files(run_dir: Path) -> list[Path]:
    """A run's stage records, `<stage>/<case>.json`. Not a results root's `<run>/run.json`
    (storage.history's run manifest): without this, a root would pass for a run directory."""
    return sorted(p for p in run_dir.glob("*/*.json") if p.name != history.MANIFEST_FILE)


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and bool(record_files(path))


def latest_run_dir(results_root: Path, *, newer_than: float | None = None) -> Path | None:
    """The most recently written run directory under a results root (the gate record and
    other files at the top level are ignored)."""
    if not results_root.is_dir():
        return None
    runs = [p for p in results_root.iterdir() if is_run_dir(p)]
    if newer_than is not None:
        runs = [p for p in runs if _newest_mtime(p) >= newer_than]
    return max(runs, key=_newest_mtime, default=None)


def _newest_mtime(run_dir: Path) -> float:
    return max((p.stat().st_mtime for p in record_files(run_dir)), default=0.0)


def resolve_run_dir(path: str | Path) -> Path:
    """A run directory given either itself or a results root holding runs."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"results directory not found: {path}")
    if is_run_dir(path):
        return path
    run = latest_run_dir(path)
    if run is None:
        raise BadInput(f"no stage results (<stage>/<model>.json) under {path}")
    return run


def load_run(run_dir: str | Path) -> RunResults:
    """Read every `<stage>/<model>.json` of a run, typed; a record that is not valid JSON or
    does not match the schema is BadInput naming the file and the field, never silently left
    out of the evidence."""
    run_dir = Path(run_dir)
    results = []
    for path in record_files(run_dir):
        rec = record_mod.read(path)
        results.append(StageResult(path=path, record=rec, comparison=_comparison(run_dir, rec)))
    run_id = next((r.record.run_id for r in results), None)
    return RunResults(run_dir=run_dir, run_id=run_id or run_dir.name, results=tuple(results))


def _comparison(run_dir: Path, rec: StageRecord) -> RunComparison | None:
    """The stored comparison of this stage × case (storage.history.comparison_path), or None.

    One that cannot be read, or that belongs to another stage × case, is BadInput naming the
    file: a regression must never drop out of the report silently."""
    where = run_dir.resolve()
    path = history.comparison_path(where.name, rec.stage, rec.case, where.parent)
    if not path.is_file():
        return None
    cmp = regression.read(path)
    if (cmp.stage, cmp.case) != (rec.stage, rec.case):
        raise BadInput(
            f"{path}: a comparison of {cmp.stage}/{cmp.case}, stored for {rec.stage}/{rec.case}"
        )
    return cmp


def decide(run: RunResults, model: str, errors: Sequence[str] = ()) -> Decision:
    """The gate's decision (fq_core.experiment.checks.decide) for one model of this run."""
    result = run.get(GATE_STAGE.id, model)
    if result is None:
        why = f"{GATE_STAGE.title} ({GATE_STAGE.id}) was not run in this run"
        return Decision(model, Verdict.NO_DECISION, why)
    return checks.decide(result.record, errors)


def decisions(run: RunResults, errors: Sequence[str] = ()) -> tuple[Decision, ...]:
    """One decision per model, from its deployed Test 1 (the default gate); from the
    intrinsic one (`-twin`) only when the run measured nothing else for that model. `errors`:
    the session's (pytest), which leave no GO standing."""
    cases = []
    for base in sorted({r.base_model for r in run.results}):
        deployed = any(r.base_model == base and r.variant == "deployed" for r in run.results)
        cases.append(base if deployed else record_mod.case_name(base, "intrinsic"))
    return tuple(decide(run, c, errors) for c in cases)


def other_answer(run: RunResults, decided: Decision) -> Decision | None:
    """The verdict the answer that does not gate would give (the intrinsic `-twin` beside a
    deployed decision), shown beside the decision so a failing twin is never out of sight;
    None when the run measured only one answer for that model."""
    result = run.get(GATE_STAGE.id, decided.model)
    if result is None:
        return None
    base, variant = result.base_model, result.variant
    other = record_mod.case_name(base, "intrinsic" if variant == "deployed" else "deployed")
    if other == decided.model or run.get(GATE_STAGE.id, other) is None:
        return None
    return decide(run, other)


def failed_label(nodeid: str) -> str:
    """`test_kld[layer0-gemma3-270m-twin]` → `kld layer0-gemma3-270m-twin`: a failed test
    as the title names it (the check and the case, not the file)."""
    name = nodeid.rsplit("::", 1)[-1].removeprefix("test_")
    head, _, param = name.partition("[")
    return f"{head} {param.rstrip(']')}".strip()


def session_title(decided: Sequence[Decision], failed: Sequence[str], *, limit: int = 3) -> str:
    """The decisions and, when any test of the session failed, how many and which: a GO of
    the gating answer never reads all-green over a failed session."""
    title = ", ".join(f"{d.model} {d.verdict}" for d in decided) or "no decision"
    if failed:
        labels = list(dict.fromkeys(failed_label(n) for n in failed))
        shown = ", ".join(labels[:limit]) + (
            f" and {len(labels) - limit} more" if len(labels) > limit else ""
        )
        title += f" · {len(failed)} failed: {shown}"
    return title
