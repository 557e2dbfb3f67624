"""Regression checks: a stage record against a reference record of the same stage × case.

Why a rule of its own: the absolute thresholds (|ΔPPL| < 2 %, mean KLD ≤ 0.02) let a change
that doubled the damage stay green, while the numbers themselves are fragile — on two
machines the same commit gave Gemma3's baseline PPL 17.0282 vs 17.0566 and Test 1's ΔPPL
+0.83 % vs +0.52 %, while mean KLD moved only 0.00600 vs 0.00595. So a difference counts as
a regression only when it is

    worse by more than its tolerance   AND   larger than Z × its own uncertainty,

where the uncertainty u of the difference is the root sum of squares of
  - the standard errors llama.cpp printed for both runs (ppl_err, the KLD mean's error,
    same_top_err, the paired ΔPPL error) — for mean KLD, when both records carry each
    chunk's own mean, the paired per-chunk standard error of the difference instead;
  - the engine's own noise for this selection: √2 × the standard deviation of the metric
    over the placebo runs of both records (a 2⁻²⁴ change no model should notice moves the
    numbers this much; two draws of it differ by √2 of that).
Deterministic numbers (elements changed, max relative error, greedy agreement) have no
uncertainty: any change beyond the tolerance counts. Improvements are reported, never
failed; speed is reported (noisy) unless given a tolerance. With the same identity (model,
corpus, llama.cpp build, settings, CPU) llama.cpp is bit-reproducible, so equal numbers are
"identical to the reference", not "within tolerance". A record of the other variant
(deployed vs intrinsic) is never compared.

Pure: records in, a typed `RunComparison` out (stored by the caller next to the record, see
fq_core.storage.history.comparison_path, and rendered by the CLI, pytest and the report).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec

from ..definitions import settings
from ..errors import BadInput
from ..storage import codec, results
from ..storage.identity import Difference as IdentityDifference
from ..storage.identity import Identity
from ..storage.record import StageRecord

SCHEMA = 1
#: A difference must exceed Z standard uncertainties (≈ 95 % two-sided for a normal error).
Z = 2.0

Verdict = Literal[
    "identical",  # the same number, bit for bit
    "within noise",  # |difference| ≤ Z·u (worse or better)
    "within tolerance",  # worse beyond the noise, but not by more than the tolerance
    "improved",  # better beyond the noise (never a failure)
    "regressed",  # worse by more than the tolerance and beyond the noise
    "missing",  # the reference has it, this run measured nothing
    "not measured",  # no reference value (or neither has one)
    "reported",  # differs; report-only metric (speed, agreement, ...)
    "off",  # switched off with METRIC:off
]
Status = Literal["identical", "passed", "regressed", "not compared"]
Direction = Literal["lower", "higher", "neutral"]


# --- tolerances (the syntax of pytest-benchmark's --benchmark-compare-fail) -----------------


@dataclass(frozen=True)
class Tolerance:
    """How much worse a metric may get: `kld:25%` (relative to the reference), `delta_ppl:0.5`
    (absolute, in the metric's unit), `speed:report` (shown, never failed), `kld_max:off`."""

    metric: str
    kind: Literal["rel", "abs", "report", "off"]
    amount: float = 0.0

    @property
    def text(self) -> str:
        if self.kind == "rel":
            return f"{self.amount:g}%"
        if self.kind == "abs":
            return f"{self.amount:g}"
        return self.kind

    @property
    def gates(self) -> bool:
        return self.kind in ("rel", "abs")

    def limit(self, reference: float) -> float | None:
        """The largest allowed worsening, in the metric's unit."""
        if self.kind == "rel":
            return abs(reference) * self.amount / 100.0
        if self.kind == "abs":
            return self.amount
        return None


#: The documented defaults (README "Regression checks"); `--fq-compare-fail` overrides per metric.
#: Gating by default: the deterministic numbers and the ones llama.cpp gives a standard error
#: for. The KLD percentiles, RMS Δp and the placebo ratio have no standard error and are
#: bimodal across placebo seeds (a seed's perturbation changes a chunk's activations or it
#: does not), so they are reported unless given a tolerance; so are speed and agreement.
DEFAULT_TOLERANCES = (
    "changed:0,max_rel:0,ppl:1%,delta_ppl:0.5,kld:25%,same_top:2,"
    "kld_median:report,kld_p90:report,kld_p99:report,kld_p999:report,kld_max:report,"
    "rms_dp:report,placebo_ratio:report,agreement:report,speed:report,baseline_ppl:report"
)
_EXPR = re.compile(
    r"^(?P<metric>[a-z][a-z0-9_]*):(?:(?P<pct>[0-9]*\.?[0-9]+)%|"
    r"(?P<abs>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)|(?P<word>report|off))$"
)


def parse_tolerances(
    specs: str | Iterable[str] | None,
    base: Mapping[str, Tolerance] | None = None,
    *,
    variant: str = "deployed",
) -> dict[str, Tolerance]:
    """`kld:10%,ppl:0.5%` (comma-separated, or several strings) over `base` (the defaults of
    the `variant`'s answer: the intrinsic one is compared on its own, finer scale).

    BadInput names the expression and what is wrong with it."""
    out = dict(base if base is not None else _defaults(variant))
    if specs is None:
        return out
    items = [specs] if isinstance(specs, str) else list(specs)
    for item in items:
        for expr in (e.strip() for e in str(item).split(",")):
            if not expr:
                continue
            m = _EXPR.match(expr)
            if m is None:
                raise BadInput(
                    f"tolerance {expr!r}: expected METRIC:N% (relative), METRIC:N (absolute), "
                    "METRIC:report or METRIC:off, e.g. kld:25%"
                )
            name = m.group("metric")
            if name == "z":  # how many standard uncertainties a difference must exceed
                if m.group("abs") is None or float(m.group("abs")) <= 0:
                    raise BadInput(f"tolerance {expr!r}: z takes a number > 0, e.g. z:3")
                out["z"] = Tolerance("z", "abs", float(m.group("abs")))
                continue
            if name not in METRICS:
                raise BadInput(
                    f"tolerance {expr!r}: unknown metric {name!r} "
                    f"(known: {', '.join(METRICS)}; z:N for the uncertainty "
                    "multiple)"
                )
            if m.group("pct") is not None:
                out[name] = Tolerance(name, "rel", float(m.group("pct")))
            elif m.group("abs") is not None:
                out[name] = Tolerance(name, "abs", float(m.group("abs")))
            else:
                out[name] = Tolerance(name, m.group("word"))  # type: ignore[arg-type]
    return out


def _defaults(variant: str = "deployed") -> dict[str, Tolerance]:
    out = parse_tolerances(DEFAULT_TOLERANCES, base={})
    if variant == "intrinsic":
        out = parse_tolerances(settings.INTRINSIC_TOLERANCES, base=out)
    return out


def tolerances_text(tols: Mapping[str, Tolerance]) -> str:
    return ",".join(f"{n}:{t.text}" for n, t in tols.items())


# --- the metrics -----------------------------------------------------------------------------


def _kld(rec: StageRecord):
    return rec.treatment.kld if rec.treatment is not None else None


def _treat(attr: str) -> Callable[[StageRecord], float | None]:
    return lambda r: getattr(r.treatment, attr) if r.treatment is not None else None


def _kld_attr(attr: str) -> Callable[[StageRecord], float | None]:
    def get(r: StageRecord) -> float | None:
        k = _kld(r)
        return getattr(k, attr) if k is not None else None

    return get


def _placebo_values(attr: str, in_kld: bool = False) -> Callable[[StageRecord], list[float]]:
    def get(r: StageRecord) -> list[float]:
        if r.placebo is None:
            return []
        out = []
        for run in r.placebo.runs:
            src = run.kld if in_kld else run
            v = getattr(src, attr, None) if src is not None else None
            if v is not None and math.isfinite(v):
                out.append(v)
        return out

    return get


def _numeric(attr: str) -> Callable[[StageRecord], float | None]:
    return lambda r: getattr(r.numeric, attr) if r.numeric is not None else None


def _agreement(r: StageRecord) -> float | None:
    a = r.treatment.agreement if r.treatment is not None else None
    return a.token_agreement if a is not None else None


def _ratio(r: StageRecord) -> float | None:
    return r.placebo.kld_ratio if r.placebo is not None else None


def _baseline_ppl(r: StageRecord) -> float | None:
    return r.baseline.ppl if r.baseline is not None else None


def _baseline_ppl_err(r: StageRecord) -> float | None:
    return r.baseline.ppl_err if r.baseline is not None else None


def _fmt(spec: str, suffix: str = "") -> Callable[[float], str]:
    def show(x: float) -> str:
        if not math.isfinite(x):
            return "not a number" if math.isnan(x) else ("+∞" if x > 0 else "−∞")
        return format(x, spec).replace("-", "−") + suffix

    show.spec = spec  # type: ignore[attr-defined]
    show.suffix = suffix  # type: ignore[attr-defined]
    return show


def magnitude(show: Callable[[float], str], x: float) -> str:
    """|x| in a metric's format, without a sign (for an uncertainty or a tolerance)."""
    spec = getattr(show, "spec", ".4g").replace("+", "")
    if not math.isfinite(x):
        return show(x)
    return format(abs(x), spec) + getattr(show, "suffix", "")


@dataclass(frozen=True)
class Metric:
    key: str  # the tolerance name: kld, delta_ppl, ...
    label: str
    direction: Direction
    value: Callable[[StageRecord], float | None]
    show: Callable[[float], str]
    err: Callable[[StageRecord], float | None] | None = None  # llama.cpp's standard error
    placebo: Callable[[StageRecord], list[float]] | None = None  # the engine's noise
    exact: bool = False  # deterministic: no uncertainty at all
    timing: bool = False  # wall-clock: never bit-identical, not part of "identical"


METRIC_LIST: tuple[Metric, ...] = (
    Metric("changed", "elements changed", "lower", _numeric("changed"), _fmt(",.0f"), exact=True),
    Metric("max_rel", "max relative error", "lower", _numeric("max_rel"), _fmt(".4g"), exact=True),
    Metric(
        "ppl", "PPL", "lower", _treat("ppl"), _fmt(".4f"), _treat("ppl_err"), _placebo_values("ppl")
    ),
    Metric(
        "delta_ppl",
        "ΔPPL",
        "lower",
        _treat("delta_ppl_pct"),
        _fmt("+.3f", " %"),
        _treat("delta_ppl_pct_err"),
        _placebo_values("delta_ppl_pct"),
    ),
    Metric(
        "kld",
        "mean KLD",
        "lower",
        _kld_attr("mean"),
        _fmt("#.3g"),
        _kld_attr("mean_err"),
        _placebo_values("kld_mean"),
    ),
    Metric(
        "kld_median",
        "KLD median",
        "lower",
        _kld_attr("median"),
        _fmt("#.3g"),
        None,
        _placebo_values("median", True),
    ),
    Metric(
        "kld_p90",
        "KLD p90",
        "lower",
        _kld_attr("p90"),
        _fmt("#.3g"),
        None,
        _placebo_values("p90", True),
    ),
    Metric(
        "kld_p99",
        "KLD p99",
        "lower",
        _kld_attr("p99"),
        _fmt("#.3g"),
        None,
        _placebo_values("p99", True),
    ),
    Metric(
        "kld_p999",
        "KLD p99.9",
        "lower",
        _kld_attr("p999"),
        _fmt("#.3g"),
        None,
        _placebo_values("p999", True),
    ),
    Metric(
        "kld_max",
        "KLD max",
        "lower",
        _kld_attr("max"),
        _fmt("#.3g"),
        None,
        _placebo_values("max", True),
    ),
    Metric(
        "rms_dp",
        "RMS Δp",
        "lower",
        _kld_attr("rms_dp_pct"),
        _fmt(".3f", " %"),
        None,
        _placebo_values("rms_dp_pct", True),
    ),
    Metric(
        "same_top",
        "same top token",
        "higher",
        _kld_attr("same_top_pct"),
        _fmt(".2f", " %"),
        _kld_attr("same_top_err"),
        _placebo_values("same_top_pct"),
    ),
    Metric("placebo_ratio", "KLD / largest placebo", "lower", _ratio, _fmt(".2f", "×")),
    Metric("agreement", "greedy agreement", "higher", _agreement, _fmt(".1%"), exact=True),
    Metric("speed", "tokens/s", "higher", _treat("tokens_per_s"), _fmt(".0f"), timing=True),
    Metric(
        "baseline_ppl", "baseline PPL", "neutral", _baseline_ppl, _fmt(".4f"), _baseline_ppl_err
    ),
)
METRICS: dict[str, Metric] = {m.key: m for m in METRIC_LIST}


# --- uncertainty --------------------------------------------------------------------------------


def _variance(values: Sequence[float]) -> tuple[float, int] | None:
    """(sample variance, degrees of freedom) or None for fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return sum((v - mean) ** 2 for v in values) / (n - 1), n - 1


def pooled_sd(groups: Iterable[Sequence[float]]) -> float | None:
    """The placebo runs' standard deviation, pooled over both records' runs (each about its
    own mean); None when no record has two placebo runs."""
    num = dof = 0.0
    for values in groups:
        v = _variance(values)
        if v is not None:
            num += v[0] * v[1]
            dof += v[1]
    return math.sqrt(num / dof) if dof else None


def _paired_kld_se(ref: StageRecord, now: StageRecord) -> float | None:
    """Standard error of the mean-KLD difference from each chunk's own mean (paired: both runs
    saw the same tokens against the same baseline logits), when both records carry them."""
    a, b = _kld(ref), _kld(now)
    if a is None or b is None:
        return None
    shared = _shared_chunks(ref, now)
    if shared is None or len(shared[0]) < 2:
        return None
    xs, ys = shared
    v = _variance([y - x for x, y in zip(xs, ys, strict=True)])
    return math.sqrt(v[0] / len(xs)) if v is not None else None


def _shared_chunks(ref: StageRecord, now: StageRecord) -> tuple[list[float], list[float]] | None:
    """Both runs' per-chunk mean KLDs on the chunks both used: the first n of the same corpus
    at the same context (a run of 4 chunks and one of 8 share 4), else None."""
    a, b = _kld(ref), _kld(now)
    if a is None or b is None:
        return None
    if (ref.corpus.sha256, ref.settings.ctx) != (now.corpus.sha256, now.settings.ctx):
        return None
    n = min(len(a.chunk_means), len(b.chunk_means))
    xs, ys = list(a.chunk_means[:n]), list(b.chunk_means[:n])
    if n == 0 or any(v is None or not math.isfinite(v) for v in xs + ys):
        return None
    return xs, ys  # type: ignore[return-value]


def _values(metric: Metric, ref: StageRecord, now: StageRecord):
    """The two values compared: a mean KLD of runs that used different chunk counts is
    compared on the chunks both used, so a change of text does not pass for a change of model."""
    r, n = metric.value(ref), metric.value(now)
    if metric.key != "kld":
        return r, n, ""
    a, b = _kld(ref), _kld(now)
    shared = _shared_chunks(ref, now)
    if a is None or b is None or shared is None or len(a.chunk_means) == len(b.chunk_means):
        return r, n, ""
    xs, ys = shared
    return math.fsum(xs) / len(xs), math.fsum(ys) / len(ys), f" (on the {len(xs)} chunks both used)"


@dataclass(frozen=True)
class Uncertainty:
    u: float | None  # standard uncertainty of the difference; None = nothing known
    stat: float | None  # from llama.cpp's standard errors (or paired chunks)
    engine: float | None  # from the placebo spread
    how: str  # in words, for the detail line


def uncertainty(metric: Metric, ref: StageRecord, now: StageRecord) -> Uncertainty:
    if metric.exact:
        return Uncertainty(0.0, 0.0, 0.0, "deterministic")
    if metric.key == "placebo_ratio":
        return _ratio_uncertainty(ref, now)
    stat = None
    how = []
    if metric.key == "kld":
        stat = _paired_kld_se(ref, now)
        if stat is not None:
            how.append(f"paired s.e. over {len(_shared_chunks(ref, now)[0])} chunks")
    if stat is None and metric.err is not None:
        errs = [metric.err(r) for r in (ref, now)]
        finite = [e for e in errs if e is not None and math.isfinite(e)]
        if finite:
            stat = math.sqrt(sum(e * e for e in finite))
            how.append(
                "llama.cpp s.e. of both runs" if len(finite) == 2 else "llama.cpp s.e. of one run"
            )
    engine = None
    if metric.placebo is not None:
        sd = pooled_sd([metric.placebo(ref), metric.placebo(now)])
        if sd is not None:
            engine = math.sqrt(2.0) * sd
            n = len(metric.placebo(ref)) + len(metric.placebo(now))
            how.append(f"placebo spread ({n} runs)")
    parts = [x for x in (stat, engine) if x is not None]
    u = math.sqrt(sum(x * x for x in parts)) if parts else None
    return Uncertainty(u, stat, engine, " + ".join(how) or "no uncertainty recorded")


def _ratio_parts(r: StageRecord) -> tuple[float, float, float] | None:
    """(ratio, relative s.e. of numerator and denominator, relative placebo spread)."""
    ratio = _ratio(r)
    k = _kld(r)
    if ratio is None or not math.isfinite(ratio) or k is None or r.placebo is None:
        return None
    t, te = k.mean, k.mean_err
    runs = [run for run in r.placebo.runs if run.kld_mean is not None]
    if not runs or t is None or t <= 0:
        return None
    top = max(runs, key=lambda run: run.kld_mean or 0.0)
    p = top.kld_mean or 0.0
    pe = top.kld.mean_err if top.kld is not None else None
    if p <= 0:
        return None
    rel_stat = math.sqrt(((te or 0.0) / t) ** 2 + ((pe or 0.0) / p) ** 2)
    values = [run.kld_mean or 0.0 for run in runs]
    v = _variance(values)
    rel_engine = math.sqrt(v[0]) / (sum(values) / len(values)) if v else 0.0
    return ratio, rel_stat, rel_engine


def _ratio_uncertainty(ref: StageRecord, now: StageRecord) -> Uncertainty:
    """The ratio's s.e. from its numerator's and denominator's; its engine noise: the
    placebos' relative spread moves both the treatment's KLD and the largest placebo's."""
    stat2 = eng2 = 0.0
    seen = False
    for r in (ref, now):
        parts = _ratio_parts(r)
        if parts is None:
            continue
        seen = True
        ratio, rel_stat, rel_engine = parts
        stat2 += (ratio * rel_stat) ** 2
        eng2 += 2.0 * (ratio * rel_engine) ** 2
    if not seen:
        return Uncertainty(None, None, None, "no uncertainty recorded")
    return Uncertainty(
        math.sqrt(stat2 + eng2),
        math.sqrt(stat2),
        math.sqrt(eng2),
        "s.e. of both KLDs + placebo spread",
    )


