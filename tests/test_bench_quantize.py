"""Speed and memory of fake quantization, side by side with the baselines (figures, no asserts
on wall-clock time): copy-and-patch vs shutil.copyfile; `fq quantize` end to end vs `cp` and
vs a GGUFReader + GGUFWriter rewrite; peak RSS of `fq quantize` on SmolLM2 and Gemma3.

Ratios go to `extra_info` of the later benchmark of each group (the tests run in file order).
Run: pytest tests/test_bench_quantize.py --benchmark-only --benchmark-json=bench.json
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from fq_core.definitions.formats import fake_quantize
from fq_core.measurement.gguf_index import read_index
from fq_core.measurement.patch import copy_and_patch, plan_changes, read_manifest
from fq_core.measurement.selection import resolve

FQ = str(Path(sys.executable).with_name("fq"))
_MIN: dict[str, float] = {}

pytestmark = pytest.mark.models  # Gemma3 (and SmolLM2, via getfixturevalue)


def _min(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.min


def _ratio(a: str, b: str) -> float | None:
    """None when either side was not measured (e.g. --benchmark-disable records no stats)."""
    if not _MIN.get(a) or not _MIN.get(b):
        return None
    return round(_MIN[a] / _MIN[b], 3)


@pytest.fixture(scope="module")
def gemma_patches(gemma3_gguf):
    idx = read_index(gemma3_gguf)
    patches, _, _ = plan_changes(idx, resolve(idx), "bf16", "truncate", 0)
    return idx, patches


@pytest.mark.benchmark(group="copy-and-patch gemma3")
def test_bench_shutil_copyfile(benchmark, gemma3_gguf, tmp_path):
    dst = tmp_path / "copy.gguf"
    benchmark.pedantic(shutil.copyfile, args=(gemma3_gguf, dst), rounds=7, warmup_rounds=1)
    assert dst.stat().st_size == gemma3_gguf.stat().st_size
    _MIN["copyfile"] = _min(benchmark) or 0.0


@pytest.mark.benchmark(group="copy-and-patch gemma3")
@pytest.mark.parametrize("fsync", [False, True], ids=["no-fsync", "fsync"])
def test_bench_copy_and_patch(benchmark, gemma3_gguf, gemma_patches, tmp_path, fsync):
    idx, patches = gemma_patches
    dst = tmp_path / "patched.gguf"
    benchmark.pedantic(
        copy_and_patch,
        args=(gemma3_gguf, dst, patches),
        kwargs={"header_end": idx.data_start, "fsync": fsync},
        rounds=7,
        warmup_rounds=1,
    )
    got = np.fromfile(dst, dtype=np.float32, count=640, offset=patches[0].offset)
    assert got.tobytes() == patches[0].data
    key = f"copy_and_patch_{'fsync' if fsync else 'nofsync'}"
    _MIN[key] = _min(benchmark) or 0.0
    benchmark.extra_info.update(n_patches=len(patches), ratio_to_copyfile=_ratio(key, "copyfile"))


@pytest.mark.benchmark(group="quantize end to end gemma3")
def test_bench_cp(benchmark, gemma3_gguf, tmp_path):
    dst = tmp_path / "cp.gguf"
    benchmark.pedantic(
        subprocess.run,
        args=(["cp", str(gemma3_gguf), str(dst)],),
        kwargs={"check": True},
        rounds=5,
        warmup_rounds=1,
    )
    _MIN["cp"] = _min(benchmark) or 0.0


def _rewrite(src: Path, dst: Path) -> None:
    """The plan's approach: GGUFReader + GGUFWriter, norms truncated to BF16 on the way."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    datas = []
    for t in reader.tensors:
        data = t.data
        if t.name.endswith("ffn_norm.weight"):
            data = fake_quantize(np.asarray(data, dtype=np.float32), "bf16", "truncate")
        datas.append(data)
        writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in datas:
        writer.write_tensor_data(data)
    writer.close()


@pytest.mark.benchmark(group="quantize end to end gemma3")
def test_bench_fq_quantize(benchmark, gemma3_gguf, tmp_path):
    dst = tmp_path / "fq.gguf"
    argv = [FQ, "quantize", str(gemma3_gguf), str(dst), "--force"]
    subprocess.run(argv, check=True, capture_output=True)  # warm the input hash cache
    benchmark.pedantic(
        subprocess.run, args=(argv,), kwargs={"check": True, "capture_output": True}, rounds=5
    )
    assert read_manifest(dst)["total_changed"] == 2990
    _MIN["fq_quantize"] = _min(benchmark) or 0.0
    benchmark.extra_info["ratio_to_cp"] = _ratio("fq_quantize", "cp")


@pytest.mark.benchmark(group="quantize end to end gemma3")
def test_bench_reader_writer_rewrite(benchmark, gemma3_gguf, tmp_path):
    """One round: ~13 s and >1 GB on Gemma3."""
    dst = tmp_path / "rewrite.gguf"
    benchmark.pedantic(_rewrite, args=(gemma3_gguf, dst), rounds=1, iterations=1)
    a, b = read_index(gemma3_gguf), read_index(dst)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    _MIN["rewrite"] = _min(benchmark) or 0.0
    benchmark.extra_info["fq_quantize_speedup"] = _ratio("rewrite", "fq_quantize")
    benchmark.extra_info["fq_quantize_ratio_to_cp"] = _ratio("fq_quantize", "cp")


_PEAK = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
    "capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


@pytest.mark.benchmark(group="fq quantize peak memory")
@pytest.mark.parametrize("name", ["smollm2_gguf", "gemma3_gguf"])
def test_bench_quantize_peak_rss(benchmark, request, tmp_path, name):
    src = request.getfixturevalue(name)
    dst = tmp_path / "o.gguf"
    peaks: list[int] = []

    def once():
        out = subprocess.run(
            [sys.executable, "-c", _PEAK, FQ, "quantize", str(src), str(dst), "--force"],
            check=True,
            capture_output=True,
            text=True,
        )
        peaks.append(int(out.stdout.strip()))

    benchmark.pedantic(once, rounds=3)
    benchmark.extra_info.update(
        file=src.name,
        file_mb=round(os.path.getsize(src) / 2**20, 1),
        peak_rss_mb=round(max(peaks) / 1024, 1),
    )
    assert read_manifest(dst)["input"]["size"] == os.path.getsize(src)
