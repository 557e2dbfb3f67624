"""Interruptions leave nothing behind (issue 18, item 6): every temporary and scratch file is
removed on SIGINT/SIGTERM, found by `fq doctor` after a kill -9, and removed by the next run
once its owner is gone. Real signals to real processes; the llama.cpp ones interrupt a real
baseline, stage and sweep cell (SmolLM2, ctx 128, 1 chunk) in a private cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fq_core.cli import main
from fq_core.errors import BadInput, OutputRefused
from fq_core.platform import atomic

ROOT = Path(__file__).resolve().parent.parent


def leftovers(*roots: Path) -> list[str]:
    """Every temporary, owner marker or GGUF under ``roots`` (symlinks not followed)."""
    found = []
    for root in roots:
        for d, _, files in os.walk(root):
            for name in files:
                if name.endswith((atomic.TMP_SUFFIX, atomic.OWNER_SUFFIX, ".gguf")):
                    found.append(str(Path(d, name).relative_to(root)))
    return sorted(found)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- atomic.owned: the scratch file a block owns -------------------------------------------------


@pytest.mark.parametrize(
    "ending, keep, kept",
    [
        (None, False, False),
        (None, True, True),
        (BadInput("bad"), True, False),
        (KeyboardInterrupt(), True, False),
    ],
)
def test_an_owned_file_goes_when_its_block_ends(tmp_path, ending, keep, kept):
    path = tmp_path / "sub" / "m.gguf"
    with pytest.raises(type(ending)) if ending else _nothing():
        with atomic.owned(path, keep=keep) as p:
            p.write_bytes(b"GGUF")
            markers = [n.name for n in path.parent.iterdir() if n.name != "m.gguf"]
            assert len(markers) == 1 and markers[0].endswith(atomic.OWNER_SUFFIX)
            assert f".{os.getpid()}." in markers[0]
            assert atomic.stale_temporaries(path.parent) == []  # its owner is alive
            if ending:
                raise ending
    assert path.exists() == kept
    assert [n.name for n in path.parent.iterdir()] == (["m.gguf"] if kept else [])


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_an_owned_file_that_cannot_be_marked_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    for path, why in [
        (tmp_path / "a-file" / "m.gguf", "cannot write"),
        (tmp_path / ("x" * 240 + ".gguf"), "too long for this filesystem"),
    ]:
        with pytest.raises(OutputRefused, match=why):
            with atomic.owned(path):
                pytest.fail("the block ran without its marker")


_HOLDER = """
import sys, time
from fq_core.platform import atomic
with atomic.owned(sys.argv[1]) as p:
    p.write_bytes(b"x" * 1000)
    print("ready", flush=True)
    time.sleep(120)
"""


def _holding(path: Path) -> subprocess.Popen:
    """A real process owning ``path``, once it says so."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "ready\n"
    return proc


def test_kill_9_leftover_is_found_and_removed_but_a_live_owners_file_is_not(tmp_path):
    d = tmp_path / "cells" / "k"
    d.mkdir(parents=True)
    killed = _holding(d / "a.gguf")
    killed.kill()
    killed.wait()
    alive = _holding(d / "b.gguf")
    try:
        stale = atomic.stale_temporaries(d)
        assert [p.name for p in stale][1:] == ["a.gguf"]
        assert stale[0].name.startswith(f".a.gguf.{killed.pid}.")
        assert stale[0].name.endswith(atomic.OWNER_SUFFIX)
        assert atomic.stale_under([tmp_path]) == [p.absolute() for p in stale]
        assert atomic.remove_stale_under([tmp_path]) == [stale[1], stale[0]]  # file, then marker
        marker, model = sorted(os.listdir(d))
        assert model == "b.gguf" and marker.startswith(f".b.gguf.{alive.pid}.")
        assert atomic.stale_temporaries(d) == []
    finally:
        alive.kill()
        alive.wait()


def test_a_name_a_live_process_claimed_again_is_not_removed(tmp_path):
    """A killed owner's marker, but a live process owns that name now: its file stays."""
    d = tmp_path / "placebos" / "k"
    d.mkdir(parents=True)
    (d / f".p.gguf.{dead_pid()}.0123abcd{atomic.OWNER_SUFFIX}").touch()
    alive = _holding(d / "p.gguf")
    try:
        stale = atomic.stale_temporaries(d)
        assert [p.name.endswith(atomic.OWNER_SUFFIX) for p in stale] == [True]  # the marker only
        atomic.remove_stale(d)
        assert (d / "p.gguf").read_bytes() == b"x" * 1000
    finally:
        alive.kill()
        alive.wait()


def test_doctor_names_a_killed_runs_model_under_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FQ_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "results" / "R1" / "layer0" / "models" / "smollm2-135m.gguf"
    killed = _holding(model)
    killed.kill()
    killed.wait()
    main(["doctor"])
    out = capsys.readouterr().out
    assert "[warn] 2 stale temporaries (*.fq-tmp, *.fq-owner and the files they name)" in out
    assert f"       {model}  (1,000 bytes)" in out
    fix = next(line for line in out.splitlines() if "fix: rm -f -- " in line)
    assert str(model) in fix and f".smollm2-135m.gguf.{killed.pid}." in fix


