"""No input is ever lost or overwritten, and no temporary survives: fq_core.platform.atomic and the
commands that write through it, attacked the way a careless or hostile user would."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gguf_factory import build_gguf

from fq_core.cli import main
from fq_core.errors import OutputRefused
from fq_core.platform import atomic

ROOT = Path(__file__).resolve().parent.parent


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in Path(directory).rglob(f"*{atomic.TMP_SUFFIX}"))


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FQ_LOG_DIR", str(tmp_path / "logs"))


@pytest.fixture
def two_models(tmp_path, isolated):
    a = build_gguf(tmp_path / "a", n_layers=3)
    b = build_gguf(tmp_path / "b", n_layers=3, seed=1)
    return a.path, b.path


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


# --- input collision through every path-taking option ----------------------------------------


def test_compare_json_onto_an_input_is_refused(two_models, capsys):
    a, b = two_models
    before = sha(a), sha(b)
    for target in (a, b):
        status, _, err = run(capsys, "compare", a, b, "--json", target)
        assert status == 2
        assert err.count("\n") == 1 and "is the input" in err
    assert (sha(a), sha(b)) == before


def test_compare_json_through_a_link_is_refused(two_models, tmp_path, capsys):
    a, b = two_models
    hard, soft = tmp_path / "hard.json", tmp_path / "soft.json"
    os.link(a, hard)
    soft.symlink_to(b)
    before = sha(a), sha(b)
    for target in (hard, soft):
        status, _, err = run(capsys, "compare", a, b, "--json", target, "--force")
        assert status == 2 and "is the input" in err, err
    assert (sha(a), sha(b)) == before


def test_evaluate_json_onto_an_input_is_refused_before_any_work(two_models, capsys):
    a, b = two_models
    before = sha(a)
    started = time.monotonic()
    status, _, err = run(capsys, "evaluate", a, "--baseline", b, "--json", a)
    assert status == 2 and "is the input" in err and err.count("\n") == 1
    assert time.monotonic() - started < 30  # refused up front, no llama.cpp run
    assert sha(a) == before


def test_json_into_a_missing_directory_is_refused_up_front(two_models, tmp_path, capsys):
    a, b = two_models
    status, _, err = run(capsys, "evaluate", a, "--baseline", b, "--json", tmp_path / "no" / "x")
    assert status == 2 and "does not exist" in err and err.count("\n") == 1


def test_existing_json_needs_force(two_models, tmp_path, capsys):
    a, b = two_models
    out = tmp_path / "cmp.json"
    out.write_text("keep me")
    status, _, err = run(capsys, "compare", a, b, "--json", out)
    assert status == 2 and "--force" in err and out.read_text() == "keep me"
    status, _, _ = run(capsys, "compare", a, b, "--json", out, "--force")
    assert status in (0, 1) and out.read_text().startswith("{")  # 1: the models differ
    assert temporaries(tmp_path) == []


def test_quantize_output_onto_its_input_is_refused(two_models, capsys):
    a, _ = two_models
    before = sha(a)
    status, _, err = run(capsys, "quantize", a, a, "--force")
    assert status == 2 and "is the input" in err
    assert sha(a) == before


# --- concurrency -------------------------------------------------------------------------------


def test_a_target_that_appears_while_writing_is_not_replaced(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(OutputRefused, match="appeared while it was being written"):
        with atomic.temporary_for(target, force=False) as tmp:
            tmp.write_bytes(b"mine")
            target.write_bytes(b"theirs")  # the other writer wins the race
    assert target.read_bytes() == b"theirs"
    assert temporaries(tmp_path) == []


def test_two_concurrent_quantize_runs_one_wins(two_models, tmp_path):
    a, _ = two_models
    out = tmp_path / "d" / "o.gguf"
    out.parent.mkdir()
    argv = [sys.executable, "-m", "fq_core.cli", "quantize", str(a), str(out)]
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    procs = [
        subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    statuses = sorted(status for status, _ in results)
    assert statuses == [0, 2], results
    loser = next(err for status, err in results if status == 2)
    assert "exists" in loser or "appeared" in loser
    assert temporaries(out.parent) == []


# --- signals and kill -9 -----------------------------------------------------------------------


@pytest.fixture
def big_model(tmp_path, isolated):
    """Big enough (about 60 MB) that a write takes long enough to be interrupted."""
    return build_gguf(tmp_path / "big", n_layers=24, n_embd=1024, n_ff=2048, n_vocab=64).path


@pytest.mark.parametrize("delay", [0.3, 0.6, 1.0, 1.5])
def test_sigterm_leaves_no_temporary(big_model, tmp_path, delay):
    out = tmp_path / "o" / "out.gguf"
    out.parent.mkdir()
    argv = [sys.executable, "-m", "fq_core.cli", "quantize", str(big_model), str(out)]
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    status = proc.wait(timeout=60)
    err = proc.stderr.read()
    assert temporaries(out.parent) == [], (delay, status, err)
    if status == 0:  # finished before the signal: complete, with its manifest
        assert out.exists() and Path(f"{out}.fq.json").exists()
    else:
        assert status in (143, -signal.SIGTERM), (status, err)
        assert "Traceback" not in err and err.count("\n") <= 1, err
        assert not out.exists()


def test_kill_9_leftover_is_named_then_removed_by_the_next_write(big_model, tmp_path):
    out = tmp_path / "o" / "out.gguf"
    out.parent.mkdir()
    # what a kill -9 leaves: a temporary whose process is gone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out.parent / f".out.gguf.{dead.pid}.0123abcd{atomic.TMP_SUFFIX}"
    stale.write_bytes(b"x" * 1000)
    assert atomic.stale_temporaries(out.parent) == [stale]
    mine = out.parent / f".other.{os.getpid()}.0123abcd{atomic.TMP_SUFFIX}"
    mine.write_bytes(b"live")  # a live writer's temporary is never touched
    assert main(["quantize", str(big_model), str(out)]) == 0
    assert not stale.exists() and mine.exists()


# --- the disk ------------------------------------------------------------------------------------


def test_disk_full_is_one_line(two_models, tmp_path, monkeypatch, capsys):
    a, _ = two_models

    def full(src, dst, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("fq_core.measurement.patch.shutil.copyfile", full)
    status, _, err = run(capsys, "quantize", a, tmp_path / "o.gguf")
    assert status == 2 and "no space left" in err and err.count("\n") == 1
    assert temporaries(tmp_path) == [] and not (tmp_path / "o.gguf").exists()


def test_a_name_too_long_for_the_filesystem_is_one_line(two_models, tmp_path, capsys):
    a, _ = two_models
    status, _, err = run(capsys, "quantize", a, tmp_path / ("x" * 300 + ".gguf"))
    assert status == 2 and "too long" in err and err.count("\n") == 1


# --- publishing is never cut in half -------------------------------------------------------------


def test_published_records_what_this_process_published(tmp_path):
    target = tmp_path / "a.json"
    assert not atomic.published(target)
    atomic.write_text(target, "{}")
    assert atomic.published(target)
    target.unlink()
    target.write_text("someone else's")  # another file at the same name is not ours
    assert not atomic.published(target)


@pytest.fixture
def sigint_raises():
    """Ctrl-C as Python delivers it at a terminal, even when pytest was started from a
    background job (which inherits SIGINT ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_signal_inside_publish_waits_until_it_is_recorded(tmp_path, monkeypatch, sigint_raises):
    target, seen = tmp_path / "out.bin", []
    real_link = os.link

    def link(src, dst, **kwargs):
        real_link(src, dst, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # arrives between the link and the bookkeeping

    monkeypatch.setattr(atomic.os, "link", link)
    atomic.add_publish_listener(seen.append)
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic.write_bytes(target, b"data", force=False)
    finally:
        atomic.remove_publish_listener(seen.append)
    assert target.read_bytes() == b"data" and atomic.published(target) and seen == [target]
    assert temporaries(tmp_path) == []


def test_held_signals_delivers_after_the_block_and_restores_the_handler(sigint_raises):
    before = signal.getsignal(signal.SIGINT)
    order = []
    with pytest.raises(KeyboardInterrupt):
        with atomic.held_signals():
            os.kill(os.getpid(), signal.SIGINT)
            order.append("block finished")
    assert order == ["block finished"] and signal.getsignal(signal.SIGINT) is before
