"""pytest wiring of the regression check (the rule itself is fq_core.experiment.regression).

- `--fq-compare[=RUN_ID|DIR]`: each stage × case gets `test_regression`, comparing this run's
  record with the reference's (default: `fq-reference/` in the rootdir when it holds that
  stage × case, else the latest earlier run in the results store that does). Without the
  option the test is skipped with the reason: it never passes having compared nothing.
- `--fq-compare-fail=EXPR[,EXPR…]` (repeatable): tolerances, pytest-benchmark's syntax
  (`kld:10%`, `delta_ppl:0.5`, `speed:20%`, `kld_max:off`) over the documented defaults.
- `--fq-save-reference` (no value: it never swallows a test path): when the session passed,
  its records become the reference in `--fq-reference-dir` (default `fq-reference/`), which
  may hold nothing but a reference fq-suite wrote (fq_core.storage.history.check_reference_dest).
- Every run directory gets `run.json` (git commit, argv, host, timestamps, exit status).

Each comparison is stored beside the record (results/<run>/<stage>/regression/<case>.json)
and summarised at the end of the session.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fq_core.definitions.settings import INTRINSIC_TOLERANCES

STATE = pytest.StashKey["RegressionState"]()
_AUTO = "auto"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fq", "fq-suite experiment (stages, thresholds, the Test 1 gate)")
    group.addoption(
        "--fq-compare",
        dest="fq_compare",
        nargs="?",
        const=_AUTO,
        default=None,
        metavar="RUN_ID|DIR",
        help="compare every stage x case with a reference in test_regression: a run id of "
        "the results store, a directory (a saved reference or a run), or nothing = fq-reference/ "
        "in the rootdir when it has that stage x case, else the latest earlier run that has "
        "(default: off, test_regression is skipped). Write --fq-compare=VALUE when a test path "
        "follows",
    )
    group.addoption(
        "--fq-compare-fail",
        dest="fq_compare_fail",
        action="append",
        default=None,
        metavar="EXPR",
        help="tolerances of test_regression, METRIC:N%% (relative to the reference), "
        "METRIC:N (absolute, in the metric's unit), METRIC:report or METRIC:off, comma-"
        "separated or repeated, over the defaults (changed:0, max_rel:0, ppl:1%%, "
        "delta_ppl:0.5, kld:25%%, same_top:2; the KLD percentiles, rms_dp, placebo_ratio, "
        "agreement and speed reported only; the intrinsic answer's: "
        f"{INTRINSIC_TOLERANCES.replace('%', '%%')}); z:N sets the uncertainty multiple "
        "(default 2). "
        "A metric fails only when worse by more than its tolerance AND by more than z times "
        "its uncertainty (llama.cpp's standard errors + the placebo spread)",
    )
    group.addoption(
        "--fq-save-reference",
        dest="fq_save_reference",
        action="store_true",
        default=False,
        help="when the session passed, save its stage records as the reference in "
        "--fq-reference-dir, replacing the reference there (never anything else: a directory "
        "holding other files is refused before the session runs); commit that directory. "
        "Same as `fq reference save RUN_ID DIR --force` afterwards. Takes no value, so a test "
        "path after it stays a test path",
    )
    group.addoption(
        "--fq-reference-dir",
        dest="fq_reference_dir",
        default=None,
        metavar="DIR",
        help="the reference directory --fq-save-reference writes and --fq-compare (without a "
        "value) reads first (default: fq-reference/ in the rootdir)",
    )


@dataclass
class RegressionState:
    spec: str | None  # None: off; "auto"; else a run id or directory
    tolerances: dict[str, Any]
    root: Path  # the results store
    rootdir: Path
    reference_dir: Path  # --fq-reference-dir
    run_id: str
    source: Any = None  # history.Source when given explicitly
    specs: Any = None  # --fq-compare-fail as given: read over each answer's own defaults
    save_dir: Path | None = None
    manifest_done: bool = False
    _found: dict[tuple[str, str], Any] = field(default_factory=dict)

    @property
    def tolerance_text(self) -> str:
        from fq_core.experiment.regression import tolerances_text

        return tolerances_text(self.tolerances)

    def reference_for(self, rec) -> tuple[Any, Any] | str:
        """(Source, reference record) for this record's stage × case, or why there is none."""
        key = (rec.stage, rec.case)
        if key not in self._found:
            self._found[key] = self._find(rec)
        return self._found[key]

    def _find(self, rec):
        from fq_core.storage import history

        where = f"{rec.stage}/{rec.case}"
        if self.source is not None:
            ref = self.source.load(rec.stage, rec.case)
            if ref is None:
                return f"not compared: {self.source.label} has no record of {where}"
            return self.source, ref
        default = history.saved_reference(self.reference_dir)
        if default is not None:
            ref = default.load(rec.stage, rec.case)
            if ref is not None:
                return default, ref
        found = history.latest_run_with(
            rec.stage, rec.case, self.root, exclude=self.run_id, before=rec.started_at
        )
        if found is None:
            return (
                f"not compared: nothing to compare {where} with (no reference with it in "
                f"{self.reference_dir} and no earlier run in {self.root} has it); "
                "save one with --fq-save-reference or `fq reference save`"
            )
        return found


