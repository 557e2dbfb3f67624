"""F32 -> number format -> F32 conversions ("fake quantization"), and the placebo control.

Every conversion returns a new float32 array of the same shape; the input is never
modified. All work is vectorised numpy on the raw bit patterns, so a sweep over all
2^32 float32 values takes seconds, not hours.

Semantics (the README repeats these):

- ``bf16`` + ``truncate``: keep the high 16 bits (the plan's algorithm; round toward
  zero). A NaN whose payload lies only in the low 16 bits would truncate to ±Inf; such a
  NaN is kept NaN the way llama.cpp's ``ggml_compute_fp32_to_bf16`` does it,
  ``(bits >> 16) | 0x40`` (the quiet bit forced on). Every other NaN keeps its high 16
  bits unchanged, sign and payload included.
- ``bf16`` + ``nearest``: round to nearest, ties to even, NaNs forced quiet with their
  sign and high payload kept: bit-identical to llama.cpp / ``gguf.quants`` BF16. Finite
  values from the midpoint between BF16's largest value (0x7F7F) and 2^128 upward round
  to ±Inf, as IEEE prescribes.
- ``fp16``, ``fp8_e4m3`` (``float8_e4m3fn``), ``fp8_e5m2``: ``nearest`` is the
  numpy / ``ml_dtypes`` cast (ties to even). Out of range under ``nearest``: fp16 and
  fp8_e5m2 become ±Inf; fp8_e4m3 has no Inf, so overflow and ±Inf become NaN. ``truncate``
  is IEEE round-toward-zero: the nearest result stepped one code toward zero wherever it
  grew in magnitude, so finite values beyond the range saturate at ±max; ±Inf stays ±Inf
  (NaN for fp8_e4m3). NaN stays NaN (payloads are not kept in these formats).
- ``int8``: symmetric per-tensor absmax, ``scale = absmax / 127``, ``q`` in [-127, 127],
  result ``q * scale``. ``nearest`` rounds ties to even (error <= scale/2), ``truncate``
  rounds toward zero (error < scale). An integer zero has no sign, so -0.0 comes back as
  +0.0. Non-finite input cannot be scaled: ``BadFormat`` naming the tensor.
- ``placebo``: the lowest mantissa bit of each element flipped with probability 1/2 by a
  mask from ``np.random.default_rng((seed, crc32(tensor_name)))``, a change far below
  any format's rounding; zeros, ±Inf and NaN are left alone (flipping Inf's low bit would
  make a NaN). ``rounding`` is irrelevant to it.
"""

from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np

from fq_core.errors import BadFormat

