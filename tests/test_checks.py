"""fq_core.experiment.checks on tables of boundary rows (value, threshold -> status); the one rule.

Like ml_dtypes' edge tables: every row is a case someone could get wrong (the value on the
threshold, just over, NaN, no threshold at all).
"""

from __future__ import annotations

import math
from pathlib import Path

import msgspec
import pytest
from record_factory import make_record

from fq_core.experiment import checks
from fq_core.experiment.checks import Check
from fq_core.storage import record

NAN, INF = math.nan, math.inf

# delta %, its error, limit (fraction) -> status
PERPLEXITY_ROWS = [
    (0.83, 0.23, 0.02, "passed"),
    (-0.83, 0.23, 0.02, "passed"),
    (1.99, None, 0.02, "passed"),
    (2.0, None, 0.02, "failed"),  # strictly below the limit passes; on it fails
    (2.01, None, 0.02, "failed"),
    (-2.01, None, 0.02, "failed"),
    (0.0, 0.0, 0.0, "failed"),  # a limit of 0 fails even an exact zero: closes the gate
    (-0.0, None, 0.0, "failed"),
    (NAN, None, 0.02, "error"),
    (INF, None, 0.02, "error"),
    (None, None, 0.02, "error"),
]


@pytest.mark.parametrize("delta,err,limit,status", PERPLEXITY_ROWS)
def test_perplexity_boundaries(delta, err, limit, status):
    c = checks.perplexity_check(delta, err, limit, 17.0, 17.1)
    assert c.status == status
    assert c.gates
    if status != "error":
        assert c.value == pytest.approx(delta / 100) and c.threshold == limit


def test_perplexity_zero_prints_without_a_sign():
    c = checks.perplexity_check(-1e-9, 0.0, 0.0, 21.3334, 21.3334)
    assert "perplexity delta 0.00%" in c.detail and "-0.00" not in c.detail


# mean KLD, same-top %, KLD limit, same-top limit -> status
KLD_ROWS = [
    (0.006, 95.6, 0.02, 0.90, "passed"),
    (0.02, 95.6, 0.02, 0.90, "passed"),  # on the limit: at most
    (0.020001, 95.6, 0.02, 0.90, "failed"),
    (0.006, 90.0, 0.02, 0.90, "passed"),  # on the limit: at least
    (0.006, 89.99, 0.02, 0.90, "failed"),
    (-0.0, 100.0, 0.02, 0.90, "passed"),  # llama.cpp prints -0.000000 for identical models
    (NAN, 95.0, 0.02, 0.90, "error"),
    (0.006, NAN, 0.02, 0.90, "error"),
    (None, None, 0.02, 0.90, "error"),
]


@pytest.mark.parametrize("kld,same,kmax,smin,status", KLD_ROWS)
def test_kld_boundaries(kld, same, kmax, smin, status):
    c = checks.kld_check(kld, same, kmax, smin)
    assert (c.status, c.gates) == (status, True)


# value, limit -> (status, gates): report-only checks gate once a limit is given
AGREEMENT_ROWS = [
    (0.5, None, "reported", False),
    (0.5, 0.5, "passed", True),
    (0.4999, 0.5, "failed", True),
    (1.0, 1.0, "passed", True),
    (NAN, None, "error", False),
    (NAN, 0.5, "error", True),
]


@pytest.mark.parametrize("value,limit,status,gates", AGREEMENT_ROWS)
def test_agreement_boundaries(value, limit, status, gates):
    c = checks.agreement_check(value, 3, limit)
    assert (c.status, c.gates) == (status, gates)


SPEED_ROWS = [
    (0.95, None, "reported", False),
    (0.8, 0.8, "passed", True),
    (0.79, 0.8, "failed", True),
    (None, None, "error", False),
    (None, 0.8, "error", True),
]


@pytest.mark.parametrize("ratio,limit,status,gates", SPEED_ROWS)
def test_speed_boundaries(ratio, limit, status, gates):
    c = checks.speed_check(ratio, 1000.0, 950.0, limit)
    assert (c.status, c.gates) == (status, gates)


@pytest.mark.parametrize("ratio,limit", [(0.31, 0.8), (0.98, 0.8), (0.31, None), (None, 0.8)])
def test_speed_of_two_sessions_is_not_compared_and_gates_nothing(ratio, limit):
    """The attack: baseline and treatment from the cache, timed 28 min apart in different
    sessions, gave 0.31× and failed Test 1 (measured together: 0.98×)."""
    c = checks.speed_check(ratio, 3000.0, 930.0, limit, apart="the baseline came from the cache")
    assert (c.status, c.gates, c.value) == ("skipped", False, None)
    assert c.detail == "speed not compared: the baseline came from the cache"
    assert checks.ending(c) == ("skip", c.detail)
    assert checks.stage_outcome({"speed": c, "numeric": Check(status="passed", detail="")}) == (
        "passed"
    )


