"""The runner against real llama.cpp runs on the real models, failure paths included."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from fq_core.errors import LlamaFailed, NotDeployable
from fq_core.measurement.llama.runner import LlamaRunner, run_logged
from fq_core.measurement.llama.tools import find_tools
from fq_core.measurement.models import resolve_model


@pytest.fixture(scope="session")
def tools():
    return find_tools()


@pytest.fixture(scope="session")
def smol():
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma():
    return resolve_model("gemma3-270m")


@pytest.fixture(scope="session")
def corpus():
    from fq_core.measurement.corpus import resolve_corpus

    return resolve_corpus()


@pytest.fixture
def runner(tools, tmp_path):
    return LlamaRunner(tools, log_dir=tmp_path / "logs", timeout_s=600)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _procs_mentioning(text: str) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(d.name))
            except OSError:
                pass
    return [p for p in found if _alive(p) and p != os.getpid()]


# -- run_logged ---------------------------------------------------------------------------------


def test_run_logged_records_one_json_line_and_output_files(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_ARG_THREADS", "7")
    monkeypatch.setenv("LLAMA_ARG_LOG_JSONL", "1")
    rec = run_logged(
        ["sh", "-c", "env; echo err >&2; exit 3"],
        tool="sh",
        timeout_s=30,
        env_overrides={"FQ_PROBE": "yes"},
        log_dir=tmp_path,
    )
    assert rec.exit_status == 3 and not rec.ok and not rec.timed_out
    env_seen = rec.stdout()
    assert "FQ_PROBE=yes" in env_seen
    assert "LLAMA_ARG_" not in env_seen
    assert rec.stderr() == "err\n"
    assert rec.cleared_env == ("LLAMA_ARG_LOG_JSONL", "LLAMA_ARG_THREADS")
    lines = (tmp_path / "commands.jsonl").read_text().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["argv"][0] == "sh" and doc["exit_status"] == 3 and doc["tool"] == "sh"
    assert doc["env"] == {"FQ_PROBE": "yes"}
    assert doc["timed_out"] is False and doc["duration_s"] >= 0
    assert Path(doc["stdout_path"]).read_text() == env_seen
    assert doc["cwd"] == os.getcwd() and doc["started_at"].endswith("Z")


def test_run_logged_names_are_unique_per_call(tmp_path):
    recs = [run_logged(["true"], tool="t", timeout_s=10, log_dir=tmp_path) for _ in range(5)]
    assert len({r.stdout_path for r in recs}) == 5
    assert len((tmp_path / "commands.jsonl").read_text().splitlines()) == 5


def test_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    rec = run_logged(
        ["sh", "-c", f"sleep 300 & echo $! > {pidfile}; sleep 300"],
        tool="sh",
        timeout_s=1.0,
        log_dir=tmp_path,
    )
    assert rec.timed_out and rec.exit_status is None and not rec.ok
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)
    assert json.loads((tmp_path / "commands.jsonl").read_text())["timed_out"] is True


def test_interrupt_kills_the_child_and_is_logged(tmp_path):
    """Ctrl-C (or pytest-timeout's exception) raised while waiting ends the child too."""
    pidfile = tmp_path / "child.pid"

    def interrupt(_line: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_logged(
            ["sh", "-c", f"echo $$ > {pidfile}; echo tick; sleep 300"],
            tool="sh",
            timeout_s=60,
            log_dir=tmp_path,
            heartbeat=interrupt,
            heartbeat_s=0.3,
        )
    assert not _alive(int(pidfile.read_text()))
    doc = json.loads((tmp_path / "commands.jsonl").read_text())
    assert doc["exit_status"] is None


def test_unstartable_command_is_recorded_not_raised(tmp_path):
    rec = run_logged([str(tmp_path / "nope")], tool="nope", timeout_s=5, log_dir=tmp_path)
    assert rec.exit_status == 127 and "cannot start" in rec.stderr()


# -- real llama.cpp runs -------------------------------------------------------------------------


@pytest.mark.llama
@pytest.mark.models
def test_load_reports_load_time(runner, smol):
    res = runner.load(smol)
    assert res.ok and res.load_time_ms > 0
    assert "--check-tensors" in res.command.argv


@pytest.mark.llama
@pytest.mark.models
def test_generate_greedy_is_deterministic_and_exact_length(runner, smol, monkeypatch):
    # LLAMA_ARG_LOG_JSONL would turn stdout into JSON logs: the runner must clear it.
    monkeypatch.setenv("LLAMA_ARG_LOG_JSONL", "1")
    a = runner.generate(smol, "Hello", 12, ignore_eos=True)
    b = runner.generate(smol, "Hello", 12, ignore_eos=True)
    assert a.text == b.text and a.text.strip()
    assert not a.text.lstrip().startswith("{")
    assert a.n_tokens == 12 and a.tokens_per_s > 0
    assert a.tool == "llama-completion" and a.token_ids
    assert "LLAMA_ARG_LOG_JSONL" in a.command.cleared_env
    log = [json.loads(x) for x in (runner.log_dir / "commands.jsonl").read_text().splitlines()]
    assert sum(1 for d in log if d["tool"] == "llama-completion") == 2
    assert all(d["exit_status"] == 0 for d in log)


@pytest.mark.llama
@pytest.mark.models
def test_chat_applies_the_registry_template_and_does_not_wait(runner, gemma):
    g = runner.generate(gemma, "你好，請介紹一下自己。", 8, chat=True)
    plain = runner.generate(gemma, "Hello", 8, ignore_eos=True)
    assert plain.n_tokens == 8  # Gemma's prompt is 2 tokens (BOS + Hello): still exactly 8
    assert g.chat and "-st" in g.command.argv
    assert g.command.argv[g.command.argv.index("--chat-template") + 1] == "gemma"
    assert 1 <= g.n_tokens <= 8
    assert g.command.duration_s < 300  # it did not sit on stdin until the timeout


@pytest.mark.llama
@pytest.mark.models
def test_perplexity_two_chunks_and_reproducible(runner, smol, corpus):
    """ctx 128: chunking, the parse and batch-size reproducibility do not depend on the size."""
    a = runner.perplexity(smol, corpus, ctx=128, batch=128, chunks=2)
    b = runner.perplexity(smol, corpus, ctx=128, batch=64, chunks=2)
    assert a.n_chunks == 2 and a.ctx == 128 and len(a.chunk_ppls) == 2
    assert a.chunk_ppls[-1] == pytest.approx(a.ppl, abs=1e-4)
    assert math.isfinite(a.ppl) and a.ppl > 1 and a.ppl_err > 0
    assert a.tokens_per_s > 0
    assert (a.ppl, a.chunk_ppls) == (b.ppl, b.chunk_ppls)  # bit-reproducible across batch sizes


@pytest.mark.llama
@pytest.mark.models
def test_kld_base_then_against_itself(runner, smol, corpus, tmp_path):
    base = tmp_path / "smol.kld"
    p = runner.perplexity(smol, corpus, ctx=128, batch=128, chunks=2, kl_base=base)
    assert base.stat().st_size > 10_000_000  # 12.4 MB: 2 chunks × 63 tokens × 49k vocab × 2 B
    k = runner.perplexity(smol, corpus, ctx=128, batch=128, chunks=2, kl_against=base)
    assert k.kld is not None and p.kld is None
    assert k.ppl == pytest.approx(p.ppl, abs=1e-4)  # Mean PPL(Q) is the model's own PPL
    assert abs(k.kld.mean) < 1e-5 and k.kld.same_top_pct == 100.0
    assert k.kld.max < 1e-3 and k.kld.p99 is not None


@pytest.mark.llama
@pytest.mark.models
def test_kld_vocabulary_mismatch_fails(runner, smol, gemma, corpus, tmp_path):
    base = tmp_path / "smol.kld"
    runner.perplexity(smol, corpus, ctx=128, batch=128, chunks=1, kl_base=base)
    # llama.cpp logs "inconsistent vocabulary", computes garbage and exits 0: must be an error.
    with pytest.raises(LlamaFailed, match="inconsistent vocabulary"):
        runner.perplexity(gemma, corpus, ctx=128, batch=128, chunks=1, kl_against=base)


@pytest.mark.llama
@pytest.mark.models
def test_token_count(runner, smol, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Hello world")
    assert runner.count_tokens(smol, text) == 2
    assert runner.tokenize(smol, "Hello world") == (19556, 905)


# -- failure paths -------------------------------------------------------------------------------


@pytest.mark.llama
def test_missing_model_file(runner, tmp_path, corpus):
    with pytest.raises(LlamaFailed, match=r"llama-completion could not load the model.*absent"):
        runner.load(tmp_path / "absent.gguf")
    with pytest.raises(LlamaFailed, match="llama-perplexity"):
        runner.perplexity(tmp_path / "absent.gguf", corpus, chunks=1)


@pytest.mark.llama
@pytest.mark.models
def test_a_real_file_llama_cpp_cannot_run_is_not_deployable(runner, smol, corpus, tmp_path):
    """ffn_norm stored as BF16: the CPU backend has no kernel for it and aborts; the runner
    says so in llama.cpp's words (NotDeployable), not as a crash of the run; the same file's
    twin (norms back as F32) runs."""
    from fq_core.measurement import twin

    names = [f"blk.{i}.ffn_norm.weight" for i in range(2)]
    real = tmp_path / "bf16-norms.gguf"
    twin.make_real(smol.path, real, dict.fromkeys(names, "bf16"), lib_dir=runner.tools.lib_dir)
    with pytest.raises(NotDeployable) as caught:
        runner.perplexity(real, corpus, chunks=1)
    assert str(caught.value) == (
        "not deployable in this llama.cpp: binary_op: unsupported types: dst: f32, src0: f32, "
        "src1: bf16"
    )
    back = tmp_path / "twin.gguf"
    twin.make_twin(real, back, fsync=False)
    assert runner.perplexity(back, corpus, chunks=1).n_chunks == 1


@pytest.mark.llama
def test_text_file_as_model(runner, tmp_path):
    fake = tmp_path / "notes.gguf"
    fake.write_text("this is not a model\n")
    res = runner.load(fake, check=False)
    assert not res.ok and "notes.gguf" in res.error
    with pytest.raises(LlamaFailed, match="could not load"):
        runner.load(fake)


@pytest.mark.llama
@pytest.mark.models
def test_truncated_gguf(runner, smol, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smol.path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(smol.path.stat().st_size // 2))
    with pytest.raises(LlamaFailed, match="could not load"):
        runner.load(cut)
    with pytest.raises(LlamaFailed):
        runner.generate(cut, "Hello", 4)


@pytest.fixture(scope="module")
def smol_nan(tmp_path_factory):
    """SmolLM2 with one element of blk.0.ffn_norm.weight set to NaN."""
    import gguf

    src = resolve_model("smollm2-135m").path
    dst = tmp_path_factory.mktemp("nan") / "smol-nan.gguf"
    shutil.copyfile(src, dst)
    info = next(t for t in gguf.GGUFReader(src).tensors if t.name == "blk.0.ffn_norm.weight")
    assert info.tensor_type == gguf.GGMLQuantizationType.F32
    with open(dst, "r+b") as f:
        f.seek(int(info.data_offset) + 4 * 3)
        f.write(np.array([np.nan], dtype="<f4").tobytes())
    return dst


@pytest.mark.llama
@pytest.mark.models
def test_nan_norm_fails_load_and_perplexity(runner, smol_nan, corpus):
    res = runner.load(smol_nan, check=False)
    assert not res.ok and res.command.exit_status != 0  # --check-tensors refuses it
    with pytest.raises(LlamaFailed, match="non-finite|NaN"):
        runner.perplexity(smol_nan, corpus, chunks=1)


@pytest.mark.llama
@pytest.mark.models
def test_corpus_shorter_than_one_context(runner, smol, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A few words only.\n")
    with pytest.raises(LlamaFailed, match="no 'Final estimate'"):
        runner.perplexity(smol, short, chunks=2)


@pytest.mark.llama
@pytest.mark.models
def test_failed_kl_base_run_leaves_no_logits(runner, smol, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A few words only.\n")
    base = tmp_path / "x.kld"
    with pytest.raises(LlamaFailed):
        runner.perplexity(smol, short, chunks=1, kl_base=base)
    assert not base.exists()


@pytest.mark.llama
@pytest.mark.models
def test_llama_timeout_kills_llama_perplexity(tools, smol, corpus, tmp_path):
    """A real llama-perplexity run cut by the timeout: an error, and no process left behind."""
    text = tmp_path / "unique-corpus-for-timeout.txt"
    shutil.copyfile(corpus.path, text)
    r = LlamaRunner(tools, log_dir=tmp_path / "logs", timeout_s=1.5)
    with pytest.raises(LlamaFailed, match="timed out"):
        r.perplexity(smol, text, chunks=50)
    assert _procs_mentioning(str(text)) == []
    doc = json.loads((tmp_path / "logs" / "commands.jsonl").read_text().splitlines()[-1])
    assert doc["timed_out"] is True and doc["exit_status"] is None


def test_another_thread_count_keeps_everything_else(tmp_path):
    """What evaluate uses when the settings name their own threads: -ngl, the log directory
    and the timeout stay (issue 19: a rebuilt runner dropped -ngl)."""
    tools = object()
    runner = LlamaRunner(tools, threads=4, log_dir=tmp_path, timeout_s=12.0, gpu_layers=99)
    other = runner.with_threads(1)
    assert (other.threads, runner.threads) == (1, 4)
    assert other.tools is tools and other.log_dir == tmp_path and other.timeout_s == 12.0
    assert other.gpu_layers == 99 and other._ngl() == ["-ngl", "99"]
