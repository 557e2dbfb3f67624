"""Pure verdicts: a measured value and its threshold in, one check out — and the one rule
for what a check decides, and the one decision a stage record gives.

Why one rule: a check states its status, its value, its threshold and whether it *gates*.
That flag alone drives the stage outcome, the gate record, the report's GO/NO-GO and the
pytest outcome. A check with no threshold measures and reports; it never fails a stage and
never shows as a passed test, because it asserted nothing. `decide` turns a Test 1 record
into GO / NO-GO / NO DECISION once, for the gate, the reports and the pytest-html title.

No I/O here: every function is a table of (value, threshold) → status, tested as one.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from ..figures import figure
from ..storage.record import Check, StageRecord, Standing, Versus

#: passed/failed: a gating check met or missed its threshold. reported: measured, no
#: threshold set. skipped: not run (gate closed, control off). error: no value to judge.
STATUSES = ("passed", "failed", "reported", "skipped", "error")  # = record.Status
FAILING = ("failed", "error")

CHECKS = (
    "quantize",
    "numeric",
    "load",
    "generate",
    "perplexity",
    "kld",
    "placebo",
    "agreement",
    "speed",
    "deployable",
)


# --- the one rule ----------------------------------------------------------------------------


def decides(c: Check) -> bool:
    """True when this check's status counts toward the stage outcome and the gate."""
    return c.gates and c.status != "skipped"


def failing(checks: Mapping[str, Check]) -> list[tuple[str, Check]]:
    """The gating checks that failed or could not be judged, in check order."""
    out = []
    for name, c in checks.items():
        if c.gates and c.status in FAILING:
            out.append((name, c))
    return out


def stage_outcome(checks: Mapping[str, Check]) -> str:
    """failed if any gating check failed or errored; skipped if nothing was decided."""
    if failing(checks):
        return "failed"
    if not any(decides(c) for c in checks.values()):
        return "skipped"
    return "passed"


def ending(c: Check) -> tuple[str, str]:
    """("pass" | "fail" | "skip", message): how a test of this check ends.

    A check that gates nothing is a skip carrying its value, never a pass: a PASSED line
    must mean something was asserted.
    """
    if c.status == "skipped":
        return "skip", c.detail
    if not c.gates:
        word = "reported, not asserted" if c.status != "error" else "not gating, no value"
        return "skip", f"{word}: {c.detail}"
    if c.status == "passed":
        return "pass", c.detail
    if c.status == "error":
        return "fail", f"error: {c.detail}"
    if c.status == "failed":
        return "fail", c.detail
    return "fail", f"a gating check cannot be {c.status!r}: {c.detail}"


# --- the decision ------------------------------------------------------------------------------


class Verdict(enum.StrEnum):
    """Whether a model may move past Test 1."""

    GO = "GO"
    NO_GO = "NO-GO"
    NO_DECISION = "NO DECISION"


@dataclass(frozen=True)
class DecidingCheck:
    name: str
    status: str
    detail: str


@dataclass(frozen=True)
class Decision:
    """GO / NO-GO for moving past Test 1, for one model, and the checks that decided it."""

    model: str  # the case: `gemma3-270m`, or `gemma3-270m-twin` for the intrinsic answer
    verdict: Verdict
    reason: str
    deciding: tuple[DecidingCheck, ...] = ()
    reported: tuple[DecidingCheck, ...] = ()

    @property
    def go(self) -> bool:
        return self.verdict is Verdict.GO

    @property
    def detail(self) -> str:
        """The reason with each failing check's own line: what the gate's skip reason says."""
        bad = [c for c in self.deciding if c.status in FAILING]
        if self.verdict is Verdict.NO_GO and bad:
            return "; ".join(c.detail or f"{c.name} {c.status}" for c in bad)
        return self.reason


