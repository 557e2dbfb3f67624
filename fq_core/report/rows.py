"""The report's display rows, built once from the typed record; HTML and markdown render them.

Why one place: the HTML report (pytest-html) and the markdown reports (`fq report`) show the
same metrics, checks and environment. Every figure is read by attribute from
`fq_core.storage.record.StageRecord` — a misspelt field is an AttributeError here, never a blank —
and formatted with `fq_core.figures.figure`. "—" means the record holds None (not measured);
"" means the column does not apply to the row. Placebo comparisons are the protocol's words
(`record.placebo.compared`), shown as stored, never derived here; so are comparisons with
a reference (fq_core.experiment.regression.RunComparison: verdicts, changes, uncertainties,
identity).
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgspec

from ..experiment import checks
from ..experiment.regression import (
    METRICS,
    IdentityDifference,
    MetricComparison,
    RunComparison,
    magnitude,
)
from ..experiment.stages import GATE_STAGE
from ..figures import figure, interval, sci
from ..storage.record import (
    VARIANT_SUFFIX,
    Check,
    Command,
    Range,
    StageRecord,
    Standing,
    Versus,
)
from . import Decision, RunResults, StageResult, decisions, other_answer

MISSING = "—"  # the record holds None: not measured


# --- formatting ------------------------------------------------------------------------------


def text(x: float | int | None, spec: str, suffix: str = "", scale: float = 1.0) -> str:
    """A stored number as people read it; MISSING when the record holds None, and a value
    that is not a number says so (never a blank, which would mean "not measured")."""
    if x is None:
        return MISSING
    if not math.isfinite(x):
        return "not a number" if math.isnan(x) else ("+∞" if x > 0 else "−∞")
    return figure(x * scale if scale != 1.0 else x, spec) + suffix


def span(lo: float | int | None, hi: float | int | None, spec: str, suffix: str = "") -> str:
    if lo is None or hi is None:
        return MISSING
    return f"{text(lo, spec, suffix)} … {text(hi, spec, suffix)}"


def range_text(r: Range | None, spec: str, suffix: str = "") -> str:
    return MISSING if r is None else span(r.min, r.max, spec, suffix)


def spread(values: Iterable[float | int | None], spec: str, suffix: str = "") -> str:
    """The min … max of per-seed values as stored (MISSING when no seed measured it)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return MISSING
    return span(min(vals), max(vals), spec, suffix)


def limit(value: float | None, spec: str, *, op: str, scale: float = 1.0, suffix: str = "") -> str:
    """A threshold as text; a threshold left unset means the check only reports."""
    if value is None:
        return "reported only"
    return f"{op} {figure(value * scale if scale != 1.0 else value, spec)}{suffix}"


def plain(x: object) -> str:
    if x is None:
        return MISSING
    if isinstance(x, (tuple, list)):
        return ", ".join(plain(v) for v in x) if x else "(none)"
    return str(x)


#: how a placebo comparison reads: noise (green), above (red) or a note (grey)
TONES = {Standing.NOISE: "noise", Standing.ABOVE: "above", Standing.NONE: "note"}


def tone(standing: Standing | None) -> str:
    """The colour of a placebo comparison, from the category the protocol stored."""
    return "note" if standing is None else TONES[standing]


def words(versus: Versus | None) -> str:
    """A placebo comparison's words as stored; MISSING when the record holds none."""
    return MISSING if versus is None else versus.words


# --- rows ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableCell:
    """A value cell: `text` for people; `key` (record path, "<stage>/<model>/treatment/ppl")
    and `value` (the stored number, None = not measured) for machines."""

    text: str = ""
    key: str | None = None
    value: float | int | None = None

    @property
    def data_value(self) -> str | None:
        return _value(self.value)


EMPTY = TableCell()


def number(
    key: str, value: float | int | None, spec: str, suffix: str = "", *, scale=1.0, more=""
) -> TableCell:
    """A number cell; `more` (an uncertainty, a ratio) follows the number when there is one."""
    if value is None:
        return TableCell(MISSING, key, None)
    return TableCell(text(value, spec, suffix, scale) + more, key, value)


