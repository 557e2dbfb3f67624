"""The evidence, read back: a real Test 1 run on both default models, then its HTML report,
charts and markdown reports checked against the results JSON it stored.

The session fixture runs `pytest experiments -k layer0` (real llama.cpp, real models, the
default settings) into a temporary results directory, exactly as a user would; nothing there is
hand-written JSON. The stored records are read back typed (fq_core.storage.record) and every number
the HTML shows is compared with the field its data-key names, by attribute.

The fast tests further down need no llama.cpp: they render records built by
tests/record_factory.py, and feed `fq report` results files broken by hand.
"""

from __future__ import annotations

import base64
import html as html_lib
import io
import json
import math
import os
import re
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterable
from html.parser import HTMLParser
from pathlib import Path

import pytest
from record_factory import make_record

from fq_core.definitions import settings
from fq_core.figures import figure
from fq_core.report.rows import TONES as TONE
from fq_core.storage import record, results
from fq_core.storage.record import PlaceboComparison, StageRecord, Standing, Versus
from fq_pytest.report import commands_for

# tests using `real_run` are marked models + llama by fq_pytest.markers; the rest run offline

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("smollm2-135m", "gemma3-270m")
# The documented defaults, all of them (gen_tokens too: it is in the baseline's and the
# treatment's key): the run measures exactly what experiments/test_stages.py's layer0 cases and
# the regression proofs' reference measure, so in `make test` whichever runs first computes the
# baselines, treatments and placebos (one shared cache) and the others read them.
RUN_ARGS: tuple[str, ...] = ()


