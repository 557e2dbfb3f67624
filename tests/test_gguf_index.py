"""The lean GGUF index equals gguf-py's GGUFReader, and refuses what llama.cpp refuses."""

from __future__ import annotations

import functools
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf_factory import (
    build_gguf,
    data_end,
    header_end,
    key_offsets,
    patched,
    patched_int,
    tensor_info_offsets,
    truncated,
)

from fq_core.errors import BadModel, BadSelection
from fq_core.measurement.gguf_index import ArrayInfo, read_index, read_tensor

QT = gguf.GGMLQuantizationType
VT = gguf.GGUFValueType


@functools.cache
def _reader(path: str) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return build_gguf(tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def aligned64(tmp_path_factory):
    return build_gguf(
        tmp_path_factory.mktemp("a64"), alignment=64, matrix_type=QT.F16, n_layers=4, seed=1
    )


def assert_index_equals_reader(path: Path) -> None:
    reader = _reader(str(path))
    index = read_index(path)
    assert index.alignment == reader.alignment
    assert index.data_start == reader.data_offset
    assert index.file_size == path.stat().st_size
    assert index.version == int(reader.fields["GGUF.version"].parts[-1][0])

    assert [t.name for t in index.tensors] == [t.name for t in reader.tensors]
    for mine, ref in zip(index.tensors, reader.tensors, strict=True):
        assert mine.ggml_type == int(ref.tensor_type), mine.name
        assert mine.type_name == ref.tensor_type.name
        assert mine.shape == tuple(int(d) for d in ref.shape), mine.name
        assert mine.n_elements == int(ref.n_elements)
        assert mine.offset == int(ref.data_offset), mine.name
        assert mine.n_bytes == int(ref.n_bytes), mine.name
        if mine.ggml_type == QT.F32:
            data = read_tensor(index, mine)
            assert data.dtype == np.float32 and data.shape == ref.data.shape
            assert np.array_equal(data.view(np.uint32), np.asarray(ref.data).view(np.uint32))

    ref_keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert list(index.metadata) == ref_keys
    for key in ref_keys:
        field = reader.fields[key]
        assert index.value_types[key] == field.types[0], key
        value = index.metadata[key]
        if field.types[0] == VT.ARRAY:
            assert value == ArrayInfo(int(field.types[-1]), len(field.data)), key
        else:
            expected = field.contents()
            assert type(value) is type(expected.item() if hasattr(expected, "item") else expected)
            assert value == expected, key


# ---- equality with GGUFReader ----


def test_factory_default_alignment_equals_reader(small):
    assert_index_equals_reader(small.path)


def test_factory_alignment_64_equals_reader(aligned64):
    index = read_index(aligned64.path)
    assert index.alignment == 64 and index.data_start % 64 == 0
    assert all((t.offset - index.data_start) % 64 == 0 for t in index.tensors)
    assert_index_equals_reader(aligned64.path)


def test_real_model_equals_reader(real_gguf):
    assert_index_equals_reader(real_gguf)


def test_read_tensor_returns_the_written_values(small, aligned64):
    for model in (small, aligned64):
        index = read_index(model.path)
        for name, written in model.f32.items():
            data = read_tensor(index, index.tensor(name))
            assert np.array_equal(data.view(np.uint32), written.view(np.uint32)), name
        # the factory's norms hold values BF16 cannot represent exactly
        norms = read_tensor(index, index.tensor("blk.0.ffn_norm.weight"))
        assert np.any(norms.view(np.uint32) & 0xFFFF)


def test_read_tensor_is_a_copy(small):
    index = read_index(small.path)
    data = read_tensor(index, index.tensor("output_norm.weight"))
    data[:] = 0
    again = read_tensor(index, index.tensor("output_norm.weight"))
    assert np.array_equal(again, small.f32["output_norm.weight"])


def test_properties(small, aligned64):
    index = read_index(small.path)
    assert index.architecture == "llama"
    assert index.block_count == small.n_layers == 3
    assert read_index(aligned64.path).block_count == 4
    assert index.metadata["tokenizer.ggml.tokens"] == ArrayInfo(VT.STRING, len(small.vocab))
    assert index.metadata["test.neg64"] == -(2**40)
    assert index.metadata["test.flag"] is True


def test_unknown_tensor_name_is_bad_selection(small):
    index = read_index(small.path)
    with pytest.raises(BadSelection, match=r"no tensor named 'blk\.0\.ffn_nrom\.weight'.*mean"):
        index.tensor("blk.0.ffn_nrom.weight")


def test_read_tensor_refuses_non_f32(small):
    index = read_index(small.path)
    with pytest.raises(BadSelection, match=r"'blk\.0\.ffn_up\.weight' is Q8_0, not F32"):
        read_tensor(index, index.tensor("blk.0.ffn_up.weight"))


def test_read_tensor_notices_a_changed_file(tmp_path):
    model = build_gguf(tmp_path)
    index = read_index(model.path)
    with open(model.path, "ab") as f:
        f.write(b"\0" * 32)
    with pytest.raises(BadModel, match="changed since it was indexed"):
        read_tensor(index, index.tensor("output_norm.weight"))


# ---- not GGUF at all ----


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(BadModel, match=r"^empty\.gguf: not a GGUF file \(it is empty\)$"):
        read_index(path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not a model\n")
    with pytest.raises(BadModel, match=r"^notes\.txt: not a GGUF file"):
        read_index(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(BadModel, match="no such file"):
        read_index(tmp_path / "nope.gguf")
    with pytest.raises(BadModel, match="is a directory"):
        read_index(tmp_path)


def test_wrong_magic(small):
    with pytest.raises(BadModel, match=r"not a GGUF file \(starts with b'GGUL'"):
        read_index(patched(small.path, 0, b"GGUL"))


# ---- truncation anywhere ----


def test_truncated_at_every_header_offset(small):
    """Every cut inside the header, key-values, tensor infos and padding is refused."""
    index = read_index(small.path)
    assert header_end(small.path) <= index.data_start
    dst = small.path.with_name("cut.gguf")
    for size in range(0, index.data_start + 1):
        truncated(small.path, size, dst)
        with pytest.raises(BadModel) as err:
            read_index(dst)
        message = str(err.value)
        assert message.startswith("cut.gguf: "), message
        assert "truncated" in message or "not a GGUF file" in message, message


def test_truncated_in_the_data(small):
    end = data_end(small.path)
    dst = small.path.with_name("cut.gguf")
    for size in [*range(read_index(small.path).data_start + 1, end, 97), end - 1]:
        truncated(small.path, size, dst)
        with pytest.raises(BadModel, match=rf"data ends at byte \d+ but the file has {size} bytes"):
            read_index(dst)
    truncated(small.path, end, dst)  # the padding after the last tensor is optional
    assert len(read_index(dst).tensors) == len(small.tensor_names)


def test_every_single_byte_corruption_is_handled(small):
    """No corruption of a header byte leaks IndexError/struct.error/UnicodeDecodeError."""
    raw = small.path.read_bytes()
    dst = small.path.with_name("flip.gguf")
    refused = accepted = 0
    for pos in range(header_end(small.path)):
        for value in (0x00, 0xFF, raw[pos] ^ 0x80):
            if value == raw[pos]:
                continue
            dst.write_bytes(raw[:pos] + bytes([value]) + raw[pos + 1 :])
            try:
                read_index(dst)
            except BadModel:
                refused += 1
            else:
                accepted += 1  # e.g. a changed letter inside a string value
    assert refused > 1000 and accepted > 0


# ---- header ----


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (0, "bad GGUF version 0"),
        (1, "version 1 is no longer supported"),
        (4, "unsupported GGUF version 4"),
        (0x03000000, "big-endian file or a corrupt header"),
    ],
)
def test_unsupported_versions(small, version, message):
    with pytest.raises(BadModel, match=message):
        read_index(patched_int(small.path, 4, version, 4))


def test_version_2_is_accepted_like_llama_cpp(small):
    assert read_index(patched_int(small.path, 4, 2, 4)).version == 2


@pytest.mark.parametrize("offset", [8, 16], ids=["n_tensors", "n_kv"])
@pytest.mark.parametrize("count", [2**62, 2**64 - 1, 10**6])
def test_absurd_counts(small, offset, count):
    with pytest.raises(BadModel, match="absurd .* count"):
        read_index(patched_int(small.path, offset, count, 8))


# ---- key-values ----


def test_duplicate_key(small):
    key_b = key_offsets(small.path, "test.key_b")["key"]
    with pytest.raises(BadModel, match="duplicate key 'test.key_a'"):
        read_index(patched(small.path, key_b, b"test.key_a"))


def test_empty_key(small):
    at = key_offsets(small.path, "test.key_a")["key_len"]
    with pytest.raises(BadModel, match="key .* is empty"):
        read_index(patched_int(small.path, at, 0, 8))


def test_absurd_string_length(small):
    at = key_offsets(small.path, "general.name")["value"]
    with pytest.raises(BadModel, match="above llama.cpp's limit of 1 GiB"):
        read_index(patched_int(small.path, at, 2**31, 8))


def test_invalid_value_type(small):
    at = key_offsets(small.path, "test.key_a")["type"]
    with pytest.raises(BadModel, match="key 'test.key_a' has invalid value type 13"):
        read_index(patched_int(small.path, at, 13, 4))


def test_invalid_and_nested_array_item_types(small):
    at = key_offsets(small.path, "tokenizer.ggml.scores")["item_type"]
    with pytest.raises(BadModel, match="nested array"):
        read_index(patched_int(small.path, at, int(VT.ARRAY), 4))
    with pytest.raises(BadModel, match="invalid array item type 99"):
        read_index(patched_int(small.path, at, 99, 4))


def test_absurd_array_length(small):
    at = key_offsets(small.path, "tokenizer.ggml.tokens")["length"]
    with pytest.raises(BadModel, match="above llama.cpp's limit of 2\\^30"):
        read_index(patched_int(small.path, at, 2**31, 8))
    with pytest.raises(BadModel, match="truncated"):
        read_index(patched_int(small.path, at, 2**29, 8))


@pytest.mark.parametrize("value", [0, 48, 3])
def test_bad_alignment_value(aligned64, value):
    at = key_offsets(aligned64.path, "general.alignment")["value"]
    with pytest.raises(BadModel, match=f"general.alignment {value} is not a power of 2"):
        read_index(patched_int(aligned64.path, at, value, 4))


def test_alignment_must_be_uint32(aligned64):
    at = key_offsets(aligned64.path, "general.alignment")["type"]
    with pytest.raises(BadModel, match="must be of type UINT32 but is INT32"):
        read_index(patched_int(aligned64.path, at, int(VT.INT32), 4))


# ---- tensor infos ----


def test_five_dimensions_refused_though_gguf_py_accepts(tmp_path):
    model = build_gguf(tmp_path, extra_tensors={"five.weight": np.ones((1, 1, 1, 2, 32), "f4")})
    assert len(gguf.GGUFReader(model.path).tensors[-1].shape) == 5  # the reference reads it
    with pytest.raises(
        BadModel, match="'five.weight' has 5 dimensions, llama.cpp allows at most 4"
    ):
        read_index(model.path)


def test_tensor_name_too_long(tmp_path):
    model = build_gguf(tmp_path, extra_tensors={"n" * 64: np.ones(32, "f4")})
    with pytest.raises(BadModel, match="is 64 bytes, llama.cpp allows at most 63"):
        read_index(model.path)


def test_duplicate_tensor_name(small):
    at = tensor_info_offsets(small.path, "blk.1.ffn_norm.weight")["name"]
    with pytest.raises(BadModel, match="duplicate tensor name 'blk.0.ffn_norm.weight'"):
        read_index(patched(small.path, at, b"blk.0"))


def test_negative_dimension(small):
    at = tensor_info_offsets(small.path, "output_norm.weight")["dims"]
    with pytest.raises(BadModel, match="negative dimension"):
        read_index(patched_int(small.path, at, -64, 8, signed=True))


def test_element_count_overflow(small):
    at = tensor_info_offsets(small.path, "token_embd.weight")["dims"]
    path = patched(small.path, at, (2**40).to_bytes(8, "little") * 2)
    with pytest.raises(BadModel, match="overflows the element count"):
        read_index(path)


@pytest.mark.parametrize("type_id", [-1, 4, 5, 31, 37, 1000, 2**31 - 1])
def test_invalid_type_id(small, type_id):
    at = tensor_info_offsets(small.path, "blk.1.ffn_norm.weight")["type"]
    path = patched_int(small.path, at, type_id, 4, signed=True)
    with pytest.raises(BadModel, match=f"'blk.1.ffn_norm.weight' has invalid .*type {type_id}"):
        read_index(path)


def test_row_not_a_multiple_of_the_block_size(small):
    at = tensor_info_offsets(small.path, "blk.1.ffn_norm.weight")["type"]
    with pytest.raises(BadModel, match="64 elements per row, not a multiple of the block size 256"):
        read_index(patched_int(small.path, at, int(QT.Q4_K), 4))


def _relative_offset(path: Path, name: str) -> tuple[int, int]:
    """(position of the offset field, its value) for tensor `name`."""
    at = tensor_info_offsets(path, name)["offset"]
    with open(path, "rb") as f:
        f.seek(at)
        return at, int.from_bytes(f.read(8), "little")


def test_unaligned_offset(small):
    at, rel = _relative_offset(small.path, "blk.1.ffn_norm.weight")
    with pytest.raises(BadModel, match="not a multiple of the alignment 32"):
        read_index(patched_int(small.path, at, rel + 4, 8))


def test_overlapping_tensors_refused_though_gguf_py_accepts(small):
    _, prev = _relative_offset(small.path, "blk.1.attn_norm.weight")
    at, _ = _relative_offset(small.path, "blk.1.ffn_norm.weight")
    path = patched_int(small.path, at, prev, 8)
    assert len(gguf.GGUFReader(path).tensors) == len(small.tensor_names)
    with pytest.raises(BadModel, match="'blk.1.ffn_norm.weight' at data offset .* overlaps"):
        read_index(path)


def test_gap_between_tensors(small):
    at, rel = _relative_offset(small.path, "output_norm.weight")
    with pytest.raises(BadModel, match=r"expected \d+ \(a gap after tensor 'blk.2.ffn_up.weight'"):
        read_index(patched_int(small.path, at, rel + 32, 8))


def test_data_past_end_of_file(small):
    """llama_model_loader's "not within the file bounds": the header promises more data."""
    end = data_end(small.path)
    path = truncated(small.path, end - 32)
    with pytest.raises(
        BadModel,
        match=rf"^model\.trunc\d+\.gguf: truncated: tensor 'output_norm\.weight' data ends at "
        rf"byte {end} but the file has {end - 32} bytes$",
    ):
        read_index(path)


# ---- a tensor type gguf-py does not know ----


@pytest.mark.parametrize("type_id", [42, 43, 255, 256])
def test_unknown_type_is_refused_naming_tensor_and_id(small, type_id):
    """llama.cpp refuses a type id it does not know; a copy fq wrote would only fail later."""
    at = tensor_info_offsets(small.path, "blk.2.ffn_up.weight")["type"]
    path = patched_int(small.path, at, type_id, 4)
    with pytest.raises(
        BadModel,
        match=rf"^model\.int{type_id}_\d+\.gguf: tensor 'blk\.2\.ffn_up\.weight' has invalid ggml "
        rf"type {type_id}, unknown to gguf-py",
    ):
        read_index(path)
    with pytest.raises(ValueError):  # gguf-py 0.19.0 cannot read the type at all
        gguf.GGUFReader(path)


def test_unknown_type_is_refused_by_inspect_and_quantize(small, tmp_path, capsys, monkeypatch):
    from fq_core.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    at = tensor_info_offsets(small.path, "blk.2.ffn_up.weight")["type"]
    path = patched_int(small.path, at, 42, 4)
    out = tmp_path / "out"
    out.mkdir()
    for argv in (["inspect", str(path)], ["quantize", str(path), str(out / "o.gguf")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "'blk.2.ffn_up.weight' has invalid ggml type 42" in err
    assert list(out.iterdir()) == []
