"""Options, fixtures, the gate and stage ordering for the experiment.

The logic lives in fq_core (stages, gate, results); this module only turns pytest's
configuration into those calls: every setting and threshold is an ini value with a documented
default and a command-line option, one run id is shared by all xdist workers, Test 1 is
ordered first, and later stages are skipped with the gate's reason when Test 1 has not passed.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fq_core.definitions import settings
from fq_core.definitions.settings import Setting
from fq_core.errors import FqError

# --- options -------------------------------------------------------------------------------

# Every setting, its default and why is fq_core.definitions.settings; here each becomes an ini value
# and a command-line flag, the default shown by `pytest --help`.


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fq", "fq-suite experiment (stages, thresholds, the Test 1 gate)")
    group.addoption(
        "--fq-model",
        action="append",
        dest="fq_model",
        default=None,
        metavar="NAME_OR_PATH",
        help="model to run the stages on (registry name or GGUF path); repeatable "
        f"(default: ini fq_models = {' '.join(settings.MODELS)})",
    )
    parser.addini(
        "fq_models", "models the stages run on", type="linelist", default=list(settings.MODELS)
    )
    group.addoption(
        "--fq-ignore-gate",
        action="store_true",
        default=False,
        help="run stages 2-4 even when Test 1 has not passed (the skip reason is recorded)",
    )
    group.addoption(
        "--fq-keep-models",
        action="store_true",
        default=False,
        help="keep the fake-quantized GGUFs under results/<run-id>/ (default: delete after "
        "evaluation, keeping their manifests)",
    )
    group.addoption(
        "--fq-run-id",
        default=None,
        metavar="ID",
        help="results/<ID>/ to write into (default: FQ_RUN_ID or a new UTC timestamp id)",
    )
    add_options(parser, group, settings.STAGE)


def add_options(parser: pytest.Parser, group, options: tuple[Setting, ...]) -> None:
    """Each setting as an ini value and its `--fq-…` flag, the default shown in the help."""
    for opt in options:
        shown = opt.default or "unset"
        group.addoption(
            opt.flag,
            dest=opt.name,
            default=None,
            metavar="VALUE",
            help=f"{_escaped(opt.help)} [ini {opt.name}, default {shown}]",
        )
        parser.addini(opt.name, f"{opt.help} [default {shown}]", default=opt.default)


def _escaped(text: str) -> str:
    """argparse %-formats a flag's help; an ini value's help is shown as it is."""
    return text.replace("%", "%%")


def option_values(config: pytest.Config, options: tuple[Setting, ...] = settings.STAGE) -> dict:
    """Every fq option: command line over pytest.ini over the documented default."""
    values: dict[str, Any] = {}
    for opt in options:
        given = config.getoption(opt.name)
        text = str(given if given is not None else config.getini(opt.name)).strip()
        try:
            values[opt.name] = opt.parse(text)
        except ValueError as exc:
            raise pytest.UsageError(f"{opt.flag} / {opt.name} = {text!r}: {exc}") from None
    return values


# --- the session: run id, lazily resolved inputs, stage results, the gate ------------------

RUN_ID = pytest.StashKey[str]()
SESSION = pytest.StashKey["FqSession"]()


@dataclass(frozen=True)
class StageCase:
    stage: str
    model: str  # as given (registry name or path)
    model_id: str
    variant: str = "deployed"

    @property
    def case(self) -> str:
        """The model's part of the id for this variant: `gemma3-270m` or `gemma3-270m-twin`."""
        from fq_core.storage.record import case_name

        return case_name(self.model_id, self.variant)

    @property
    def id(self) -> str:
        return f"{self.stage}-{self.case}"


