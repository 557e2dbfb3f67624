"""The float twin (`fq twin`, fq_core/measurement/twin.py): every quantized tensor dequantized, bit
for bit as gguf-py's `gguf.quants.dequantize` gives it; everything else kept.

gguf-py's `GGUFReader` is the independent reference throughout: it reads the source and the
twin, and its field offsets locate the bytes the twin must share with its source.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf_factory import build_gguf, key_offsets, patched, tensor_info_offsets, truncated

from fq_core.cli import main
from fq_core.errors import BadFormat, BadInput, BadModel, OutputRefused
from fq_core.measurement import twin
from fq_core.measurement.models import ModelRef, ModelSpec
from fq_core.measurement.twin import make_twin, read_manifest, twin_for, twin_path
from fq_core.platform import atomic

QT = gguf.GGMLQuantizationType
FQ = [sys.executable, "-m", "fq_core.cli"]

# Types gguf-py quantizes itself, and the offsets of the f16 scales of types it only
# dequantizes (random blocks with sane scales stand in for real quantized data).
QUANTIZABLE = (QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.MXFP4, QT.TQ2_0)
SCALE_OFFSETS = {
    QT.Q2_K: (80, 82),
    QT.Q3_K: (108,),
    QT.Q4_K: (0, 2),
    QT.Q5_K: (0, 2),
    QT.Q6_K: (208,),
    QT.IQ4_NL: (0,),
    QT.IQ4_XS: (0,),
}


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def random_blocks(qt: QT, n_rows: int, ne0: int, rng: np.random.Generator) -> np.ndarray:
    """Raw bytes of a (n_rows, ne0) tensor of type `qt`: random, with sane f16 scales."""
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    n_blocks = n_rows * ne0 // block
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in SCALE_OFFSETS.get(qt, ()):
        scales = rng.uniform(0.001, 0.05, n_blocks).astype(np.float16)
        raw[:, off : off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(n_rows, ne0 // block * type_size)


def build_mixed(
    directory: Path,
    name: str = "mixed.gguf",
    *,
    file_type: int | None = int(gguf.LlamaFileType.MOSTLY_Q4_K_M),
    alignment: int | None = 64,
    seed: int = 0,
) -> Path:
    """A GGUF with F32 norms, F16 and BF16 tensors, and tensors of 14 quantized types."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("twin test model")
    w.add_block_count(2)
    if file_type is not None:
        w.add_file_type(file_type)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint32("test.u32", 7)
    w.add_float64("test.f64", 0.1)
    w.add_bool("test.flag", True)
    w.add_string("test.str", "héllo 世界")
    w.add_array("test.ints", [1, 2, 3])
    w.add_token_list(["<unk>", "a", "bé", ""])
    w.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(256)).astype(np.float32))
    w.add_tensor("token_embd.weight", rng.standard_normal((12, 256)).astype(np.float16))
    bf16 = gguf.quants.quantize(rng.standard_normal((3, 256)).astype(np.float32), QT.BF16)
    w.add_tensor("blk.0.bf16.weight", bf16, raw_dtype=QT.BF16)
    w.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(256).astype(np.float32))
    w.add_tensor("rope_freqs.weight", np.arange(16, dtype=np.float32))
    for i, qt in enumerate(QUANTIZABLE):
        values = rng.standard_normal((5 + i, 256)).astype(np.float32)
        w.add_tensor(
            f"blk.1.{qt.name.lower()}.weight", gguf.quants.quantize(values, qt), raw_dtype=qt
        )
    for i, qt in enumerate(SCALE_OFFSETS):
        w.add_tensor(
            f"blk.1.{qt.name.lower()}.weight", random_blocks(qt, 3 + i, 512, rng), raw_dtype=qt
        )
    w.add_tensor("blk.1.ffn_norm.weight", rng.standard_normal(256).astype(np.float32))
    w.add_tensor("blk.1.scalar.weight", np.array([3.5], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    return build_mixed(tmp_path_factory.mktemp("mixed"))


def _values(t) -> np.ndarray:
    """A GGUFReader tensor as gguf-py dequantizes it (float32, flat)."""
    return np.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)).reshape(-1)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def _fields(reader: gguf.GGUFReader) -> dict:
    out = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        out[name] = (tuple(int(t) for t in f.types), f.contents())
    return out


