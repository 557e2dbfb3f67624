"""The report shows the regression check: the "vs reference" column, the identity block and
the history chart, in HTML and markdown — read from stored records and comparisons only.

Records come from tests/record_factory.py, are stored with results.save_result into a
temporary results root holding several runs, and compared with regression.compare_runs; each
comparison is saved where history.comparison_path says (regression.save). No llama.cpp.
"""

from __future__ import annotations

import base64
import io
import math
import re
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import pytest
from record_factory import make_record

from fq_core.errors import BadInput
from fq_core.experiment import regression
from fq_core.experiment.regression import METRICS, compare_runs
from fq_core.storage import history, record, results

STAGE, MODEL = "layer0", "gemma3-270m"
KEY = f"{STAGE}/{MODEL}"
HISTORY_KEY = f"{STAGE}-{MODEL}-history"


# --- records: three runs of one stage × model ---------------------------------------------------


def _kld(mean: float, **more) -> dict:
    return {
        "mean": mean,
        "mean_err": 0.0002,
        "median": 0.0020,
        "p90": 0.0120,
        "p99": 0.0550,
        "p999": 0.20,
        "max": 0.60,
        "same_top_pct": 95.6,
        "same_top_err": 0.3,
        "rms_dp_pct": 2.0,
        **more,
    }


def _placebo(klds=(0.0029, 0.0033, 0.0037), dppl=(0.20, 0.31, 0.42)) -> dict:
    runs = [
        {
            "seed": i + 1,
            "key": f"k{i}",
            "layers": "0",
            "manifest": "m",
            "changed": 320,
            "n_elements": 640,
            "ppl": 17.06,
            "ppl_err": 0.52,
            "delta_ppl_pct": d,
            "delta_ppl_pct_err": 0.2,
            "kld_mean": k,
            "same_top_pct": 97.0 + i * 0.4,
            "kld": _kld(k, same_top_pct=97.0 + i * 0.4),
        }
        for i, (k, d) in enumerate(zip(klds, dppl, strict=True))
    ]
    return {
        "seeds": [r["seed"] for r in runs],
        "runs": runs,
        "kld_mean": {"min": min(klds), "max": max(klds), "mean": sum(klds) / len(klds)},
        "delta_ppl_pct": {"min": min(dppl), "max": max(dppl), "mean": sum(dppl) / len(dppl)},
        "same_top_pct": None,
        "kld_ratio": 0.0060 / max(klds),
        "verdict": "1.6× the largest placebo",
        "compared": {
            "kld": {"standing": "above", "words": "1.6× the largest placebo"},
            "delta_ppl": {"standing": "above", "words": "2.0× the largest placebo"},
            "same_top": {"standing": "noise", "words": "within engine noise"},
        },
    }


def stage_record(run_id: str, started: str, *, kld=0.0060, dppl=0.83, **more) -> dict:
    numeric = {
        "manifest": "m.fq.json",
        "n_tensors": 1,
        "n_elements": 640,
        "changed": 14,
        "max_abs": 0.0625,
        "mean_abs": 0.0004,
        "max_rel": 0.00383,
        "mean_rel": 7e-5,
        "summary": "14 of 640",
        "per_tensor": [],
    }
    baseline = {
        "ppl": 17.03,
        "ppl_err": 0.51,
        "chunk_ppls": [17.0],
        "n_chunks": 8,
        "tokens_per_s": 310.0,
        "load_time_ms": 90.0,
        "generations": [],
    }
    treatment = {
        "ppl": 17.03 * (1 + dppl / 100),
        "ppl_err": 0.52,
        "chunk_ppls": [17.0, 17.2],
        "delta_ppl": 17.03 * dppl / 100,
        "delta_ppl_pct": dppl,
        "delta_ppl_pct_err": 0.23,
        "kld": _kld(kld),
        "tokens_per_s": 300.0,
        "speed_ratio": 0.97,
        "gen_tokens_per_s": 20.0,
        "baseline_gen_tokens_per_s": 20.0,
        "load_time_ms": 100.0,
        "generations": [],
        "agreement": {"token_agreement": 0.5, "first_divergence": 16, "per_prompt": []},
    }
    fields = {
        "run_id": run_id,
        "started_at": started,
        "finished_at": started.replace("00:00Z", "01:00Z"),
        "model": {"name": MODEL, "path": "/m/gemma.gguf", "sha256": "ab" * 32},
        "numeric": numeric,
        "baseline": baseline,
        "treatment": treatment,
        "placebo": _placebo(),
        **more,
    }
    return make_record(**fields)


