"""fq_core.definitions.formats on a named table of edge values for every format.

The Hypothesis properties of the conversion run beside the stages, in
experiments/test_conversion_properties.py.

References: ``gguf.quants`` BF16 (what llama.cpp writes) and ``ml_dtypes`` / numpy casts.
The small-float truncation is checked against an independent table of every finite value
of the format.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from float_refs import U32, bits, f32, format_edges, gguf_bf16, ml_roundtrip, rtz_reference

from fq_core.definitions.formats import FLOAT_DTYPES, FORMATS, ROUNDINGS, fake_quantize, int8_scale
from fq_core.errors import BadFormat

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
        ref = ml_roundtrip(EDGE_INPUT, dtype)
        ok = ~np.isnan(ref)
        np.testing.assert_array_equal(bits(got)[ok], bits(ref)[ok])  # bits: ±0 differ
    else:
        finite = np.isfinite(EDGE_INPUT)
        ref = rtz_reference(EDGE_INPUT[finite], dtype)
        np.testing.assert_array_equal(bits(got[finite]), bits(ref))


# Each small format's own edges (both signed zeros, half its smallest subnormal, its largest
# value and just past it), compared bit for bit so a sign lost on a zero cannot hide.
FORMAT_EDGE_CASES = [
    (fmt, name, value)
    for fmt in sorted(FLOAT_DTYPES)
    for name, value in format_edges(FLOAT_DTYPES[fmt]).items()
]


@pytest.mark.parametrize("fmt,name,value", FORMAT_EDGE_CASES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_small_float_own_edges_bit_for_bit(fmt, name, value, rounding):
    x = np.array([value], dtype=np.float32)
    got = fake_quantize(x, fmt, rounding)
    if rounding == "truncate":
        expected = rtz_reference(x, FLOAT_DTYPES[fmt])
    else:
        expected = ml_roundtrip(x, FLOAT_DTYPES[fmt])
    if np.isnan(expected).all():
        assert np.isnan(got).all(), f"{fmt} {name}: {got[0]!r}"
    else:
        assert bits(got)[0] == bits(expected)[0], f"{fmt} {name}: {got[0]!r} != {expected[0]!r}"
    if value == 0 or abs(value) < float(ml_dtypes.finfo(FLOAT_DTYPES[fmt]).smallest_subnormal):
        assert np.signbit(got[0]) == np.signbit(x[0]), f"{fmt} {name}: the zero's sign"


def test_rtz_reference_zero_is_positive():
    """The reference's own trap (issue 9): its table of magnitudes must start at +0.0."""
    for dtype in FLOAT_DTYPES.values():
        assert bits(rtz_reference(f32(0x00000000), dtype))[0] == 0x00000000
        assert bits(rtz_reference(f32(0x80000000), dtype))[0] == 0x80000000


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
