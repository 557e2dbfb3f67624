"""The record of one stage × model run: one typed definition and its one JSON round trip.

Why typed: everything downstream — the gate, the CLI, the HTML and markdown reports, the
charts, the pytest hooks — reads these fields by attribute, so a misspelt name is an error
where it is written, not a "—" in a report. Why msgspec: the Struct definitions *are* the
schema; decoding validates every field and names the one that is wrong
(`Expected `float`, got `str` - at `$.treatment.ppl``), with no hand-written to/from JSON.

This module computes nothing. The protocol (fq_core.experiment.stages) fills the record;
fq_core.storage.results stores it; everything else renders it.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Any, Literal

import msgspec

from ..definitions.settings import default
from ..errors import BadInput
from . import codec
from .identity import MachineInfo

#: Version of the stored layout. 1: checks said `asserted`, report-only checks were "passed".
#: 2: no variant (every record measured the model as deployed), no resolution.
#: 3: the placebo comparisons were words only (`placebo.compared.kld` a string).
SCHEMA = 4

Status = Literal["passed", "failed", "reported", "skipped", "error"]
Outcome = Literal["running", "passed", "failed", "skipped"]
#: Which model a stage measured: the quantized file as deployed, or its float twin (every
#: quantized tensor dequantized), where no activation rounding hides the intrinsic effect.
Variant = Literal["deployed", "intrinsic"]
VARIANTS: tuple[Variant, ...] = ("deployed", "intrinsic")
#: Appended to the model's name in test ids and result file names: `layer0-gemma3-270m-twin`.
VARIANT_SUFFIX: dict[str, str] = {"deployed": "", "intrinsic": "-twin"}


def case_name(model: str, variant: str = "deployed") -> str:
    """The model's part of a test id and result file name for one variant."""
    return model + VARIANT_SUFFIX[variant]


