"""fq_core.storage.cache: a cached measurement is used only when it proves itself (issue 18,
item 3).

On real files: an entry and the file it stands for, damaged the ways a hand, a crash or an
older fq would (an entry holding `{}`, an edited figure, zeroed logits of the same size, an
entry copied under another key): each is a miss that says why in one log line, is moved
aside (never deleted) and is measured again. Then the stage protocol with llama.cpp stubbed
(tests/test_docs.py's StubRunner, real files and the real cache): the record and the report
say which figures came from the cache and when they were measured, and a damaged treatment
or placebo is remade instead of raising. The sweep's cells: tests/test_sweep.py; a real
SmolLM2 baseline edited and zeroed: tests/test_evaluate.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
from test_docs import StubRunner, _inputs

from fq_core.experiment import measure, protocol, stages
from fq_core.measurement import evaluate
from fq_core.platform import progress
from fq_core.platform.paths import cache_dir
from fq_core.report.markdown import write_reports
from fq_core.storage import cache, record, results

KEY = "k" * 20


def _compute(folder: Path) -> dict:
    (folder / "logits.bin").write_bytes(bytes(range(256)) * 16)
    with open(folder.parent.parent / "computed", "a") as f:
        f.write(f"{os.getpid()}\n")
    return {"ppl": 17.25, "chunks": [1.5, 2.5]}


def _decode(payload: dict) -> dict:
    float(payload["ppl"]), list(payload["chunks"])  # the shape a reader relies on
    return payload


def _entry(key: str = KEY) -> cache.Entry:
    return cache.verified(
        "baselines", key, "baseline.json", _compute, decode=_decode, files=("logits.bin",)
    )


def _n_computed() -> int:
    path = cache_dir() / "computed"
    return len(path.read_text().split()) if path.exists() else 0


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path


def test_an_entry_is_measured_once_then_read_back_with_when_it_was_measured(private_cache):
    first = _entry()
    again = _entry()
    assert (first.hit, again.hit, _n_computed()) == (False, True, 1)
    assert again.value == first.value == {"ppl": 17.25, "chunks": [1.5, 2.5]}
    assert again.measured_at == first.measured_at and first.measured_at.endswith("Z")
    assert again.files == first.files and len(first.files["logits.bin"]) == 64
    doc = json.loads((first.folder / "baseline.json").read_text())
    assert (doc["entry_schema"], doc["kind"], doc["key"]) == (cache.SCHEMA, "baselines", KEY)
    assert doc["files"]["logits.bin"]["bytes"] == 4096


def _edit(doc_path: Path, change) -> None:
    doc = json.loads(doc_path.read_text())
    change(doc)
    doc_path.write_text(json.dumps(doc))


def _reseal(doc: dict) -> None:
    """An attacker who knows the checksum rule: a payload of the wrong shape, sealed."""
    doc["payload"] = {}
    doc["payload_sha256"] = cache.payload_sha256({})


DAMAGE = {
    "an entry holding {}": (
        lambda f: (f / "baseline.json").write_text("{}"),
        "entry schema None is not 1",
    ),
    "not JSON": (lambda f: (f / "baseline.json").write_text("{half"), "not valid JSON"),
    "a figure edited": (
        lambda f: _edit(f / "baseline.json", lambda d: d["payload"].update(ppl=20.31)),
        "does not match its checksum",
    ),
    "a wrong shape, resealed": (
        lambda f: _edit(f / "baseline.json", _reseal),
        "is not a baselines entry (KeyError",
    ),
    "logits zeroed, same size": (
        lambda f: (f / "logits.bin").write_bytes(bytes(4096)),
        "logits.bin does not match its SHA-256",
    ),
    "logits truncated": (
        lambda f: os.truncate(f / "logits.bin", 100),
        "logits.bin has 100 bytes, not 4096",
    ),
    "logits missing": (lambda f: (f / "logits.bin").unlink(), "logits.bin is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_an_entry_that_fails_its_proof_is_moved_aside_and_measured_again(
    private_cache, caplog, damage
):
    hurt, reason = DAMAGE[damage]
    first = _entry()
    hurt(first.folder)
    damaged = {p.name: p.read_bytes() for p in first.folder.iterdir()}
    events = []
    listener = progress.subscribe(events.append)
    try:
        with (
            caplog.at_level(logging.WARNING, logger="fq_core.storage.cache"),
            progress.step("baseline"),
        ):
            again = _entry()
    finally:
        progress.unsubscribe(listener)
    (end,) = [e for e in events if e.kind == "end"]  # the progress line says it too
    assert end.notes == (f"cache entry rejected ({again.rejected}), measured again",)
    assert not again.hit and _n_computed() == 2
    assert reason in again.rejected and "\n" not in again.rejected
    assert again.value == first.value and again.files == first.files  # measured again
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert f"baselines/{KEY} rejected: " in lines[0] and reason in lines[0]
    (aside,) = (cache_dir() / cache.REJECTED / "baselines").iterdir()
    assert aside.name.startswith(KEY) and aside.name in lines[0]
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == damaged  # kept, not deleted
    assert _entry().hit and _n_computed() == 2


def test_an_entry_copied_under_another_key_is_not_that_key(private_cache):
    first = _entry()
    other = cache.folder_for("baselines", "o" * 20)
    shutil.copytree(first.folder, other)
    entry = _entry("o" * 20)
    assert not entry.hit and f"it is the entry of baselines {KEY}" in entry.rejected


def _compute_in_child(args):
    xdg, key = args
    os.environ["XDG_CACHE_HOME"] = xdg
    return _entry(key).value


def test_an_entry_is_computed_once_across_processes(private_cache):
    args = (os.environ["XDG_CACHE_HOME"], KEY)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        values = pool.map(_compute_in_child, [args] * 8)
    assert _n_computed() == 1 and all(v == values[0] for v in values)


# --- the stage protocol: provenance in the record and the report ------------------------------


@pytest.fixture
def stage_world(private_cache):
    ref, corpus, tools = _inputs(private_cache)

    def run(run_id: str) -> record.StageRecord:
        ctx = stages.Context(
            run_id, StubRunner(tools, private_cache), tools, corpus, private_cache / "results"
        )
        protocol.run_stage(stages.GATE_STAGE, ref, ctx, stages.Experiment())
        return results.load_record(run_id, stages.GATE_STAGE.id, ref.name, ctx.results_root)

    return run, ref, corpus, tools


ROLES = ["baseline", "treatment", "placebo seed 1", "placebo seed 2", "placebo seed 3"]


def test_the_record_and_the_report_say_which_figures_came_from_the_cache(stage_world):
    run, *_ = stage_world
    first = run("R1")
    assert [u.role for u in first.cache] == ROLES
    assert not any(u.hit for u in first.cache)
    second = run("R2")
    assert [u.role for u in second.cache] == ROLES and all(u.hit for u in second.cache)
    assert [u.measured_at for u in second.cache] == [u.measured_at for u in first.cache]
    assert second.treatment.kld.mean == first.treatment.kld.mean
    tmp = Path(os.environ["XDG_CACHE_HOME"]).parent
    text = write_reports(tmp / "results" / "R2", tmp / "out").test1.read_text()
    assert f"baseline from the cache, measured {second.cache[0].measured_at}" in text
    assert f"treatment from the cache, measured {second.cache[1].measured_at}" in text
    text = write_reports(tmp / "results" / "R1", tmp / "out1").test1.read_text()
    assert f"treatment measured in this run, {first.cache[1].measured_at}" in text


@pytest.mark.parametrize(
    "kind, name", [("treatments", "evaluation.json"), ("placebos", "placebo.json")]
)
def test_a_cached_treatment_or_placebo_holding_nothing_is_remade(stage_world, kind, name):
    run, *_ = stage_world
    first = run("R1")
    for entry in (cache_dir() / kind).iterdir():
        if entry.is_dir():
            (entry / name).write_text("{}")
    second = run("R2")
    assert second.outcome == first.outcome and "error" not in {
        c.status for c in second.checks.values()
    }
    remade = [u for u in second.cache if u.kind == kind]
    assert remade and all(not u.hit and "entry schema None" in u.rejected for u in remade)
    assert second.treatment.kld.mean == first.treatment.kld.mean
    assert second.placebo.kld_mean == first.placebo.kld_mean


def test_treatments_are_keyed_by_the_content_of_their_base(stage_world):
    _, ref, corpus, tools = stage_world
    settings = stages.Experiment().settings
    runner = StubRunner(tools, Path(os.environ["XDG_CACHE_HOME"]).parent)
    base = evaluate.evaluate_baseline(runner, ref, corpus, settings)
    stored = cache.read("baselines", base.key, "baseline.json", files=("logits.kld",))
    assert base.kld_base_sha256 == stored.files["logits.kld"] and stored.hit
    other = dataclasses.replace(base, kld_base_sha256="0" * 64)
    key = evaluate.treatment_key(ref, base, settings, tools.build_id)
    assert evaluate.treatment_key(ref, other, settings, tools.build_id) != key
    exp = stages.Experiment()
    placebo = measure.placebo_key(ref, corpus, tools, exp, "0", 1, base_sha256="a" * 64)
    assert measure.placebo_key(ref, corpus, tools, exp, "0", 1, base_sha256="b" * 64) != placebo
