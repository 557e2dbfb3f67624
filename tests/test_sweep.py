"""The sensitivity sweep (fq_core.experiment.sweep, fq_core.report.sensitivity, fq_pytest.sweep).

Offline (`make check`): the plan's cells and ids, the statistics (t-test p-values,
Benjamini–Hochberg, rank ranges where overlapping intervals tie, the sentence), merging shards
and refusing ones whose identities disagree, the reports, `fq report A B OUT`, and one cell
through the real code with llama.cpp stubbed (cached, placebos shared, disk flat). With
llama.cpp and the models: a small sweep sharded in two by pytest-split and merged by
`fq report` gives the unsharded numbers exactly, and the per-cell overhead over a bare
llama-perplexity run (pytest-benchmark, reported in extra_info, not asserted).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
from gguf_factory import build_gguf

from fq_core.cli import main
from fq_core.errors import BadInput, BadSelection
from fq_core.experiment import measure, stages, stats
from fq_core.experiment.sweep import analysis as sweep_analysis
from fq_core.experiment.sweep import plan as sweep_plan
from fq_core.experiment.sweep import run as sweep_run
from fq_core.measurement.corpus import Corpus
from fq_core.measurement.gguf_index import read_index
from fq_core.measurement.llama.runner import CommandRecord, LoadResult, PerplexityResult
from fq_core.measurement.llama.tools import LlamaTools
from fq_core.measurement.models import ModelRef
from fq_core.measurement.sequential import STOP_REASONS
from fq_core.platform.hashing import sha256_file
from fq_core.report import sensitivity
from fq_core.storage import cell_record, results
from fq_core.storage.cell_record import NOT_DEPLOYABLE, read_cell
from fq_core.storage.identity import Identity
from fq_core.storage.record import KLD

ROOT = Path(__file__).resolve().parents[1]


# --- the plan ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    return build_gguf(tmp_path_factory.mktemp("sweep-model"), "factory.gguf", n_layers=5)


def _plan(**kw) -> sweep_plan.Plan:
    base = dict(
        name="full",
        models=("factory",),
        kinds=("ffn_norm",),
        formats=(("bf16", "truncate"),),
        layers="all",
        variants=("deployed",),
    )
    return sweep_plan.Plan(**{**base, **kw})


def test_cells_name_every_axis_and_never_say_layer(factory):
    cells = sweep_plan.cells_for(_plan(), "factory", read_index(factory.path))
    ids = [c.id for c in cells]
    assert ids == [
        "factory-ffn_norm-blk00-bf16-deployed",
        "factory-ffn_norm-blk01-bf16-deployed",
        "factory-ffn_norm-blk02-bf16-deployed",
        "factory-ffn_norm-blk03-bf16-deployed",
        "factory-ffn_norm-blk04-bf16-deployed",
        "factory-ffn_norm-first02-bf16-deployed",
        "factory-ffn_norm-first04-bf16-deployed",
        "factory-ffn_norm-first05-bf16-deployed",
    ]
    assert not any("layer" in i for i in ids), "`pytest -k layer0` is the stage gate"
    cum = [c for c in cells if c.series == "cumulative"]
    assert [(c.n_layers, c.layers) for c in cum] == [(2, "0-1"), (4, "0-3"), (5, "all")]


def test_all_kinds_formats_and_variants(factory):
    plan = _plan(
        kinds=("all",),
        formats=sweep_plan.parse_formats("bf16 fp8_e4m3/nearest"),
        variants=sweep_plan.parse_variants("both"),
        layers="1",
        cumulative=False,
    )
    cells = sweep_plan.cells_for(plan, "factory", read_index(factory.path))
    index = read_index(factory.path)
    assert sweep_plan.kinds_of(index) == ("attn_norm", "ffn_norm", "output_norm")
    # on the twin every weight: ffn_up (Q8_0 in the file) and token_embd (F16) too
    twin_kinds = ("attn_norm", "ffn_norm", "ffn_up", "token_embd", "output_norm")
    assert sweep_plan.kinds_of(index, twin=True) == twin_kinds
    # 2 formats x (deployed: attn_norm, ffn_norm at layer 1 + output_norm, which has no layer;
    # intrinsic: those, ffn_up at layer 1 and token_embd)
    assert len(cells) == 2 * (3 + 5)
    whole = [c for c in cells if c.kind == "output_norm"]
    assert {c.series for c in whole} == {"whole"} and {c.layers for c in whole} == {"all"}
    assert "factory-output_norm-fp8_e4m3-nearest-intrinsic" in {c.id for c in cells}


def test_plan_faults_are_one_line(factory):
    with pytest.raises(BadSelection, match="no F32 tensor of kind post_ffw_norm"):
        sweep_plan.cells_for(_plan(kinds=("post_ffw_norm",)), "factory", read_index(factory.path))
    with pytest.raises(BadInput, match="unknown sweep format 'placebo'"):
        sweep_plan.parse_formats("placebo")
    with pytest.raises(BadInput, match="variants"):
        sweep_plan.parse_variants("twin")
    assert sweep_plan.parse_formats("all") == tuple(
        (f, "truncate") for f in sweep_plan.SWEEP_FORMATS
    )
    assert sweep_plan.cumulative_sizes(18) == (1, 2, 4, 8, 16, 18)
    assert sweep_plan.cumulative_sizes(2) == (1, 2)


# --- statistics on synthetic cells -----------------------------------------------------------

SETTINGS = {
    "ctx": 512,
    "batch": 512,
    "chunks": 8,
    "kld_chunks": 8,
    "engine": "llama-perplexity",
    "placebo_seeds": [1, 2, 3],
    "twin_dtype": None,
}
IDENT = Identity(
    model_sha256="a" * 64,
    measured_sha256="a" * 64,
    corpus_sha256="c" * 64,
    llama_version="0000 (stub)",
    settings=SETTINGS,
)


def _record(
    layer: int | None,
    treat,
    placebos,
    *,
    kind="ffn_norm",
    series="layer",
    n=None,
    ident=IDENT,
    run_id="R1",
    identical=False,
) -> cell_record.CellRecord:
    treat = [float(x) for x in treat]
    cell = sweep_plan.Cell(
        model="m",
        kind=kind,
        fmt="bf16",
        rounding="truncate",
        variant="deployed",
        series=series,
        layers=str(layer) if layer is not None else "all",
        layer=layer if series == "layer" else None,
        n_layers=n or (1 if series == "layer" else None),
    )
    pl = tuple(
        cell_record.CellPlacebo(
            seed=i + 1, key=f"k{i}", kld_mean=float(np.mean(c)), chunk_klds=tuple(c)
        )
        for i, c in enumerate(placebos)
    )
    res = stats.resolution(
        engine=measure.ENGINE_WORDS["llama-perplexity"],
        treatment_chunks=list(treat),
        treatment_mean=float(np.mean(treat)),
        placebo_chunks=[list(c) for c in placebos],
        placebo_means=[x.kld_mean for x in pl],
        identical=identical,
        label=measure.VARIANT_WORDS["deployed"],
    )
    p = None if identical else sweep_run.p_value(treat, [x.chunk_klds for x in pl])
    return cell_record.CellRecord(
        schema=cell_record.CELL_SCHEMA,
        run_id=run_id,
        cell=cell_record.CellInfo(**cell.to_json()),
        identity=ident,
        status="measured",
        numeric=cell_record.CellNumeric(
            tensors=("t",), n_elements=640, changed=14, max_abs=0.1, max_rel=0.004, mean_rel=1e-4
        ),
        treatment=cell_record.CellTreatment(
            identical=identical,
            kld_mean=float(np.mean(treat)),
            chunk_klds=tuple(treat),
            same_top_pct=95.0,
            ppl=17.1,
            baseline_ppl=17.0,
            delta_ppl_pct=0.6,
            delta_ppl_pct_err=0.2,
        ),
        placebo=pl,
        resolution=res,
        p_value=p,
        key=f"key-{cell.id}",
        started_at="2026-01-01T00:00:00Z",
    )


NOISE = [0.0030, 0.0034, 0.0029, 0.0033, 0.0031, 0.0032, 0.0030, 0.0035]


def _placebos(rng):
    return [[float(x) for x in np.asarray(NOISE) + rng.normal(0, 1e-4, 8)] for _ in range(3)]


def _cells_dir(tmp: Path, recs) -> Path:
    for r in recs:
        cell_record.save_cell(r, tmp / "results")
    return tmp / "results"


def test_p_value_is_scipys_one_sided_t_test():
    from scipy import stats

    t = [0.006, 0.007, 0.0065, 0.0062]
    pl = [[0.003, 0.004, 0.0035, 0.003], [0.0031, 0.0039, 0.0036, 0.0029]]
    d = np.asarray(t) - np.mean(pl, axis=0)
    expected = stats.ttest_1samp(d, 0.0, alternative="greater").pvalue
    assert sweep_run.p_value(t, pl) == pytest.approx(expected)
    assert sweep_run.p_value(t, []) is None  # no control: nothing to test
    assert sweep_run.p_value([0.1, 0.1], [[0.0, 0.0]]) == 0.0  # constant positive difference
    assert sweep_run.p_value([0.0, 0.0], [[0.1, 0.1]]) == 1.0


def test_analysis_ranks_with_ties_and_names_the_standout():
    rng = np.random.default_rng(0)
    recs = []
    for layer in range(6):  # layer 2 is far above its placebo, the rest are noise
        shift = 0.004 if layer == 2 else 0.0
        treat = list(np.asarray(NOISE) + shift + rng.normal(0, 1e-4, 8))
        recs.append(_record(layer, treat, _placebos(rng)))
    a = sweep_analysis.analyze([sweep_analysis.Loaded(Path(f"{r.cell.id}.json"), r) for r in recs])
    top = a.rows[0]
    assert top.cell.layer == 2 and top.discovery and (top.rank_lo, top.rank_hi) == (1, 1)
    assert top.q_value <= 0.05 < min(r.q_value for r in a.rows[1:])
    # the noise cells overlap one another: ties, a rank range, never a strict order
    assert all(r.rank_lo >= 2 and r.rank_hi > r.rank_lo for r in a.rows[1:])
    assert [r.rank_lo for r in a.rows[1:3]] == [2, 2]  # the top noise cells tie for 2nd
    assert a.n_tested == 6
    assert "Most sensitive: ffn_norm layer 2 (m, deployed, bf16)" in a.sentence
    assert "ffn_norm layer 2" in a.groups[0].sentence and "1 of 6 cells" in a.groups[0].sentence


def _decided(layer: int, ratios: list[float], rule=None) -> cell_record.CellRecord:
    """A cell run until decided whose treatment is exp(r) times its placebo in each chunk."""
    from fq_core.measurement.sequential import Rule, anytime_p, look, words

    rule = rule or Rule()
    placebo = [1.8e-7] * len(ratios)
    rec = _record(layer, [p * np.exp(r) for p, r in zip(placebo, ratios, strict=True)], [placebo])
    lk = look(rule, ratios)
    stop = msgspec.convert(
        {
            "rule": rule.to_json(),
            "n_chunks": len(ratios),
            "cap": rule.max_chunks,
            "stop": lk.stop or "cap",
            "ratio": lk.ratio,
            "low": lk.low,
            "high": lk.high,
            "spread": lk.spread,
            "p_value": anytime_p(rule, ratios),
            "log_ratios": ratios,
            "words": words(lk, rule),
        },
        cell_record.SequentialStop,
    )
    return msgspec.structs.replace(rec, sequential=stop, p_value=stop.p_value)


def test_cells_stopped_at_different_chunks_are_ranked_on_the_chunks_they_share():
    """Layer 1 stopped after 2 chunks far above; layer 0 ran 8, lower. Compared on their
    2 shared chunks (paired KLD ratios), 1 is clearly above 0; layer 2, which tracks layer 0
    chunk for chunk at a slightly higher level, is not clearly above it on 2 shared chunks."""
    a = _decided(0, [1.3, 1.2, 1.4, 1.1, 0.9, 1.5, 1.3, 1.1])
    b = _decided(1, [4.8, 5.0])
    c = _decided(2, [1.5, 1.4])
    assert a.sequential.n_chunks == 8 and b.sequential.stop == "far above"
    rows = sweep_analysis.analyze(
        [sweep_analysis.Loaded(Path(f"{r.cell.id}.json"), r) for r in (a, b, c)]
    ).rows
    rank = {r.cell.layer: (r.rank_lo, r.rank_hi) for r in rows}
    assert rank == {1: (1, 1), 0: (2, 3), 2: (2, 3)}, rank
    assert sweep_analysis._paired_above(
        sweep_analysis.SweepRow(Path("b"), b), sweep_analysis.SweepRow(Path("a"), a)
    )


def test_a_cell_whose_type_cannot_store_its_rows_is_refused_with_the_tensor(factory):
    """The factory's 64-wide rows take q8_0 (blocks of 32) but not q4_k (256): those cells
    are skipped at collection with the tensor and the reason, the others run."""
    plan = _plan(formats=(("q8_0", "truncate"), ("q4_k", "truncate"), ("bf16", "truncate")))
    index = read_index(factory.path)
    why = {c.id: sweep_plan.refusal(c, index) for c in sweep_plan.cells_for(plan, "f", index)}
    refused = {cid: w for cid, w in why.items() if w}
    assert refused and all("-q4_k-" in cid for cid in refused), refused
    assert len(refused) == len(why) // 3
    first = next(iter(refused.values()))
    assert first.startswith("blk.0.ffn_norm.weight: rows of 64 values are not a multiple"), first


def test_one_rule_names_every_cell_but_only_ranked_cells_go_on(factory):
    """Until decided, every intrinsic cell of a sweep carries the same rule (it is part of the
    identity the report checks all cells share); a cumulative cell runs it with rank_chunks 0:
    not ranked, its treatment rests with its placebo."""
    plan = _plan(variants=("intrinsic",), until_decided=8, rank_chunks=6)
    cells = sweep_plan.cells_for(plan, "factory", read_index(factory.path))
    series = {c.series for c in cells}
    assert series == {"layer", "cumulative"}
    rules = {c.series: plan.rule_for(c) for c in cells}
    assert len({r.to_json()["rank_chunks"] for r in rules.values()}) == 1
    assert (
        sweep_run._running(rules["layer"], next(c for c in cells if c.series == "layer"))
        == (rules["layer"])
    )
    cum = next(c for c in cells if c.series == "cumulative")
    assert sweep_run._running(rules["cumulative"], cum).rank_chunks == 0
    assert (
        _plan(variants=("intrinsic",), until_decided=4, rank_chunks=6).rule_for(cum).rank_chunks
        == 4
    )


def test_cells_ranked_on_chunks_fixed_in_advance_use_a_paired_t_interval():
    """Two cells whose treatments ran the rule's 6 ranking chunks, one 1.25× the other in
    every chunk give or take 5 %: a paired t-interval on those 6 chunks orders them; the same
    cells without a fixed count (rank_chunks 0) are compared by the confidence sequence,
    which 6 chunks cannot resolve at 1.25×. A reversed pair is ordered the other way."""
    from fq_core.measurement.sequential import Rule

    rng = np.random.default_rng(3)
    low = [float(x) for x in 1.0 + rng.normal(0, 0.3, 6)]  # the text's swing: shared by both cells
    high = [r + float(np.log(1.25) + rng.normal(0, 0.05)) for r in low]
    for rank_chunks, ordered in ((6, True), (0, False)):
        rule = Rule(rank_chunks=rank_chunks)
        a, b = _decided(0, high, rule), _decided(1, low, rule)
        row = {r.cell.layer: sweep_analysis.SweepRow(Path("x"), r) for r in (a, b)}
        assert sweep_analysis._paired_above(row[0], row[1]) is ordered, rank_chunks
        assert sweep_analysis._paired_above(row[1], row[0]) is False


def test_the_storage_table_orders_cells_by_kld_per_byte_saved():
    """A cell that llama.cpp can store shows its bytes in the model and as the format; the
    table puts the cheapest KLD per MB saved first and a cell that grows the file last."""

    def stored(layer, kld, before, after):
        rec = _record(layer, [kld] * 4, [[1e-8] * 4])
        num = msgspec.structs.replace(rec.numeric, bytes_model=before, bytes_format=after)
        return msgspec.structs.replace(rec, numeric=num)

    recs = [
        stored(0, 1e-3, 1_000_000, 900_000),  # 0.1 MB saved: 1e-2 per MB
        stored(1, 2e-3, 1_000_000, 500_000),  # 0.5 MB saved: 4e-3 per MB
        stored(2, 1e-5, 1_000_000, 1_100_000),  # grows
    ]
    a = sweep_analysis.analyze([sweep_analysis.Loaded(Path(f"{i}"), r) for i, r in enumerate(recs)])
    (g,) = sensitivity.group_views(a)
    assert [r.label for r in g.storage] == [
        "ffn_norm layer 1",
        "ffn_norm layer 0",
        "ffn_norm layer 2",
    ]
    assert [r.per_mb for r in g.storage] == ["0.0040", "0.0100", "—"], [r.per_mb for r in g.storage]
    assert g.storage[0].stored == "1,000,000 → 500,000" and g.storage[2].saved == "-100,000"
    md = sensitivity.render_files(a)[sensitivity.MARKDOWN].decode()
    assert "| ffn_norm layer 1 | 1,000,000 → 500,000 | 500,000 | 0.0040 |" in md, md


def test_analysis_says_when_nothing_stands_out():
    rng = np.random.default_rng(1)
    recs = [
        _record(n, list(np.asarray(NOISE) + rng.normal(0, 1e-4, 8)), _placebos(rng))
        for n in range(4)
    ]
    a = sweep_analysis.analyze([sweep_analysis.Loaded(Path("x"), r) for r in recs])
    assert a.sentence.startswith("No layer or tensor kind stands out: none of the 4 tested")
    assert not any(r.discovery for r in a.rows)
    assert all((r.rank_lo, r.rank_hi) == (1, 4) for r in a.rows)  # all tied


def test_cells_all_above_their_placebos_but_tied_do_not_stand_out():
    rng = np.random.default_rng(8)
    recs = [
        _record(n, list(np.asarray(NOISE) + 0.002 + rng.normal(0, 3e-4, 8)), _placebos(rng))
        for n in range(4)
    ]
    a = sweep_analysis.analyze([sweep_analysis.Loaded(Path("x"), r) for r in recs])
    assert all(r.discovery for r in a.rows) and not a.groups[0].leaders
    assert a.sentence.startswith("No layer or tensor kind stands out: 4 of the 4 tested cells")
    assert "a tie, not a ranking" in a.groups[0].sentence


def test_placebos_that_change_nothing_give_a_floor_of_zero():
    """Gemma3's last layers: a flipped lowest bit moves no printed KLD digit."""
    rec = _record(17, [4e-4, 5e-4, 4.5e-4, 4e-4], [[0.0] * 4, [0.0] * 4, [0.0] * 4])
    assert rec.resolution.floor == 0.0 and rec.resolution.ratio is None
    assert rec.resolution.resolved and rec.p_value < 0.01
    assert "floor of 0" in rec.resolution.sentence