def _header_prefix(path: Path) -> int:
    """Where the tensor infos start (the header and key-value section end), per gguf-py."""
    reader = gguf.GGUFReader(path)
    return tensor_info_offsets(path, reader.tensors[0].name)["name_len"]


# --- what the twin holds -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_twin_equals_dequantize(mixed, tmp_path, dtype):
    dst = tmp_path / f"twin.{dtype}.gguf"
    manifest = make_twin(mixed, dst, dtype=dtype)
    src_r, dst_r = gguf.GGUFReader(mixed), gguf.GGUFReader(dst)
    assert [t.name for t in dst_r.tensors] == [t.name for t in src_r.tensors]
    target = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16}[dtype]
    seen = set()
    for a, b in zip(src_r.tensors, dst_r.tensors, strict=True):
        assert list(b.shape) == list(a.shape), a.name
        assert b.data_offset % 64 == 0, a.name
        if a.tensor_type == QT.F32:
            assert b.tensor_type == QT.F32 and _bits(b.data).tobytes() == _bits(a.data).tobytes()
            continue
        if a.tensor_type in (QT.F16, QT.BF16) and dtype != "f32":
            assert b.tensor_type == a.tensor_type, a.name  # kept exactly as it is
            assert _bits(b.data).tobytes() == _bits(a.data).tobytes()
            continue
        seen.add(a.tensor_type)
        assert b.tensor_type == target, a.name
        ref = _values(a)
        if dtype == "f16":
            ref = ref.astype(np.float16)
        elif dtype == "bf16":
            ref = gguf.quants.quantize(ref, QT.BF16).view(np.uint16)
        assert np.array_equal(_bits(ref), _bits(np.asarray(b.data).reshape(-1))), a.name
    assert len(seen) == len(QUANTIZABLE) + len(SCALE_OFFSETS) + (2 if dtype == "f32" else 0)
    assert manifest.n_converted == len(seen)
    types = {t.name: (t.type_before, t.type_after) for t in manifest.tensors}
    assert types["blk.1.q4_k.weight"] == ("Q4_K", target.name)
    assert types["output_norm.weight"] == ("F32", "F32")


def test_metadata_and_header_bytes_kept(mixed, tmp_path):
    dst = tmp_path / "twin.gguf"
    make_twin(mixed, dst)
    src_f, dst_f = _fields(gguf.GGUFReader(mixed)), _fields(gguf.GGUFReader(dst))
    assert src_f.pop("general.file_type")[1] == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert dst_f.pop("general.file_type")[1] == int(gguf.LlamaFileType.ALL_F32)
    assert src_f == dst_f and list(src_f) == list(dst_f)  # every other field, in order
    # byte for byte: the header and key-value section differ only in file_type's value
    end = _header_prefix(mixed)
    assert end == _header_prefix(dst)
    a, b = bytearray(mixed.read_bytes()[:end]), bytearray(dst.read_bytes()[:end])
    value = key_offsets(mixed, "general.file_type")["value"]
    assert a[value : value + 4] != b[value : value + 4]
    a[value : value + 4] = b[value : value + 4]
    assert a == b


@pytest.mark.parametrize("dtype, file_type", [("f16", 1), ("bf16", 32)])
def test_file_type_follows_dtype(mixed, tmp_path, dtype, file_type):
    dst = tmp_path / "t.gguf"
    m = make_twin(mixed, dst, dtype=dtype)
    assert gguf.GGUFReader(dst).fields["general.file_type"].contents() == file_type
    assert (m.file_type_before, m.file_type_after) == (15, file_type)


def test_without_file_type_metadata_is_byte_identical(tmp_path):
    src = build_mixed(tmp_path / "in", file_type=None, alignment=None)
    dst = tmp_path / "t.gguf"
    m = make_twin(src, dst)
    assert m.file_type_before is None and m.file_type_after is None
    end = _header_prefix(src)
    assert src.read_bytes()[:end] == dst.read_bytes()[:end]
    assert "general.file_type" not in gguf.GGUFReader(dst).fields
    assert all(t.data_offset % 32 == 0 for t in gguf.GGUFReader(dst).tensors)


