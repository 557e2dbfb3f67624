"""Every experiment setting, defined once: its ini name, its default, why, and how it is read.

The pytest options and ini values (fq_pytest), the record's and the experiment's defaults
(record.Thresholds, stages.Experiment, evaluate.EvalSettings, sweep.Q_DEFAULT) and `fq
evaluate`'s defaults all take their values from here, so changing a default is one edit;
tests/test_docs.py holds pytest.ini and the README's settings table to it. The defaults are
calibrated on the issue's measurements (Gemma3-270M Q4_K_M and SmolLM2-135M Q4_1, WikiText-2
test, ctx 512, CPU): each help text says why its default is what it is.

No pytest here: a parser raises ValueError and the caller (the plugin) names the option.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Setting:
    name: str  # ini name; the command-line flag is --fq-<name with dashes>
    default: str  # as pytest.ini writes it; "" = unset
    help: str  # why the default is what it is (without the default itself: shown beside it)
    parse: Callable[[str], Any]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def value(self) -> Any:
        """The default as the experiment uses it."""
        return self.parse(self.default)


# --- how a value's text is read ------------------------------------------------------------


def _float(text: str) -> float:
    value = float(text)
    if not value == value or value in (float("inf"), float("-inf")):
        raise ValueError("not a finite number")
    return value


def _fraction(text: str) -> float:
    value = _float(text.rstrip("%")) / (100.0 if text.endswith("%") else 1.0)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be a fraction between 0 and 1 (or a percentage like 90%)")
    return value


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def inner(text: str) -> Any:
        return None if text.strip().lower() in ("", "none", "off", "unset") else parse(text)

    return inner


def _at_least(convert: Callable[[str], Any], low: int) -> Callable[[str], Any]:
    def inner(text: str) -> Any:
        value = convert(text)
        if value < low:
            raise ValueError(f"must be ≥ {low}")
        return value

    return inner


# limits may be 0: an impossible threshold is how a user (or a test) closes the gate
_limit = _at_least(_float, 0)
_count = _at_least(int, 0)
_pos_int = _at_least(int, 1)


def _threads(text: str) -> int:
    if text.strip().lower() in ("", "auto"):
        return os.cpu_count() or 1
    return _pos_int(text)


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def inner(text: str) -> str:
        if text not in choices:
            raise ValueError(f"choose one of {', '.join(choices)}")
        return text

    return inner


def _format(text: str) -> str:
    from .formats import FORMATS, LLAMA_TYPES  # imported late: the settings need no numpy

    return _choice(tuple(f for f in FORMATS if f != "placebo") + LLAMA_TYPES)(text)


def _rounding(text: str) -> str:
    from .formats import ROUNDINGS

    return _choice(ROUNDINGS)(text)


def _text(t: str) -> str:
    if not t.strip():
        raise ValueError("must not be empty")
    return " ".join(t.split())


def _words(t: str) -> tuple[str, ...]:
    words = tuple(t.replace(",", " ").split())
    if not words:
        raise ValueError("must not be empty")
    return words


def _onoff(t: str) -> bool:
    v = t.strip().lower()
    if v in ("on", "yes", "true", "1"):
        return True
    if v in ("off", "no", "false", "0"):
        return False
    raise ValueError("on or off")


def _rate(t: str) -> float:
    v = float(t)
    if not 0 < v < 1:
        raise ValueError("a false discovery rate between 0 and 1")
    return v


# --- the settings --------------------------------------------------------------------------

#: `fq_models` (a list, so not a Setting): the registry models the stages run on.
MODELS = ("smollm2-135m", "gemma3-270m")

#: The stages' settings and thresholds (fq_pytest/plugin.py).
STAGE = (
    Setting(
        "fq_ppl_delta_max",
        "0.02",
        "largest allowed |PPL(treated)/PPL(baseline) - 1|: the real effect measured +0.83% "
        "(Gemma3 Test 1, 8 chunks) and placebos up to +0.56%, while 2 chunks scattered up to "
        "+2.1%; 2% sits above that chunk-to-chunk noise (paired standard error ~0.2%) so "
        "Test 1 is not decided by chance",
        _limit,
    ),
    Setting(
        "fq_max_rel_error",
        "0.01",
        "largest allowed per-element relative error of the conversion: BF16 keeps 8 "
        "significant bits, so truncation errs < 2^-7 = 0.0078 and rounding < 2^-8; anything "
        "larger is a bug, not precision loss",
        _limit,
    ),
    Setting(
        "fq_kld_mean_max",
        "0.02",
        "largest allowed mean KL divergence against the baseline: the engine's own noise "
        "floor on these Q4 models is 0.0033-0.0053 (a 2^-24 placebo flip), the BF16 effect "
        "0.0060-0.0064; 0.02 is ~3x the largest value measured for either, so it fails a "
        "change clearly beyond the engine's own noise and never the noise itself",
        _limit,
    ),
    Setting(
        "fq_same_top_min",
        "0.90",
        "smallest allowed fraction of tokens whose top-1 prediction is unchanged: placebos "
        "give 95.7-99.0%, BF16 95.3-95.9% with a standard error of ~0.5% over 8 chunks; 90% "
        "is >10 standard errors below the noise floor",
        _fraction,
    ),
    Setting(
        "fq_agreement_min",
        "",
        "smallest allowed greedy-generation token agreement with the baseline (unset = report "
        "only): a single flipped token changes every later one, so this measures luck at one "
        "position, not quality",
        _optional(_fraction),
    ),
    Setting(
        "fq_noise_factor_max",
        "",
        "largest allowed treatment KLD / largest placebo KLD (unset = report only): measured "
        "1.16-1.75 with 3 seeds, a statement about the engine's noise, not a safety limit; "
        "set it to make 'no more than N x the engine noise' a gate",
        _optional(_limit),
    ),
    Setting(
        "fq_speed_ratio_min",
        "",
        "smallest allowed treated / baseline llama-perplexity throughput (unset = report "
        "only): BF16-exact F32 norms cannot change the amount of work, so speed differences "
        "here are scheduling noise (0.9-1.1x measured); set e.g. 0.8 to gate on a format "
        "that does change the kernels",
        _optional(_limit),
    ),
    Setting(
        "fq_placebo_seeds",
        "3",
        "number of selection-matched placebo runs per stage, seeds 1..N (0 = control off): "
        "3 seeds spread 0.0018-0.0037 KLD on Gemma3 layer 0, enough to show the noise range, "
        "and cached across runs",
        _count,
    ),
    Setting(
        "fq_gen_tokens",
        "32",
        "tokens generated greedily per prompt: enough to see a first divergence, ~1 s per "
        "prompt on 2 cores",
        _pos_int,
    ),
    Setting(
        "fq_ctx",
        "512",
        "llama-perplexity context per chunk: the standard WikiText-2 "
        "setting all quoted numbers use",
        _pos_int,
    ),
    Setting(
        "fq_batch",
        "512",
        "llama.cpp batch size (= ctx; results are bit-identical for 256 and 512)",
        _pos_int,
    ),
    Setting(
        "fq_chunks",
        "8",
        "chunks of ctx tokens for perplexity and KLD (8 = 4,096 tokens): 2 chunks gave "
        "Gemma3 all-layers +2.1% against +0.62% on 8, and the KLD ratios barely move between "
        "4, 8 and 16; 8 chunks is ~14 s per run here and the KLD base file ~1.1 GB for "
        "Gemma3 (262k vocabulary)",
        _pos_int,
    ),
    Setting(
        "fq_kld_chunks",
        "",
        "chunks for KLD (unset = fq_chunks, so one llama.cpp run gives both PPL and KLD)",
        _optional(_pos_int),
    ),
    Setting(
        "fq_threads",
        "auto",
        "llama.cpp threads (auto = all cores; results are bit-identical across thread counts)",
        _threads,
    ),
    Setting(
        "fq_format",
        "bf16",
        "number format of the treatment (bf16: the plan's experiment; llama.cpp's types by "
        "name, e.g. q8_0)",
        _format,
    ),
    Setting(
        "fq_rounding",
        "truncate",
        "rounding of the treatment (truncate: the plan's algorithm, keep the high 16 bits)",
        _rounding,
    ),
    Setting(
        "fq_tensors",
        "ffn_norm",
        "the tensors each stage fake-quantizes in its layers, space-separated (the --tensors "
        "grammar: a kind, an exact name, a glob or re:REGEX); ffn_norm is the plan's; a kind "
        "the model holds only quantized is refused at collection",
        _words,
    ),
    Setting(
        "fq_chat_template",
        "",
        "chat template of the chat prompt, over the model's: a llama.cpp template name "
        "(gemma, chatml, ...) or a Jinja file (unset: the GGUF's own tokenizer.chat_template, "
        "else the registry's for a known model or a copy of one; the record says which)",
        lambda t: t.strip() or None,
    ),
    Setting(
        "fq_twin",
        "both",
        "which answers each stage gives: deployed = the quantized model as llama.cpp runs "
        "it, where 8-bit activation rounding makes any norm change look like KLD "
        "0.003-0.005; intrinsic = its float twin (every quantized tensor dequantized to F32) "
        "read through full-precision logits, floor ~2e-7; both; test ids of the intrinsic "
        "answer end in -twin",
        _choice(("both", "deployed", "intrinsic")),
    ),
    Setting(
        "fq_gate_variant",
        "deployed",
        "whose Test 1 opens the later stages (deployed: the model as it is used)",
        _choice(("deployed", "intrinsic")),
    ),
    Setting(
        "fq_twin_ppl_delta_max",
        "0.005",
        "intrinsic answer: largest allowed |PPL ratio - 1|: BF16 norms in all 18 Gemma3 "
        "layers moved the twin's PPL by well under 0.5%",
        _limit,
    ),
    Setting(
        "fq_twin_kld_mean_max",
        "0.001",
        "intrinsic answer: largest allowed mean KLD: BF16 in all layers measured 2.6e-5 on "
        "Gemma3's twin, the placebo floor ~2e-7; 1e-3 is 40x the measured effect and far "
        "below the deployed model's own noise (0.003)",
        _limit,
    ),
    Setting(
        "fq_twin_same_top_min",
        "0.98",
        "intrinsic answer: smallest allowed same-top-token fraction: BF16 in all layers kept "
        "99.3% on Gemma3's twin, placebos 100%",
        _fraction,
    ),
    Setting(
        "fq_twin_dtype",
        "f32",
        "intrinsic answer: what the twin's quantized tensors become: f32 (the exact reference) "
        "or f16 (half the file and memory; its own floor and cost per chunk: see the README)",
        _choice(("f32", "f16")),
    ),
    Setting(
        "fq_twin_placebo_seeds",
        "1",
        "intrinsic answer: placebo runs per stage: with full-precision logits two seeds "
        "measured the same floor (1.7e-7 vs 1.8e-7 KLD), and each twin run costs ~4x a "
        "quantized one",
        _count,
    ),
    Setting(
        "fq_text",
        "",
        "corpus file (unset: FQ_TEXT, else WikiText-2 test beside the "
        "checkout pytest runs in or under its data/, else the per-user cache, else "
        "downloaded there)",
        lambda t: t or None,
    ),
)

#: The sensitivity sweep's settings (fq_pytest/sweep.py).
SWEEP = (
    Setting(
        "fq_sweep_plan",
        "smoke",
        "which sweep experiments/test_sensitivity.py runs (smoke: Gemma3, ffn_norm, "
        "layers 0-1, bf16, deployed, 2 chunks, about a minute, so plain pytest and CI "
        "cover the machinery; full: the sweep the other fq_sweep_* values describe, as "
        "`make sweep` runs it)",
        _choice(("smoke", "full")),
    ),
    Setting(
        "fq_sweep_models",
        "gemma3-270m",
        "full sweep: models (registry names or GGUF paths, space-separated): BF16 truncation "
        "changes Gemma3's norms; SmolLM2's are BF16-exact",
        _text,
    ),
    Setting(
        "fq_sweep_kinds",
        "ffn_norm",
        "full sweep: F32 tensor kinds, space-separated, or all = every F32 kind the model "
        "has (Gemma3: attn_norm attn_q_norm attn_k_norm post_attention_norm ffn_norm "
        "post_ffw_norm output_norm); ffn_norm is the plan's",
        _text,
    ),
    Setting(
        "fq_sweep_formats",
        "bf16",
        "full sweep: formats (bf16 fp16 fp8_e4m3 fp8_e5m2 int8, each optionally /truncate "
        "or /nearest; all = every one; without a rounding: fq_rounding), or llama.cpp's types "
        "by name (q8_0 q4_k mxfp4 …: README, Number formats), which the intrinsic answer can "
        "apply to any weight kind",
        _text,
    ),
    Setting(
        "fq_sweep_layers",
        "all",
        "full sweep: layers, each alone (the --layers grammar: all, 3, 0-5, 0,4,9)",
        _text,
    ),
    Setting(
        "fq_sweep_variants",
        "intrinsic",
        "full sweep: intrinsic (the float twin via full-precision logits: the default, since "
        "the deployed answer's floor of 8-bit activation roundings ties every single layer), "
        "deployed (the quantized model via llama-perplexity) or both",
        _choice(("both", "deployed", "intrinsic")),
    ),
    Setting(
        "fq_sweep_cumulative",
        "on",
        "full sweep: also the cumulative curve, the first 1, 2, 4, ... N layers together "
        "per kind, format and variant",
        _onoff,
    ),
    Setting(
        "fq_sweep_chunks",
        "",
        "full sweep: chunks per run (unset = fq_chunks; the smoke plan uses 2)",
        _optional(_pos_int),
    ),
    Setting(
        "fq_sweep_until_decided",
        "off",
        "full sweep, intrinsic cells: evaluate the treatment and its placebo side by side, "
        "one chunk at a time, until the stopping rule decides (fq_core.measurement.sequential: "
        "far above, resolved, within tolerance) or fq_sweep_max_chunks; off (the default) = "
        "a fixed fq_sweep_chunks: measured on Gemma3's ffn_norm sweep, the same discoveries "
        "and leaders in 55 % of the llama.cpp time (ranked cells run fq_sweep_rank_chunks); "
        "the fixed design is the simpler statement. Deployed cells always run a fixed count",
        _onoff,
    ),
    Setting(
        "fq_sweep_max_chunks",
        "16",
        "full sweep: the cap of a cell evaluated until decided (its baseline holds this many "
        "chunks of logits: 267 MB each for Gemma3)",
        _pos_int,
    ),
    Setting(
        "fq_sweep_rank_chunks",
        "6",
        "full sweep until decided: the chunks a ranked (single-layer) cell's treatment is "
        "evaluated for, whenever its placebo stops (at most fq_sweep_max_chunks; 0 = the "
        "treatment stops with its placebo). Ranks compare cells on these same chunks with a "
        "paired t-interval; measured on Gemma3's ffn_norm sweep, 6 order 109 of the 116 pairs "
        "the fixed 8-chunk design orders, none the other way, with the same leaders",
        _count,
    ),
    Setting(
        "fq_sweep_fdr",
        "0.05",
        "false discovery rate q of the Benjamini-Hochberg control over all cells of a "
        "sensitivity report",
        _rate,
    ),
    Setting(
        "fq_gpu_layers",
        "",
        "layers llama.cpp offloads to the GPU in sweep runs (-ngl; unset = not passed: a "
        "CPU build runs on the CPU). Needs a GPU build (FQ_LLAMA_CMAKE_ARGS=-DGGML_CUDA=ON). "
        "GPU results are not bit-identical to CPU ones: the backend is part of every cache "
        "key, so each backend has its own references",
        _optional(_count),
    ),
)


def _types(text: str) -> tuple[str, ...]:
    from .formats import LLAMA_TYPES

    words = _words(text)
    bad = [w for w in words if w not in LLAMA_TYPES]
    if bad:
        raise ValueError(f"{bad[0]} is not one of llama.cpp's types ({', '.join(LLAMA_TYPES)})")
    return words


#: a recipe option besides llama.cpp's types: each tensor of a group as the base preset
#: stores it (measurement.recipe_file.BASE)
RECIPE_BASE_OPTION = "base"


def _recipe_types(text: str) -> tuple[str, ...]:
    words = _words(text)
    if others := " ".join(w for w in words if w != RECIPE_BASE_OPTION):
        _types(others)
    return words


def _preset(text: str) -> str:
    from .formats import LLAMA_PRESETS

    return _choice(LLAMA_PRESETS)(text.strip().lower())


#: The recipe stage's settings (fq_pytest/recipe.py, experiments/test_recipe.py).
RECIPE = (
    Setting(
        "fq_recipe_models",
        "smollm2-135m",
        "recipe stage: models (each gated on its Test 1); the default is CI's small recipe",
        _words,
    ),
    Setting(
        "fq_recipe_kinds",
        "ffn_down attn_v",
        "recipe stage: the weight kinds it prices and types (all others keep the stock "
        "preset's types); e.g. every matrix: attn_q attn_k attn_v attn_output ffn_gate ffn_up "
        "ffn_down token_embd",
        _words,
    ),
    Setting(
        "fq_recipe_groups",
        "1",
        "recipe stage: runs of layers per kind priced and typed apart (1 = one type per kind)",
        _pos_int,
    ),
    Setting(
        "fq_recipe_types",
        "q4_0 q5_0 q8_0 q4_k q5_k q6_k base",
        "recipe stage: llama.cpp's types to price (a type whose blocks do not divide a "
        "group's rows is left out for that group) and `base`: each tensor of a group as the "
        "base preset stores it (a preset mixes types inside a kind, which no single type "
        "prices)",
        _recipe_types,
    ),
    Setting(
        "fq_recipe_base",
        "q4_k_m",
        "recipe stage: the stock preset (llama-quantize's type, made from the same float "
        "twin): the budget, the comparison, and the type of every tensor not priced",
        _preset,
    ),
    Setting(
        "fq_recipe_kld_target",
        "",
        "recipe stage: the fewest bytes with a predicted mean KLD at most this (unset = the "
        "least KLD within the stock preset's bytes)",
        _optional(_limit),
    ),
    Setting(
        "fq_recipe_price_chunks",
        "2",
        "recipe stage: the cap of a pricing cell (intrinsic, evaluated until decided)",
        _pos_int,
    ),
    Setting(
        "fq_recipe_rank_chunks",
        "2",
        "recipe stage: the chunks a pricing cell's treatment runs (its KLD's precision)",
        _pos_int,
    ),
    Setting(
        "fq_recipe_chunks",
        "2",
        "recipe stage: chunks the recipe and stock files are measured on, by both answers",
        _pos_int,
    ),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in (*STAGE, *SWEEP, *RECIPE)}


def default(name: str) -> Any:
    """The parsed default of one setting (KeyError for a name that is not one)."""
    return BY_NAME[name].value


def defaults(settings: tuple[Setting, ...] = STAGE) -> dict[str, Any]:
    """name -> parsed default: what option values are when nothing is set."""
    return {s.name: s.value for s in settings}


def seeds(n: int) -> tuple[int, ...]:
    """`fq_placebo_seeds = N` -> the placebo seeds 1..N."""
    return tuple(range(1, n + 1))


#: test_regression's tolerances for the intrinsic answer (the float twin), over the deployed
#: defaults (fq_core.experiment.regression.DEFAULT_TOLERANCES): the twin's effects are one to
#: two orders smaller (Gemma3 Test 1 BF16: ΔPPL a few hundredths of a point, same-top within
#: a fraction of a point; int8's twin KLD 6.5e-7 → 4.8e-5), so the deployed ΔPPL 0.5 points
#: and same-top 2 points would pass any twin regression. Relative ones (kld 25%) keep their
#: scale. `--fq-compare-fail` overrides both answers' values.
INTRINSIC_TOLERANCES = "ppl:0.1%,delta_ppl:0.05,same_top:0.5"