def decide(rec: StageRecord, errors: Sequence[str] = ()) -> Decision:
    """The decision a Test 1 record gives, by the one rule (`Check.gates`).

    NO DECISION, never GO, from a record that did not finish (killed, interrupted or still
    running: its checks are the ones done before it stopped), from one whose gating checks
    are not all judged, and from a session that had `errors` (a test that errored means the
    session did not do what its GO would claim)."""
    title = rec.stage_title
    if rec.outcome == "skipped":
        why = f"{title} was skipped: {rec.skip_reason or 'no reason recorded'}"
        return Decision(rec.case, Verdict.NO_DECISION, why)
    asserted, reported = [], []
    for name, c in rec.checks.items():
        (asserted if c.gates else reported).append(DecidingCheck(name, c.status, c.detail))
    reported = tuple(reported)
    if rec.outcome == "running":
        return Decision(rec.case, Verdict.NO_DECISION, unfinished(rec), (), reported)
    failed = [c for c in asserted if c.status in FAILING]
    pending = [c for c in asserted if c.status not in (*FAILING, "passed")]
    if failed:
        names = ", ".join(c.name for c in failed)
        return Decision(rec.case, Verdict.NO_GO, f"failed: {names}", tuple(failed), reported)
    if rec.outcome in FAILING:
        return Decision(rec.case, Verdict.NO_GO, f"{title} failed", tuple(asserted), reported)
    if pending or not asserted:
        names = ", ".join(c.name for c in pending) or "all"
        why = f"checks not finished: {names}"
        return Decision(rec.case, Verdict.NO_DECISION, why, tuple(pending), reported)
    names = ", ".join(c.name for c in asserted)
    reason = f"all {len(asserted)} asserted checks passed ({names})"
    if errors:
        first = errors[0] + (f" and {len(errors) - 1} more" if len(errors) > 1 else "")
        why = f"this session had {len(errors)} error{'s' if len(errors) > 1 else ''} ({first})"
        why = f"{why}; {title} alone: {reason}"
        return Decision(rec.case, Verdict.NO_DECISION, why, tuple(asserted), reported)
    return Decision(rec.case, Verdict.GO, reason, tuple(asserted), reported)


def unfinished(rec: StageRecord) -> str:
    """Why a record that never finished decides nothing: the checks it holds are the ones
    done before it stopped (killed, interrupted, or still running), never the whole test."""
    done = ", ".join(f"{n} {c.status}" for n, c in rec.checks.items()) or "none"
    return (
        f"{rec.stage_title} did not finish: its record is still {rec.outcome!r} since "
        f"{rec.started_at} (killed, interrupted or still running); checks so far: {done}"
    )


# --- verdicts ---------------------------------------------------------------------------------


def _verdict(
    status: str,
    detail: str,
    value: float | None = None,
    threshold: float | None = None,
    **more: Any,
) -> Check:
    if status not in STATUSES:
        raise ValueError(f"check status must be one of {STATUSES}, not {status!r}")
    return Check(status=status, detail=detail, value=value, threshold=threshold, **more)


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def upper_limit(value: float, limit: float | None) -> str:
    """passed / failed / reported for a value that must stay at or below ``limit``."""
    if limit is None:
        return "reported"
    return "passed" if value <= limit else "failed"


def lower_limit(value: float, limit: float | None) -> str:
    if limit is None:
        return "reported"
    return "passed" if value >= limit else "failed"


def _optional_limit(
    text: str, value: float, limit: float | None, option: str, at_least: bool, shown: str
) -> Check:
    """A check whose limit is an option: reported (gating nothing) until the option is set."""
    status = (lower_limit if at_least else upper_limit)(value, limit)
    if status == "reported":
        return _verdict(status, f"{text} ({option} unset)", value, gates=False)
    ok, bad = ("≥", "<") if at_least else ("≤", ">")
    return _verdict(status, f"{text} {ok if status == 'passed' else bad} {shown}", value, limit)


def quantize_check(
    unexpected: Sequence[str],
    changed: int,
    total: int,
    n_tensors: int,
    changed_bytes: int,
    file_size: int,
    fmt: str,
    nothing_changed: bool,
) -> Check:
    if unexpected:
        return _verdict(
            "failed",
            f"bytes outside the selected tensors changed: {', '.join(unexpected[:5])}",
            float(len(unexpected)),
            0.0,
        )
    exact = (
        f" (already exact in {fmt}: the output is byte-identical to the input)"
        if nothing_changed
        else ""
    )
    return _verdict(
        "passed",
        f"{changed:,} of {total:,} elements changed in {n_tensors} selected tensors "
        f"({changed_bytes:,} bytes); every other byte of the {file_size / 1e6:.0f} MB file "
        f"identical{exact}",
        0.0,
        0.0,
        changed_bytes=changed_bytes,
    )


def numeric_check(max_rel: float, changed: int, total: int, limit: float) -> Check:
    counts = f"{changed:,} of {total:,} elements changed"
    value = max_rel if math.isfinite(max_rel) else math.inf
    if value < limit:
        return _verdict("passed", f"max rel error {value:.3g} < {limit:g} ({counts})", value, limit)
    return _verdict("failed", f"max rel error {value:.3g} ≥ {limit:g} ({counts})", value, limit)


