"""The layers of fq_core, as pyproject.toml's import-linter contracts write them down.

`lint-imports` reads module-level and function-level imports alike, so a late import that
reaches a higher layer fails CI the same as one at the top. The copies below prove the
contracts can fail: each adds one import against them to a copy of the package.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    assert exe.is_file(), f"{exe}: import-linter is missing (pip install -e '.[test]')"
    # lint-imports puts its working directory first on sys.path: a copy there is the one read
    return subprocess.run(
        [str(exe), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_the_package_keeps_its_layers():
    run = _lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout and "layers" in run.stdout


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    for pkg in ("fq_core", "fq_pytest"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def _append(path: Path, code: str) -> None:
    path.write_text(path.read_text() + "\n\n" + code + "\n")


@pytest.mark.parametrize(
    ("module", "code", "broken"),
    [
        # the store reaches up into the sweep, late (inside a function)
        (
            "results.py",
            "def _probe():\n    from .sweep import analyze_dirs\n\n    return analyze_dirs",
            "fq_core.results -> fq_core.sweep",
        ),
        # the bottom layer reaches the CLI
        ("errors.py", "from . import cli  # noqa: E402", "fq_core.errors -> fq_core.cli"),
        ("atomic.py", "import pytest  # noqa: E402", "fq_core.atomic -> pytest"),
        ("report/html.py", "from .. import evaluate  # noqa: E402", "-> fq_core.evaluate"),
        ("llama/parse.py", "from .. import gguf_index  # noqa: E402", "-> fq_core.gguf_index"),
    ],
)
def test_an_import_against_the_layers_fails(package_copy, module, code, broken):
    _append(package_copy / "fq_core" / module, code)
    run = _lint_imports(package_copy)
    assert run.returncode != 0
    assert " BROKEN" in run.stdout and broken in run.stdout, run.stdout


def test_a_module_outside_every_layer_fails(package_copy):
    (package_copy / "fq_core" / "newcomer.py").write_text('"""Not placed in a layer yet."""\n')
    run = _lint_imports(package_copy)
    assert run.returncode != 0
    assert "fq_core.newcomer" in run.stdout, run.stdout
