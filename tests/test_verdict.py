"""What a verdict may rest on (issue 18, items 4 and 5), tried the way the issue's attacks did.

No GO from a record that never finished (a kill -9 during Test 1) nor from a session that had
errors; a run id holding records answers only for the settings and inputs that wrote them;
`make gate` never rewrites its reports from an older run; a speed ratio of two sessions
neither shows nor gates. Records are real files in a results store written through
fq_core.storage.results, read back by `fq report`, pytest-html and the plugin as a user runs them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gguf_factory import build_gguf
from record_factory import make_record

from fq_core.errors import BadInput
from fq_core.experiment import stages
from fq_core.measurement.corpus import resolve_corpus
from fq_core.measurement.models import resolve_model
from fq_core.storage import record, results

pytest_plugins = ("pytester",)

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"


def _store(root: Path, run_id: str, **fields) -> Path:
    """A Test 1 record as a default session writes it (its settings and limits)."""
    exp = stages.Experiment()
    data = make_record(
        run_id=run_id,
        model={"name": MODEL, "path": f"/models/{MODEL}.gguf", "sha256": "ab" * 32},
        settings=exp.settings_json(),
        **fields,
    )
    return results.save_result(record.from_builtins(data), root)


def _fq(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fq_core.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _passed(detail: str) -> dict:
    return {"status": "passed", "detail": detail, "value": 0.0, "threshold": 0.0}


# --- a record that never finished -------------------------------------------------------------


def test_a_record_left_running_by_a_kill_gives_no_decision(tmp_path):
    """The attack: kill -9 during Test 1 leaves the record `running` with the two checks done
    before the baseline; `fq report` said GO ("all 2 asserted checks passed")."""
    root = tmp_path / "results"
    _store(
        root,
        "KILLED",
        outcome="running",
        finished_at=None,
        checks={
            "quantize": _passed("14 of 640 elements changed"),
            "numeric": _passed("max rel error 0.0038 < 0.01"),
        },
    )
    proc = _fq("report", str(root), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith(MODEL))
    assert line.strip().startswith(
        f"{MODEL}: NO DECISION (Test 1 did not finish: its record is "
        "still 'running' since 2026-11-29T00:00:00Z"
    )
    assert "checks so far: quantize passed, numeric passed" in line
    md = (tmp_path / "out" / "test1_results.md").read_text(encoding="utf-8")
    assert f"**{MODEL}: NO DECISION**" in md
    assert f"**{MODEL}: GO**" not in md


def test_the_same_record_finished_still_says_go(tmp_path):
    """The control: a finished record whose gating checks passed is a GO."""
    root = tmp_path / "results"
    _store(root, "DONE")
    proc = _fq("report", str(root), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert f"{MODEL}: GO (all 9 asserted checks passed" in proc.stdout
    assert f"run: {root / 'DONE'} (started 2026-11-29T00:00:00Z)" in proc.stdout  # which, when


# --- a session that had errors: the pytest-html title and decision -------------------------

CONFTEST = """
pytest_plugins = ["fq_pytest.plugin", "fq_pytest.report"]
"""

TESTS = """
import pytest


@pytest.fixture
def broken():
    raise RuntimeError("a fixture that breaks")


def test_fine():
    pass


@pytest.mark.parametrize("n", range(3))
def test_broken(broken, n):
    pass
"""


@pytest.fixture
def inner(pytester, monkeypatch, tmp_path):
    """A pytest session with the fq plugins and pytest-html, writing into tmp_path."""
    monkeypatch.setenv("FQ_RESULTS_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("FQ_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.delenv("FQ_RUN_ID", raising=False)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_inner=TESTS)
    return pytester


def _title(html: Path) -> str:
    text = html.read_text(encoding="utf-8")
    return re.search(r"<title[^>]*>(.*?)</title>", text, re.S).group(1)


def _verdict(html: Path, model: str) -> str:
    """The decision block's verdict for `model`, as the report states it."""
    tag = re.search(
        rf'<div class="fq-decision" data-model="{re.escape(model)}" '
        r'data-verdict="([^"]+)">',
        html.read_text(encoding="utf-8"),
    )
    return tag.group(1)


