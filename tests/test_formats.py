"""fq_core.formats: a named table of edge values for every format, then Hypothesis properties.

References: ``gguf.quants`` BF16 (what llama.cpp writes) and ``ml_dtypes`` / numpy casts.
The small-float truncation is checked against an independent table of every finite value
of the format. Hypothesis profile: ``ci`` (derandomized) by default, ``deep`` locally.
"""

from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from hypothesis import given
from hypothesis import strategies as st

from fq_core.errors import BadFormat
from fq_core.formats import FLOAT_DTYPES, FORMATS, ROUNDINGS, fake_quantize, int8_scale

U32 = np.uint32


def f32(*bit_patterns: int) -> np.ndarray:
    return np.array(bit_patterns, dtype=U32).view(np.float32)


def bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).view(U32)


def gguf_bf16(x: np.ndarray) -> np.ndarray:
    q = quantize(x.reshape(-1), GGMLQuantizationType.BF16)
    return dequantize(q, GGMLQuantizationType.BF16).reshape(x.shape)


def ml_roundtrip(x: np.ndarray, dtype) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(dtype).astype(np.float32)


# name: (input bits, bf16 truncate bits, bf16 nearest bits)
BF16_EDGES = {
    "+0": (0x00000000, 0x00000000, 0x00000000),
    "-0": (0x80000000, 0x80000000, 0x80000000),
    "smallest subnormal": (0x00000001, 0x00000000, 0x00000000),
    "-smallest subnormal": (0x80000001, 0x80000000, 0x80000000),
    "largest subnormal": (0x007FFFFF, 0x007F0000, 0x00800000),
    "smallest normal": (0x00800000, 0x00800000, 0x00800000),
    "largest normal": (0x7F7FFFFF, 0x7F7F0000, 0x7F800000),
    "-largest normal": (0xFF7FFFFF, 0xFF7F0000, 0xFF800000),
    "largest bf16": (0x7F7F0000, 0x7F7F0000, 0x7F7F0000),
    "1.0": (0x3F800000, 0x3F800000, 0x3F800000),
    "tie, even below": (0x3F808000, 0x3F800000, 0x3F800000),
    "tie, even above": (0x3F818000, 0x3F810000, 0x3F820000),
    "-tie, even above": (0xBF818000, 0xBF810000, 0xBF820000),
    "just above tie": (0x3F808001, 0x3F800000, 0x3F810000),
    "just below tie": (0x3F807FFF, 0x3F800000, 0x3F800000),
    "just below tie, odd": (0x3F817FFF, 0x3F810000, 0x3F810000),
    "tie at largest normal": (0x7F7F8000, 0x7F7F0000, 0x7F800000),
    "+Inf": (0x7F800000, 0x7F800000, 0x7F800000),
    "-Inf": (0xFF800000, 0xFF800000, 0xFF800000),
    "quiet NaN": (0x7FC00000, 0x7FC00000, 0x7FC00000),
    "-quiet NaN": (0xFFC00000, 0xFFC00000, 0xFFC00000),
    "quiet NaN, low payload": (0x7FC00001, 0x7FC00000, 0x7FC00000),
    "signalling NaN, high payload": (0x7F810000, 0x7F810000, 0x7FC10000),
    "signalling NaN, low payload": (0x7F800001, 0x7FC00000, 0x7FC00000),
    "-signalling NaN, low payload": (0xFF800001, 0xFFC00000, 0xFFC00000),
    "signalling NaN, both halves": (0x7F810001, 0x7F810000, 0x7FC10000),
    "NaN, all payload bits": (0x7FFFFFFF, 0x7FFF0000, 0x7FFF0000),
}
EDGE_NAMES = list(BF16_EDGES)
EDGE_INPUT = f32(*(v[0] for v in BF16_EDGES.values()))


@pytest.mark.parametrize("name", EDGE_NAMES)
@pytest.mark.parametrize("rounding,column", [("truncate", 1), ("nearest", 2)])
def test_bf16_edge_table(name, rounding, column):
    src, *expected = BF16_EDGES[name]
    x = f32(src)
    got = int(bits(fake_quantize(x, "bf16", rounding))[0])
    assert got == expected[column - 1], f"{name}: 0x{src:08x} -> 0x{got:08x}"


def test_bf16_nearest_edge_column_is_what_gguf_writes():
    expected = np.array([v[2] for v in BF16_EDGES.values()], dtype=U32)
    np.testing.assert_array_equal(bits(gguf_bf16(EDGE_INPUT)), expected)


@pytest.mark.parametrize("fmt", sorted(FLOAT_DTYPES))
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_small_floats_on_edge_table(fmt, rounding):
    dtype = FLOAT_DTYPES[fmt]
    got = fake_quantize(EDGE_INPUT, fmt, rounding)
    nan_in = np.isnan(EDGE_INPUT)
    assert np.isnan(got[nan_in]).all(), "NaN must stay NaN"
    zero = EDGE_INPUT == 0
    np.testing.assert_array_equal(bits(got[zero]), bits(EDGE_INPUT[zero]))  # ±0 kept
    if rounding == "nearest":
        np.testing.assert_array_equal(got, ml_roundtrip(EDGE_INPUT, dtype))
    else:
        finite = np.isfinite(EDGE_INPUT)
        np.testing.assert_array_equal(got[finite], rtz_reference(EDGE_INPUT[finite], dtype))


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_int8_on_finite_edges_and_refuses_the_rest(rounding):
    finite = EDGE_INPUT[np.isfinite(EDGE_INPUT)]
    got = fake_quantize(finite, "int8", rounding)
    assert np.isfinite(got).all()
    assert np.max(np.abs(got - finite.astype(np.float64))) <= int8_scale(finite)
    with pytest.raises(BadFormat, match=r"blk\.3\.ffn_norm\.weight"):
        fake_quantize(EDGE_INPUT, "int8", rounding, tensor_name="blk.3.ffn_norm.weight")


