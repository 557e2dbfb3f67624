"""`fq_tensors`: which tensors the stages fake-quantize; part of the identity; a kind the
model holds only quantized is one line at collection, in the stages and in the sweep."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gguf_factory import build_gguf

from fq_core.definitions.settings import defaults
from fq_core.experiment.stages import experiment_from

ROOT = Path(__file__).resolve().parents[1]


def _collect(tmp: Path, test_file: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FQ_RESULTS_DIR=str(tmp / "results"), FQ_LOG_DIR=str(tmp / "logs"))
    env.pop("PYTEST_XDIST_WORKER", None)
    argv = [sys.executable, "-m", "pytest", test_file, "--collect-only", "-q"]
    argv += ["-p", "no:cacheprovider", "-p", "no:randomly", f"--html={tmp / 'r.html'}", *args]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_stages_tensors_are_the_setting_and_in_the_identity():
    values = defaults()
    assert experiment_from(values).tensors == ("ffn_norm",)
    attn = experiment_from(dict(values, fq_tensors=("attn_norm", "ffn_norm")))
    assert attn.tensors == ("attn_norm", "ffn_norm")
    rec_settings = attn.settings_json()
    assert rec_settings["tensors"] == ["attn_norm", "ffn_norm"]
    assert experiment_from(values).settings_json()["tensors"] == ["ffn_norm"]


def test_a_kind_held_only_quantized_is_one_line_in_the_stages(tmp_path):
    model = build_gguf(tmp_path / "m", "tiny.gguf", n_layers=3)  # ffn_up is Q8_0
    stages = "experiments/test_stages.py"
    bad = _collect(tmp_path, stages, f"--fq-model={model.path}", "--fq-tensors", "ffn_up")
    out = bad.stdout + bad.stderr
    assert bad.returncode == 4, out
    assert "ERROR: fq_tensors on tiny: blk.0.ffn_up.weight is Q8_0, not F32" in bad.stderr, out
    assert "Traceback" not in out and "ERROR collecting" not in out, out
    ok = _collect(tmp_path, stages, f"--fq-model={model.path}", "--fq-tensors", "attn_norm")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # the float twin holds every tensor as F32: the intrinsic answer alone may treat ffn_up
    twin = _collect(
        tmp_path,
        stages,
        f"--fq-model={model.path}",
        "--fq-tensors",
        "ffn_up",
        "--fq-twin",
        "intrinsic",
    )
    assert twin.returncode == 0, twin.stdout + twin.stderr


def test_a_kind_held_only_quantized_is_one_line_in_the_sweep(tmp_path):
    model = build_gguf(tmp_path / "m", "tiny.gguf", n_layers=3)

    def sweep(kinds: str, *extra: str):
        axes = ("--fq-sweep-plan", "full", "--fq-sweep-models", str(model.path))
        axes += ("--fq-sweep-kinds", kinds, *extra)
        return _collect(tmp_path, "experiments/test_sensitivity.py", *axes)

    proc = sweep("ffn_norm ffn_up", "--fq-sweep-variants", "deployed")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4, out
    want = "tiny has no F32 tensor of kind ffn_up to fake-quantize as bf16 (the intrinsic answer"
    assert want in proc.stderr, out
    assert "Traceback" not in out and "ERROR collecting" not in out, out
    # the float twin holds every weight as F32: the intrinsic answer sweeps ffn_up; a llama.cpp
    # type stores it in the deployed file itself
    twin = sweep("ffn_up", "--fq-sweep-formats", "q8_0", "--fq-sweep-variants", "both")
    assert twin.returncode == 0, twin.stdout + twin.stderr
    assert "deployed" in twin.stdout and "intrinsic" in twin.stdout, twin.stdout
    assert "tiny-ffn_up-blk00-q8_0-intrinsic" in twin.stdout, twin.stdout