def _results_root(config: pytest.Config) -> Path:
    from fq_pytest.plugin import results_root

    return results_root(config)


def _run_id(config: pytest.Config) -> str:
    from fq_pytest.plugin import run_id

    return run_id(config)


@pytest.hookimpl(trylast=True)  # after fq_pytest.plugin has chosen the run id
def pytest_configure(config: pytest.Config) -> None:
    from fq_core.errors import FqError
    from fq_core.experiment import regression
    from fq_core.platform import atomic
    from fq_core.storage import history

    spec = config.getoption("fq_compare", default=None)
    if spec is not None and not str(spec).strip():
        spec = _AUTO
    try:  # a bad results store is one line now, not a traceback in the first stage test
        root = atomic.check_directory(_results_root(config), what="results store")
    except FqError as exc:
        raise pytest.UsageError(str(exc)) from None
    try:
        specs = config.getoption("fq_compare_fail", None)
        tolerances = regression.parse_tolerances(specs)  # refused now, not per test
        source = None
        if spec not in (None, _AUTO):
            source = history.resolve(str(spec), root)
    except FqError as exc:
        raise pytest.UsageError(f"--fq-compare / --fq-compare-fail: {exc}") from None
    given = config.getoption("fq_reference_dir", default=None)
    reference_dir = Path(given) if given else config.rootpath / history.DEFAULT_REFERENCE_DIR
    save_dir = None
    if config.getoption("fq_save_reference", default=False):
        save_dir = reference_dir
        try:  # refused before the session runs, not after it
            history.check_reference_dest(save_dir, force=True, root=root)
        except FqError as exc:
            raise pytest.UsageError(f"--fq-save-reference: {exc}") from None
    config.stash[STATE] = RegressionState(
        spec=spec,
        tolerances=tolerances,
        specs=specs,
        root=root,
        rootdir=config.rootpath,
        reference_dir=reference_dir,
        run_id=_run_id(config),
        source=source,
        save_dir=save_dir,
    )


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash.get(STATE, None)
    if state is None or state.spec is None:
        return []
    what = (
        state.source.label
        if state.source is not None
        else f"{state.reference_dir} if it has the stage x case, else the latest earlier run"
    )
    return [f"fq: compare with {what}; tolerances {state.tolerance_text}"]


def _is_worker(config: pytest.Config) -> bool:
    return getattr(config, "workerinput", None) is not None


