"""The experiment's configuration: the four stages, the settings and thresholds of a run, and
where it runs. The protocol that every stage × model follows is fq_core.protocol; the
verdicts are fq_core.checks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from . import checks, results
from .record import Thresholds
from .selection import DEFAULT_TENSORS

if TYPE_CHECKING:  # the stage definitions import without llama.cpp's side of the library
    from .corpus import Corpus
    from .evaluate import EvalSettings
    from .llama.runner import LlamaRunner
    from .llama.tools import LlamaTools
    from .models import ModelRef

log = logging.getLogger(__name__)


def _eval_settings() -> EvalSettings:
    from .evaluate import EvalSettings  # imported late: the stage table needs no llama side

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


@dataclass(frozen=True)
class Experiment:
    """Everything a stage run depends on besides the model: settings, format, control, limits."""

    settings: EvalSettings = field(default_factory=_eval_settings)
    fmt: str = "bf16"
    rounding: str = "truncate"
    tensors: tuple[str, ...] = DEFAULT_TENSORS
    placebo_seeds: tuple[int, ...] = (1, 2, 3)
    thresholds: Thresholds = field(default_factory=Thresholds)
    keep_models: bool = False  # keep the fake-quantized GGUFs (large) after evaluation

    def settings_json(self) -> dict:
        s = self.settings
        return {
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
        }

    def gate_components(
        self, model: ModelRef, corpus: Corpus, tools: LlamaTools
    ) -> results.GateComponents:
        """The gate key. Threads are left out: llama.cpp is bit-identical across thread counts."""
        settings = {k: v for k, v in self.settings_json().items() if k != "threads"}
        return results.GateComponents(
            model_sha256=model.sha256,
            corpus_sha256=corpus.sha256,
            llama_version=tools.version,
            format=self.fmt,
            rounding=self.rounding,
            settings=settings,
            thresholds=msgspec.to_builtins(self.thresholds),
        )


@dataclass(frozen=True)
class Context:
    """Where and with what a stage runs: the session's run id, tools and inputs."""

    run_id: str
    runner: LlamaRunner
    tools: LlamaTools
    corpus: Corpus
    results_root: Path | None = None
