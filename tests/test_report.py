"""The evidence, read back: a real Test 1 run on both default models, then its HTML report,
charts and markdown reports checked against the results JSON it stored.

The session fixture runs `pytest experiments -k layer0` (real llama.cpp, real models, a few
chunks) into a temporary results directory, exactly as a user would; nothing here is
hand-written JSON.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import uuid
from html.parser import HTMLParser
from pathlib import Path

import pytest

# tests using `real_run` are marked models + llama by fq_pytest.markers; the rest run offline

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("smollm2-135m", "gemma3-270m")
# Few chunks keep the run short; the thresholds stay the documented defaults.
RUN_ARGS = ("--fq-chunks", "2", "--fq-placebo-seeds", "1", "--fq-gen-tokens", "8")


def run_stage_pytest(tmp: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """`pytest experiments -k layer0` as a user runs it, into `tmp`; (process, run dir, html)."""
    run_id = f"report-test-{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, FQ_RESULTS_DIR=str(tmp / "results"), FQ_RUN_ID=run_id,
               FQ_LOG_DIR=str(tmp / "logs"))  # fmt: skip
    env.pop("PYTEST_XDIST_WORKER", None)
    html = tmp / "reports" / "report.html"
    argv = [sys.executable, "-m", "pytest", "experiments", "-k", "layer0", "-p", "no:cacheprovider",
            "-q", *(a for m in MODELS for a in ("--fq-model", m)), *RUN_ARGS,
            f"--html={html}", "--self-contained-html", *extra]  # fmt: skip
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    return proc, tmp / "results" / run_id, html


@pytest.fixture(scope="session")
def real_run(tmp_path_factory):
    """One real Test 1 run per session, shared by this module and the browser test (each
    module that imports this fixture gets its own copy, so the run is kept in basetemp)."""
    from filelock import FileLock

    tmp = tmp_path_factory.getbasetemp() / "fq_report_run"
    tmp.mkdir(exist_ok=True)
    with FileLock(str(tmp) + ".lock"):
        done = tmp / "run.json"
        if done.is_file():
            saved = json.loads(done.read_text())
            proc = subprocess.CompletedProcess(
                saved["argv"], saved["rc"], saved["out"], saved["err"]
            )
            run_dir, html = Path(saved["run_dir"]), Path(saved["html"])
        else:
            proc, run_dir, html = run_stage_pytest(tmp)
            done.write_text(json.dumps({"argv": proc.args, "rc": proc.returncode,
                                        "out": proc.stdout, "err": proc.stderr,
                                        "run_dir": str(run_dir), "html": str(html)}))  # fmt: skip
    files = sorted(run_dir.glob("layer0/*.json"))
    assert len(files) == len(MODELS), (
        f"the stage run stored {len(files)} results (exit {proc.returncode}):\n"
        f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    assert html.is_file(), proc.stdout[-3000:]
    results = {json.loads(f.read_text())["model"]["name"]: json.loads(f.read_text()) for f in files}
    return {"proc": proc, "run_dir": run_dir, "html": html, "results": results, "tmp": tmp}


class _Dom(HTMLParser):
    """Just enough of the report's DOM: elements with their attributes and text, in order."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.elements: list[dict] = []
        self._open: list[dict] = []
        self.title = ""

    def handle_starttag(self, tag, attrs):
        el = {"tag": tag, "attrs": dict(attrs), "text": ""}
        self.elements.append(el)
        if tag not in ("img", "br", "input", "meta", "link"):
            self._open.append(el)

    def handle_endtag(self, tag):
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i]["tag"] == tag:
                del self._open[i:]
                break

    def handle_data(self, data):
        for el in self._open:
            el["text"] += data
        if self._open and self._open[-1]["tag"] == "title":
            self.title += data


def parse(html: str) -> _Dom:
    dom = _Dom()
    dom.feed(html)
    return dom


def json_path(results: dict, key: str):
    stage, model, *path = key.split("/")
    value = results[model]
    assert value["stage"] == stage
    for part in path:
        value = value[part]
    return value


def expected_verdict(result: dict) -> str:
    """GO iff every gating check of Test 1 passed: computed here from the JSON alone."""
    asserted = [c for c in result["checks"].values() if c.get("gates", c.get("asserted", True))]
    if any(c["status"] in ("failed", "error") for c in asserted):
        return "NO-GO"
    return "GO" if asserted and all(c["status"] == "passed" for c in asserted) else "NO DECISION"


