"""The stopping rule keeps its promise under peeking (fq_core.measurement.sequential).

Simulated chunk streams shaped like the measured ones (Gemma3's twin, 8 chunks: the placebo's
per-chunk KLD varies ~15 % with the text, the treatment follows it with a log-ratio spread of
0.10–0.22), looked at after every chunk: the intervals cover the true ratio at every look at
once in ≥ 95 % of streams, and Benjamini–Hochberg over the anytime p-values of a sweep of
null and small-effect cells keeps its false-discovery rate. A naive t-interval read after
every chunk, the thing this replaces, is shown failing the same check.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from fq_core.experiment.stats import false_discoveries
from fq_core.measurement.sequential import Rule, anytime_p, log_ratios, look, words

FLOOR = 1.8e-7  # the twin's placebo KLD per chunk (layer 0 … all layers)
RULE = Rule()


def _stream(rng, mu: float, spread: float, n: int, *, tails: bool = False):
    """Per-chunk (treatment, placebo) KLDs: the text moves both (shared factor), the treatment
    is exp(mu) times the placebo up to its own noise (normal, or Student-t with 5 df)."""
    text = rng.normal(0.0, 0.15, n)
    noise = rng.standard_t(5, n) * spread / math.sqrt(5 / 3) if tails else rng.normal(0, spread, n)
    placebo = FLOOR * np.exp(text)
    return list(placebo * np.exp(mu + noise)), list(placebo)


def _run(rule: Rule, treatment, placebo):
    """Peek after every chunk; the look where the rule stopped, and every look on the way."""
    ratios = log_ratios(treatment, placebo)
    looks = []
    for n in range(1, rule.max_chunks + 1):
        looks.append(look(rule, ratios[:n]))
        if looks[-1].stop:
            break
    return looks, ratios[: looks[-1].n]


def _miss_limit(trials: int, level: float = 0.05) -> float:
    """The miss rate a correct 95 % procedure stays under in `trials` (binomial, 3 σ)."""
    return level + 3 * math.sqrt(level * (1 - level) / trials)


@pytest.mark.parametrize("tails", [False, True], ids=["normal", "student-t5"])
@pytest.mark.parametrize("mu", [0.0, math.log(1.5), math.log(3.6), math.log(130.0)])
def test_intervals_cover_the_true_ratio_at_every_look(mu, tails):
    rng = np.random.default_rng(7 + int(mu * 100) + tails)
    trials, spread = 1500, RULE.sigma  # at the assumption's edge: the hardest honest case
    missed = 0
    for _ in range(trials):
        looks, _ = _run(RULE, *_stream(rng, mu, spread, RULE.max_chunks, tails=tails))
        missed += any(not (lk.low <= math.exp(mu) <= lk.high) for lk in looks)
    assert missed / trials <= _miss_limit(trials), (missed, trials)


def test_naive_t_intervals_read_after_every_chunk_do_not_cover():
    """The check above can fail: a 95 % t-interval recomputed after every chunk, stopping at
    the first that excludes the truth, misses far more often than 5 %."""
    rng = np.random.default_rng(11)
    trials, missed = 1500, 0
    for _ in range(trials):
        t, p = _stream(rng, 0.0, 0.2, RULE.max_chunks)
        r = np.asarray(log_ratios(t, p))
        for n in range(2, RULE.max_chunks + 1):
            half = sps.t.ppf(0.975, n - 1) * r[:n].std(ddof=1) / math.sqrt(n)
            if abs(r[:n].mean()) > half:
                missed += 1
                break
    assert missed / trials > _miss_limit(trials)


def _sweep(rng, n_null: int, n_effect: int, mu: float, spread: float):
    truth, pvalues = [], []
    for k in range(n_null + n_effect):
        effect = k >= n_null
        _, ratios = _run(RULE, *_stream(rng, mu if effect else 0.0, spread, RULE.max_chunks))
        truth.append(effect)
        pvalues.append(anytime_p(RULE, ratios))
    return truth, pvalues


@pytest.mark.parametrize("spread", [0.22, RULE.sigma])
def test_benjamini_hochberg_over_sequential_cells_keeps_its_rate(spread):
    """Sweeps of 30 null cells and 10 small effects (2× the floor), each stopped by the rule;
    the mean false-discovery proportion stays at q = 0.05 or below."""
    rng = np.random.default_rng(23)
    q, sweeps, fdp, found = 0.05, 200, [], 0
    for _ in range(sweeps):
        truth, pvalues = _sweep(rng, 30, 10, math.log(2.0), spread)
        disc = false_discoveries(pvalues, q)
        false = sum(d and not t for d, t in zip(disc, truth, strict=True))
        fdp.append(false / max(1, sum(disc)))
        found += sum(d and t for d, t in zip(disc, truth, strict=True))
    assert float(np.mean(fdp)) <= q + 3 * float(np.std(fdp)) / math.sqrt(sweeps)
    assert found > 0  # not vacuous: the small effects are found in some sweeps


def test_far_above_stops_within_two_chunks_and_layer_zero_within_five():
    """The measured streams of Gemma3's twin (stage records, 8 chunks): all 18 layers
    (≈ 130× its floor) stops at the minimum of 2 chunks, layer 0 (≈ 3.6×) resolved at 5."""
    all_layers = [2.45e-5, 2.80e-5, 3.07e-5, 2.41e-5, 2.02e-5, 2.59e-5, 2.28e-5, 2.73e-5]
    all_placebo = [2.00e-7, 1.80e-7, 2.30e-7, 1.97e-7, 1.41e-7, 1.80e-7, 1.54e-7, 1.72e-7]
    layer0 = [7.56e-7, 7.75e-7, 8.40e-7, 5.09e-7, 3.75e-7, 8.14e-7, 5.20e-7, 5.02e-7]
    layer0_placebo = [1.83e-7, 2.00e-7, 2.31e-7, 1.74e-7, 1.55e-7, 1.75e-7, 1.41e-7, 1.65e-7]
    looks, _ = _run(RULE, all_layers, all_placebo)
    assert (looks[-1].n, looks[-1].stop) == (2, "far above")
    assert looks[-1].low >= 10 and "2 chunks: at least 10×" in words(looks[-1], RULE)
    looks, _ = _run(RULE, layer0, layer0_placebo)
    assert (looks[-1].n, looks[-1].stop) == (5, "resolved")
    assert looks[-1].low > 1 and looks[-1].high / looks[-1].low <= RULE.precision**2


def test_a_null_cell_is_bounded_or_capped_never_resolved():
    rng = np.random.default_rng(5)
    stops = {_run(RULE, *_stream(rng, 0.0, 0.15, RULE.max_chunks))[0][-1].stop for _ in range(50)}
    assert stops <= {"within tolerance", "cap"} and "within tolerance" in stops


def test_a_spread_above_sigma_never_stops_early():
    rng = np.random.default_rng(3)
    looks, _ = _run(RULE, *_stream(rng, math.log(130.0), 3.0, RULE.max_chunks))
    assert looks[-1].n == RULE.max_chunks and looks[-1].stop == "spread above sigma"


def test_bad_rules_and_chunks_are_refused():
    with pytest.raises(ValueError, match="sigma"):
        Rule(sigma=0)
    with pytest.raises(ValueError, match="min_chunks"):
        Rule(min_chunks=4, max_chunks=2)
    with pytest.raises(ValueError, match="no log ratio"):
        log_ratios([1e-6, 0.0], [1e-7, 1e-7])
