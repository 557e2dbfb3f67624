"""Intervals, floors and false-discovery control: what a measurement can and cannot resolve.

Why chunks are the resampling unit: tokens within a 512-token chunk share their context, so
they are not independent; chunks are. Why paired: the treatment and its placebos are scored
on the same tokens, so their per-chunk difference cancels what the text itself contributes.
Distributions come from scipy, not from hand-written formulas.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from ..figures import sci
from ..storage.record import Interval, Resolution

LEVEL = 0.95
N_RESAMPLES = 9_999
SEED = 20261130  # fixed: the same record always gets the same interval


def _finite(values: Sequence[float | None]) -> np.ndarray:
    arr = np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return arr[np.isfinite(arr)]


def mean_interval(values: Sequence[float | None], *, what: str = "chunks") -> Interval | None:
    """The mean with its bootstrap (BCa) interval; None without two finite values."""
    x = _finite(values)
    if x.size == 0:
        return None
    est = float(x.mean())
    if x.size < 2 or float(x.max()) == float(x.min()):  # nothing to resample: the value itself
        return Interval(
            estimate=est,
            low=est,
            high=est,
            level=LEVEL,
            n=int(x.size),
            method=f"{x.size} identical {what}: no spread",
        )
    from scipy import stats

    with warnings.catch_warnings():  # tiny samples: BCa may warn and fall back; NaN handled
        warnings.simplefilter("ignore")
        res = stats.bootstrap(
            (x,),
            np.mean,
            confidence_level=LEVEL,
            n_resamples=N_RESAMPLES,
            method="BCa",
            rng=np.random.default_rng(SEED),
        )
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    method = "BCa"
    if not (math.isfinite(low) and math.isfinite(high)):
        low, high = (float(v) for v in np.percentile(res.bootstrap_distribution, [2.5, 97.5]))
        method = "percentile"
    return Interval(
        estimate=est,
        low=min(low, est),
        high=max(high, est),
        level=LEVEL,
        n=int(x.size),
        method=f"bootstrap over {x.size} {what}, {method}",
    )


def paired_excess(
    treatment: Sequence[float | None], placebos: Sequence[Sequence[float | None]]
) -> Interval | None:
    """Treatment − mean of the placebos, chunk by chunk, with its bootstrap interval; on the
    chunks all of them have (a placebo run until decided rests while a ranked treatment goes
    on: the pairs are its first chunks)."""
    runs = [list(p) for p in placebos if p]
    if not treatment or not runs:
        return None
    n = min(len(treatment), *map(len, runs))
    control = np.nanmean(np.asarray([r[:n] for r in runs], dtype=np.float64), axis=0)
    diff = np.asarray(treatment[:n], dtype=np.float64) - control
    iv = mean_interval(list(diff))
    if iv is None:
        return None
    return Interval(
        estimate=iv.estimate,
        low=iv.low,
        high=iv.high,
        level=iv.level,
        n=iv.n,
        method=iv.method.replace("bootstrap", "paired bootstrap", 1),
    )


def _interval_text(iv: Interval) -> str:
    if iv.low is None or iv.high is None:
        return sci(iv.estimate)
    return f"{sci(iv.estimate)} [{sci(iv.low)}, {sci(iv.high)}]"


def resolution(
    *,
    engine: str,
    treatment_chunks: Sequence[float | None],
    treatment_mean: float | None,
    placebo_chunks: Sequence[Sequence[float | None]],
    placebo_means: Sequence[float | None],
    identical: bool = False,
    label: str = "",
    decimals: int | None = None,
) -> Resolution:
    """The treatment's KLD against the floor its own method measured (the placebos).

    Floor = the largest placebo's mean KLD: what this engine reports for a change no model
    should notice. The effect is resolved when the paired excess over the placebos lies above
    zero (its interval, bootstrapped over chunks); otherwise it is stated as an upper bound —
    the larger of the floor and the effect's upper interval bound — never as zero."""
    lead = f"{label}, " if label else ""
    if identical:
        return Resolution(
            metric="kld",
            engine=engine,
            floor=0.0,
            floor_detail="not needed: the file is byte-identical to the baseline",
            ratio=None,
            resolved=None,
            sentence=f"{lead}identical to the baseline (byte-identical file): "
            "no effect, proven by SHA-256",
        )
    means = []
    for chunks, mean in zip(placebo_chunks, placebo_means, strict=False):
        iv = mean_interval(chunks) if chunks else None
        means.append(iv.estimate if iv is not None else mean)
    means = [m for m in means if m is not None and math.isfinite(m)]
    floor = max(means) if means else None
    n = len(means)
    floor_detail = (
        f"the largest of {n} placebo{'s' if n != 1 else ''}' mean KLD (lowest mantissa bit "
        "flipped in the same tensors, same engine and chunks)"
        if n
        else "not measured: no placebo ran"
    )
    effect = mean_interval(treatment_chunks) if treatment_chunks else None
    if effect is None and treatment_mean is not None:
        effect = Interval(
            estimate=treatment_mean,
            low=None,
            high=None,
            level=LEVEL,
            n=0,
            method="no per-chunk values: no interval",
        )
    excess = paired_excess(treatment_chunks, [c for c in placebo_chunks if c])
    est = effect.estimate if effect is not None else treatment_mean
    ratio = est / floor if est is not None and floor else None
    if excess is not None:
        resolved = excess.low is not None and excess.low > 0
    elif est is not None and floor is not None:
        resolved = est > floor
    else:
        resolved = None
    if est is None:
        sentence = f"{lead}not measured"
    elif floor is None:
        shown = _interval_text(effect) if effect is not None else sci(est)
        sentence = f"{lead}KLD {shown}, floor not measured (no placebo)"
    elif resolved and not ratio and decimals is not None:  # 0 is the source's rounding
        step = sci(0.5 * 10.0**-decimals)
        floor_detail += f"; the engine prints {decimals} decimals, so 0 means below {step}"
        sentence = (
            f"{lead}KLD {_interval_text(effect)}, above its placebos, which moved no printed "
            f"digit (the engine rounds each chunk's KLD to {decimals} decimals: a floor below "
            f"{step}, not 0)"
        )
    elif resolved and not ratio:  # the placebos measured exactly 0: no ratio to state
        sentence = (
            f"{lead}KLD {_interval_text(effect)}, above its floor of 0 (its placebos "
            "changed nothing measurable)"
        )
    elif resolved:
        times = f"{ratio:.1f}×" if ratio < 10 else f"> {10 ** int(math.log10(ratio)):d}×"
        sentence = f"{lead}KLD {_interval_text(effect)}, {times} its floor ({sci(floor)})"
    else:
        upper = max(v for v in (floor, effect.high if effect else None, est) if v is not None)
        sentence = f"{lead}below the resolution of this measurement (< {sci(upper)})"
    return Resolution(
        metric="kld",
        engine=engine,
        floor=floor,
        floor_detail=floor_detail,
        effect=effect,
        excess=excess,
        ratio=ratio,
        resolved=resolved,
        sentence=sentence,
    )


def false_discoveries(pvalues: Sequence[float], q: float = 0.05) -> list[bool]:
    """Benjamini–Hochberg at rate q: which of many cells are discoveries."""
    from scipy import stats

    p = np.asarray(pvalues, dtype=np.float64)
    if p.size == 0:
        return []
    adjusted = stats.false_discovery_control(np.clip(p, 0.0, 1.0), method="bh")
    return [bool(a <= q) for a in adjusted]