def decode_png(data: bytes):
    from PIL import Image

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_report_opens_with_the_right_decision(real_run):
    text = real_run["html"].read_text(encoding="utf-8")
    dom = parse(text)
    blocks = {e["attrs"]["data-model"]: e for e in dom.elements if "fq-decision" in
              e["attrs"].get("class", "").split()}  # fmt: skip
    assert set(blocks) == set(MODELS)
    for model, result in real_run["results"].items():
        verdict = expected_verdict(result)
        assert blocks[model]["attrs"]["data-verdict"] == verdict
        assert blocks[model]["text"].lstrip().startswith(verdict)
        assert f"{model} {verdict}" in dom.title
        failed = [n for n, c in result["checks"].items() if c["status"] in ("failed", "error")]
        for name in failed:  # a NO-GO names the checks that decided it
            assert name in blocks[model]["text"]
    # the summary opens with the decision: nothing of ours comes before it
    summary_at = text.index('<div class="additional-summary prefix">')
    assert text.index('<div class="fq', summary_at) == text.index(
        '<div class="fq fq-decisions">', summary_at
    )


def test_every_number_equals_the_results_json(real_run):
    dom = parse(real_run["html"].read_text(encoding="utf-8"))
    cells = [e for e in dom.elements if "data-key" in e["attrs"]]
    checked = 0
    for cell in cells:
        stored = json_path(real_run["results"], cell["attrs"]["data-key"])
        if "data-value" not in cell["attrs"]:
            assert stored is None, cell
            continue
        assert float(cell["attrs"]["data-value"]) == stored, cell
        shown = re.match(r"\s*([+-]?[\d,]*\.?\d+(?:e[+-]\d+)?)", cell["text"]).group(1)
        shown_value = float(shown.replace(",", ""))
        scale = 100.0 if cell["attrs"]["data-key"].endswith("token_agreement") else 1.0
        decimals = len(shown.split(".")[1].split("e")[0]) if "." in shown else 0
        exponent = int(shown.split("e")[1]) if "e" in shown else 0
        assert abs(shown_value - stored * scale) <= 0.5 * 10 ** (exponent - decimals) + 1e-12, cell
        checked += 1
    keys = {c["attrs"]["data-key"] for c in cells}
    for model in MODELS:
        for key in ("baseline/ppl", "treatment/ppl", "treatment/delta_ppl_pct",
                    "treatment/kld/mean", "numeric/max_rel", "numeric/changed"):  # fmt: skip
            assert f"layer0/{model}/{key}" in keys
    assert checked >= 20


def test_placebo_comparison_in_words(real_run):
    text = real_run["html"].read_text(encoding="utf-8")
    for r in real_run["results"].values():
        if r["numeric"]["changed"] == 0:
            assert "no element changed: the model is identical to the baseline" in text
        else:
            assert r["placebo"]["verdict"] in text  # the stage's own wording, shown as is
        kld = r["placebo"]["kld_mean"]
        assert f"{kld['min']:.5f} … {kld['max']:.5f}" in text


def test_summary_images_decode_and_charts_are_written(real_run):
    text = real_run["html"].read_text(encoding="utf-8")
    dom = parse(text)
    imgs = [e["attrs"] for e in dom.elements if e["tag"] == "img" and "fq-chart" in
            e["attrs"].get("class", "")]  # fmt: skip
    assert imgs
    for attrs in imgs:
        src = attrs["src"]
        assert src.startswith("data:image/png;base64,")
        img = decode_png(base64.b64decode(src.split(",", 1)[1], validate=True))
        assert img.width > 200 and img.height > 100
    charts = sorted((real_run["html"].parent / "charts").glob("*.png"))
    assert {p.stem for p in charts} == {a["data-chart"] for a in imgs}
    for p in charts:
        decode_png(p.read_bytes())


def test_zero_change_model_says_no_element_changed(real_run):
    """SmolLM2's ffn_norm weights are already BF16-exact: no empty plot, a sentence instead."""
    r = real_run["results"]["smollm2-135m"]
    assert r["numeric"]["changed"] == 0
    dom = parse(real_run["html"].read_text(encoding="utf-8"))
    notes = {e["attrs"]["data-chart"]: e["text"] for e in dom.elements
             if "fq-chart-note" in e["attrs"].get("class", "")}  # fmt: skip
    assert "no element changed" in notes["layer0-smollm2-135m-rel-error"]
    assert "no element changed" in notes["layer0-smollm2-135m-per-layer"]
    imgs = {e["attrs"].get("data-chart") for e in dom.elements if e["tag"] == "img"}
    assert "layer0-gemma3-270m-rel-error" in imgs  # Gemma3 changed elements: a real histogram


def _tests_blob(html: str) -> dict:
    dom = parse(html)
    blob = next(e for e in dom.elements if e["attrs"].get("id") == "data-container")
    return json.loads(blob["attrs"]["data-jsonblob"])["tests"]