def test_identical_cells_are_not_tested_and_say_so():
    rec = _record(0, [0.0] * 8, [], identical=True)
    a = sweep_analysis.analyze([sweep_analysis.Loaded(Path("x"), rec)])
    assert a.n_tested == 0 and a.rows[0].verdict == "identical file: no element changed"
    assert "byte-identical" in a.groups[0].sentence


# --- merging shards -----------------------------------------------------------------------------


def _sweep_records(rng, **kw):
    recs = []
    for layer in range(4):
        treat = list(np.asarray(NOISE) + (0.003 if layer == 0 else 0) + rng.normal(0, 1e-4, 8))
        recs.append(_record(layer, treat, _placebos(rng), **kw))
    recs.append(
        _record(
            None, list(np.asarray(NOISE) + 0.001), _placebos(rng), series="cumulative", n=2, **kw
        )
    )
    return recs


def test_shards_merge_to_the_same_numbers(tmp_path):
    recs = _sweep_records(np.random.default_rng(2))
    whole = _cells_dir(tmp_path / "one", recs)
    a = _cells_dir(tmp_path / "a", recs[:2])
    b = _cells_dir(tmp_path / "b", recs[2:])
    single = sweep_analysis.analyze_dirs([whole]).to_json()
    merged = sweep_analysis.analyze_dirs([a, b]).to_json()
    assert merged == single
    # the same cell in two shards is kept once
    assert sweep_analysis.analyze_dirs([a, b, whole]).to_json() == single


