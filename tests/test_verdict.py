"""What a verdict may rest on (issue 18, items 4 and 5), tried the way the issue's attacks did.

No GO from a record that never finished (a kill -9 during Test 1) nor from a session that had
errors; a run id holding records answers only for the settings and inputs that wrote them;
`make gate` never rewrites its reports from an older run; a speed ratio of two sessions
neither shows nor gates. Records are real files in a results store written through
fq_core.results, read back by `fq report`, pytest-html and the plugin as a user runs them.
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

from fq_core import record, results, stages
from fq_core.corpus import resolve_corpus
from fq_core.errors import BadInput
from fq_core.models import resolve_model

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
    return results.save_result(record.from_builtins(results.jsonable(data, words=True)), root)


def _fq(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fq_core.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def _passed(detail: str) -> dict:
    return {"status": "passed", "detail": detail, "value": 0.0, "threshold": 0.0}


# --- a record that never finished -------------------------------------------------------------


def test_a_record_left_running_by_a_kill_gives_no_decision(tmp_path):
    """The attack: kill -9 during Test 1 leaves the record `running` with the two checks done
    before the baseline; `fq report` said GO ("all 2 asserted checks passed")."""
    root = tmp_path / "results"
    _store(root, "KILLED", outcome="running", finished_at=None,
           checks={"quantize": _passed("14 of 640 elements changed"),
                   "numeric": _passed("max rel error 0.0038 < 0.01")})  # fmt: skip
    proc = _fq("report", str(root), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith(MODEL))
    assert line.strip().startswith(f"{MODEL}: NO DECISION (Test 1 did not finish: its record is "
                                   "still 'running' since 2026-11-29T00:00:00Z")  # fmt: skip
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
    tag = re.search(rf'<div class="fq-decision" data-model="{re.escape(model)}" '
                    r'data-verdict="([^"]+)">', html.read_text(encoding="utf-8"))  # fmt: skip
    return tag.group(1)


def test_a_session_with_errors_states_no_go_in_the_html_report(inner, tmp_path):
    """The attack: the pytest-html title said GO although the session had errors."""
    _store(tmp_path / "store", "ERR")
    html = tmp_path / "r.html"
    result = inner.runpytest("-p", "no:cacheprovider", "-p", "no:randomly", "--fq-run-id", "ERR",
                             f"--html={html}", "--self-contained-html")  # fmt: skip
    result.assert_outcomes(passed=1, errors=3)
    title = _title(html)
    assert title == f"fq-suite go/no-go report: {MODEL} NO DECISION"
    text = html.read_text(encoding="utf-8")
    assert _verdict(html, MODEL) == "NO DECISION"
    assert "this session had 3 errors (test_inner.py::test_broken[0] and 2 more)" in text


def test_the_same_session_without_errors_says_go(inner, tmp_path):
    _store(tmp_path / "store", "OK")
    html = tmp_path / "r.html"
    result = inner.runpytest("-p", "no:cacheprovider", "-p", "no:randomly", "--fq-run-id", "OK",
                             "-k", "fine", f"--html={html}", "--self-contained-html")  # fmt: skip
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
    result = inner.runpytest("-p", "no:cacheprovider", "-p", "no:randomly", "-k", "fine",
                             "--fq-run-id", "BF16", *args)  # fmt: skip
    if refused is None:
        result.assert_outcomes(passed=1)
        return
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    (line,) = [ln for ln in result.stderr.lines if ln.strip()]
    assert line == (f"ERROR: run BF16 already holds layer0/{MODEL} made with other "
                    f"settings ({refused}): resume it with the same settings, or use a new "
                    "run id")  # fmt: skip


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
    assert changes == [f"corpus_sha256 {'cd' * 6}… → {corpus.sha256[:12]}…",
                       f"model_sha256 {'ab' * 6}… → {model.sha256[:12]}…"]  # fmt: skip
    assert exp.differences(rec) == []  # settings and limits alone: the same run


def test_check_resume_reads_every_record_of_the_run(tmp_path):
    root = tmp_path / "results"
    _store(root, "MIX")
    data = make_record(run_id="MIX", stage="layers0-2", stage_title="Test 2", stage_index=2,
                       model={"name": MODEL, "path": "/m.gguf", "sha256": "ab" * 32},
                       settings=stages.Experiment(fmt="fp8_e4m3").settings_json())  # fmt: skip
    results.save_result(data, root)
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
        ["make", "--no-print-directory", "-o", "setup", "gate", f"BIN={bin_dir}",
         f"REPORTS={reports}", "PYTEST_ARGS=--fq-chunks 0 -p no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "--fq-chunks / fq_chunks = '0': must be ≥ 1" in proc.stderr
    assert re.search(r"make gate: run \S+ stored no results \(pytest exit 4\): "
                     rf"{re.escape(str(reports))}/ not rewritten", proc.stderr)  # fmt: skip
    assert not reports.exists()