# --- the typed result --------------------------------------------------------------------------


class _Part(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class Shown(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A metric's figures as printed, by name (stored as the array of four it always was)."""

    reference: str
    now: str
    change: str
    uncertainty: str  # "±0.00126"; "exact" (deterministic) or "—" (none known): no ±


class MetricComparison(_Part, kw_only=True):
    metric: str  # the tolerance name
    label: str
    direction: Direction
    reference: float | None
    now: float | None
    change: float | None  # now − reference, in the metric's unit
    change_pct: float | None  # relative to the reference, %
    uncertainty: float | None  # Z × the standard uncertainty of the difference (0 = exact)
    uncertainty_how: str
    tolerance: str  # "25%", "0.5", "report", "off"
    limit: float | None  # the tolerance in the metric's unit
    verdict: Verdict
    gates: bool  # a regression here fails the check
    shown: Shown
    detail: str  # one line

    @property
    def uncertain(self) -> bool:
        """Its difference has a known uncertainty (not a deterministic metric): a ± to show."""
        metric = METRICS.get(self.metric)
        return self.uncertainty is not None and not (metric is not None and metric.exact)


class RunComparison(_Part, kw_only=True):
    schema: int = SCHEMA
    stage: str
    stage_title: str
    case: str
    variant: str
    run_id: str
    reference_run_id: str
    reference_source: str  # "reference fq-reference (run …)" or "run …"
    reference_path: str | None = None
    compared_at: str
    status: Status
    summary: str  # one line: the test's message
    same_identity: bool
    identity: tuple[IdentityDifference, ...]
    metrics: tuple[MetricComparison, ...]
    z: float = Z
    tolerances: dict[str, str]
    note: str | None = None

    @property
    def regressions(self) -> tuple[MetricComparison, ...]:
        return tuple(m for m in self.metrics if m.gates and m.verdict in ("regressed", "missing"))

    @property
    def improvements(self) -> tuple[MetricComparison, ...]:
        return tuple(m for m in self.metrics if m.verdict == "improved")


# --- identity -------------------------------------------------------------------------------


def identity_differences(
    ref: StageRecord,
    now: StageRecord,
    *,
    reference_commit: str | None = None,
    commit: str | None = None,
) -> tuple[IdentityDifference, ...]:
    """What differs in what produced the two records (fq_core.storage.identity), and the git commit
    of their runs; `affects_numbers` marks what llama.cpp's bit-reproducibility depends on."""
    out = Identity.of_record(ref).differences(Identity.of_record(now))
    if reference_commit != commit:
        out += (
            IdentityDifference.between(
                "git commit", reference_commit, commit, affects_numbers=False
            ),
        )
    return out


# --- the comparison ----------------------------------------------------------------------------


def _measured(rec: StageRecord) -> bool:
    return rec.outcome not in ("running", "skipped") and (
        rec.treatment is not None or rec.numeric is not None
    )


def _same(x: float, y: float) -> bool:
    return x == y or (math.isnan(x) and math.isnan(y))


def compare_metric(
    metric: Metric, tol: Tolerance, ref: StageRecord, now: StageRecord, z: float = Z
) -> MetricComparison:
    r, n, on_shared = _values(metric, ref, now)
    unc = uncertainty(metric, ref, now)
    bound = z * unc.u if unc.u is not None else None
    gates = tol.gates and metric.direction != "neutral"
    show = metric.show

    def make(verdict: Verdict, detail: str, *, change=None, pct=None, limit=None, g=gates):
        shown = Shown(
            reference=show(r) if r is not None else "—",
            now=show(n) if n is not None else "—",
            change=_signed(show, change, pct) if change is not None else "—",
            uncertainty=("exact" if metric.exact else f"±{show_plain(metric, bound)}")
            if bound is not None
            else "—",
        )
        return MetricComparison(
            metric=metric.key,
            label=metric.label,
            direction=metric.direction,
            reference=r,
            now=n,
            change=change,
            change_pct=pct,
            uncertainty=bound,
            uncertainty_how=unc.how + on_shared,
            tolerance=tol.text,
            limit=limit,
            verdict=verdict,
            gates=g,
            shown=shown,
            detail=detail,
        )

    if tol.kind == "off":
        return make("off", f"{metric.label}: not compared ({metric.key}:off)", g=False)
    if r is None:
        what = "measured in neither run" if n is None else "no reference value"
        return make("not measured", f"{metric.label}: {what}", g=False)
    if n is None:
        return make("missing", f"{metric.label}: not measured in this run (reference {show(r)})")
    if _same(r, n):
        return make("identical", f"{metric.label} {show(n)}: identical", change=0.0, pct=0.0)
    limit = tol.limit(r) if math.isfinite(r) else None
    if not (math.isfinite(r) and math.isfinite(n)):
        return _nonfinite(make, metric, r, n, limit)
    d = n - r
    pct = 100.0 * d / abs(r) if r != 0 else None
    worse = (
        (d > 0)
        if metric.direction == "lower"
        else (d < 0)
        if metric.direction == "higher"
        else False
    )
    size = abs(d)
    beyond = bound is None or size > bound
    head = f"{metric.label} {show(r)} → {show(n)} ({_signed(show, d, pct)})"
    noise = f"±{show_plain(metric, bound)}" if bound is not None else "no uncertainty known"
    if metric.exact:
        noise = "exact"
    if not gates:
        word = {"lower": ("higher", "lower"), "higher": ("lower", "higher")}.get(
            metric.direction, ("changed", "changed")
        )
        how = word[0] if worse else word[1]
        return make(
            "reported",
            f"{head}: {how}, reported only ({metric.key}:{tol.text})",
            change=d,
            pct=pct,
            limit=limit,
        )
    if worse:
        over = limit is not None and size > limit
        if over and beyond:
            shown = f"{tol.text} ({show_plain(metric, limit)})" if tol.kind == "rel" else tol.text
            also = (
                "deterministic, no uncertainty" if metric.exact else f"and its uncertainty {noise}"
            )
            return make(
                "regressed",
                f"{head}: worse by more than the tolerance {shown}, {also}",
                change=d,
                pct=pct,
                limit=limit,
            )
        if beyond:
            return make(
                "within tolerance",
                f"{head}: worse beyond its uncertainty {noise}, within the tolerance {tol.text}",
                change=d,
                pct=pct,
                limit=limit,
            )
        return make(
            "within noise",
            f"{head}: within its uncertainty {noise}"
            + (f" (beyond the tolerance {tol.text})" if over else ""),
            change=d,
            pct=pct,
            limit=limit,
        )
    if beyond:
        return make(
            "improved",
            f"{head}: better beyond its uncertainty {noise}",
            change=d,
            pct=pct,
            limit=limit,
        )
    return make(
        "within noise", f"{head}: within its uncertainty {noise}", change=d, pct=pct, limit=limit
    )


def _nonfinite(make, metric: Metric, r: float, n: float, limit) -> MetricComparison:
    show = metric.show
    head = f"{metric.label} {show(r)} → {show(n)}"
    bad_now = (
        math.isnan(n)
        or (metric.direction == "lower" and n == math.inf)
        or (metric.direction == "higher" and n == -math.inf)
    )
    if math.isfinite(r) and bad_now:
        return make("regressed", f"{head}: not a finite number now", limit=limit)
    if not math.isfinite(r) and math.isfinite(n):
        return make("improved", f"{head}: finite again", limit=limit)
    return make("within noise", f"{head}: not comparable as numbers", limit=limit)


def show_plain(metric: Metric, x: float | None) -> str:
    return "—" if x is None else magnitude(metric.show, x)


def _signed(show: Callable[[float], str], d: float | None, pct: float | None) -> str:
    """A change: its sign always shown (− for lower), "0" when there is none; the relative
    change too, except for figures that are percentages themselves (ΔPPL %, same-top %)."""
    if d is None:
        return "—"
    if d == 0:
        return "0"
    text = ("+" if d > 0 else "−") + magnitude(show, d)
    if pct is not None and not getattr(show, "suffix", "").strip() == "%":
        text += f", {pct:+.1f}%".replace("-", "−")
    return text


def compare_runs(
    reference: StageRecord,
    now: StageRecord,
    tolerances: Mapping[str, Tolerance] | str | Iterable[str] | None = None,
    *,
    reference_source: str | None = None,
    reference_path: str | None = None,
    reference_commit: str | None = None,
    commit: str | None = None,
    z: float = Z,
) -> RunComparison:
    """Every metric of `now` against `reference` under the rule in the module docstring.

    `tolerances` as given by the user (specs, None) are read over the defaults of `now`'s
    answer (deployed or intrinsic); a parsed mapping is used as it is."""
    if tolerances is None or isinstance(tolerances, (str, list, tuple)):
        tols = parse_tolerances(tolerances, variant=now.variant)  # type: ignore[arg-type]
    else:
        tols = dict(tolerances)  # type: ignore[arg-type]
    if "z" in tols:  # z:N among the tolerances wins over the argument
        z = tols["z"].amount
    ref = reference
    identity = identity_differences(ref, now, reference_commit=reference_commit, commit=commit)
    same_identity = not any(d.affects_numbers for d in identity)
    base = dict(
        stage=now.stage,
        stage_title=now.stage_title,
        case=now.case,
        variant=now.variant,
        run_id=now.run_id,
        reference_run_id=ref.run_id,
        reference_source=reference_source or f"run {ref.run_id}",
        reference_path=reference_path,
        compared_at=results.utc_now(),
        same_identity=same_identity,
        identity=identity,
        z=z,
        tolerances={k: t.text for k, t in tols.items()},
    )
    where = base["reference_source"]
    reason = None
    if ref.variant != now.variant:
        reason = (
            f"not compared: the reference measured the {ref.variant} model, this run "
            f"the {now.variant} one"
        )
    elif ref.stage != now.stage:
        reason = f"not compared: the reference is stage {ref.stage}, this run {now.stage}"
    elif not _measured(ref):
        reason = f"not compared: the reference record ({where}) measured nothing ({ref.outcome})"
    elif now.outcome == "skipped":
        reason = f"not compared: this run's stage was skipped ({now.skip_reason or 'no reason'})"
    if reason is not None:
        return RunComparison(status="not compared", summary=reason, metrics=(), **base)
    rows = tuple(
        compare_metric(m, tols.get(m.key, Tolerance(m.key, "report")), ref, now, z)
        for m in METRIC_LIST
    )
    return _conclude(rows, base, identity, same_identity)


def _brief(m: MetricComparison) -> str:
    """`kld 0.00600 → 0.00780 (+0.00180, +30.0%; tolerance 10%, uncertainty ±0.00057)`."""
    s = m.shown
    if m.verdict == "missing":
        return f"{m.metric} {s.reference} → not measured"
    return (
        f"{m.metric} {s.reference} → {s.now} ({s.change}; tolerance {m.tolerance}, "
        f"uncertainty {s.uncertainty})"
    )


def _conclude(rows, base: dict, identity, same_identity: bool) -> RunComparison:
    where = base["reference_source"]
    steady = [m for m in rows if not METRICS[m.metric].timing and m.verdict != "off"]
    compared = [m for m in steady if m.verdict not in ("not measured",)]
    all_identical = bool(compared) and all(m.verdict == "identical" for m in compared)
    bad = [m for m in rows if m.gates and m.verdict in ("regressed", "missing")]
    differing = [m for m in compared if m.verdict != "identical"]
    numbers = [d.field for d in identity if d.affects_numbers]
    note = None
    if same_identity and differing:
        note = (
            f"same identity (model, corpus, llama.cpp build, settings, CPU) but "
            f"{len(differing)} metric(s) differ: expected bit-identical numbers "
            f"({', '.join(m.metric for m in differing[:6])})"
        )
    if bad:
        status: Status = "regressed"
        summary = f"REGRESSED against {where}: " + "; ".join(_brief(m) for m in bad)
    elif all_identical:
        status = "identical"
        ident = (
            "same model, corpus, llama.cpp build, settings and CPU"
            if same_identity
            else f"identity differs in {', '.join(numbers)}"
        )
        summary = (
            f"identical to the reference ({where}; {ident}): {len(compared)} metrics bit-identical"
        )
    elif not compared:
        status = "not compared"
        summary = f"not compared: no metric was measured in both runs ({where})"
    else:
        status = "passed"
        counts: dict[str, int] = {}
        for m in compared:
            counts[m.verdict] = counts.get(m.verdict, 0) + 1
        tally = ", ".join(f"{v} {k}" for k, v in counts.items())
        better = [m.metric for m in rows if m.verdict == "improved"]
        tail = f"; improved: {', '.join(better)}" if better else ""
        ident = f"; identity differs in {', '.join(numbers)}" if numbers else ""
        summary = f"no regression against {where}: {tally}{tail}{ident}"
    return RunComparison(status=status, summary=summary, metrics=rows, note=note, **base)


# --- how a test of it ends, and the text table ---------------------------------------------


def ending(cmp: RunComparison) -> tuple[str, str]:
    """("pass" | "fail" | "skip", message), the way checks.ending words a check."""
    if cmp.status == "not compared":
        return "skip", cmp.summary
    lines = [cmp.summary]
    if cmp.note:
        lines.append(f"note: {cmp.note}")
    if cmp.status == "regressed":
        lines += [f"  {m.detail}" for m in cmp.regressions]
        lines += identity_lines(cmp)
        return "fail", "\n".join(lines)
    return "pass", "\n".join(lines)


def identity_lines(cmp: RunComparison) -> list[str]:
    if not cmp.identity:
        return ["identity: the same (model, corpus, llama.cpp build, settings, CPU, host)"]
    out = ["identity differs:"]
    for d in cmp.identity:
        mark = "" if d.affects_numbers else " (does not change the numbers)"
        out.append(f"  {d.field}: {d.reference} → {d.now}{mark}")
    return out


def render_table(cmp: RunComparison) -> str:
    """The comparison as text: identity differences on top, then one row per metric."""
    lines = [
        f"{cmp.stage_title} {cmp.stage} × {cmp.case}: {cmp.status.upper()} "
        f"(this run {cmp.run_id} vs {cmp.reference_source})"
    ]
    lines += identity_lines(cmp)
    if cmp.note:
        lines.append(f"note: {cmp.note}")
    if not cmp.metrics:
        lines.append(cmp.summary)
        return "\n".join(lines)
    head = ("metric", "reference", "now", "change", f"±{cmp.z:g}u", "tolerance", "verdict")
    rows = [head] + [
        (
            m.metric,
            *msgspec.structs.astuple(m.shown),
            m.tolerance,
            m.verdict.upper() if m.verdict == "regressed" else m.verdict,
        )
        for m in cmp.metrics
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


# --- storage --------------------------------------------------------------------------------


def encode(cmp: RunComparison) -> bytes:
    return codec.encode(cmp, indent=2) + b"\n"


def decode(raw: bytes | str, *, source: str = "comparison") -> RunComparison:
    try:
        return codec.decode(raw, RunComparison)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadInput(f"{source}: not an fq-suite comparison ({exc})") from exc


def save(cmp: RunComparison, root=None):
    """results/<run>/<stage>/regression/<case>.json, atomically; returns the path."""
    from ..storage.history import comparison_path

    path = comparison_path(cmp.run_id, cmp.stage, cmp.case, root)
    with results.lock_for(path):
        results.write_bytes_atomic(path, encode(cmp))
    return path


def read(path) -> RunComparison:
    from pathlib import Path

    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise BadInput(f"{p}: cannot read ({exc.strerror or exc})") from exc
    return decode(raw, source=str(p))