def test_shards_that_disagree_are_refused_in_one_line(tmp_path):
    rng = np.random.default_rng(3)
    other = msgspec.structs.replace(IDENT, settings={**SETTINGS, "chunks": 4})
    a = _cells_dir(tmp_path / "a", _sweep_records(rng)[:2])
    b = _cells_dir(tmp_path / "b", _sweep_records(rng, ident=other)[2:])
    with pytest.raises(BadInput) as exc:
        sweep_analysis.analyze_dirs([a, b])
    text = str(exc.value)
    assert "\n" not in text and "settings.chunks 8 → 4" in text and "m (deployed)" in text
    gpu = msgspec.structs.replace(IDENT, llama_version="0000 (stub) [cuda; -ngl 99]")
    c = _cells_dir(tmp_path / "c", _sweep_records(rng, ident=gpu)[2:])
    with pytest.raises(BadInput, match=r"llama.cpp version 0000 \(stub\) → .*cuda"):
        sweep_analysis.analyze_dirs([a, c])
    rebuilt = msgspec.structs.replace(IDENT, llama_build="e" * 64)  # same version, other files
    e = _cells_dir(tmp_path / "e", _sweep_records(rng, ident=rebuilt)[2:])
    with pytest.raises(BadInput, match=r"llama.cpp build SHA-256 — → eeeeeeeeeeee…"):
        sweep_analysis.analyze_dirs([a, e])
    # the same cell measured differently is refused, not silently picked
    d = _cells_dir(tmp_path / "d", _sweep_records(np.random.default_rng(4))[:1])
    with pytest.raises(BadInput, match="measured differently"):
        sweep_analysis.analyze_dirs([a, d])


