"""The one JSON codec: floats in memory, "nan"/"inf"/"-inf" in files, nothing else loosened."""

from __future__ import annotations

import json
import math
import struct

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fq_core.measurement.evaluate import _ppl_from
from fq_core.storage import codec, record, results
from fq_core.storage.record import KLD

EDGES = (0.0, -0.0, math.nan, math.inf, -math.inf, 5e-324, -1.7976931348623157e308, 1e-05)


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


class Holder(msgspec.Struct, frozen=True):
    x: float | None
    xs: tuple[float | None, ...] = ()
    by_name: dict[str, float | None] = {}


def same(a: float | None, b: float | None) -> bool:
    """The same float bit for bit (-0.0 is not 0.0); every NaN is one NaN ("nan" has no payload)."""
    if a is None or b is None:
        return a is b
    return (math.isnan(a) and math.isnan(b)) or bits(a) == bits(b)


def word(x: float) -> object:
    return "nan" if math.isnan(x) else {math.inf: "inf", -math.inf: "-inf"}.get(x, x)


@given(st.floats(), st.lists(st.floats() | st.none()))
def test_any_float_comes_back_bit_for_bit_and_is_a_word_in_the_file(x, xs):
    raw = codec.encode(Holder(x, tuple(xs), {"k": x}))
    back = codec.decode(raw, Holder)
    stored = json.loads(raw)
    assert same(back.x, x) and same(back.by_name["k"], x)
    assert len(back.xs) == len(xs) and all(same(a, b) for a, b in zip(back.xs, xs, strict=True))
    assert stored["x"] == word(x) and stored["by_name"]["k"] == word(x)
    assert stored["xs"] == [None if v is None else word(v) for v in xs]
    assert "NaN" not in raw.decode() and "Infinity" not in raw.decode()


def test_edge_values_and_null_stay_apart():
    """null is "not measured", "nan" is a measured NaN: the two never merge."""
    raw = codec.encode({"edges": EDGES, "none": None})
    assert json.loads(raw)["edges"][2:5] == ["nan", "inf", "-inf"]
    back = codec.decode(raw, dict[str, tuple[float | None, ...] | None])
    assert back["none"] is None
    assert [bits(v) for v in back["edges"] if not math.isnan(v)] == [
        bits(v) for v in EDGES if not math.isnan(v)
    ]
    assert codec.dumps(EDGES) == json.dumps([0.0, -0.0, "nan", "inf", "-inf", *EDGES[5:]])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("x", "1.5"),
        ("x", "null"),
        ("x", "NaN"),
        ("x", "Infinity"),
        ("n", "3"),
        ("n", 3.0),
        ("b", 1),
        ("b", "true"),
    ],
)
def test_lax_mode_reads_the_words_and_nothing_else(field, value):
    class Strict(msgspec.Struct):
        x: float | None = None
        n: int = 0
        b: bool = False

    with pytest.raises(msgspec.ValidationError, match=rf"at `\$\.{field}`"):
        codec.convert({field: value}, Strict)


def _baseline(chunk_ppls, text="hello") -> dict:
    gen = {"prompt": "p", "chat": False, "text": text, "n_tokens": 1, "tokens_per_s": math.nan}
    return {
        "ppl": math.inf,
        "ppl_err": None,
        "chunk_ppls": chunk_ppls,
        "n_chunks": len(chunk_ppls),
        "tokens_per_s": None,
        "load_time_ms": None,
        "generations": [gen],
    }


def test_a_stage_record_with_non_finite_figures_round_trips(tmp_path):
    from record_factory import make_record

    rec = record.from_builtins(make_record(baseline=_baseline([math.nan, -0.0, 17.5])))
    assert rec.baseline.ppl == math.inf and math.isnan(rec.baseline.chunk_ppls[0])
    path = results.save_result(rec, tmp_path)
    stored = json.loads(path.read_bytes())["baseline"]
    assert stored["ppl"] == "inf" and stored["ppl_err"] is None
    assert stored["chunk_ppls"] == ["nan", -0.0, 17.5]
    assert stored["generations"][0]["tokens_per_s"] == "nan"
    again = record.read(path)
    assert record.encode(again) == path.read_bytes()
    assert bits(again.baseline.chunk_ppls[1]) == bits(-0.0)


def test_a_string_field_that_reads_nan_stays_a_string():
    from record_factory import make_record

    rec = record.decode(
        record.encode(record.from_builtins(make_record(baseline=_baseline([1.0], "nan"))))
    )
    assert rec.baseline.generations[0].text == "nan"
    assert math.isnan(rec.baseline.generations[0].tokens_per_s)


def test_a_perplexity_run_cached_with_the_runners_old_kld_names_reads_forward():
    """Entries cached before the runner produced the record's KLD are read, not rejected."""
    command = {
        "argv": ["llama-perplexity"],
        "tool": "llama-perplexity",
        "cwd": "/",
        "env": {},
        "cleared_env": [],
        "started_at": "2026-01-01T00:00:00Z",
        "duration_s": 1.5,
        "exit_status": 0,
        "timed_out": False,
        "stdout_path": "/tmp/o",
        "stderr_path": "/tmp/e",
    }
    old = {
        "mean_kld": 0.01,
        "mean_kld_err": None,  # NaN, written as null before the codec
        "median_kld": 0.005,
        "p90_kld": 0.02,
        "p99_kld": 0.05,
        "p999_kld": 0.1,
        "max_kld": 0.3,
        "same_top_pct": 97.5,
        "same_top_err": 0.2,
        "rms_dp_pct": 1.1,
        "rms_dp_err": 0.1,
        "ppl_ratio": 1.01,
        "ppl_ratio_err": 0.001,
        "mean_ppl_q": 17.2,
        "raw": {"Mean KLD": [0.01, None]},
        "chunk_klds": [0.009, 0.011],
        "exact": False,
    }
    doc = {
        "ppl": 17.2,
        "ppl_err": None,
        "chunk_ppls": [17.0, 17.2],
        "n_chunks": 2,
        "ctx": 128,
        "tokens_per_s": None,
        "kld": old,
        "command": command,
        "details": None,
    }
    p = _ppl_from(doc)
    assert p.kld == KLD(
        mean=0.01,
        median=0.005,
        p90=0.02,
        p99=0.05,
        p999=0.1,
        max=0.3,
        same_top_pct=97.5,
        same_top_err=0.2,
        rms_dp_pct=1.1,
        ppl_ratio=1.01,
        chunk_means=(0.009, 0.011),
    )
    assert math.isnan(p.ppl_err) and p.command.stdout_path.name == "o"
    new = _ppl_from(json.loads(codec.dumps(dict(doc, kld=p.kld, ppl_err=math.nan))))
    assert new.kld == p.kld and math.isnan(new.ppl_err)
