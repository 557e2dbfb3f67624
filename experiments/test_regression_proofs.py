"""The regression rule on real llama.cpp runs (Gemma3-270M, Test 1's selection, 8 chunks).

Each run is a `pytest` subprocess of the stage tests into a results store of its own
(FQ_RESULTS_DIR in a temporary directory), the way a user or CI runs them:
- the same selection twice: the second run, compared with a reference saved from the first
  (`fq reference save`, then `--fq-compare DIR`), says "identical" and passes;
- placebo against placebo: a reference made from one placebo seed's run, compared with
  another seed's run as if it were the treatment, is no regression at the default
  tolerances (8 seeds, every ordered pair, the record's placebo runs as its control); with
  the noise estimated only from the other seeds (held out), the false alarms are counted;
- a worse format: fp8_e5m2 against the BF16 reference fails test_regression at kld:10%,
  naming the metric, both values and the tolerance; `fq diff` prints the table, exit 1;
- where the rule's limit lies (marked slow): int8, fp8_e4m3 and fp8_e5m2 against BF16 —
  each verdict follows from its KLD change against the tolerance and 2u.

Test names avoid the stage ids so that `pytest -k layer0` (make gate) does not select them.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from fq_core.experiment import regression
from fq_core.storage import history, record
from fq_core.storage.record import Placebo, Range, StageRecord

pytestmark = [pytest.mark.llama, pytest.mark.models]

ROOT = Path(__file__).resolve().parent.parent
STAGE, CASE = "layer0", "gemma3-270m"
PLACEBO_SEEDS = 8  # the placebo proof's run: pairs to compare, others to hold out


class Runs:
    """Stage runs made on demand, once per module, into one results store."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.store = base / "results"
        self.done: dict[str, subprocess.CompletedProcess] = {}

    def env(self) -> dict[str, str]:
        return dict(os.environ, FQ_RESULTS_DIR=str(self.store))

    def run(self, run_id: str, *args: str) -> subprocess.CompletedProcess:
        """Test 1 on Gemma3 as `make gate` runs it (default settings, 3 placebo seeds)."""
        if run_id not in self.done:
            argv = [
                sys.executable,
                "-m",
                "pytest",
                "experiments/test_stages.py",
                "-k",
                f"{STAGE} and not twin",
                "--fq-model",
                CASE,
                "--fq-twin",
                "deployed",
                "--fq-run-id",
                run_id,
                "-p",
                "no:cacheprovider",
                "-rA",
                "--color=no",
                f"--html={self.base / run_id}.html",
                f"--benchmark-json={self.base / run_id}-benchmark.json",
                *args,
            ]
            self.done[run_id] = subprocess.run(
                argv, cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=3600
            )
        return self.done[run_id]

    def record(self, run_id: str) -> StageRecord:
        return record.read(self.store / run_id / STAGE / f"{CASE}.json")

    def comparison(self, run_id: str) -> regression.RunComparison:
        return regression.read(history.comparison_path(run_id, STAGE, CASE, self.store))

    def fq(self, *args: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "fq_core.cli", *args]
        return subprocess.run(
            argv, cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=600
        )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("regression"))


@pytest.fixture(scope="module")
def bf16(runs: Runs) -> StageRecord:
    """The reference run: BF16 truncation, as `make gate` runs it."""
    proc = runs.run("BF16")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return runs.record("BF16")


@pytest.fixture
def note(request):
    """note(name, value): a measured figure, kept with the test (junit/html properties) and
    printed (shown by -rA)."""

    def add(name: str, value) -> None:
        request.node.user_properties.append((name, value))
        print(f"{name}: {value}")

    return add


def _outcome_line(stdout: str, test: str) -> str:
    lines = [ln for ln in stdout.splitlines() if f"::{test}[" in ln and ln.split()[0].isupper()]
    assert lines, f"no short summary line for {test}:\n{stdout[-3000:]}"
    return lines[0]


