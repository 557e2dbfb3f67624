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
            "storage/results.py",
            "def _probe():\n"
            "    from ..experiment.sweep.analysis import analyze_dirs\n\n"
            "    return analyze_dirs",
            "fq_core.storage.results -> fq_core.experiment.sweep.analysis",
        ),
        # the bottom layer reaches the CLI
        ("errors.py", "from . import cli  # noqa: E402", "fq_core.errors -> fq_core.cli"),
        # a definition reaches up into measurement, by its absolute name
        (
            "definitions/formats.py",
            "import fq_core.measurement.metrics  # noqa: E402",
            "fq_core.definitions.formats -> fq_core.measurement.metrics",
        ),
        ("platform/atomic.py", "import pytest  # noqa: E402", "fq_core.platform.atomic -> pytest"),
        (
            "report/html.py",
            "from ..measurement import evaluate  # noqa: E402",
            "-> fq_core.measurement.evaluate",
        ),
        # the sweep's analysis runs a cell
        (
            "experiment/sweep/analysis.py",
            "from .run import run_cell  # noqa: E402",
            "fq_core.experiment.sweep.analysis -> fq_core.experiment.sweep.run",
        ),
        (
            "measurement/llama/parse.py",
            "from .. import gguf_index  # noqa: E402",
            "-> fq_core.measurement.gguf_index",
        ),
    ],
)
def test_an_import_against_the_layers_fails(package_copy, module, code, broken):
    _append(package_copy / "fq_core" / module, code)
    run = _lint_imports(package_copy)
    assert run.returncode != 0
    assert " BROKEN" in run.stdout and broken in run.stdout, run.stdout


@pytest.mark.parametrize("newcomer", ["newcomer.py", "newcomer/__init__.py"])
def test_a_module_outside_every_layer_fails(package_copy, newcomer):
    path = package_copy / "fq_core" / newcomer
    path.parent.mkdir(exist_ok=True)
    path.write_text('"""Not placed in a layer yet."""\n')
    run = _lint_imports(package_copy)
    assert run.returncode != 0
    assert "fq_core.newcomer" in run.stdout, run.stdout
