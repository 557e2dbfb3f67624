"""fake_quantize_file on factory and real GGUFs: exact bytes, manifest, refusals, no leftovers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import types

import gguf
import numpy as np
import pytest
from gguf_factory import build_gguf

from fq_core.definitions.formats import fake_quantize
from fq_core.errors import BadFormat, BadSelection, FqError, OutputRefused
from fq_core.measurement import patch as patch_mod
from fq_core.measurement.gguf_index import read_index, read_tensor
from fq_core.measurement.metrics import compare_files
from fq_core.measurement.patch import fake_quantize_file, read_manifest


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def leftovers(directory, keep=()):
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


def assert_exact_patch(src, dst, fmt="bf16", rounding="truncate", seed=0, names=None):
    """dst == src outside the selected tensors; inside, exactly formats.fake_quantize."""
    idx = read_index(src)
    manifest = read_manifest(dst)
    names = names if names is not None else [t["name"] for t in manifest["tensors"]]
    a = np.fromfile(src, dtype=np.uint8)
    b = np.fromfile(dst, dtype=np.uint8)
    assert a.size == b.size
    mask = np.ones(a.size, dtype=bool)
    for name in names:
        info = idx.tensor(name)
        orig = read_tensor(idx, info)
        want = fake_quantize(orig, fmt, rounding, seed=seed, tensor_name=name)
        got = b[info.offset : info.offset + info.n_bytes].view(np.float32)
        assert np.array_equal(got.view(np.uint32), want.reshape(-1).view(np.uint32)), name
        mask[info.offset : info.offset + info.n_bytes] = False
    assert np.array_equal(a[mask], b[mask]), "bytes outside the selection changed"
    return manifest


@pytest.fixture
def model(tmp_path):
    return build_gguf(tmp_path / "in", n_layers=4, alignment=64)


@pytest.mark.parametrize(
    "layers, tensors, fmt, rounding",
    [
        ("all", ("ffn_norm",), "bf16", "truncate"),
        ("0,2", ("ffn_norm", "attn_norm"), "bf16", "nearest"),
        ("1-3", ("blk.*.attn_*",), "fp8_e4m3", "nearest"),
        ("all", ("output_norm",), "int8", "truncate"),
        ("0", ("re:blk\\.0\\..*_norm\\.weight",), "placebo", "truncate"),
    ],
)
def test_factory_bytes_exact(model, tmp_path, layers, tensors, fmt, rounding):
    dst = tmp_path / "out.gguf"
    before = (sha(model.path), os.stat(model.path).st_mtime_ns)
    m = fake_quantize_file(
        model.path, dst, layers=layers, tensors=tensors, fmt=fmt, rounding=rounding, seed=7
    )
    assert (sha(model.path), os.stat(model.path).st_mtime_ns) == before
    doc = assert_exact_patch(model.path, dst, fmt, rounding, seed=7)
    assert doc["output"]["sha256"] == sha(dst) == m.output.sha256
    assert doc["input"]["sha256"] == before[0]
    assert doc["input"]["size"] == doc["output"]["size"] == os.path.getsize(dst)
    assert doc["format"] == fmt and doc["rounding"] == rounding and doc["seed"] == 7
    assert doc["selection"]["layers"] == layers and doc["selection"]["tensors"] == list(tensors)
    assert doc["total_changed"] == sum(t["changed"] for t in doc["tensors"]) > 0
    assert leftovers(tmp_path, {"in", "out.gguf", "out.gguf.fq.json"}) == []
    # gguf-py's reader agrees on the output's data for every tensor
    r = gguf.GGUFReader(dst)
    for t in r.tensors:
        if t.name in model.f32 and t.name not in {x["name"] for x in doc["tensors"]}:
            assert np.array_equal(np.asarray(t.data).reshape(-1), model.f32[t.name])


def test_manifest_per_tensor_figures(model, tmp_path):
    dst = tmp_path / "out.gguf"
    fake_quantize_file(model.path, dst, layers="0-1")
    doc = read_manifest(dst)
    assert [t["name"] for t in doc["tensors"]] == ["blk.0.ffn_norm.weight", "blk.1.ffn_norm.weight"]
    for t in doc["tensors"]:
        o = model.f32[t["name"]]
        q = fake_quantize(o, "bf16", "truncate")
        d = np.abs(o.astype(np.float64) - q)
        assert t["layer"] == int(t["name"].split(".")[1]) and t["shape"] == [64]
        assert t["n_elements"] == 64 and t["changed"] == int(np.count_nonzero(o != q))
        assert t["max_abs"] == d.max() and t["mean_abs"] == pytest.approx(d.mean())
        assert t["max_rel"] == pytest.approx((d / np.abs(o)).max())
    assert doc["tool"] == "fq-suite" and doc["tool_version"]
    assert doc["selection"]["resolved_layers"] == [0, 1]


def test_nothing_changes_says_so(tmp_path):
    exact = np.array([1.0, 0.5, -2.0, 0.0], dtype=np.float32)
    m = build_gguf(tmp_path / "in", n_layers=2, extra_tensors={"blk.0.exact_norm.weight": exact})
    dst = tmp_path / "out.gguf"
    man = fake_quantize_file(m.path, dst, tensors=["exact_norm"])
    assert man.total_changed == 0 and man.nothing_changed
    assert "0 of 4 elements changed" in man.summary()
    assert sha(dst) == sha(m.path) == man.output.sha256 == man.input.sha256


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "relative"])
def test_output_that_is_the_input_is_refused(model, tmp_path, how, monkeypatch):
    before = sha(model.path)
    if how == "same":
        dst = model.path
    elif how == "symlink":
        dst = tmp_path / "link.gguf"
        dst.symlink_to(model.path)
    elif how == "hardlink":
        dst = tmp_path / "hard.gguf"
        os.link(model.path, dst)
    else:
        monkeypatch.chdir(model.path.parent.parent)
        dst = f"in/../in/{model.path.name}"
    with pytest.raises(OutputRefused, match="is the input"):
        fake_quantize_file(model.path, dst, force=True)
    assert sha(model.path) == before
    assert not list(model.path.parent.glob(".*tmp"))


def test_existing_output_needs_force(model, tmp_path):
    dst = tmp_path / "out.gguf"
    dst.write_bytes(b"precious")
    with pytest.raises(OutputRefused, match="--force"):
        fake_quantize_file(model.path, dst)
    assert dst.read_bytes() == b"precious"
    assert not (tmp_path / "out.gguf.fq.json").exists()
    fake_quantize_file(model.path, dst, force=True)
    assert_exact_patch(model.path, dst)


def test_existing_manifest_needs_force(model, tmp_path):
    (tmp_path / "out.gguf.fq.json").write_text("{}")
    with pytest.raises(OutputRefused, match="fq.json exists"):
        fake_quantize_file(model.path, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_missing_output_directory(model, tmp_path):
    with pytest.raises(OutputRefused, match="does not exist"):
        fake_quantize_file(model.path, tmp_path / "nope" / "out.gguf")


@pytest.mark.parametrize("stage", ["copy", "mmap-patch", "verify", "manifest", "rename-manifest"])
def test_failure_midway_leaves_nothing(model, tmp_path, monkeypatch, stage):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "o.gguf"
    real_copy, real_pread = shutil.copyfile, os.pread

    def boom(*a, **k):
        raise KeyboardInterrupt("injected")

    if stage == "copy":

        def copy(src, d, *a, **k):
            real_copy(src, d)
            with open(d, "r+b") as f:
                f.truncate(os.path.getsize(src) // 2)
            raise KeyboardInterrupt("injected")

        monkeypatch.setattr(patch_mod.shutil, "copyfile", copy)
    elif stage == "mmap-patch":
        real_mmap = patch_mod.mmap.mmap

        class FailingMap:
            def __init__(self, *a, **k):
                self.m = real_mmap(*a, **k)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.m.close()

            def __setitem__(self, key, value):
                self.m[key.start : key.start + 4] = value[:4]  # half-written, then fail
                raise OSError("injected disk error")

        monkeypatch.setattr(patch_mod, "mmap", types.SimpleNamespace(mmap=FailingMap))
    elif stage == "verify":

        def pread(fd, n, off):
            data = real_pread(fd, n, off)
            return bytes(b ^ 1 for b in data) if off > 0 else data

        monkeypatch.setattr(patch_mod.os, "pread", pread)
    elif stage == "manifest":
        monkeypatch.setattr(patch_mod.json, "dumps", boom)
    else:
        calls = []
        real_link = os.link

        def link(a, b):  # publishing without --force is a no-replace link: model, manifest
            calls.append(b)
            if len(calls) == 2:
                raise KeyboardInterrupt("injected")
            return real_link(a, b)

        monkeypatch.setattr(patch_mod.os, "link", link)
    before = sha(model.path)
    with pytest.raises((KeyboardInterrupt, OSError, FqError)):  # disk errors: one-line FqError
        fake_quantize_file(model.path, dst)
    assert leftovers(out_dir) == []
    assert sha(model.path) == before


def test_bad_format_leaves_nothing(tmp_path):
    bad = np.array([1.0, np.nan], dtype=np.float32)
    m = build_gguf(tmp_path / "in", n_layers=1, extra_tensors={"blk.0.nan_norm.weight": bad})
    with pytest.raises(BadFormat, match="blk.0.nan_norm.weight"):
        fake_quantize_file(m.path, tmp_path / "o.gguf", tensors=["nan_norm"], fmt="int8")
    assert leftovers(tmp_path) == ["in"]


def test_non_f32_selection_refused_before_writing(model, tmp_path):
    with pytest.raises(BadSelection, match="not F32"):
        fake_quantize_file(model.path, tmp_path / "o.gguf", tensors=["ffn_up"])
    assert leftovers(tmp_path) == ["in"]


def test_compare_files_on_factory(model, tmp_path):
    dst = tmp_path / "out.gguf"
    fake_quantize_file(model.path, dst, layers="0,3", tensors=["ffn_norm", "attn_norm"])
    cmp = compare_files(model.path, dst, focus_layer=0)
    assert cmp.identical_elsewhere and cmp.header_identical and cmp.padding_identical
    assert {d.name for d in cmp.differing} <= set(
        read_manifest(dst)["selection"]["resolved_tensors"]
    )
    assert cmp.total.changed == read_manifest(dst)["total_changed"]
    assert {f.name for f in cmp.focus} == {"blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"}
    # a tensor changed behind the manifest's back is named
    info = read_index(dst).tensor("blk.2.ffn_up.weight")
    with open(dst, "r+b") as f:
        f.seek(info.offset + 5)
        byte = f.read(1)
        f.seek(info.offset + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    cmp = compare_files(model.path, dst)
    assert cmp.unexpected == ("blk.2.ffn_up.weight",)
    # padding too
    pad = read_index(dst).data_start - 1
    raw = bytearray(dst.read_bytes())
    if raw[pad] == 0:
        raw[pad] = 1
        dst.write_bytes(bytes(raw))
        assert any("header" in u for u in compare_files(model.path, dst).unexpected)


def test_compare_refuses_different_layout(model, tmp_path):
    other = build_gguf(tmp_path / "other", n_layers=2)
    with pytest.raises(Exception, match="header layout"):
        compare_files(model.path, other.path)


# --- the real models -------------------------------------------------------------------


def test_gemma3_all_layers(gemma3_gguf, tmp_path):
    before = (sha(gemma3_gguf), os.stat(gemma3_gguf).st_mtime_ns)
    dst = tmp_path / "g.gguf"
    m = fake_quantize_file(gemma3_gguf, dst)
    assert (m.total_changed, m.total_elements) == (2990, 11520)
    doc = assert_exact_patch(gemma3_gguf, dst)
    assert doc["output"]["sha256"] == sha(dst)
    assert doc["input"]["sha256"] == before[0]
    assert len(doc["tensors"]) == 18
    assert (sha(gemma3_gguf), os.stat(gemma3_gguf).st_mtime_ns) == before
    cmp = compare_files(gemma3_gguf, dst, focus_layer=0)
    assert cmp.identical_elsewhere and cmp.total.changed == 2990
    assert cmp.manifest == tmp_path / "g.gguf.fq.json"


def test_smollm2_zero_changed(smollm2_gguf, tmp_path):
    dst = tmp_path / "s.gguf"
    m = fake_quantize_file(smollm2_gguf, dst)
    assert m.total_changed == 0 and m.total_elements == 30 * 576
    assert "0 of 17,280 elements changed" in m.summary()
    doc = json.loads((tmp_path / "s.gguf.fq.json").read_text())
    assert doc["nothing_changed"] is True and doc["total_changed"] == 0
    assert doc["output"]["sha256"] == doc["input"]["sha256"] == sha(dst)


def _with_big_values(tmp_path):
    big = np.array([1.0, np.finfo(np.float32).max, 1e5, -7e4, 0.5, 2.0, 3.0, 4.0], np.float32)
    return build_gguf(tmp_path / "in", n_layers=2, extra_tensors={"blk.0.big_norm.weight": big})


def test_values_beyond_the_format_are_counted_in_summary_and_manifest(tmp_path):
    m = _with_big_values(tmp_path)
    dst = tmp_path / "out.gguf"
    man = fake_quantize_file(m.path, dst, tensors=["big_norm"], fmt="fp16", rounding="nearest")
    t = man.totals
    assert (t.n_nonfinite, t.n_became_nonfinite) == (3, 3)
    assert t.max_abs == t.max_rel == float("inf")
    assert "max abs error inf, max rel error inf" in man.summary()
    assert "3 finite values became NaN/±Inf" in man.summary()
    text = (tmp_path / "out.gguf.fq.json").read_text()
    assert "Infinity" not in text  # strict JSON: the figure is the string "inf"
    doc = json.loads(text)
    assert doc["totals"]["max_rel"] == "inf" and doc["totals"]["n_became_nonfinite"] == 3
    assert doc["tensors"][0]["n_nonfinite"] == 3 and doc["tensors"][0]["max_abs"] == "inf"
    # bf16 truncation never makes a finite value infinite: the counts say 0
    man = fake_quantize_file(m.path, tmp_path / "b.gguf", tensors=["big_norm"])
    assert man.totals.n_became_nonfinite == 0 and np.isfinite(man.totals.max_rel)
    assert "NaN" not in man.summary()


def test_manifest_input_hash_is_computed_not_remembered(model, tmp_path, monkeypatch):
    """A stale or lying hash-cache entry for the input never reaches the manifest."""
    from fq_core.platform import hashing

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(hashing, "RACY_S", -1e9)
    hashing.remember_sha256(model.path, "0" * 64, from_bytes=True)  # a wrong, trusted entry
    assert hashing.sha256_file(model.path) == "0" * 64
    man = fake_quantize_file(model.path, tmp_path / "o.gguf", layers="0")
    assert man.input.sha256 == sha(model.path) and man.output.sha256 == sha(tmp_path / "o.gguf")
    assert hashing.sha256_file(model.path, verify=True) == sha(model.path)  # entry corrected