# --- pytest: SIGTERM ends the session like Ctrl-C; the next session clears kill -9 leftovers ------

_TEST_FILE = """
import os, sys, time
from pathlib import Path
from fq_core.platform import atomic

def test_holds_scratch_files():
    d = Path(os.environ["SCRATCH"])
    with atomic.owned(d / "model.gguf") as model:
        model.write_bytes(b"x" * 1000)
        with atomic.temporary_for(d / "logits.kld", force=True) as tmp:
            tmp.write_bytes(b"y" * 1000)
            print("ready", file=sys.__stderr__, flush=True)
            time.sleep(120)

def test_after():
    Path(os.environ["SCRATCH"], "after-ran").touch()
"""


def _pytest(tmp_path: Path, *args: str, **kw) -> subprocess.Popen:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(_TEST_FILE))
    env = dict(
        os.environ,
        SCRATCH=str(tmp_path / "scratch"),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        FQ_RESULTS_DIR=str(tmp_path / "results"),
        PYTHONPATH=str(ROOT),
    )
    argv = [sys.executable, "-m", "pytest", "-p", "fq_pytest.interrupts", "-p", "no:cacheprovider"]
    argv += ["-p", "no:randomly", "--rootdir", str(tmp_path), "-c", str(tmp_path / "pytest.ini")]
    return subprocess.Popen(
        [*argv, *args],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        preexec_fn=_default_sigint,
        **kw,
    )


@pytest.mark.parametrize(
    "sig, workers",
    [(signal.SIGTERM, []), (signal.SIGINT, []), (signal.SIGHUP, []), (signal.SIGTERM, ["-n", "1"])],
)
def test_a_signal_ends_the_pytest_session_and_leaves_nothing(tmp_path, sig, workers):
    """With xdist the signal reaches the controller only (kill PID): it passes it on, or the
    teardown kills the worker outright and its scratch files stay."""
    (tmp_path / "scratch").mkdir()
    proc = _pytest(tmp_path, "-s", *workers, "test_inner.py", stderr=subprocess.PIPE)
    assert proc.stderr.readline() == "ready\n"
    assert sorted(p.name for p in (tmp_path / "scratch").iterdir())[-1] == "model.gguf"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert list((tmp_path / "scratch").iterdir()) == []  # nothing left, and test_after never ran
    if sig != signal.SIGINT:
        assert f"Terminated: terminated by {sig.name}" in out, out


def test_the_next_session_removes_what_a_kill_9_left(tmp_path):
    cache = tmp_path / "cache" / "fq-suite" / "cells" / "k"
    model = tmp_path / "results" / "R1" / "layer0" / "models" / "m.gguf"
    killed = [_holding(cache / "c.gguf"), _holding(model)]
    for proc in killed:
        proc.kill()
        proc.wait()
    tmp = cache / f".cell.json.{dead_pid()}.0123abcd{atomic.TMP_SUFFIX}"
    tmp.write_bytes(b"{")
    old = tmp_path / "cache" / "fq-suite" / "baselines" / "k" / f"logits.kld.tmp{dead_pid()}"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"x")  # what fq left there before it used temporary names
    alive = _holding(cache / "live.gguf")
    try:
        assert len(leftovers(tmp_path / "cache", tmp_path / "results")) == 7 and old.exists()
        proc = _pytest(tmp_path, "--collect-only", "-q", "test_inner.py")
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "fq: removed 6 file(s) left by killed fq processes" in out and not old.exists()
        marker, model = (Path(n).name for n in leftovers(tmp_path / "cache", tmp_path / "results"))
        assert model == "live.gguf" and marker.startswith(f".live.gguf.{alive.pid}.")
    finally:
        alive.kill()
        alive.wait()


# --- real llama.cpp runs interrupted: a baseline (with the stage's model), a sweep cell ----------

FAST = ["--fq-model", "smollm2-135m", "--fq-ctx", "128", "--fq-chunks", "2"]
FAST += ["--fq-gen-tokens", "1", "--fq-placebo-seeds", "1"]


@pytest.fixture
def private(tmp_path):
    """A private cache (only the models linked from the shared one) and results store."""
    from fq_core.measurement.llama.tools import find_tools
    from fq_core.measurement.models import resolve_model
    from fq_core.platform.paths import cache_dir

    tools = find_tools()
    models = resolve_model("smollm2-135m").path.parent.parent
    assert models == cache_dir() / "models"
    (tmp_path / "xdg" / "fq-suite").mkdir(parents=True)
    (tmp_path / "xdg" / "fq-suite" / "models").symlink_to(models)
    env = dict(
        os.environ,
        XDG_CACHE_HOME=str(tmp_path / "xdg"),
        FQ_LLAMA_BIN_DIR=str(tools.bin_dir),
        FQ_RESULTS_DIR=str(tmp_path / "results"),
        FQ_LOG_DIR=str(tmp_path / "logs"),
    )
    return tmp_path, env