def load_check(ok: bool, load_time_ms: float | None, error: str | None) -> Check:
    if ok:
        took = f" in {load_time_ms:.0f} ms" if load_time_ms else ""
        return _verdict("passed", f"llama.cpp loaded it (--check-tensors){took}")
    return _verdict("failed", f"llama.cpp could not load it: {error}")


def generate_check(generations: Iterable[tuple[str, bool, int, str]]) -> Check:
    """generations: (prompt, chat, n_tokens, text) per prompt."""
    parts, ok = [], True
    for prompt, chat, n_tokens, text in generations:
        label = f"{prompt!r}{' (chat)' if chat else ''}"
        if n_tokens > 0 and text.strip():
            parts.append(f"{label} → {n_tokens} tokens")
        else:
            ok = False
            parts.append(f"{label} → nothing generated")
    if not parts:
        return _verdict("error", "no prompts configured")
    return _verdict("passed" if ok else "failed", "; ".join(parts))


def perplexity_check(
    delta_pct: float | None, delta_pct_err: float | None, limit: float, base_ppl, ppl
) -> Check:
    """|ΔPPL| / PPL strictly below ``limit`` (a fraction); a limit of 0 fails everything."""
    if not finite(delta_pct):
        return _verdict("error", f"no finite perplexity delta (PPL {ppl} vs {base_ppl})")
    has_err = finite(delta_pct_err)
    unc = f" ± {delta_pct_err:.2f}%" if has_err else ""
    tail = f"(PPL {ppl:.4f} vs {base_ppl:.4f}{'; ± = paired standard error' if has_err else ''})"
    rel = delta_pct / 100.0
    shown = f"perplexity delta {figure(delta_pct, '+.2f')}%{unc}"
    if abs(rel) < limit:
        return _verdict("passed", f"{shown} < {100 * limit:.1f}% {tail}", rel, limit)
    op = ">" if abs(rel) > limit else "≥"
    return _verdict("failed", f"{shown} {op} {100 * limit:.1f}% {tail}", rel, limit)


def kld_check(
    mean_kld: float | None, same_top_pct: float | None, kld_max: float, same_top_min: float
) -> Check:
    if not finite(mean_kld) or not finite(same_top_pct):
        return _verdict("error", "llama.cpp printed no finite KL divergence statistics")
    mean, same = mean_kld + 0.0, same_top_pct / 100.0  # + 0.0: llama.cpp prints -0.0
    ok_k, ok_s = mean <= kld_max, same >= same_top_min
    detail = (
        f"mean KLD {mean:.3g} {'≤' if ok_k else '>'} {kld_max:g}, same top token "
        f"{100 * same:.2f}% {'≥' if ok_s else '<'} {100 * same_top_min:g}%"
    )
    return _verdict(
        "passed" if ok_k and ok_s else "failed",
        detail,
        mean,
        kld_max,
        same_top=same,
        same_top_threshold=same_top_min,
    )


def agreement_check(
    token_agreement: float | None, first_divergence: int | None, limit: float | None
) -> Check:
    gates = limit is not None
    if not finite(token_agreement):
        return _verdict("error", "no generations to compare", gates=gates)
    text = f"greedy token agreement {100 * token_agreement:.1f}%" + (
        f", first divergence at token {first_divergence}"
        if first_divergence is not None
        else ", no divergence"
    )
    shown = f"{100 * limit:g}%" if limit is not None else ""
    return _optional_limit(text, token_agreement, limit, "fq_agreement_min", True, shown)


def speed_check(
    ratio: float | None,
    base_tps: float | None,
    tps: float | None,
    limit,
    *,
    apart: str | None = None,
    note: str = "",
) -> Check:
    """Treated over baseline perplexity throughput; gates only with fq_speed_ratio_min.

    A ratio of two runs from different sessions (one of them from the cache) measures the
    machine's load at two times, not the treatment (0.31× seen where runs measured together
    gave 0.98×): with `apart` (why the two were not measured together) nothing is compared
    and nothing gated, whatever the limit.
    """
    if apart is not None:
        return _verdict("skipped", f"speed not compared: {apart}", gates=False)
    gates = limit is not None
    more = f"; {note}" if note else ""
    if not finite(ratio):
        return _verdict("error", f"speed not measured{more}", gates=gates)
    text = f"perplexity throughput {tps:.0f} tokens/s vs {base_tps:.0f} baseline ({ratio:.2f}×)"
    shown = f"{limit:g}×" if limit is not None else ""
    c = _optional_limit(text, ratio, limit, "fq_speed_ratio_min", True, shown)
    return msgspec.structs.replace(c, detail=c.detail + more)