class _Part(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class ModelInfo(_Part, kw_only=True):
    name: str
    path: str
    sha256: str


class CorpusInfo(_Part, kw_only=True):
    path: str
    sha256: str
    n_bytes: int
    n_tokens: int | None = None  # the whole corpus under the model's tokenizer


class LlamaInfo(_Part, kw_only=True):
    version: str
    build_info: str
    bin_dir: str
    # native builds are bit-identical only on one CPU model; FQ_LLAMA_CPU=x86-64-v3 etc. on
    # every CPU with that level (None: tools not built by fq, the instruction set unknown)
    instruction_set: str | None = None
    # SHA-256 over the build's files (measurement.llama.tools.build_files): what the cache keys name
    build_id: str | None = None


class Prompt(_Part, kw_only=True):
    text: str
    chat: bool


class Settings(_Part, kw_only=True):
    format: str
    rounding: str
    tensors: tuple[str, ...]
    ctx: int
    batch: int
    chunks: int
    kld_chunks: int
    threads: int | None
    gen_tokens: int
    prompts: tuple[Prompt, ...]
    placebo_seeds: tuple[int, ...]
    engine: str = "llama-perplexity"  # or "logits": full-precision logits, F32 KV cache
    twin_dtype: str | None = None  # intrinsic: what the twin's quantized tensors became
    chat_template: str | None = None  # fq_chat_template, when set (it changes the generations)


class Thresholds(_Part, kw_only=True):
    """Pass/fail limits; None = report only (the check records its value and gates nothing)."""

    ppl_delta_max: float = default("fq_ppl_delta_max")  # |PPL(treated)/PPL(base) - 1|
    max_rel_error: float = default("fq_max_rel_error")
    kld_mean_max: float = default("fq_kld_mean_max")
    same_top_min: float = default("fq_same_top_min")  # fraction of top-1 tokens unchanged
    agreement_min: float | None = default("fq_agreement_min")  # greedy token agreement
    noise_factor_max: float | None = default("fq_noise_factor_max")  # KLD / largest placebo's
    speed_ratio_min: float | None = default("fq_speed_ratio_min")  # treated / baseline tok/s

    def gates(self, check: str) -> bool:
        """Whether a check decides anything: the report-only ones gate once given a limit."""
        limit_of = {
            "placebo": self.noise_factor_max,
            "agreement": self.agreement_min,
            "speed": self.speed_ratio_min,
        }
        if check in REPORT_ONLY:
            return False
        return check not in limit_of or limit_of[check] is not None


#: checks that state a fact and never gate (whether the real file runs in llama.cpp)
REPORT_ONLY = ("deployable",)


class Check(_Part, kw_only=True):
    """A verdict: status, the measured value and its threshold, and whether it gates."""

    status: Status
    detail: str  # one line: the test's message and the report's text
    value: float | None = None
    threshold: float | None = None
    gates: bool = True  # decides the stage outcome, the gate and the pytest outcome
    same_top: float | None = None  # kld: the second measured value and its limit
    same_top_threshold: float | None = None
    changed_bytes: int | None = None  # quantize


class TensorError(_Part, kw_only=True):
    name: str
    layer: int | None
    changed: int
    n_elements: int
    max_abs: float | None
    mean_abs: float | None
    max_rel: float | None
    mean_rel: float | None
    n_nonfinite: int = 0  # pairs with NaN or ±Inf on either side
    n_became_nonfinite: int = 0  # finite values the conversion made NaN or ±Inf


class Distribution(_Part, kw_only=True):
    n: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    percentiles: dict[str, float | None]
    n_nonfinite: int = 0


class Focus(_Part, kw_only=True):
    """One patched tensor before and after, for the report's charts."""

    layer: int | None
    tensor: str
    before: Distribution
    after: Distribution
    hist_edges: tuple[float, ...]
    hist_before: tuple[int, ...]
    hist_after: tuple[int, ...]
    rel_error_edges: tuple[float, ...]
    rel_error_counts: tuple[int, ...]


class Numeric(_Part, kw_only=True):
    manifest: str
    n_tensors: int
    n_elements: int
    changed: int
    max_abs: float | None
    mean_abs: float | None
    max_rel: float | None
    mean_rel: float | None
    max_ulp_bf16: float | None = None
    n_nonfinite: int = 0  # pairs with NaN or ±Inf on either side, all tensors
    n_became_nonfinite: int = 0  # finite values the conversion made NaN or ±Inf
    summary: str
    per_tensor: tuple[TensorError, ...]
    focus: Focus | None = None


class GenerationInfo(_Part, kw_only=True):
    prompt: str
    chat: bool
    text: str
    n_tokens: int
    tokens_per_s: float | None
    tool: str | None = None
    chat_template: str | None = None  # what llama-completion was given (None: the GGUF's own)
    chat_template_source: str | None = None  # fq_chat_template, registry (…), gguf, none


class Baseline(_Part, kw_only=True):
    ppl: float | None
    ppl_err: float | None
    chunk_ppls: tuple[float | None, ...]
    n_chunks: int
    tokens_per_s: float | None
    load_time_ms: float | None
    generations: tuple[GenerationInfo, ...]
    cached: bool | None = None
    key: str | None = None


class KLD(_Part, kw_only=True):
    mean: float | None
    mean_err: float | None = None
    median: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None
    same_top_pct: float | None = None
    same_top_err: float | None = None
    rms_dp_pct: float | None = None
    p999: float | None = None
    ppl_ratio: float | None = None
    chunk_means: tuple[float | None, ...] = ()  # each chunk's own mean KLD (paired intervals)
    exact: bool = False  # full-precision logits, not llama-perplexity's 16-bit base file


class PromptAgreement(_Part, kw_only=True):
    prompt: str
    chat: bool
    same_text: bool
    token_agreement: float | None
    first_divergence: int | None


class Agreement(_Part, kw_only=True):
    token_agreement: float | None
    first_divergence: int | None
    per_prompt: tuple[PromptAgreement, ...]


class Treatment(_Part, kw_only=True):
    ppl: float | None
    ppl_err: float | None
    chunk_ppls: tuple[float | None, ...]
    delta_ppl: float | None
    delta_ppl_pct: float | None
    delta_ppl_pct_err: float | None
    kld: KLD | None
    tokens_per_s: float | None
    speed_ratio: float | None
    gen_tokens_per_s: float | None
    baseline_gen_tokens_per_s: float | None
    load_time_ms: float | None
    generations: tuple[GenerationInfo, ...]
    agreement: Agreement | None
    identical_to_baseline: bool = False  # byte-identical file: no llama.cpp run was needed


class Range(_Part, kw_only=True):
    min: float
    max: float
    mean: float


class Command(_Part, kw_only=True):
    argv: tuple[str, ...]
    tool: str | None = None
    cwd: str | None = None
    env: dict[str, str] = {}
    cleared_env: tuple[str, ...] = ()
    started_at: str
    duration_s: float
    exit_status: int | None
    timed_out: bool = False
    stdout_path: str
    stderr_path: str
    role: str | None = None  # baseline, treatment, placebo seed N
    cached: bool | None = None  # True when the run was reused from the cache, not made now


class PlaceboRun(_Part, kw_only=True):
    seed: int
    key: str
    layers: str
    manifest: str
    changed: int
    n_elements: int
    ppl: float | None
    ppl_err: float | None
    delta_ppl_pct: float | None
    delta_ppl_pct_err: float | None
    kld_mean: float | None
    same_top_pct: float | None
    kld: KLD | None
    cached: bool | None = None


class SequentialStop(_Part, kw_only=True):
    """Why a run evaluated until decided stopped where it did (fq_core.measurement.sequential):
    the ratio of the treatment's KLD to its placebo's with its always-valid interval."""

    rule: dict[str, float | int]
    n_chunks: int  # chunks used
    cap: int
    stop: str  # far above | resolved | within tolerance | cap | spread above sigma
    ratio: float
    low: float
    high: float
    spread: float | None
    p_value: float  # anytime-valid: Benjamini-Hochberg over cells stopped anywhere
    log_ratios: tuple[float, ...]
    words: str


class CacheUse(_Part, kw_only=True):
    """Where a part of the record's figures came from: a verified cache entry
    (fq_core.storage.cache), measured now or read back, with when it was measured."""

    role: str  # baseline | treatment | placebo seed N: the figures it gave
    kind: str  # baselines, treatments, placebos
    key: str
    hit: bool  # read from the cache: measured earlier, by another test or run
    measured_at: str | None
    rejected: str | None = None  # an earlier entry at this key failed its proof (moved aside)


class Standing(enum.StrEnum):
    """Where a treatment's figure stands against its placebos: decided once by the protocol
    (experiment.checks), stored, and read by the report as a category, never out of the words."""

    NOISE = "noise"  # no further from the baseline than the placebos: the engine's noise
    ABOVE = "above"  # beyond every placebo
    NONE = "none"  # nothing to compare: control not run, not measured, nothing changed


class Versus(_Part, kw_only=True):
    """One figure against its placebos: the category and the protocol's words for it."""

    standing: Standing
    words: str  # "1.6× the largest placebo", "within engine noise", "control not run", ...


class PlaceboComparison(_Part, kw_only=True):
    """The treatment against its placebos, decided once by the protocol."""

    kld: Versus
    delta_ppl: Versus
    same_top: Versus


class Placebo(_Part, kw_only=True):
    seeds: tuple[int, ...]
    runs: tuple[PlaceboRun, ...]
    kld_mean: Range | None
    delta_ppl_pct: Range | None
    same_top_pct: Range | None
    kld_ratio: float | None
    verdict: str
    compared: PlaceboComparison | None = None


class TwinInfo(_Part, kw_only=True):
    """The float twin an intrinsic record measured (the model itself is named in `model`)."""

    path: str
    sha256: str
    dtype: str  # f32 | f16 | bf16: what the quantized tensors became
    source_sha256: str


class Interval(_Part, kw_only=True):
    estimate: float | None
    low: float | None
    high: float | None
    level: float = 0.95
    n: int  # resampled units (chunks)
    method: str  # e.g. "bootstrap over 8 chunks, paired, BCa"


class Resolution(_Part, kw_only=True):
    """What this measurement can resolve, and the treatment's effect against it.

    The floor is measured, not assumed: the placebos' mean KLD (a change no model should
    notice) under the same engine, selection and chunks. An effect whose excess over the
    placebos is not resolved is stated as an upper bound, never as zero."""

    metric: str  # "kld"
    engine: str  # how it was measured, in words
    floor: float | None  # the largest placebo's mean KLD: what "no effect" measures here
    floor_detail: str
    effect: Interval | None = None  # the treatment's mean, with its interval
    excess: Interval | None = None  # treatment − mean of the placebos, paired per chunk
    ratio: float | None = None  # effect / floor
    resolved: bool | None = None  # the excess interval lies above zero
    sentence: str  # the one sentence the report prints


class StageRecord(_Part, kw_only=True):
    schema: int
    run_id: str
    stage: str  # the stage id, part of every test id: layer0, layers0-2, ...
    stage_title: str  # Test 1, ...
    stage_index: int
    layers: str
    variant: Variant = "deployed"
    model: ModelInfo  # the model as deployed (its name and SHA-256 key the gate)
    twin: TwinInfo | None = None  # intrinsic: the float twin that was measured
    corpus: CorpusInfo
    llama: LlamaInfo
    fq_version: str
    machine: MachineInfo
    settings: Settings
    thresholds: Thresholds
    checks: dict[str, Check]
    numeric: Numeric | None = None
    baseline: Baseline | None = None
    treatment: Treatment | None = None
    placebo: Placebo | None = None
    resolution: Resolution | None = None
    commands: tuple[Command, ...] = ()
    cache: tuple[CacheUse, ...] = ()  # the cache entries behind the figures, in order of use
    outcome: Outcome
    skip_reason: str | None = None
    started_at: str
    finished_at: str | None = None

    @property
    def case(self) -> str:
        """The model's part of the test id and the result file name (`gemma3-270m-twin`)."""
        return case_name(self.model.name, self.variant)

    @property
    def n_layers(self) -> int | None:
        """How many layers this stage quantized (the x axis of the cross-stage charts)."""
        if self.numeric is None:
            return None
        layers = {t.layer for t in self.numeric.per_tensor if t.layer is not None}
        return len(layers) or None


# --- the one round trip ----------------------------------------------------------------------


class _Version(msgspec.Struct):
    schema: int


def to_builtins(record: StageRecord) -> dict:
    return codec.to_builtins(record)


def encode(record: StageRecord) -> bytes:
    """Pretty JSON (people read these files); NaN/Inf stored as words, not as null."""
    return codec.encode(record, indent=2) + b"\n"


def from_builtins(data: Any, *, source: str = "record") -> StageRecord:
    """Validate plain data (a stored record) into a record; BadInput names the field."""
    try:
        version = msgspec.convert(data, _Version).schema
    except msgspec.ValidationError as exc:
        raise BadInput(f"{source}: not a stage record: {exc}") from exc
    try:
        return codec.convert(_upgrade(data, version, source), StageRecord)
    except msgspec.ValidationError as exc:
        raise BadInput(f"{source}: {exc}") from exc


def decode(raw: bytes | str, *, source: str = "record") -> StageRecord:
    """Parse and validate a stored record; BadInput names the source and the field."""
    try:
        data = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadInput(f"{source}: not valid JSON ({exc})") from exc
    return from_builtins(data, source=source)


def read(path: str | os.PathLike[str]) -> StageRecord:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"{path}: cannot read results file ({exc.strerror or exc})") from exc
    return decode(raw, source=str(path))