class FqSession:
    """Per-process state: resolved inputs and each (stage, model) result, computed once."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.values = option_values(config)
        self.run_id: str = config.stash[RUN_ID]
        self.ignore_gate: bool = config.getoption("fq_ignore_gate")
        self.root = results_root(config)
        self.selected: set[tuple[str, str]] = set()  # (stage, case) in this session
        self.models = _model_ids(config)
        self._models: dict[str, Any] = {}
        self._results: dict[tuple[str, str], Any] = {}  # StageRecord
        self._tools = self._runner = self._corpus = None

    # inputs, resolved on first use so that collection stays fast
    @functools.cached_property
    def experiment(self):
        from fq_core.experiment.stages import experiment_from

        return experiment_from(self.values, self.config.getoption("fq_keep_models"))

    @property
    def tools(self):
        if self._tools is None:
            from fq_core.measurement.llama.tools import find_tools

            self._tools = find_tools()
        return self._tools

    @property
    def runner(self):
        if self._runner is None:
            from fq_core.measurement.llama.runner import LlamaRunner

            self._runner = LlamaRunner(self.tools, threads=self.experiment.settings.threads)
        return self._runner

    @property
    def corpus(self):
        """Resolved once: a corpus that cannot be found (or downloaded) fails every test with
        the same line, without a new download attempt per test."""
        if self._corpus is None:
            from fq_core.measurement.corpus import resolve_corpus

            try:
                self._corpus = resolve_corpus(self.values["fq_text"])
            except FqError as exc:
                self._corpus = exc
        if isinstance(self._corpus, FqError):
            raise self._corpus
        return self._corpus

    def model(self, case: StageCase):
        if case.model not in self._models:
            from fq_core.measurement.models import resolve_model

            ref = resolve_model(case.model)
            if ref.name != case.model_id:
                from dataclasses import replace

                ref = replace(ref, name=case.model_id)
            self._models[case.model] = ref
        return self._models[case.model]

    def check_tensors(self, index, model_id: str) -> None:
        from fq_core.experiment.stages import check_tensors

        check_tensors(self.experiment, index, model_id)

    def context(self):
        from fq_core.experiment.stages import Context

        return Context(self.run_id, self.runner, self.tools, self.corpus, self.root)

    def result(self, case: StageCase) -> dict:
        """The stage × model result: computed once per run, even across xdist workers."""
        from fq_core.experiment import protocol, stages
        from fq_core.platform import progress
        from fq_core.storage import results

        key = (case.stage, case.case)
        if key in self._results:
            return self._results[key]
        path = results.result_path(self.run_id, case.stage, case.case, self.root)
        with results.lock_for(str(path) + ".compute"):
            stored = results.load_record(self.run_id, case.stage, case.case, self.root)
            if stored is not None and stored.outcome != "running":
                self.check_reuse(stored, case)
            if stored is None or stored.outcome == "running":
                stage_ = stages.stage(case.stage)
                with progress.context(stage=stage_.title, model=case.case):  # what runs
                    stored = protocol.run_stage(
                        stage_, self.model(case), self.context(), self.experiment, case.variant
                    )
        self._results[key] = stored
        return stored

    def check_reuse(self, stored, case: StageCase) -> None:
        """A finished record of this run id answers for this session only if this session
        would have measured the same thing (BadInput naming what differs)."""
        from fq_core.errors import BadInput

        changes = self.experiment.differences(stored, self.model(case), self.corpus, self.tools)
        if changes:
            raise BadInput(
                f"run {self.run_id} already holds {case.stage}/{case.case} measured on other "
                f"inputs ({', '.join(changes[:3])}): use a new run id"
            )

    def gate(self, case: StageCase):
        """Open or closed, with the reason; Test 1 of this session is run first when needed."""
        from fq_core.experiment import gate, stages

        gate_stage = stages.GATE_STAGE.id
        if case.stage == gate_stage:
            return gate.GateDecision(True, "Test 1 is the gate", "session", self.run_id)
        session_result = None
        gate_case = StageCase(gate_stage, case.model, case.model_id, self.experiment.gate_variant)
        if (gate_stage, gate_case.case) in self.selected:
            session_result = self.result(gate_case)
        components = self.experiment.gate_identity(self.model(case), self.corpus, self.tools)
        return gate.decide(
            case.model_id,
            components,
            session_result=session_result,
            ignore=self.ignore_gate,
            root=self.root,
        )

    def skip_stage(self, case: StageCase, reason: str) -> None:
        """Store the closed stage's result (once) so the report can say why it did not run."""
        from fq_core.experiment import protocol, stages
        from fq_core.storage import results

        key = (case.stage, case.case)
        if key in self._results:
            return
        path = results.result_path(self.run_id, case.stage, case.case, self.root)
        with results.lock_for(str(path) + ".compute"):
            stored = results.load_record(self.run_id, case.stage, case.case, self.root)
            if stored is None:
                stored = protocol.skipped_result(
                    stages.stage(case.stage),
                    self.model(case),
                    self.context(),
                    self.experiment,
                    reason,
                    case.variant,
                )
                results.save_result(stored, self.root)
        self._results[key] = stored


def results_root(config: pytest.Config) -> Path:
    """FQ_RESULTS_DIR, or results/ under the rootdir (not the cwd); a file there is one line."""
    from fq_core.platform.paths import results_dir

    try:
        root = results_dir()
    except FqError as exc:
        raise pytest.UsageError(str(exc)) from None
    return root if root.is_absolute() else config.rootpath / root