def run_stage_pytest(tmp: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """`pytest experiments -k layer0` as a user runs it, into `tmp`; (process, run dir, html)."""
    run_id = f"report-test-{uuid.uuid4().hex[:6]}"
    env = dict(
        os.environ,
        FQ_RESULTS_DIR=str(tmp / "results"),
        FQ_RUN_ID=run_id,
        FQ_LOG_DIR=str(tmp / "logs"),
    )
    env.pop("PYTEST_XDIST_WORKER", None)
    html = tmp / "reports" / "report.html"
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "experiments",
        "-k",
        "layer0",
        "-p",
        "no:cacheprovider",
        "-q",
        *(a for m in MODELS for a in ("--fq-model", m)),
        *RUN_ARGS,
        f"--html={html}",
        "--self-contained-html",
        *extra,
    ]
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
            done.write_text(
                json.dumps(
                    {
                        "argv": proc.args,
                        "rc": proc.returncode,
                        "out": proc.stdout,
                        "err": proc.stderr,
                        "run_dir": str(run_dir),
                        "html": str(html),
                    }
                )
            )
    files = sorted(run_dir.glob("layer0/*.json"))
    assert len(files) == 2 * len(MODELS), (  # as deployed and intrinsic (-twin)
        f"the stage run stored {len(files)} results (exit {proc.returncode}):\n"
        f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    assert html.is_file(), proc.stdout[-3000:]
    results = {rec.case: rec for rec in map(record.read, files)}
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


def json_path(records: Iterable[StageRecord], key: str):
    """The field a data-key names ("<stage>/<model>/treatment/kld/mean"), read by attribute."""
    stage, model, *path = key.split("/")
    (value,) = [r for r in records if r.stage == stage and r.case == model]
    full = record.from_builtins(full_record())  # every section present
    for part in path:
        full = getattr(full, part)  # a key naming no field is an AttributeError...
        if value is None:
            continue  # ...even under a section the stage never reached
        value = getattr(value, part)
    return value


def expected_verdict(result: StageRecord) -> str:
    """GO iff every gating check of Test 1 passed: computed here from the record alone."""
    asserted = [c for c in result.checks.values() if c.gates]
    if any(c.status in ("failed", "error") for c in asserted):
        return "NO-GO"
    return "GO" if asserted and all(c.status == "passed" for c in asserted) else "NO DECISION"


def decode_png(data: bytes):
    from PIL import Image

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_report_opens_with_the_right_decision(real_run):
    text = real_run["html"].read_text(encoding="utf-8")
    dom = parse(text)
    blocks = {
        e["attrs"]["data-model"]: e
        for e in dom.elements
        if "fq-decision" in e["attrs"].get("class", "").split()
    }
    assert set(blocks) == set(MODELS)  # one decision per model: the deployed Test 1's
    for model in MODELS:
        result = real_run["results"][model]
        verdict = expected_verdict(result)
        assert blocks[model]["attrs"]["data-verdict"] == verdict
        assert blocks[model]["text"].lstrip().startswith(verdict)
        assert f"{model} {verdict}" in dom.title
        failed = [n for n, c in result.checks.items() if c.status in ("failed", "error")]
        for name in failed:  # a NO-GO names the checks that decided it
            assert name in blocks[model]["text"]
    # the summary opens with the decision: nothing of ours comes before it
    summary_at = text.index('<div class="additional-summary prefix">')
    assert text.index('<div class="fq', summary_at) == text.index(
        '<div class="fq fq-decisions">', summary_at
    )


def check_number_cells(html: str, records: Iterable[StageRecord]) -> set[str]:
    """Every data-key cell against the record: data-value is the stored number exactly, the
    text is it rounded, and a cell without data-value is a field the record holds as None
    (shown as "—"). Returns the keys seen."""
    cells = [e for e in parse(html).elements if "data-key" in e["attrs"]]
    assert cells
    for cell in cells:
        stored = json_path(records, cell["attrs"]["data-key"])
        if "data-value" not in cell["attrs"]:
            assert stored is None and cell["text"].strip() == "—", cell
            continue
        assert float(cell["attrs"]["data-value"]) == stored, cell
        shown = re.match(r"\s*([+-]?[\d,]*\.?\d+(?:e[+-]\d+)?)", cell["text"]).group(1)
        shown_value = float(shown.replace(",", ""))
        scale = 100.0 if cell["attrs"]["data-key"].endswith("token_agreement") else 1.0
        decimals = len(shown.split(".")[1].split("e")[0]) if "." in shown else 0
        exponent = int(shown.split("e")[1]) if "e" in shown else 0
        assert abs(shown_value - stored * scale) <= 0.5 * 10 ** (exponent - decimals) + 1e-12, cell
    return {c["attrs"]["data-key"] for c in cells}


def test_every_number_equals_the_results_json(real_run):
    html = real_run["html"].read_text(encoding="utf-8")
    keys = check_number_cells(html, real_run["results"].values())
    checked = sum(1 for e in parse(html).elements if "data-value" in e["attrs"])
    for model in MODELS:
        for key in (
            "baseline/ppl",
            "treatment/ppl",
            "treatment/delta_ppl_pct",
            "treatment/kld/mean",
            "numeric/max_rel",
            "numeric/changed",
        ):
            assert f"layer0/{model}/{key}" in keys
    assert checked >= 20


def test_placebo_comparison_in_words(real_run):
    text = real_run["html"].read_text(encoding="utf-8")
    for r in real_run["results"].values():
        compared = r.placebo.compared
        for versus in (compared.kld, compared.delta_ppl, compared.same_top):
            # the protocol's own wording, shown as stored, coloured by its stored category
            assert f'<span class="fq-{TONE[versus.standing]}">{versus.words}</span>' in text
        if r.numeric.changed == 0:
            assert compared.kld == Versus(
                standing=Standing.NONE,
                words="no element changed: the model is identical to the baseline",
            )
            assert r.placebo.runs == ()  # a byte-identical file: no effect, no placebo run
            continue
        assert r.placebo.verdict in compared.kld.words
        kld = r.placebo.kld_mean
        assert f"{kld.min:.3g} … {kld.max:.3g}" in text


def test_both_answers_with_their_floors(real_run):
    """The report answers the plan's question twice per model: as deployed and intrinsic
    (the float twin), each with its placebo, its floor and the protocol's one sentence."""
    text = real_run["html"].read_text(encoding="utf-8")
    assert "Two answers per stage" in text
    for model in MODELS:
        deployed, twin = real_run["results"][model], real_run["results"][f"{model}-twin"]
        assert (deployed.variant, twin.variant) == ("deployed", "intrinsic")
        assert twin.twin is not None and twin.twin.source_sha256 == deployed.model.sha256
        for r in (deployed, twin):
            assert r.resolution is not None
            assert html_lib.escape(r.resolution.sentence, quote=False) in text
    smol = real_run["results"]["smollm2-135m-twin"]
    assert "identical to the baseline" in smol.resolution.sentence
    gemma = real_run["results"]["gemma3-270m-twin"]
    assert gemma.treatment.kld.exact and len(gemma.treatment.kld.chunk_means) == settings.default(
        "fq_chunks"
    )
    assert gemma.resolution.floor is not None and gemma.resolution.floor > 0
    assert gemma.resolution.effect.low <= gemma.resolution.effect.estimate
    # intrinsic KLD sits orders of magnitude below the deployed model's engine noise
    assert gemma.treatment.kld.mean < 0.01 * real_run["results"]["gemma3-270m"].treatment.kld.mean


def test_summary_images_decode_and_charts_are_written(real_run):
    text = real_run["html"].read_text(encoding="utf-8")
    dom = parse(text)
    imgs = [
        e["attrs"]
        for e in dom.elements
        if e["tag"] == "img" and "fq-chart" in e["attrs"].get("class", "")
    ]
    assert imgs
    for attrs in imgs:
        src = attrs["src"]
        assert src.startswith("data:image/png;base64,")
        img = decode_png(base64.b64decode(src.split(",", 1)[1], validate=True))
        assert img.width > 200 and img.height > 100
    # the PNGs go with the run's own report, results/<run>/charts/
    charts = sorted((real_run["run_dir"] / "charts").glob("*.png"))
    assert {p.stem for p in charts} == {a["data-chart"] for a in imgs}
    for p in charts:
        decode_png(p.read_bytes())


def test_zero_change_model_says_no_element_changed(real_run):
    """SmolLM2's ffn_norm weights are already BF16-exact: no empty plot, a sentence instead."""
    r = real_run["results"]["smollm2-135m"]
    assert r.numeric.changed == 0
    dom = parse(real_run["html"].read_text(encoding="utf-8"))
    notes = {
        e["attrs"]["data-chart"]: e["text"]
        for e in dom.elements
        if "fq-chart-note" in e["attrs"].get("class", "")
    }
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
        if check == "regression":  # compares runs, not a check of the record (see summary)
            continue
        result = real_run["results"][model]
        extras = entries[-1]["extras"]
        html_extra = next(x["content"] for x in extras if x["format_type"] == "html")
        status = result.checks[check].status
        assert f'data-check="{check}"' in html_extra
        assert f'fq-status-{status}">{status}</span>' in html_extra
        images = [x for x in extras if x["format_type"] == "image"]
        for x in images:
            decode_png(base64.b64decode(x["content"].split(",", 1)[1]))
        if check == "perplexity":
            assert images, "the perplexity test carries the per-chunk PPL chart"
            # the baseline's and treatment's llama-perplexity or exact-engine runs (placebo
            # runs go with the placebo check); a cached run may name another clone's python
            ppl_cmds = commands_for("perplexity", result.commands)
            assert ppl_cmds and {c.role for c in ppl_cmds} <= {"baseline", "treatment"}
            for c in ppl_cmds:
                assert c.argv[0] in html_lib.unescape(html_extra)
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
        if model in MODELS:  # one decision per model: its deployed Test 1
            verdict = expected_verdict(r)
            assert f"**{model}: {verdict}**" in t1 and f"**{model}: {verdict}**" in ex
            assert f"{model}: {verdict}" in proc.stdout
        assert r.resolution.sentence.replace("|", "\\|") in t1  # the two answers' table
        b, t = r.baseline, r.treatment
        assert f"{b.ppl:.4f} ± {b.ppl_err:.4f}" in t1
        assert f"{t.ppl:.4f} ± {t.ppl_err:.4f}" in t1
        assert f"{figure(t.delta_ppl_pct, '+.2f')} %" in t1
        assert f"{t.kld.mean:.3g}" in t1 and f"{t.kld.mean:.3g}" in ex
        assert r.placebo.compared.kld.words in t1 and r.placebo.compared.kld.words in ex
        assert r.model.sha256 in t1 and r.corpus.sha256 in t1
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
    verdicts = {
        e["attrs"]["data-model"]: e["attrs"]["data-verdict"]
        for e in dom.elements
        if "fq-decision" in e["attrs"].get("class", "").split()
    }
    assert verdicts == {m: expected_verdict(real_run["results"][m]) for m in MODELS}
    tests = _tests_blob(html.read_text(encoding="utf-8"))
    with_extras = [n for n, e in tests.items() if "layer0" in n and e[-1]["extras"]]
    stage_tests = [n for n in tests if "layer0" in n and "test_regression" not in n]
    assert len(with_extras) == len(stage_tests) > 0


def test_report_without_stage_results_says_so(tmp_path):
    """A session that ran no stage (here: one library test) still writes a valid report."""
    html = tmp_path / "r.html"
    env = dict(os.environ, FQ_RESULTS_DIR=str(tmp_path / "results"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/test_report.py",
            "-k",
            "refuses_missing",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--html={html}",
            "--self-contained-html",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    text = html.read_text(encoding="utf-8")
    assert "No experiment stage ran in this session" in text
    assert 'class="fq-decision"' not in text


# --- fast: records built by hand, no llama.cpp ------------------------------------------------


def full_record(**overrides) -> dict:
    """A stage record with every measured section filled in (values like a Gemma3 Test 1)."""
    errors = {"max_abs": 0.0625, "mean_abs": 0.000427, "max_rel": 0.00383, "mean_rel": 7.45e-05}
    kld = {
        "mean": 0.00599,
        "mean_err": 0.00057,
        "median": 0.00329,
        "p90": 0.0111,
        "p99": 0.0432,
        "max": 0.177,
        "same_top_pct": 95.29,
        "same_top_err": 0.4,
        "rms_dp_pct": 1.2,
    }
    gen = {"prompt": "Hello", "chat": False, "n_tokens": 8, "tokens_per_s": 4.1}
    fields = {
        "numeric": {
            "manifest": "/r/m.gguf.fq.json",
            "n_tensors": 1,
            "n_elements": 640,
            "changed": 14,
            **errors,
            "summary": "14 of 640 elements changed",
            "per_tensor": [
                {
                    "name": "blk.0.ffn_norm.weight",
                    "layer": 0,
                    "changed": 14,
                    "n_elements": 640,
                    **errors,
                }
            ],
        },
        "baseline": {
            "ppl": 14.8414,
            "ppl_err": 2.30641,
            "chunk_ppls": [11.091, 14.8414],
            "n_chunks": 2,
            "tokens_per_s": 32.1047,
            "load_time_ms": 1900.1,
            "generations": [dict(gen, text=", I have a 20")],
        },
        "treatment": {
            "ppl": 15.0872,
            "ppl_err": 2.3532,
            "chunk_ppls": [11.2, 15.0872],
            "delta_ppl": 0.2458,
            "delta_ppl_pct": 1.6562,
            "delta_ppl_pct_err": 0.18,
            "kld": kld,
            "tokens_per_s": 33.2689,
            "speed_ratio": 1.036,
            "gen_tokens_per_s": 4.0,
            "baseline_gen_tokens_per_s": 4.1,
            "load_time_ms": 1800.2,
            "generations": [dict(gen, text=", I have a 21")],
            "agreement": {"token_agreement": 0.875, "first_divergence": 7, "per_prompt": []},
        },
        "placebo": {
            "seeds": [1, 2],
            "runs": [
                {
                    "seed": seed,
                    "key": f"k{seed}",
                    "layers": "0",
                    "manifest": "p.json",
                    "changed": 318 + seed,
                    "n_elements": 640,
                    "ppl": 14.89 + seed / 100,
                    "ppl_err": 2.3,
                    "delta_ppl_pct": 0.37 + seed / 100,
                    "delta_ppl_pct_err": 0.1,
                    "kld_mean": 0.0024 + seed / 1e4,
                    "same_top_pct": 98.2 + seed / 100,
                    "kld": None,
                }
                for seed in (1, 2)
            ],
            "kld_mean": {"min": 0.0025, "max": 0.0026, "mean": 0.00255},
            "delta_ppl_pct": {"min": 0.38, "max": 0.39, "mean": 0.385},
            "same_top_pct": {"min": 98.21, "max": 98.22, "mean": 98.215},
            "kld_ratio": 2.3,
            "verdict": "2.3× the largest placebo",
            "compared": {
                "kld": {"standing": "above", "words": "2.3× the largest placebo"},
                "delta_ppl": {"standing": "above", "words": "4.2× the largest placebo"},
                "same_top": {"standing": "above", "words": "2.6× the largest placebo drop"},
            },
        },
        "commands": [
            {
                "argv": ["/llama/bin/llama-perplexity", "-m", "my model.gguf"],
                "started_at": "2026-11-29T00:00:10Z",
                "duration_s": 38.4,
                "exit_status": 0,
                "stdout_path": "/logs/1.out",
                "stderr_path": "/logs/1.err",
                "role": "treatment",
            }
        ],
    }
    fields.update(overrides)
    return make_record(**fields)


def save_run(tmp_path: Path, *records: dict) -> Path:
    """Store records as the protocol does (validated by results.save_result); the run dir."""
    for data in records:
        results.save_result(record.from_builtins(data), tmp_path / "results")
    return tmp_path / "results" / "R1"


def render_all(run) -> str:
    from fq_core.report import decisions, html

    return (
        str(html.decision_block(decisions(run), run))
        + str(html.overview_table(run))
        + "".join(str(html.stage_section(r, ())) for r in run.results)
    )


def test_a_full_record_fills_every_row():
    """Every field a row reads exists (a misspelt one is an AttributeError here) and holds a
    value, so no row of a fully measured record shows "—"."""
    from fq_core.report import rows

    rec = record.from_builtins(full_record())
    metric = rows.metric_rows(rec)
    assert len(metric) >= 15
    for row in metric:
        for text in (
            row.label,
            row.baseline.text,
            row.treatment.text,
            row.placebo,
            row.verdict,
            row.threshold,
            row.status,
        ):
            assert rows.MISSING not in text, row
    for pair in rows.environment_rows(rec) + rows.setting_rows(rec):
        assert rows.MISSING not in pair.value, pair
    assert [c.shell for c in rows.command_rows(rec.commands)] == [
        "/llama/bin/llama-perplexity -m 'my model.gguf'"
    ]
    assert rows.generation_rows(rec)[0].treatment == ", I have a 21"


def test_html_numbers_equal_the_record_and_missing_means_none(tmp_path):
    """data-value is the stored number, the text it rounded; "—" only where the record holds
    None: a field left unmeasured, a stage that stopped before measuring."""
    from fq_core.report import load_run

    partial = full_record()
    partial["treatment"]["kld"]["p90"] = None
    partial["baseline"]["tokens_per_s"] = None
    stopped = make_record(
        stage="layers0-2",
        stage_title="Test 2",
        stage_index=2,
        layers="0-2",
        outcome="running",
        finished_at=None,
    )
    run = load_run(save_run(tmp_path, partial, stopped))
    text = render_all(run)
    keys = check_number_cells(text, [r.record for r in run.results])
    assert {"layer0/m/treatment/kld/p90", "layers0-2/m/treatment/ppl"} <= keys
    cells = {e["attrs"]["data-key"]: e for e in parse(text).elements if "data-key" in e["attrs"]}
    assert "data-value" not in cells["layer0/m/treatment/kld/p90"]["attrs"]
    assert "data-value" not in cells["layer0/m/baseline/tokens_per_s"]["attrs"]
    assert "data-value" in cells["layer0/m/treatment/kld/p99"]["attrs"]


def test_placebo_words_are_the_protocols(tmp_path):
    """The report shows record.placebo.compared as stored: it derives no comparison itself."""
    from fq_core.report import html, load_run
    from fq_core.report.markdown import write_reports

    data = full_record()
    data["placebo"]["compared"] = {
        "kld": {"standing": "noise", "words": "KLD words"},
        "delta_ppl": {"standing": "above", "words": "ΔPPL words"},
        "same_top": {"standing": "none", "words": "same-top words"},
    }
    run = load_run(save_run(tmp_path, data))
    text = render_all(run)
    write_reports(tmp_path / "results", tmp_path / "md")
    md = (tmp_path / "md" / "test1_results.md").read_text(encoding="utf-8")
    for words in ("KLD words", "ΔPPL words", "same-top words"):
        assert words in text and f"**{words}**" in md
    assert text.count("KLD words") == 3  # decision, overview, metrics table
    # the colour is the stored category: no word in the text says "noise" or "placebo"
    assert text.count('<span class="fq-noise">KLD words</span>') == 3
    assert '<span class="fq-above">ΔPPL words</span>' in text
    assert '<span class="fq-note">same-top words</span>' in text
    for gone in ("delta_vs_placebo", "same_top_vs_placebo", "kld_vs_placebo"):
        assert not hasattr(html, gone)


def test_html_and_markdown_render_the_same_rows(tmp_path):
    from html import escape

    from fq_core.report import load_run, rows
    from fq_core.report.markdown import write_reports
    from fq_core.report.render import cell

    run = load_run(save_run(tmp_path, full_record()))
    text = render_all(run)
    write_reports(tmp_path / "results", tmp_path / "md")
    md = (tmp_path / "md" / "test1_results.md").read_text(encoding="utf-8")
    for row in rows.metric_rows(run.results[0].record):
        md_line = (
            f"| {cell(row.label)} | {cell(row.baseline.text)} | {cell(row.treatment.text)} | "
            f"{cell(row.placebo)} |"
        )
        assert md_line in md, row
        assert f">{escape(row.treatment.text, quote=False)}</td>" in text, row
        assert escape(row.label, quote=False) in text, row


def test_html_escapes_record_text(tmp_path):
    from fq_core.report import load_run
    from fq_core.report.markdown import write_reports

    data = full_record()
    data["treatment"]["generations"][0]["text"] = "<script>alert(1)</script> | done"
    run = load_run(save_run(tmp_path, data))
    text = render_all(run)
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt; | done" in text
    write_reports(tmp_path / "results", tmp_path / "md")
    md = (tmp_path / "md" / "test1_results.md").read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt; \\| done" in md


def test_stage_ids_come_from_the_stage_definitions():
    from fq_core import report
    from fq_core.experiment import stages
    from fq_core.report import StageResult, stage_sort_key

    assert report.GATE_STAGE is stages.GATE_STAGE and not hasattr(report, "STAGE_ORDER")
    ids = [s.id for s in stages.STAGES]
    assert sorted(reversed(ids + ["zz-new"]), key=stage_sort_key) == ids + ["zz-new"]
    for gone in ("data", "section", "checks"):  # renderers read the typed record
        assert not hasattr(StageResult, gone)
    templates = (ROOT / "fq_core/report/templates").glob("*")
    renderers = [
        ROOT / "fq_core/report/html.py",
        ROOT / "fq_core/report/rows.py",
        ROOT / "fq_pytest/report.py",
        *templates,
    ]
    for path in renderers:
        assert "layer0" not in path.read_text(encoding="utf-8"), path


def test_templates_are_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    globs = config["tool"]["setuptools"]["package-data"]["fq_core.report"]
    templates = sorted((ROOT / "fq_core/report/templates").iterdir())
    assert templates
    for path in templates:
        assert any(path.match(g) for g in globs), path


def _corrupt_run(tmp_path: Path, how: str) -> Path:
    run_dir = save_run(tmp_path, full_record())
    path = run_dir / "layer0" / "m.json"
    raw = path.read_bytes()
    if how == "string":
        data = json.loads(raw)
        data["treatment"]["ppl"] = str(data["treatment"]["ppl"])
        path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    else:
        path.write_bytes(raw[: len(raw) // 2])
    return path


@pytest.mark.parametrize(("how", "says"), [("string", "$.treatment.ppl"), ("cut", "truncated")])
@pytest.mark.parametrize("existing_output", [False, True])
def test_fq_report_refuses_a_broken_results_file(tmp_path, how, says, existing_output):
    """A number turned into a string or a file cut in half: exit 2, one line naming the file
    and what is wrong in it, and no output written (an existing folder left as it was)."""
    path = _corrupt_run(tmp_path, how)
    out = tmp_path / "out"
    if existing_output:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    proc = run_fq("report", str(tmp_path / "results"), str(out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0] and says in lines[0]
    assert lines[0].startswith("fq report: error: ")
    if existing_output:
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["results"] + (["out"] if existing_output else [])
    )


def test_fq_report_writes_whole_or_nothing(tmp_path, monkeypatch):
    """Rendering happens before any file is written: a failure half-way leaves no output
    folder (nor a temporary one beside it); a success leaves the folder complete."""
    from fq_core.report import markdown

    save_run(tmp_path, full_record())
    out = tmp_path / "out"
    real_render = markdown.render

    def fail_second(template, **context):
        if template == "experiment_results.md.j2":
            raise RuntimeError("renderer broke")
        return real_render(template, **context)

    monkeypatch.setattr(markdown, "render", fail_second)
    with pytest.raises(RuntimeError):
        markdown.write_reports(tmp_path / "results", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]

    monkeypatch.setattr(markdown, "render", real_render)
    written = markdown.write_reports(tmp_path / "results", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "results"]
    assert written.test1.is_file() and written.experiment.is_file() and written.charts
    for chart in written.charts:
        decode_png(chart.read_bytes())
    (out / "keep.txt").write_text("mine")  # an existing folder: files replaced, others kept
    markdown.write_reports(tmp_path / "results", out)
    assert (out / "keep.txt").read_text() == "mine"
    assert not [p for p in out.rglob("*") if "tmp" in p.name]


@pytest.mark.parametrize(
    ("value", "lo", "hi", "standing", "words"),
    [
        (0.83, 0.20, 0.35, "above", "2.4× the largest placebo"),  # Gemma3 Test 1, 8 chunks
        (0.30, 0.20, 0.35, "noise", "within engine noise"),
        (-0.30, 0.20, 0.35, "noise", "within engine noise"),
        (0.35, 0.20, 0.35, "noise", "within engine noise"),  # at the largest placebo
        (0.01, 0.0, 0.0, "above", "above the placebo, which changed nothing"),
        (0.62, None, None, "none", "control not run"),
        (None, 0.20, 0.35, "none", "not measured"),
    ],
)
def test_delta_ppl_against_the_placebo(value, lo, hi, standing, words):
    """What the protocol stores in record.placebo.compared (fq_core.experiment.checks): the category
    the report colours by, and its words."""
    from fq_core.experiment.checks import delta_vs_placebo

    assert delta_vs_placebo(value, lo, hi) == Versus(standing=Standing(standing), words=words)


def test_same_top_against_the_placebo():
    from fq_core.experiment.checks import same_top_vs_placebo

    above = Versus(standing=Standing.ABOVE, words="1.6× the largest placebo drop")
    assert same_top_vs_placebo(95.6, 97.3) == above
    assert same_top_vs_placebo(98.0, 97.3) == Versus(
        standing=Standing.NOISE, words="within engine noise"
    )
    assert same_top_vs_placebo(None, 97.3).standing is Standing.NONE


@pytest.mark.parametrize(
    ("changed", "seeds", "treatment", "placebos", "standing", "words"),
    [
        (14, 3, 0.0060, [0.0026, 0.0020], "above", "2.3× the largest placebo"),
        (14, 3, 0.0020, [0.0026, 0.0020], "noise", "within engine noise (ratio 0.77)"),
        (14, 3, 0.0, [0.0, 0.0], "noise", "within engine noise (ratio 0.00)"),
        (14, 3, 1e-6, [0.0, 0.0], "above", "above the placebo, which changed nothing"),
        (14, 3, None, [0.0026], "none", "no treatment KLD"),
        (14, 3, math.nan, [0.0026], "none", "nan× the largest placebo"),
        (14, 0, 0.0060, [], "none", "control not run"),
        (0, 3, 0.0, [], "none", "no element changed: the model is identical to the baseline"),
    ],
)
def test_kld_against_the_placebo(changed, seeds, treatment, placebos, standing, words):
    """The category comes from the ratio, never from the words (`×` in the wording)."""
    from fq_core.experiment.checks import kld_vs_placebo, placebo_verdict

    ratio, verdict = (None, "control not run")
    if placebos:
        ratio, verdict = placebo_verdict(treatment, placebos)
    got = kld_vs_placebo(changed, seeds, ratio, verdict)
    assert got == Versus(standing=Standing(standing), words=words)


@pytest.mark.parametrize(
    ("words", "standing"),
    [
        ("within engine noise (ratio 0.42)", "noise"),
        ("within engine noise", "noise"),
        ("1.6× the largest placebo", "above"),
        ("2.6× the largest placebo drop", "above"),
        ("above the placebo, which changed nothing", "above"),
        ("control not run", "none"),
        ("not measured", "none"),  # the report's old word match coloured this one red
        ("no treatment KLD", "none"),
        ("no element changed: the model is identical to the baseline", "none"),
    ],
)
def test_a_schema_3_record_is_brought_forward_with_its_categories(tmp_path, words, standing):
    """Records stored before the categories said only words; reading one gives each
    comparison the category its words stated, and it renders as before."""
    from fq_core.report import load_run

    data = full_record()
    data["schema"] = 3
    data["placebo"]["compared"] = {"kld": words, "delta_ppl": words, "same_top": words}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    rec = record.read(path)
    assert rec.schema == record.SCHEMA
    want = Versus(standing=Standing(standing), words=words)
    assert rec.placebo.compared == PlaceboComparison(kld=want, delta_ppl=want, same_top=want)
    text = render_all(load_run(save_run(tmp_path, data)))
    assert f'<span class="fq-{TONE[Standing(standing)]}">{html_lib.escape(words)}</span>' in text


# --- the session's truth: which answer gates, what failed, where the report lives --------------


def _failing_twin_run(tmp_path: Path):
    from fq_core.report import load_run

    bad = {"status": "failed", "gates": True, "detail": "mean KLD 0.5 > 0.02", "value": 0.5}
    twin = make_record(variant="intrinsic")
    twin["checks"] = dict(twin["checks"], kld=dict(twin["checks"]["kld"], **bad))
    twin["outcome"] = "failed"
    return load_run(save_run(tmp_path, make_record(), twin))


def test_decision_names_the_gating_answer_and_shows_the_other(tmp_path):
    """A deployed GO beside a failed twin: the block says the deployed answer gates and shows
    the intrinsic answer's NO-GO next to it; a session failure is stated above the decision."""
    from fq_core.report import decisions, html

    run = _failing_twin_run(tmp_path)
    decided = decisions(run)
    assert [(d.model, d.verdict.value) for d in decided] == [("m", "GO")]
    failed = ["experiments/test_stages.py::test_kld[layer0-m-twin]"]
    text = str(html.decision_block(decided, run, failed))
    assert 'data-gating="deployed"' in text
    assert 'class="fq-other" data-model="m-twin" data-verdict="NO-GO"' in text
    assert "failed: kld" in text
    assert 'class="fq-session-failed" data-failed="1"' in text
    assert "kld layer0-m-twin" in text
    assert "fq-session-failed" not in str(html.decision_block(decided, run))
    from fq_core.report import markdown

    md = markdown.render_reports(run)["test1_results.md"].decode()
    assert "beside it, not gating: the intrinsic answer (m-twin) **NO-GO**" in md


def test_the_title_never_reads_all_green_over_a_failed_session(tmp_path):
    from fq_core.report import decisions, session_title

    decided = decisions(_failing_twin_run(tmp_path))
    assert session_title(decided, []) == "m GO"
    failed = [
        "experiments/test_stages.py::test_kld[layer0-m-twin]",
        "experiments/test_stages.py::test_perplexity[layer0-m-twin]",
        "experiments/test_stages.py::test_same_top[layer0-m-twin]",
        "experiments/test_stages.py::test_regression[layer0-m-twin]",
    ]
    title = session_title(decided, failed)
    assert title.startswith("m GO · 4 failed: kld layer0-m-twin, perplexity layer0-m-twin")
    assert title.endswith("and 1 more")


def test_a_placebo_ratio_is_not_styled_as_a_failure():
    """ "11× the largest placebo" is a measurement, not a failed check: not the failure red."""
    from fq_core.report import html

    css = str(html.style())
    fail = re.search(r"\.fq-status-failed[^{]*\{color:(#\w+)", css).group(1)
    above = re.search(r"\.fq \.fq-above\{color:(#\w+)", css).group(1)
    assert above != fail


def _pytest_in(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """pytest with the checkout's pytest.ini (its --html=reports/report.html) from `cwd`."""
    env = dict(os.environ, FQ_RESULTS_DIR=str(cwd / "results"), FQ_LOG_DIR=str(cwd / "logs"))
    env.pop("FQ_RUN_ID", None)
    argv = [sys.executable, "-m", "pytest", "-c", str(ROOT / "pytest.ini")]
    argv += ["--rootdir", str(ROOT), "-p", "no:cacheprovider", "-p", "no:randomly", *args]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_only_a_stage_run_replaces_the_gate_report(tmp_path):
    """`--collect-only` and a run of other tests leave reports/report.html as it was; the
    run's own report lives in results/<run>/report.html (a collection keeps none)."""
    gate = tmp_path / "reports" / "report.html"
    gate.parent.mkdir()
    gate.write_text("an earlier run's report")
    one = [str(ROOT / "tests" / "test_figures.py"), "-q", "-k", "test_figure"]
    proc = _pytest_in(tmp_path, *one, "--collect-only")
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert not list((tmp_path / "results").glob("*/report.html"))
    proc = _pytest_in(tmp_path, *one)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert gate.read_text() == "an earlier run's report"
    assert "this session stored no stage results" in proc.stdout
    (own,) = (tmp_path / "results").glob("*/report.html")
    assert "<html" in own.read_text(encoding="utf-8").lower()


def test_the_run_keeps_its_own_report(real_run):
    """The report asked for is a copy of the one kept with the run."""
    assert (real_run["run_dir"] / "report.html").read_bytes() == real_run["html"].read_bytes()


def test_a_rewritten_report_leaves_no_stale_chart(tmp_path):
    from fq_core.report.charts import Chart, write_charts

    out = tmp_path / "charts"
    out.mkdir()
    (out / "old-chart.png").write_bytes(b"stale")
    kept = write_charts([Chart("a", "A", b"png")], out)
    assert {p.name for p in out.iterdir()} == {"old-chart.png", "a.png"}
    assert write_charts([Chart("a", "A", b"png")], out, prune=True) == kept
    assert [p.name for p in out.iterdir()] == ["a.png"]
