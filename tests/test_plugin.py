"""The installed pytest plugin (entry point `fq_pytest`): the stage tests run from a directory
outside the checkout, options known before pytest picks a rootdir (`--fq-model PATH` with a
space), markers registered, and each model's id printed with its path and SHA-256.

These runs stop at collection (or at a usage error): no llama.cpp, no model, no network.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gguf_factory import build_gguf

from fq_core.cli import GATE_COMMAND
from fq_core.experiment.checks import CHECKS
from fq_core.measurement.corpus import resolve_corpus

ROOT = Path(__file__).resolve().parents[1]
PYTEST = str(Path(sys.executable).with_name("pytest"))


def _run(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The venv's pytest, as `fq setup` tells a user to run it (GATE_COMMAND), in `cwd`."""
    argv = [PYTEST, *shlex.split(GATE_COMMAND)[1:], "-p", "no:randomly", "--strict-markers"]
    full_env = {**os.environ, "XDG_CACHE_HOME": str(cwd / "xdg"), **(env or {})}
    full_env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(
        [*argv, *args], cwd=cwd, env=full_env, text=True, capture_output=True, timeout=120
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_gate_collects_from_another_repository_with_the_space_form(tmp_path):
    user = tmp_path / "their-repo"
    user.mkdir()
    (user / "pyproject.toml").write_text('[project]\nname = "theirs"\n')
    a = build_gguf(tmp_path / "models-a", "gemma-3-270m-q4_k_m.gguf", seed=1).path
    b = build_gguf(tmp_path / "models-b", "gemma-3-270m-q4_k_m.gguf", seed=2).path
    proc = _run(user, "--collect-only", "--fq-model", str(a), "--fq-model", str(b))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"rootdir: {user}" in out  # not the models' folder: the option took its value
    ids = {line.split("[", 1)[1].rstrip("]>") for line in out.splitlines() if "[layer0-" in line}
    stems = {f"gemma-3-270m-q4_k_m-{_sha256(p)[:8]}" for p in (a, b)}
    assert {f"layer0-{s}{v}" for s in stems for v in ("", "-twin")} == ids, out
    for path in (a, b):  # each id with its path and hash, before any test runs
        stem = f"gemma-3-270m-q4_k_m-{_sha256(path)[:8]}"
        assert f"fq: model {stem} = {path} (sha256 {_sha256(path)})" in out
    assert "PytestUnknownMarkWarning" not in out and "Unknown pytest.mark" not in out
    assert not (user / "results").exists() and not (ROOT / "tmp").exists()


def test_not_twin_keeps_every_deployed_test(tmp_path):
    """`-k "not twin"` selects the deployed answer, and only it."""
    model = build_gguf(tmp_path, "mine.gguf").path
    proc = _run(
        tmp_path, "--collect-only", "-q", "--fq-model", str(model), "-k", "layer0 and not twin"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    per_stage = len(CHECKS) + 1  # a test per check, and test_regression
    assert len(ids) == per_stage and all(i.endswith("[layer0-mine]") for i in ids), proc.stdout


def test_bad_model_is_one_usage_line_from_anywhere(tmp_path):
    twin_named = build_gguf(tmp_path, "mine-twin.gguf").path
    for given, says in [
        (str(twin_named), "contains 'twin'"),
        (str(tmp_path / "missing.gguf"), "model file not found"),
    ]:
        proc = _run(tmp_path, "--collect-only", "--fq-model", given)
        errors = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 4 and len(errors) == 1 and says in errors[0], proc.stderr


def test_space_form_in_the_checkout_keeps_its_rootdir_and_ini(tmp_path):
    """pytest picks the rootdir before any plugin loads, from the model's path taken for a test
    path; fq_pytest.rootdir decides it again once --fq-model is known: the checkout's pytest.ini
    (testpaths, pythonpath) holds and results/ is not written beside the model."""
    model = build_gguf(tmp_path / "models", "mine.gguf").path
    argv = [PYTEST, "--collect-only", "-q", "-o", "addopts=", "-p", "no:cacheprovider"]
    argv += ["-k", "layer0 and quantize", "--fq-model", str(model)]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    env.pop("FQ_RESULTS_DIR", None)
    proc = subprocess.run(argv, cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    # ids relative to the checkout, from its testpaths (not fq_pytest/stages): its pytest.ini
    assert ids == [
        f"experiments/test_stages.py::test_quantize[layer0-mine{v}]" for v in ("", "-twin")
    ]
    assert not (model.parent / "results").exists() and not (model.parent / "logs").exists()


def test_checkout_without_the_entry_point_loads_the_plugin_once(tmp_path):
    """The checkout's conftest names the plugin too: with the entry point loaded pytest skips
    it (no duplicate registration), without it (autoload off) the conftest loads it; the ids
    of `make gate` (experiments/test_stages.py::…) are the same either way."""
    argv = [PYTEST, "experiments/test_stages.py", "--collect-only", "-q", "-o", "addopts="]
    argv += ["-p", "no:cacheprovider", "-k", "layer0 and quantize"]
    runs = [
        subprocess.run(
            argv,
            cwd=ROOT,
            env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg"), **extra},
            text=True,
            capture_output=True,
            timeout=120,
        )
        for extra in ({}, {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    ]
    for proc in runs:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = [[line for line in p.stdout.splitlines() if "::" in line] for p in runs]
    assert (
        ids[0]
        == ids[1]
        == [
            f"experiments/test_stages.py::test_quantize[layer0-{m}{v}]"
            for m in ("smollm2-135m", "gemma3-270m")
            for v in ("", "-twin")
        ]
    )


@pytest.mark.network  # the venv is built from the lock (uv's cache, else the index)
@pytest.mark.llama
def test_installed_copy_gates_a_local_model_from_another_repository(tmp_path, gemma3_gguf):
    """The issue's "done when": a fresh venv outside the checkout with fq-suite installed as a
    copy (not editable), the documented command with `--fq-model PATH` (space form) in another
    repository, the gate decided and its report at the path printed."""
    venv = tmp_path / "venv"
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "python-env.sh"), "install", str(venv)],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        check=True,
        timeout=600,
    )
    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import fq_core, fq_pytest; print(fq_pytest.__file__)"],
        cwd=tmp_path,
        text=True,
        capture_output=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the installed copy, not this checkout
    model = tmp_path / "models" / "mine.gguf"  # a local GGUF, from a path of the user's
    model.parent.mkdir()
    shutil.copyfile(gemma3_gguf, model)
    user = tmp_path / "their-repo"
    user.mkdir()
    (user / "pyproject.toml").write_text('[project]\nname = "theirs"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "FQ_RESULTS_DIR")}
    env["FQ_TEXT"] = str(resolve_corpus(download=False, checkout=ROOT).path)
    argv = [str(venv / "bin" / "pytest"), *shlex.split(GATE_COMMAND)[1:], "-p", "no:randomly"]
    proc = subprocess.run(
        [*argv, "--fq-model", str(model)],
        cwd=user,
        env=env,
        text=True,
        capture_output=True,
        timeout=1800,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"fq: model mine = {model} (sha256 {_sha256(model)})" in out
    printed = re.search(r"^fq: report (\S+)$", proc.stdout, re.M)
    assert printed, out
    report = Path(printed.group(1))
    assert report.is_file() and report.is_relative_to(user / "results"), out
    page = report.read_text(encoding="utf-8")
    assert "mine GO" in page and "passed" in page, out