def test_speed_timed_together_says_so():
    c = checks.speed_check(0.98, 1000.0, 980.0, 0.8, note="both timed now")
    assert (c.status, c.gates) == ("passed", True)
    assert c.detail.endswith("(0.98×) ≥ 0.8×; both timed now")
    failed = checks.speed_check(None, None, None, 0.8, note="timing both now failed: boom")
    assert (failed.status, failed.gates) == ("error", True)
    assert failed.detail == "speed not measured; timing both now failed: boom"


# ratio, seeds, limit, error -> (status, gates)
PLACEBO_ROWS = [
    (1.6, 3, None, None, "reported", False),
    (1.6, 3, 2.0, None, "passed", True),
    (2.0, 3, 2.0, None, "passed", True),  # at most
    (2.01, 3, 2.0, None, "failed", True),
    (None, 0, None, None, "skipped", False),
    (None, 0, 2.0, None, "skipped", False),  # control off: nothing to gate on
    (None, 3, None, "LlamaFailed: boom", "error", False),  # does not close the gate...
    (None, 3, 2.0, "LlamaFailed: boom", "error", True),  # ...unless the limit is set
    (NAN, 3, 2.0, None, "error", True),
]


@pytest.mark.parametrize("ratio,seeds,limit,error,status,gates", PLACEBO_ROWS)
def test_placebo_boundaries(ratio, seeds, limit, error, status, gates):
    c = checks.placebo_check(ratio, "verdict", seeds, 0.003, 0.004, limit, error)
    assert (c.status, c.gates) == (status, gates)


NUMERIC_ROWS = [
    (0.00383, 0.01, "passed"),
    (0.01, 0.01, "failed"),
    (NAN, 0.01, "failed"),  # a NaN error is no pass
    (INF, 0.01, "failed"),
]


@pytest.mark.parametrize("max_rel,limit,status", NUMERIC_ROWS)
def test_numeric_boundaries(max_rel, limit, status):
    assert checks.numeric_check(max_rel, 14, 640, limit).status == status


def test_generate_needs_text_for_every_prompt():
    ok = checks.generate_check([("Hello", False, 32, " world"), ("你好", True, 5, "我是")])
    assert ok.status == "passed"
    empty = checks.generate_check([("Hello", False, 32, " world"), ("你好", True, 0, "")])
    assert empty.status == "failed" and "nothing generated" in empty.detail
    assert checks.generate_check([]).status == "error"


# --- the one rule -----------------------------------------------------------------------------

# check -> how a test of it ends
ENDING_ROWS = [
    (Check(status="passed", detail="ok"), "pass"),
    (Check(status="failed", detail="bad"), "fail"),
    (Check(status="error", detail="no value"), "fail"),
    (Check(status="skipped", detail="gate closed"), "skip"),
    (
        Check(status="reported", detail="1.6x", value=1.6, gates=False),
        "skip",
    ),  # asserted nothing: never PASSED
    (Check(status="error", detail="placebo run failed", gates=False), "skip"),
    (Check(status="skipped", detail="control off", gates=False), "skip"),
]


@pytest.mark.parametrize("check,how", ENDING_ROWS)
def test_ending(check, how):
    got, message = checks.ending(check)
    assert got == how
    assert check.detail in message


def test_reported_ending_carries_the_value():
    _, message = checks.ending(checks.speed_check(0.97, 1000.0, 970.0, None))
    assert "0.97×" in message and message.startswith("reported, not asserted")


def test_stage_outcome_and_failures_follow_gates_only():
    base = {
        "quantize": Check(status="passed", detail="q"),
        "perplexity": Check(status="passed", detail="p"),
    }
    assert checks.stage_outcome(base) == "passed"
    soft = dict(base, placebo=Check(status="error", detail="placebo run failed: boom", gates=False))
    assert checks.stage_outcome(soft) == "passed"
    assert checks.failing(soft) == []
    hard = dict(base, placebo=Check(status="error", detail="placebo run failed: boom"))
    assert checks.stage_outcome(hard) == "failed"
    assert checks.failing(hard) == [("placebo", hard["placebo"])]
    skipped = {n: Check(status="skipped", detail="gate closed") for n in checks.CHECKS}
    assert checks.stage_outcome(skipped) == "skipped"


