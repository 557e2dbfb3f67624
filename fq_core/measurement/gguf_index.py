"""A lean, strict index of a GGUF file: metadata scalars, array lengths, tensor infos.

Why not `gguf.GGUFReader`: it materialises every element of every metadata array (about
10 s for Gemma3's 262k-token vocabulary) and is no validator (it accepts 5-D tensors,
unaligned or overlapping offsets, and raises bare IndexError on broken files). This module
walks the header once, skipping array contents by their lengths, and refuses every file
llama.cpp's `gguf_init_from_file_impl` (ggml/src/gguf.cpp) would refuse, plus tensor data
past the end of the file (llama_model_loader's "not within the file bounds"), each with a
one-line `BadModel` naming the file and the fault.

A tensor type id gguf-py does not know is refused, naming the tensor and the id, as
llama.cpp's reader refuses a type it does not know: ids in the gaps of the table (removed
types such as Q4_2, Q4_0_4_4: block size 0), ids above its largest, negative ones. Without
the type's block size the tensor's size, the next tensor's expected offset and the bytes to
copy are unknown, and a copy would only be refused later by the llama.cpp that loads it.

Deliberate differences from llama.cpp:
- counts too large for the bytes left in the file are refused up front (llama.cpp refuses
  them later, when the reads run out), so a corrupt count never starts a huge loop.
- strings are decoded as UTF-8 with replacement characters (llama.cpp keeps raw bytes);
  duplicate keys and tensor names are detected on the raw bytes.
"""

from __future__ import annotations

import difflib
import logging
import mmap
import os
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import MappingProxyType

import gguf
import numpy as np

from fq_core.errors import BadModel, BadSelection

log = logging.getLogger(__name__)

VT = gguf.GGUFValueType
QT = gguf.GGMLQuantizationType

GGUF_MAGIC_BYTES = struct.pack("<I", gguf.GGUF_MAGIC)  # b"GGUF"
# Limits from llama.cpp (ggml/src/gguf.cpp, ggml/include/ggml.h).
GGUF_MAX_STRING_LENGTH = 1024 * 1024 * 1024
GGUF_MAX_ARRAY_ELEMENTS = 1024 * 1024 * 1024
GGML_MAX_NAME = 64
GGML_MAX_DIMS = 4
INT64_MAX = 2**63 - 1
SIZE_MAX = 2**64 - 1
_MAX_KNOWN_TYPE = max(int(t) for t in gguf.GGML_QUANT_SIZES)

# Smallest possible encodings, to refuse counts the file cannot possibly hold.
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, 1-byte key, type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset

_SCALAR_FORMATS: dict[int, tuple[str, int]] = {
    VT.UINT8: ("<B", 1),
    VT.INT8: ("<b", 1),
    VT.UINT16: ("<H", 2),
    VT.INT16: ("<h", 2),
    VT.UINT32: ("<I", 4),
    VT.INT32: ("<i", 4),
    VT.FLOAT32: ("<f", 4),
    VT.BOOL: ("<b", 1),
    VT.UINT64: ("<Q", 8),
    VT.INT64: ("<q", 8),
    VT.FLOAT64: ("<d", 8),
}
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor info record; `offset` is absolute in the file."""

    name: str
    ggml_type: int
    type_name: str  # gguf.GGMLQuantizationType name
    shape: tuple[int, ...]  # GGUF order, ne[0] first
    n_elements: int
    offset: int
    n_bytes: int


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array, described but not materialised."""

    item_type: int
    length: int