def placebo_verdict(
    treatment_kld: float | None, placebo_klds: Sequence[float]
) -> tuple[float | None, str]:
    """(ratio, wording): treatment KLD over the largest placebo KLD."""
    if not placebo_klds:
        return None, "control not run"
    largest = max(placebo_klds)
    if treatment_kld is None:
        return None, "no treatment KLD"
    treatment_kld += 0.0  # llama.cpp prints -0.000000 for an unchanged model
    if largest <= 0:
        if treatment_kld <= 0:
            return 0.0, "within engine noise"
        return math.inf, "above the placebo, which changed nothing"
    ratio = treatment_kld / largest
    if ratio <= 1.0:
        return ratio, "within engine noise"
    return ratio, f"{ratio:.1f}× the largest placebo"


def placebo_check(
    ratio: float | None,
    verdict: str,
    n_seeds: int,
    kld_min: float | None,
    kld_max: float | None,
    limit: float | None,
    error: str | None = None,
) -> Check:
    """The effect against its placebos; gates only with fq_noise_factor_max set."""
    gates = limit is not None
    if n_seeds == 0:
        return _verdict("skipped", "control not run (fq_placebo_seeds = 0)", gates=False)
    if error is not None:
        return _verdict("error", f"placebo run failed: {error}", gates=gates)
    if ratio is None or math.isnan(ratio):
        return _verdict("error", verdict, gates=gates)
    spread = (
        f"placebo KLD {kld_min:.3g}–{kld_max:.3g}, " if finite(kld_min) and finite(kld_max) else ""
    )
    text = f"{verdict}: treatment KLD / largest placebo KLD = {ratio:.2f} ({spread}{n_seeds} seeds)"
    shown = f"{limit:g}" if limit is not None else ""
    return _optional_limit(text, ratio, limit, "fq_noise_factor_max", False, shown)


# --- the treatment against its placebos: a category and its words, stored once --------------


def delta_vs_placebo(value: float | None, lo: float | None, hi: float | None) -> Versus:
    """ΔPPL % against the placebos' range: inside it, or how many times its largest |ΔPPL|."""
    if not finite(lo) or not finite(hi):
        return Versus(standing=Standing.NONE, words="control not run")
    if not finite(value):
        return Versus(standing=Standing.NONE, words="not measured")
    largest = max(abs(lo), abs(hi))
    if lo <= value <= hi or abs(value) <= largest:
        return Versus(standing=Standing.NOISE, words="within engine noise")
    if largest == 0:
        return Versus(standing=Standing.ABOVE, words="above the placebo, which changed nothing")
    return Versus(standing=Standing.ABOVE, words=f"{abs(value) / largest:.1f}× the largest placebo")


def same_top_vs_placebo(value: float | None, placebo_min: float | None) -> Versus:
    """Same-top % compared through the drop below 100 %, the way KLD is compared."""
    if not finite(placebo_min):
        return Versus(standing=Standing.NONE, words="control not run")
    if not finite(value):
        return Versus(standing=Standing.NONE, words="not measured")
    drop, largest = 100.0 - value, 100.0 - placebo_min
    if drop <= largest:
        return Versus(standing=Standing.NOISE, words="within engine noise")
    if largest <= 0:
        return Versus(standing=Standing.ABOVE, words="above the placebo, which changed nothing")
    words = f"{drop / largest:.1f}× the largest placebo drop"
    return Versus(standing=Standing.ABOVE, words=words)


def kld_vs_placebo(changed: int | None, n_seeds: int, ratio: float | None, verdict: str) -> Versus:
    """Mean KLD against the largest placebo's, from `placebo_verdict`'s ratio and words."""
    if changed == 0:
        words = "no element changed: the model is identical to the baseline"
        return Versus(standing=Standing.NONE, words=words)
    if n_seeds == 0:
        return Versus(standing=Standing.NONE, words="control not run")
    if ratio is None or math.isnan(ratio):  # no treatment KLD, or not a number
        return Versus(standing=Standing.NONE, words=verdict)
    if ratio <= 1.0:
        return Versus(standing=Standing.NOISE, words=f"{verdict} (ratio {ratio:.2f})")
    return Versus(standing=Standing.ABOVE, words=verdict)


def deployable_check(sentence: str, runs: bool | None, untried: str | None = None) -> Check:
    """Whether the real file (the tensors stored as the format) runs in llama.cpp: a fact for
    whoever would ship it, never a gate (the fake-quantized file is what the stage measures)."""
    status = "skipped" if untried else "passed" if runs else "reported"
    return _verdict(status, sentence, gates=False)
