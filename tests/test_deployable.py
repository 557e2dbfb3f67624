"""Whether the real file of a treatment runs in llama.cpp (fq_core.experiment.deployable)."""

from __future__ import annotations

import pytest

from fq_core.experiment import stages
from fq_core.experiment.deployable import deployability
from fq_core.measurement.corpus import resolve_corpus
from fq_core.measurement.llama.runner import LlamaRunner
from fq_core.measurement.llama.tools import find_tools
from fq_core.measurement.models import resolve_model

pytestmark = [pytest.mark.llama, pytest.mark.models]


@pytest.fixture
def smol():
    return resolve_model("smollm2-135m")  # resolved before ctx moves the cache


@pytest.fixture
def ctx(smol, tmp_path, monkeypatch):
    tools, corpus = find_tools(), resolve_corpus()  # from the real cache, then a fresh one
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # for the probes alone
    runner = LlamaRunner(tools, threads=2, log_dir=tmp_path / "logs")
    return stages.Context("R-deploy", runner, tools, corpus, tmp_path / "results")


def test_norms_as_bf16_are_not_deployable_and_said_once(ctx, smol, monkeypatch):
    """SmolLM2's first two ffn_norm stored as BF16: llama.cpp's words, once (the second ask
    reads the cache, no llama.cpp run); as F16 neither runs; q8_0 weight rows run; fp8 is no
    type llama.cpp stores."""
    model = smol
    norms = [f"blk.{i}.ffn_norm.weight" for i in range(2)]
    d, entry = deployability(model, norms, "bf16", ctx)
    assert not entry.hit and d.stored and d.runs is False
    assert d.sentence == (
        "stored as bf16 (the real file): not deployable in this llama.cpp: binary_op: "
        "unsupported types: dst: f32, src0: f32, src1: bf16"
    )
    assert not list(entry.folder.glob("*.gguf")), "the real file outlives its run"

    def no_llama(*a, **k):
        raise AssertionError("llama.cpp ran again")

    with monkeypatch.context() as m:
        m.setattr(ctx.runner, "perplexity", no_llama)
        again, entry2 = deployability(model, norms, "bf16", ctx)
    assert entry2.hit and again == d
    weights, _ = deployability(model, ["blk.0.ffn_down.weight"], "q8_0", ctx)
    assert weights.runs is True and weights.ppl > 1
    assert weights.sentence.startswith("stored as q8_0 (the real file), llama.cpp runs it")
    fp8, none = deployability(model, norms, "fp8_e4m3", ctx)
    assert none is None and not fp8.stored and "no type llama.cpp stores" in fp8.sentence
