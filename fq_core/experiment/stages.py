"""The experiment's configuration: the four stages, the settings and thresholds of a run, and
where it runs. The protocol that every stage × model follows is fq_core.experiment.protocol; the
verdicts are fq_core.experiment.checks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from ..definitions.settings import default, seeds
from ..errors import BadInput, BadSelection
from ..measurement.selection import DEFAULT_TENSORS
from ..storage import codec, results
from ..storage.identity import Identity
from ..storage.record import VARIANTS, StageRecord, Thresholds
from . import checks

if TYPE_CHECKING:  # the stage definitions import without llama.cpp's side of the library
    from ..measurement.corpus import Corpus
    from ..measurement.evaluate import EvalSettings
    from ..measurement.llama.runner import LlamaRunner
    from ..measurement.llama.tools import LlamaTools
    from ..measurement.models import ModelRef

log = logging.getLogger(__name__)


def _eval_settings() -> EvalSettings:
    from ..measurement.evaluate import (
        EvalSettings,  # imported late: the stage table needs no llama side
    )

    return EvalSettings()


@dataclass(frozen=True)
class Stage:
    id: str  # part of every test id of the stage; `-k layer0` selects exactly Test 1
    title: str
    layers: str  # selection.parse_layers grammar
    index: int


STAGES = (
    Stage("layer0", "Test 1", "0", 1),
    Stage("layers0-2", "Test 2", "0-2", 2),
    Stage("layers0-9", "Test 3", "0-9", 3),
    Stage("all-layers", "Test 4", "all", 4),
)
GATE_STAGE = STAGES[0]
CHECKS = checks.CHECKS


def stage(stage_id: str) -> Stage:
    for s in STAGES:
        if s.id == stage_id:
            return s
    raise KeyError(stage_id)


#: Limits for the intrinsic answer (the float twin, full-precision logits). Its floor is
#: ~2e-7 KLD and BF16 in all 18 Gemma3 layers measured 2.6e-5, so the deployed limits
#: (set above the Q4 engine's 0.003-0.005 noise) would gate nothing there.
INTRINSIC_THRESHOLDS = Thresholds(
    ppl_delta_max=default("fq_twin_ppl_delta_max"),
    kld_mean_max=default("fq_twin_kld_mean_max"),
    same_top_min=default("fq_twin_same_top_min"),
)

#: What `fq_twin` chooses: which answers each stage gives.
TWIN_CHOICES = {"both": VARIANTS, "deployed": ("deployed",), "intrinsic": ("intrinsic",)}


@dataclass(frozen=True)
class Experiment:
    """Everything a stage run depends on besides the model: settings, format, control, limits.

    `settings`, `thresholds` and `placebo_seeds` are the deployed answer's; `for_variant`
    gives the experiment one variant runs with (the intrinsic one reads full-precision logits
    and has its own limits and seeds)."""

    settings: EvalSettings = field(default_factory=_eval_settings)
    fmt: str = default("fq_format")
    rounding: str = default("fq_rounding")
    tensors: tuple[str, ...] = DEFAULT_TENSORS
    placebo_seeds: tuple[int, ...] = seeds(default("fq_placebo_seeds"))
    thresholds: Thresholds = field(default_factory=Thresholds)
    keep_models: bool = False  # keep the fake-quantized GGUFs (large) after evaluation
    variants: tuple[str, ...] = TWIN_CHOICES[default("fq_twin")]  # which answers a stage gives
    gate_variant: str = default("fq_gate_variant")  # whose Test 1 opens the later stages
    twin_dtype: str = "f32"
    intrinsic_thresholds: Thresholds = INTRINSIC_THRESHOLDS
    intrinsic_placebo_seeds: tuple[int, ...] = seeds(default("fq_twin_placebo_seeds"))
    variant: str = "deployed"  # the variant this experiment object runs (see for_variant)

    def for_variant(self, variant: str) -> Experiment:
        """The experiment as one variant runs it: its engine, limits and placebo seeds."""
        if variant == "deployed":
            return replace(self, variant=variant)
        if variant != "intrinsic":
            raise ValueError(f"unknown variant {variant!r}")
        return replace(
            self,
            variant=variant,
            settings=replace(self.settings, engine="logits"),
            thresholds=self.intrinsic_thresholds,
            placebo_seeds=self.intrinsic_placebo_seeds,
        )

    def settings_json(self) -> dict:
        """The record's settings; fq_chat_template named only when set, so the identities of
        runs that never set it stay what they were."""
        s = self.settings
        chosen = {"chat_template": s.chat_template} if s.chat_template else {}
        return {
            **chosen,
            "format": self.fmt,
            "rounding": self.rounding,
            "tensors": list(self.tensors),
            "ctx": s.ctx,
            "batch": s.batch,
            "chunks": s.chunks,
            "kld_chunks": s.kld_chunks,
            "threads": s.threads,
            "gen_tokens": s.gen_tokens,
            "prompts": [{"text": p.text, "chat": p.chat} for p in s.prompts],
            "placebo_seeds": list(self.placebo_seeds),
            "engine": getattr(s, "engine", "llama-perplexity"),
            "twin_dtype": self.twin_dtype if self.variant == "intrinsic" else None,
        }

    def gate_identity(self, model: ModelRef, corpus: Corpus, tools: LlamaTools) -> Identity:
        """The gate's identity. Threads are left out: llama.cpp is bit-identical across thread
        counts. It is that of the variant whose Test 1 is the gate."""
        exp = self.for_variant(self.gate_variant)
        settings = {k: v for k, v in exp.settings_json().items() if k != "threads"}
        settings["variant"] = exp.variant
        return Identity(
            model_sha256=model.sha256,
            corpus_sha256=corpus.sha256,
            llama_build=tools.build_id,
            format=self.fmt,
            rounding=self.rounding,
            settings=settings,
            thresholds=msgspec.to_builtins(exp.thresholds),
        )

    def differences(
        self,
        rec: StageRecord,
        model: ModelRef | None = None,
        corpus: Corpus | None = None,
        tools: LlamaTools | None = None,
    ) -> list[str]:
        """What this experiment would record differently from `rec`: its variant's settings
        and thresholds, and (when given) the model, corpus and llama.cpp it would measure
        with. Threads are left out: llama.cpp is bit-identical across thread counts."""
        exp = self.for_variant(rec.variant)
        now, then = (
            codec.to_builtins({"settings": settings, "thresholds": limits})
            for settings, limits in (
                (exp.settings_json(), exp.thresholds),
                (rec.settings, rec.thresholds),
            )
        )
        for side in (now, then):
            side["settings"].pop("threads", None)
        for name, given, recorded in (
            ("model_sha256", model and model.sha256, rec.model.sha256),
            ("corpus_sha256", corpus and corpus.sha256, rec.corpus.sha256),
            ("llama_build", tools and tools.build_id, rec.llama.build_id),
        ):
            if given is not None:
                now[name], then[name] = given, recorded
        then_id, now_id = (msgspec.convert(side, Identity) for side in (then, now))
        return [d.text for d in then_id.differences(now_id)]


def experiment_from(values: Mapping[str, Any], keep_models: bool = False) -> Experiment:
    """The experiment the option values describe (definitions.settings: name -> parsed value)."""
    from ..measurement.evaluate import EvalSettings

    settings = EvalSettings(
        ctx=values["fq_ctx"],
        batch=values["fq_batch"],
        chunks=values["fq_chunks"],
        kld_chunks=values["fq_kld_chunks"] or values["fq_chunks"],
        threads=values["fq_threads"],
        gen_tokens=values["fq_gen_tokens"],
        chat_template=values["fq_chat_template"],
    )
    shared = {
        "max_rel_error": values["fq_max_rel_error"],
        "agreement_min": values["fq_agreement_min"],
        "noise_factor_max": values["fq_noise_factor_max"],
        "speed_ratio_min": values["fq_speed_ratio_min"],
    }
    return Experiment(
        settings=settings,
        fmt=values["fq_format"],
        rounding=values["fq_rounding"],
        tensors=values["fq_tensors"],
        placebo_seeds=seeds(values["fq_placebo_seeds"]),
        thresholds=Thresholds(
            ppl_delta_max=values["fq_ppl_delta_max"],
            kld_mean_max=values["fq_kld_mean_max"],
            same_top_min=values["fq_same_top_min"],
            **shared,
        ),
        keep_models=keep_models,
        variants=TWIN_CHOICES[values["fq_twin"]],
        gate_variant=values["fq_gate_variant"],
        intrinsic_thresholds=Thresholds(
            ppl_delta_max=values["fq_twin_ppl_delta_max"],
            kld_mean_max=values["fq_twin_kld_mean_max"],
            same_top_min=values["fq_twin_same_top_min"],
            **shared,
        ),
        intrinsic_placebo_seeds=seeds(values["fq_twin_placebo_seeds"]),
        twin_dtype=values["fq_twin_dtype"],
    )


def check_tensors(exp: Experiment, index, model_name: str) -> None:
    """Refuse, before anything runs, tensors the deployed answer cannot fake-quantize (a kind
    the model holds only quantized): BadSelection naming the model and the setting. The
    intrinsic answer measures the float twin, where every tensor is F32."""
    from ..measurement.selection import resolve

    if "deployed" not in exp.variants:
        return
    try:
        resolve(index, "all", exp.tensors)
    except BadSelection as exc:
        raise BadSelection(f"fq_tensors on {model_name}: {exc}") from None


def check_resume(run_id: str, exp: Experiment, root: Path | None = None) -> None:
    """A run id that already holds records is resumed only with the settings that wrote
    them: otherwise a finished record of one format would answer for another (an int8
    session passing on a bf16 record) and a run would mix two experiments. BadInput if not."""
    for rec in results.iter_records(run_id, root):
        changes = exp.differences(rec)
        if changes:
            shown = ", ".join(changes[:3]) + (
                f" and {len(changes) - 3} more" if len(changes) > 3 else ""
            )
            raise BadInput(
                f"run {run_id} already holds {rec.stage}/{rec.case} made with other settings "
                f"({shown}): resume it with the same settings, or use a new run id"
            )


@dataclass(frozen=True)
class Context:
    """Where and with what a stage runs: the session's run id, tools and inputs."""

    run_id: str
    runner: LlamaRunner
    tools: LlamaTools
    corpus: Corpus
    results_root: Path | None = None
