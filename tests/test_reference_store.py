"""The reference store and the places fq writes to, attacked (issue 18, items 1 and 7).

Never deleting what fq-suite did not write: `fq reference save` replaces a directory only when
it holds a reference fq-suite wrote and nothing else, never the results store. Every bad
output place — read-only, full, a file where a directory must be, a mount point — is one line
and exit 2, with nothing left behind. The read-only and full file systems are real: a tmpfs
mounted in a user + mount namespace (`unshare`), so no root and no stand-in for the kernel;
where unprivileged namespaces are off, those tests skip with the reason.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_regression import rec

from fq_core.cli import main
from fq_core.errors import OutputRefused
from fq_core.storage import history, results


def _store(tmp_path: Path, *run_ids: str) -> Path:
    root = tmp_path / "results"
    for run_id in run_ids:
        results.save_result(rec(run_id), root)  # a measured record
    return root


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes: what must come out of a refusal unchanged."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


# --- never delete what the suite did not write --------------------------------------------------


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_a_directory_holding_other_files_is_never_replaced(tmp_path, capsys, force):
    """Attack: `fq reference save RUN DIR --force` deleted everything in DIR."""
    root = _store(tmp_path, "R1")
    dest = tmp_path / "notes"
    dest.mkdir()
    (dest / "important.txt").write_text("keep me")
    before = _tree(tmp_path)
    status, out, err = _cli(
        capsys,
        "reference",
        "save",
        "R1",
        str(dest),
        "--results",
        str(root),
        *(["--force"] if force else []),
    )
    assert (status, out) == (2, "")
    assert err == (
        f"fq reference: error: {dest} holds files fq-suite did not write "
        "(important.txt); refusing to replace it, --force or not: choose a new or "
        "empty directory\n"
    )
    assert _tree(tmp_path) == before


def test_the_results_store_is_never_a_reference_directory(tmp_path, capsys, monkeypatch):
    """Attack: DIR = the results store deleted every run and gate.json."""
    root = _store(tmp_path, "R1", "R2")
    (root / "gate.json").write_text('{"schema": 1, "entries": {}}')
    before = _tree(tmp_path)
    refusals = {
        root: f"{root} is the results store; save the reference elsewhere",
        tmp_path: f"{tmp_path} holds the results store {root.resolve()}; refusing",
        root / "R2": f"{root / 'R2'} is inside the results store {root.resolve()}",
        root / "new": f"{root / 'new'} is inside the results store",
    }
    for dest, words in refusals.items():
        status, out, err = _cli(
            capsys, "reference", "save", "R1", str(dest), "--force", "--results", str(root)
        )
        assert (status, out) == (2, "") and len(err.splitlines()) == 1
        assert err.startswith(f"fq reference: error: {words}")
    monkeypatch.chdir(tmp_path)  # the default store, through FQ_RESULTS_DIR
    monkeypatch.setenv("FQ_RESULTS_DIR", "results")
    status, _, err = _cli(capsys, "reference", "save", "R1", "results", "--force")
    assert status == 2 and "results is the results store" in err
    assert _tree(tmp_path) == before


def test_a_reference_is_replaced_only_while_it_holds_nothing_else(tmp_path, capsys):
    root = _store(tmp_path, "R1", "R2")
    dest = tmp_path / "fq-reference"
    history.save_reference(history.resolve("R1", root), dest)
    (dest / "layer0" / "notes.md").write_text("mine")
    before = _tree(tmp_path)
    status, _, err = _cli(
        capsys, "reference", "save", "R2", str(dest), "--force", "--results", str(root)
    )
    assert status == 2 and "did not write (layer0/notes.md)" in err
    assert _tree(tmp_path) == before
    (dest / "layer0" / "notes.md").unlink()
    status, _, err = _cli(capsys, "reference", "save", "R2", str(dest), "--results", str(root))
    assert status == 2 and err.endswith(
        f"{dest} holds the reference of run R1; pass --force to replace it\n"
    )
    status, out, _ = _cli(
        capsys, "reference", "save", "R2", str(dest), "--force", "--results", str(root)
    )
    assert status == 0 and history.open_directory(dest).run_id == "R2"
    # nothing moved aside or half built is left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fq-reference", "results"]


def test_a_reference_with_a_foreign_manifest_or_a_link_is_not_replaced(tmp_path):
    root = _store(tmp_path, "R1", "R2")
    dest = tmp_path / "fq-reference"
    history.save_reference(history.resolve("R1", root), dest)
    manifest = json.loads((dest / "reference.json").read_text())
    (dest / "reference.json").write_text(json.dumps(dict(manifest, schema=99)))
    with pytest.raises(OutputRefused, match=r"did not write \(layer0/, reference.json\)"):
        history.save_reference(history.resolve("R2", root), dest, force=True)
    link = tmp_path / "link"
    link.symlink_to(dest)
    with pytest.raises(OutputRefused, match="is a symbolic link"):
        history.save_reference(history.resolve("R2", root), link, force=True)
    assert json.loads((dest / "reference.json").read_text())["schema"] == 99


@pytest.mark.parametrize("schema", [0, 99])
def test_an_unknown_reference_schema_is_refused_by_name(tmp_path, capsys, schema):
    """Attack: reference.json of schema 0 or 99 was read as if it were schema 1."""
    root = _store(tmp_path, "R1")
    dest = tmp_path / "fq-reference"
    history.save_reference(history.resolve("R1", root), dest)
    manifest = json.loads((dest / "reference.json").read_text())
    (dest / "reference.json").write_text(json.dumps(dict(manifest, schema=schema)))
    status, out, err = _cli(capsys, "diff", str(dest), "R1", "--results", str(root))
    assert (status, out) == (2, "")
    assert err.startswith(
        f"fq diff: error: {dest / 'reference.json'}: unknown reference schema {schema} (fq-suite "
    )
    assert err.endswith("reads schema 1)\n")


# --- one line, exit 2, for every bad output place -------------------------------------------------


def test_a_file_where_a_directory_must_be(tmp_path, capsys, monkeypatch):
    """Attack: NotADirectoryError tracebacks (FQ_RESULTS_DIR = a file, DIR under a file)."""
    root = _store(tmp_path, "R1")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    status, _, err = _cli(
        capsys, "reference", "save", "R1", str(blocker / "ref"), "--results", str(root)
    )
    assert (status, err) == (
        2,
        f"fq reference: error: reference directory {blocker / 'ref'} "
        f"cannot be made: {blocker} is not a directory\n",
    )
    status, _, err = _cli(capsys, "reference", "save", "R1", str(blocker), "--results", str(root))
    assert (status, err) == (
        2,
        f"fq reference: error: reference directory {blocker} is not a directory\n",
    )
    status, _, err = _cli(capsys, "report", str(root / "R1"), str(blocker / "out"))
    assert (status, err) == (
        2,
        f"fq report: error: output directory {blocker / 'out'} cannot "
        f"be made: {blocker} is not a directory\n",
    )
    monkeypatch.setenv("FQ_RESULTS_DIR", str(blocker))
    for argv in (("reference", "save"), ("diff", "latest", "latest")):
        status, out, err = _cli(capsys, *argv)
        assert (status, out) == (2, "")
        assert err == f"fq {argv[0]}: error: FQ_RESULTS_DIR={blocker} is not a directory\n"
    assert blocker.read_text() == "not a directory"


@functools.cache
def _namespaces() -> str | None:
    """None when a tmpfs can be mounted in a user + mount namespace, else why not."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "no unshare(1) on this machine"
    probe = subprocess.run(
        [
            unshare,
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            "mount -t tmpfs -o size=4k tmpfs /mnt 2>&1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a user namespace: {(probe.stdout + probe.stderr).strip()}"
    return None


FQ = (sys.executable, "-m", "fq_core.cli")


def _fq_on_tmpfs(tmp_path: Path, options: str, *argv: str, command=FQ, env=None):
    """`fq ARGV` while tmp_path/mnt is a tmpfs mounted with `options` (ro, size=4k, ...);
    what fq left in the tmpfs is listed in tmp_path/left before the namespace goes away."""
    why = _namespaces()
    if why is not None:
        pytest.skip(why)
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    left = tmp_path / "left"
    script = (
        f'mount -t tmpfs -o {options} tmpfs "{mnt}" || exit 99; "$@"; s=$?; '
        f'ls -A "{mnt}" > "{left}"; exit $s'
    )
    p = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            script,
            "sh",
            *command,
            *argv,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env=env,
    )
    assert p.returncode != 99, p.stderr
    assert left.read_text() == "", f"left in the tmpfs: {left.read_text()}"
    left.unlink()
    return p


def _one_line(p: subprocess.CompletedProcess, expected: str) -> None:
    assert (p.returncode, p.stdout, p.stderr) == (2, "", expected + "\n")


def test_read_only_targets(tmp_path):
    """Attack: EROFS tracebacks from `fq reference save` and `fq report`."""
    root = _store(tmp_path, "R1")
    mnt = tmp_path / "mnt"
    read_only = f"{mnt} is on a read-only file system"
    p = _fq_on_tmpfs(
        tmp_path, "ro", "reference", "save", "R1", str(mnt / "ref"), "--results", str(root)
    )
    _one_line(
        p, f"fq reference: error: reference directory {mnt / 'ref'} cannot be written: " + read_only
    )
    p = _fq_on_tmpfs(
        tmp_path, "ro", "reference", "save", "R1", str(mnt), "--force", "--results", str(root)
    )
    _one_line(p, f"fq reference: error: reference directory {mnt} cannot be written: " + read_only)
    p = _fq_on_tmpfs(tmp_path, "ro", "report", str(root / "R1"), str(mnt / "out"))
    _one_line(
        p, f"fq report: error: output directory {mnt / 'out'} cannot be written: " + read_only
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt", "results"]


def test_full_targets_leave_nothing_behind(tmp_path):
    """Attack: ENOSPC tracebacks; a reference or report half written on a full disk."""
    root = _store(tmp_path, "R1")
    mnt = tmp_path / "mnt"
    p = _fq_on_tmpfs(
        tmp_path, "size=4k", "reference", "save", "R1", str(mnt / "ref"), "--results", str(root)
    )
    _one_line(p, f"fq reference: error: no space left on the device while writing {mnt / 'ref'}")
    p = _fq_on_tmpfs(tmp_path, "size=4k", "report", str(root / "R1"), str(mnt / "out"))
    _one_line(p, f"fq report: error: no space left on the device while writing {mnt / 'out'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt", "results"]


def test_a_mount_point_is_not_renamed_away(tmp_path):
    """Attack: EBUSY traceback when DIR is a mount point."""
    root = _store(tmp_path, "R1")
    mnt = tmp_path / "mnt"
    p = _fq_on_tmpfs(
        tmp_path, "size=1m", "reference", "save", "R1", str(mnt), "--results", str(root)
    )
    _one_line(p, f"fq reference: error: cannot replace {mnt}: it is busy (a mount point?)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt", "results"]


def test_a_read_only_results_store_stops_pytest_before_it_runs(tmp_path, monkeypatch):
    """FQ_RESULTS_DIR on a read-only file system: one line from pytest, nothing run."""
    from test_regression import CONFTEST, TEST

    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_inner.py").write_text(TEST)
    store = tmp_path / "mnt" / "results"
    env = dict(os.environ, FQ_RESULTS_DIR=str(store), FQ_LOG_DIR=str(tmp_path / "logs"))
    p = _fq_on_tmpfs(
        tmp_path,
        "ro",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        command=(sys.executable, "-m", "pytest"),
        env=env,
    )
    assert p.returncode == pytest.ExitCode.USAGE_ERROR
    first = p.stderr.splitlines()[0]
    assert first == (
        f"ERROR: results store {store} cannot be written: {store.parent} is on a "
        "read-only file system"
    )