@dataclass(frozen=True)
class GGUFIndex:
    path: Path
    version: int
    alignment: int
    data_start: int
    file_size: int
    metadata: Mapping[str, int | float | bool | str | ArrayInfo]
    tensors: tuple[TensorInfo, ...]
    value_types: Mapping[str, int] = field(default_factory=dict)  # key -> GGUFValueType
    # Byte ranges of the header, for writers that copy it (fq_core/measurement/twin.py): the
    # key-value section is [kv_start, infos_start), the tensor infos [infos_start, infos_end) (the
    # data section starts at data_start, after padding); value_offsets maps each key to the
    # absolute offset of its value (for an array: of its item type).
    kv_start: int = 0
    infos_start: int = 0
    infos_end: int = 0
    value_offsets: Mapping[str, int] = field(default_factory=dict)

    @cached_property
    def _by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    def tensor(self, name: str) -> TensorInfo:
        """The tensor called `name`; BadSelection (with close matches) if there is none."""
        info = self._by_name.get(name)
        if info is None:
            close = difflib.get_close_matches(name, list(self._by_name), n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise BadSelection(
                f"{self.path.name}: no tensor named {name!r} ({len(self.tensors)} tensors){hint}"
            )
        return info

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    @property
    def block_count(self) -> int | None:
        arch = self.architecture
        if arch is None:
            return None
        value = self.metadata.get(f"{arch}.block_count")
        return value if isinstance(value, int) and not isinstance(value, bool) else None


def _pad(x: int, n: int) -> int:
    return (x + n - 1) // n * n


def _type_label(type_id: int) -> str:
    try:
        return VT(type_id).name
    except ValueError:
        return str(type_id)


class _Walker:
    """One pass over the header of a memory-mapped GGUF; raises BadModel on any fault."""

    def __init__(self, path: Path, buf: mmap.mmap, size: int) -> None:
        self.path = path
        self.name = path.name
        self.buf = buf
        self.size = size
        self.pos = 0

    def fail(self, message: str) -> BadModel:
        return BadModel(f"{self.name}: {message}")

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise self.fail(
                f"truncated: the file ends at byte {self.size} inside {what} "
                f"(needs {self.pos + n - self.size} more bytes)"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def i32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _I32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def i64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _I64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def raw_string(self, what: str) -> bytes:
        n = self.u64(f"the length of {what}")
        if n > GGUF_MAX_STRING_LENGTH:
            raise self.fail(f"{what} has length {n}, above llama.cpp's limit of 1 GiB")
        self.need(n, what)
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return data

    # ---- sections ----

    def header(self) -> tuple[int, int, int]:
        if self.size < 4 or self.buf[:4] != GGUF_MAGIC_BYTES:
            start = bytes(self.buf[: min(4, self.size)])
            raise self.fail(f"not a GGUF file (starts with {start!r}, expected b'GGUF')")
        self.pos = 4
        version = self.u32("the header (version)")
        if version == 0:
            raise self.fail("bad GGUF version 0")
        if version & 0xFFFF == 0:
            raise self.fail(
                f"GGUF version {version} is absurd: a big-endian file or a corrupt header"
            )
        if version == 1:
            raise self.fail("GGUF version 1 is no longer supported by llama.cpp")
        if version > gguf.GGUF_VERSION:
            raise self.fail(
                f"unsupported GGUF version {version} (llama.cpp and gguf-py read up to "
                f"{gguf.GGUF_VERSION})"
            )
        n_tensors = self.i64("the header (tensor count)")
        n_kv = self.i64("the header (key-value count)")
        left = self.size - self.pos
        if n_tensors < 0 or n_tensors * _MIN_TENSOR_INFO_BYTES > left:
            raise self.fail(
                f"absurd tensor count {n_tensors}: the {self.size}-byte file cannot hold that many "
                "(truncated or corrupt)"
            )
        if n_kv < 0 or n_kv * _MIN_KV_BYTES > left:
            raise self.fail(
                f"absurd key-value count {n_kv}: the {self.size}-byte file cannot hold that many "
                "(truncated or corrupt)"
            )
        return version, n_tensors, n_kv

    def key_values(self, n_kv: int) -> tuple[dict, dict]:
        metadata: dict[str, int | float | bool | str | ArrayInfo] = {}
        types: dict[str, int] = {}
        self.value_offsets: dict[str, int] = {}
        seen: set[bytes] = set()
        for i in range(n_kv):
            raw_key = self.raw_string(f"key {i}")
            if not raw_key:
                raise self.fail(f"key {i} is empty")
            if raw_key in seen:
                raise self.fail(f"duplicate key {raw_key.decode('utf-8', 'replace')!r}")
            seen.add(raw_key)
            key = raw_key.decode("utf-8", "replace")
            what = f"the value of key {key!r}"
            vtype = self.i32(f"the type of key {key!r}")
            self.value_offsets[key] = self.pos
            if vtype == VT.ARRAY:
                item_type = self.i32(f"the item type of key {key!r}")
                length = self.u64(f"the length of key {key!r}")
                if item_type == VT.ARRAY:
                    raise self.fail(f"key {key!r} is a nested array, which GGUF does not allow")
                if item_type not in _SCALAR_FORMATS and item_type != VT.STRING:
                    raise self.fail(f"key {key!r} has invalid array item type {item_type}")
                if length > GGUF_MAX_ARRAY_ELEMENTS:
                    raise self.fail(
                        f"key {key!r} has {length} array elements, above llama.cpp's limit of 2^30"
                    )
                self.skip_array(item_type, length, what)
                metadata[key] = ArrayInfo(item_type, length)
            elif vtype == VT.STRING:
                metadata[key] = self.raw_string(what).decode("utf-8", "replace")
            elif vtype in _SCALAR_FORMATS:
                fmt, width = _SCALAR_FORMATS[vtype]
                self.need(width, what)
                (value,) = struct.unpack_from(fmt, self.buf, self.pos)
                self.pos += width
                metadata[key] = value != 0 if vtype == VT.BOOL else value
            else:
                raise self.fail(f"key {key!r} has invalid value type {vtype}")
            types[key] = vtype
        return metadata, types

    def skip_array(self, item_type: int, length: int, what: str) -> None:
        if item_type != VT.STRING:
            self.need(length * _SCALAR_FORMATS[item_type][1], what)
            self.pos += length * _SCALAR_FORMATS[item_type][1]
            return
        self.need(length * 8, what)  # every string has at least its length
        start = pos = self.pos
        unpack, buf = _U64.unpack_from, self.buf
        try:
            for _ in range(length):
                pos += 8 + unpack(buf, pos)[0]
        except struct.error:
            pos = self.size + 1
        if pos > self.size:
            raise self.fail(f"truncated: the file ends at byte {self.size} inside {what}")
        if pos - start > GGUF_MAX_STRING_LENGTH:  # only then can one string be too long
            pos = start
            for j in range(length):
                n = unpack(buf, pos)[0]
                if n > GGUF_MAX_STRING_LENGTH:
                    raise self.fail(f"string {j} of {what} is longer than llama.cpp's 1 GiB")
                pos += 8 + n
        self.pos = pos

    def tensor_infos(self, n_tensors: int) -> list[tuple]:
        infos = []
        seen: set[bytes] = set()
        for i in range(n_tensors):
            raw = self.raw_string(f"the name of tensor {i}")
            name = raw.decode("utf-8", "replace")
            if len(raw) >= GGML_MAX_NAME:
                raise self.fail(
                    f"tensor {i} name {name[:40]!r}... is {len(raw)} bytes, "
                    f"llama.cpp allows at most {GGML_MAX_NAME - 1}"
                )
            if raw in seen:
                raise self.fail(f"duplicate tensor name {name!r}")
            seen.add(raw)
            what = f"the info of tensor {name!r}"
            n_dims = self.u32(what)
            if n_dims > GGML_MAX_DIMS:
                raise self.fail(
                    f"tensor {name!r} has {n_dims} dimensions, llama.cpp allows at most "
                    f"{GGML_MAX_DIMS}"
                )
            shape = tuple(self.i64(what) for _ in range(n_dims))
            if any(d < 0 for d in shape):
                raise self.fail(f"tensor {name!r} has a negative dimension: {shape}")
            n_elements = 1
            for d in shape:
                n_elements *= d
            if n_elements > INT64_MAX:
                raise self.fail(f"tensor {name!r} shape {shape} overflows the element count")
            ggml_type = self.i32(what)
            type_name, block, type_size = self.tensor_type(name, ggml_type, shape)
            n_bytes = n_elements // block * type_size
            offset = self.u64(what)
            infos.append((name, shape, n_elements, ggml_type, type_name, n_bytes, offset))
        return infos

    def tensor_type(self, name: str, ggml_type: int, shape: tuple[int, ...]) -> tuple:
        """(type_name, block_size, type_size); BadModel for a type gguf-py does not know."""
        sizes = gguf.GGML_QUANT_SIZES.get(ggml_type) if ggml_type >= 0 else None
        if sizes is None:
            if ggml_type < 0 or ggml_type <= _MAX_KNOWN_TYPE:
                raise self.fail(f"tensor {name!r} has invalid or removed ggml type {ggml_type}")
            raise self.fail(
                f"tensor {name!r} has invalid ggml type {ggml_type}, unknown to gguf-py "
                f"{_gguf_py_version()} (its newest is {_MAX_KNOWN_TYPE}); llama.cpp refuses "
                "such a file"
            )
        block, type_size = sizes
        ne0 = shape[0] if shape else 1
        type_name = QT(ggml_type).name
        if ne0 % block:
            raise self.fail(
                f"tensor {name!r} of type {type_name} has {ne0} elements per row, "
                f"not a multiple of the block size {block}"
            )
        return type_name, block, type_size


def _gguf_py_version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # noqa: BLE001 - informational only
        return "(version unknown)"


def read_index(path: str | os.PathLike[str]) -> GGUFIndex:
    """Index a GGUF file without reading tensor data or metadata arrays; BadModel on faults."""
    path = Path(path)
    started = time.perf_counter()
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise BadModel(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BadModel(f"{path}: is a directory, not a GGUF file") from None
    except OSError as e:
        raise BadModel(f"{path}: cannot open: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise BadModel(f"{path.name}: not a GGUF file (it is empty)")
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise BadModel(f"{path}: cannot map the file: {e}") from None
        try:
            index = _walk(path, buf, size)
        except (struct.error, IndexError, ValueError, OverflowError) as e:  # safety net
            raise BadModel(f"{path.name}: malformed GGUF ({e})") from None
        finally:
            buf.close()
    log.debug("indexed %s in %.4f s", path, time.perf_counter() - started)
    return index


def _walk(path: Path, buf: mmap.mmap, size: int) -> GGUFIndex:
    w = _Walker(path, buf, size)
    version, n_tensors, n_kv = w.header()
    kv_start = w.pos
    metadata, types = w.key_values(n_kv)
    infos_start = w.pos

    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        if types["general.alignment"] != VT.UINT32:
            raise w.fail(
                "general.alignment must be of type UINT32 but is "
                f"{_type_label(types['general.alignment'])}"
            )
        alignment = metadata["general.alignment"]
        if alignment == 0 or alignment & (alignment - 1):
            raise w.fail(f"general.alignment {alignment} is not a power of 2")

    raw_infos = w.tensor_infos(n_tensors)
    infos_end = w.pos
    data_start = _pad(w.pos, alignment) if n_tensors else w.pos
    if data_start > size:
        raise w.fail(
            f"truncated: the data section starts at byte {data_start} but the file has {size} bytes"
        )

    tensors: list[TensorInfo] = []
    expected = 0  # the offset llama.cpp requires next
    previous = None
    for name, shape, n_elements, ggml_type, type_name, n_bytes, rel in raw_infos:
        if n_bytes > SIZE_MAX - (alignment - 1):
            raise w.fail(f"tensor {name!r} size {n_bytes} overflows")
        if rel % alignment:
            raise w.fail(
                f"tensor {name!r} offset {rel} is not a multiple of the alignment {alignment}"
            )
        if rel != expected:
            if rel < expected:
                raise w.fail(
                    f"tensor {name!r} at data offset {rel} overlaps tensor {previous!r} "
                    f"(which ends at {expected})"
                )
            raise w.fail(
                f"tensor {name!r} has offset {rel}, expected {expected} "
                f"(a gap after tensor {previous!r})"
            )
        start = data_start + rel
        end = start + n_bytes
        if end > size:
            raise w.fail(
                f"truncated: tensor {name!r} data ends at byte {end} but the file has {size} bytes"
            )
        expected += _pad(n_bytes, alignment)
        if expected > SIZE_MAX:
            raise w.fail(f"tensor {name!r}: the data section size overflows")
        previous = name
        tensors.append(
            TensorInfo(
                name=name,
                ggml_type=ggml_type,
                type_name=type_name,
                shape=shape,
                n_elements=n_elements,
                offset=start,
                n_bytes=n_bytes,
            )
        )
    return GGUFIndex(
        path=path,
        version=version,
        alignment=alignment,
        data_start=data_start,
        file_size=size,
        metadata=MappingProxyType(metadata),
        tensors=tuple(tensors),
        value_types=MappingProxyType(types),
        kv_start=kv_start,
        infos_start=infos_start,
        infos_end=infos_end,
        value_offsets=MappingProxyType(w.value_offsets),
    )


def read_tensor(index: GGUFIndex, info: TensorInfo) -> np.ndarray:
    """The F32 tensor's data as a new float32 array in numpy order (reversed GGUF shape)."""
    if info.ggml_type != QT.F32:
        raise BadSelection(
            f"{index.path.name}: tensor {info.name!r} is {info.type_name}, not F32; "
            "only F32 tensors can be read and fake-quantized"
        )
    try:
        size = index.path.stat().st_size
    except OSError as e:
        raise BadModel(f"{index.path}: cannot read: {e.strerror}") from None
    if size != index.file_size:
        raise BadModel(
            f"{index.path.name}: the file changed since it was indexed "
            f"({index.file_size} -> {size} bytes)"
        )
    data = np.fromfile(index.path, dtype="<f4", count=info.n_elements, offset=info.offset)
    if data.size != info.n_elements:
        raise BadModel(f"{index.path.name}: tensor {info.name!r} data is truncated")
    return data.astype(np.float32, copy=False).reshape(tuple(reversed(info.shape)) or (1,))