def upgrade_check(check: Any) -> Any:
    """A schema-1 check said `asserted` where this says `gates`, and stored a report-only
    check as "passed"; a current check passes through unchanged."""
    if not isinstance(check, dict) or "asserted" not in check:
        return check
    c = dict(check)
    gates = bool(c.pop("asserted"))
    if c.get("status") == "passed" and not gates:
        c["status"] = "reported"
    return dict(c, gates=gates)


def _upgrade(data: Any, version: int, source: str) -> Any:
    """Older layouts are brought forward here, newer ones refused by name."""
    if version == SCHEMA:
        return data
    if version > SCHEMA:
        raise BadInput(
            f"{source}: schema {version} is newer than this fq-suite reads ({SCHEMA}); "
            "upgrade fq-suite to read it"
        )
    if version not in (1, 2, 3) or not isinstance(data, dict):
        raise BadInput(f"{source}: schema {version} is not a layout this fq-suite knows")
    data = dict(data, schema=SCHEMA)  # schema 2 lacks fields that have their defaults
    if version == 1:
        data["thresholds"] = dict(data.get("thresholds") or {})
        data["thresholds"].setdefault("speed_ratio_min", None)
        data["checks"] = {n: upgrade_check(c) for n, c in (data.get("checks") or {}).items()}
    placebo = data.get("placebo")
    if isinstance(placebo, dict) and isinstance(placebo.get("compared"), dict):
        compared = {k: _versus(v) for k, v in placebo["compared"].items()}
        data["placebo"] = dict(placebo, compared=compared)
    return data


def _versus(words: Any) -> Any:
    """A comparison stored before schema 4 as words alone, with the category those words
    stated (the wordings fq_core.experiment.checks produced; anything else compared nothing)."""
    if not isinstance(words, str):
        return words
    if words.startswith("within engine noise"):
        standing = Standing.NOISE
    elif words.startswith("nan"):  # a treatment KLD that was not a number
        standing = Standing.NONE
    elif "× the largest placebo" in words or words.startswith("above the placebo"):
        standing = Standing.ABOVE
    else:
        standing = Standing.NONE
    return {"standing": standing.value, "words": words}
