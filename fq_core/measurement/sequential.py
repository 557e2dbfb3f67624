"""Measure until decided: after every chunk, an always-valid interval for how many times its
floor a treatment's KLD is, and the rule that says when the question is answered.

The quantity is the per-chunk log ratio r_i = ln(KLD_treatment,i / KLD_placebo,i): the
treatment and its placebo are scored on the same tokens (paired), so what the text itself
contributes cancels, and effects four orders of magnitude apart live on one scale (layer 0 of
Gemma3's twin: r ≈ 1.3, all 18 layers: r ≈ 4.9).

Why a confidence sequence, not a group-sequential design: the engine evaluates one chunk at a
time in one process, so a look after every chunk costs nothing, and a sequence is valid at
every n at once (Ville's inequality), however often it is read; a group-sequential design
fixes its looks in advance and, with 1–2 chunks at the first look, a t-interval has 0–1
degrees of freedom and resolves nothing. The sequence is Robbins' normal mixture for means
of σ-sub-Gaussian increments (Howard et al. 2021, eq. 14): with S_n = Σ (r_i − μ),

    P(∃ n: |S_n| ≥ sqrt(2 (σ² n + 1/ρ²) ln(sqrt(1 + ρ² σ² n) / α))) ≤ α.

σ is an assumption, stated and checked: over 8 chunks the spread of r_i measured on the 23
cells of Gemma3's ffn_norm sweep (twin, BF16) was 0.07–0.41 for 20 of them, but 0.50–1.57 for
layers 15–17, whose placebos move KLD by ~1e-10 (those are 2,000× their floor or more: far above
for any σ below 3). A run whose observed spread exceeds σ does not stop early (it goes to the
cap) and says so; 2 chunks can look calm where 8 are not, so the check is a guard, not a proof.
ρ is tuned (ρ² σ² = 1) so the interval is tight at 1–4 chunks, where the savings are.

Stops, after at least `min_chunks`:
- "far above": the lower bound is at least `far` × the floor (10×): decided whatever its size;
- "resolved": above the floor with the interval of the ratio within a factor `precision` (2);
- "within tolerance": the upper bound is below `tolerance` × the floor (1.5×);
- "cap": `max_chunks` reached undecided.

The stop ends the placebos' evaluation, not necessarily the treatment's: a cell that is ranked
against others goes on to `rank_chunks` chunks (a count fixed in advance). Ranking needs the
treatment's KLD, not its floor, and cells compared on the same fixed first chunks can use an
ordinary paired t-interval — far tighter at 4–8 chunks than a confidence sequence, whose price
for being valid at every look is width. Measured on the 18 single-layer cells of Gemma3's
ffn_norm sweep (twin, BF16): paired t-intervals on the first 2, 3, 4, 6, 8 chunks order 34, 75,
94, 109 and 112 of the 116 pairs that the fixed 8-chunk design's unpaired intervals order,
contradicting none; at 6 the leaders are the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

ALPHA = 0.05
SIGMA = 0.5
MIN_CHUNKS = 2
MAX_CHUNKS = 16
FAR = 10.0
PRECISION = 2.0
TOLERANCE = 1.5
RANK_CHUNKS = 0  # 0: the treatment stops with its placebos

STOP_REASONS = ("far above", "resolved", "within tolerance", "cap", "spread above sigma")


@dataclass(frozen=True)
class Rule:
    """The stopping rule's parameters; what a record names and a cache keys."""

    alpha: float = ALPHA
    sigma: float = SIGMA
    min_chunks: int = MIN_CHUNKS
    max_chunks: int = MAX_CHUNKS
    far: float = FAR
    precision: float = PRECISION
    tolerance: float = TOLERANCE
    rank_chunks: int = RANK_CHUNKS

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1 or self.sigma <= 0:
            raise ValueError(f"alpha in (0, 1) and sigma > 0, not {self.alpha}, {self.sigma}")
        if not 1 <= self.min_chunks <= self.max_chunks:
            raise ValueError(
                f"1 <= min_chunks <= max_chunks, not {self.min_chunks}, {self.max_chunks}"
            )
        if not 0 <= self.rank_chunks <= self.max_chunks:
            raise ValueError(f"0 <= rank_chunks <= max_chunks, not {self.rank_chunks}")
        if not (self.far > 1 and self.precision > 1 and self.tolerance > 1):
            raise ValueError("far, precision and tolerance are ratios above 1")

    def to_json(self) -> dict:
        return {
            "alpha": self.alpha,
            "sigma": self.sigma,
            "min_chunks": self.min_chunks,
            "max_chunks": self.max_chunks,
            "far": self.far,
            "precision": self.precision,
            "tolerance": self.tolerance,
            **({"rank_chunks": self.rank_chunks} if self.rank_chunks else {}),
        }

    def half_width(self, n: int) -> float:
        """The sequence's half-width for the mean of n log ratios (valid at every n at once)."""
        if n < 1:
            return math.inf
        s2 = self.sigma**2
        inv_rho2 = s2  # ρ² σ² = 1
        return math.sqrt(2.0 * (s2 * n + inv_rho2) * math.log(math.sqrt(1.0 + n) / self.alpha)) / n