@dataclass(frozen=True)
class Row:
    """One metric: baseline beside treatment, the placebo range and the protocol's words."""

    label: str
    baseline: TableCell = EMPTY
    treatment: TableCell = EMPTY
    placebo: str = ""  # min … max over the placebo seeds
    verdict: str = ""  # record.placebo.compared's words, as stored
    standing: Standing | None = None  # and its category
    threshold: str = ""
    check: str = ""  # the check deciding on this metric
    status: str = ""  # that check's status (MISSING: not recorded)
    compares: tuple[str, ...] = ()  # the regression metrics (experiment.regression) of this row
    reference: tuple[RefCell, ...] = ()  # those metrics against the reference, when compared

    @property
    def tone(self) -> str:
        return tone(self.standing)


# --- against the reference (fq_core.experiment.regression's stored RunComparison) ---------------


def reference_tone(verdict: str) -> str:
    """How a regression verdict reads: worse (red), better (green), drift (amber: worse, but
    within its tolerance), same (grey: within noise, reported only, not measured)."""
    if verdict in ("regressed", "missing"):
        return "worse"
    if verdict in ("identical", "improved"):
        return "better"
    if verdict == "within tolerance":
        return "drift"
    return "same"


def status_tone(status: str) -> str:
    return {"regressed": "worse", "identical": "better", "passed": "better"}.get(status, "same")


def _value(x: float | None) -> str | None:
    """A stored number for a data attribute: its repr ("nan", "inf", "-inf" as stored), or None."""
    return None if x is None else repr(x)


def change_text(m: MetricComparison) -> str:
    """`+0.00182 (+30.6 %)`: the change in the metric's own format, relative change beside
    (not for figures that are percentages themselves: ΔPPL %, same-top %)."""
    metric = METRICS.get(m.metric)
    d = m.change
    if metric is None or d is None or not math.isfinite(d):
        return m.shown.change
    if d == 0:
        return "0"
    show = metric.show
    out = ("+" if d > 0 else "−") + magnitude(show, d)
    pct = m.change_pct
    if pct is not None and math.isfinite(pct) and getattr(show, "suffix", "").strip() != "%":
        out += f" ({pct:+.1f} %)".replace("-", "−")
    return out


@dataclass(frozen=True)
class RefCell:
    """One metric against the reference, as stored (fq_core.experiment.regression.MetricComparison):
    `text` for people, the stored change, uncertainty and verdict for machines."""

    metric: str
    text: str
    verdict: str
    detail: str  # the comparison's own line: both values, the change, why this verdict
    change: str | None  # data attributes: the stored numbers (repr), None = none
    change_pct: str | None
    uncertainty: str | None

    @property
    def tone(self) -> str:
        return reference_tone(self.verdict)


def reference_cell(m: MetricComparison, prefix: str = "") -> RefCell:
    """`+0.00182 (+30.6 %) ±0.00126 REGRESSED`, `identical`, `−0.0002 ±0.0005 within noise`."""
    if m.verdict == "identical":
        body = "identical"
    elif m.verdict in ("not measured", "off"):
        body = m.verdict
    elif m.verdict == "missing":
        body = f"MISSING (reference {m.shown.reference})"
    else:
        parts = [change_text(m)]
        if m.uncertain:
            parts.append(m.shown.uncertainty)
        parts.append("REGRESSED" if m.verdict == "regressed" else m.verdict)
        body = " ".join(p for p in parts if p and p != MISSING) or m.verdict
    return RefCell(
        metric=m.metric,
        text=prefix + body,
        verdict=m.verdict,
        detail=m.detail,
        change=_value(m.change),
        change_pct=_value(m.change_pct),
        uncertainty=_value(m.uncertainty),
    )


def _with_reference(rows: Sequence[Row], cmp: RunComparison | None) -> tuple[Row, ...]:
    """Each row with its metrics against the reference; a compared metric no row shows (KLD
    p99.9, RMS Δp, the placebo ratio) gets a row of its own. No comparison: rows unchanged."""
    if cmp is None or not cmp.metrics:
        return tuple(rows)
    by_key = {m.metric: m for m in cmp.metrics}
    out, used = [], set()
    for row in rows:
        cells = []
        for key in row.compares:
            if key in by_key:
                m = by_key[key]
                cells.append(reference_cell(m, "baseline: " if key == "baseline_ppl" else ""))
                used.add(key)
        out.append(dataclasses.replace(row, reference=tuple(cells)))
    for m in cmp.metrics:
        if m.metric not in used:
            out.append(
                Row(
                    m.label,
                    treatment=TableCell(m.shown.now),
                    compares=(m.metric,),
                    reference=(reference_cell(m),),
                )
            )
    return tuple(out)


