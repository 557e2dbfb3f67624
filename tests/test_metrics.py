"""Error statistics and distributions on tables of edge values, checked against float64 math."""

from __future__ import annotations

import numpy as np
import pytest

from fq_core.definitions.formats import fake_quantize
from fq_core.measurement.metrics import EPS, bf16_ulp, distribution, error_stats, histogram


def test_error_stats_against_direct_computation():
    rng = np.random.default_rng(1)
    o = (1 + 0.3 * rng.standard_normal(1000)).astype(np.float32)
    q = fake_quantize(o, "bf16", "truncate")
    s = error_stats(o, q)
    d = np.abs(o.astype(np.float64) - q.astype(np.float64))
    assert s.changed == int(np.count_nonzero(o != q))
    assert s.fraction == s.changed / 1000
    assert s.max_abs == pytest.approx(d.max(), rel=0, abs=0)
    assert s.mean_abs == pytest.approx(d.mean(), rel=1e-12)
    assert s.max_rel == pytest.approx((d / np.abs(o.astype(np.float64))).max(), rel=1e-9)
    # truncation to bf16 loses strictly less than one bf16 ulp and keeps rel error < 2**-7
    assert 0 < s.max_ulp_bf16 < 1
    assert s.max_rel < 2**-7


def test_changed_is_bitwise():
    o = np.array([0.0, 1.0, np.nan], dtype=np.float32)
    q = np.array([-0.0, 1.0, np.nan], dtype=np.float32)
    s = error_stats(o, q)
    assert s.changed == 1  # -0.0 vs 0.0 counts, equal NaN bits do not
    assert s.max_abs == 0.0 and s.n_nonfinite == 1


def test_eps_keeps_zero_defined():
    o = np.array([0.0, 2.0], dtype=np.float32)
    q = np.array([np.float32(1e-45), 2.0], dtype=np.float32)
    s = error_stats(o, q)
    assert np.isfinite(s.max_rel)
    assert s.max_rel == pytest.approx(float(np.float32(1e-45)) / EPS)
    assert EPS == 2.0**-126


def test_bf16_ulp_by_binade():
    v = np.array([1.0, 1.5, 2.0, 0.75, -3.0, 0.0, 1e-40], dtype=np.float32)
    assert bf16_ulp(v).tolist() == [2**-7, 2**-7, 2**-6, 2**-8, 2**-6, 2**-133, 2**-133]


def test_nearest_is_at_most_half_an_ulp():
    rng = np.random.default_rng(2)
    o = (rng.standard_normal(5000) * 10).astype(np.float32)
    s = error_stats(o, fake_quantize(o, "bf16", "nearest"))
    assert 0.45 < s.max_ulp_bf16 <= 0.5


def test_distribution():
    v = np.arange(101, dtype=np.float32)
    d = distribution(np.append(v, np.float32(np.inf)))
    assert (d.n, d.n_nonfinite, d.min, d.max, d.mean) == (101, 1, 0.0, 100.0, 50.0)
    assert d.percentiles == {1: 1.0, 5: 5.0, 25: 25.0, 50: 50.0, 75: 75.0, 95: 95.0, 99: 99.0}
    assert d.std == pytest.approx(np.std(np.arange(101)))


def test_histogram_shares_edges():
    a = np.array([0, 1, 2, 3], dtype=np.float32)
    b = np.array([0, 0, 3, 3], dtype=np.float32)
    edges, (ca, cb) = histogram(a, b, bins=3)
    assert edges == [0.0, 1.0, 2.0, 3.0]
    assert ca == [1, 1, 2] and cb == [2, 0, 2]


# --- non-finite values are counted and shown, never dropped ------------------------------------


def test_values_made_non_finite_make_the_maxima_infinite():
    big = np.float32(np.finfo(np.float32).max)
    o = np.array([1.0 + 2**-12, big, 1e5, -7e4], dtype=np.float32)
    q = fake_quantize(o, "fp16", "nearest")  # beyond fp16's range: ±Inf
    assert np.isinf(q[1:]).all()
    s = error_stats(o, q)
    assert (s.n_nonfinite, s.n_became_nonfinite, s.changed) == (3, 3, 4)
    assert s.max_abs == s.max_rel == s.max_ulp_bf16 == np.inf and not s.finite
    assert s.mean_abs == pytest.approx(abs(float(o[0]) - float(q[0])))  # over the finite pair


def test_a_nan_copy_is_nan_not_zero():
    o = np.linspace(0.5, 2.0, 640, dtype=np.float32)
    q = np.full_like(o, np.nan)
    s = error_stats(o, q)
    assert (s.changed, s.n_nonfinite, s.n_became_nonfinite) == (640, 640, 640)
    assert np.isnan([s.max_abs, s.max_rel, s.max_ulp_bf16, s.mean_abs, s.mean_rel]).all()


@pytest.mark.parametrize(
    "o, q, expected",
    [
        (np.nan, np.nan, 0.0),  # NaN stays NaN: no error
        (np.inf, np.inf, 0.0),  # +Inf stays +Inf
        (np.inf, -np.inf, np.inf),
        (np.inf, 3.0, np.inf),
        (np.inf, np.nan, np.nan),  # e4m3fn has no Inf
        (2.0, np.nan, np.nan),
        (-2.0, -np.inf, np.inf),
    ],
)
def test_non_finite_pairs(o, q, expected):
    s = error_stats(np.array([1.0, o], dtype=np.float32), np.array([1.0, q], dtype=np.float32))
    assert s.n_nonfinite == 1 and s.n_became_nonfinite == int(np.isfinite(o))
    if np.isnan(expected):
        assert np.isnan(s.max_abs) and np.isnan(s.max_rel)
    else:
        assert s.max_abs == s.max_rel == expected


def test_combine_keeps_nan_whatever_the_order():
    from fq_core.measurement.metrics import combine

    fine = error_stats(np.ones(4, np.float32), np.full(4, 1.5, np.float32))
    nan = error_stats(np.ones(4, np.float32), np.full(4, np.nan, np.float32))
    for stats in ([fine, nan], [nan, fine]):
        t = combine(stats)
        assert np.isnan(t.max_abs) and np.isnan(t.max_rel)
        assert (t.n_nonfinite, t.n_became_nonfinite) == (4, 4) and t.mean_abs == 0.5


def test_json_has_no_bare_infinity():
    import json

    from fq_core.storage import codec

    text = codec.dumps({"a": float("inf"), "b": [float("nan"), -float("inf"), 1.5]})
    assert json.loads(text) == {"a": "inf", "b": ["nan", "-inf", 1.5]}
    assert "Infinity" not in text and "NaN" not in text
