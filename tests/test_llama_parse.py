"""Parsers on output captured from real runs of the pinned llama.cpp (tests/data/llama_output).

The captures come from tests/data/llama_output/capture.sh (SmolLM2, WikiText-2 test, 2 chunks).

Every feature parsed here is also exercised end to end in test_llama_runner.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fq_core.measurement.llama import parse

DATA = Path(__file__).parent / "data" / "llama_output"


def read(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


def test_version_line_and_build_info():
    version, built = parse.parse_version(read("version.stderr"))
    assert version == "0.5.0-dev (build 1, commit 0c1e570)"
    assert built == "built with GNU 12.2.0 for Linux x86_64"


def test_final_estimate_and_running_chunk_ppls():
    assert parse.parse_final_ppl(read("perplexity_smollm2.stderr")) == (21.3795, 3.14369)
    assert parse.parse_chunk_ppls(read("perplexity_smollm2.stdout")) == (12.6138, 21.3795)
    n_chunks, n_ctx, start = parse.parse_calc(read("perplexity_smollm2.stderr"))
    assert (n_chunks, n_ctx) == (2, 512)
    assert start == pytest.approx(1.115060)  # "0.01.115.060": minutes.seconds.ms.µs


def test_missing_final_line_is_none_not_a_number():
    assert parse.parse_final_ppl(read("perplexity_smollm2.stdout")) is None
    assert parse.parse_final_ppl("") is None


def test_nan_chunks_are_kept_as_nan():
    vals = parse.parse_chunk_ppls("[1]nan,[2]nan,\n")
    assert len(vals) == 2 and all(math.isnan(v) for v in vals)


def test_completion_timings():
    t = parse.parse_timings(read("completion_smollm2.stderr"))
    assert t.load_time_ms == 250.50
    assert t.eval_runs == 16  # -n 16: one run per generated token
    assert t.eval_ms == 140.81
    assert t.tokens_per_s == 113.63
    assert t.n_generated == 16  # "samplers … / 17 tokens" minus "prompt eval … / 1 tokens"


def test_error_level_log_lines():
    text = "0.03.926.066 I system_info: n_threads = 2\n"
    text += "0.03.926.111 E kl_divergence: inconsistent vocabulary (49152 vs 262144)\n"
    assert parse.error_lines(text) == ["kl_divergence: inconsistent vocabulary (49152 vs 262144)"]
    assert parse.error_lines(read("kld_smollm2.stderr")) == []


def test_generation_text_drops_only_the_trailing_newline_llama_adds():
    raw = read("completion_smollm2.stdout")
    text = parse.generation_text(raw)
    assert raw == text + "\n"
    assert text.startswith('-by-date" to "date"')


def test_kld_statistics_block():
    block = parse.parse_kld_block(read("kld_smollm2.stdout"))
    assert block["Mean PPL(Q)"] == (21.379524, 3.143691)
    assert block["Mean KLD"] == (0.0, 0.0)
    assert block["Maximum KLD"] == (0.000049, None)
    assert block["99.0% KLD"] == (0.000028, None)
    assert block["5.0% KLD"] == (-0.000017, None)
    assert block["Same top p"] == (100.0, 0.0)
    assert block["RMS Δp"] == (0.0, 0.0)
    assert block["Mean PPL(Q)/PPL(base)"] == (1.005064, 0.005073)
    assert parse.parse_kld_chunk_ppls(read("kld_smollm2.stdout")) == (12.6138, 21.3795)


def test_kld_block_absent_is_none():
    assert parse.parse_kld_block(read("perplexity_smollm2.stdout")) is None


def test_token_ids_and_count():
    assert parse.parse_token_ids("[19556, 905]\n") == (19556, 905)
    assert parse.parse_token_ids("[]\n") == ()
    assert parse.parse_token_count("[1, 2]\nTotal number of tokens: 304830\n") == 304830
    assert parse.parse_token_count("nothing") is None


def test_each_chunks_own_kld_from_the_running_means():
    """The table prints running means r_i; chunk i's own mean is i·r_i − (i−1)·r_(i−1)."""
    assert parse.parse_kld_chunk_klds(read("kld_smollm2.stdout")) == pytest.approx((0.0, 0.0))
    table = (
        "chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence"
        "              Δp RMS            Same top p\n"
        "   1      12.9610 ±    2.5331       0.02852 ±    0.02383       0.05140 ±    0.00686"
        "     5.259 ±  0.718 %    91.373 ±  1.762 %\n"
        "   2      21.9156 ±    3.2421       0.03174 ±    0.01737       0.04940 ±    0.00386"
        "     5.249 ±  0.534 %    89.608 ±  1.353 %\n"
        "   3      20.0000 ±    3.0000       0.03000 ±    0.01500       0.05000 ±    0.00300"
        "     5.000 ±  0.500 %    90.000 ±  1.000 %\n"
        "\n====== Perplexity statistics ======\nMean PPL(Q)  :  21.915582 ±   3.242097\n"
    )
    got = parse.parse_kld_chunk_klds(table)
    assert got == pytest.approx((0.0514, 0.0474, 0.0512))
    assert sum(got) / 3 == pytest.approx(0.05)  # the chunks average back to the last mean
    assert parse.parse_kld_chunk_klds("no table here") == ()


def test_an_operation_ggml_cannot_run_is_named():
    """ggml's abort on a type it has no kernel for (SmolLM2 with ffn_norm stored as BF16):
    the line that says so, without the source path before it; other output has none."""
    err = read("unsupported_bf16_norm.stderr")
    want = "binary_op: unsupported types: dst: f32, src0: f32, src1: bf16"
    assert parse.unsupported_op(err) == want
    for name in ("perplexity_smollm2.stderr", "kld_smollm2.stderr", "completion_smollm2.stderr"):
        assert parse.unsupported_op(read(name)) is None, name


def test_llama_quantize_plan_names_each_tensors_type():
    """`llama-quantize --dry-run` of SmolLM2's twin as Q4_K_M: every tensor with the type it
    would get (the k-quant fallback for 576-wide rows included), norms kept as F32."""
    plan = parse.parse_quantize_plan(read("quantize_dry_run.stderr"))
    assert len(plan) == 272
    assert plan["token_embd.weight"] == "q8_0" and plan["blk.0.ffn_norm.weight"] == "f32"
    assert plan["blk.10.ffn_down.weight"] == "q4_k"
    assert plan["blk.0.attn_output.weight"] == "q5_0"  # 576 is not a multiple of 256
    assert parse.parse_quantize_plan(read("kld_smollm2.stderr")) == {}