def metric_rows(rec: StageRecord, comparison: RunComparison | None = None) -> tuple[Row, ...]:
    """Every metric of one stage × model, in the order both reports show them; with a
    comparison, each beside its change against the reference."""
    k = f"{rec.stage}/{rec.case}"
    n, b, t, p, th = rec.numeric, rec.baseline, rec.treatment, rec.placebo, rec.thresholds
    kld = t.kld if t is not None else None
    agr = t.agreement if t is not None else None
    cmp = p.compared if p is not None else None
    runs = p.runs if p is not None else ()

    def status(name: str) -> str:
        c = rec.checks.get(name)
        return MISSING if c is None else c.status

    def versus(v: Versus | None) -> dict:
        return {"verdict": words(v), "standing": v.standing if v is not None else None}

    changed = n.changed if n is not None else None
    total = n.n_elements if n is not None else None
    of = ""
    if changed is not None and total is not None:
        of = f" of {total:,}" + (f" ({100 * changed / total:.2f} %)" if total else "")
    rows = [
        Row(
            "elements changed"
            + (" — no element changed: the weights were already exact" if changed == 0 else ""),
            treatment=number(f"{k}/numeric/changed", changed, ",d", more=of),
            placebo=spread((r.changed for r in runs), ",d"),
            check="quantize",
            status=status("quantize"),
            compares=("changed",),
        ),
        Row("max abs error", treatment=number(f"{k}/numeric/max_abs", n and n.max_abs, ".3e")),
        Row("mean abs error", treatment=number(f"{k}/numeric/mean_abs", n and n.mean_abs, ".3e")),
        Row(
            "max rel error",
            treatment=number(f"{k}/numeric/max_rel", n and n.max_rel, ".3e"),
            threshold=limit(th.max_rel_error, "g", op="<"),
            check="numeric",
            status=status("numeric"),
            compares=("max_rel",),
        ),
        Row("mean rel error", treatment=number(f"{k}/numeric/mean_rel", n and n.mean_rel, ".3e")),
        Row(
            "PPL",
            baseline=number(
                f"{k}/baseline/ppl", b and b.ppl, ".4f", more=f" ± {text(b and b.ppl_err, '.4f')}"
            ),
            treatment=number(
                f"{k}/treatment/ppl", t and t.ppl, ".4f", more=f" ± {text(t and t.ppl_err, '.4f')}"
            ),
            placebo=spread((r.ppl for r in runs), ".4f"),
            compares=("ppl", "baseline_ppl"),
        ),
        Row(
            "ΔPPL (absolute)",
            treatment=number(f"{k}/treatment/delta_ppl", t and t.delta_ppl, "+.4f"),
        ),
        Row(
            "ΔPPL % (± paired uncertainty)",
            treatment=number(
                f"{k}/treatment/delta_ppl_pct",
                t and t.delta_ppl_pct,
                "+.2f",
                " %",
                more=f" ± {text(t and t.delta_ppl_pct_err, '.2f', ' %')}",
            ),
            placebo=range_text(p and p.delta_ppl_pct, "+.2f", " %"),
            **versus(cmp and cmp.delta_ppl),
            threshold=limit(th.ppl_delta_max, ".1f", op="|Δ| <", scale=100, suffix=" %"),
            check="perplexity",
            status=status("perplexity"),
            compares=("delta_ppl",),
        ),
        Row(
            "mean KLD (± err)",
            treatment=number(
                f"{k}/treatment/kld/mean",
                kld and kld.mean,
                ".3g",
                more=f" ± {text(kld and kld.mean_err, '.3g')}",
            ),
            placebo=range_text(p and p.kld_mean, ".3g"),
            **versus(cmp and cmp.kld),
            threshold=limit(th.kld_mean_max, "g", op="≤"),
            check="kld",
            status=status("kld"),
            compares=("kld",),
        ),
    ]
    for name, value in (
        ("median", kld and kld.median),
        ("p90", kld and kld.p90),
        ("p99", kld and kld.p99),
        ("max", kld and kld.max),
    ):
        rows.append(
            Row(
                f"KLD {name}",
                treatment=number(f"{k}/treatment/kld/{name}", value, ".3g"),
                compares=(f"kld_{name}",),
            )
        )
    rows.append(
        Row(
            "same top token",
            treatment=number(
                f"{k}/treatment/kld/same_top_pct", kld and kld.same_top_pct, ".2f", " %"
            ),
            placebo=range_text(p and p.same_top_pct, ".2f", " %"),
            **versus(cmp and cmp.same_top),
            threshold=limit(th.same_top_min, ".1f", op="≥", scale=100, suffix=" %"),
            check="kld",
            status=status("kld"),
            compares=("same_top",),
        )
    )
    rows.append(
        Row(
            f"greedy generation agreement ({divergence(agr)})",
            treatment=number(
                f"{k}/treatment/agreement/token_agreement",
                agr and agr.token_agreement,
                ".1f",
                " %",
                scale=100,
            ),
            threshold=limit(th.agreement_min, ".1f", op="≥", scale=100, suffix=" %"),
            check="agreement",
            status=status("agreement"),
            compares=("agreement",),
        )
    )
    ratio = t.speed_ratio if t is not None else None
    rows.append(
        Row(
            "tokens/s (llama-perplexity)",
            baseline=number(f"{k}/baseline/tokens_per_s", b and b.tokens_per_s, ".1f"),
            treatment=number(
                f"{k}/treatment/tokens_per_s",
                t and t.tokens_per_s,
                ".1f",
                more=f" ({text(ratio, '.2f')}×)" if ratio is not None else "",
            ),
            threshold=limit(th.speed_ratio_min, "g", op="≥", suffix="×"),
            check="speed",
            status=status("speed"),
            compares=("speed",),
        )
    )
    return _with_reference(rows, comparison)