def test_factory_model_and_index(tmp_path):
    """The project's factory model (Q8_0 + F16 matrices): fq_core's own index reads it too."""
    from fq_core.measurement.gguf_index import read_index

    model = build_gguf(tmp_path / "in", n_layers=3, alignment=128)
    dst = tmp_path / "t.gguf"
    make_twin(model.path, dst)
    idx = read_index(dst)
    assert idx.alignment == 128 and all(t.ggml_type == QT.F32 for t in idx.tensors)
    for name, (qt, raw) in model.quantized.items():
        got = np.fromfile(
            dst, np.float32, idx.tensor(name).n_elements, offset=idx.tensor(name).offset
        )
        assert np.array_equal(_bits(got), _bits(gguf.quants.dequantize(raw, qt).reshape(-1)))
    for name, values in model.f32.items():
        t = idx.tensor(name)
        assert (
            np.fromfile(dst, np.float32, t.n_elements, offset=t.offset).tobytes()
            == values.tobytes()
        )


def test_index_header_ranges(mixed):
    """gguf_index's byte ranges (what make_twin copies and patches) against gguf-py's."""
    from gguf_factory import header_end

    from fq_core.measurement.gguf_index import read_index

    idx = read_index(mixed)
    assert idx.kv_start == 24  # magic, version, tensor count, key-value count
    assert idx.infos_start == _header_prefix(mixed) and idx.infos_end == header_end(mixed)
    for key in ("general.file_type", "test.u32", "test.str", "test.f64", "general.alignment"):
        assert idx.value_offsets[key] == key_offsets(mixed, key)["value"], key
    for key in ("test.ints", "tokenizer.ggml.tokens"):  # arrays: the offset of the item type
        assert idx.value_offsets[key] == key_offsets(mixed, key)["item_type"], key
    assert len(idx.value_offsets) == len(idx.metadata)


def test_manifest(mixed, tmp_path):
    dst = tmp_path / "t.gguf"
    m = make_twin(mixed, dst)
    doc = json.loads((tmp_path / "t.gguf.twin.json").read_text())
    assert doc["source"]["sha256"] == sha(mixed) and doc["source"]["size"] == mixed.stat().st_size
    assert doc["output"]["sha256"] == sha(dst) and doc["output"]["size"] == dst.stat().st_size
    assert doc["source"]["path"] == str(mixed.resolve())
    assert doc["dtype"] == "f32" and doc["tool_version"] and doc["seconds"] >= 0
    assert doc["file_type"] == {"before": 15, "after": 0}
    by_name = {t["name"]: t for t in doc["tensors"]}
    assert by_name["blk.1.q6_k.weight"] == {
        "name": "blk.1.q6_k.weight",
        "type_before": "Q6_K",
        "type_after": "F32",
        "n_elements": 7 * 512,
        "shape": [512, 7],
    }
    assert read_manifest(dst) == read_manifest(tmp_path / "t.gguf.twin.json")
    assert read_manifest(dst).output == m.output
    assert "dequantized 16 of 21 tensors" in m.summary() and "to F32" in m.summary()