FORMATS = ("bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "int8", "placebo")
ROUNDINGS = ("truncate", "nearest")

#: llama.cpp's own block types, by the names `llama-quantize --tensor-type` takes. Their
#: rounding is ggml's (``rounding`` does not apply); they are quantized by ggml's code of the
#: pinned build (fq_core.measurement.ggml_types), so this module only names them.
LLAMA_TYPES = (
    "q8_0",
    "q6_k",
    "q5_k",
    "q5_0",
    "q5_1",
    "q4_k",
    "q4_0",
    "q4_1",
    "q3_k",
    "q2_k",
    "mxfp4",
    "iq4_nl",
    "iq4_xs",
)

#: llama-quantize's types for a whole file (its positional argument), the presets among them:
#: a recipe's `base:` and the recipe stage's stock preset
LLAMA_PRESETS = (
    "q2_k",
    "q3_k_s",
    "q3_k_m",
    "q3_k_l",
    "q4_0",
    "q4_1",
    "q4_k_s",
    "q4_k_m",
    "q5_0",
    "q5_1",
    "q5_k_s",
    "q5_k_m",
    "q6_k",
    "q8_0",
    "iq4_nl",
    "iq4_xs",
    "f16",
    "bf16",
)

#: numpy dtypes behind the small float formats (bf16 is done on the bits directly).
FLOAT_DTYPES: dict[str, np.dtype] = {
    "fp16": np.dtype(np.float16),
    "fp8_e4m3": np.dtype(ml_dtypes.float8_e4m3fn),
    "fp8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}

INT8_LEVELS = 127

_U32 = np.uint32
_ABS = _U32(0x7FFFFFFF)
_EXP = _U32(0x7F800000)
_HIGH = _U32(0xFFFF0000)
_QUIET = _U32(0x00400000)


def fake_quantize(
    values: np.ndarray,
    fmt: str,
    rounding: str = "truncate",
    *,
    seed: int = 0,
    tensor_name: str = "",
) -> np.ndarray:
    """Round float32 ``values`` to ``fmt`` and back; a new float32 array of the same shape.

    ``seed`` and ``tensor_name`` only matter to ``placebo`` (the mask is reproducible per
    tensor); ``tensor_name`` also names the tensor in int8's error.
    """
    if fmt in LLAMA_TYPES:
        raise BadFormat(f"{fmt} is llama.cpp's type: fq_core.measurement.ggml_types quantizes it")
    if fmt not in FORMATS:
        raise BadFormat(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if rounding not in ROUNDINGS:
        raise BadFormat(f"unknown rounding {rounding!r}; choose one of {', '.join(ROUNDINGS)}")
    x = np.asarray(values)
    if x.dtype != np.float32:
        what = f" in tensor {tensor_name!r}" if tensor_name else ""
        raise BadFormat(f"fake quantization takes float32 values, got {x.dtype}{what}")
    if fmt == "bf16":
        out = bf16_truncate(x) if rounding == "truncate" else bf16_nearest(x)
    elif fmt == "int8":
        out = _int8(x, rounding, tensor_name)
    elif fmt == "placebo":
        out = placebo(x, seed=seed, tensor_name=tensor_name)
    else:
        out = _small_float(x, FLOAT_DTYPES[fmt], rounding)
    return out


def bf16_truncate(x: np.ndarray) -> np.ndarray:
    """Keep the high 16 bits; a NaN that would become ±Inf gets llama.cpp's quiet bit."""
    x = np.asarray(x, dtype=np.float32)
    out = x.view(_U32) & _HIGH
    nan = np.isnan(x)
    if nan.any():
        # NaN in, Inf out: its payload was only in the low 16 bits.
        lost = nan & ~np.isnan(out.view(np.float32))
        out[lost] |= _QUIET
    return out.view(np.float32)


def bf16_nearest(x: np.ndarray) -> np.ndarray:
    """Round to nearest even like ``ggml_compute_fp32_to_bf16`` (NaN: force quiet bit)."""
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(_U32)
    # Cannot overflow uint32 for non-NaN input: the largest such pattern is 0xFF800000.
    n = bits >> _U32(16)
    n &= _U32(1)
    n += _U32(0x7FFF)
    n += bits
    n &= _HIGH
    nan = np.isnan(x)
    if nan.any():
        n[nan] = (bits[nan] & _HIGH) | _QUIET
    return n.view(np.float32)


def _small_float(x: np.ndarray, dtype: np.dtype, rounding: str) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        y = x.astype(dtype)
        if rounding == "truncate":
            _toward_zero(x, y, dtype)
        return y.astype(np.float32)


def _toward_zero(x: np.ndarray, y: np.ndarray, dtype: np.dtype) -> None:
    """Turn the round-to-nearest result ``y`` into round-toward-zero, in place.

    Sign-magnitude codes are ordered by magnitude, so one code down is the next value
    toward zero; Inf minus one code is the largest finite value (saturation).
    """
    uint = np.dtype(f"u{dtype.itemsize}")
    codes = y.view(uint)
    back = y.astype(np.float32)
    # NaN and Inf never compare greater, so only finite values that grew are stepped.
    grew = np.abs(back) > np.abs(x)
    codes -= grew.view(np.uint8).astype(uint, copy=False)
    # fp8_e4m3fn: a finite overflow rounded to NaN; saturate at ±max instead.
    overflowed = np.isnan(back)
    if overflowed.any():
        overflowed &= np.isfinite(x)
        fmax = np.array(ml_dtypes.finfo(dtype).max, dtype=dtype).view(uint)
        sign = uint.type(1 << (8 * dtype.itemsize - 1))
        codes[overflowed] = np.where(np.signbit(x[overflowed]), fmax | sign, fmax)


def int8_scale(x: np.ndarray) -> float:
    """Per-tensor symmetric scale, absmax / 127 (0.0 for an all-zero tensor)."""
    if x.size == 0:
        return 0.0
    return float(np.max(np.abs(x)).astype(np.float64)) / INT8_LEVELS


def _int8(x: np.ndarray, rounding: str, tensor_name: str) -> np.ndarray:
    finite = np.isfinite(x)
    if not finite.all():
        bad = int(np.size(x) - np.count_nonzero(finite))
        name = tensor_name or "<unnamed>"
        raise BadFormat(
            f"int8 cannot represent tensor {name}: {bad} non-finite element(s) (Inf/NaN)"
        )
    scale = int8_scale(x)
    if scale == 0.0:
        return np.zeros_like(x, dtype=np.float32)
    q = x.astype(np.float64) / scale
    q = np.rint(q) if rounding == "nearest" else np.trunc(q)
    q = np.clip(q, -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
    return (q.astype(np.float64) * scale).astype(np.float32)


def placebo_rng(seed: int, tensor_name: str) -> np.random.Generator:
    """The placebo's generator: reproducible per (seed, tensor), independent across tensors."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise BadFormat(f"placebo seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng((int(seed), zlib.crc32(tensor_name.encode())))


def placebo(x: np.ndarray, *, seed: int = 0, tensor_name: str = "") -> np.ndarray:
    """Flip the lowest mantissa bit of finite non-zero elements with probability 1/2."""
    rng = placebo_rng(seed, tensor_name)
    bits = np.asarray(x, dtype=np.float32).view(_U32)
    mask = rng.random(bits.shape) < 0.5
    mag = bits & _ABS
    mask &= (mag != 0) & (mag < _EXP)
    out = bits ^ mask.astype(_U32)
    return out.view(np.float32)
