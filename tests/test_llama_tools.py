"""Finding llama.cpp: flag, environment, PATH, cache; and what never counts as a good build."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fq_core.errors import ToolMissing
from fq_core.llama import tools as T


@pytest.fixture(scope="module")
def real_bin() -> Path:
    return T.find_tools().bin_dir


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("FQ_LLAMA_BIN_DIR", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    return tmp_path / "xdg" / "fq-suite"


@pytest.mark.llama
def test_flag_wins_and_reports_the_version(real_bin, empty_cache, monkeypatch):
    monkeypatch.setenv("FQ_LLAMA_BIN_DIR", "/nonexistent")
    t = T.find_tools(real_bin)
    assert t.source == "flag" and t.bin_dir == real_bin.resolve()
    assert t.version.startswith("0.5.0") and "commit" in t.version
    assert t.build_info.startswith("built with")
    assert t.path("llama-perplexity").is_file()


@pytest.mark.llama
def test_env_then_path(real_bin, empty_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("FQ_LLAMA_BIN_DIR", str(real_bin))
    assert T.find_tools().source == "env"
    monkeypatch.delenv("FQ_LLAMA_BIN_DIR")
    on_path = tmp_path / "onpath"
    on_path.mkdir()
    for tool in T.REQUIRED_TOOLS:
        (on_path / tool).symlink_to(real_bin / tool)
    monkeypatch.setenv("PATH", f"{on_path}:/usr/bin:/bin")
    t = T.find_tools(build=False)
    assert t.source == "PATH" and t.bin_dir == real_bin.resolve()


def test_flag_without_tools_is_a_clear_error(tmp_path, empty_cache):
    with pytest.raises(ToolMissing, match="does not contain llama-perplexity"):
        T.find_tools(tmp_path)


def test_nothing_found_and_no_build_says_how_to_fix(empty_cache):
    with pytest.raises(ToolMissing, match="fq setup"):
        T.find_tools(build=False)


def test_interrupted_or_incomplete_builds_are_never_used(empty_cache):
    root = empty_cache / "llama.cpp"
    # what an interrupted build leaves: a temporary tree, never renamed into place
    partial = root / ".building-abc" / "install" / "bin"
    partial.mkdir(parents=True)
    for tool in T.REQUIRED_TOOLS:
        (partial / tool).write_text("#!/bin/sh\n")
        os.chmod(partial / tool, 0o755)
    # and a final directory without the executables
    (T.cache_build_dir() / "bin").mkdir(parents=True)
    assert T.locate() == (None, "missing")
    with pytest.raises(ToolMissing):
        T.find_tools(build=False)


def test_flags_hash_covers_extra_cmake_args(monkeypatch):
    monkeypatch.delenv("FQ_LLAMA_CMAKE_ARGS", raising=False)
    plain = T.cache_build_dir()
    monkeypatch.setenv("FQ_LLAMA_CMAKE_ARGS", "-DGGML_CUDA=ON")
    assert T.cmake_args()[-1] == "-DGGML_CUDA=ON"
    cuda = T.cache_build_dir()
    assert cuda != plain and cuda.parent == plain.parent
    assert cuda.name.startswith(T.PINNED_VERSION + "-")


@pytest.mark.llama
def test_the_cache_build_is_complete_and_described(real_bin):
    """The build `fq setup` made: all tools, and a build.json with what produced it."""
    rec = T.build_record(T.cache_build_dir() / "bin")
    if T.locate()[1] != "cache" or rec is None:
        pytest.skip("llama.cpp comes from PATH / FQ_LLAMA_BIN_DIR here, not from the cache")
    for tool in T.BUILD_TARGETS:
        assert os.access(T.cache_build_dir() / "bin" / tool, os.X_OK)
    assert rec["package"] == "llama-cpp-python==0.3.36"
    assert rec["cmake_args"] == list(T.cmake_args())
    assert rec["version"] == T.find_tools().version
    # one build for both engines: the shared libraries and the bindings of the same source
    tree = T.cache_build_dir()
    t = T.find_tools()
    assert t.lib_dir == tree / "lib" and t.python_dir == tree / "python" and t.has_library
    assert (tree / "lib" / "libllama.so").exists() and "libllama.so" in rec["libraries"]
    assert any(n.startswith("libggml") for n in rec["libraries"])
    assert (tree / "python" / "llama_cpp" / "llama_cpp.py").is_file()
    assert not (tree / "python" / "llama_cpp" / "lib").exists()  # libraries live in lib/ only


@pytest.mark.llama
def test_the_tools_find_their_libraries_by_a_relative_rpath(real_bin):
    """The staged tools load the staged libllama through RUNPATH $ORIGIN/../lib: no
    LD_LIBRARY_PATH, no build tree."""
    if T.locate()[1] != "cache":
        pytest.skip("llama.cpp comes from PATH / FQ_LLAMA_BIN_DIR here, not from the cache")
    tree = T.cache_build_dir()
    if shutil.which("readelf"):
        dyn = subprocess.run(
            ["readelf", "-d", str(tree / "bin" / "llama-perplexity")],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "(RUNPATH)" in dyn and "[$ORIGIN/../lib]" in dyn
    if shutil.which("ldd"):
        env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
        ldd = subprocess.run(
            ["ldd", str(tree / "bin" / "llama-completion")],
            capture_output=True, text=True, check=True, env=env,
        ).stdout  # fmt: skip
        assert "not found" not in ldd
        assert any(
            "libllama.so" in ln and f"=> {tree / 'bin'}/../lib/" in ln for ln in ldd.splitlines()
        )


def test_library_dirs_need_both_the_library_and_the_bindings(tmp_path):
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    assert T.library_dirs(tree / "bin") == (None, None)
    (tree / "lib").mkdir()
    (tree / "lib" / "libllama.so").write_bytes(b"")
    assert T.library_dirs(tree / "bin") == (None, None)  # a lone libllama.so is no use
    (tree / "python" / "llama_cpp").mkdir(parents=True)
    (tree / "python" / "llama_cpp" / "llama_cpp.py").write_text("")
    assert T.library_dirs(tree / "bin") == (tree / "lib", tree / "python")


def test_the_build_flags_make_shared_libraries_with_a_relative_rpath():
    args = T.BASE_CMAKE_ARGS
    assert "-DBUILD_SHARED_LIBS=ON" in args and "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON" in args
    assert "-DCMAKE_INSTALL_RPATH=$ORIGIN/../lib" in args


def test_fixed_instruction_set_level(monkeypatch):
    """FQ_LLAMA_CPU=x86-64-v3: GGML_NATIVE off, the level's features on, and a key that does
    not depend on this CPU (runners of one kind share the build and its numbers)."""
    from fq_core.errors import BadInput
    from fq_core.llama import tools

    monkeypatch.delenv("FQ_LLAMA_CPU", raising=False)
    native_args, native_key = tools.cmake_args(), tools.flags_hash()
    assert "-DGGML_NATIVE=ON" in native_args and tools.instruction_set().startswith("native (")
    monkeypatch.setenv("FQ_LLAMA_CPU", "x86-64-v3")
    args = tools.cmake_args()
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AVX2=ON" in args
    assert "-DGGML_NATIVE=ON" not in args and "-DGGML_AVX512=ON" not in args
    key = tools.flags_hash()
    assert key != native_key
    monkeypatch.setattr(tools, "_cpu_fingerprint", lambda: "model name: another CPU")
    assert tools.flags_hash() == key  # the CPU is not part of a fixed level's key
    assert tools.instruction_set() == "x86-64-v3 (sse42, avx, avx2, bmi2, fma, f16c)"
    monkeypatch.setenv("FQ_LLAMA_CPU", "pentium4")
    with pytest.raises(BadInput, match="FQ_LLAMA_CPU='pentium4'"):
        tools.cmake_args()