def all_f32(path: Path) -> Path:
    """A GGUF whose one tensor is F32: nothing in it to dequantize."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("a.weight", np.arange(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_all_f32_source_is_a_copy(tmp_path):
    all_f32(tmp_path / "f.gguf")
    m = make_twin(tmp_path / "f.gguf", tmp_path / "t.gguf")
    assert m.n_converted == 0 and "the twin is a copy" in m.summary()
    assert (tmp_path / "t.gguf").read_bytes() == (tmp_path / "f.gguf").read_bytes()


def test_the_twin_of_a_float_model_is_the_model_itself(tmp_path, capsys, isolated_cache):
    """Nothing to dequantize: `fq twin` and twin_for name the model, and the cache holds no
    byte-identical copy (issue 20: a 1.08 GB copy of an all-F32 model)."""
    from fq_core.measurement.models import resolve_model

    all_f32(tmp_path / "f.gguf")
    status, out, err = run(capsys, "twin", str(tmp_path / "f.gguf"))
    assert status == 0, err
    summary, path = out.splitlines()
    assert "its twin is itself" in summary and Path(path) == tmp_path / "f.gguf"
    ref = resolve_model(str(tmp_path / "f.gguf"))
    t = twin_for(ref)
    assert (t.path, t.sha256, t.manifest, t.made) == (ref.path, ref.sha256, None, False)
    assert t.name == "f-twin" and t.source == ref
    assert not list((tmp_path / "cache").rglob("*.gguf"))


def test_f16_overflow_is_refused(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "big.gguf", "llama")
    values = np.full((2, 32), 1e6, dtype=np.float32)
    w.add_tensor("big.weight", gguf.quants.quantize(values, QT.Q8_0), raw_dtype=QT.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(BadFormat, match="big.weight.*beyond F16's range"):
        make_twin(tmp_path / "big.gguf", tmp_path / "t.gguf", dtype="f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.gguf"]
    make_twin(tmp_path / "big.gguf", tmp_path / "t.gguf")  # f32 holds it


# --- refusals: one line, exit 2, nothing left behind -------------------------------------


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def _one_line_error(status, err, words):
    assert status == 2, err
    assert err.startswith("fq twin: error:") and err.count("\n") == 1 and words in err, err


def _unknown_type_model(tmp_path) -> Path:
    """A GGUF holding a Q8_K tensor: a valid type gguf-py cannot dequantize."""
    w = gguf.GGUFWriter(tmp_path / "q8k.gguf", "llama")
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(256, dtype=np.float32))
    raw = np.zeros((2, gguf.GGML_QUANT_SIZES[QT.Q8_K][1]), dtype=np.uint8)
    w.add_tensor("blk.0.odd.weight", raw, raw_dtype=QT.Q8_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp_path / "q8k.gguf"


def test_bad_inputs_exit_2(mixed, tmp_path, capsys, isolated_cache):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    cut = truncated(mixed, 200, tmp_path / "cut.gguf")
    cases = [
        (text, "not a GGUF file"),
        (cut, "truncated"),
        (patched(mixed, 0, b"GGUX", tmp_path / "magic.gguf"), "not a GGUF file"),
        (_unknown_type_model(tmp_path), "type Q8_K, which gguf-py"),
        (tmp_path / "missing.gguf", "not found"),
    ]
    for bad, words in cases:
        status, out, err = run(capsys, "twin", str(bad), str(out_dir / "t.gguf"))
        _one_line_error(status, err, words)
        assert out == "" and list(out_dir.iterdir()) == [], bad
    # without OUT: nothing in the cache either
    status, _, err = run(capsys, "twin", str(cut))
    _one_line_error(status, err, "truncated")
    twins = tmp_path / "cache" / "fq-suite" / "twins"
    assert not twins.exists() or not any(p.is_file() for p in twins.rglob("*.gguf*"))
    with pytest.raises(SystemExit) as exc:  # argparse's own refusal, one line too
        main(["twin", str(mixed), str(out_dir / "t.gguf"), "--dtype", "f8"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "invalid choice: 'f8'" in err


def test_output_refusals(mixed, tmp_path, capsys, isolated_cache):
    before = sha(mixed)
    link = tmp_path / "link.gguf"
    link.symlink_to(mixed)
    for dst in (mixed, link):
        status, _, err = run(capsys, "twin", str(mixed), str(dst), "--force")
        _one_line_error(status, err, "is the input")
    existing = tmp_path / "exists.gguf"
    existing.write_text("keep")
    status, _, err = run(capsys, "twin", str(mixed), str(existing))
    _one_line_error(status, err, "pass --force")
    assert existing.read_text() == "keep"
    manifest_only = tmp_path / "m.gguf"
    Path(f"{manifest_only}.twin.json").write_text("keep")
    status, _, err = run(capsys, "twin", str(mixed), str(manifest_only))
    _one_line_error(status, err, "m.gguf.twin.json exists")
    assert not manifest_only.exists()
    status, _, err = run(capsys, "twin", str(mixed), str(tmp_path / "nowhere" / "t.gguf"))
    _one_line_error(status, err, "does not exist")
    assert sha(mixed) == before
    status, out, _ = run(capsys, "twin", str(mixed), str(existing), "--force")
    assert status == 0 and out.splitlines()[-1] == str(existing)
    assert gguf.GGUFReader(existing).tensors


@contextlib.contextmanager
def _unwritable(directory: Path):
    """A directory this process cannot write to, even as root (then: the immutable flag)."""
    directory.chmod(0o555)
    immutable = False
    try:
        if os.access(directory, os.W_OK):  # root
            if shutil.which("chattr") is None:
                pytest.skip("running as root without chattr: no unwritable directory")
            p = subprocess.run(["chattr", "+i", str(directory)], capture_output=True)
            if p.returncode != 0 or os.access(directory, os.W_OK):
                pytest.skip("running as root and chattr +i failed: no unwritable directory")
            immutable = True
        yield directory
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        directory.chmod(0o755)


def test_unwritable_directory(mixed, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    with _unwritable(ro):
        status, _, err = run(capsys, "twin", str(mixed), str(ro / "t.gguf"))
        _one_line_error(status, err, "is not writable")
        assert list(ro.iterdir()) == []


def test_cache_unwritable(mixed, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    twins = tmp_path / "xdg" / "fq-suite" / "twins"
    twins.mkdir(parents=True)
    with _unwritable(twins):
        status, _, err = run(capsys, "twin", str(mixed))
        _one_line_error(status, err, "cannot create the twin cache")
        assert list(twins.iterdir()) == []


def test_disk_full_midway_leaves_nothing(mixed, tmp_path, monkeypatch):
    import errno

    calls = []
    real_write = twin._Sink.write

    def write(self, data):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(twin._Sink, "write", write)
    with pytest.raises(OutputRefused, match="no space left"):
        make_twin(mixed, tmp_path / "t.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_interrupt_midway_leaves_nothing(mixed, tmp_path, monkeypatch):
    calls = []
    real = twin._write_tensor

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(twin, "_write_tensor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_twin(mixed, tmp_path / "t.gguf")
    assert list(tmp_path.iterdir()) == []


def test_manifest_failure_removes_the_twin(mixed, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OutputRefused("cannot write the manifest (test)")

    monkeypatch.setattr(atomic, "write_bytes", fail)
    with pytest.raises(OutputRefused):
        make_twin(mixed, tmp_path / "t.gguf")
    assert list(tmp_path.iterdir()) == []


def test_bad_dtype(mixed, tmp_path):
    with pytest.raises(BadInput, match="unknown twin dtype 'f8'"):
        make_twin(mixed, tmp_path / "t.gguf", dtype="f8")


def test_changed_source_is_refused(mixed, tmp_path, monkeypatch):
    """The source's bytes are hashed on the way; a file changed meanwhile is refused."""
    src = tmp_path / "src.gguf"
    shutil.copyfile(mixed, src)
    real = twin._write_tensor

    def touch_then_write(*args, **kwargs):
        os.utime(src, ns=(1, 1))
        return real(*args, **kwargs)

    monkeypatch.setattr(twin, "_write_tensor", touch_then_write)
    with pytest.raises(BadInput, match="changed while its twin was being written"):
        make_twin(src, tmp_path / "t.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.gguf"]