@dataclass(frozen=True)
class Look:
    """The state after n chunks: the ratio's estimate and always-valid interval (as ratios to
    the floor, i.e. exp of the log-ratio bounds), and whether and why to stop."""

    n: int
    ratio: float  # exp(mean log ratio): the geometric-mean ratio to the placebo
    low: float
    high: float
    spread: float | None  # sample SD of the log ratios (None below 2 chunks)
    stop: str | None  # one of STOP_REASONS, or None: evaluate another chunk


def log_ratios(treatment: Sequence[float], placebo: Sequence[float]) -> list[float]:
    """ln(t_i / p_i) per chunk. A chunk where either is 0 or not finite has no ratio: the
    exact engine gives 0 only for a model identical to its base, which is never run."""
    out = []
    for t, p in zip(treatment, placebo, strict=False):
        if not (t > 0 and p > 0 and math.isfinite(t) and math.isfinite(p)):
            raise ValueError(f"a chunk's KLD has no log ratio: treatment {t}, placebo {p}")
        out.append(math.log(t / p))
    return out


def look(rule: Rule, ratios: Sequence[float]) -> Look:
    """Where the sequence stands after len(ratios) chunks, and the rule's verdict."""
    n = len(ratios)
    if n == 0:
        return Look(0, math.nan, 0.0, math.inf, None, None)
    mean = math.fsum(ratios) / n
    spread = math.sqrt(math.fsum((r - mean) ** 2 for r in ratios) / (n - 1)) if n >= 2 else None
    b = rule.half_width(n)
    lo, hi = mean - b, mean + b
    stop = None
    if n >= rule.max_chunks:
        stop = "spread above sigma" if spread is not None and spread > rule.sigma else "cap"
    elif n >= rule.min_chunks and (spread is None or spread <= rule.sigma):
        if lo >= math.log(rule.far):
            stop = "far above"
        elif lo > 0 and hi - lo <= 2 * math.log(rule.precision):
            stop = "resolved"
        elif hi <= math.log(rule.tolerance):
            stop = "within tolerance"
    return Look(n, math.exp(mean), math.exp(lo), math.exp(hi), spread, stop)


def anytime_p(rule: Rule, ratios: Sequence[float]) -> float:
    """A p-value for "above the floor" valid however many looks were taken: 1 / the largest
    value the mixture martingale reached at μ = 0 while the running sum was positive (Ville).
    Benjamini–Hochberg over cells stopped at different chunk counts stays valid with these."""
    best = 1.0
    total = 0.0
    s2 = rule.sigma**2
    for n, r in enumerate(ratios, start=1):
        total += r
        if total > 0:
            log_m = -0.5 * math.log1p(n) + total * total / (2.0 * s2 * (1 + n))
            best = max(best, math.exp(min(log_m, 700.0)))
    return min(1.0, 1.0 / best)


def words(result: Look, rule: Rule) -> str:
    """The stop in one line, as the record and the report say it."""
    ratio = f"{result.ratio:.3g}× its floor [{result.low:.3g}, {result.high:.3g}]"
    why = {
        "far above": f"at least {rule.far:g}× its floor",
        "resolved": f"above its floor, the ratio known within a factor {rule.precision:g}",
        "within tolerance": f"below {rule.tolerance:g}× its floor",
        "cap": f"undecided at the cap of {rule.max_chunks} chunks",
        "spread above sigma": (
            f"the chunks' spread {result.spread:.2f} exceeds the assumed σ {rule.sigma:g}: "
            f"no early stop, {rule.max_chunks} chunks"
        ),
    }.get(result.stop or "", "not stopped")
    return f"stopped after {result.n} chunk{'s' if result.n != 1 else ''}: {why}; {ratio}"