def test_the_same_selection_twice_is_identical(runs: Runs, bf16: StageRecord):
    ref_dir = runs.base / "fq-reference"
    saved = runs.fq("reference", "save", "BF16", str(ref_dir))
    assert saved.returncode == 0, saved.stderr
    proc = runs.run("AGAIN", f"--fq-compare={ref_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert _outcome_line(proc.stdout, "test_regression").startswith("PASSED")
    cmp = runs.comparison("AGAIN")
    assert cmp.status == "identical", regression.render_table(cmp)
    assert cmp.same_identity and cmp.reference_run_id == "BF16"
    assert "identical to the reference (reference " in proc.stdout
    diff = runs.fq("diff", "BF16", "AGAIN")
    assert diff.returncode == 0 and "IDENTICAL" in diff.stdout


def as_treatment(rec: StageRecord, seed: int, noise_seeds: tuple[int, ...]) -> StageRecord:
    """`rec` as if placebo `seed` had been its treatment, its control the `noise_seeds` runs.

    The llama.cpp figures (PPL, ΔPPL, KLD and its percentiles, same-top) are the placebo
    run's own; what no placebo run measures (elements changed, max rel error, generation,
    speed) stays the treatment's, the same on both sides of a comparison."""
    runs = {r.seed: r for r in rec.placebo.runs}
    run = runs[seed]
    noise = [runs[s] for s in noise_seeds]
    klds = [r.kld_mean for r in noise]
    treatment = msgspec.structs.replace(
        rec.treatment,
        ppl=run.ppl,
        ppl_err=run.ppl_err,
        delta_ppl_pct=run.delta_ppl_pct,
        delta_ppl_pct_err=run.delta_ppl_pct_err,
        kld=run.kld,
    )
    placebo = Placebo(
        seeds=noise_seeds,
        runs=tuple(noise),
        kld_mean=Range(min=min(klds), max=max(klds), mean=sum(klds) / len(klds)),
        delta_ppl_pct=None,
        same_top_pct=None,
        kld_ratio=run.kld_mean / max(klds),
        verdict="placebo as treatment",
    )
    return msgspec.structs.replace(
        rec, run_id=f"placebo{seed}", treatment=treatment, placebo=placebo
    )


def placebo_pairs(rec: StageRecord, noise_of):
    """Every ordered pair of placebo seeds (reference, now), each pair's control chosen by
    `noise_of(a, b)`: (a, b, control seeds, RunComparison at the default tolerances)."""
    seeds = tuple(r.seed for r in rec.placebo.runs)
    for a, b in itertools.permutations(seeds, 2):
        noise = noise_of(seeds, a, b)
        yield (
            a,
            b,
            noise,
            regression.compare_runs(as_treatment(rec, a, noise), as_treatment(rec, b, noise)),
        )


@pytest.fixture(scope="module")
def placebos(runs: Runs) -> StageRecord:
    proc = runs.run("PLACEBOS", "--fq-placebo-seeds", str(PLACEBO_SEEDS))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rec = runs.record("PLACEBOS")
    assert len(rec.placebo.runs) == PLACEBO_SEEDS
    return rec


def test_placebo_against_placebo_is_no_regression(placebos: StageRecord, note):
    klds = {r.seed: r.kld_mean for r in placebos.placebo.runs}
    note("placebo_kld", json.dumps(klds))
    every = list(placebo_pairs(placebos, lambda seeds, a, b: seeds))
    regressed = [(a, b, c.summary) for a, b, _, c in every if c.status == "regressed"]
    assert regressed == [], regressed[:3]
    assert all(c.status == "passed" for *_, c in every)  # never "identical": they differ
    # held out: the control is the other seeds only, so nothing knows the two compared
    held = list(
        placebo_pairs(placebos, lambda seeds, a, b: tuple(s for s in seeds if s not in (a, b)))
    )
    alarms = [
        (a, b, [m.metric for m in c.regressions]) for a, b, _, c in held if c.status == "regressed"
    ]
    note("held_out_false_alarms", f"{len(alarms)}/{len(held)}: {alarms}")
    # z = 2 is ~2.3% per gating metric one-sided; two noisy gating metrics (kld, same_top)
    assert len(alarms) <= 0.1 * len(held), alarms


def test_a_worse_format_fails_naming_the_metric(runs: Runs, bf16: StageRecord, note):
    proc = runs.run(
        "E5M2",
        "--fq-format",
        "fp8_e5m2",
        "-o",
        "fq_max_rel_error=0.25",
        "--fq-compare=BF16",
        "--fq-compare-fail=kld:10%",
    )
    assert proc.returncode == 1, proc.stdout[-3000:]
    line = _outcome_line(proc.stdout, "test_regression")
    assert line.startswith("FAILED"), line
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAILED")]
    assert len(failed) == 1, failed  # only test_regression: the absolute checks pass
    cmp = runs.comparison("E5M2")
    assert cmp.status == "regressed"
    for m in cmp.regressions:  # each named with both values, the change and the tolerance
        s = m.shown
        assert (
            f"{m.metric} {s.reference} → {s.now} ({s.change}; tolerance {m.tolerance}"
            in proc.stdout
        )
    assert {"changed", "max_rel"} <= {m.metric for m in cmp.regressions}  # exact: always seen
    (kld,) = [m for m in cmp.metrics if m.metric == "kld"]
    note("kld", kld.detail)
    assert kld.shown.reference == regression.METRICS["kld"].show(bf16.treatment.kld.mean)
    assert kld.shown.now == regression.METRICS["kld"].show(runs.record("E5M2").treatment.kld.mean)
    # mean KLD regressed exactly when its rise beats both the 10% and 2u (2 ± the placebo
    # spread of 3 seeds: 0.0013 on the machine the README quotes, where it is seen)
    assert (kld.verdict == "regressed") == (kld.change > max(kld.limit, kld.uncertainty))
    assert any(d.field == "settings.format" and d.now == "fp8_e5m2" for d in cmp.identity)
    diff = runs.fq("diff", "BF16", "E5M2", "--compare-fail", "kld:10%")
    assert diff.returncode == 1, diff.stderr
    assert "settings.format: bf16 → fp8_e5m2" in diff.stdout
    (row,) = [ln for ln in diff.stdout.splitlines() if ln.split()[:1] == ["kld"]]
    assert row.rstrip().endswith("REGRESSED")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "fp8_e5m2"])