# --- the cached twin ---------------------------------------------------------------------


def test_cached_twin_made_once_and_reused(mixed, tmp_path, capsys, isolated_cache):
    from fq_core.measurement.models import resolve_model

    status, out, err = run(capsys, "twin", str(mixed))
    assert status == 0, err
    summary, path = out.splitlines()
    ref = resolve_model(str(mixed))
    assert Path(path) == twin_path(ref, "f32")
    assert path.startswith(str(tmp_path / "cache" / "fq-suite" / "twins" / ref.sha256[:16]))
    assert path.endswith("/mixed.f32.gguf") and "(made)" in summary and "dequantized 16" in summary
    mtime = os.stat(path).st_mtime_ns
    status, out, _ = run(capsys, "twin", str(mixed))
    assert status == 0 and "reused" in out and os.stat(path).st_mtime_ns == mtime
    t = twin_for(ref)
    assert not t.made and t.path == Path(path) and t.sha256 == sha(path)
    assert t.name == "mixed-twin" and t.spec is None and t.source == ref and t.dtype == "f32"
    status, out, _ = run(capsys, "twin", str(mixed), "--force")
    assert status == 0 and "(made)" in out
    # another dtype lives beside it
    f16 = twin_for(ref, "f16")
    assert f16.made and f16.path.parent.name == f"{ref.sha256[:16]}-f16"
    assert f16.path.name == "mixed.f16.gguf" and f16.sha256 == sha(f16.path)


def test_a_copy_under_another_name_reuses_the_twin(mixed, tmp_path, isolated_cache):
    """One twin per content: a copy of the model named otherwise (a user's own path) finds
    the twin made for the first name, not a second 1 GB file beside it."""
    import shutil

    from fq_core.measurement.models import resolve_model

    first = twin_for(resolve_model(str(mixed)))
    copy = tmp_path / "copies" / "mine.gguf"
    copy.parent.mkdir()
    shutil.copyfile(mixed, copy)
    again = twin_for(resolve_model(str(copy)))
    assert first.made and not again.made and again.path == first.path
    assert [p.name for p in first.path.parent.glob("*.gguf")] == [first.path.name]