def test_a_session_with_errors_states_no_go_in_the_html_report(inner, tmp_path):
    """The attack: the pytest-html title said GO although the session had errors."""
    _store(tmp_path / "store", "ERR")
    html = tmp_path / "r.html"
    result = inner.runpytest(
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        "--fq-run-id",
        "ERR",
        f"--html={html}",
        "--self-contained-html",
    )
    result.assert_outcomes(passed=1, errors=3)
    title = _title(html)
    failed = "3 failed: broken 0, broken 1, broken 2"  # never a bare verdict over them
    assert title == f"fq-suite go/no-go report: {MODEL} NO DECISION · {failed}"
    text = html.read_text(encoding="utf-8")
    assert _verdict(html, MODEL) == "NO DECISION"
    assert "this session had 3 errors (test_inner.py::test_broken[0] and 2 more)" in text


def test_the_same_session_without_errors_says_go(inner, tmp_path):
    _store(tmp_path / "store", "OK")
    html = tmp_path / "r.html"
    result = inner.runpytest(
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        "--fq-run-id",
        "OK",
        "-k",
        "fine",
        f"--html={html}",
        "--self-contained-html",
    )
    result.assert_outcomes(passed=1)
    assert _title(html) == f"fq-suite go/no-go report: {MODEL} GO"
    assert _verdict(html, MODEL) == "GO"


# --- a run id that already holds records -------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "refused"),
    [
        ((), None),  # the same run resuming with the same settings
        (("--fq-threads", "1"), None),  # llama.cpp is bit-identical across thread counts
        (("--fq-format", "int8"), "settings.format bf16 → int8"),
        (("--fq-chunks", "4"), "settings.chunks 8 → 4, settings.kld_chunks 8 → 4"),
        (("--fq-kld-mean-max", "0.5"), "thresholds.kld_mean_max 0.02 → 0.5"),
    ],
)
def test_a_run_id_resumes_only_with_its_settings(inner, tmp_path, args, refused):
    """The attack: the same --fq-run-id with --fq-format int8 after a bf16 run: the header
    said int8, nothing ran, and the tests passed on the bf16 record."""
    _store(tmp_path / "store", "BF16")
    result = inner.runpytest(
        "-p", "no:cacheprovider", "-p", "no:randomly", "-k", "fine", "--fq-run-id", "BF16", *args
    )
    if refused is None:
        result.assert_outcomes(passed=1)
        return
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    (line,) = [ln for ln in result.stderr.lines if ln.strip()]
    assert line == (
        f"ERROR: run BF16 already holds layer0/{MODEL} made with other "
        f"settings ({refused}): resume it with the same settings, or use a new "
        "run id"
    )


def test_fq_run_id_from_the_environment_is_checked_too(inner, tmp_path, monkeypatch):
    _store(tmp_path / "store", "ENV")
    monkeypatch.setenv("FQ_RUN_ID", "ENV")
    result = inner.runpytest("-p", "no:cacheprovider", "-p", "no:randomly", "--fq-format", "fp16")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "run ENV already holds layer0/" in result.stderr.str()


def test_a_reused_record_must_name_the_same_inputs(tmp_path):
    """A finished record is reused only for the model and corpus it measured (the plugin
    refuses it with this one line, as the stage test's failure)."""
    path = _store(tmp_path / "results", "R")
    rec = record.read(path)
    model = resolve_model(str(build_gguf(tmp_path).path), fetch=False)
    text = tmp_path / "corpus.txt"
    text.write_text("a small corpus\n" * 50, encoding="utf-8")
    corpus = resolve_corpus(text, download=False)
    exp = stages.Experiment()
    changes = exp.differences(rec, model, corpus)
    assert changes == [
        f"model SHA-256 {'ab' * 6}… → {model.sha256[:12]}…",
        f"corpus SHA-256 {'cd' * 6}… → {corpus.sha256[:12]}…",
    ]
    assert exp.differences(rec) == []  # settings and limits alone: the same run