def divergence(agr) -> str:
    if agr is None:
        return "not measured"
    fd = agr.first_divergence
    return "no divergence" if fd is None else f"first divergence at token {fd}"


@dataclass(frozen=True)
class Pair:
    label: str
    value: str


#: settings a record holds only when they apply: twin_dtype (intrinsic answer), chat_template
#: (fq_chat_template given; else the generation's own source is shown with it)
_UNSET_NOT_SHOWN = ("twin_dtype", "chat_template")


def setting_rows(rec: StageRecord) -> tuple[Pair, ...]:
    """Thresholds (unset: report only), then the settings the stage ran with."""
    out = [
        Pair(name, "unset (report only)" if value is None else plain(value))
        for name, value in msgspec.structs.asdict(rec.thresholds).items()
    ]
    s = rec.settings
    out += [
        Pair(f"setting {name}", plain(value))
        for name, value in msgspec.structs.asdict(s).items()
        if name != "prompts" and not (name in _UNSET_NOT_SHOWN and value is None)
    ]
    out.append(
        Pair(
            "setting prompts",
            "; ".join(f"{p.text!r}{' (chat)' if p.chat else ''}" for p in s.prompts) or "(none)",
        )
    )
    return tuple(out)


def environment_rows(rec: StageRecord) -> tuple[Pair, ...]:
    m, c, ll = rec.model, rec.corpus, rec.llama
    machine = ", ".join(f"{k} {plain(v)}" for k, v in msgspec.structs.asdict(rec.machine).items())
    return (
        Pair("model", m.name),
        Pair("model path", m.path),
        Pair("model SHA-256", m.sha256),
        Pair("corpus path", c.path),
        Pair("corpus SHA-256", c.sha256),
        Pair("corpus bytes / tokens", f"{plain(c.n_bytes)} / {plain(c.n_tokens)}"),
        Pair("llama.cpp version", ll.version),
        Pair("llama.cpp build", ll.build_info),
        Pair("llama.cpp build id", plain(ll.build_id)),
        Pair("llama.cpp bin dir", ll.bin_dir),
        Pair("fq version", rec.fq_version),
        Pair("machine", machine),
        Pair("run id", rec.run_id),
        Pair("started / finished", f"{rec.started_at} / {plain(rec.finished_at)}"),
        Pair("manifest", plain(rec.numeric.manifest if rec.numeric is not None else None)),
    )