def test_cached_twin_remade_when_damaged_or_stale(mixed, tmp_path, isolated_cache):
    from fq_core.measurement.models import resolve_model

    ref = resolve_model(str(mixed))
    first = twin_for(ref)
    good = sha(first.path)
    data = bytearray(first.path.read_bytes())
    data[-100] ^= 0xFF  # same size, one byte changed
    first.path.write_bytes(data)
    again = twin_for(ref)
    assert again.made and sha(again.path) == good
    doc = json.loads(Path(f"{again.path}.twin.json").read_text())
    doc["source"]["sha256"] = "0" * 64
    Path(f"{again.path}.twin.json").write_text(json.dumps(doc))
    assert twin_for(ref).made
    Path(f"{again.path}.twin.json").unlink()
    assert twin_for(ref).made
    assert not twin_for(ref).made


def test_twin_ref_inherits_chat_template(mixed, tmp_path, isolated_cache):
    from fq_core.platform.hashing import sha256_file

    spec = ModelSpec(
        name="toy",
        packages=(),
        filename="mixed.gguf",
        sha256=sha256_file(mixed),
        description="",
        chat_template="chatml",
    )
    ref = twin_for(ModelRef("toy", mixed, spec.sha256, spec))
    assert ref.chat_template == "chatml" and ref.name == "toy-twin" and ref.spec is None
    plain = twin_for(ModelRef("toy", mixed, spec.sha256, None))
    assert plain.chat_template is None


def test_source_changed_since_resolved(mixed, tmp_path, isolated_cache):
    ref = ModelRef("toy", mixed, "f" * 64, None)
    with pytest.raises(BadModel, match="changed since it was resolved"):
        twin_for(ref)
    assert not twin_path(ref).exists()


# --- memory: flat, whatever the size of a tensor -----------------------------------------

# VmHWM, the high-water mark of this process image (ru_maxrss would carry the parent's over
# fork + exec, and this test's parent holds the large model it built).
_PEAK = """
import re, sys
from fq_core.measurement.twin import make_twin
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
base = hwm()
m = make_twin(sys.argv[1], sys.argv[2], fsync=False)
print(base, hwm(), m.output.size)
"""


