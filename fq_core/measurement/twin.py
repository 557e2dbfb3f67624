"""The float twin of a quantized GGUF: every quantized tensor dequantized, everything else kept.

Why: llama.cpp's CPU matmul converts the activations to the weights' `vec_dot_type` before
the dot product; for the quantized types that is an 8-bit type (Q8_0 / Q8_K), so any change
to a norm weight flips roundings of the activations and hides the intrinsic effect of a
fake quantization under that noise. With F32 weights the activations stay F32: the twin
made with ``dtype="f32"`` has no such rounding step. An ``"f16"`` (or ``"bf16"``) twin is half
the size and ~1.75x faster to run, but llama.cpp then rounds the activations to F16 (BF16):
a much finer, but not absent, step.

What the twin is, byte for byte: the source's header and key-value section copied verbatim
(only the value of ``general.file_type`` patched, when the source has that key), the tensor
infos in the same order with the same names and shapes, the new types and freshly aligned
offsets, then the data: F32 (and F64 / integer) tensors copied byte for byte; every
block-quantized tensor dequantized with ``gguf.quants.dequantize`` and written in the target
type; F16 / BF16 tensors become F32 in an f32 twin and are copied as they are in an
f16 / bf16 twin (converting between the two would change values).

How: one sequential pass over the source (which also gives its SHA-256 from its bytes),
tensor by tensor in blocks of at most ``CHUNK_BYTES`` of output, never the whole file nor a
whole tensor in memory, no ``GGUFReader`` (10 s to open Gemma3); the output's SHA-256 is
computed while it is written. The file goes through ``fq_core.platform.atomic`` (a temporary beside
the target, published when complete and checked), followed by its manifest
``<dst>.twin.json``; on any error or Ctrl-C nothing is left behind.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import struct
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import gguf
import numpy as np

from .. import __version__
from ..errors import BadFormat, BadInput, BadModel, OutputRefused
from ..platform import atomic, hashing
from .gguf_index import GGUFIndex, TensorInfo, read_index
from .metrics import ErrorStats, combine, error_stats
from .models import ModelRef
from .patch import FileRecord

log = logging.getLogger(__name__)

QT = gguf.GGMLQuantizationType
VT = gguf.GGUFValueType

DTYPES = ("f32", "f16", "bf16")
MANIFEST_SUFFIX = ".twin.json"
MANIFEST_SCHEMA = 1
CHUNK_BYTES = 4 * 1024 * 1024  # dequantized float32 bytes per block of a converted tensor
_COPY_BYTES = 4 * 1024 * 1024  # bytes per read when copying

_TARGET = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16}
_ITEMSIZE = {QT.F32: 4, QT.F16: 2, QT.BF16: 2}
_FILE_TYPE = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
}
#: Copied byte for byte into every twin: full precision already, or not numbers to round.
KEPT_TYPES = frozenset({QT.F32, QT.F64, QT.I8, QT.I16, QT.I32, QT.I64})
#: Float types that become F32 in an f32 twin and stay as they are in an f16 / bf16 twin.
FLOAT_TYPES = frozenset({QT.F16, QT.BF16})
_INT_FORMATS = {
    VT.UINT8: "<B",
    VT.INT8: "<b",
    VT.UINT16: "<H",
    VT.INT16: "<h",
    VT.UINT32: "<I",
    VT.INT32: "<i",
    VT.UINT64: "<Q",
    VT.INT64: "<q",
}


# --- the manifest -----------------------------------------------------------------------


@dataclass(frozen=True)
class TwinTensor:
    name: str
    type_before: str
    type_after: str
    n_elements: int
    shape: tuple[int, ...]
    # a real file's stored tensor: its values read back against the values it was made from
    error: ErrorStats | None = None

    @property
    def converted(self) -> bool:
        return self.type_before != self.type_after

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        if self.error is None:
            del d["error"]
        return d


@dataclass(frozen=True)
class TwinManifest:
    tool_version: str
    created_at: str
    source: FileRecord
    output: FileRecord
    dtype: str
    file_type_before: int | None  # general.file_type (None: the source has no such key)
    file_type_after: int | None
    alignment: int
    tensors: tuple[TwinTensor, ...]
    seconds: float
    gguf_py_version: str
    path: str = ""  # where the manifest is

    @property
    def n_converted(self) -> int:
        return sum(t.converted for t in self.tensors)

    @property
    def stored(self) -> tuple[TwinTensor, ...]:
        """A real file's tensors stored as another type (make_real), with their errors."""
        return tuple(t for t in self.tensors if t.error is not None)

    @property
    def converted_types(self) -> dict[str, int]:
        """Source type -> number of tensors converted from it (largest first)."""
        return dict(Counter(t.type_before for t in self.tensors if t.converted).most_common())

    def summary(self) -> str:
        """One line: what was dequantized, the size, the time."""
        types = ", ".join(f"{k} {v}" for k, v in self.converted_types.items())
        if self.stored or self.dtype not in _TARGET:  # a real file (make_real)
            verb, target = "stored", f"as {self.dtype}"
        else:
            verb, target = "dequantized", f"to {_TARGET[self.dtype].name}"
        what = (
            f"{verb} {self.n_converted} of {len(self.tensors)} tensors ({types}) {target}"
            if self.n_converted
            else f"no tensor to convert among {len(self.tensors)}: the twin is a copy"
        )
        return (
            f"{what}; {self.output.size:,} bytes ({self.output.size / self.source.size:.2f}x "
            f"the source) in {self.seconds:.1f} s"
        )

    def to_json(self) -> dict:
        return {
            "schema": MANIFEST_SCHEMA,
            "tool": "fq-suite",
            "tool_version": self.tool_version,
            "created_at": self.created_at,
            "source": asdict(self.source),
            "output": asdict(self.output),
            "dtype": self.dtype,
            "file_type": {"before": self.file_type_before, "after": self.file_type_after},
            "alignment": self.alignment,
            "n_converted": self.n_converted,
            "converted_types": self.converted_types,
            "tensors": [t.to_json() for t in self.tensors],
            "summary": self.summary(),
            "seconds": round(self.seconds, 3),
            "gguf_py_version": self.gguf_py_version,
        }

    @classmethod
    def from_json(cls, doc: dict, path: str = "") -> TwinManifest:
        return cls(
            tool_version=doc["tool_version"],
            created_at=doc["created_at"],
            source=FileRecord(**doc["source"]),
            output=FileRecord(**doc["output"]),
            dtype=doc["dtype"],
            file_type_before=doc["file_type"]["before"],
            file_type_after=doc["file_type"]["after"],
            alignment=doc["alignment"],
            tensors=tuple(
                TwinTensor(
                    t["name"],
                    t["type_before"],
                    t["type_after"],
                    t["n_elements"],
                    tuple(t["shape"]),
                    ErrorStats(**t["error"]) if t.get("error") else None,
                )
                for t in doc["tensors"]
            ),
            seconds=doc["seconds"],
            gguf_py_version=doc.get("gguf_py_version", "unknown"),
            path=path,
        )


