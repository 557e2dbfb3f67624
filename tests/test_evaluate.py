"""evaluate.py on real llama.cpp runs: baseline cache, KLD against a changed model, compare."""

from __future__ import annotations

import json
import math

import pytest

from fq_core.measurement.corpus import resolve_corpus
from fq_core.measurement.evaluate import (
    EvalSettings,
    Prompt,
    chunk_nlls,
    compare,
    evaluate_against,
    evaluate_baseline,
    paired_delta_pct_err,
)
from fq_core.measurement.llama import parse
from fq_core.measurement.llama.runner import LlamaRunner, run_logged
from fq_core.measurement.llama.tools import find_tools
from fq_core.measurement.models import resolve_model

# the tests using `env` run llama.cpp on SmolLM2 and are marked llama + models

# ctx 128: what these tests prove (the cache, the per-chunk arithmetic, agreement with the
# bare commands) holds at any context; the default prompts and `fq evaluate --ctx 128
# --chunks 2 --gen-tokens 8` give the CLI test the same key, so the module has one baseline.
CTX = 128
SETTINGS = EvalSettings(ctx=CTX, batch=CTX, chunks=2, kld_chunks=2, gen_tokens=8)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tools, model and corpus resolved first; then a private cache for the baselines."""
    tools, smol, corpus = find_tools(), resolve_model("smollm2-135m"), resolve_corpus()
    root = tmp_path_factory.mktemp("eval")
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(root / "xdg"))
    runner = LlamaRunner(tools, log_dir=root / "logs", timeout_s=900)
    yield runner, smol, corpus, root
    mp.undo()


@pytest.fixture(scope="module")
def changed_smol(env):
    """SmolLM2 with its ffn_norm weights rounded to fp8 (BF16 would change nothing here)."""
    from fq_core.measurement.models import ModelRef
    from fq_core.measurement.patch import fake_quantize_file

    _, smol, _, root = env
    dst = root / "smol-fp8.gguf"
    fake_quantize_file(smol.path, dst, fmt="fp8_e4m3")
    from fq_core.platform.hashing import sha256_file

    return ModelRef("smol-fp8", dst, sha256_file(dst), None)


def _n_commands(root) -> int:
    return len((root / "logs" / "commands.jsonl").read_text().splitlines())


@pytest.mark.llama
@pytest.mark.models
def test_baseline_is_computed_once_then_reused(env):
    runner, smol, corpus, root = env
    first = evaluate_baseline(runner, smol, corpus, SETTINGS)
    n = _n_commands(root)
    again = evaluate_baseline(runner, smol, corpus, SETTINGS)
    assert not first.cached and again.cached
    assert _n_commands(root) == n  # nothing ran the second time
    assert again.perplexity.ppl == first.perplexity.ppl
    assert again.perplexity.chunk_ppls == first.perplexity.chunk_ppls
    assert again.generations[0].text == first.generations[0].text
    assert again.generations[0].token_ids == first.generations[0].token_ids
    assert first.kld_base.stat().st_size == first.kld_base_bytes > 10_000_000
    assert first.kld_base.parent == first.cache_path
    doc = json.loads((first.cache_path / "baseline.json").read_text())["payload"]
    assert doc["model"]["sha256"] == smol.sha256 and doc["corpus"]["sha256"] == corpus.sha256
    assert again.provenance["measured_at"] == first.provenance["measured_at"]


@pytest.mark.llama
@pytest.mark.models
def test_other_settings_get_another_baseline_and_a_damaged_one_is_redone(env):
    runner, smol, corpus, root = env
    base = evaluate_baseline(runner, smol, corpus, SETTINGS)
    other = EvalSettings(
        ctx=CTX, batch=CTX, chunks=1, kld_chunks=1, gen_tokens=4, prompts=(Prompt("Hi"),)
    )
    small = evaluate_baseline(runner, smol, corpus, other)
    assert small.key != base.key
    size = base.kld_base.stat().st_size
    with open(base.kld_base, "r+b") as f:  # zeroed logits of the same size: never trusted
        f.write(bytes(size))
    redone = evaluate_baseline(runner, smol, corpus, SETTINGS)
    assert not redone.cached and redone.kld_base.stat().st_size == base.kld_base_bytes
    assert "logits.kld does not match its SHA-256" in redone.provenance["rejected"]
    assert redone.kld_base_sha256 == base.kld_base_sha256  # llama.cpp made the same logits
    assert redone.perplexity.ppl == base.perplexity.ppl
    meta = small.cache_path / "baseline.json"  # an edited PPL (ΔPPL +16 %): never served
    doc = json.loads(meta.read_text())
    doc["payload"]["kld_perplexity"]["ppl"] *= 1.16
    meta.write_text(json.dumps(doc))
    again = evaluate_baseline(runner, smol, corpus, other)
    assert not again.cached and "does not match its checksum" in again.provenance["rejected"]
    assert again.perplexity.ppl == small.perplexity.ppl
    aside = root / "xdg" / "fq-suite" / "rejected" / "baselines"
    assert sorted(p.name.split(".")[0] for p in aside.iterdir()) == sorted([base.key, small.key])


@pytest.mark.llama
@pytest.mark.models
def test_a_model_against_itself_is_identical(env):
    runner, smol, corpus, _ = env
    base = evaluate_baseline(runner, smol, corpus, SETTINGS)
    same = evaluate_against(runner, smol, base, corpus, SETTINGS)
    cmp = compare(base, same)
    assert cmp.delta_ppl == pytest.approx(0.0, abs=1e-3)
    assert abs(cmp.kld.mean) < 1e-5 and cmp.same_top_pct == 100.0
    assert cmp.agreement[0].first_divergence is None
    assert cmp.agreement[0].token_agreement == 1.0 and cmp.agreement[0].same_text


@pytest.mark.llama
@pytest.mark.models
def test_changed_model_matches_llama_perplexity_run_by_hand(env, changed_smol):
    """ΔPPL and KLD equal what the bare llama.cpp commands print for the same files."""
    runner, smol, corpus, root = env
    base = evaluate_baseline(runner, smol, corpus, SETTINGS)
    cand = evaluate_against(runner, changed_smol, base, corpus, SETTINGS)
    cmp = compare(base, cand)
    assert cmp.kld.mean > 0 and cmp.delta_ppl != 0

    bin_dir = runner.tools.bin_dir
    common = ["-f", corpus.path, "-c", str(CTX), "-b", str(CTX), "--chunks", "2", "-t", "2"]
    hand_base = run_logged(
        [
            bin_dir / "llama-perplexity",
            "-m",
            smol.path,
            *common,
            "--kl-divergence-base",
            root / "hand.kld",
        ],
        tool="by-hand",
        timeout_s=900,
        log_dir=root / "hand",
    )
    hand_kld = run_logged(
        [
            bin_dir / "llama-perplexity",
            "-m",
            changed_smol.path,
            *common,
            "--kl-divergence-base",
            root / "hand.kld",
            "--kl-divergence",
        ],
        tool="by-hand",
        timeout_s=900,
        log_dir=root / "hand",
    )
    ppl_base, _ = parse.parse_final_ppl(hand_base.stderr())
    block = parse.parse_kld_block(hand_kld.stdout())
    ppl_cand = block["Mean PPL(Q)"][0]
    assert cmp.baseline_ppl == ppl_base
    assert cmp.ppl == ppl_cand
    assert cmp.delta_ppl == pytest.approx(ppl_cand - ppl_base, abs=1e-12)
    assert cmp.kld.mean == block["Mean KLD"][0]
    assert cmp.same_top_pct == block["Same top p"][0]
    # the paired error is far tighter than the two runs' own ± errors combined
    assert cmp.delta_ppl_pct_err is not None
    assert cmp.delta_ppl_pct_err < 100 * math.hypot(cmp.ppl_err, cmp.baseline_ppl_err) / ppl_base


@pytest.mark.llama
@pytest.mark.models
def test_chunk_nlls_reconstruct_the_final_perplexity(env):
    runner, smol, corpus, _ = env
    base = evaluate_baseline(runner, smol, corpus, SETTINGS)
    nll = chunk_nlls(base.perplexity.chunk_ppls)
    assert math.exp(sum(nll) / len(nll)) == pytest.approx(base.perplexity.ppl, rel=1e-5)
    assert math.exp(nll[0]) == pytest.approx(base.perplexity.chunk_ppls[0], rel=1e-9)
    assert paired_delta_pct_err(base.perplexity.chunk_ppls, base.perplexity.chunk_ppls) == 0.0
    assert paired_delta_pct_err((10.0,), (11.0,)) is None


@pytest.mark.llama
@pytest.mark.models
def test_fq_evaluate_cli(env, changed_smol, capsys):
    from fq_core.cli import main

    runner, smol, corpus, root = env
    out_json = root / "eval.json"
    argv = ["evaluate", str(changed_smol.path), "--baseline", str(smol.path), "--chunks", "2"]
    argv += ["--ctx", str(CTX), "--gen-tokens", "8", "--json", str(out_json)]
    argv += ["--text", str(corpus.path)]
    # XDG_CACHE_HOME is private here: without the flag fq would (rightly) build llama.cpp again
    argv += ["--llama-bin-dir", str(runner.tools.bin_dir)]
    base = evaluate_baseline(runner, smol, corpus, SETTINGS)  # cached by the tests above, if run
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"baseline reused from the cache: {base.cache_path}" in out  # one key for both
    for label in ("load", f"PPL (2×{CTX})", "ΔPPL %", "KLD mean", "same top %", "agreement"):
        assert label in out
    doc = json.loads(out_json.read_text())
    assert doc["comparison"]["delta_ppl"] == doc["candidate"]["ppl"] - doc["baseline"]["ppl"]
    assert doc["commands"] and all(c["exit_status"] == 0 for c in doc["commands"])


def test_fq_evaluate_bad_input_is_one_line(capsys, tmp_path):
    from fq_core.cli import main

    assert main(["evaluate", str(tmp_path / "nope.gguf"), "--baseline", "gemma3-270m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fq evaluate: error:")
    assert main(["evaluate", "gemma3-270m", "--baseline", "gemma3-270m", "--chunks", "0"]) == 2


@pytest.mark.llama
@pytest.mark.models
def test_a_wrapper_printing_the_same_version_gets_its_own_baseline(env):
    """Attack (issue 18): FQ_LLAMA_BIN_DIR = a wrapper that prints the cached build's version
    but alters perplexity. Before: baselines were keyed by the version string, so one's PPL
    was served for the other. Now the key names the build by its files."""
    runner, smol, corpus, root = env
    real = evaluate_baseline(runner, smol, corpus, SETTINGS)  # cached by the test above, if run
    bin_dir = runner.tools.bin_dir
    wrapper = root / "wrapper"
    wrapper.mkdir()
    for tool in ("llama-completion", "llama-tokenize"):
        (wrapper / tool).symlink_to(bin_dir / tool)
    (wrapper / "llama-perplexity").write_text(
        f'#!/bin/sh\nexec {bin_dir / "llama-perplexity"} "$@" -c 256\n'
    )
    (wrapper / "llama-perplexity").chmod(0o755)
    wrapped = find_tools(wrapper)
    assert wrapped.version == runner.tools.version and wrapped.build_id != runner.tools.build_id
    other = evaluate_baseline(LlamaRunner(wrapped, log_dir=root / "logs"), smol, corpus, SETTINGS)
    assert not other.cached and other.key != real.key
    assert other.perplexity.command.argv[0] == str(wrapper / "llama-perplexity")
    assert other.perplexity.ppl != real.perplexity.ppl  # the wrapper's figure is its own
    again = evaluate_baseline(runner, smol, corpus, SETTINGS)
    assert again.cached and again.perplexity.ppl == real.perplexity.ppl


@pytest.mark.llama
@pytest.mark.models
def test_settings_with_their_own_threads_keep_the_runners_gpu_layers(env):
    """Issue 19: when the settings name a thread count the runner does not have, the
    evaluation used to rebuild the runner without its -ngl, so a sweep on a GPU build ran on
    the CPU under a GPU cache key. Every llama.cpp command keeps -ngl (0: a no-op on CPU)."""
    runner, smol, corpus, root = env
    gpu = LlamaRunner(runner.tools, threads=2, log_dir=root / "logs", gpu_layers=0)
    settings = EvalSettings(
        ctx=128, batch=128, chunks=1, kld_chunks=1, gen_tokens=2, threads=1, prompts=(Prompt("Hi"),)
    )
    log = root / "logs" / "commands.jsonl"
    n = _n_commands(root) if log.exists() else 0
    base = evaluate_baseline(gpu, smol, corpus, settings)
    assert not base.cached
    lines = log.read_text().splitlines()[n:]
    runs = [json.loads(line) for line in lines]
    argvs = [r["argv"] for r in runs if r["tool"] in ("llama-completion", "llama-perplexity")]
    assert {"llama-completion", "llama-perplexity"} <= {r["tool"] for r in runs}
    for argv in argvs:
        assert argv[argv.index("-t") + 1] == "1", argv
        assert argv[argv.index("-ngl") + 1] == "0", argv
