"""Builders of small, real GGUF files for tests, and byte surgery to break them.

Files are written with gguf-py's own `GGUFWriter` (so they are what llama.cpp's converters
produce), and byte positions for surgery come from `GGUFReader`'s field offsets, so the
malformed variants never depend on the code under test.

Plain functions, not fixtures: call them with `tmp_path` (or `tmp_path_factory.mktemp(...)`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

ARCH = "llama"
# Values that BF16 truncation changes (and that nearest rounding changes differently).
NON_BF16_EXACT = np.array(
    [1.0 + 2**-8, 1.0 + 2**-9 + 2**-12, -3.14159265, 0.1, 1e-3, 65504.0 + 0.125, 1.0 / 3.0],
    dtype=np.float32,
)


@dataclass(frozen=True)
class FactoryModel:
    """A GGUF built by `build_gguf` and everything needed to check what is in it."""

    path: Path
    n_layers: int
    alignment: int
    f32: dict[str, np.ndarray]  # every F32 tensor, exactly as written
    quantized: dict[str, tuple[gguf.GGMLQuantizationType, np.ndarray]]  # raw bytes as written
    vocab: tuple[str, ...]
    metadata: dict[str, object] = field(default_factory=dict)  # scalars added on purpose

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(self.f32) + tuple(self.quantized)


def norm_values(n: int, rng: np.random.Generator) -> np.ndarray:
    """Norm-like weights around 1.0; the first elements are not BF16-exact on purpose."""
    values = (1.0 + 0.25 * rng.standard_normal(n)).astype(np.float32)
    k = min(n, len(NON_BF16_EXACT))
    values[:k] = NON_BF16_EXACT[:k]
    return values


def build_gguf(
    directory: Path | str,
    name: str = "model.gguf",
    *,
    n_layers: int = 3,
    n_embd: int = 64,
    n_ff: int = 96,
    n_vocab: int = 40,
    alignment: int | None = None,
    matrix_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.Q8_0,
    seed: int = 0,
    extra_tensors: dict[str, np.ndarray] | None = None,
    chat_template: str | None = None,
) -> FactoryModel:
    """Write a llama-shaped GGUF with `n_layers` blocks into `directory` and describe it.

    Per layer: `blk.N.attn_norm.weight`, `blk.N.ffn_norm.weight` (F32) and
    `blk.N.ffn_up.weight` (`matrix_type`, Q8_0 or F16); plus `token_embd.weight` (F16),
    `output_norm.weight` (F32), a vocabulary string array, token scores/types arrays and
    scalars of several value types. `alignment` sets `general.alignment` (None = default 32).
    `extra_tensors` are appended as given (e.g. a 5-D array for invalid-shape tests);
    `chat_template` is written as `tokenizer.chat_template`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    rng = np.random.default_rng(seed)
    qt = gguf.GGMLQuantizationType

    writer = gguf.GGUFWriter(path, ARCH)
    metadata: dict[str, object] = {
        "general.name": "fq-suite factory model",
        f"{ARCH}.block_count": n_layers,
        f"{ARCH}.context_length": 128,
        f"{ARCH}.embedding_length": n_embd,
        f"{ARCH}.feed_forward_length": n_ff,
        f"{ARCH}.attention.layer_norm_rms_epsilon": np.float32(1e-5).item(),
        "test.key_a": 7,
        "test.key_b": 8,
        "test.flag": True,
        "test.neg64": -(2**40),
        "test.f64": 0.1,
    }
    writer.add_name(metadata["general.name"])
    writer.add_block_count(n_layers)
    writer.add_context_length(128)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_uint32("test.key_a", 7)
    writer.add_uint32("test.key_b", 8)
    writer.add_bool("test.flag", True)
    writer.add_int64("test.neg64", -(2**40))
    writer.add_float64("test.f64", 0.1)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
        metadata["general.alignment"] = alignment
    vocab = tuple(
        ["<unk>", "<s>", "</s>", "héllo", "世界", ""] + [f"tok{i}" for i in range(n_vocab)]
    )
    writer.add_tokenizer_model("llama")
    writer.add_token_list(list(vocab))
    writer.add_token_scores([float(-i) for i in range(len(vocab))])
    writer.add_token_types([1] * len(vocab))
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    f32: dict[str, np.ndarray] = {}
    quantized: dict[str, tuple[gguf.GGMLQuantizationType, np.ndarray]] = {}

    embd = rng.standard_normal((len(vocab), n_embd)).astype(np.float32)
    quantized["token_embd.weight"] = (qt.F16, embd.astype(np.float16).view(np.uint8))
    writer.add_tensor("token_embd.weight", embd.astype(np.float16))
    for layer in range(n_layers):
        for kind in ("attn_norm", "ffn_norm"):
            tname = f"blk.{layer}.{kind}.weight"
            f32[tname] = norm_values(n_embd, rng)
            writer.add_tensor(tname, f32[tname])
        up = rng.standard_normal((n_ff, n_embd)).astype(np.float32)
        tname = f"blk.{layer}.ffn_up.weight"
        if matrix_type == qt.F16:
            raw = up.astype(np.float16)
            writer.add_tensor(tname, raw)
            quantized[tname] = (qt.F16, raw.view(np.uint8))
        else:
            raw = gguf.quants.quantize(up, matrix_type)
            writer.add_tensor(tname, raw, raw_dtype=matrix_type)
            quantized[tname] = (matrix_type, raw)
    f32["output_norm.weight"] = norm_values(n_embd, rng)
    writer.add_tensor("output_norm.weight", f32["output_norm.weight"])
    for tname, array in (extra_tensors or {}).items():
        writer.add_tensor(tname, array)
        f32[tname] = array

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return FactoryModel(
        path=path,
        n_layers=n_layers,
        alignment=alignment or gguf.GGUF_DEFAULT_ALIGNMENT,
        f32=f32,
        quantized=quantized,
        vocab=vocab,
        metadata=metadata,
    )