def run_id(config: pytest.Config) -> str:
    """This session's run id (the same in the controller and every xdist worker)."""
    return config.stash[RUN_ID]


def pytest_configure(config: pytest.Config) -> None:
    from fq_core.storage.results import new_run_id

    config.addinivalue_line("markers", "xdist_group(name): run these tests in one xdist worker")
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "fq_run_id" in workerinput:
        config.stash[RUN_ID] = workerinput["fq_run_id"]
    else:
        config.stash[RUN_ID] = (
            config.getoption("fq_run_id") or os.environ.get("FQ_RUN_ID") or new_run_id()
        )
    # the command log goes beside results/ under the rootdir, wherever pytest was started
    if not os.environ.get("FQ_LOG_DIR"):
        os.environ["FQ_LOG_DIR"] = str(config.rootpath / "logs")
    config.stash[SESSION] = session = FqSession(config)  # validates every option now
    if workerinput is None:
        _refuse_other_settings(session)


def _refuse_other_settings(session: FqSession) -> None:
    """A run id holding records is resumed only with their settings (fq_core.experiment.stages)."""
    from fq_core.experiment.stages import check_resume

    try:
        check_resume(session.run_id, session.experiment, session.root)
    except FqError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """`-n N` without --dist means loadgroup: each model's stages stay in one worker, in order.

    Not in addopts: any --dist other than "no" makes pytest-benchmark disable benchmarks even
    in serial runs. Runs before xdist's own hook, which would pick "load".
    """
    opt = config.option
    if getattr(opt, "numprocesses", None) and getattr(opt, "dist", None) == "no":
        if not getattr(opt, "distload", False):
            opt.dist = "loadgroup"


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """xdist controller → worker: share the run id so all workers write one results/<run-id>/."""
    node.workerinput["fq_run_id"] = node.config.stash[RUN_ID]
    node.workerinput["fq_dist"] = node.config.option.dist


def _threshold_terms(t) -> str:
    """The header's limits; a report-only check (no limit) is named as such, not as None."""
    terms = [
        ("dPPL<", t.ppl_delta_max),
        ("rel<", t.max_rel_error),
        ("KLD<=", t.kld_mean_max),
        ("same-top>=", t.same_top_min),
        ("agreement>=", t.agreement_min),
        ("noise-factor<=", t.noise_factor_max),
        ("speed-ratio>=", t.speed_ratio_min),
    ]
    limits = " ".join(f"{name}{limit:g}" for name, limit in terms if limit is not None)
    unset = [name.rstrip("<>=") for name, limit in terms if limit is None]
    return limits + (f"; report-only: {', '.join(unset)}" if unset else "")


def pytest_report_header(config: pytest.Config) -> list[str]:
    s = config.stash[SESSION]
    try:
        t = s.experiment.thresholds
    except ImportError as exc:  # a library module not there yet: say so, do not break pytest
        return [f"fq: experiment unavailable ({exc})"]
    return [
        f"fq: run {s.run_id} -> {s.root / s.run_id}",
        *(f"fq: model {m.line()}" for m in s.models),
        f"fq: {s.experiment.fmt}/{s.experiment.rounding}; "
        f"chunks {s.experiment.settings.chunks} x ctx {s.experiment.settings.ctx}; "
        f"placebo seeds {len(s.experiment.placebo_seeds)}; answers "
        f"{' + '.join(s.experiment.variants)} (gate: {s.experiment.gate_variant})",
        "fq: thresholds " + _threshold_terms(t) + ("; GATE IGNORED" if s.ignore_gate else ""),
    ]


def _model_ids(config: pytest.Config):
    """The session's models and their ids (fq_core.measurement.models.model_ids): a collision
    or a missing file is one line at the start, not a model left out or a failure per test."""
    from fq_core.measurement.models import model_ids

    given = config.getoption("fq_model") or config.getini("fq_models")
    try:
        return model_ids(given)
    except FqError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "fq_case" not in metafunc.fixturenames:
        return
    from fq_core.experiment.stages import STAGES

    session = metafunc.config.stash[SESSION]
    cases = [
        StageCase(s.id, m.given, m.id, v)
        for s in STAGES
        for m in session.models
        for v in session.experiment.variants
    ]
    for m in session.models:
        refuse_bad_tensors(
            metafunc.config, m.given, lambda index, m=m: session.check_tensors(index, m.id)
        )
    # one xdist group per model: with `-n N` (loadgroup) a model's stages share one worker, in
    # order; marked here because xdist names the groups before any modifyitems hook of ours
    params = [
        pytest.param(c, id=c.id, marks=pytest.mark.xdist_group(name=f"fq-{c.model_id}"))
        for c in cases
    ]
    metafunc.parametrize("fq_case", params)


