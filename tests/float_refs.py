"""Reference float conversions the format tests compare fq_core.definitions.formats against.

gguf.quants BF16 is what llama.cpp writes; ml_dtypes/numpy casts round to nearest; the
round-toward-zero reference is a lookup in the table of every finite value of the format.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

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


def finite_magnitudes(dtype) -> np.ndarray:
    """Every finite non-negative value of ``dtype``, sorted, as float64; table[0] is +0.0.

    The sign bit decides, not ``>= 0``: ``-0.0 >= 0`` holds, and ``np.unique`` may keep
    -0.0 as the representative of zero, which then leaks its sign into every lookup.
    """
    dtype = np.dtype(dtype)
    codes = np.arange(2 ** (8 * dtype.itemsize), dtype=f"u{dtype.itemsize}").view(dtype)
    table = codes.astype(np.float64)
    table = np.unique(table[np.isfinite(table) & ~np.signbit(table)])
    assert table[0] == 0 and not np.signbit(table[0]), "zero must be +0.0"
    return table


def rtz_reference(x: np.ndarray, dtype) -> np.ndarray:
    """Round toward zero by lookup in the sorted table of every finite value of ``dtype``.

    For finite ``x`` only. Magnitudes past the largest value saturate at it (the last
    entry); the sign is put back from ``x``, so ±0 and values that round to zero keep it.
    """
    x = np.asarray(x, dtype=np.float32)
    assert np.isfinite(x).all(), "the reference is defined for finite inputs only"
    table = finite_magnitudes(dtype)
    mag = np.abs(x.astype(np.float64))
    idx = np.searchsorted(table, mag, side="right") - 1  # >= 0: table[0] = 0 <= mag
    out = table[idx].astype(np.float32)
    return np.where(np.signbit(x), -out, out).astype(np.float32)


def format_edges(dtype) -> dict[str, float]:
    """Named edge values of a small float format, as float32 inputs.

    Both signed zeros, the smallest subnormal and half of it (rounds to a signed zero),
    the smallest normal, the largest finite value and just past it: the inputs where a
    reference or an implementation has to get the sign and the ends right.
    """
    fi = ml_dtypes.finfo(dtype)
    tiny_sub = float(fi.smallest_subnormal)
    big = float(fi.max)
    edges = {
        "+0": 0.0,
        "-0": -0.0,
        "smallest subnormal": tiny_sub,
        "half smallest subnormal": tiny_sub / 2,
        "-half smallest subnormal": -tiny_sub / 2,
        "smallest normal": float(fi.smallest_normal),
        "largest finite": big,
        "-largest finite": -big,
        "past largest finite": big * 1.0625,
        "-past largest finite": -big * 1.0625,
    }
    return {name: float(np.float32(v)) for name, v in edges.items()}
