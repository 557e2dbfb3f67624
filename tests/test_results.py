"""The results store: atomic JSON, run ids, cached computations and the gate record on disk."""

from __future__ import annotations

import json
import math
import re

import pytest
from record_factory import make_record

from fq_core.errors import BadInput
from fq_core.storage import record, results
from fq_core.storage.identity import Identity


def test_run_ids_sort_by_time_and_are_unique():
    ids = {results.new_run_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", i) for i in ids)


def test_result_path_layout(tmp_path):
    p = results.result_path("R1", "layers0-2", "gemma3-270m", tmp_path)
    assert p == tmp_path / "R1" / "layers0-2" / "gemma3-270m.json"
    with pytest.raises(BadInput):
        results.result_path("R1", "layer0", "..", tmp_path)


def test_save_and_load_round_trip_with_nonfinite_as_words(tmp_path):
    data = make_record(
        treatment=None,
        baseline={
            "ppl": float("nan"),
            "ppl_err": None,
            "chunk_ppls": [1.5, float("inf")],
            "n_chunks": 2,
            "tokens_per_s": None,
            "load_time_ms": None,
            "generations": [],
        },
    )
    path = results.save_result(record.from_builtins(data), tmp_path)
    assert json.loads(path.read_text())["baseline"]["ppl"] == "nan"  # not null: measured
    loaded = results.load_record("R1", "layer0", "m", tmp_path)
    assert list(record.to_builtins(loaded)["baseline"]["chunk_ppls"]) == [1.5, "inf"]
    assert results.load_record("R1", "layer0", "other", tmp_path) is None
    results.write_json_atomic(tmp_path / "R1" / "layer0" / "models" / "m.gguf.fq.json", {"t": 1})
    # results only, no manifest (compared as stored: NaN is not equal to itself)
    assert [record.encode(r) for r in results.iter_records("R1", tmp_path)] == [
        record.encode(loaded)
    ]
    assert math.isnan(loaded.baseline.ppl) and loaded.baseline.chunk_ppls == (1.5, math.inf)
    assert results.latest_run_id(tmp_path) == "R1"


def test_a_record_that_does_not_match_the_schema_is_refused_before_a_save(tmp_path):
    bad = make_record(corpus=dict(make_record()["corpus"], n_tokens="many"))
    with pytest.raises(BadInput, match=r"n_tokens"):
        results.save_result(record.from_builtins(bad), tmp_path)
    assert not any(tmp_path.rglob("*.json"))


def test_atomic_write_leaves_old_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "x.json"
    results.write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError):
        results.write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


def _components(**changes):
    base = dict(
        model_sha256="a" * 64,
        corpus_sha256="c" * 64,
        llama_build="b" * 64,
        format="bf16",
        rounding="truncate",
        settings={"ctx": 512, "chunks": 8},
        thresholds={"ppl_delta_max": 0.02},
    )
    base.update(changes)
    return Identity(**base)


def test_gate_key_depends_on_every_component():
    keys = {
        results.gate_key(_components()),
        results.gate_key(_components(model_sha256="b" * 64)),
        results.gate_key(_components(corpus_sha256="d" * 64)),
        results.gate_key(_components(llama_build="e" * 64)),
        results.gate_key(_components(format="fp16")),
        results.gate_key(_components(rounding="nearest")),
        results.gate_key(_components(settings={"ctx": 512, "chunks": 4})),
        results.gate_key(_components(thresholds={"ppl_delta_max": 0.01})),
    }
    assert len(keys) == 8
    assert results.gate_key(_components()) == results.gate_key(
        _components(settings={"chunks": 8, "ctx": 512})
    )


def test_gate_record_latest_verdict_wins(tmp_path):
    c = _components()
    assert results.lookup_gate(c, tmp_path) is None
    results.record_gate(c, model="m", outcome="passed", run_id="R1", root=tmp_path)
    assert results.lookup_gate(c, tmp_path).outcome == "passed"
    results.record_gate(c, model="m", outcome="failed", run_id="R2", reason="x", root=tmp_path)
    entry = results.lookup_gate(c, tmp_path)
    assert (entry.outcome, entry.run_id, entry.reason) == ("failed", "R2", "x")
    assert len(results.gate_entries(tmp_path)) == 1


def test_corrupt_gate_record_is_a_clear_error(tmp_path):
    (tmp_path / "gate.json").write_text("{not json")
    with pytest.raises(BadInput, match="gate.json"):
        results.lookup_gate(_components(), tmp_path)


def test_nonfinite_numbers_read_as_words_not_blanks(tmp_path):
    """A NaN is 'not a number' in the report, never the blank of 'not measured'."""
    from fq_core.report import load_run
    from fq_core.report.rows import MISSING, metric_rows

    data = make_record(
        baseline={
            "ppl": float("nan"),
            "ppl_err": None,
            "chunk_ppls": [float("-inf")],
            "n_chunks": 1,
            "tokens_per_s": None,
            "load_time_ms": None,
            "generations": [],
        },
    )
    results.save_result(record.from_builtins(data), tmp_path)
    (r,) = load_run(tmp_path / "R1").results
    ppl = next(row for row in metric_rows(r.record) if row.label.startswith("PPL"))
    assert ppl.baseline.text.startswith("not a number") and ppl.baseline.text != MISSING
    assert ppl.baseline.data_value == "nan"
