"""Speed and memory of `fq twin` on Gemma3 (figures in extra_info, no asserts on wall-clock
time): the f32 and f16 twins end to end as a user runs them (a cold make: written to a
fresh OUT, as `fq twin gemma3-270m` does the first time), beside `cp` of the source; and peak
RSS, which stays flat however large a tensor (token_embd: 262144 x 640, 671 MB as F32).

Run: pytest tests/test_bench_twin.py --benchmark-only --benchmark-json=bench.json
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fq_core.measurement.twin import read_manifest

FQ = str(Path(sys.executable).with_name("fq"))
_MIN: dict[str, float] = {}

pytestmark = pytest.mark.models  # Gemma3

_PEAK = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
    "capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def _min(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.min


@pytest.mark.benchmark(group="fq twin gemma3")
def test_bench_cp_source(benchmark, gemma3_gguf, tmp_path):
    dst = tmp_path / "cp.gguf"
    benchmark.pedantic(
        subprocess.run,
        args=(["cp", str(gemma3_gguf), str(dst)],),
        kwargs={"check": True},
        rounds=3,
        warmup_rounds=1,
    )
    _MIN["cp"] = _min(benchmark) or 0.0


@pytest.mark.benchmark(group="fq twin gemma3")
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_bench_fq_twin(benchmark, gemma3_gguf, tmp_path, dtype):
    dst = tmp_path / f"twin.{dtype}.gguf"
    peaks: list[int] = []

    def once():
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                _PEAK,
                FQ,
                "twin",
                str(gemma3_gguf),
                str(dst),
                "--dtype",
                dtype,
                "--force",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        peaks.append(int(out.stdout.strip()))

    benchmark.pedantic(once, rounds=3)
    manifest = read_manifest(dst)
    assert manifest.n_converted == 127 and manifest.source.size == os.path.getsize(gemma3_gguf)
    best = _min(benchmark)
    benchmark.extra_info.update(
        dtype=dtype,
        twin_mb=round(manifest.output.size / 2**20, 1),
        source_mb=round(manifest.source.size / 2**20, 1),
        peak_rss_mb=round(max(peaks) / 1024, 1),
        seconds_in_manifest=round(manifest.seconds, 2),
        ratio_to_cp=round(best / _MIN["cp"], 2) if best and _MIN.get("cp") else None,
    )
    # flat: far below the largest tensor as F32 (671 MB) and the twin itself
    assert max(peaks) / 1024 < 256