def typed(data: dict) -> record.StageRecord:
    return record.from_builtins(data)


RUNS = (
    ("A", "2026-01-01T00:00:00Z", 0.0058, 0.71),
    ("B", "2026-01-02T00:00:00Z", 0.0060, 0.83),  # the reference
)
NOW = ("C", "2026-01-03T00:00:00Z")


def store(root: Path, *, compared: bool = True, now_kld: float = 0.0078, past=RUNS) -> Path:
    """Runs A and B, then this run C (mean KLD up by 30 %, another llama.cpp, another host);
    C compared with B (kld:10%) and the comparison saved beside C's record. C's run dir."""
    for run_id, started, kld, dppl in past:
        results.save_result(
            record.from_builtins(stage_record(run_id, started, kld=kld, dppl=dppl)), root
        )
    llama = {"version": "0.6.0", "build_info": "GNU 12", "bin_dir": "/llama/bin"}
    machine = {
        "hostname": "other",
        "cpu": "cpu",
        "cores": 2,
        "python": "3.11.7",
        "platform": "Linux",
    }
    now = stage_record(*NOW, kld=now_kld, dppl=0.90, llama=llama, machine=machine)
    results.save_result(record.from_builtins(now), root)
    if compared:
        ref = results.load_record("B", STAGE, MODEL, root)
        cmp = compare_runs(ref, typed(now), "kld:10%", reference_source="run B")
        path = regression.save(cmp, root)
        assert path == history.comparison_path("C", STAGE, MODEL, root)
    return results.run_dir("C", root)


def stored(root: Path) -> regression.RunComparison:
    return regression.read(history.comparison_path("C", STAGE, MODEL, root))


# --- HTML ---------------------------------------------------------------------------------------