def build_large(directory: Path, n_rows: int = 32768, ne0: int = 4096) -> Path:
    """One Q8_0 tensor of n_rows x ne0 (default 128 Mi elements: 136 MiB in, 512 MiB out)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(directory / "large.gguf", "llama")
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(ne0, dtype=np.float32))
    w.add_tensor("token_embd.weight", random_blocks_q8_0(n_rows, ne0, rng), raw_dtype=QT.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return directory / "large.gguf"


def random_blocks_q8_0(n_rows: int, ne0: int, rng) -> np.ndarray:
    raw = rng.integers(0, 256, size=(n_rows * ne0 // 32, 34), dtype=np.uint8)
    raw[:, :2] = np.array([0.01], dtype=np.float16).view(np.uint8)
    return raw.reshape(n_rows, ne0 // 32 * 34)


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> Path:
    return build_large(tmp_path_factory.mktemp("large"))


def test_peak_memory_is_flat(large, tmp_path):
    """A 512 MiB F32 tensor out of a 136 MiB Q8_0 one: the process grows by far less than
    either (blocks of CHUNK_BYTES, never the tensor)."""
    dst = tmp_path / "t.gguf"
    p = subprocess.run(
        [sys.executable, "-c", _PEAK, str(large), str(dst)],
        capture_output=True,
        text=True,
        check=True,
    )
    base_kb, peak_kb, size = map(int, p.stdout.split())
    grew_mib = (peak_kb - base_kb) / 1024
    tensor_in_mib = large.stat().st_size / 2**20
    assert size > 512 * 2**20
    assert grew_mib < min(tensor_in_mib, 64), (base_kb, peak_kb)


def test_sigint_leaves_no_output(large, tmp_path):
    """A real Ctrl-C while a large twin is written: status 130, nothing left behind."""
    for attempt in range(6):
        out_dir = tmp_path / f"try{attempt}"
        out_dir.mkdir()
        p = subprocess.Popen(
            [*FQ, "twin", str(large), str(out_dir / "t.gguf")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.2 + 0.3 * attempt)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
        if p.returncode == 0:  # finished before the signal landed
            continue
        assert p.returncode == 130 and "interrupted" in err, err
        assert list(out_dir.iterdir()) == [] and out == ""
        break
    else:
        pytest.fail("fq twin always finished before SIGINT arrived")


# --- the real model ----------------------------------------------------------------------


def _chunks(t, rows: int = 2048):
    """(raw rows, row slice) of a GGUFReader tensor, a few thousand rows at a time."""
    data = np.asarray(t.data)
    if data.ndim == 1:
        yield data
        return
    flat = data.reshape(-1, data.shape[-1])
    for r0 in range(0, flat.shape[0], rows):
        yield flat[r0 : r0 + rows]


def test_gemma3_twin(gemma3_gguf, tmp_path):
    """`fq twin gemma3-270m` (the cached twin), tensor by tensor against gguf-py."""
    p = subprocess.run(
        [str(Path(sys.executable).with_name("fq")), "twin", "gemma3-270m"],
        capture_output=True,
        text=True,
        check=True,
    )
    path = Path(p.stdout.splitlines()[-1])
    assert path.parent.name.startswith("a5fd3b62230aa5ec-f32") and path.is_file()
    manifest = read_manifest(path)
    assert (
        manifest.source.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    )
    assert manifest.n_converted == 127 and manifest.file_type_after == 0
    src_r, dst_r = gguf.GGUFReader(gemma3_gguf), gguf.GGUFReader(path)
    checked = {"identical F32": 0, "equal to dequantize": 0}
    for a, b in zip(src_r.tensors, dst_r.tensors, strict=True):
        assert (a.name, list(a.shape)) == (b.name, list(b.shape))
        assert b.tensor_type == QT.F32 and b.data_offset % 32 == 0
        got = np.asarray(b.data).reshape(-1)
        pos = 0
        for chunk in _chunks(a):
            ref = np.asarray(gguf.quants.dequantize(chunk, a.tensor_type)).reshape(-1)
            assert np.array_equal(_bits(ref), _bits(got[pos : pos + ref.size])), a.name
            pos += ref.size
        assert pos == got.size
        checked["identical F32" if a.tensor_type == QT.F32 else "equal to dequantize"] += 1
    assert checked == {"identical F32": 109, "equal to dequantize": 127}
    src_f, dst_f = _fields(src_r), _fields(dst_r)
    assert src_f.pop("general.file_type")[1] == 15 and dst_f.pop("general.file_type")[1] == 0
    assert src_f == dst_f


@pytest.mark.llama
@pytest.mark.models
def test_gemma3_twin_runs_in_llama_cpp(gemma3_gguf, tmp_path, record_property):
    """The twin loads (--check-tensors) and its PPL on 2 chunks of 128 is within 20% of the
    quantized model's (it is the same weights, minus the 8-bit activation rounding)."""
    from fq_core.measurement.corpus import resolve_corpus
    from fq_core.measurement.llama.runner import LlamaRunner
    from fq_core.measurement.llama.tools import find_tools
    from fq_core.measurement.models import resolve_model

    model = resolve_model("gemma3-270m")
    twin_ref = twin_for(model)
    assert twin_ref.chat_template == "gemma"
    runner = LlamaRunner(find_tools(), log_dir=tmp_path / "logs", timeout_s=900)
    load = runner.load(twin_ref)
    assert load.ok
    corpus = resolve_corpus()
    # ctx 128: the twin's PPL tracks the quantized model's at any context
    q = runner.perplexity(model, corpus.path, ctx=128, batch=128, chunks=2)
    f = runner.perplexity(twin_ref, corpus.path, ctx=128, batch=128, chunks=2)
    record_property("ppl_quantized", q.ppl)
    record_property("ppl_twin", f.ppl)
    print(
        f"PPL (2 chunks, ctx 128): quantized {q.ppl:.4f}, twin {f.ppl:.4f}, "
        f"{100 * (f.ppl / q.ppl - 1):+.2f}%; twin load {load.load_time_ms} ms"
    )
    assert abs(f.ppl / q.ppl - 1) < 0.20
    assert f.ppl != q.ppl  # not the same engine path: no activation rounding in the twin