def test_cells_dir_accepts_a_root_a_run_and_the_cells(tmp_path):
    root = _cells_dir(tmp_path, _sweep_records(np.random.default_rng(5)))
    cells = root / "R1" / "sweep" / "cells"
    for given in (root, root / "R1", root / "R1" / "sweep", cells):
        assert sweep_analysis.cells_dir(given) == cells
    with pytest.raises(BadInput, match="not found"):
        sweep_analysis.cells_dir(tmp_path / "missing")
    # a sweep's cells are one level deeper than stage records: the stage report never reads them
    from fq_core.report import is_run_dir

    assert not is_run_dir(root / "R1")


# --- the reports --------------------------------------------------------------------------------


def test_reports_are_self_contained_and_link_their_charts(tmp_path):
    root = _cells_dir(tmp_path, _sweep_records(np.random.default_rng(6)))
    rep = sensitivity.write_report(sweep_analysis.analyze_dirs([root]), tmp_path / "out")
    html = rep.html.read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 3  # heatmap, per-layer curve, cumulative
    assert 'src="http' not in html and "<script" not in html
    assert rep.analysis.sentence in html
    md = rep.markdown.read_text(encoding="utf-8")
    links = [line.split("](")[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]
    assert len(links) == 3 and all((rep.markdown.parent / link).is_file() for link in links)
    assert "| rank | cell |" in md and "ffn_norm layer 0" in md
    numbers = json.loads(rep.numbers.read_text())
    assert numbers["sentence"] == rep.analysis.sentence and len(numbers["cells"]) == 5
    section = sensitivity.section_html(rep.analysis)
    assert section.startswith('<div class="fq fq-sensitivity">') and "fq-ranked" in section


def test_fq_report_merges_shards_and_keeps_one_dir_reports(tmp_path, capsys):
    recs = _sweep_records(np.random.default_rng(7))
    a = _cells_dir(tmp_path / "a", recs[:3])
    b = _cells_dir(tmp_path / "b", recs[3:])
    assert main(["report", str(a), str(b), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert (
        "sweep: 5 cells from 2 directories" in out
        and (tmp_path / "out" / "sensitivity.md").is_file()
    )
    assert not (tmp_path / "out" / "test1_results.md").exists()
    # a dir without cells among several: exit 2, one line
    (tmp_path / "empty").mkdir()
    assert main(["report", str(a), str(tmp_path / "empty"), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no sweep cells" in err
    # one dir with neither stage results nor cells: the stage report's own error, as before
    assert main(["report", str(tmp_path / "empty"), str(tmp_path / "out3")]) == 2
    assert "no stage results" in capsys.readouterr().err


# --- one cell through the real code, llama.cpp stubbed -------------------------------------------


class StubRunner:
    """LlamaRunner's interface with no process: KLD grows with the bytes a file differs from
    the model by (treatments), placebos give a small seed-dependent noise."""

    threads = 1
    log_dir = None
    timeout_s = 60.0

    def __init__(self, tools, tmp: Path, original: Path) -> None:
        self.tools, self.tmp, self.original = tools, tmp, original.read_bytes()
        self.perplexity_calls = 0

    def _record(self, tool, *args):
        return CommandRecord(
            argv=(str(self.tools.bin_dir / tool), *map(str, args)),
            cwd=str(self.tmp),
            env={},
            started_at=results.utc_now(),
            duration_s=0.5,
            exit_status=0,
            stdout_path=self.tmp / "stdout",
            stderr_path=self.tmp / "stderr",
            timed_out=False,
            tool=tool,
        )

    def load(self, model, *, check=True):
        return LoadResult(True, 12.5, 1_000, self._record("llama-completion", model.path))

    def generate(self, model, prompt, n_tokens, *, chat=False, chat_template=None, **kw):
        from fq_core.measurement.llama.runner import Generation

        rec = self._record("llama-completion", "-m", model.path)
        return Generation(prompt, chat, "x", n_tokens, 100.0, "llama-completion", rec, (1,))

    def count_tokens(self, model, text):
        return 1_234

    def perplexity(
        self, model, text, *, ctx=512, batch=512, chunks=None, kl_base=None, kl_against=None
    ):
        self.perplexity_calls += 1
        if kl_base is not None:
            Path(kl_base).write_bytes(b"logits")
        n = chunks or 8
        data = Path(model.path).read_bytes()
        diff = sum(a != b for a, b in zip(data, self.original, strict=False))
        if "placebo" in model.name:
            mean = 0.003 + 1e-5 * int(model.name[-1])
        else:
            mean = 0.003 + 2e-5 * diff
        chunk = tuple(mean * (1 + 0.02 * ((i % 3) - 1)) for i in range(n))
        kld = None
        if kl_against is not None:
            kld = KLD(
                mean=float(np.mean(chunk)),
                mean_err=1e-4,
                median=mean,
                p90=mean,
                p99=mean,
                p999=mean,
                max=mean,
                same_top_pct=96.0,
                same_top_err=0.5,
                rms_dp_pct=1.0,
                ppl_ratio=1.001,
                chunk_means=chunk,
            )
        ppls = tuple(17.0 + 0.01 * i + 10 * mean for i in range(n))
        rec = self._record("llama-perplexity", "-m", model.path, "--chunks", n)
        return PerplexityResult(ppls[-1], 0.5, ppls, n, ctx, 2500.0, kld, rec)

    exact_perplexity = perplexity


@pytest.fixture
def stub_world(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = build_gguf(tmp_path / "model", "factory.gguf", n_layers=4)
    corpus_path = tmp_path / "corpus.txt"
    corpus_path.write_text("text\n" * 50, encoding="utf-8")
    ref = ModelRef("factory", model.path, sha256_file(model.path), None)
    corpus = Corpus(corpus_path, sha256_file(corpus_path), corpus_path.stat().st_size)
    tools = LlamaTools(
        bin_dir=tmp_path / "bin", version="0000 (stub)", build_info="stub", source="flag"
    )
    runner = StubRunner(tools, tmp_path, model.path)
    ctx = stages.Context("R-sweep", runner, tools, corpus, tmp_path / "results")
    exp = stages.Experiment()
    plan = _plan(layers="0-3")
    cells = sweep_plan.cells_for(plan, "factory", read_index(model.path))
    return ref, ctx, exp, cells, runner, tmp_path


def test_a_cell_is_cached_its_placebos_shared_and_its_gguf_deleted(stub_world):
    ref, ctx, exp, cells, runner, tmp = stub_world
    first = cells[0]
    rec = sweep_run.run_cell(first, ref, ctx, exp, chunks=4)
    assert rec.status == "measured", rec.error
    assert not rec.cached and len(rec.treatment.chunk_klds) == 4
    assert [p.cached for p in rec.placebo] == [False, False, False]
    assert rec.resolution is not None and rec.p_value is not None
    stored = cell_record.read_cell(cell_record.cell_path("R-sweep", first.id, tmp / "results"))
    assert stored == rec
    cache = tmp / "cache" / "fq-suite"
    assert not list(cache.rglob("*.gguf")), "disk flat: every fake-quantized GGUF is deleted"
    calls = runner.perplexity_calls
    again = sweep_run.run_cell(first, ref, ctx, exp, chunks=4)
    assert runner.perplexity_calls == calls, "a cached cell runs nothing"
    assert again.cached and all(p.cached for p in again.placebo)
    assert again.treatment == rec.treatment
    # another format of the same selection: a new treatment, the same (shared) placebos
    other = sweep_run.run_cell(dataclasses.replace(first, fmt="fp8_e4m3"), ref, ctx, exp, chunks=4)
    assert not other.cached and all(p.cached for p in other.placebo)
    assert runner.perplexity_calls == calls + 1


def _damage_cell(tmp: Path, key: str, change) -> None:
    path = tmp / "cache" / "fq-suite" / "cells" / key / "cell.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps(change(doc)))


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda doc: {}, "entry schema None is not 1"),
        (
            lambda doc: {**doc, "payload": {**doc["payload"], "kld_mean": 2.0e5}},
            "does not match its checksum",
        ),
    ],
)
def test_a_damaged_cell_is_measured_again_never_served_nor_dropped(stub_world, change, reason):
    """A cell holding {} (a KeyError in every later run, dropped from the report) or an
    edited KLD (reported as measured): moved aside, measured again, in the report."""
    ref, ctx, exp, cells, runner, tmp = stub_world
    first = sweep_run.run_cell(cells[0], ref, ctx, exp, chunks=4)
    _damage_cell(tmp, first.key, change)
    again = sweep_run.run_cell(cells[0], ref, ctx, exp, chunks=4)
    assert again.status == "measured" and not again.cached
    assert reason in again.rejected
    assert again.treatment == first.treatment  # 2e5 never reported
    assert again.measured_at >= first.measured_at
    aside = tmp / "cache" / "fq-suite" / "rejected" / "cells"
    assert [p.name.split(".")[0] for p in aside.iterdir()] == [first.key]
    analysis = sweep_analysis.analyze_dirs([tmp / "results"])
    assert [r.cell.id for r in analysis.rows] == [cells[0].id] and not analysis.errors
    sensitivity.write_report(analysis, tmp / "out")
    text = (tmp / "out" / sensitivity.MARKDOWN).read_text()
    assert f"- `{cells[0].id}`: " in text and reason in text  # measured again, and why
    cached = sweep_run.run_cell(cells[0], ref, ctx, exp, chunks=4)
    assert cached.cached and cached.measured_at == again.measured_at
    sensitivity.write_report(sweep_analysis.analyze_dirs([tmp / "results"]), tmp / "out2")
    text = (tmp / "out2" / sensitivity.MARKDOWN).read_text()
    assert f"(1 reused from the cell cache, measured {again.measured_at})" in text


def test_the_cell_key_changes_with_what_changes_the_numbers(stub_world):
    ref, ctx, exp, cells, runner, tmp = stub_world
    e = sweep_run.experiment_for(exp, cells[0], 4)
    target = measure.Target(ref, cells[0].layers)
    tools = ctx.tools
    names = ["blk.0.ffn_norm.weight"]

    def key(e=e, tools=tools, names=names, base="b" * 64, target=target):
        return measure.target_key(target, e, tools, ctx.corpus, names, base)

    assert key() == key()
    gpu = dataclasses.replace(tools, build_id=f"{tools.build_id} [cuda; -ngl 99]")
    rebuilt = dataclasses.replace(tools, build_id="e" * 64)  # same version string
    more = dataclasses.replace(e, settings=dataclasses.replace(e.settings, chunks=8))
    seeds = dataclasses.replace(e, placebo_seeds=(1,))
    assert key(tools=gpu) != key()
    assert key(tools=rebuilt) != key()
    assert key(e=more) != key()
    assert key(names=["blk.1.ffn_norm.weight"]) != key()
    assert key(e=dataclasses.replace(e, fmt="fp16")) != key()
    assert key(target=measure.Target(dataclasses.replace(ref, sha256="d" * 64), "0")) != key()
    # compared with other baseline logits (their content, not the baseline's key)
    assert key(base="c" * 64) != key()
    assert key(e=seeds) == key()  # placebos are cached runs of their own


def test_a_failing_cell_is_stored_with_its_reason(stub_world):
    ref, ctx, exp, cells, runner, tmp = stub_world
    from fq_core.errors import LlamaFailed

    def broken(*a, **kw):
        raise LlamaFailed("llama-perplexity exited with status 1: boom")

    runner.perplexity = broken
    rec = sweep_run.run_cell(cells[1], ref, ctx, exp, chunks=4)
    assert rec.status == "error" and "boom" in rec.error
    assert cell_record.read_cell(
        cell_record.cell_path("R-sweep", cells[1].id, tmp / "results")
    ).error


def test_backend_names_gpu_builds_and_layers(tmp_path):
    tools = LlamaTools(
        bin_dir=tmp_path / "bin", version="v", build_info="b", source="cache", build_id="id"
    )
    assert (
        sweep_run.backend(tools, None) == "" and sweep_run.tools_for_backend(tools, None) is tools
    )
    assert sweep_run.backend(tools, 0) == ""
    assert sweep_run.tools_for_backend(tools, 99).version == "v [-ngl 99]"
    (tmp_path / "build.json").write_text(json.dumps({"cmake_args": ["-DGGML_CUDA=ON"]}))
    assert sweep_run.backend(tools, None) == "cuda"
    assert sweep_run.tools_for_backend(tools, 20).version == "v [cuda; -ngl 20]"
    assert sweep_run.tools_for_backend(tools, 20).build_id == "id [cuda; -ngl 20]"


def test_runner_passes_gpu_layers_only_when_given(tmp_path):
    from fq_core.measurement.llama.runner import LlamaRunner

    tools = LlamaTools(bin_dir=tmp_path, version="v", build_info="b", source="flag")
    assert LlamaRunner(tools)._ngl() == []
    assert LlamaRunner(tools, gpu_layers=99)._ngl() == ["-ngl", "99"]


# --- the pytest wiring (collection only, on a factory model: offline) ----------------------------


def _pytest(tmp: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, FQ_RESULTS_DIR=str(tmp / "results"), FQ_LOG_DIR=str(tmp / "logs"))
    env.pop("PYTEST_XDIST_WORKER", None)
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "experiments/test_sensitivity.py",
        "-p",
        "no:cacheprovider",
        f"--html={tmp / 'reports' / 'report.html'}",
        f"--benchmark-json={tmp / 'bench.json'}",
        *args,
    ]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_collection_ids_selection_and_usage_errors(tmp_path):
    model = build_gguf(tmp_path / "m", "tiny.gguf", n_layers=3)
    full = ("--fq-sweep-plan", "full", "--fq-sweep-models", str(model.path))
    axes = ("--fq-sweep-kinds", "all", "--fq-sweep-formats", "bf16 int8")
    proc = _pytest(
        tmp_path, "--collect-only", "-q", *full, *axes, "--fq-sweep-variants", "deployed"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = [line.split("[", 1)[1].rstrip("]") for line in proc.stdout.splitlines() if "[" in line]
    # 2 formats x (attn_norm, ffn_norm: 3 layers + first02 + first03; output_norm) = 2 x 11
    assert len(ids) == 22 and "tiny-output_norm-int8-deployed" in ids
    assert (
        "tiny-attn_norm-blk02-bf16-deployed" in ids and "tiny-ffn_norm-first03-int8-deployed" in ids
    )
    sel = _pytest(tmp_path, "--collect-only", "-q", *full, "-k", "tiny and ffn_norm and bf16")
    lines = [line for line in sel.stdout.splitlines() if "[" in line]
    assert len(lines) == 5 and all(line.endswith("intrinsic]") for line in lines), sel.stdout
    both = (*full, "--fq-sweep-variants", "both", "-k", "tiny and ffn_norm and bf16")
    sel = _pytest(tmp_path, "--collect-only", "-q", *both)
    assert sum("[" in line for line in sel.stdout.splitlines()) == 10, sel.stdout  # 2 variants
    gate = _pytest(tmp_path, "--collect-only", "-q", *full, "-k", "layer0")
    assert "[" not in gate.stdout, "the stage gate's -k layer0 must not pick sweep cells"
    bad = _pytest(tmp_path, "--collect-only", "-q", "--fq-sweep-kinds", "all")
    assert bad.returncode == 4 and "add --fq-sweep-plan full" in bad.stderr


def test_two_models_with_one_stem_are_both_swept_under_their_own_ids(tmp_path):
    """The sweep's ids are the stages' (models.model_ids): no model dropped for its file name."""
    a = build_gguf(tmp_path / "a", "tiny.gguf", n_layers=2, seed=1).path
    b = build_gguf(tmp_path / "b", "tiny.gguf", n_layers=2, seed=2).path
    proc = _pytest(
        tmp_path,
        *("--collect-only", "-q", "--fq-sweep-plan", "full", "--fq-sweep-variants", "deployed"),
        *("--fq-sweep-models", f"{a} {b}", "--fq-sweep-cumulative", "false"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = {line.split("[", 1)[1].rstrip("]") for line in proc.stdout.splitlines() if "[" in line}
    shas = [hashlib.sha256(p.read_bytes()).hexdigest()[:8] for p in (a, b)]
    assert ids == {
        f"tiny-{sha}-ffn_norm-blk{layer:02d}-bf16-deployed" for sha in shas for layer in (0, 1)
    }, proc.stdout


# --- real llama.cpp: shards merge to the unsharded numbers; the overhead per cell ----------------


@pytest.mark.llama
@pytest.mark.models
def test_sharded_sweep_merges_to_the_unsharded_numbers(tmp_path):
    """The smoke sweep unsharded, then as two pytest-split shards with their own results
    directories, merged by `fq report`: identical numbers (cells are cached, so the shards
    only read the cell cache)."""
    none = tmp_path / "no-durations.json"  # split by count: both shards agree on the order
    runs = {}
    for name, extra in (
        ("one", ()),
        ("g1", ("--splits", "2", "--group", "1")),
        ("g2", ("--splits", "2", "--group", "2")),
    ):
        d = tmp_path / name
        proc = _pytest(d, "-q", "--durations-path", str(none), *extra, timeout=3600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[name] = d / "results"
    n = {k: len(list(v.glob("*/sweep/cells/*.json"))) for k, v in runs.items()}
    assert n["g1"] and n["g2"] and n["g1"] + n["g2"] == n["one"] == 3, n
    assert main(["report", str(runs["one"]), str(tmp_path / "rep-one")]) == 0
    assert main(["report", str(runs["g1"]), str(runs["g2"]), str(tmp_path / "rep-merged")]) == 0
    one = json.loads((tmp_path / "rep-one" / sensitivity.NUMBERS).read_text())
    merged = json.loads((tmp_path / "rep-merged" / sensitivity.NUMBERS).read_text())
    assert merged == one
    md = (tmp_path / "rep-merged" / sensitivity.MARKDOWN).read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table == [
        line
        for line in (tmp_path / "rep-one" / sensitivity.MARKDOWN).read_text().splitlines()
        if line.startswith("| ")
    ]


@pytest.mark.llama
@pytest.mark.models
def test_bench_cell_vs_bare_llama(benchmark, tmp_path, monkeypatch):
    """One deployed Gemma3 cell (fake-quantize one layer's ffn_norm, one llama-perplexity KLD
    run, the record) against that llama-perplexity command run bare on a file made
    beforehand. Placebos are left out (they are cached runs of their own); the baseline is
    made first, outside the timing."""
    from fq_core.measurement.corpus import resolve_corpus
    from fq_core.measurement.evaluate import evaluate_baseline
    from fq_core.measurement.llama.runner import LlamaRunner
    from fq_core.measurement.llama.tools import find_tools
    from fq_core.measurement.models import resolve_model
    from fq_core.measurement.patch import fake_quantize_file
    from fq_core.platform.paths import cache_dir

    chunks = 2  # the smoke plan's: its baseline is usually cached already
    monkeypatch.setenv("FQ_LOG_DIR", str(tmp_path / "logs"))
    tools, gemma, corpus = find_tools(), resolve_model("gemma3-270m"), resolve_corpus()
    threads = os.cpu_count() or 1
    runner = LlamaRunner(tools, threads=threads)
    ctx = stages.Context("bench", runner, tools, corpus, tmp_path / "results")
    exp = stages.Experiment(placebo_seeds=())
    cell = sweep_plan.Cell(
        model="gemma3-270m",
        kind="ffn_norm",
        fmt="bf16",
        rounding="truncate",
        variant="deployed",
        series="layer",
        layers="5",
        layer=5,
        n_layers=1,
    )
    e = sweep_run.experiment_for(exp, cell, chunks)
    base = evaluate_baseline(runner, gemma, corpus, e.settings)  # outside the timing
    key = sweep_run.run_cell(cell, gemma, ctx, exp, chunks=chunks).key
    shutil.rmtree(cache_dir() / "cells" / key)  # so that the timed run computes the cell

    treated = tmp_path / "bare.gguf"
    fake_quantize_file(gemma.path, treated, layers="5", tensors=("ffn_norm",), fsync=False)
    argv = [
        tools.path("llama-perplexity"),
        "-m",
        treated,
        "-f",
        corpus.path,
        "-c",
        "512",
        "-b",
        "512",
        "-t",
        str(threads),
        "--chunks",
        str(chunks),
        "--kl-divergence-base",
        base.kld_base,
        "--kl-divergence",
    ]

    def bare() -> float:
        t0 = time.perf_counter()
        subprocess.run(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=True,
            timeout=1800,
        )
        return time.perf_counter() - t0

    def cell_run():
        shutil.rmtree(cache_dir() / "cells" / key, ignore_errors=True)  # computed, not cached
        t0 = time.perf_counter()
        rec = sweep_run.run_cell(cell, gemma, ctx, exp, chunks=chunks)
        return time.perf_counter() - t0, rec

    # alternated, twice each, minimum of each: the machine's other load hits both alike
    bare_s = [bare()]
    cell_s, rec = benchmark.pedantic(cell_run, rounds=1, iterations=1)
    cells = [(cell_s, rec)]
    bare_s.append(bare())
    cells.append(cell_run())
    treated.unlink()
    assert all(r.status == "measured" for _, r in cells), [r.error for _, r in cells]
    t0 = time.perf_counter()
    assert sweep_run.run_cell(cell, gemma, ctx, exp, chunks=chunks).cached
    cached_s = time.perf_counter() - t0
    best_cell, best_rec = min(cells, key=lambda c: c[0])
    benchmark.extra_info.update(
        {
            "bare_llama_perplexity_s": [round(b, 2) for b in bare_s],
            "cell_s": [round(c, 2) for c, _ in cells],
            "cell_quantize_s": [round(r.timing.quantize_s, 2) for _, r in cells],
            "cell_llama_process_s": [round(r.timing.llama_s, 2) for _, r in cells],
            "overhead_ratio": round(best_cell / min(bare_s), 3),  # issue target ≤ 1.10
            # the same cell against its own llama.cpp process: immune to load between runs
            "overhead_ratio_own_process": round(best_cell / best_rec.timing.llama_s, 3),
            "cached_cell_s": round(cached_s, 3),
            "chunks": chunks,
            "threads": threads,
        }
    )
    print(benchmark.extra_info)


@pytest.mark.llama
@pytest.mark.models
def test_a_cell_run_until_decided_is_the_fixed_run_stopped_early(tmp_path):
    """An intrinsic cell run until decided (SmolLM2's twin, fp8 on layer 0, ctx 128, cap 4,
    ranked on 3 chunks): the record says how many chunks decided it and why it stopped; its
    placebo's per-chunk KLDs are the fixed-count run's on those chunks, its treatment's on the
    ranking's 3 (or more, when deciding took more), bit for bit (one engine, the same chunks,
    only the stops differ); its p-value is the sequence's anytime one."""
    axes = ("--fq-sweep-plan", "full", "--fq-sweep-models", "smollm2-135m")
    axes += ("--fq-sweep-formats", "fp8_e4m3", "--fq-sweep-layers", "0")
    axes += ("--fq-sweep-cumulative", "off", "--fq-ctx", "128")
    runs = {}
    for name, extra in (  # fixed first: the decided run finds its baseline cached
        ("fixed", ("--fq-sweep-until-decided", "off", "--fq-sweep-chunks", "4")),
        (
            "decided",
            (
                "--fq-sweep-until-decided",
                "on",
                "--fq-sweep-max-chunks",
                "4",
                "--fq-sweep-rank-chunks",
                "3",
            ),
        ),
    ):
        proc = _pytest(tmp_path / name, "-q", *axes, *extra, timeout=1800)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (cell,) = (tmp_path / name / "results").glob("*/sweep/cells/*.json")
        runs[name] = read_cell(cell)
    decided, fixed = runs["decided"], runs["fixed"]
    stop = decided.sequential
    assert stop is not None and fixed.sequential is None
    assert 2 <= stop.n_chunks <= 4 and stop.stop in STOP_REASONS
    assert stop.n_chunks < 4 or stop.stop in ("cap", "spread above sigma")
    n, ranked = stop.n_chunks, max(stop.n_chunks, 3)
    assert decided.treatment.chunk_klds == fixed.treatment.chunk_klds[:ranked]
    assert decided.placebo[0].chunk_klds == fixed.placebo[0].chunk_klds[:n]
    assert decided.p_value == stop.p_value and decided.p_test != fixed.p_test
    report = (tmp_path / "decided" / "reports" / sensitivity.MARKDOWN).read_text()
    shown = f"{ranked} · {stop.stop} at {n}" if ranked > n else f"{n} · {stop.stop}"
    assert f"| {shown} |" in report, report


@pytest.mark.llama
@pytest.mark.models
def test_a_weight_sweep_in_llama_cpp_types(tmp_path):
    """The smoke plan of weight kinds × llama.cpp types (SmolLM2's twin, layer 0, ctx 128,
    until decided, cap 2): ffn_down (rows of 1536) and attn_v (576) in q8_0 and q4_k; the
    attn_v × q4_k cell cannot exist (576 is not a multiple of 256) and is skipped with that
    reason; the other three are measured far above their floors (the interval's lower bound
    over 10× it) within the 2 chunks, and the sensitivity report draws a heatmap per format."""
    axes = ("--fq-sweep-plan", "full", "--fq-sweep-models", "smollm2-135m")
    axes += ("--fq-sweep-kinds", "ffn_down attn_v", "--fq-sweep-formats", "q8_0 q4_k")
    axes += ("--fq-sweep-layers", "0", "--fq-sweep-cumulative", "off", "--fq-ctx", "128")
    axes += ("--fq-sweep-until-decided", "on", "--fq-sweep-max-chunks", "2")
    proc = _pytest(tmp_path, "-rs", *axes, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "3 passed, 1 skipped" in out, out[-2000:]
    assert (
        "blk.0.attn_v.weight: rows of 576 values are not a multiple of q4_k's block of 256" in out
    )
    cells = {
        read_cell(f).cell.id: read_cell(f)
        for f in (tmp_path / "results").glob("*/sweep/cells/*.json")
    }
    assert sorted(cells) == [
        "smollm2-135m-attn_v-blk00-q8_0-intrinsic",
        "smollm2-135m-ffn_down-blk00-q4_k-intrinsic",
        "smollm2-135m-ffn_down-blk00-q8_0-intrinsic",
    ]
    for rec in cells.values():  # at the cap of 2 (a spread the rule does not trust stops
        assert rec.status == "measured" and rec.sequential.n_chunks == 2, rec.cell.id
        assert rec.sequential.low > 10 and rec.p_value < 1e-3, rec.sequential.words
        n, fmt = rec.numeric.n_elements, rec.cell.format
        per_block = {"q8_0": (32, 34), "q4_k": (256, 144)}[fmt]  # values, bytes
        assert rec.numeric.bytes_format == n // per_block[0] * per_block[1], rec.cell.id
        assert rec.numeric.bytes_model > 0
    assert (
        "Storage (bytes of the cell's tensors"
        in (tmp_path / "reports" / sensitivity.MARKDOWN).read_text()
    )
    charts = {p.name for p in (tmp_path / "reports" / "charts").glob("*heatmap*")}
    assert {
        f"sensitivity-smollm2-135m-intrinsic-{f}-heatmap.png" for f in ("q8_0", "q4_k")
    } <= charts


@pytest.mark.llama
@pytest.mark.models
def test_the_deployed_answer_of_a_llama_cpp_type_is_the_real_file(tmp_path):
    """Deployed cells of a llama.cpp type measure the real file (SmolLM2, layer 0, 2 chunks):
    ffn_down (Q4_1 in the model) stored as q8_0 runs on llama.cpp's q8_0 kernels; its
    placebos flip the lowest bit of the same layer's F32 tensors (a quantized tensor has no
    lowest bit to flip); ffn_norm stored as q8_0 is no file llama.cpp can run, and that is the
    cell's answer, in llama.cpp's words, in the report — not a failed test."""
    from fq_core.measurement.gguf_index import read_index
    from fq_core.measurement.models import resolve_model

    axes = ("--fq-sweep-plan", "full", "--fq-sweep-models", "smollm2-135m")
    axes += ("--fq-sweep-kinds", "ffn_down ffn_norm", "--fq-sweep-formats", "q8_0")
    axes += ("--fq-sweep-layers", "0", "--fq-sweep-cumulative", "off", "--fq-ctx", "128")
    axes += ("--fq-sweep-variants", "deployed", "--fq-sweep-chunks", "2")
    proc = _pytest(tmp_path, *axes, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "2 passed" in out, out[-2000:]
    cells = {
        read_cell(f).cell.id: read_cell(f)
        for f in (tmp_path / "results").glob("*/sweep/cells/*.json")
    }
    down = cells["smollm2-135m-ffn_down-blk00-q8_0-deployed"]
    norm = cells["smollm2-135m-ffn_norm-blk00-q8_0-deployed"]
    assert down.status == "measured", down.error
    assert down.numeric.tensors == ("blk.0.ffn_down.weight",)
    model = {t.name: t for t in read_index(resolve_model("smollm2-135m").path).tensors}
    assert model["blk.0.ffn_down.weight"].type_name != "Q8_0"
    assert 0 < down.numeric.changed <= down.numeric.n_elements == 576 * 1536
    assert down.numeric.bytes_format == 576 * 1536 // 32 * 34
    assert down.treatment.kld_mean > 0 and len(down.treatment.chunk_klds) == 2
    norms = sum(model[f"blk.0.{k}_norm.weight"].n_elements for k in ("attn", "ffn"))
    assert len(down.placebo) == len(down.identity.settings["placebo_seeds"]) > 0
    assert all(p.kld_mean is not None for p in down.placebo)
    from fq_core.storage import cache

    placebo_runs = [
        json.loads((cache.folder_for("placebos", p.key) / "placebo.json").read_text())
        for p in down.placebo
    ]
    assert {r["payload"]["n_elements"] for r in placebo_runs} == {norms}, placebo_runs
    assert norm.status == NOT_DEPLOYABLE
    assert norm.error == (
        "not deployable in this llama.cpp: binary_op: unsupported types: dst: f32, src0: f32, "
        "src1: q8_0"
    )
    report = (tmp_path / "reports" / sensitivity.MARKDOWN).read_text()
    assert "1 cell(s) not deployable in this llama.cpp: binary_op" in report, report
    assert "`smollm2-135m-ffn_norm-blk00-q8_0-deployed`" in report
    charts = {p.name for p in (tmp_path / "reports" / "charts").glob("*heatmap*")}
    assert "sensitivity-smollm2-135m-deployed-q8_0-heatmap.png" in charts, charts
