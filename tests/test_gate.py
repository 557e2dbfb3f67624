"""The Test 1 gate: fast tests of the decision, and one real run proving the gate closes."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from record_factory import make_record

from fq_core.experiment import gate, stages
from fq_core.storage import record, results
from fq_core.storage.identity import Identity

ROOT = Path(__file__).resolve().parent.parent


def _components(**changes):
    base = dict(
        model_sha256="a" * 64,
        corpus_sha256="c" * 64,
        llama_build="b" * 64,
        format="bf16",
        rounding="truncate",
        settings={"ctx": 512, "chunks": 8, "placebo_seeds": [1, 2, 3]},
        thresholds={"ppl_delta_max": 0.02, "kld_mean_max": 0.02},
    )
    base.update(changes)
    return Identity(**base)


def _test1(outcome: str, **checks) -> record.StageRecord:
    data = make_record(
        run_id="R-now",
        outcome=outcome,
        checks={n: {"status": s, "detail": d} for n, (s, d) in checks.items()},
    )
    return record.from_builtins(data)


def test_session_pass_opens(tmp_path):
    result = _test1("passed", perplexity=("passed", "perplexity delta +0.8% < 2.0%"))
    d = gate.decide("gemma3-270m", _components(), session_result=result, root=tmp_path)
    assert d.open and d.source == "session"


def test_session_fail_closes_with_the_failing_check(tmp_path):
    result = _test1(
        "failed",
        quantize=("passed", "ok"),
        perplexity=("failed", "perplexity delta 1.3% > 1.0%"),
    )
    # a recorded pass does not override this session's failure
    results.record_gate(
        _components(), model="gemma3-270m", outcome="passed", run_id="old", root=tmp_path
    )
    d = gate.decide("gemma3-270m", _components(), session_result=result, root=tmp_path)
    assert not d.open
    assert d.reason == "gate: Test 1 has not passed for gemma3-270m: perplexity delta 1.3% > 1.0%"


def test_session_error_closes(tmp_path):
    result = _test1("failed", load=("error", "LlamaFailed: exit 1"))
    d = gate.decide("m", _components(), session_result=result, root=tmp_path)
    assert not d.open and "LlamaFailed" in d.reason


def test_recorded_pass_opens(tmp_path):
    results.record_gate(_components(), model="m", outcome="passed", run_id="R1", root=tmp_path)
    d = gate.decide("m", _components(), root=tmp_path)
    assert d.open and d.source == "record" and d.run_id == "R1"


def test_recorded_fail_closes(tmp_path):
    results.record_gate(
        _components(),
        model="m",
        outcome="failed",
        run_id="R1",
        reason="mean KLD 0.03 > 0.02",
        root=tmp_path,
    )
    d = gate.decide("m", _components(), root=tmp_path)
    assert not d.open
    assert d.reason == "gate: Test 1 has not passed for m: mean KLD 0.03 > 0.02 (run R1)"


def test_missing_record_closes(tmp_path):
    d = gate.decide("m", _components(), root=tmp_path)
    assert not d.open and d.source == "missing"
    assert "no recorded Test 1" in d.reason and "pytest -k layer0" in d.reason


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"model_sha256": "b" * 64}, "model SHA-256 aaaaaaaaaaaa… → bbbbbbbbbbbb…"),
        ({"corpus_sha256": "d" * 64}, "corpus SHA-256"),
        ({"thresholds": {"ppl_delta_max": 0.01, "kld_mean_max": 0.02}}, "thresholds.ppl_delta_max"),
        ({"settings": {"ctx": 512, "chunks": 4, "placebo_seeds": [1, 2, 3]}}, "settings.chunks"),
        ({"llama_build": "e" * 64}, "llama.cpp build SHA-256"),
    ],
)
def test_stale_record_closes_and_names_what_changed(tmp_path, change, named):
    results.record_gate(_components(), model="m", outcome="passed", run_id="R1", root=tmp_path)
    d = gate.decide("m", _components(**change), root=tmp_path)
    assert not d.open and d.source == "stale"
    assert named in d.reason and "run R1" in d.reason


def test_a_gate_record_written_before_the_identity_type_still_opens(tmp_path):
    """gate.json as fq-suite d29b1ef wrote it (GateComponents: this key, these components):
    the identity gives the same key, so a recorded Test 1 stays valid across the change."""
    components = _components().to_json()
    entry = {
        "model": "m",
        "outcome": "passed",
        "reason": None,
        "run_id": "R0",
        "recorded_at": "2025-01-01T00:00:00Z",
        "components": components,
    }
    results.write_json_atomic(
        results.gate_path(tmp_path),
        {"schema": 3, "entries": {"e9c642942660b44dcd56d5b888d41fab": entry}},
    )
    d = gate.decide("m", _components(), root=tmp_path)
    assert d.open and d.source == "record" and d.run_id == "R0"
    d = gate.decide("m", _components(format="int8"), root=tmp_path)
    assert not d.open and d.source == "stale" and "format bf16 → int8" in d.reason


def test_ignore_gate_opens_but_keeps_the_reason(tmp_path):
    d = gate.decide("m", _components(), ignore=True, root=tmp_path)
    assert d.open and d.source == "ignored" and "no recorded Test 1" in d.reason


def test_failure_reason_of_unfinished_result():
    assert "did not finish" in gate.failure_reason(_test1("running"))
    assert gate.failure_reason(_test1("passed", kld=("passed", "x"))) is None


# --- the real thing ------------------------------------------------------------------------


def _junit_cases(path: Path) -> dict[str, tuple[str, str]]:
    """test name -> (outcome, message) from a junit XML report."""
    cases = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome, message = tag, el.get("message", "")
        cases[case.get("name")] = (outcome, message)
    return cases


@pytest.mark.llama
@pytest.mark.models
def test_impossible_threshold_closes_the_gate_for_real(tmp_path):
    """SmolLM2's layer-0 change is 0 elements (ΔPPL exactly 0): a 0 limit fails Test 1 for real.

    A fresh pytest runs all four stages on llama.cpp with fq_ppl_delta_max = 0; Test 1's
    perplexity check fails and every check of stages 2-4 is skipped with the gate's reason.
    """
    junit = tmp_path / "junit.xml"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST_", "FQ_RUN_ID", "FQ_RESULTS_DIR"))
    }
    env["FQ_RESULTS_DIR"] = str(tmp_path / "results")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "experiments/test_stages.py",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            "-q",
            "--fq-model",
            "smollm2-135m",
            "--fq-placebo-seeds",
            "0",  # else the defaults: the SmolLM2 baseline and treatment of test_stages
            "--fq-ppl-delta-max",
            "0",
            "--fq-twin",
            "deployed",
            "--fq-run-id",
            "gate-closes",
            f"--junitxml={junit}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    cases = _junit_cases(junit)
    per_stage = len(stages.CHECKS) + 1  # a test per check, and test_regression
    assert len(cases) == per_stage * 4, sorted(cases)
    assert cases["test_perplexity[layer0-smollm2-135m]"][0] == "failure"
    assert "perplexity delta" in cases["test_perplexity[layer0-smollm2-135m]"][1]
    for check in ("quantize", "numeric", "load", "generate", "kld"):
        assert cases[f"test_{check}[layer0-smollm2-135m]"][0] == "passed", check
    # no threshold set and no control run: these asserted nothing, so none shows as PASSED
    for check in ("agreement", "speed", "placebo", "regression", "deployable"):
        outcome, message = cases[f"test_{check}[layer0-smollm2-135m]"]
        assert outcome == "skipped", (check, outcome, message)
    # norms stored as BF16: a fact stated, never a gate
    deployable = cases["test_deployable[layer0-smollm2-135m]"][1]
    assert "not deployable in this llama.cpp: binary_op: unsupported types" in deployable
    later = {n: c for n, c in cases.items() if "layer0-" not in n}
    assert len(later) == per_stage * 3
    for name, (outcome, message) in later.items():
        assert outcome == "skipped", name
        assert "gate: Test 1 has not passed for smollm2-135m: perplexity delta" in message

    store = tmp_path / "results"
    test1 = record.to_builtins(results.load_record("gate-closes", "layer0", "smollm2-135m", store))
    assert test1["outcome"] == "failed"
    # the values, not how they print: an identical file moves PPL by (about) nothing, and
    # a limit of 0 fails even a difference of exactly zero
    ppl_check = test1["checks"]["perplexity"]
    assert ppl_check["status"] == "failed" and ppl_check["threshold"] == 0
    assert abs(ppl_check["value"]) < 1e-4, ppl_check
    assert test1["corpus"]["n_tokens"] > 0  # the whole corpus, counted by llama-tokenize
    # a byte-identical file has no effect to read against noise: no placebo is run
    assert test1["checks"]["placebo"]["detail"].startswith("not run: the treated file is byte")
    assert test1["checks"]["placebo"]["status"] == "skipped"
    assert test1["placebo"]["verdict"] == "control not run" and not test1["placebo"]["runs"]
    skipped = record.to_builtins(
        results.load_record("gate-closes", "all-layers", "smollm2-135m", store)
    )
    assert skipped["outcome"] == "skipped" and skipped["skip_reason"].startswith("gate: ")
    (entry,) = results.gate_entries(store)
    assert (entry.outcome, entry.run_id, entry.model) == ("failed", "gate-closes", "smollm2-135m")


@pytest.mark.parametrize(
    ("treatment", "placebos", "ratio", "verdict"),
    [
        (0.0060, [0.0029, 0.0037, 0.0037], 1.62, "1.6× the largest placebo"),
        (0.0050, [0.0049, 0.0055], 0.91, "within engine noise"),
        (-0.0, [0.0021, 0.0028], 0.0, "within engine noise"),
        (0.0060, [], None, "control not run"),
    ],
)
def test_placebo_verdict_wording(treatment, placebos, ratio, verdict):
    from fq_core.experiment.checks import placebo_verdict

    got_ratio, got_verdict = placebo_verdict(treatment, placebos)
    assert got_verdict == verdict
    assert got_ratio == pytest.approx(ratio, abs=0.01) if ratio is not None else got_ratio is None
    assert got_ratio is None or str(got_ratio) != "-0.0"


def test_dash_k_gate_selects_only_test_1(tmp_path):
    """`pytest -k layer0` (make gate) collects Test 1's ten checks per model and answer
    (deployed and -twin), and nothing else."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-k",
            "layer0",
            "-p",
            "no:cacheprovider",
            f"--html={tmp_path / 'r.html'}",
        ],  # not over reports/
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ids = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    per_stage = len(stages.CHECKS) + 1  # a test per check, and test_regression
    assert len(ids) == per_stage * 2 * 2, ids
    assert all(i.startswith("experiments/test_stages.py::") and "[layer0-" in i for i in ids), ids
    assert sum(i.endswith("-twin]") for i in ids) == per_stage * 2, ids