def _argv(config: pytest.Config) -> list[str]:
    return [Path(sys.argv[0]).name, *map(str, config.invocation_params.args)]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """The run manifest, written as the first stage test starts (so neither `--collect-only`
    nor a session that deselected every stage leaves a run directory behind)."""
    config = item.config
    state = config.stash.get(STATE, None)
    if state is None or state.manifest_done or "fq_case" not in getattr(item, "fixturenames", ()):
        return
    state.manifest_done = True
    from fq_core.errors import FqError
    from fq_core.storage import history

    try:
        history.ensure_manifest(state.run_id, _argv(config), state.root, cwd=config.rootpath)
    except FqError as exc:  # a manifest must never stop the experiment
        _later(config, f"fq: run manifest not written: {exc}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if _is_worker(config) or STATE not in config.stash:
        return
    from fq_core.errors import FqError
    from fq_core.storage import history

    state = config.stash[STATE]
    run = history.results.run_dir(state.run_id, state.root)
    if not (run.is_dir() and any(run.glob("*/*.json"))):
        if state.save_dir is not None:
            _later(config, f"fq: reference not saved: run {state.run_id} stored no stage records")
        return
    try:
        history.finish_manifest(
            state.run_id, int(exitstatus), _argv(config), state.root, cwd=config.rootpath
        )
    except FqError as exc:
        _later(config, f"fq: run manifest not completed: {exc}")
    if state.save_dir is None:
        return
    if int(exitstatus) != 0:
        _later(
            config,
            f"fq: reference NOT saved to {state.save_dir}: the session did not pass "
            f"(exit status {int(exitstatus)}); `fq reference save {state.run_id}` "
            "saves it anyway",
        )
        return
    try:
        saved = history.save_reference(
            history.open_directory(run), state.save_dir, force=True, root=state.root
        )
    except FqError as exc:
        _later(config, f"fq: reference not saved: {exc}")
        return
    _later(
        config,
        f"fq: saved run {state.run_id} as the reference in {saved.path} "
        f"({len(saved.manifest.cases)} records)",
    )


_LATER = pytest.StashKey[list]()


def _later(config: pytest.Config, line: str) -> None:
    config.stash.setdefault(_LATER, []).append(line)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(STATE, None)
    lines = list(config.stash.get(_LATER, []))
    if state is not None and state.spec is not None:
        from fq_core.errors import FqError
        from fq_core.experiment import regression
        from fq_core.storage import history

        for path in history.comparison_paths(state.run_id, state.root):
            try:
                cmp = regression.read(path)
            except FqError as exc:
                lines.append(f"fq: {exc}")
                continue
            lines.append(f"fq: {cmp.stage}-{cmp.case}: {cmp.summary}")
    if lines:
        terminalreporter.write_sep("-", "fq regression")
        for line in lines:
            terminalreporter.write_line(line)


# --- the fixture test_regression uses -----------------------------------------------------------


@pytest.fixture
def fq_regression(request: pytest.FixtureRequest, fq_session, fq_result):
    """This stage × case compared with the reference (fq_core.experiment.regression.RunComparison),
    stored beside the record; skips with the reason when there is nothing to compare."""
    from fq_core.errors import FqError
    from fq_core.experiment import regression
    from fq_core.storage import history

    state: RegressionState = request.config.stash[STATE]
    if state.spec is None:
        pytest.skip(
            "not compared: no reference given — run with --fq-compare[=RUN_ID|DIR] "
            "(test_regression asserts nothing without one)"
        )
    try:
        found = state.reference_for(fq_result)
        if isinstance(found, str):
            pytest.skip(found)
        source, ref = found
        cmp = regression.compare_runs(
            ref,
            fq_result,
            state.specs,
            reference_source=source.label,
            reference_path=str(source.record_path(ref.stage, ref.case)),
            reference_commit=_commit(history.source_manifest(source)),
            commit=_commit(history.read_manifest(fq_session.run_id, fq_session.root)),
        )
        path = regression.save(cmp, fq_session.root)
    except FqError as exc:
        pytest.fail(f"{type(exc).__name__}: {exc}", pytrace=False)
    request.node.user_properties.append(("fq_regression", str(path)))
    return cmp


def _commit(manifest) -> str | None:
    if manifest is None or manifest.git.commit is None:
        return None
    dirty = " (dirty)" if manifest.git.dirty else ""
    return manifest.git.commit[:12] + dirty


def regression_outcome(cmp) -> None:
    """End a test the way fq_core.experiment.regression.ending says (skip / fail / pass)."""
    from fq_core.experiment.regression import ending

    how, message = ending(cmp)
    if how == "skip":
        pytest.skip(message)
    if how == "fail":
        pytest.fail(message, pytrace=False)
    assert how == "pass", message