@dataclass(frozen=True)
class CommandRow:
    role: str
    exit_status: str
    duration: str
    cached: bool  # reused from the cache: run by an earlier test or run
    shell: str  # the argv, shell-quoted
    stdout: str
    stderr: str


def command_rows(commands: Iterable[Command]) -> tuple[CommandRow, ...]:
    return tuple(
        CommandRow(
            role=c.role or "",
            exit_status=plain(c.exit_status) + (" (timed out)" if c.timed_out else ""),
            duration=text(c.duration_s, ".1f"),
            cached=bool(c.cached),
            shell=shlex.join(c.argv),
            stdout=c.stdout_path,
            stderr=c.stderr_path,
        )
        for c in commands
    )


@dataclass(frozen=True)
class SourceRow:
    """Where one part of a stage's figures came from (record.CacheUse), in words."""

    role: str  # baseline | treatment | placebo seed N
    hit: bool
    text: str  # "from the cache, measured … (entry …)" | "measured in this run, …"


def source_rows(rec: StageRecord) -> tuple[SourceRow, ...]:
    out = []
    for u in rec.cache:
        when = plain(u.measured_at)
        words = f"from the cache, measured {when}" if u.hit else f"measured in this run, {when}"
        words += f" ({u.kind}/{u.key[:12]})"
        if u.rejected:
            words += f"; an earlier cache entry was rejected: {u.rejected}"
        out.append(SourceRow(u.role, u.hit, words))
    return tuple(out)


@dataclass(frozen=True)
class GenerationRow:
    prompt: str
    baseline: str
    treatment: str


def generation_rows(rec: StageRecord) -> tuple[GenerationRow, ...]:
    if rec.baseline is None or rec.treatment is None:
        return ()
    return tuple(
        GenerationRow(f"{gb.prompt}{' (chat)' if gb.chat else ''}", gb.text, gt.text)
        for gb, gt in zip(rec.baseline.generations, rec.treatment.generations, strict=False)
    )


# --- a stage, the run, the decision ----------------------------------------------------------


@dataclass(frozen=True)
class StageView:
    """Everything both reports show about one stage × model."""

    stage: str
    title: str
    model: str
    layers: str
    outcome: str
    skip_reason: str | None
    metrics: tuple[Row, ...]
    checks: tuple[tuple[str, Check], ...]
    generations: tuple[GenerationRow, ...]
    settings: tuple[Pair, ...]
    environment: tuple[Pair, ...]
    commands: tuple[CommandRow, ...]
    sources: tuple[SourceRow, ...] = ()  # which figures came from the cache, measured when
    #: against the reference: the status line, and (when metrics were compared) the column
    reference: ReferenceView | None = None

    @property
    def compared(self) -> bool:
        """Whether the metrics table has its "vs reference" column."""
        return any(row.reference for row in self.metrics)


def stage_view(r: StageResult) -> StageView:
    rec = r.record
    return StageView(
        stage=rec.stage,
        title=rec.stage_title,
        model=rec.case,
        layers=rec.layers,
        outcome=rec.outcome,
        skip_reason=rec.skip_reason,
        metrics=metric_rows(rec, r.comparison),
        checks=tuple(rec.checks.items()),
        generations=generation_rows(rec),
        settings=setting_rows(rec),
        environment=environment_rows(rec),
        commands=command_rows(rec.commands),
        sources=source_rows(rec),
        reference=reference_view(r.comparison) if r.comparison is not None else None,
    )


@dataclass(frozen=True)
class IdentityRow:
    """What differs between the reference and this run in what produced them."""

    field: str
    reference: str
    now: str
    affects_numbers: bool  # False: host, threads, thresholds, fq version, git commit

    @property
    def text(self) -> str:
        mark = "" if self.affects_numbers else " (does not change the numbers)"
        return f"{self.field}: {self.reference} → {self.now}{mark}"


