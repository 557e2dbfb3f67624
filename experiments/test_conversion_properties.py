"""Hypothesis properties of the conversion, run beside the stages in every full run.

Stage results are only as good as the conversion they run on: these properties tie
fq_core.definitions.formats to gguf.quants (llama.cpp's BF16) and ml_dtypes on generated inputs,
with extra weight on BF16 ties and low-half edge patterns. Profile ``ci`` (derandomized) by
default, ``deep`` locally (HYPOTHESIS_PROFILE=deep).
"""

from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np
from float_refs import U32, bits, format_edges, gguf_bf16, ml_roundtrip, rtz_reference
from hypothesis import example, given
from hypothesis import strategies as st

from fq_core.definitions.formats import FLOAT_DTYPES, ROUNDINGS, fake_quantize, int8_scale

# --- Hypothesis: BF16 ---

# Half the elements are arbitrary patterns; the other half sit on or next to a BF16 tie
# (low half 0x8000 ± 1) or at the ends of a low half, where rounding bugs live.
_pattern = st.one_of(
    st.integers(0, 2**32 - 1),
    st.builds(
        lambda high, low: (high << 16) | low,
        st.integers(0, 2**16 - 1),
        st.sampled_from([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF]),
    ),
)
any_bits = st.lists(_pattern, min_size=1, max_size=64).map(lambda v: np.array(v, dtype=U32))
finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
finite_arrays = st.lists(finite_f32, min_size=1, max_size=64).map(
    lambda v: np.array(v, dtype=np.float32)
)
rounding_st = st.sampled_from(ROUNDINGS)


@given(any_bits, rounding_st)
def test_bf16_low_bits_zero_and_idempotent(b, rounding):
    once = fake_quantize(b.view(np.float32), "bf16", rounding)
    assert not (bits(once) & U32(0xFFFF)).any()
    twice = fake_quantize(once, "bf16", rounding)
    np.testing.assert_array_equal(bits(twice), bits(once))


@given(any_bits, rounding_st)
def test_bf16_keeps_sign_nan_inf_and_zero(b, rounding):
    x = b.view(np.float32)
    y = fake_quantize(x, "bf16", rounding)
    np.testing.assert_array_equal(np.signbit(y), np.signbit(x))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(x))
    special = np.isinf(x) | (x == 0)
    np.testing.assert_array_equal(bits(y)[special], bits(x)[special])


@given(any_bits)
def test_bf16_truncate_never_grows_magnitude(b):
    x = b.view(np.float32)
    y = fake_quantize(x, "bf16", "truncate")
    ok = ~np.isnan(x)
    assert (np.abs(y[ok]) <= np.abs(x[ok])).all()


@given(any_bits, rounding_st)
def test_bf16_relative_error_for_normal_numbers(b, rounding):
    x = b.view(np.float32)
    y = fake_quantize(x, "bf16", rounding)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    tiny = np.finfo(np.float32).tiny
    normal = np.isfinite(x) & (np.abs(x) >= tiny) & np.isfinite(y)
    rel = np.abs(y64[normal] - x64[normal]) / np.abs(x64[normal])
    if rounding == "truncate":
        assert (rel < 2.0**-7).all()
    else:
        assert (rel <= 2.0**-8).all()


_FLT_MAX = float(np.finfo(np.float32).max)


@given(st.lists(finite_f32, min_size=2, max_size=64), rounding_st)
@example([_FLT_MAX, _FLT_MAX], "nearest")  # both round to +Inf; Inf - Inf is NaN, not a step
@example([-0.0, 0.0], "truncate")
def test_bf16_is_monotone(values, rounding):
    x = np.sort(np.array(values, dtype=np.float32))
    y = fake_quantize(x, "bf16", rounding)
    assert (y[1:] >= y[:-1]).all()  # a comparison, not np.diff: equal infinities are in order


@given(any_bits)
def test_bf16_nearest_equals_gguf_and_ml_dtypes(b):
    x = b.view(np.float32)
    y = fake_quantize(x, "bf16", "nearest")
    np.testing.assert_array_equal(bits(y), bits(gguf_bf16(x)))
    ok = ~np.isnan(x)
    np.testing.assert_array_equal(bits(y)[ok], bits(ml_roundtrip(x, ml_dtypes.bfloat16))[ok])


