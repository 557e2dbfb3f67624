"""Reference float conversions the format tests compare fq_core.formats against.

gguf.quants BF16 is what llama.cpp writes; ml_dtypes/numpy casts round to nearest; the
round-toward-zero reference is a lookup in the table of every finite value of the format.
"""

from __future__ import annotations

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