@dataclass(frozen=True)
class ReferenceView:
    """One stage × case against its reference: the status and summary line as stored, the
    identity differences, the note (same identity, different numbers)."""

    stage: str
    title: str
    case: str
    status: str  # identical | passed | regressed | not compared
    summary: str
    note: str | None
    run_id: str
    reference_run_id: str
    reference_source: str
    identity: tuple[IdentityRow, ...]
    regressed: tuple[str, ...]  # the metrics that failed, by tolerance name
    improved: tuple[str, ...]

    @property
    def tone(self) -> str:
        return status_tone(self.status)


def _identity_row(d: IdentityDifference) -> IdentityRow:
    return IdentityRow(d.field, d.reference, d.now, d.affects_numbers)


def reference_view(cmp: RunComparison) -> ReferenceView:
    return ReferenceView(
        stage=cmp.stage,
        title=cmp.stage_title,
        case=cmp.case,
        status=cmp.status,
        summary=cmp.summary,
        note=cmp.note,
        run_id=cmp.run_id,
        reference_run_id=cmp.reference_run_id,
        reference_source=cmp.reference_source,
        identity=tuple(_identity_row(d) for d in cmp.identity),
        regressed=tuple(m.metric for m in cmp.regressions),
        improved=tuple(m.metric for m in cmp.improvements),
    )


@dataclass(frozen=True)
class ReferenceBlock:
    """The summary's "Against the reference (run X)": every compared stage × case."""

    reference_runs: tuple[str, ...]  # the reference run ids, as first seen
    sources: tuple[str, ...]  # where they were read from ("reference fq-reference (run X)")
    views: tuple[ReferenceView, ...]

    @property
    def heading(self) -> str:
        runs = ", ".join(self.reference_runs)
        return f"Against the reference (run{'s' if len(self.reference_runs) > 1 else ''} {runs})"

    @property
    def regressed(self) -> tuple[ReferenceView, ...]:
        return tuple(v for v in self.views if v.status == "regressed")


def reference_block(run: RunResults) -> ReferenceBlock | None:
    """None when no stage × case of the run was compared (no `--fq-compare`)."""
    views = tuple(reference_view(r.comparison) for r in run.compared())
    if not views:
        return None
    return ReferenceBlock(
        reference_runs=tuple(dict.fromkeys(v.reference_run_id for v in views)),
        sources=tuple(dict.fromkeys(v.reference_source for v in views)),
        views=views,
    )


@dataclass(frozen=True)
class OverviewRow:
    """One stage × model at a glance: outcome, effect, its placebo range and words, and why."""

    stage: str
    title: str
    model: str
    outcome: str
    changed: TableCell
    delta_ppl: TableCell
    placebo_delta_ppl: str
    kld: TableCell
    placebo_kld: str
    versus: Versus | None  # mean KLD against the placebos, as stored
    why: str  # skip reason, or the gating checks that failed

    @property
    def verdict(self) -> str:
        return words(self.versus)

    @property
    def tone(self) -> str:
        return tone(self.versus and self.versus.standing)


def overview_rows(run: RunResults) -> tuple[OverviewRow, ...]:
    out = []
    for r in run.in_order():
        rec = r.record
        k = f"{rec.stage}/{rec.case}"
        n, t, p = rec.numeric, rec.treatment, rec.placebo
        kld = t.kld if t is not None else None
        why = rec.skip_reason or "; ".join(
            f"{name}: {c.detail}" for name, c in checks.failing(rec.checks)
        )
        out.append(
            OverviewRow(
                stage=rec.stage,
                title=rec.stage_title,
                model=rec.case,
                outcome=rec.outcome,
                changed=number(f"{k}/numeric/changed", n and n.changed, ",d"),
                delta_ppl=number(
                    f"{k}/treatment/delta_ppl_pct", t and t.delta_ppl_pct, "+.2f", " %"
                ),
                placebo_delta_ppl=range_text(p and p.delta_ppl_pct, "+.2f", " %"),
                kld=number(f"{k}/treatment/kld/mean", kld and kld.mean, ".3g"),
                placebo_kld=range_text(p and p.kld_mean, ".3g"),
                versus=None if p is None or p.compared is None else p.compared.kld,
                why=why,
            )
        )
    return tuple(out)


