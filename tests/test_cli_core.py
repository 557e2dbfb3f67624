"""`fq quantize`, `fq compare`, `fq inspect` as a user runs them: output, exit status, refusals."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
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
    cuts = sorted(
        {1, 3, 4, 7, 8, 15, 16, 23, 24, 40, hend - 1, hend, size - 1}
        | set(range(100, size, max(1, size // 25)))
    )
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
    p = subprocess.run(
        [*FQ, "quantize", str(bad), str(tmp_path / "o.gguf")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr
    assert not (tmp_path / "o.gguf").exists()


def test_sigint_leaves_no_output(gemma3_gguf, tmp_path):
    """A real Ctrl-C sent once the selection is printed (the copy is about to start)."""
    before = (sha(gemma3_gguf), os.stat(gemma3_gguf).st_mtime_ns)
    for attempt in range(5):
        out_dir = tmp_path / f"try{attempt}"
        out_dir.mkdir()
        p = subprocess.Popen(
            [*FQ, "quantize", str(gemma3_gguf), str(out_dir / "o.gguf")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
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
    status, out, _ = run(
        capsys, "compare", str(model.path), str(dst), "--focus-layer", "1", "--json", str(js)
    )
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


# --- non-finite values are shown, not hidden ---------------------------------------------------


def _nan_copy(model, tmp_path):
    """A copy of the model whose blk.0.ffn_norm.weight is all NaN (no manifest)."""
    from fq_core.measurement.gguf_index import read_index

    info = read_index(model.path).tensor("blk.0.ffn_norm.weight")
    return patched(
        model.path, info.offset, b"\x00\x00\xc0\x7f" * info.n_elements, tmp_path / "n.gguf"
    )


def test_compare_against_a_nan_copy_says_so_and_fails(model, tmp_path, capsys):
    bad = _nan_copy(model, tmp_path)
    js = tmp_path / "cmp.json"
    status, out, err = run(
        capsys, "compare", str(model.path), str(bad), "--focus-layer", "0", "--json", str(js)
    )
    assert status == 1 and err == ""
    row = next(x for x in out.splitlines() if x.startswith("blk.0.ffn_norm.weight"))
    assert row.split()[1:] == ["64/64", "nan", "nan", "nan", "nan", "nan"]
    assert "non-finite: blk.0.ffn_norm.weight: 64 of 64 pairs have NaN/±Inf (64 finite" in out
    assert "non-finite=64" in out  # the focused layer's "after" distribution
    assert out.rstrip().endswith(
        "NON-FINITE: 64 finite values of model.gguf are NaN/±Inf in n.gguf"
    )
    doc = json.loads(js.read_text())
    assert doc["became_nonfinite"] == 64 and doc["total"]["max_abs"] == "nan"


def test_quantize_beyond_fp16_range_reports_infinities(tmp_path, isolated_cache, capsys):
    big = np.array([np.finfo(np.float32).max, 1e5, 2.0, 3.0], dtype=np.float32)
    m = build_gguf(tmp_path / "in", n_layers=1, extra_tensors={"blk.0.big_norm.weight": big})
    dst = tmp_path / "o.gguf"
    status, out, _ = run(
        capsys,
        "quantize",
        str(m.path),
        str(dst),
        "--tensors",
        "big_norm",
        "--format",
        "fp16",
        "--rounding",
        "nearest",
    )
    assert status == 0
    assert (
        "max abs error inf, max rel error inf" in out and "2 finite values became NaN/±Inf" in out
    )
    assert json.loads(dst.with_name("o.gguf.fq.json").read_text())["totals"]["n_nonfinite"] == 2
    status, out, _ = run(capsys, "compare", str(m.path), str(dst))
    assert status == 1 and "NON-FINITE: 2 finite values" in out


# --- argument errors are one line --------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, words",
    [
        (
            ["quantize", "a", "b", "--format", "bf17"],
            "fq quantize: error: argument --format: invalid choice: 'bf17'",
        ),
        (["quantize", "a", "b", "--seed", "x"], "fq quantize: error: argument --seed: invalid int"),
        (["compare", "a"], "fq compare: error: the following arguments are required: CANDIDATE"),
        (["evaluate", "a", "--baseline", "b", "--chunks", "1.5"], "fq evaluate: error: argument"),
        (["nosuch"], "fq: error: argument COMMAND: invalid choice: 'nosuch'"),
        ([], "fq: error: the following arguments are required: COMMAND"),
        (["inspect", "a", "--bogus"], "fq: error: unrecognized arguments: --bogus"),
    ],
)
def test_argument_errors_are_one_line_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(words), err
    assert "usage:" not in err


def test_argument_error_in_a_subprocess(tmp_path):
    p = subprocess.run(
        [*FQ, "quantize", "a.gguf", "b.gguf", "--format", "nope"], capture_output=True, text=True
    )
    assert p.returncode == 2 and p.stdout == ""
    (line,) = p.stderr.splitlines()
    assert line.startswith(
        "fq quantize: error: argument --format: invalid choice: 'nope' (choose from 'bf16', "
        "'fp16', 'fp8_e4m3', 'fp8_e5m2', 'int8', 'placebo', 'q8_0', "
    )
    assert line.endswith("'iq4_xs') (see fq quantize --help)")


# --- Ctrl-C: during start-up one line; after the work is done, done ---------------------------


def test_ctrl_c_while_building_the_parser_is_one_line(monkeypatch, capsys):
    import fq_core.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["models"]) == 130
    assert capsys.readouterr().err == "fq: interrupted\n"


def test_ctrl_c_during_the_imports_in_a_subprocess(tmp_path):
    """A real SIGINT while numpy and ml_dtypes are being imported (building the parser):
    it waits for the import to finish (a C extension cut short prints its own traceback),
    then fq says one line and exits 130."""
    script = (
        "import os, signal, sys\n"
        "class Hook:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'numpy':\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        return None\n"
        "from fq_core.cli import main\n"
        "sys.meta_path.insert(0, Hook())\n"
        "sys.argv = ['fq', 'models']\n"
        "sys.exit(main())\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "c")},
    )
    assert p.returncode == 130 and p.stderr in ("fq: interrupted\n", "fq models: interrupted\n")


@pytest.mark.slow
def test_ctrl_c_at_any_moment_of_a_short_run(model, tmp_path):
    """SIGINT sent 0.12 … 0.5 s after start: never a traceback; 130 with nothing written, or
    0 with the output and its manifest. (Before main() runs, the interpreter's own start-up and
    the import of fq_core.cli, ≈0.05 s here, a Ctrl-C is Python's: nothing of fq can catch it.)"""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    for i, delay in enumerate([0.12, 0.15, 0.18, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5]):
        out = tmp_path / f"o{i}.gguf"
        p = subprocess.Popen(
            [*FQ, "quantize", str(model.path), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert "Traceback" not in err and err.count("\n") <= 1, (delay, err)
        if p.returncode == 0:
            assert out.exists() and out.with_name(f"o{i}.gguf.fq.json").exists()
        else:
            assert p.returncode == 130 and not out.exists(), (delay, p.returncode, err)


def test_ctrl_c_after_the_outputs_are_written_exits_0(model, tmp_path, monkeypatch, capsys):
    """Ctrl-C after the manifest is published (the last log line of the work)."""
    import fq_core.measurement.patch

    class Log:
        def info(self, *args):
            raise KeyboardInterrupt

    monkeypatch.setattr(fq_core.measurement.patch, "log", Log())
    dst = tmp_path / "o.gguf"
    status, _, err = run(capsys, "quantize", str(model.path), str(dst))
    assert status == 0 and "interrupted" not in err
    assert json.loads(dst.with_name("o.gguf.fq.json").read_text())["output"]["sha256"] == sha(dst)


@pytest.mark.parametrize(
    "sig, which, status",
    [
        (signal.SIGINT, 1, 130),
        (signal.SIGINT, 2, 0),
        (signal.SIGTERM, 1, 143),
        (signal.SIGTERM, 2, 0),
    ],
)
def test_a_real_signal_while_publishing(model, tmp_path, monkeypatch, capsys, sig, which, status):
    """SIGINT or SIGTERM arriving inside the link that publishes the model (1) or its manifest
    (2): held until the publish is recorded, then delivered. Before the manifest: nothing is
    left; after it: the work is complete, exit 0."""
    from fq_core.platform import atomic

    real_link, calls = os.link, []

    def link(src, dst, **kwargs):
        real_link(src, dst, **kwargs)
        calls.append(dst)
        if len(calls) == which:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(atomic.os, "link", link)
    previous = signal.getsignal(signal.SIGTERM)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    try:
        got, _, err = run(capsys, "quantize", str(model.path), str(out_dir / "o.gguf"))
    finally:
        signal.signal(signal.SIGTERM, previous)  # main() installed fq's handler in this process
    assert got == status, err
    if status:
        assert err.count("\n") == 1 and ("interrupted" in err or "SIGTERM" in err), err
        assert list(out_dir.iterdir()) == []
    else:
        assert "interrupted" not in err and "error" not in err
        assert sorted(p.name for p in out_dir.iterdir()) == ["o.gguf", "o.gguf.fq.json"]


# --- doctor names stale temporaries; evaluate checks its inputs first ----------------------------


def test_doctor_names_stale_temporaries(tmp_path, monkeypatch, capsys):
    from fq_core.platform import atomic

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FQ_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.chdir(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    places = [
        tmp_path,
        tmp_path / "results" / "R1" / "layer0",
        tmp_path / "cache" / "fq-suite" / "models" / "x",
    ]
    stale = []
    for d in places:
        d.mkdir(parents=True, exist_ok=True)
        stale.append(d / f".o b.gguf.{dead.pid}.0123abcd{atomic.TMP_SUFFIX}")
        stale[-1].write_bytes(b"x" * 10)
    live = tmp_path / f".live.{os.getpid()}.0123abcd{atomic.TMP_SUFFIX}"
    live.write_bytes(b"mine")
    main(["doctor"])
    out = capsys.readouterr().out
    assert "[warn] 3 stale temporaries (*.fq-tmp, *.fq-owner and the files they name)" in out
    for p in stale:
        assert f"       {p}  (10 bytes)" in out
    fix = next(line for line in out.splitlines() if "fix: rm -f -- " in line)
    assert fix.count(".fq-tmp") == 3 and str(live) not in out
    assert "'" + str(stale[0]) + "'" in fix  # quoted: the name has a space
    for p in stale:
        p.unlink()
    main(["doctor"])
    assert "[ok  ] no stale temporaries (*.fq-tmp, *.fq-owner) in" in capsys.readouterr().out


def test_evaluate_refuses_a_broken_gguf_before_any_llama_run(model, tmp_path, monkeypatch, capsys):
    import fq_core.measurement.llama.tools as tools

    def no_llama(*args, **kwargs):
        raise AssertionError("llama.cpp must not be looked for")

    monkeypatch.setattr(tools, "find_tools", no_llama)
    bad = truncated(model.path, header_end(model.path) + 40)
    started = time.monotonic()
    for argv in (
        ["evaluate", str(bad), "--baseline", str(model.path)],
        ["evaluate", str(model.path), "--baseline", str(bad)],
    ):
        status, _, err = run(capsys, *argv)
        assert status == 2 and err.count("\n") == 1 and "truncated" in err, err
    assert time.monotonic() - started < 5
