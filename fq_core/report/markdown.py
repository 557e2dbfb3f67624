"""`fq report RESULTS_DIR OUTPUT_DIR`: the plan's markdown reports from a stored run.

`test1_results.md` is the gate decision and its evidence; `experiment_results.md` compares
all stages. Both link the same PNG charts (OUTPUT_DIR/charts/). When the run was compared
with a reference (`--fq-compare`), both open with that comparison after the decision and
every metrics table gets a "vs reference" column; a stage × model measured by two runs or
more of the results store gets its history chart. A run with only Test 1 is
normal (`pytest -k layer0`): the experiment report then says stages 2–4 have no results
instead of failing.

Everything is rendered in memory first (templates/*.md.j2, from the same display rows as the
HTML report), then written: a new OUTPUT_DIR appears whole (built beside it and renamed), an
existing one gets each file replaced atomically. A results file that does not match the
record is BadInput naming the file and the field, and leaves no output behind.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..experiment.stages import GATE_STAGE, STAGES
from ..platform import atomic
from . import RunResults, decisions, load_run, resolve_run_dir
from . import charts as charts_mod
from . import rows as rows_mod
from .render import render

TEST1 = "test1_results.md"
EXPERIMENT = "experiment_results.md"
CHARTS = "charts"


@dataclass(frozen=True)
class MarkdownReports:
    test1: Path
    experiment: Path
    charts: tuple[Path, ...]
    run_dir: Path
    later_stages: bool


def render_reports(run: RunResults) -> dict[str, bytes]:
    """Both reports and their charts, in memory: {path relative to OUTPUT_DIR: bytes}."""
    all_charts = charts_mod.run_charts(run)
    files = {
        f"{CHARTS}/{c.key}.png": c.png
        for cs in all_charts.values()
        for c in cs
        if c.png is not None
    }
    links = {c.key: f"{CHARTS}/{c.key}.png" for cs in all_charts.values() for c in cs if c.png}
    views = rows_mod.decision_views(run, decisions(run))
    answers = rows_mod.answer_rows(run)
    common = {
        "run": run,
        "gate": GATE_STAGE,
        "decisions": views,
        "links": links,
        "reference": rows_mod.reference_block(run),
    }

    blocks = []
    for model in run.models:
        r = run.get(GATE_STAGE.id, model)
        view = rows_mod.stage_view(r) if r is not None else None
        blocks.append((model, view, all_charts[f"{r.stage}/{model}"] if r is not None else ()))
    test1_answers = tuple(a for a in answers if a.stage == GATE_STAGE.id)
    files[TEST1] = render(
        "test1_results.md.j2", blocks=blocks, answers=test1_answers, **common
    ).encode("utf-8")

    models = []
    for model in run.models:
        stages = [
            (rows_mod.stage_view(r), all_charts[f"{r.stage}/{model}"]) for r in run.for_model(model)
        ]
        models.append((model, all_charts[model], stages))
    files[EXPERIMENT] = render(
        "experiment_results.md.j2",
        later_present=run.later_stages_present(),
        later=STAGES[1:],
        overview=rows_mod.overview_rows(run),
        answers=answers,
        models=models,
        **common,
    ).encode("utf-8")
    return files


def _write_tree(out: Path, files: Mapping[str, bytes]) -> None:
    """A new directory appears whole (built beside it, then renamed); an existing one gets each
    file replaced atomically."""
    if out.is_dir():
        for rel, data in files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            atomic.write_bytes(out / rel, data, force=True)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    # not atomic's ".fq-tmp" name: that sweep removes stale temporary *files*
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.fq-tmpdir")
    tmp.mkdir()
    try:
        for rel, data in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_reports(results_dir: str | Path, output_dir: str | Path) -> MarkdownReports:
    """Write both markdown reports and their charts; returns what was written."""
    run_dir = resolve_run_dir(results_dir)
    run = load_run(run_dir)  # BadInput naming the file and the field, before any output
    out = atomic.check_directory(output_dir)
    files = render_reports(run)
    with atomic.output_errors(out):
        _write_tree(out, files)
    charts = tuple(out / rel for rel in files if rel.startswith(f"{CHARTS}/"))
    return MarkdownReports(
        out / TEST1, out / EXPERIMENT, charts, run_dir, run.later_stages_present()
    )