def manifest_path(dst) -> Path:
    return Path(f"{dst}{MANIFEST_SUFFIX}")


def read_manifest(dst_or_manifest_path) -> TwinManifest:
    """The manifest of a twin (give the twin or its .twin.json); BadInput if unreadable."""
    p = Path(dst_or_manifest_path)
    if not p.name.endswith(MANIFEST_SUFFIX):
        p = manifest_path(p)
    try:
        doc = json.loads(p.read_text())
        if doc.get("schema") != MANIFEST_SCHEMA:
            raise ValueError(f"schema {doc.get('schema')!r}, expected {MANIFEST_SCHEMA}")
        return TwinManifest.from_json(doc, str(p))
    except FileNotFoundError:
        raise BadInput(f"no twin manifest at {p}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"{p}: unreadable twin manifest ({exc})") from None


# --- the plan ---------------------------------------------------------------------------


def _check_dtype(dtype: str) -> QT:
    if dtype not in _TARGET:
        raise BadInput(f"unknown twin dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return _TARGET[dtype]


@functools.cache
def can_dequantize(ggml_type: int) -> bool:
    """Whether gguf-py can dequantize this type (tried on one block of zeros)."""
    qt = QT(ggml_type)
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    try:
        out = gguf.quants.dequantize(np.zeros(type_size, dtype=np.uint8), qt)
    except NotImplementedError:
        return False
    return out.dtype == np.float32 and out.size == block


def target_type(ggml_type: int, dtype: str) -> QT:
    """The type a tensor of `ggml_type` has in a twin of `dtype`."""
    target = _check_dtype(dtype)
    qt = QT(ggml_type)
    if qt in KEPT_TYPES:
        return qt
    if qt in FLOAT_TYPES and target != QT.F32:
        return qt  # an f16/bf16 twin keeps F16 and BF16 exactly as they are
    return target


@dataclass(frozen=True)
class _Planned:
    info: TensorInfo
    new_type: QT
    n_bytes: int  # in the twin
    rel_offset: int  # in the twin's data section
    store: str | None = None  # a real file's llama.cpp type (ggml_types), made from the values

    @property
    def converted(self) -> bool:
        return self.new_type != self.info.ggml_type


def _pad(x: int, n: int) -> int:
    return (x + n - 1) // n * n


def _plan(index: GGUFIndex, dtype: str) -> list[_Planned]:
    planned, rel = [], 0
    for info in index.tensors:
        new = target_type(info.ggml_type, dtype)
        if new != info.ggml_type:
            if not can_dequantize(info.ggml_type):
                raise BadModel(
                    f"{index.path.name}: tensor {info.name!r} has type {info.type_name}, which "
                    f"gguf-py {_gguf_version()} cannot dequantize"
                )
            n_bytes = info.n_elements * _ITEMSIZE[new]
        else:
            n_bytes = info.n_bytes
        planned.append(_Planned(info, new, n_bytes, rel))
        rel += _pad(n_bytes, index.alignment)
    return planned


def _plan_real(index: GGUFIndex, store: dict[str, str]) -> list[_Planned]:
    """Every tensor kept as it is but those in `store`, which become that llama.cpp type."""
    from . import ggml_types

    planned, rel = [], 0
    for info in index.tensors:
        fmt = store.get(info.name)
        if fmt is None:
            new, n_bytes = QT(info.ggml_type), info.n_bytes
        else:
            why = ggml_types.unfit(fmt, info.name, tuple(info.shape))
            if why:
                raise BadInput(why)
            if QT(info.ggml_type) not in KEPT_TYPES | FLOAT_TYPES and not can_dequantize(
                info.ggml_type
            ):
                raise BadModel(f"{info.name}: gguf-py cannot read {info.type_name} values")
            new = ggml_types.STORED[fmt]
            n_bytes = ggml_types.stored_bytes(fmt, tuple(info.shape))
        planned.append(_Planned(info, new, n_bytes, rel, fmt))
        rel += _pad(n_bytes, index.alignment)
    return planned


def _file_type(index: GGUFIndex) -> tuple[int | None, str | None]:
    """general.file_type and its struct format; (None, None) when absent or not an integer."""
    key = "general.file_type"
    if key not in index.metadata:
        return None, None
    fmt = _INT_FORMATS.get(index.value_types.get(key))
    value = index.metadata[key]
    if fmt is None or isinstance(value, bool) or not isinstance(value, int):
        log.warning("%s: general.file_type is not an integer; left as it is", index.path.name)
        return None, None
    return value, fmt


def _header(
    index: GGUFIndex, raw: bytearray, plan: list[_Planned], file_type: tuple[str, int] | None
) -> bytearray:
    """The twin's header: the source's bytes up to its data section, with general.file_type
    (`file_type`: its struct format and new value) patched and each tensor info's type and
    offset replaced (nothing else moves)."""
    out = raw[: index.infos_start]  # a copy
    if file_type is not None:
        fmt, new = file_type
        off = index.value_offsets["general.file_type"]
        try:
            struct.pack_into(fmt, out, off, new)
        except struct.error:
            raise BadModel(f"{index.path.name}: cannot store file type {new} as {fmt}") from None
    pos = index.infos_start
    u32, u64 = struct.Struct("<I"), struct.Struct("<Q")
    for p in plan:
        start = pos
        (n,) = u64.unpack_from(raw, pos)
        pos += 8 + n
        (n_dims,) = u32.unpack_from(raw, pos)
        pos += 4 + 8 * n_dims
        if raw[start + 8 : start + 8 + n].decode("utf-8", "replace") != p.info.name:
            raise BadModel(f"{index.path.name}: tensor infos do not match the index")
        out += raw[start:pos]
        out += struct.pack("<iQ", int(p.new_type), p.rel_offset)
        pos += 4 + 8
    if pos != index.infos_end:
        raise BadModel(f"{index.path.name}: tensor infos end at {pos}, not {index.infos_end}")
    out += raw[index.infos_end : index.data_start]  # the padding to the data section
    return out


# --- reading and writing ----------------------------------------------------------------


class _Source:
    """Sequential reads of the source that hash every byte of it on the way."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        self.pos = 0
        self.digest = hashlib.sha256()
        self._gap = bytearray(_COPY_BYTES)

    def close(self) -> None:
        self.f.close()

    def _fill(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = self.f.readinto(view[got:])
            if not n:
                raise BadModel(
                    f"{self.path.name}: the file ends at byte {self.pos + got} "
                    "(it changed while the twin was written?)"
                )
            got += n
        self.digest.update(view)
        self.pos += got

    def skip_to(self, offset: int) -> None:
        if offset < self.pos:
            raise BadModel(f"{self.path.name}: tensor data out of order at {offset}")
        while self.pos < offset:
            self._fill(memoryview(self._gap)[: min(len(self._gap), offset - self.pos)])

    def read_into(self, offset: int, view: memoryview) -> None:
        self.skip_to(offset)
        self._fill(view)

    def finish(self) -> tuple[str, int]:
        """Hash the rest of the file; (sha256, size)."""
        view = memoryview(self._gap)
        while n := self.f.readinto(view):
            self.digest.update(view[:n])
            self.pos += n
        return self.digest.hexdigest(), self.pos


class _Sink:
    """The output file, hashed as it is written."""

    def __init__(self, f):
        self.f = f
        self.digest = hashlib.sha256()
        self.pos = 0

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self.f.write(view)
        self.digest.update(view)
        self.pos += len(view)

    def pad_to(self, alignment: int) -> None:
        n = _pad(self.pos, alignment) - self.pos
        if n:
            self.write(bytes(n))


def _convert(values: np.ndarray, target: QT, name: str) -> np.ndarray:
    """float32 values in the target type (round to nearest even); BadFormat on overflow."""
    if target == QT.F32:
        return values
    if target == QT.F16:
        with np.errstate(over="ignore"):
            out = values.astype(np.float16)
        inf = np.isinf(out)
    else:  # BF16, as ggml_compute_fp32_to_bf16 (gguf-py's BF16 quantization)
        out = gguf.quants.quantize(values, QT.BF16)
        inf = (out.view(np.uint16) & 0x7FFF) == 0x7F80
    overflow = inf & np.isfinite(values)
    if overflow.any():
        worst = float(np.max(np.abs(values[overflow])))
        raise BadFormat(
            f"tensor {name!r}: {int(overflow.sum()):,} values (up to {worst:.6g}) are beyond "
            f"{target.name}'s range; make an f32 twin"
        )
    return out


def _store_tensor(src: _Source, sink: _Sink, p: _Planned, quantizer) -> ErrorStats:
    """A real file's tensor: its values (read as the twin reads them) stored as p.store by
    ggml's code, rows at a time (CHUNK_BYTES of float32 values); returns what storing did to
    them (the stored bytes read back, as the twin of the file reads them)."""
    from .ggml_types import STORED

    info = p.info
    qt = QT(info.ggml_type)
    ne0 = info.shape[0]
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    in_row = ne0 // block * type_size
    n_rows = info.n_elements // ne0
    per_chunk = max(1, CHUNK_BYTES // (ne0 * 4))
    buf = bytearray(min(per_chunk, n_rows) * in_row)
    errors = []
    for r0 in range(0, n_rows, per_chunk):
        k = min(per_chunk, n_rows - r0)
        view = memoryview(buf)[: k * in_row]
        src.read_into(info.offset + r0 * in_row, view)
        values = gguf.quants.dequantize(np.frombuffer(view, dtype=np.uint8), qt)
        values = np.ascontiguousarray(values, dtype=np.float32).reshape(k, ne0)
        raw = quantizer.quantize(values, p.store, info.name)
        errors.append(error_stats(values, gguf.quants.dequantize(raw, STORED[p.store])))
        sink.write(raw)
    return combine(errors)


def _write_tensor(
    src: _Source, sink: _Sink, p: _Planned, name: str, quantizer=None
) -> ErrorStats | None:
    """Copies, converts (a twin) or stores (a real file) one tensor; a stored one's error."""
    info = p.info
    if p.store is not None:
        return _store_tensor(src, sink, p, quantizer)
    if not p.converted:
        buf = bytearray(min(_COPY_BYTES, max(info.n_bytes, 1)))
        done = 0
        while done < info.n_bytes:
            view = memoryview(buf)[: min(len(buf), info.n_bytes - done)]
            src.read_into(info.offset + done, view)
            sink.write(view)
            done += len(view)
        return None
    qt = QT(info.ggml_type)
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    n_blocks = info.n_elements // block
    per_chunk = max(1, CHUNK_BYTES // (block * 4))  # CHUNK_BYTES of float32 values
    buf = bytearray(min(per_chunk, max(n_blocks, 1)) * type_size)
    for b0 in range(0, n_blocks, per_chunk):
        k = min(per_chunk, n_blocks - b0)
        view = memoryview(buf)[: k * type_size]
        src.read_into(info.offset + b0 * type_size, view)
        values = gguf.quants.dequantize(np.frombuffer(view, dtype=np.uint8), qt)
        values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        out = _convert(values, p.new_type, name)
        if out.nbytes != k * block * _ITEMSIZE[p.new_type]:
            raise BadModel(f"tensor {name!r}: dequantized to {out.nbytes} bytes, unexpected")
        sink.write(np.ascontiguousarray(out))
    return None


def _verify(tmp: Path, index: GGUFIndex, plan: list[_Planned], file_type: int | None) -> None:
    """The written file, indexed again: same tensors in the same order with the planned types
    and offsets, the same metadata but for general.file_type."""
    got = read_index(tmp)
    if got.data_start != index.data_start or len(got.tensors) != len(plan):
        raise OSError(f"{tmp}: the written header does not match the plan")
    for t, p in zip(got.tensors, plan, strict=True):
        if (t.name, t.ggml_type, t.shape, t.offset - got.data_start, t.n_bytes) != (
            p.info.name,
            int(p.new_type),
            p.info.shape,
            p.rel_offset,
            p.n_bytes,
        ):
            raise OSError(f"{tmp}: tensor {p.info.name!r} was not written as planned")
    before = dict(index.metadata)
    after = dict(got.metadata)
    if file_type is not None:
        before.pop("general.file_type")
        if after.pop("general.file_type", None) != file_type:
            raise OSError(f"{tmp}: general.file_type was not written")
    if before != after or dict(index.value_types) != dict(got.value_types):
        raise OSError(f"{tmp}: the metadata differs from the source's")


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@functools.cache
def _gguf_version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # noqa: BLE001 - informational only
        return "(version unknown)"


def check_output(src, dst, *, force: bool = False) -> None:
    """Refuse a twin (or its manifest) that is the source, through links too, or exists."""
    for target in (dst, manifest_path(dst)):
        atomic.check_target(target, force=force, inputs=[src])


def make_twin(
    src, dst, *, dtype: str = "f32", force: bool = False, fsync: bool = True
) -> TwinManifest:
    """Write the float twin of `src` at `dst` and its manifest `dst`.twin.json."""
    _check_dtype(dtype)
    return _rewrite(
        src,
        dst,
        dtype,
        lambda index: _plan(index, dtype),
        file_type=int(_FILE_TYPE[dtype]),
        force=force,
        fsync=fsync,
    )


def make_real(
    src,
    dst,
    store: dict[str, str],
    *,
    lib_dir=None,
    force: bool = False,
    fsync: bool = True,
) -> TwinManifest:
    """Write `src` with the tensors named in `store` stored as those llama.cpp types (their
    values as the twin holds them, quantized by ggml's code of the build in `lib_dir`),
    every other byte kept; its manifest is `dst`.twin.json like a twin's (types before and
    after). The twin of this file is the fake file of the same tensors and type, byte for
    byte: both are gguf-py's dequantization of ggml's bytes."""
    from . import ggml_types

    if not store:
        raise BadInput("no tensor to store as another type")
    formats = sorted(set(store.values()))
    bad = [f for f in formats if f not in ggml_types.STORED]
    if bad:
        raise BadInput(f"not types llama.cpp stores: {', '.join(bad)}")
    quantizer = ggml_types.quantizer(lib_dir)

    def plan(index: GGUFIndex) -> list[_Planned]:
        missing = sorted(set(store) - {t.name for t in index.tensors})
        if missing:
            raise BadInput(f"{index.path.name} has no tensor {missing[0]}")
        return _plan_real(index, store)

    label = formats[0] if len(formats) == 1 else "mixed"
    # general.file_type stays: the file is still mostly what it was
    return _rewrite(src, dst, label, plan, force=force, fsync=fsync, quantizer=quantizer)


def _rewrite(
    src,
    dst,
    label: str,
    plan_of,
    *,
    force: bool,
    fsync: bool,
    file_type: int | None = None,
    quantizer=None,
) -> TwinManifest:
    """The one writer of files whose tensors change type (twins and real files): `plan_of`
    says each tensor's new type, `file_type` the new general.file_type (None: kept); header
    copied and patched, data streamed, published atomically with its manifest."""
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise BadInput(f"model file not found: {src}")
    if not src.is_file():
        raise BadInput(f"model path is not a file: {src}")
    check_output(src, dst, force=force)
    st_before = os.stat(src)
    index = read_index(src)
    plan = plan_of(index)
    file_type_before, fmt = _file_type(index)
    patch = (fmt, file_type) if fmt is not None and file_type is not None else None
    file_type_after = file_type if patch is not None else file_type_before
    mpath = manifest_path(dst)
    source = _Source(src)
    try:
        with atomic.temporary_for(dst, force=force, inputs=[src], fsync=fsync) as tmp:
            with open(tmp, "wb") as f:
                sink = _Sink(f)
                raw = bytearray(index.data_start)
                source.read_into(0, memoryview(raw))
                sink.write(_header(index, raw, plan, patch))
                del raw
                errors = {}
                for p in plan:
                    if sink.pos != index.data_start + p.rel_offset:
                        raise OSError(f"{tmp}: tensor {p.info.name!r} lands at the wrong offset")
                    errors[p.info.name] = _write_tensor(source, sink, p, p.info.name, quantizer)
                    sink.pad_to(index.alignment)
                f.flush()
                if fsync:  # here, so that `seconds` counts it (publishing re-syncs: a no-op)
                    os.fsync(f.fileno())
            in_sha, in_size = source.finish()
            if _identity(os.stat(src)) != _identity(st_before) or in_size != st_before.st_size:
                raise BadInput(f"input {src} changed while its twin was being written")
            size = os.path.getsize(tmp)
            if size != sink.pos:
                raise OSError(f"{tmp}: {size} bytes on disk, {sink.pos} written")
            _verify(tmp, index, plan, file_type_after if patch is not None else None)
            os.chmod(tmp, _umask_mode())
            manifest = TwinManifest(
                tool_version=__version__,
                created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
                source=FileRecord(str(src.resolve()), in_sha, in_size),
                output=FileRecord(str(dst.resolve()), sink.digest.hexdigest(), size),
                dtype=label,
                file_type_before=file_type_before,
                file_type_after=file_type_after,
                alignment=index.alignment,
                tensors=tuple(
                    TwinTensor(
                        i.name,
                        i.type_name,
                        p.new_type.name,
                        i.n_elements,
                        tuple(i.shape),
                        errors[i.name],
                    )
                    for p in plan
                    for i in (p.info,)
                ),
                seconds=time.perf_counter() - started,
                gguf_py_version=_gguf_version(),
                path=str(mpath),
            )
            manifest_bytes = (json.dumps(manifest.to_json(), indent=1) + "\n").encode()
            atomic.check_target(mpath, force=force, inputs=[src])  # refused before publishing
        atomic.write_bytes(mpath, manifest_bytes, force=force, inputs=[src], fsync=fsync)
    except BaseException:
        # a file of ours without its manifest goes; once the manifest is published both stand
        if atomic.published(dst) and not atomic.published(mpath):
            dst.unlink(missing_ok=True)
        raise
    finally:
        source.close()
    with contextlib.suppress(OSError):
        hashing.remember_sha256(src, in_sha, key=hashing.stat_key(src, st_before), from_bytes=True)
        hashing.remember_sha256(dst, manifest.output.sha256)
    log.info("%s: %s", dst, manifest.summary())
    return manifest


# --- the cached twin of a model ---------------------------------------------------------


@dataclass(frozen=True)
class TwinRef(ModelRef):
    """A ModelRef of a float twin: `spec` is None (no registry pin is its hash), but the
    chat template of the model it was made from carries over, as do `source` and `dtype`."""

    source: ModelRef | None = None
    dtype: str = "f32"
    manifest: TwinManifest | None = field(default=None, compare=False, repr=False)
    made: bool = field(default=False, compare=False)  # made by this call (not reused)

    @property
    def chat_template(self) -> str | None:
        return self.source.chat_template if self.source is not None else None


def twin_path(model: ModelRef, dtype: str = "f32") -> Path:
    """Where the cached twin of `model` lives (it may not exist yet)."""
    from ..platform.paths import cache_dir

    _check_dtype(dtype)
    folder = cache_dir() / "twins" / f"{model.sha256[:16]}-{dtype}"
    # one twin per content: a copy of the model under another name finds the one made first
    made = sorted(folder.glob(f"*.{dtype}.gguf")) if folder.is_dir() else []
    return made[0] if made else folder / f"{model.path.stem}.{dtype}.gguf"


def _cached(path: Path, model: ModelRef, dtype: str) -> TwinManifest | None:
    """The manifest of a usable cached twin at `path` made from `model`, else None."""
    if not path.is_file() or not manifest_path(path).is_file():
        return None
    try:
        manifest = read_manifest(path)
    except BadInput as exc:
        log.warning("cached twin: %s; making it again", exc)
        return None
    if manifest.source.sha256 != model.sha256 or manifest.dtype != dtype:
        log.warning("cached twin %s was made from another source; making it again", path)
        return None
    if path.stat().st_size != manifest.output.size:
        log.warning("cached twin %s has the wrong size; making it again", path)
        return None
    if hashing.sha256_file(path) != manifest.output.sha256:
        log.warning("cached twin %s fails its SHA-256 check; making it again", path)
        return None
    return manifest


def is_own_twin(path, dtype: str = "f32") -> bool:
    """True when no tensor of the GGUF at `path` would change in its `dtype` twin: the twin
    of a float model is the model itself, never a byte-for-byte copy in the cache."""
    _check_dtype(dtype)
    return not any(p.converted for p in _plan(read_index(path), dtype))


def twin_for(model: ModelRef, dtype: str = "f32", *, rebuild: bool = False) -> TwinRef:
    """The cached float twin of `model` (made once, under a file lock, then reused); the
    model itself (`manifest` None) when it has nothing to dequantize."""
    from filelock import FileLock

    if is_own_twin(model.path, dtype):
        return TwinRef(
            name=f"{model.name}-twin",
            path=model.path,
            sha256=model.sha256,
            spec=None,
            source=model,
            dtype=dtype,
        )
    path = twin_path(model, dtype)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputRefused(f"cannot create the twin cache {path.parent}: {exc.strerror}") from None
    with FileLock(str(path.parent) + ".lock"):
        manifest = None if rebuild else _cached(path, model, dtype)
        if manifest is None:
            log.info("making the %s twin of %s at %s", dtype, model.name, path)
            manifest = make_twin(model.path, path, dtype=dtype, force=True)
            if manifest.source.sha256 != model.sha256:
                with contextlib.suppress(OSError):
                    path.unlink()
                    manifest_path(path).unlink()
                raise BadModel(
                    f"{model.path}: its SHA-256 is {manifest.source.sha256[:12]}…, expected "
                    f"{model.sha256[:12]}… (it changed since it was resolved)"
                )
            made = True
        else:
            made = False
    return TwinRef(
        name=f"{model.name}-twin",
        path=path,
        sha256=manifest.output.sha256,
        spec=None,
        source=model,
        dtype=dtype,
        manifest=manifest,
        made=made,
    )


__all__ = [
    "DTYPES",
    "TwinManifest",
    "TwinRef",
    "TwinTensor",
    "can_dequantize",
    "is_own_twin",
    "make_real",
    "make_twin",
    "manifest_path",
    "read_manifest",
    "target_type",
    "twin_for",
    "twin_path",
]