def test_where_the_limit_lies(runs: Runs, bf16: StageRecord, fmt: str, note):
    """Each format against the BF16 reference at kld:10% and at the default kld:25%: the
    verdict on mean KLD is "regressed" exactly when the change exceeds both the tolerance
    and 2u (recorded per format: where the limit lies)."""
    run_id = fmt.upper().replace("_", "-")
    if fmt == "fp8_e5m2":
        runs.run(
            "E5M2",
            "--fq-format",
            fmt,
            "-o",
            "fq_max_rel_error=0.25",
            "--fq-compare=BF16",
            "--fq-compare-fail=kld:10%",
        )
        run_id = "E5M2"
    else:
        runs.run(run_id, "--fq-format", fmt, "-o", "fq_max_rel_error=1.5")
    now = runs.record(run_id)
    for tol in ("kld:10%", "kld:25%"):
        cmp = regression.compare_runs(bf16, now, tol)
        (kld,) = [m for m in cmp.metrics if m.metric == "kld"]
        d, limit, bound = kld.change, kld.limit, kld.uncertainty
        note(
            f"{tol}",
            f"{kld.shown.reference} → {kld.shown.now} ({kld.shown.change}), "
            f"limit {limit:.5f}, 2u {bound:.5f}: {kld.verdict}",
        )
        assert (kld.verdict == "regressed") == (d > max(limit, bound)), kld.detail
        assert cmp.status == "regressed"  # changed and max_rel always see a format change
