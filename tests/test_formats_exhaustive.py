"""Both BF16 modes checked on every one of the 2^32 float32 bit patterns.

The sweep runs in chunks of 2^18 patterns (small enough to stay in cache) on two threads
(numpy releases the GIL), so it stays fast enough to run in `make test`. Each chunk is
compared bit for bit:

- truncate against an independent formulation written on 16-bit halves (llama.cpp's
  ``(bits >> 16) | 0x40`` for a NaN that would otherwise read as Inf);
- nearest against ``gguf.quants`` BF16 (quantize + dequantize), NaN payloads included,
  and against ``ml_dtypes.bfloat16`` on every non-NaN pattern.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from fq_core.definitions.formats import fake_quantize

pytestmark = pytest.mark.slow

CHUNK_BITS = 18  # 1 MiB per array: the temporaries stay in cache
N_CHUNKS = 1 << (32 - CHUNK_BITS)
THREADS = 2


def _first_mismatch(start, got, want, what, where=None) -> str | None:
    differs = got != want
    if where is not None:
        differs &= where
    if not differs.any():
        return None
    bad = np.flatnonzero(differs)
    i = int(bad[0])
    return (
        f"{what}: {bad.size} mismatches in chunk at 0x{start:08x}; first input 0x{start + i:08x}"
        f" -> 0x{int(got[i]):08x}, expected 0x{int(want[i]):08x}"
    )


def _truncate_reference(bits: np.ndarray) -> np.ndarray:
    high = (bits >> np.uint32(16)).astype(np.uint16)
    is_nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    reads_as_inf = (high & np.uint16(0x7FFF)) == np.uint16(0x7F80)
    high[is_nan & reads_as_inf] |= np.uint16(0x40)
    return high.astype(np.uint32) << np.uint32(16)


def _check_chunk(index: int) -> list[str]:
    start = index << CHUNK_BITS
    bits = np.arange(start, start + (1 << CHUNK_BITS), dtype=np.uint32)
    x = bits.view(np.float32)
    problems = []

    got = fake_quantize(x, "bf16", "truncate").view(np.uint32)
    problems.append(_first_mismatch(start, got, _truncate_reference(bits), "truncate"))

    got = fake_quantize(x, "bf16", "nearest").view(np.uint32)
    ref = dequantize(quantize(x, GGMLQuantizationType.BF16), GGMLQuantizationType.BF16)
    problems.append(_first_mismatch(start, got, ref.view(np.uint32), "nearest vs gguf.quants"))

    with np.errstate(invalid="ignore", over="ignore"):
        ml = x.astype(ml_dtypes.bfloat16).astype(np.float32).view(np.uint32)
    not_nan = ~np.isnan(x)
    problems.append(_first_mismatch(start, got, ml, "nearest vs ml_dtypes (non-NaN)", not_nan))
    return [p for p in problems if p]


@contextmanager
def _heap_reuse():
    """Keep glibc from mmap/munmap-ing every 1 MiB temporary (that churn doubled the run).

    Raises the mmap threshold for the sweep only, then restores glibc's default and
    returns the freed memory; a no-op where glibc's mallopt is not available.
    """
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    mallopt = getattr(libc, "mallopt", None)
    m_trim_threshold, m_mmap_threshold = -1, -3
    if mallopt is None:
        yield
        return
    mallopt(m_mmap_threshold, 64 << 20)
    mallopt(m_trim_threshold, 1 << 30)
    try:
        yield
    finally:
        mallopt(m_mmap_threshold, 128 << 10)
        mallopt(m_trim_threshold, 128 << 10)
        libc.malloc_trim(0)


def test_bf16_all_float32_bit_patterns():
    t0 = time.perf_counter()
    with _heap_reuse(), ThreadPoolExecutor(THREADS) as pool:
        problems = [p for chunk in pool.map(_check_chunk, range(N_CHUNKS)) for p in chunk]
    elapsed = time.perf_counter() - t0
    print(f"exhaustive BF16 sweep: 2^32 patterns x 2 modes in {elapsed:.1f} s")
    assert not problems, "\n".join(problems[:20])
