"""Indexing speed: the lean header walk against gguf-py's GGUFReader on the real models.

Figures go to pytest-benchmark (`--benchmark-json`), with the speedup in `extra_info`;
nothing here asserts a wall-clock time.
"""

from __future__ import annotations

import gguf

from fq_core.measurement.gguf_index import read_index

_INDEX_SECONDS: dict[str, float] = {}


def _seconds(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.min


def test_bench_read_index(benchmark, real_gguf):
    index = benchmark(read_index, real_gguf)
    assert len(index.tensors) > 0 and index.block_count
    benchmark.extra_info.update(
        file=real_gguf.name,
        file_bytes=index.file_size,
        n_tensors=len(index.tensors),
        metadata_keys=len(index.metadata),
    )
    seconds = _seconds(benchmark)
    if seconds is not None:
        _INDEX_SECONDS[real_gguf.name] = seconds


def test_bench_gguf_reader(benchmark, real_gguf):
    """One round: GGUFReader materialises every vocabulary entry, ~10 s on Gemma3."""
    reader = benchmark.pedantic(gguf.GGUFReader, args=(real_gguf,), rounds=1, iterations=1)
    index = read_index(real_gguf)
    assert [t.name for t in reader.tensors] == [t.name for t in index.tensors]
    benchmark.extra_info["file"] = real_gguf.name
    reader_s, index_s = _seconds(benchmark), _INDEX_SECONDS.get(real_gguf.name)
    if reader_s is not None and index_s:
        benchmark.extra_info["read_index_min_s"] = index_s
        benchmark.extra_info["speedup_vs_read_index"] = round(reader_s / index_s, 1)
