"""llama.cpp's own tensor types as formats: values quantized by ggml's own code (the pinned
build's libggml-base, through ctypes: `ggml_quantize_chunk`, what `llama-quantize` calls for
every row) and dequantized by gguf-py, the same function the float twin uses, so a tensor made
"fake" here is exactly what the twin of the real file would hold.

Why ggml and not gguf-py for quantizing: gguf-py quantizes only BF16, Q4_0/1, Q5_0/1, Q8_0,
TQ1_0/2_0 and MXFP4; the K-quants and IQ types exist only in ggml. No importance matrix is
used (llama-quantize without --imatrix), so types that require one are refused.

A block type needs rows (the first dimension, ne0) that are a multiple of its block size:
Gemma3-270M's 640-wide rows take q8_0 (32) but not q4_k (256); such a request is refused
before anything is written, with the tensor and the reason.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np

from ..definitions.formats import LLAMA_TYPES
from ..errors import BadInput

Q = gguf.GGMLQuantizationType

#: the formats that are llama.cpp's types (definitions.formats names them) as gguf-py's enum
TYPES: dict[str, Q] = {name: Q[name.upper()] for name in LLAMA_TYPES}

LIBRARY = "libggml-base.so"


def block_size(qtype: Q) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][0]


def row_bytes(qtype: Q, n_per_row: int) -> int:
    blck, size = gguf.GGML_QUANT_SIZES[qtype]
    return n_per_row // blck * size


#: elementwise formats llama.cpp can store a tensor in, and their bytes per value
STORED_ELEMENTWISE = {"bf16": 2, "fp16": 2}
#: every format a GGUF can store a tensor in, as gguf-py's enum: llama.cpp's types and the
#: elementwise formats it has (ggml_quantize_chunk rounds BF16 and F16 rows as gguf-py does)
STORED: dict[str, Q] = {**TYPES, "bf16": Q.BF16, "fp16": Q.F16}


def llama_name(fmt: str) -> str:
    """The name llama-quantize takes for a stored format (`--tensor-type name=TYPE`)."""
    return STORED[fmt].name.lower()


def format_of(type_name: str) -> str | None:
    """The stored format of llama.cpp's type `type_name` (as a GGUF or llama-quantize names
    it: Q4_K, q4_k, F16), the inverse of llama_name; None for a type fq does not store (F32)."""
    return _FORMAT_OF.get(type_name.lower())


_FORMAT_OF = {q.name.lower(): f for f, q in STORED.items()}


def stored_bytes(fmt: str, shape: tuple[int, ...]) -> int | None:
    """A tensor's bytes stored as `fmt` the way llama.cpp stores it (GGUF shape order); None
    when llama.cpp has no such type (fp8, int8) or the rows do not fit its blocks."""
    n = 1
    for d in shape:
        n *= int(d)
    if fmt in STORED_ELEMENTWISE:
        return n * STORED_ELEMENTWISE[fmt]
    if fmt not in TYPES or not shape or shape[0] % block_size(TYPES[fmt]):
        return None
    return n // shape[0] * row_bytes(TYPES[fmt], shape[0])


def unfit(fmt: str, name: str, shape: tuple[int, ...]) -> str | None:
    """Why `fmt` cannot store this tensor (in one phrase), or None when it can. `shape` is
    GGUF order: shape[0] is the row (ne0), the dimension blocks run along."""
    qtype = STORED[fmt]
    blck = block_size(qtype)
    if not shape or shape[0] % blck:
        row = shape[0] if shape else 0
        return f"{name}: rows of {row} values are not a multiple of {fmt}'s block of {blck}"
    return None


class Quantizer:
    """ggml's quantization functions of one llama.cpp build."""

    def __init__(self, lib_dir: str | Path):
        path = Path(lib_dir) / LIBRARY
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise BadInput(f"cannot load ggml's library {path}: {exc}") from None
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        self._lib = lib
        self.path = path

    def quantize(self, values: np.ndarray, fmt: str, name: str = "tensor") -> np.ndarray:
        """The bytes of `values` stored as `fmt` (rows along the last numpy axis = ne0), as
        llama.cpp writes them: a uint8 array of shape (rows, row bytes)."""
        qtype = STORED[fmt]
        x = np.ascontiguousarray(values, dtype=np.float32)
        n_per_row = x.shape[-1] if x.ndim else 1
        why = unfit(fmt, name, (n_per_row,))
        if why:
            raise BadInput(why)
        if self._lib.ggml_quantize_requires_imatrix(int(qtype)):
            raise BadInput(f"{name}: {fmt} needs an importance matrix, which fq does not make")
        nrows = x.size // n_per_row
        width = int(self._lib.ggml_row_size(int(qtype), n_per_row))
        if width != row_bytes(qtype, n_per_row):  # ggml and gguf-py disagree on the layout
            raise BadInput(f"{fmt}: ggml's row of {n_per_row} is {width} bytes, gguf-py's not")
        out = np.empty((nrows, width), dtype=np.uint8)
        done = self._lib.ggml_quantize_chunk(
            int(qtype), x.ctypes.data, out.ctypes.data, 0, nrows, n_per_row, None
        )
        if done != out.nbytes:
            raise BadInput(f"{name}: ggml wrote {done} bytes of {fmt}, expected {out.nbytes}")
        return out

    def fake(self, values: np.ndarray, fmt: str, name: str = "tensor") -> np.ndarray:
        """`values` stored as `fmt` and read back: what the twin of the real file holds."""
        raw = self.quantize(values, fmt, name)
        back = gguf.quants.dequantize(raw, STORED[fmt])
        return np.asarray(back, dtype=np.float32).reshape(np.shape(values))


def quantizer(lib_dir: str | Path | None = None) -> Quantizer:
    """ggml of the build in `lib_dir`, else of the build fq uses (found, never built here)."""
    if lib_dir is None:
        from .llama import tools

        lib_dir = tools.find_tools(build=False).library()[0]
    return Quantizer(lib_dir)