# --- Hypothesis: fp16 / fp8 ---


small_fmt = st.sampled_from(sorted(FLOAT_DTYPES))


def _edge_examples(test):
    """Every small format's own edge values (signed zeros first) as explicit examples."""
    for fmt, dtype in sorted(FLOAT_DTYPES.items()):
        edge = np.array(list(format_edges(dtype).values()), dtype=np.float32).view(U32)
        test = example(b=edge, fmt=fmt)(test)
        for value in edge:  # alone as well: a one-element array is what found issue 9
            test = example(b=np.array([value], dtype=U32), fmt=fmt)(test)
    return test


@given(any_bits, small_fmt)
@_edge_examples
def test_small_float_nearest_is_the_ml_dtypes_round_trip(b, fmt):
    x = b.view(np.float32)
    y = fake_quantize(x, fmt, "nearest")
    ref = ml_roundtrip(x, FLOAT_DTYPES[fmt])
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    ok = ~np.isnan(ref)
    np.testing.assert_array_equal(bits(y)[ok], bits(ref)[ok])


@given(any_bits, small_fmt)
@_edge_examples
def test_small_float_truncate_is_round_toward_zero(b, fmt):
    x = b.view(np.float32)
    y = fake_quantize(x, fmt, "truncate")
    finite = np.isfinite(x)
    np.testing.assert_array_equal(
        bits(y)[finite], bits(rtz_reference(x[finite], FLOAT_DTYPES[fmt]))
    )
    assert np.isnan(y[np.isnan(x)]).all()


# --- Hypothesis: int8 ---


@given(finite_arrays, rounding_st)
def test_int8_error_bound(x, rounding):
    y = fake_quantize(x, "int8", rounding, tensor_name="t")
    scale = int8_scale(x)
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    # the result is rounded once more to float32: allow half a float32 ULP of it
    slack = np.abs(y.astype(np.float64)) * 2.0**-24 + 2.0**-150
    bound = scale / 2 if rounding == "nearest" else scale
    assert (err <= bound + slack).all()
    levels = y.astype(np.float64) / scale if scale else np.zeros_like(err)
    assert np.max(np.abs(levels), initial=0) <= 127 * (1 + 1e-6)


def test_int8_all_zero_tensor_stays_zero():
    y = fake_quantize(np.array([0.0, -0.0, 0.0], dtype=np.float32), "int8")
    np.testing.assert_array_equal(bits(y), [0, 0, 0])  # an integer zero has no sign


# --- placebo ---


@given(finite_arrays, st.integers(0, 2**31), st.text(max_size=20))
def test_placebo_flips_only_the_lowest_bit_by_the_documented_mask(x, seed, name):
    y = fake_quantize(x, "placebo", seed=seed, tensor_name=name)
    flipped = bits(y) ^ bits(x)
    assert set(np.unique(flipped)) <= {0, 1}
    rng = np.random.default_rng((seed, zlib.crc32(name.encode())))
    expected = (rng.random(x.shape) < 0.5) & (x != 0)
    np.testing.assert_array_equal(flipped.astype(bool), expected)
    again = fake_quantize(x, "placebo", seed=seed, tensor_name=name)
    np.testing.assert_array_equal(bits(again), bits(y))


def test_placebo_seeds_and_tensors_give_different_masks():
    x = np.linspace(0.5, 2.0, 10_000, dtype=np.float32)
    masks = {
        (seed, name): (bits(fake_quantize(x, "placebo", seed=seed, tensor_name=name)) ^ bits(x))
        for seed in (0, 1, 2)
        for name in ("blk.0.ffn_norm.weight", "blk.1.ffn_norm.weight")
    }
    keys = list(masks)
    for i, a in enumerate(keys):
        frac = masks[a].mean()
        assert 0.47 < frac < 0.53, f"{a}: flipped fraction {frac}"
        for b in keys[i + 1 :]:
            assert (masks[a] != masks[b]).any(), f"{a} and {b} gave the same mask"