# ---- locating bytes (through gguf-py's reader, independent of fq_core) ----


def _part_offsets(reader: gguf.GGUFReader, fld) -> list[int]:
    base = reader.data.ctypes.data
    return [int(part.ctypes.data - base) for part in fld.parts]


def key_offsets(path: Path | str, key: str) -> dict[str, int]:
    """Absolute offsets of a key-value pair's parts.

    Keys: key_len, key, type, (item_type, length for arrays), value (the first value byte).
    """
    reader = gguf.GGUFReader(path)
    fld = reader.fields[key]
    offs = _part_offsets(reader, fld)
    names = ["key_len", "key", "type"]
    if fld.types and fld.types[0] == gguf.GGUFValueType.ARRAY:
        names += ["item_type", "length"]
    out = dict(zip(names, offs[: len(names)], strict=True))
    out["value"] = offs[len(names)] if len(offs) > len(names) else offs[-1]
    return out


def tensor_info_offsets(path: Path | str, name: str) -> dict[str, int]:
    """Absolute offsets of a tensor info's parts: name_len, name, n_dims, dims, type, offset."""
    reader = gguf.GGUFReader(path)
    for tensor in reader.tensors:
        if tensor.name == name:
            offs = _part_offsets(reader, tensor.field)
            parts = ["name_len", "name", "n_dims", "dims", "type", "offset"]
            return dict(zip(parts, offs, strict=True))
    raise KeyError(name)


def header_end(path: Path | str) -> int:
    """First byte after the last tensor info (before the padding to the data section)."""
    reader = gguf.GGUFReader(path)
    last = reader.tensors[-1].field
    return int(last.parts[-1].ctypes.data - reader.data.ctypes.data) + 8


def data_end(path: Path | str) -> int:
    """End of the last tensor's data (the file may hold padding beyond it)."""
    reader = gguf.GGUFReader(path)
    return max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)


# ---- byte surgery: each returns a new file beside the original ----


def _variant(path: Path, suffix: str) -> Path:
    return path.with_name(f"{path.stem}.{suffix}{path.suffix}")


def truncated(path: Path | str, size: int, dst: Path | str | None = None) -> Path:
    """A copy of `path` cut to its first `size` bytes."""
    path = Path(path)
    dst = Path(dst) if dst else _variant(path, f"trunc{size}")
    with open(path, "rb") as src, open(dst, "wb") as out:
        out.write(src.read(size))
    return dst


def patched(
    path: Path | str, offset: int, data: bytes, dst: Path | str | None = None, *, tag: str = "patch"
) -> Path:
    """A copy of `path` with `data` written over the bytes at `offset`."""
    path = Path(path)
    dst = Path(dst) if dst else _variant(path, f"{tag}{offset}")
    shutil.copyfile(path, dst)
    with open(dst, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return dst


def patched_int(
    path: Path | str, offset: int, value: int, fmt_bytes: int = 8, *, signed: bool = False
) -> Path:
    """A copy with the little-endian integer at `offset` replaced by `value`."""
    data = value.to_bytes(fmt_bytes, "little", signed=signed)
    return patched(path, offset, data, tag=f"int{value & 0xFFFFFFFF}_")


def inserted(path: Path | str, offset: int, data: bytes, dst: Path | str | None = None) -> Path:
    """A copy of `path` with `data` inserted at `offset` (everything after it shifts)."""
    path = Path(path)
    dst = Path(dst) if dst else _variant(path, f"ins{offset}")
    raw = path.read_bytes()
    Path(dst).write_bytes(raw[:offset] + data + raw[offset:])
    return Path(dst)