def test_each_stage_test_carries_its_evidence(real_run):
    tests = _tests_blob(real_run["html"].read_text(encoding="utf-8"))
    seen = set()
    for nodeid, entries in tests.items():
        m = re.search(r"test_(\w+)\[layer0-([\w.-]+)\]", nodeid)
        if not m:
            continue
        check, model = m.groups()
        result = real_run["results"][model]
        extras = entries[-1]["extras"]
        html_extra = next(x["content"] for x in extras if x["format_type"] == "html")
        status = result["checks"][check]["status"]
        assert f'data-check="{check}"' in html_extra
        assert f'fq-status-{status}">{status}</span>' in html_extra
        images = [x for x in extras if x["format_type"] == "image"]
        for x in images:
            decode_png(base64.b64decode(x["content"].split(",", 1)[1]))
        if check == "perplexity":
            assert images, "the perplexity test carries the per-chunk PPL chart"
            ppl_cmds = [c for c in result["commands"]
                        if Path(c["argv"][0]).name == "llama-perplexity"]  # fmt: skip
            assert ppl_cmds
            for c in ppl_cmds:
                assert c["argv"][0] in html_extra
        seen.add((check, model))
    assert {(c, m) for c in ("quantize", "numeric", "perplexity", "kld") for m in MODELS} <= seen


def run_fq(*args: str) -> subprocess.CompletedProcess:
    fq = Path(sys.executable).with_name("fq")
    return subprocess.run([str(fq), *args], capture_output=True, text=True, timeout=300)


def test_markdown_reports_state_the_decision_and_numbers(real_run, tmp_path):
    proc = run_fq("report", str(real_run["run_dir"].parent), str(tmp_path / "md"))
    assert proc.returncode == 0, proc.stderr
    assert "no results for stages 2-4" in proc.stdout
    t1 = (tmp_path / "md" / "test1_results.md").read_text(encoding="utf-8")
    ex = (tmp_path / "md" / "experiment_results.md").read_text(encoding="utf-8")
    for model, r in real_run["results"].items():
        verdict = expected_verdict(r)
        assert f"**{model}: {verdict}**" in t1 and f"**{model}: {verdict}**" in ex
        assert f"{model}: {verdict}" in proc.stdout
        b, t = r["baseline"], r["treatment"]
        assert f"{b['ppl']:.4f} ± {b['ppl_err']:.4f}" in t1
        assert f"{t['ppl']:.4f} ± {t['ppl_err']:.4f}" in t1
        assert f"{t['delta_ppl_pct']:+.2f} %" in t1
        assert f"{t['kld']['mean']:.5f}" in t1 and f"{t['kld']['mean']:.5f}" in ex
        assert r["model"]["sha256"] in t1 and r["corpus"]["sha256"] in t1
    assert "No results for stages 2–4 in this run" in ex
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", t1 + ex)
    assert links
    for link in links:
        decode_png((tmp_path / "md" / link).read_bytes())


def test_fq_report_refuses_missing_or_empty_results(tmp_path):
    proc = run_fq("report", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "results directory not found" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run_fq("report", str(tmp_path / "empty"), str(tmp_path / "out"))
    assert proc.returncode == 2 and "no stage results" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_report_under_xdist_gives_the_same_decisions(real_run, tmp_path):
    """-n 2: the controller builds the summary from the workers' stored results."""
    proc, run_dir, html = run_stage_pytest(tmp_path, "-n", "2")
    assert html.is_file(), proc.stdout[-3000:]
    dom = parse(html.read_text(encoding="utf-8"))
    verdicts = {e["attrs"]["data-model"]: e["attrs"]["data-verdict"] for e in dom.elements
                if "fq-decision" in e["attrs"].get("class", "").split()}  # fmt: skip
    assert verdicts == {m: expected_verdict(r) for m, r in real_run["results"].items()}
    tests = _tests_blob(html.read_text(encoding="utf-8"))
    with_extras = [n for n, e in tests.items() if "layer0" in n and e[-1]["extras"]]
    assert len(with_extras) == len([n for n in tests if "layer0" in n]) > 0


def test_report_without_stage_results_says_so(tmp_path):
    """A session that ran no stage (here: one library test) still writes a valid report."""
    html = tmp_path / "r.html"
    env = dict(os.environ, FQ_RESULTS_DIR=str(tmp_path / "results"))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_report.py", "-k", "refuses_missing", "-q",
         "-p", "no:cacheprovider", f"--html={html}", "--self-contained-html"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:]
    text = html.read_text(encoding="utf-8")
    assert "No experiment stage ran in this session" in text
    assert 'class="fq-decision"' not in text


@pytest.mark.parametrize(
    ("value", "placebo", "words"),
    [
        (0.83, {"min": 0.20, "max": 0.35}, "2.4× the largest placebo"),  # Gemma3 Test 1, 8 chunks
        (0.30, {"min": 0.20, "max": 0.35}, "within engine noise"),
        (-0.30, {"min": 0.20, "max": 0.35}, "within engine noise"),
        (0.62, None, "control not run"),
    ],
)
def test_delta_ppl_in_words(value, placebo, words):
    from fq_core.report.html import delta_vs_placebo

    assert delta_vs_placebo(value, placebo) == words


def test_same_top_in_words():
    from fq_core.report.html import same_top_vs_placebo

    assert same_top_vs_placebo(95.6, {"min": 97.3, "max": 99.0}) == "1.6× the largest placebo drop"
    assert same_top_vs_placebo(98.0, {"min": 97.3, "max": 99.0}) == "within engine noise"