def test_placebo_on_edge_table_leaves_zero_inf_nan_alone():
    untouched = ~np.isfinite(EDGE_INPUT) | (EDGE_INPUT == 0)
    for seed in range(8):
        got = fake_quantize(EDGE_INPUT, "placebo", seed=seed, tensor_name="t")
        np.testing.assert_array_equal(bits(got)[untouched], bits(EDGE_INPUT)[untouched])
        assert set(np.unique(bits(got) ^ bits(EDGE_INPUT))) <= {0, 1}


# --- range behaviour of the small floats (documented in formats.py and the README) ---

RANGE_CASES = [
    # fmt, value, nearest, truncate
    ("fp16", 1e6, np.inf, 65504.0),
    ("fp16", -1e6, -np.inf, -65504.0),
    ("fp16", 65519.0, 65504.0, 65504.0),
    ("fp16", 65520.0, np.inf, 65504.0),
    ("fp16", np.inf, np.inf, np.inf),
    ("fp8_e5m2", 1e6, np.inf, 57344.0),
    ("fp8_e5m2", -np.inf, -np.inf, -np.inf),
    ("fp8_e4m3", 460.0, 448.0, 448.0),
    ("fp8_e4m3", 500.0, np.nan, 448.0),
    ("fp8_e4m3", -1e6, np.nan, -448.0),
    ("fp8_e4m3", np.inf, np.nan, np.nan),
]


@pytest.mark.parametrize("fmt,value,nearest,truncate", RANGE_CASES)
def test_out_of_range_nearest_overflows_truncate_saturates(fmt, value, nearest, truncate):
    x = np.array([value], dtype=np.float32)
    np.testing.assert_array_equal(fake_quantize(x, fmt, "nearest"), [nearest])
    np.testing.assert_array_equal(fake_quantize(x, fmt, "truncate"), [truncate])
    # nearest is literally the ml_dtypes / numpy cast
    np.testing.assert_array_equal(fake_quantize(x, fmt, "nearest"), ml_roundtrip(x, fmt_dtype(fmt)))


def fmt_dtype(fmt: str):
    return FLOAT_DTYPES[fmt]


# --- API contract ---


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_returns_new_float32_array_and_leaves_input_alone(fmt, rounding):
    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4)
    before = x.copy()
    out = fake_quantize(x, fmt, rounding, seed=1, tensor_name="t")
    assert out.dtype == np.float32 and out.shape == x.shape
    assert not np.shares_memory(out, x)
    np.testing.assert_array_equal(bits(x), bits(before))
    scalar = fake_quantize(np.float32(1.5).reshape(()), fmt, rounding)
    assert scalar.shape == ()


def test_unknown_format_rounding_and_dtype_are_bad_format():
    x = np.ones(4, dtype=np.float32)
    with pytest.raises(BadFormat, match="unknown format 'bf17'"):
        fake_quantize(x, "bf17")
    with pytest.raises(BadFormat, match="unknown rounding 'stochastic'"):
        fake_quantize(x, "bf16", "stochastic")
    with pytest.raises(BadFormat, match="float64"):
        fake_quantize(x.astype(np.float64), "bf16", tensor_name="t")
    with pytest.raises(BadFormat, match="seed"):
        fake_quantize(x, "placebo", seed=-1)


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


@given(st.lists(finite_f32, min_size=2, max_size=64), rounding_st)
def test_bf16_is_monotone(values, rounding):
    x = np.sort(np.array(values, dtype=np.float32))
    y = fake_quantize(x, "bf16", rounding)
    assert (np.diff(y.astype(np.float64)) >= 0).all()


@given(any_bits)
def test_bf16_nearest_equals_gguf_and_ml_dtypes(b):
    x = b.view(np.float32)
    y = fake_quantize(x, "bf16", "nearest")
    np.testing.assert_array_equal(bits(y), bits(gguf_bf16(x)))
    ok = ~np.isnan(x)
    np.testing.assert_array_equal(bits(y)[ok], bits(ml_roundtrip(x, ml_dtypes.bfloat16))[ok])


# --- Hypothesis: fp16 / fp8 ---


def rtz_reference(x: np.ndarray, dtype) -> np.ndarray:
    """Round toward zero by lookup in the sorted table of every finite value of ``dtype``."""
    dtype = np.dtype(dtype)
    codes = np.arange(2 ** (8 * dtype.itemsize), dtype=f"u{dtype.itemsize}").view(dtype)
    table = codes.astype(np.float64)
    table = np.unique(table[np.isfinite(table) & (table >= 0)])
    mag = np.abs(x.astype(np.float64))
    idx = np.searchsorted(table, mag, side="right") - 1
    out = table[idx].astype(np.float32)
    return np.where(np.signbit(x), -out, out).astype(np.float32)


small_fmt = st.sampled_from(sorted(FLOAT_DTYPES))


@given(any_bits, small_fmt)
def test_small_float_nearest_is_the_ml_dtypes_round_trip(b, fmt):
    x = b.view(np.float32)
    y = fake_quantize(x, fmt, "nearest")
    ref = ml_roundtrip(x, FLOAT_DTYPES[fmt])
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    ok = ~np.isnan(ref)
    np.testing.assert_array_equal(bits(y)[ok], bits(ref)[ok])


@given(any_bits, small_fmt)
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
