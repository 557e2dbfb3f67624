"""The experiment: Test 1-4 (stage ids layer0, layers0-2, layers0-9, all-layers) × model.

Each check is its own test so the report shows which one failed. The protocol runs once per
stage × model (fq_core.experiment.protocol.run_stage) and stores every measurement first; these
tests only assert on the stored result. `pytest -k layer0` is the go/no-go gate; later stages are
skipped with the gate's reason unless Test 1 passed for that model.
"""

from __future__ import annotations

import pytest

from fq_core.experiment import checks
from fq_core.storage.record import StageRecord

pytestmark = [pytest.mark.stage, pytest.mark.llama]


def _assert_check(result: StageRecord, name: str) -> None:
    """One rule (experiment.checks.ending): a check that gates nothing skips with its value."""
    check = result.checks.get(name)
    assert check is not None, f"{name}: not recorded ({result.outcome})"
    how, message = checks.ending(check)
    if how == "skip":
        pytest.skip(message)
    if how == "fail":
        pytest.fail(message, pytrace=False)
    assert how == "pass", message


def test_quantize(fq_result):
    """Fake quantization succeeds and touches only the selected tensors' bytes."""
    _assert_check(fq_result, "quantize")


def test_numeric(fq_result):
    """Max relative error below fq_max_rel_error, with the manifest's element counts."""
    _assert_check(fq_result, "numeric")


def test_load(fq_result):
    """llama.cpp loads the fake-quantized model (with --check-tensors)."""
    _assert_check(fq_result, "load")


def test_generate(fq_result):
    """Tokens for 'Hello' and, through the chat template, for 你好，請介紹一下自己。"""
    _assert_check(fq_result, "generate")


def test_perplexity(fq_result):
    """|ΔPPL| against the unmodified model below fq_ppl_delta_max (paired uncertainty shown)."""
    _assert_check(fq_result, "perplexity")


def test_kld(fq_result):
    """Mean KLD ≤ fq_kld_mean_max and same-top-token rate ≥ fq_same_top_min."""
    _assert_check(fq_result, "kld")


def test_placebo(fq_result):
    """Effect against the selection-matched placebo; gates only with fq_noise_factor_max."""
    _assert_check(fq_result, "placebo")


def test_agreement(fq_result):
    """Greedy output agreement with the baseline; gates only with fq_agreement_min."""
    _assert_check(fq_result, "agreement")


def test_speed(fq_result):
    """Perplexity throughput relative to the baseline; gates only with fq_speed_ratio_min."""
    _assert_check(fq_result, "speed")


def test_deployable(fq_result):
    """Whether the real file — the tensors stored as the format — runs in llama.cpp (never a
    gate: the stage measures the fake-quantized file; BF16 norms abort on the CPU backend)."""
    _assert_check(fq_result, "deployable")


def test_regression(fq_regression):
    """Every metric against the reference (--fq-compare): fails only when a metric is worse by
    more than its tolerance and by more than twice its uncertainty; skipped without a reference."""
    from fq_pytest.regression import regression_outcome

    regression_outcome(fq_regression)
