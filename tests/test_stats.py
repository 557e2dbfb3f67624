"""Intervals, floors and the resolution sentence (fq_core.experiment.stats): no llama.cpp needed."""

from __future__ import annotations

import numpy as np
import pytest

from fq_core.experiment import stats

# Per-chunk mean KLD shaped like the measurements of issue 12 (Gemma3, 8 chunks).
TWIN_PLACEBO = [1.8e-7, 1.6e-7, 2.0e-7, 1.9e-7, 1.7e-7, 1.8e-7, 1.9e-7, 1.6e-7]
TWIN_BF16_ALL = [2.6e-5, 2.4e-5, 2.9e-5, 2.5e-5, 2.7e-5, 2.2e-5, 2.8e-5, 2.6e-5]
Q4_PLACEBO = [0.0037, 0.0035, 0.0040, 0.0036, 0.0038, 0.0034, 0.0039, 0.0037]
Q4_BF16_L0 = [0.0060, 0.0058, 0.0063, 0.0061, 0.0059, 0.0060, 0.0062, 0.0057]


def test_mean_interval_holds_the_mean_and_is_reproducible():
    iv = stats.mean_interval(TWIN_BF16_ALL)
    assert iv.low <= iv.estimate <= iv.high
    assert iv.estimate == pytest.approx(np.mean(TWIN_BF16_ALL))
    assert iv.n == 8 and "bootstrap over 8 chunks" in iv.method
    assert stats.mean_interval(TWIN_BF16_ALL) == iv  # fixed seed: the same record, same interval


@pytest.mark.parametrize(
    "values, expected",
    [
        ([], None),
        ([None, float("nan")], None),  # nothing finite: nothing to say
        ([0.5], (0.5, 0.5)),  # one chunk: the value, no spread
        ([0.25, 0.25, 0.25], (0.25, 0.25)),  # identical chunks: no spread, no resampling
    ],
)
def test_mean_interval_edges(values, expected):
    iv = stats.mean_interval(values)
    if expected is None:
        assert iv is None
    else:
        assert (iv.low, iv.high) == expected


def test_paired_excess_cancels_what_the_chunks_share():
    """A chunk-to-chunk swing shared by treatment and placebo does not widen the excess."""
    swing = np.array([1, 5, 2, 8, 3, 9, 4, 7], dtype=float) * 1e-3
    treated = list(swing + 1e-4)
    placebo = list(swing)
    excess = stats.paired_excess(treated, [placebo])
    assert excess.low == pytest.approx(1e-4) and excess.high == pytest.approx(1e-4)
    unpaired = stats.mean_interval(treated)
    assert unpaired.high - unpaired.low > 1e-3


def test_paired_excess_pairs_the_chunks_all_runs_have():
    """A placebo that rested after 3 chunks is paired with the treatment's first 3, not
    compared with a mean over chunks it never saw."""
    treated = [2.0, 3.0, 4.0, 100.0, 100.0]
    excess = stats.paired_excess(treated, [[1.0, 2.0, 3.0]])
    assert excess.n == 3 and excess.estimate == pytest.approx(1.0)
    assert stats.paired_excess([1.0, 2.0], []) is None


def test_a_resolved_effect_is_stated_with_its_interval_and_floor():
    res = stats.resolution(
        engine="exact",
        treatment_chunks=TWIN_BF16_ALL,
        treatment_mean=None,
        placebo_chunks=[TWIN_PLACEBO],
        placebo_means=[np.mean(TWIN_PLACEBO)],
        label="intrinsically",
    )
    assert res.resolved is True
    assert res.floor == pytest.approx(np.mean(TWIN_PLACEBO))
    assert res.excess.low > 0
    assert res.sentence.startswith("intrinsically, KLD 2.6e-05 [")
    assert "its floor (" in res.sentence and "> 100×" in res.sentence


def test_an_effect_at_the_floor_is_an_upper_bound_never_zero():
    res = stats.resolution(
        engine="exact",
        treatment_chunks=list(reversed(TWIN_PLACEBO)),
        treatment_mean=None,
        placebo_chunks=[TWIN_PLACEBO],
        placebo_means=[None],
    )
    assert res.resolved is False
    assert res.sentence.startswith("below the resolution of this measurement (< ")
    bound = float(res.sentence.split("< ")[1].rstrip(")"))
    assert bound >= max(TWIN_PLACEBO) * 0.95  # an honest bound: at least what was measured
    assert " 0.0" not in res.sentence and "zero" not in res.sentence


def test_deployed_effect_against_engine_noise():
    res = stats.resolution(
        engine="llama-perplexity",
        treatment_chunks=Q4_BF16_L0,
        treatment_mean=None,
        placebo_chunks=[Q4_PLACEBO],
        placebo_means=[None],
        label="as deployed",
    )
    assert res.resolved is True
    assert 1.4 < res.ratio < 1.8
    assert "1.6× its floor" in res.sentence


def test_without_per_chunk_values_the_means_decide():
    res = stats.resolution(
        engine="x",
        treatment_chunks=[],
        treatment_mean=0.006,
        placebo_chunks=[[], []],
        placebo_means=[0.003, 0.004],
    )
    assert res.floor == 0.004 and res.resolved is True and res.excess is None
    assert res.effect.low is None


def test_no_placebo_means_no_floor_said_so():
    res = stats.resolution(
        engine="x",
        treatment_chunks=Q4_BF16_L0,
        treatment_mean=None,
        placebo_chunks=[],
        placebo_means=[],
    )
    assert res.floor is None and res.resolved is None
    assert "floor not measured (no placebo)" in res.sentence


def test_identical_file_is_a_proven_zero():
    res = stats.resolution(
        engine="x",
        treatment_chunks=[],
        treatment_mean=0.0,
        placebo_chunks=[TWIN_PLACEBO],
        placebo_means=[1e-7],
        identical=True,
        label="as deployed",
    )
    assert "identical to the baseline" in res.sentence and "SHA-256" in res.sentence


@pytest.mark.parametrize(
    "pvalues, discoveries",
    [
        ([0.01, 0.04, 0.03, 0.5], [True, False, False, False]),
        ([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205], [True, True] + [False] * 6),
        ([], []),
    ],
)
def test_false_discoveries_benjamini_hochberg(pvalues, discoveries):
    assert stats.false_discoveries(pvalues, q=0.05) == discoveries


@pytest.mark.parametrize(
    ("decimals", "says", "detail"),
    [
        (None, "above its floor of 0", "flipped in the same tensors"),
        # llama-perplexity prints per-chunk KLD to 5 decimals: placebos that moved no printed
        # digit give a floor below 5e-6, never "a floor of 0" beside a ratio (issue 20)
        (
            5,
            "rounds each chunk's KLD to 5 decimals: a floor below 5.0e-06",
            "0 means below 5.0e-06",
        ),
    ],
)
def test_placebos_that_measured_zero_give_no_ratio_and_say_why(decimals, says, detail):
    res = stats.resolution(
        engine="x",
        treatment_chunks=Q4_BF16_L0,
        treatment_mean=None,
        placebo_chunks=[[0.0] * 8],
        placebo_means=[0.0],
        decimals=decimals,
    )
    assert res.floor == 0.0 and res.ratio is None and res.resolved is True
    assert says in res.sentence and detail in res.floor_detail
    assert ("floor of 0" in res.sentence) is (decimals is None)
