"""The evidence: reads a stored results tree and turns it into decisions, tables and charts.

Nothing here runs llama.cpp or computes a metric; every figure comes from
`results/<run-id>/<stage>/<model>.json` as the stage protocol stored it, so a report can be
rebuilt from a results directory alone, on another machine, long after the run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import checks
from ..errors import BadInput

log = logging.getLogger(__name__)

# The plan's stages in order; unknown stage ids sort after these, by name.
STAGE_ORDER = ("layer0", "layers0-2", "layers0-9", "all-layers")
GATE_STAGE = "layer0"
FAILING = checks.FAILING


@dataclass(frozen=True)
class StageResult:
    """One stage × model record, as stored; `data` is the JSON object itself."""

    path: Path
    data: Mapping[str, Any]

    @property
    def stage(self) -> str:
        return str(self.data.get("stage") or self.path.parent.name)

    @property
    def stage_title(self) -> str:
        return str(self.data.get("stage_title") or self.stage)

    @property
    def model(self) -> str:
        return str((self.data.get("model") or {}).get("name") or self.path.stem)

    @property
    def outcome(self) -> str:
        return str(self.data.get("outcome") or "unknown")

    @property
    def checks(self) -> Mapping[str, Mapping[str, Any]]:
        return self.data.get("checks") or {}

    def section(self, name: str) -> Mapping[str, Any]:
        """A top-level object of the record, or {} when the stage did not get that far."""
        value = self.data.get(name)
        return value if isinstance(value, Mapping) else {}

    @property
    def n_layers(self) -> int | None:
        """How many layers this stage quantized (the x axis of the cross-stage charts)."""
        per_tensor = self.section("numeric").get("per_tensor") or []
        layers = {t.get("layer") for t in per_tensor if t.get("layer") is not None}
        return len(layers) or None


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

    def later_stages_present(self) -> bool:
        """True when any stage after Test 1 has a record that is not a gate skip."""
        return any(r.stage != GATE_STAGE and r.outcome != "skipped" for r in self.results)


@dataclass(frozen=True)
class DecidingCheck:
    name: str
    status: str
    detail: str


@dataclass(frozen=True)
class Decision:
    """GO / NO-GO for moving past Test 1, for one model, and the checks that decided it."""

    model: str
    verdict: str  # "GO", "NO-GO" or "NO DECISION"
    reason: str
    deciding: tuple[DecidingCheck, ...]
    reported: tuple[DecidingCheck, ...]


def stage_sort_key(stage: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(stage), "") if stage in STAGE_ORDER else (len(STAGE_ORDER), stage)


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*/*.json"))


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
    return max((p.stat().st_mtime for p in run_dir.glob("*/*.json")), default=0.0)


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
    """Read every `<stage>/<model>.json` of a run; a record that is not valid JSON is an error
    naming the file, never silently left out of the evidence."""
    run_dir = Path(run_dir)
    results = []
    for path in sorted(run_dir.glob("*/*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BadInput(f"unreadable results file {path}: {exc}") from exc
        if not isinstance(data, dict) or "stage" not in data:
            log.info("skipping %s: not a stage record", path)
            continue
        results.append(StageResult(path=path, data=data))
    run_id = next((str(r.data.get("run_id")) for r in results if r.data.get("run_id")), None)
    return RunResults(run_dir=run_dir, run_id=run_id or run_dir.name, results=tuple(results))


def decide(run: RunResults, model: str) -> Decision:
    """The gate as the report states it: Test 1's gating checks (fq_core.checks' one rule)."""
    result = run.get(GATE_STAGE, model)
    if result is None:
        return Decision(model, "NO DECISION", "Test 1 (layer0) was not run in this run", (), ())
    if result.outcome == "skipped":
        reason = result.data.get("skip_reason") or "Test 1 was skipped"
        return Decision(model, "NO DECISION", str(reason), (), ())
    asserted, reported = [], []
    for name, raw in result.checks.items():
        check = checks.as_check(raw)
        item = DecidingCheck(name, check.status, check.detail)
        (asserted if check.gates else reported).append(item)
    failed = [c for c in asserted if c.status in FAILING]
    pending = [c for c in asserted if c.status not in FAILING + ("passed",)]
    if failed:
        names = ", ".join(c.name for c in failed)
        return Decision(model, "NO-GO", f"failed: {names}", tuple(failed), tuple(reported))
    if result.outcome in FAILING:
        return Decision(model, "NO-GO", "Test 1 failed", tuple(asserted), tuple(reported))
    if pending or not asserted:
        names = ", ".join(c.name for c in pending) or "all"
        return Decision(
            model, "NO DECISION", f"checks not finished: {names}", tuple(pending), tuple(reported)
        )
    names = ", ".join(c.name for c in asserted)
    return Decision(
        model,
        "GO",
        f"all {len(asserted)} asserted checks passed ({names})",
        tuple(asserted),
        tuple(reported),
    )


def decisions(run: RunResults) -> tuple[Decision, ...]:
    return tuple(decide(run, m) for m in run.models)