REFUSALS = pytest.StashKey[list[str]]()


def refuse_bad_tensors(config: pytest.Config, model: str, check) -> None:
    """Run `check(index)` on a model that is here without fetching (collection stays offline);
    a fault is refused in one line when collection ends (raised inside a collector, pytest
    would print it as a traceback)."""
    from fq_core.measurement.gguf_index import read_index
    from fq_core.measurement.models import resolve_model

    try:
        index = read_index(resolve_model(model, fetch=False).path)
    except FqError:
        return  # not here yet: the stage says so when it runs
    try:
        check(index)
    except FqError as exc:
        refuse(config, str(exc))


def refuse(config: pytest.Config, message: str) -> None:
    """A fault found while collecting: one line when collection ends, not a traceback."""
    config.stash.setdefault(REFUSALS, []).append(message)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    refusals = session.config.stash.get(REFUSALS, [])
    if refusals:
        raise pytest.UsageError(*dict.fromkeys(refusals))


def stage_case(item: pytest.Item) -> StageCase | None:
    """The stage × model × answer a test item measures; None for any other test."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("fq_case") if callspec is not None else None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Test 1 first (whatever the selection order), then each stage in order; one worker per model.

    Runs after -k/-m deselection, so `selected` is what this session will really run.
    """
    from fq_core.experiment.stages import STAGES

    session = config.stash[SESSION]
    order = {s.id: s.index for s in STAGES}
    models = {m.id: i for i, m in enumerate(session.models)}
    variants = {"deployed": 0, "intrinsic": 1}
    keyed = []
    for pos, item in enumerate(items):
        case = stage_case(item)
        if case is None:
            keyed.append(((0, 0, 0, 0, pos), item))
            continue
        session.selected.add((case.stage, case.case))
        where = (order[case.stage], models.get(case.model_id, 99), variants[case.variant])
        keyed.append(((1, *where, pos), item))
    items[:] = [item for _, item in sorted(keyed, key=lambda kv: kv[0])]
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and workerinput.get("fq_dist") == "loadgroup":
        _group_node_ids(items)


def _group_node_ids(items: list[pytest.Item]) -> None:
    """Suffix node ids with their xdist group, as xdist's worker does for `--dist loadgroup`.

    xdist only does it when --dist loadgroup is on the worker's own command line, and on
    pytest ≥ 9.2 its `_nodeid` assignment no longer changes the id (ids became structured);
    our -n default (see pytest_cmdline_main) is set on the controller, so we do it here.
    """
    try:
        from _pytest.nodeid import coerce_node_id
    except ImportError:  # pytest < 9.2: the string attribute is the id
        coerce_node_id = None
    for item in items:
        names = sorted(
            {
                str(m.kwargs.get("name", m.args[0] if m.args else "default"))
                for m in item.iter_markers("xdist_group")
            }
        )
        if names and "@" not in item.nodeid.rsplit("]", 1)[-1]:
            grouped = f"{item.nodeid}@{'_'.join(names)}"
            if coerce_node_id is not None:
                item._id = coerce_node_id(grouped)
            else:
                item._nodeid = grouped


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fq_session(request: pytest.FixtureRequest) -> FqSession:
    return request.config.stash[SESSION]


@pytest.fixture
def fq_result(request: pytest.FixtureRequest, fq_session: FqSession, fq_case: StageCase):
    """The stored result of this test's stage × model; skips with the gate's reason if closed."""
    from fq_core.storage import results

    node = request.node
    path = results.result_path(fq_session.run_id, fq_case.stage, fq_case.case, fq_session.root)
    node.user_properties += [
        ("fq_run_id", fq_session.run_id),
        ("fq_stage", fq_case.stage),
        ("fq_model", fq_case.model_id),
        ("fq_variant", fq_case.variant),
        ("fq_result", str(path)),
    ]
    try:
        decision = fq_session.gate(fq_case)
        node.user_properties.append(("fq_gate", decision.reason))
        if not decision.open:
            fq_session.skip_stage(fq_case, decision.reason)
            pytest.skip(decision.reason)
        return fq_session.result(fq_case)
    except FqError as exc:  # a missing model, corpus or tool: one line, not a traceback
        failure = f"{type(exc).__name__}: {exc}"
    pytest.fail(failure, pytrace=False)  # outside the except: no "during handling" chain