def test_check_resume_reads_every_record_of_the_run(tmp_path):
    root = tmp_path / "results"
    _store(root, "MIX")
    data = make_record(
        run_id="MIX",
        stage="layers0-2",
        stage_title="Test 2",
        stage_index=2,
        model={"name": MODEL, "path": "/m.gguf", "sha256": "ab" * 32},
        settings=stages.Experiment(fmt="fp8_e4m3").settings_json(),
    )
    results.save_result(record.from_builtins(data), root)
    with pytest.raises(BadInput, match=r"layers0-2/smollm2-135m .*fp8_e4m3 → bf16"):
        stages.check_resume("MIX", stages.Experiment(fmt="bf16"), root)
    stages.check_resume("NEW", stages.Experiment(), root)  # nothing stored: nothing to refuse


# --- make gate --------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_gate_never_reports_an_older_run(tmp_path):
    """The attack: `make gate PYTEST_ARGS="--fq-chunks 0"`: pytest exits 4 and
    reports/test1_results.md was rewritten from an older run's GO."""
    root = tmp_path / "results"
    _store(root, "20261101T000000Z-older")
    reports = tmp_path / "reports"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "FQ_RUN_ID"))}
    env.update(FQ_RESULTS_DIR=str(root), FQ_LOG_DIR=str(tmp_path / "logs"))
    bin_dir = Path(sys.executable).parent
    proc = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-o",
            "setup",
            "gate",
            f"BIN={bin_dir}",
            f"REPORTS={reports}",
            "PYTEST_ARGS=--fq-chunks 0 -p no:cacheprovider",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "--fq-chunks / fq_chunks = '0': must be ≥ 1" in proc.stderr
    assert re.search(
        r"make gate: run \S+ stored no results \(pytest exit 4\): "
        rf"{re.escape(str(reports))}/ not rewritten",
        proc.stderr,
    )
    assert not reports.exists()


# --- real llama.cpp runs: a private cache beside the shared build and models -------------------

SMALL = (
    "--fq-ctx",
    "128",
    "--fq-batch",
    "128",
    "--fq-chunks",
    "1",
    "--fq-placebo-seeds",
    "0",
    "--fq-gen-tokens",
    "2",
    "--fq-twin",
    "deployed",
)


@pytest.fixture
def private_cache(tmp_path, smollm2_gguf, monkeypatch) -> Path:
    """XDG_CACHE_HOME in tmp_path: the shared llama.cpp build and SmolLM2 linked in, nothing
    else, so baselines are computed here and a kill leaves nothing in the shared cache."""
    from fq_core.measurement.llama.tools import find_tools
    from fq_core.platform.paths import cache_dir

    build = find_tools(build=False).bin_dir.parent
    own = tmp_path / "xdg" / "fq-suite"
    (own / "llama.cpp").mkdir(parents=True)
    (own / "llama.cpp" / build.name).symlink_to(build)
    model_dir = own / "models" / MODEL
    model_dir.mkdir(parents=True)
    (model_dir / smollm2_gguf.name).symlink_to(smollm2_gguf)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == own
    return own


def _stage_argv(run_id: str, *more: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        "experiments/test_stages.py",
        "-k",
        "layer0 and not twin",
        "--fq-model",
        MODEL,
        *SMALL,
        "--fq-run-id",
        run_id,
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        "-q",
        *more,
    ]


def _stage_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "FQ_RUN_ID"))}
    env.update(FQ_RESULTS_DIR=str(tmp_path / "results"), FQ_LOG_DIR=str(tmp_path / "logs"))
    return env