def _default_sigint() -> None:
    """In the child: SIGINT as a terminal delivers it. A shell that starts a job in the
    background without job control (`cmd &` in a script, nohup) leaves SIGINT ignored, and a
    Python started so never turns it into KeyboardInterrupt: the Ctrl-C tests would test that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _experiment(env: dict, *args: str) -> subprocess.Popen:
    """The suite's own pytest on the real experiment (reports and plugins as `make` has them,
    but no HTML or benchmark file written into this checkout)."""
    argv = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:randomly"]
    argv += ["-p", "no:cacheprovider", *args]
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=_default_sigint,
    )


def _wait_for(proc: subprocess.Popen, root: Path, pattern: str, timeout_s: float = 300) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
        if proc.poll() is not None:
            pytest.fail(
                f"ended ({proc.returncode}) before {pattern} appeared:\n{proc.stdout.read()}"
            )
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"{pattern} did not appear in {timeout_s} s")


def _wait_for_a_tool(proc: subprocess.Popen, timeout_s: float = 300) -> None:
    """Until `proc` has a child (a llama.cpp tool) and has returned from starting it: a SIGINT
    landing inside the fork runs in Python's at-fork hooks, where it is only 'ignored'."""
    deadline = time.monotonic() + timeout_s
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    while time.monotonic() < deadline and proc.poll() is None:
        if children.is_file() and children.read_text().split():
            time.sleep(0.3)
            return
        time.sleep(0.02)
    pytest.fail(f"no llama.cpp tool started (exit {proc.returncode})")


@pytest.mark.llama
@pytest.mark.models
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_during_a_baseline_leaves_nothing_behind(private, sig):
    """The attack: SIGTERM while llama-perplexity writes the baseline's KLD logits left them
    (logits.kld.tmp<PID>) in the cache and the stage's GGUF under results/…/models/; a kill -9
    left them for good, and `fq doctor` said all good."""
    tmp_path, env = private
    cache, res = tmp_path / "xdg" / "fq-suite", tmp_path / "results"
    proc = _experiment(env, "experiments/test_stages.py", "-k", "layer0 and not twin", *FAST)
    logits = _wait_for(proc, cache, f"baselines/*/.logits.kld.*{atomic.TMP_SUFFIX}")
    model = _wait_for(proc, res, "*/layer0/models/smollm2-135m.gguf", 5)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        left = {Path(p).name for p in leftovers(cache, res)}
        assert {logits.name, model.name} <= left and len(left) == 3, left  # + model's marker
        doctor = subprocess.run(
            [sys.executable, "-m", "fq_core.cli", "doctor"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "[warn] 3 stale temporaries" in doctor.stdout, doctor.stdout
        assert f"       {logits}  (" in doctor.stdout and f"       {model}  (" in doctor.stdout
        proc = _experiment(env, "experiments/test_stages.py", "--collect-only", *FAST)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert "fq: removed 3 file(s) left by killed fq processes" in out, out
    else:
        assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
        assert "Terminated: terminated by SIGTERM" in out and "Traceback" not in out, out
    assert leftovers(cache, res) == []
    assert not list(cache.glob("baselines/*/logits.kld"))  # nothing half-written was published


@pytest.mark.llama
@pytest.mark.models
def test_ctrl_c_during_a_sweep_cell_leaves_nothing_behind(private):
    """The attack: SIGINT while a cell's fake-quantized GGUF is evaluated left it (253 MB for
    Gemma3) in the cache's cells/<key>/. (SIGTERM takes the same way out: see above.)"""
    tmp_path, env = private
    cache, res = tmp_path / "xdg" / "fq-suite", tmp_path / "results"
    sweep = ["--fq-sweep-plan", "full", "--fq-sweep-models", "smollm2-135m"]
    sweep += ["--fq-sweep-kinds", "ffn_norm", "--fq-sweep-formats", "fp8_e4m3"]
    sweep += ["--fq-sweep-layers", "0", "--fq-sweep-variants", "deployed"]
    sweep += ["--fq-sweep-cumulative", "off", "--fq-sweep-chunks", "2"]
    proc = _experiment(env, "experiments/test_sensitivity.py", *FAST, *sweep)
    cell = _wait_for(proc, cache, "cells/*/smollm2-135m.*.gguf")
    _wait_for_a_tool(proc)  # while the GGUF is evaluated, not inside the fork that starts it
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "KeyboardInterrupt" in out and "Traceback" not in out, out
    assert not cell.exists() and leftovers(cache, res) == []
    assert not list(cache.glob("cells/*/cell.json"))  # the interrupted cell was not cached
