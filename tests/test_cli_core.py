"""`fq quantize`, `fq compare`, `fq inspect` as a user runs them: output, exit status, refusals."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from gguf_factory import build_gguf, header_end, patched, patched_int, truncated

from fq_core.cli import main

FQ = [sys.executable, "-m", "fq_core.cli"]


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def model(tmp_path, isolated_cache):
    return build_gguf(tmp_path / "in", n_layers=5, alignment=128)


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_quantize_prints_selection_and_summary(model, tmp_path, capsys):
    dst = tmp_path / "o.gguf"
    status, out, err = run(capsys, "quantize", str(model.path), str(dst), "--layers", "0,3")
    assert status == 0, err
    assert out.startswith("selection: 2 tensors (ffn_norm), 128 elements, 2 layers: 0,3")
    assert "LIST of two layers (0 and 3)" in out and "--layers 0-3" in out
    assert "elements changed" in out and f"sha256 {sha(dst)}" in out
    assert json.loads((tmp_path / "o.gguf.fq.json").read_text())["output"]["sha256"] == sha(dst)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--layers", "9"], "layer 9 is beyond the model's 5 blocks"),
        (["--tensors", "ffn_up"], "not F32"),
        (["--tensors", "nothing_here"], "matches no tensor"),
        (["--layers", "2-1"], "backwards"),
    ],
)
def test_bad_selection_is_one_line_exit_2(model, tmp_path, capsys, args, words):
    status, out, err = run(capsys, "quantize", str(model.path), str(tmp_path / "o.gguf"), *args)
    assert status == 2
    assert err.count("\n") == 1 and words in err and err.startswith("fq quantize: error:")
    assert not (tmp_path / "o.gguf").exists() and "wrote" not in out


def test_refusals(model, tmp_path, capsys):
    link = tmp_path / "link.gguf"
    link.symlink_to(model.path)
    hard = tmp_path / "hard.gguf"
    os.link(model.path, hard)
    for dst in (model.path, link, hard):
        status, _, err = run(capsys, "quantize", str(model.path), str(dst), "--force")
        assert status == 2 and "is the input" in err
    existing = tmp_path / "exists.gguf"
    existing.write_text("keep")
    status, _, err = run(capsys, "quantize", str(model.path), str(existing))
    assert status == 2 and "--force" in err and existing.read_text() == "keep"


def _malformed(model):
    path = model.path
    size = path.stat().st_size
    hend = header_end(path)
    cuts = sorted({1, 3, 4, 7, 8, 15, 16, 23, 24, 40, hend - 1, hend, size - 1}
                  | set(range(100, size, max(1, size // 25))))  # fmt: skip
    variants = [(f"truncated at {c}", truncated(path, c)) for c in cuts if c < size]
    variants.append(("wrong magic", patched(path, 0, b"GGUX")))
    variants.append(("version 4", patched_int(path, 4, 4, 4)))
    variants.append(("absurd tensor count", patched_int(path, 8, 2**62)))
    variants.append(("absurd kv count", patched_int(path, 16, 2**62)))
    variants.append(("empty", truncated(path, 0)))
    return variants


def test_malformed_inputs_exit_2_and_write_nothing(model, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    variants = _malformed(model)
    assert len(variants) > 30
    for what, bad in variants:
        before = sha(bad)
        status, out, err = run(capsys, "quantize", str(bad), str(out_dir / "o.gguf"))
        assert status == 2, what
        assert err.count("\n") == 1 and "Traceback" not in err, (what, err)
        assert list(out_dir.iterdir()) == [], what
        assert sha(bad) == before


def test_malformed_input_in_a_subprocess(model, tmp_path):
    bad = truncated(model.path, header_end(model.path) - 3)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    p = subprocess.run([*FQ, "quantize", str(bad), str(tmp_path / "o.gguf")],
                       capture_output=True, text=True, env=env)  # fmt: skip
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr
    assert not (tmp_path / "o.gguf").exists()


def test_sigint_leaves_no_output(gemma3_gguf, tmp_path):
    """A real Ctrl-C sent once the selection is printed (the copy is about to start)."""
    before = (sha(gemma3_gguf), os.stat(gemma3_gguf).st_mtime_ns)
    for attempt in range(5):
        out_dir = tmp_path / f"try{attempt}"
        out_dir.mkdir()
        p = subprocess.Popen([*FQ, "quantize", str(gemma3_gguf), str(out_dir / "o.gguf")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert p.stdout.readline().startswith("selection:")
        time.sleep(0.02 * attempt)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        if p.returncode == 0:  # finished before the signal landed; try again sooner
            continue
        assert p.returncode == 130 and "interrupted" in err
        assert list(out_dir.iterdir()) == []
        break
    else:
        pytest.fail("fq quantize always finished before SIGINT arrived")
    assert (sha(gemma3_gguf), os.stat(gemma3_gguf).st_mtime_ns) == before


def test_compare_and_json(model, tmp_path, capsys):
    dst = tmp_path / "o.gguf"
    assert main(["quantize", str(model.path), str(dst), "--layers", "0-1"]) == 0
    capsys.readouterr()
    js = tmp_path / "cmp.json"
    status, out, _ = run(capsys, "compare", str(model.path), str(dst), "--focus-layer", "1",
                         "--json", str(js))  # fmt: skip
    assert status == 0
    assert "blk.0.ffn_norm.weight" in out and "every other byte is identical" in out
    assert "layer 1 blk.1.attn_norm.weight: 0/64 changed" in out
    doc = json.loads(js.read_text())
    assert doc["identical_elsewhere"] is True and doc["focus_layer"] == 1
    assert (
        doc["total"]["changed"]
        == json.loads(dst.with_name("o.gguf.fq.json").read_text())["total_changed"]
    )
    status, _, err = run(capsys, "compare", str(model.path), str(dst), "--focus-layer", "7")
    assert status == 2 and "beyond" in err


def test_inspect_factory(model, capsys):
    status, out, _ = run(capsys, "inspect", str(model.path))
    assert status == 0
    assert "architecture llama, 5 blocks" in out
    line = next(x for x in out.splitlines() if x.startswith("ffn_norm"))
    # 7 non-BF16-exact values per tensor in norm_values(); random ones change too
    assert line.split()[1:4] == ["F32", "64", "5"]
    status, out, _ = run(capsys, "inspect", str(model.path), "--json")
    doc = json.loads(out)
    kinds = {k["kind"]: k for k in doc["kinds"]}
    assert set(kinds) == {"attn_norm", "ffn_norm", "output_norm"}
    assert kinds["ffn_norm"]["would_change"]["bf16/truncate"] >= 5 * 7


def test_inspect_real_models(smollm2_gguf, gemma3_gguf, capsys):
    _, out, _ = run(capsys, "inspect", str(smollm2_gguf), "--json")
    kinds = {k["kind"]: k for k in json.loads(out)["kinds"]}
    assert kinds["ffn_norm"]["would_change"]["bf16/truncate"] == 0
    assert kinds["ffn_norm"]["would_change"]["bf16/nearest"] == 0
    assert kinds["ffn_norm"]["n_elements"] == 17280
    _, out, _ = run(capsys, "inspect", str(gemma3_gguf), "--json")
    doc = json.loads(out)
    assert doc["architecture"] == "gemma3" and doc["block_count"] == 18
    kinds = {k["kind"]: k for k in doc["kinds"]}
    assert kinds["ffn_norm"]["would_change"]["bf16/truncate"] == 2990
    assert kinds["ffn_norm"]["n_elements"] == 11520


@pytest.mark.models
def test_quantize_registry_name_smollm2(tmp_path, capsys):
    status, out, err = run(capsys, "quantize", "smollm2-135m", str(tmp_path / "s.gguf"))
    assert status == 0, err
    assert "0 of 17,280 elements changed" in out and "byte-identical" in out