@dataclass(frozen=True)
class DecisionView:
    """A model's GO / NO-GO and, when Test 1 measured it, its effect against the placebo."""

    decision: Decision
    delta_ppl: str | None  # None: Test 1 has no treatment to show
    kld: str
    versus: Versus | None  # mean KLD against the placebos, as stored
    #: the answer that does not gate (the intrinsic `-twin` beside the deployed decision)
    other: Decision | None = None

    @property
    def verdict(self) -> str:
        return words(self.versus)

    @property
    def gating(self) -> str:
        """Which answer this decision is (and so which one gates): `deployed` or `intrinsic`."""
        return (
            "intrinsic"
            if self.decision.model.endswith(VARIANT_SUFFIX["intrinsic"])
            else ("deployed")
        )

    @property
    def tone(self) -> str:
        return tone(self.versus and self.versus.standing)


def decision_views(run: RunResults, decided: Sequence[Decision] | None = None):
    out = []
    for d in decisions(run) if decided is None else decided:
        r = run.get(GATE_STAGE.id, d.model)
        t = r.record.treatment if r is not None else None
        other = other_answer(run, d)
        if t is None:
            out.append(DecisionView(d, None, MISSING, None, other))
            continue
        p = r.record.placebo
        out.append(
            DecisionView(
                d,
                text(t.delta_ppl_pct, "+.2f", " %"),
                text(t.kld.mean if t.kld is not None else None, ".3g"),
                None if p is None or p.compared is None else p.compared.kld,
                other,
            )
        )
    return tuple(out)


# --- the plan's question, answered twice -----------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One variant's answer for one stage × model: the effect, its control, its floor."""

    variant: str  # deployed | intrinsic
    case: str
    outcome: str
    kld: str  # mean KLD with its interval when there is one
    placebo: str  # the placebos' mean KLD range
    floor: str
    sentence: str  # the protocol's words (record.resolution.sentence)
    resolved: bool | None

    @property
    def tone(self) -> str:
        """Resolved above its floor reads like "above the placebo"; unresolved like noise."""
        if self.resolved is None:
            return "note"
        return "above" if self.resolved else "noise"


@dataclass(frozen=True)
class AnswerRow:
    stage: str
    title: str
    model: str
    deployed: Answer | None
    intrinsic: Answer | None


def _answer(rec: StageRecord) -> Answer:
    res, p = rec.resolution, rec.placebo
    kld = rec.treatment.kld if rec.treatment is not None else None
    if res is not None and res.effect is not None:
        kld_text = interval(res.effect)
    else:
        kld_text = sci(kld.mean) if kld is not None else MISSING
    placebo = MISSING
    if p is not None and p.kld_mean is not None:
        lo, hi = p.kld_mean.min, p.kld_mean.max
        placebo = sci(lo) if lo == hi else f"{sci(lo)}–{sci(hi)}"
    if rec.outcome == "skipped":
        sentence = f"not run: {rec.skip_reason or 'skipped'}"
    elif res is None:
        sentence = MISSING
    else:
        sentence = res.sentence
    return Answer(
        variant=rec.variant,
        case=rec.case,
        outcome=rec.outcome,
        kld=kld_text,
        placebo=placebo,
        floor=sci(res.floor) if res is not None and res.floor is not None else MISSING,
        sentence=sentence,
        resolved=res.resolved if res is not None else None,
    )


def answer_rows(run: RunResults) -> tuple[AnswerRow, ...]:
    """Per stage × model, the deployed and the intrinsic answer side by side."""
    grouped: dict[tuple[str, str], dict[str, StageRecord]] = {}
    titles: dict[str, str] = {}
    for r in run.in_order():
        rec = r.record
        grouped.setdefault((rec.stage, rec.model.name), {})[rec.variant] = rec
        titles[rec.stage] = rec.stage_title
    out = []
    for (stage, model), by_variant in grouped.items():
        d, i = by_variant.get("deployed"), by_variant.get("intrinsic")
        out.append(
            AnswerRow(
                stage=stage,
                title=titles[stage],
                model=model,
                deployed=_answer(d) if d is not None else None,
                intrinsic=_answer(i) if i is not None else None,
            )
        )
    return tuple(out)