class _Dom(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.elements: list[dict] = []
        self._open: list[dict] = []

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


def parse(text: str) -> list[dict]:
    dom = _Dom()
    dom.feed(text)
    return dom.elements


def classes(el: dict) -> list[str]:
    return el["attrs"].get("class", "").split()


def decode_png(data: bytes):
    from PIL import Image

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def render(run) -> str:
    """What the pytest-html summary shows: decision, the reference block, every stage section
    with its charts (fq_pytest.report's order)."""
    from fq_core.report import charts, decisions, html

    all_charts = charts.run_charts(run)
    return (
        str(html.decision_block(decisions(run), run))
        + str(html.reference_block(run))
        + "".join(
            str(html.stage_section(r, all_charts[f"{r.stage}/{r.model}"])) for r in run.in_order()
        )
    )


def expected_text(m: regression.MetricComparison) -> str:
    """The cell as the brief words it, rebuilt here from the stored comparison alone."""
    if m.verdict == "identical":
        return "identical"
    if m.verdict in ("not measured", "off"):
        return m.verdict
    show = METRICS[m.metric].show
    d = float(m.change)
    text = ("+" if d > 0 else "−") + regression.magnitude(show, d) if d else "0"
    if m.change_pct is not None and getattr(show, "suffix", "").strip() != "%":
        text += f" ({float(m.change_pct):+.1f} %)".replace("-", "−")
    if m.shown.uncertainty.startswith("±"):  # the printed figure, checked independently
        text += " " + m.shown.uncertainty
    return text + " " + ("REGRESSED" if m.verdict == "regressed" else m.verdict)


def test_vs_reference_column_equals_the_stored_comparison(tmp_path):
    from fq_core.report import load_run

    root = tmp_path / "results"
    run = load_run(store(root))
    cmp = stored(root)
    assert run.get(STAGE, MODEL).comparison == cmp  # read back as stored, typed
    els = parse(render(run))
    table = next(e for e in els if e["tag"] == "table" and "fq-metrics" in classes(e))
    assert "vs reference (run B)" in table["text"]
    spans = [e for e in els if "fq-ref" in classes(e)]
    by_metric = {m.metric: m for m in cmp.metrics}
    # every compared metric is in the column exactly once
    assert sorted(s["attrs"]["data-metric"] for s in spans) == sorted(by_metric)
    for span in spans:
        a = span["attrs"]
        m = by_metric[a["data-metric"]]
        assert a["data-verdict"] == m.verdict
        assert unescape(a["title"]) == m.detail
        if m.change is None:
            assert "data-change" not in a
        else:
            assert float(a["data-change"]) == m.change
        if m.uncertainty is not None:
            assert float(a["data-uncertainty"]) == m.uncertainty
        text = span["text"].strip().removeprefix("baseline: ")
        assert text == expected_text(m), (m.metric, text)
    kld = by_metric["kld"]
    assert kld.verdict == "regressed" and cmp.status == "regressed"
    span = next(s for s in spans if s["attrs"]["data-metric"] == "kld")
    assert span["text"].endswith("REGRESSED") and "fq-worse" in classes(span)
    assert re.fullmatch(r"\+0\.00180 \(\+30\.0 %\) ±0\.\d+ REGRESSED", span["text"])
    changed = next(s for s in spans if s["attrs"]["data-metric"] == "changed")
    assert changed["text"] == "identical" and "fq-better" in classes(changed)
    # the metrics no row showed get rows of their own, the baseline's PPL sits in the PPL row
    labels = [r["text"] for r in els if r["tag"] == "td"]
    for label in ("KLD p99.9", "RMS Δp", "KLD / largest placebo"):
        assert label in labels
    ppl_row = next(e for e in els if e["tag"] == "tr" and e["text"].startswith("PPL"))
    assert "baseline: " in ppl_row["text"]


def test_identity_block_after_the_decision(tmp_path):
    from fq_core.report import load_run

    root = tmp_path / "results"
    run = load_run(store(root))
    cmp = stored(root)
    text = render(run)
    assert text.index("fq-decisions") < text.index("fq-reference") < text.index("fq-stage")
    els = parse(text)
    block = next(e for e in els if "fq-reference" in classes(e))
    assert "Against the reference (run B)" in block["text"]
    case = next(e for e in els if "fq-comparison" in classes(e))
    assert case["attrs"]["data-status"] == "regressed"
    assert "REGRESSED" in case["text"] and cmp.summary in unescape(case["text"])
    items = {e["attrs"]["data-field"]: e for e in els if "data-field" in e["attrs"]}
    assert set(items) == {d.field for d in cmp.identity}
    for d in cmp.identity:
        item = items[d.field]
        assert f"{d.field}: {d.reference} → {d.now}" in item["text"]
        marked = "does not change the numbers" in item["text"]
        assert marked == (not d.affects_numbers)
    assert "0.5.0-dev → 0.6.0" in items["llama.cpp version"]["text"]
    assert "(does not change the numbers)" in items["host"]["text"]
    # the stage section says the status too
    line = next(e for e in els if "fq-reference-status" in classes(e))
    assert line["attrs"]["data-status"] == "regressed" and "run B" in line["text"]


def test_history_chart_over_the_runs(tmp_path):
    from fq_core.report import charts, load_run

    root = tmp_path / "results"
    run = load_run(store(root))
    stage_charts = charts.run_charts(run)[KEY]
    (past,) = [c for c in stage_charts if c.key == HISTORY_KEY]
    img = decode_png(past.png)
    assert img.width > 300 and img.height > 300
    assert "3 runs" in past.title
    points = charts.history_points(root, STAGE, MODEL)
    assert [p.run_id for p in points] == ["A", "B", "C"]  # oldest first
    imgs = [e for e in parse(render(run)) if e["tag"] == "img"]
    src = next(e["attrs"]["src"] for e in imgs if e["attrs"]["data-chart"] == HISTORY_KEY)
    assert base64.b64decode(src.split(",", 1)[1], validate=True) == past.png
    written = charts.write_charts(stage_charts, tmp_path / "charts")
    assert tmp_path / "charts" / f"{HISTORY_KEY}.png" in written


def test_history_chart_needs_two_runs_and_skips_unmeasured_ones(tmp_path):
    from fq_core.report import charts, load_run

    root = tmp_path / "results"
    skipped = make_record(
        run_id="S",
        started_at="2026-01-02T00:00:00Z",
        outcome="skipped",
        skip_reason="gate closed",
        model={"name": MODEL, "path": "/m/gemma.gguf", "sha256": "ab" * 32},
    )
    results.save_result(
        record.from_builtins(skipped), root
    )  # measured nothing: not a point of the history
    run = load_run(store(root, compared=False, past=()))
    assert [p.run_id for p in charts.history_points(root, STAGE, MODEL)] == ["C"]
    stage_charts = charts.run_charts(run)[KEY]
    assert len(stage_charts) == 4 and HISTORY_KEY not in {c.key for c in stage_charts}
    assert charts.history_chart(run.get(STAGE, MODEL), root) is None


def test_history_chart_draws_nonfinite_and_missing_placebos(tmp_path):
    """A run whose placebo was not run, or whose KLD is not a number, is still a run."""
    from fq_core.report import charts, load_run

    root = tmp_path / "results"
    odd = stage_record("A", "2026-01-01T00:00:00Z", kld=math.nan, placebo=None)
    results.save_result(record.from_builtins(odd), root)
    run = load_run(store(root, compared=False, past=()))
    chart = charts.history_chart(run.get(STAGE, MODEL), root)
    assert chart is not None and "2 runs" in chart.title
    decode_png(chart.png)


def test_markdown_reports_show_the_same(tmp_path):
    from fq_core.report import load_run
    from fq_core.report.markdown import CHARTS, EXPERIMENT, TEST1, render_reports, write_reports

    root = tmp_path / "results"
    run = load_run(store(root))
    cmp = stored(root)
    files = render_reports(run)
    for name in (EXPERIMENT, TEST1):
        md = files[name].decode("utf-8")
        assert md.index("## Decision") < md.index("## Against the reference (run B)")
        assert f"**Test 1 `{STAGE}` — {MODEL}: REGRESSED** — {cmp.summary}" in md
        for d in cmp.identity:
            mark = "" if d.affects_numbers else " (does not change the numbers)"
            assert f"    - {d.field}: {d.reference} → {d.now}{mark}" in md
        header = next(line for line in md.splitlines() if line.startswith("| metric |"))
        assert header.endswith("| vs reference (run B) |")
        rows = [line for line in md.splitlines() if line.startswith("| mean KLD")]
        assert rows and rows[0].endswith(f"| **{expected_text(cmp.metrics[4])}** |")
        assert f"({CHARTS}/{HISTORY_KEY}.png)" in md
    assert cmp.metrics[4].metric == "kld"
    decode_png(files[f"{CHARTS}/{HISTORY_KEY}.png"])
    out = write_reports(root / "C", tmp_path / "md")
    assert out.experiment.is_file() and (tmp_path / "md" / CHARTS / f"{HISTORY_KEY}.png").is_file()


def test_without_a_comparison_nothing_changes(tmp_path):
    from fq_core.report import html, load_run, rows
    from fq_core.report.markdown import EXPERIMENT, render_reports

    root = tmp_path / "results"
    run = load_run(store(root, compared=False, past=()))
    r = run.get(STAGE, MODEL)
    assert r.comparison is None and run.compared() == ()
    assert str(html.reference_block(run)) == ""
    assert rows.metric_rows(r.record) == rows.stage_view(r).metrics
    assert all(not row.reference for row in rows.stage_view(r).metrics)
    text = render(run)
    assert "fq-vs-reference" not in text and "vs reference" not in text
    assert "fq-reference" not in text and "Against the reference" not in text
    md = render_reports(run)[EXPERIMENT].decode("utf-8")
    assert "vs reference" not in md and "Against the reference" not in md
    header = next(line for line in md.splitlines() if line.startswith("| metric |"))
    assert header.count("|") == 8  # seven columns, as before


def test_a_comparison_that_compared_nothing_shows_its_reason_but_no_column(tmp_path):
    from fq_core.report import load_run

    root = tmp_path / "results"
    run_dir = store(root, compared=False)
    now = results.load_record("C", STAGE, MODEL, root)
    skipped = typed(
        stage_record(
            "B",
            "2026-01-02T00:00:00Z",
            outcome="skipped",
            skip_reason="gate closed",
            treatment=None,
            numeric=None,
        )
    )
    cmp = compare_runs(skipped, now, reference_source="run B")
    assert cmp.status == "not compared" and not cmp.metrics
    regression.save(cmp, root)
    text = render(load_run(run_dir))
    assert "fq-vs-reference" not in text
    assert "NOT COMPARED" in text and "measured nothing" in text


def test_a_broken_comparison_is_named_never_dropped(tmp_path):
    from fq_core.report import load_run

    root = tmp_path / "results"
    run_dir = store(root)
    path = history.comparison_path("C", STAGE, MODEL, root)
    path.write_text('{"schema": 1, "status": 5}', encoding="utf-8")
    with pytest.raises(BadInput, match=re.escape(str(path))):
        load_run(run_dir)


def test_a_comparison_of_another_case_is_refused(tmp_path):
    from fq_core.report import load_run

    root = tmp_path / "results"
    run_dir = store(root)
    path = history.comparison_path("C", STAGE, MODEL, root)
    other = msgspec_replace(stored(root), case="smollm2-135m")
    path.write_bytes(regression.encode(other))
    with pytest.raises(BadInput, match="smollm2-135m"):
        load_run(run_dir)


def msgspec_replace(value, **changes):
    import msgspec

    return msgspec.structs.replace(value, **changes)


def test_pytest_html_summary_puts_the_comparison_after_the_decision(tmp_path, monkeypatch):
    """fq_pytest.report's summary hook: decision, then the reference block, in the prefix."""
    from types import SimpleNamespace

    from fq_pytest import report as hooks

    root = tmp_path / "results"
    run_dir = store(root)
    monkeypatch.setattr(hooks, "_run_dir", lambda config: run_dir)
    monkeypatch.setattr(hooks, "_html_path", lambda config: None)
    prefix, summary, postfix = [], [], []
    hooks._summary(prefix, summary, postfix, SimpleNamespace(config=SimpleNamespace(stash={})))
    ours = [p for p in prefix if 'class="fq ' in p]
    assert "fq-decisions" in ours[0] and "Against the reference (run B)" in ours[1]
    stage = "".join(postfix)
    assert "vs reference (run B)" in stage and f'data-chart="{HISTORY_KEY}"' in stage
    # without a comparison the prefix is as before: the style and the decision only
    history.comparison_path("C", STAGE, MODEL, root).unlink()
    prefix = []
    hooks._summary(prefix, [], [], SimpleNamespace(config=SimpleNamespace(stash={})))
    assert len(prefix) == 2 and "Against the reference" not in "".join(prefix)


def test_fq_report_on_a_results_root_with_run_manifests(tmp_path, capsys):
    """`fq report results/ OUT`: every run has its run.json now (fq_core.storage.history), which a
    results root's `*/*.json` matches; the root must still resolve to its latest run."""
    from fq_core.cli import main
    from fq_core.report import is_run_dir, resolve_run_dir

    root = tmp_path / "results"
    run_dir = store(root)
    for run_id in ("A", "B", "C"):
        history.ensure_manifest(run_id, ["pytest", "-k", STAGE], root)
    assert not is_run_dir(root) and resolve_run_dir(root) == run_dir
    assert main(["report", str(root), str(tmp_path / "md")]) == 0, capsys.readouterr().err
    md = (tmp_path / "md" / "experiment_results.md").read_text(encoding="utf-8")
    assert "## Against the reference (run B)" in md and f"{HISTORY_KEY}.png" in md