@pytest.mark.llama
@pytest.mark.models
def test_kill_during_test1_then_report_resume_and_reuse(private_cache, tmp_path):
    """kill -9 once Test 1 stored its first two checks (the baseline is being computed):
    `fq report` says NO DECISION; the same run id resumes with the same settings and
    finishes; with another format it is refused."""
    import json
    import signal
    import time

    env = _stage_env(tmp_path)
    stored = tmp_path / "results" / "KILL" / "layer0" / f"{MODEL}.json"
    proc = subprocess.Popen(
        _stage_argv("KILL"),
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if stored.is_file() and "numeric" in json.loads(stored.read_bytes())["checks"]:
                break
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    killed = record.read(stored)
    assert (killed.outcome, list(killed.checks)) == ("running", ["quantize", "numeric"])

    out = tmp_path / "out"
    report = _fq("report", str(tmp_path / "results"), str(out), env=env)
    assert report.returncode == 0, report.stderr
    assert f"{MODEL}: NO DECISION (Test 1 did not finish: its record is still 'running'" in (
        report.stdout
    )
    assert "checks so far: quantize passed, numeric passed" in report.stdout
    assert f"**{MODEL}: NO DECISION**" in (out / "test1_results.md").read_text(encoding="utf-8")

    other = subprocess.run(
        _stage_argv("KILL", "--fq-format", "int8"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert other.returncode == pytest.ExitCode.USAGE_ERROR, other.stdout[-2000:]
    assert (
        f"ERROR: run KILL already holds layer0/{MODEL} made with other settings "
        "(settings.format bf16 → int8)"
    ) in other.stderr
    assert record.read(stored).outcome == "running"  # the refused session touched nothing

    resumed = subprocess.run(
        _stage_argv("KILL"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode in (0, 1), resumed.stdout[-3000:] + resumed.stderr[-3000:]
    done = record.read(stored)
    assert done.outcome in ("passed", "failed") and done.finished_at is not None
    report = _fq("report", str(tmp_path / "results" / "KILL"), str(out), env=env)
    verdict = "GO" if done.outcome == "passed" else "NO-GO"
    assert f"{MODEL}: {verdict} (" in report.stdout, report.stdout


@pytest.mark.llama
@pytest.mark.models
def test_speed_ratio_only_from_one_session(private_cache, tmp_path):
    """Test 1 three times on one private cache: the first session measures both runs (its
    ratio stands); the second gets both from the cache (not compared, gates nothing); the
    third sets fq_speed_ratio_min, so both are timed again, back to back."""
    from fq_core.experiment import protocol
    from fq_core.measurement.evaluate import EvalSettings
    from fq_core.measurement.llama.runner import LlamaRunner
    from fq_core.measurement.llama.tools import find_tools
    from fq_core.storage.record import Thresholds

    tools = find_tools(build=False)
    model = resolve_model(MODEL, fetch=False)
    corpus = resolve_corpus(download=False)
    settings = EvalSettings(ctx=128, batch=128, chunks=2, kld_chunks=2, gen_tokens=2)  # 2: KLD

    def run(run_id: str, speed_min: float | None) -> record.StageRecord:
        exp = stages.Experiment(  # fp8: SmolLM2's norms are BF16-exact, so BF16 changes none
            settings=settings,
            fmt="fp8_e4m3",
            placebo_seeds=(),
            variants=("deployed",),
            thresholds=Thresholds(speed_ratio_min=speed_min),
        )
        ctx = stages.Context(
            run_id,
            LlamaRunner(tools, threads=2, log_dir=tmp_path / "logs"),
            tools,
            corpus,
            tmp_path / "results",
        )
        return protocol.run_stage(stages.GATE_STAGE, model, ctx, exp)

    def speed_runs(rec: record.StageRecord) -> list:
        return [c for c in rec.commands if c.role == "speed"]

    first = run("FRESH", None)
    assert first.treatment.identical_to_baseline is False and not first.baseline.cached
    c = first.checks["speed"]
    assert (c.status, c.gates) == ("reported", False)
    assert (
        c.value
        == first.treatment.speed_ratio
        == pytest.approx(first.treatment.tokens_per_s / first.baseline.tokens_per_s)
    )
    assert speed_runs(first) == []

    second = run("CACHED", None)
    assert second.baseline.cached
    c = second.checks["speed"]
    assert (c.status, c.gates, c.value) == ("skipped", False, None)
    assert c.detail == (
        "speed not compared: the baseline and the treatment came from the "
        "cache, timed apart (perhaps under another load); set fq_speed_ratio_min "
        "to time both now"
    )
    assert second.treatment.speed_ratio is None
    assert second.outcome == first.outcome  # the speed decides nothing here

    third = run("TOGETHER", 0.5)
    c = third.checks["speed"]
    assert c.gates and c.status == ("passed" if c.value >= 0.5 else "failed")
    assert c.value == third.treatment.speed_ratio
    assert c.detail.endswith(
        "; both timed now, back to back: the baseline and the treatment came from the cache"
    )
    timed = speed_runs(third)
    timed_files = [Path(t.argv[t.argv.index("-m") + 1]) for t in timed]
    assert timed_files == [
        model.path,
        tmp_path / "results" / "TOGETHER" / "layer0" / "models" / f"{third.case}.gguf",
    ]  # the model, then its treated file
