"""The HTML report in a real browser: headless Chromium renders it with no console errors.

pytest-html builds the results table with its own JavaScript, so a report that parses fine
can still show an empty table. Chromium is Debian's `chromium`, which
scripts/bootstrap-system.sh installs (`make` runs it); these tests never install anything and
fail, saying so, when it is missing.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess

import pytest
from test_report import (  # noqa: F401 (real_run: the session fixture)
    MODELS,
    _tests_blob,
    decode_png,
    expected_verdict,
    real_run,
)

pytestmark = [pytest.mark.browser]  # the real_run tests are also models + llama

CONSOLE = re.compile(r":CONSOLE[:(]\d+\)?\]? (.*)")


@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium", path="/usr/bin")
    if path is None:
        pytest.fail(
            "chromium is not installed: run `bash scripts/bootstrap-system.sh` (as root or with "
            "sudo; `make` runs it), or leave these tests out with -m 'not browser'",
            pytrace=False,
        )
    return path


def headless(chromium: str, tmp_path, url: str, *args: str) -> subprocess.CompletedProcess:
    argv = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
        url,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def console_messages(stderr: str) -> list[str]:
    return [m.group(1) for m in map(CONSOLE.search, stderr.splitlines()) if m]


def test_console_capture_sees_errors(chromium, tmp_path):
    """The probe: a page with a script error must be caught, or the real check proves nothing."""
    page = tmp_path / "bad.html"
    page.write_text('<p>x</p><script>console.error("fq-probe"); notDefined();</script>')
    proc = headless(chromium, tmp_path, page.as_uri(), "--dump-dom")
    messages = console_messages(proc.stderr)
    assert any("fq-probe" in m for m in messages), proc.stderr[-2000:]
    assert any("notDefined" in m for m in messages), proc.stderr[-2000:]


def test_report_renders_without_console_errors(chromium, real_run, tmp_path):  # noqa: F811
    html = real_run["html"]
    proc = headless(chromium, tmp_path, html.as_uri(), "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert console_messages(proc.stderr) == []
    dom = proc.stdout
    # pytest-html's JavaScript ran: one rendered row per test, with its outcome class
    rows = re.findall(r'<tbody class="results-table-row (\w+)', dom)
    tests = _tests_blob(html.read_text(encoding="utf-8"))
    assert len(rows) == sum(len(v) for v in tests.values()) > 0
    for model in MODELS:  # one decision per model, from its deployed Test 1
        verdict = expected_verdict(real_run["results"][model])
        assert f'data-model="{model}" data-verdict="{verdict}"' in dom
    assert "fq-chart" in dom


def test_report_screenshot_is_not_blank(chromium, real_run, tmp_path):  # noqa: F811
    shot = tmp_path / "shot.png"
    proc = headless(
        chromium,
        tmp_path,
        real_run["html"].as_uri(),
        "--window-size=1280,2400",
        f"--screenshot={shot}",
    )
    assert shot.is_file(), proc.stderr[-2000:]
    img = decode_png(shot.read_bytes()).convert("L")
    lo, hi = img.getextrema()
    assert hi - lo > 100  # text and charts, not an empty page
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert buf.tell() > 20_000
