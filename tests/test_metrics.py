"""Error statistics and distributions on tables of edge values, checked against float64 math."""

from __future__ import annotations

import numpy as np
import pytest

from fq_core.formats import fake_quantize
from fq_core.metrics import EPS, bf16_ulp, distribution, error_stats, histogram


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
