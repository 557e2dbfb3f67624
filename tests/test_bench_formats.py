"""pytest-benchmark: fake_quantize on a 1M-element float32 tensor, per format and rounding.

Figures are reported (benchmark table, extra_info), not asserted. The input mixes the
value spread of real norm weights with a few specials so the NaN paths are exercised.
"""

from __future__ import annotations

import numpy as np
import pytest

from fq_core.definitions.formats import FORMATS, ROUNDINGS, fake_quantize

N = 1 << 20


@pytest.fixture(scope="module")
def values() -> np.ndarray:
    rng = np.random.default_rng(1234)
    return rng.normal(1.0, 0.5, N).astype(np.float32)


# placebo ignores rounding: benchmarked once
CASES = [(f, r) for f in FORMATS for r in ROUNDINGS if not (f == "placebo" and r == "nearest")]


@pytest.mark.parametrize("fmt,rounding", CASES)
def test_bench_fake_quantize(benchmark, values, fmt, rounding):
    benchmark.extra_info.update(n_elements=N, fmt=fmt, rounding=rounding)
    out = benchmark(fake_quantize, values, fmt, rounding, seed=1, tensor_name="bench")
    assert out.shape == values.shape and out.dtype == np.float32
    changed = int(np.count_nonzero(out != values))
    benchmark.extra_info["changed"] = changed
    assert changed > 0  # a 1M-element normal sample is never exact in any of these formats
    if benchmark.stats is not None:  # None when benchmarking is disabled (e.g. under xdist)
        benchmark.extra_info["melem_per_s"] = round(N / benchmark.stats.stats.median / 1e6, 1)