def _stored(data: dict) -> Check:
    """A check as a stored record gives it (schema 1 brought forward by record.upgrade_check)."""
    return msgspec.convert(record.upgrade_check(data), Check)


def test_schema1_checks_read_with_the_same_rule():
    """Records written before `gates` said `asserted`; a report-only pass was 'passed'."""
    old = {"status": "passed", "detail": "1.2x", "value": 1.2, "threshold": None, "asserted": False}
    c = _stored(old)
    assert (c.status, c.gates) == ("reported", False)
    assert checks.ending(c)[0] == "skip"
    gating = {"status": "failed", "detail": "x", "value": 1, "threshold": 0}
    assert _stored(gating).gates


def test_unknown_status_is_refused():
    with pytest.raises(msgspec.ValidationError, match="status"):
        _stored({"status": "maybe", "detail": "x"})


def test_round_trip_keeps_the_second_value():
    c = checks.kld_check(0.006, 95.6, 0.02, 0.9)
    again = _stored(msgspec.to_builtins(c))
    assert again == c and again.same_top == pytest.approx(0.956)


# --- the decision: one function for the gate, the reports and the pytest-html title ----------


def _test1(outcome: str, **statuses) -> record.StageRecord:
    """A Test 1 record whose checks pass unless named: name=status or name=(status, gates)."""
    data = make_record(outcome=outcome, finished_at=None if outcome == "running" else "t")
    for name, how in statuses.items():
        status, gates = how if isinstance(how, tuple) else (how, True)
        data["checks"][name] = {"status": status, "detail": f"{name} {status}", "gates": gates}
    return record.from_builtins(data)


# outcome, checks, session errors -> verdict, reason (start)
DECISION_ROWS = [
    ("passed", {}, (), "GO", "all 9 asserted checks passed (quantize, numeric, load, "),
    ("passed", {"speed": ("reported", False)}, (), "GO", "all 8 asserted checks passed"),
    ("failed", {"kld": "failed"}, (), "NO-GO", "failed: kld"),
    ("failed", {"load": "error", "kld": "failed"}, (), "NO-GO", "failed: load, kld"),
    ("failed", {}, (), "NO-GO", "Test 1 failed"),  # an outcome no check explains
    ("running", {}, (), "NO DECISION", "Test 1 did not finish: its record is still 'running'"),
    ("running", {"kld": "failed"}, (), "NO DECISION", "Test 1 did not finish"),
    ("skipped", {}, (), "NO DECISION", "Test 1 was skipped: no reason recorded"),
    # a gating check not judged: the old gate opened on outcome "passed", the report did not
    ("passed", {"generate": "skipped"}, (), "NO DECISION", "checks not finished: generate"),
    ("passed", {}, ("t::a",), "NO DECISION", "this session had 1 error (t::a); Test 1 alone: "),
    ("passed", {}, ("a", "b"), "NO DECISION", "this session had 2 errors (a and 1 more)"),
    ("failed", {"kld": "failed"}, ("a",), "NO-GO", "failed: kld"),
]


@pytest.mark.parametrize(("outcome", "statuses", "errors", "verdict", "reason"), DECISION_ROWS)
def test_decide(outcome, statuses, errors, verdict, reason):
    d = checks.decide(_test1(outcome, **statuses), errors)
    assert d.verdict is checks.Verdict(verdict)
    assert d.reason.startswith(reason), d.reason
    assert f"{d.model}: {d.verdict}" == f"m: {verdict}"  # the word the reports print


@pytest.mark.parametrize(("outcome", "statuses", "errors", "verdict", "reason"), DECISION_ROWS)
def test_the_gate_and_the_report_decide_alike(outcome, statuses, errors, verdict, reason):
    """The gate opens on exactly the records the report calls GO (no session errors: the
    gate decides within the session), and closes with the failing checks' own lines."""
    from fq_core.experiment import gate
    from fq_core.report import RunResults, StageResult, decide

    rec = _test1(outcome, **statuses)
    run = RunResults(Path("R1"), "R1", (StageResult(Path("R1/layer0/m.json"), rec),))
    said = decide(run, "m")
    why = gate.failure_reason(rec)
    assert (why is None) == (said.verdict is checks.Verdict.GO)
    failing = [f"{n} {s}" for n, s in statuses.items() if s in ("failed", "error")]
    if said.verdict is checks.Verdict.NO_GO and failing:
        assert why == "; ".join(failing)
    elif why is not None:
        assert why == said.reason
