"""The HTML report in a real browser: headless Chromium renders it with no console errors.

pytest-html builds the results table with its own JavaScript, so a report that parses fine
can still show an empty table. Chromium is Debian's `chromium`, which
scripts/bootstrap-system.sh installs (`make` runs it); these tests never install anything and
fail, saying so, when it is missing. The plan's Chinese prompt must draw as glyphs, not tofu
boxes: the bootstrap installs a CJK font and the report's style names it.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from types import SimpleNamespace

import pytest
from test_report import (  # noqa: F401 (real_run: the session fixture)
    MODELS,
    _tests_blob,
    decode_png,
    expected_verdict,
    real_run,
)

from fq_core.measurement.evaluate import DEFAULT_PROMPTS
from fq_core.report import html as report_html
from fq_core.report.render import macros
from fq_core.report.rows import GenerationRow

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


# --- tofu: the plan's Chinese prompt and output drawn with real glyphs ----------------------

CHINESE = next(p.text for p in DEFAULT_PROMPTS if re.search(r"[\u4e00-\u9fff]", p.text))
# What a model answers, simplified (the prompt is traditional): both scripts must draw.
ANSWER = "我是一个人工智能助手，很高兴为您服务。"
PYTEST_HTML_BODY = "body{font-family:Helvetica,Arial,sans-serif}"  # pytest-html's style.css

# Each Han character is drawn on a canvas in the cell's computed font and compared with a
# codepoint no font has (U+10FFFD, private use): a character drawn identically is a tofu box.
TOFU_JS = r"""<script>
function ink(font, ch) {
  const c = document.createElement("canvas"); c.width = 64; c.height = 64;
  const g = c.getContext("2d"); g.font = "48px " + font; g.textBaseline = "top";
  g.fillText(ch, 4, 4); return c.toDataURL();
}
const cells = [...document.querySelectorAll(".fq-generations td")];
const font = getComputedStyle(cells[0]).fontFamily;
const missing = ink(font, "\u{10FFFD}");
const text = cells.map(td => td.textContent).join("");
const han = [...new Set(text)].filter(ch => /\p{Script=Han}/u.test(ch));
document.body.dataset.font = font;
document.body.dataset.han = han.length;
document.body.dataset.tofu = han.filter(ch => ink(font, ch) === missing).join("");
</script>"""


def tofu_page(tmp_path):
    """The report's style and generations table (its real macro) on pytest-html's body font."""
    view = SimpleNamespace(generations=(GenerationRow(f"{CHINESE} (chat)", ANSWER, ANSWER),))
    body = str(report_html.style()) + str(macros(report_html.TEMPLATE).generations_table(view))
    page = tmp_path / "tofu.html"
    page.write_text(
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><style>{PYTEST_HTML_BODY}</style>'
        f"</head><body>{body}{TOFU_JS}</body></html>",
        encoding="utf-8",
    )
    return page


def rendered(chromium, tmp_path, env=None) -> dict[str, str]:
    argv = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    argv += [f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", tofu_page(tmp_path).as_uri()]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, proc.stderr[-2000:]
    return dict(re.findall(r'data-(\w+)="([^"]*)"', body.group(1)))


def test_tofu_probe_sees_missing_glyphs(chromium, tmp_path):
    """The probe: with only DejaVu (no Han glyphs) every Chinese character must count as tofu."""
    conf = tmp_path / "fonts.conf"
    conf.write_text(
        "<?xml version='1.0'?><fontconfig><dir>/usr/share/fonts/truetype/dejavu</dir>"
        f"<cachedir>{tmp_path / 'fc-cache'}</cachedir></fontconfig>"
    )
    got = rendered(chromium, tmp_path, env={**os.environ, "FONTCONFIG_FILE": str(conf)})
    assert int(got["han"]) > 10
    assert len(got["tofu"]) == int(got["han"]), got


def test_report_draws_chinese_without_tofu(chromium, tmp_path):
    """The plan's Chinese prompt and a Chinese answer draw as glyphs in the report's font stack.

    Fails on a machine without a CJK font: `bash scripts/bootstrap-system.sh` installs one.
    """
    fc = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True)
    installed = fc.stdout.strip()
    assert installed, "no font covers Chinese (fc-list :lang=zh): run scripts/bootstrap-system.sh"
    got = rendered(chromium, tmp_path)
    assert int(got["han"]) > 10
    assert got["tofu"] == "", f"tofu for {got['tofu']!r} in font {got['font']}"
    # the page names a font that is installed here and covers Chinese
    named = [f.strip().strip('"') for f in got["font"].replace("&quot;", '"').split(",")]
    assert any(n in installed for n in named if n != "sans-serif"), (named, installed)
