"""Finding llama.cpp: flag, environment, PATH, cache; and what never counts as a good build."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fq_core.errors import ToolMissing
from fq_core.measurement.llama import tools as T
from fq_core.platform.hashing import sha256_file


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
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "(RUNPATH)" in dyn and "[$ORIGIN/../lib]" in dyn
    if shutil.which("ldd"):
        env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
        ldd = subprocess.run(
            ["ldd", str(tree / "bin" / "llama-completion")],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout
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
    from fq_core.measurement.llama import tools

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


def test_a_native_build_never_compiles_amx(monkeypatch):
    """A CPU advertising AMX gets a native build without it (its tiles trapped with SIGILL in
    this VM); a CPU without AMX gets the plain native flags."""
    from fq_core.measurement.llama import tools

    monkeypatch.delenv("FQ_LLAMA_CPU", raising=False)
    monkeypatch.delenv("FQ_LLAMA_CMAKE_ARGS", raising=False)
    monkeypatch.setattr(tools, "_cpu_fingerprint", lambda: "flags: avx2 avx512f amx_tile amx_int8")
    args = tools.cmake_args()
    assert "-DGGML_NATIVE=ON" in args
    assert "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in args
    assert "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in args
    assert "amx" not in tools.instruction_set()
    monkeypatch.setattr(tools, "_cpu_fingerprint", lambda: "flags: avx2 fma")
    assert not any("amx" in a for a in tools.cmake_args())


# --- the build's identity: its files by content (issue 18) ---------------------------------------

_VERSION_SCRIPT = "#!/bin/sh\necho 'version: 9999 (fake)' >&2\necho 'built with sh for test' >&2\n"


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _fq_tree(tree: Path) -> Path:
    """A tree laid out like fq's build (tools, libraries with soname links, bindings,
    build.json without a manifest, as builds made before manifests have): real files whose
    tools answer --version like llama.cpp's."""
    (tree / "bin").mkdir(parents=True)
    _script(tree / "bin" / "llama-completion", _VERSION_SCRIPT)
    _script(tree / "bin" / "llama-perplexity", "#!/bin/sh\necho 'Final estimate: PPL = 10'\n")
    (tree / "lib").mkdir()
    (tree / "lib" / "libllama.so").write_bytes(b"\x7fELF libllama")
    (tree / "lib" / "libggml-cpu.so.0.1").write_bytes(b"\x7fELF kernels v1")
    (tree / "lib" / "libggml-cpu.so.0").symlink_to("libggml-cpu.so.0.1")
    (tree / "python" / "llama_cpp").mkdir(parents=True)
    (tree / "python" / "llama_cpp" / "llama_cpp.py").write_text("# bindings\n")
    (tree / "build.json").write_text(json.dumps({"package": "fake", "version": "9999 (fake)"}))
    return tree / "bin"


@pytest.fixture
def fake_cache_build(empty_cache, tmp_path, monkeypatch):
    """The cache's build for the current flags, manifest recorded; logs kept in tmp_path."""
    monkeypatch.setenv("FQ_LOG_DIR", str(tmp_path / "logs"))
    bin_dir = _fq_tree(T.cache_build_dir())
    T.record_manifest(bin_dir)
    return bin_dir


def test_the_build_id_names_every_file_the_numbers_depend_on(fake_cache_build):
    t = T.find_tools(build=False)
    assert t.source == "cache" and t.manifest and t.version == "9999 (fake)"
    rec = T.build_record(fake_cache_build)
    assert t.build_id == rec["build_id"] and len(t.build_id) == 64
    assert sorted(rec["files"]) == [
        "bin/llama-completion",
        "bin/llama-perplexity",
        "lib/libggml-cpu.so.0",
        "lib/libggml-cpu.so.0.1",
        "lib/libllama.so",
        "python/llama_cpp/llama_cpp.py",
    ]
    # a copy elsewhere is the same build; a library rebuilt with the same version is not
    copy = fake_cache_build.parent.parent / "copy"
    shutil.copytree(fake_cache_build.parent, copy, symlinks=True)
    assert T.find_tools(copy / "bin").build_id == t.build_id
    (copy / "lib" / "libggml-cpu.so.0.1").write_bytes(b"\x7fELF kernels v2")
    with pytest.raises(
        ToolMissing, match=r"lib/libggml-cpu.so.0: sha256 \w+ != manifest \w+ \(and 1 more\)"
    ):
        T.find_tools(copy / "bin")  # its build.json came along: checked against it
    (copy / "build.json").unlink()
    other = T.find_tools(copy / "bin")
    assert other.version == t.version and other.build_id != t.build_id and not other.manifest


def test_a_tool_replaced_in_the_cached_build_is_refused_and_named(fake_cache_build, capsys):
    """Attack: the cached llama-perplexity replaced in place. Before: `fq setup` / `fq doctor`
    said ok and the figures were served under the version string's key."""
    from fq_core.cli import main
    from fq_core.errors import BuildChanged

    want = T.build_record(fake_cache_build)["files"]["bin/llama-perplexity"]
    _script(fake_cache_build / "llama-perplexity", "#!/bin/sh\necho 'Final estimate: PPL = 11'\n")
    with pytest.raises(BuildChanged) as exc:
        T.find_tools(build=False)
    have = sha256_file(fake_cache_build / "llama-perplexity")
    named = f"bin/llama-perplexity: sha256 {have[:16]} != manifest {want[:16]}"
    assert exc.value.differences == (named,)
    assert "\n" not in str(exc.value) and named in str(exc.value)
    status = main(["doctor"])
    out, _ = capsys.readouterr()
    assert status == 1
    assert f"[MISS] llama.cpp build at {fake_cache_build.parent} differs from its manifest" in out
    assert named in out and "fq setup" in out
    status = main(["setup"])  # refuses before fetching anything
    out, err = capsys.readouterr()
    assert status == 1 and named in out
    assert err.count("\n") == 1 and "differs from its manifest" in err


def test_a_missing_or_relinked_library_is_named(fake_cache_build):
    lib = fake_cache_build.parent / "lib"
    (lib / "libggml-cpu.so.0.2").write_bytes(b"\x7fELF other kernels")
    (lib / "libggml-cpu.so.0").unlink()
    (lib / "libggml-cpu.so.0").symlink_to("libggml-cpu.so.0.2")  # same names, other content
    diffs = T.build_differences(fake_cache_build)
    assert diffs[0].startswith("lib/libggml-cpu.so.0: sha256 ")
    assert diffs[1].startswith("lib/libggml-cpu.so.0.2: not in the manifest")
    (lib / "libllama.so").unlink()
    (lib / "libllama.so").symlink_to("gone.so")
    assert "lib/libllama.so: missing (manifest sha256 " in "\n".join(
        T.build_differences(fake_cache_build)
    )


def test_a_wrapper_with_the_same_version_gets_its_own_keys(fake_cache_build, tmp_path, monkeypatch):
    """Attack: FQ_LLAMA_BIN_DIR = a wrapper printing the cached build's version that alters
    perplexity. Before: the baseline, placebos, treatments, cells and the gate were keyed by
    the version string, so the wrapper's figures and the build's were served for each other."""
    from fq_core.experiment import measure, stages
    from fq_core.measurement import evaluate
    from fq_core.measurement.corpus import Corpus
    from fq_core.measurement.models import ModelRef

    cached = T.find_tools(build=False)
    wrapper = tmp_path / "wrapper"
    wrapper.mkdir()
    (wrapper / "llama-completion").symlink_to(fake_cache_build / "llama-completion")
    real = fake_cache_build / "llama-perplexity"
    _script(wrapper / "llama-perplexity", f'#!/bin/sh\nexec {real} "$@" --temp 2\n')
    monkeypatch.setenv("FQ_LLAMA_BIN_DIR", str(wrapper))
    wrapped = T.find_tools(build=False)
    assert wrapped.source == "env" and wrapped.version == cached.version
    assert wrapped.build_id != cached.build_id and not wrapped.manifest
    model, corpus = (
        ModelRef("m", tmp_path / "m.gguf", "a" * 64, None),
        Corpus(tmp_path, "c" * 64, 1),
    )
    exp = stages.Experiment()
    settings = exp.settings
    keys = [
        lambda t: evaluate.baseline_key(model, corpus, t.build_id, settings),
        lambda t: measure.placebo_key(model, corpus, t, exp, "0", 1, base_sha256="b" * 64),
        lambda t: exp.gate_identity(model, corpus, t).key(),
        lambda t: measure.target_key(
            measure.Target(model, "0"), exp, t, corpus, ["blk.0.ffn_norm.weight"], "b" * 64
        ),
    ]
    for key in keys:
        assert key(wrapped) != key(cached)
        assert key(cached) == key(T.find_tools(fake_cache_build))  # the same files: one key


def test_a_build_made_before_manifests_is_adopted_by_setup_and_flagged_by_doctor(
    empty_cache, tmp_path, monkeypatch, capsys
):
    from fq_core.cli import main

    monkeypatch.setenv("FQ_LOG_DIR", str(tmp_path / "logs"))
    bin_dir = _fq_tree(T.cache_build_dir())
    t = T.find_tools(build=False)
    assert not t.manifest and T.build_differences(bin_dir) is None
    main(["doctor"])
    out, _ = capsys.readouterr()
    assert f"[warn] build {t.build_id[:16]}: no manifest (built before fq wrote one)" in out
    assert T.record_manifest(bin_dir) == t.build_id  # what `fq setup` does first
    assert T.find_tools(build=False).manifest and T.build_differences(bin_dir) == ()
    main(["doctor"])
    out, _ = capsys.readouterr()
    assert f"[ok  ] build {t.build_id[:16]}: every file matches its manifest" in out


@pytest.mark.llama
def test_the_real_build_is_named_by_its_files_and_a_wrapper_is_not_it(real_bin, tmp_path):
    """The build `fq setup` made: its id covers every tool, library and binding file; a copy
    is the same build; a wrapper that prints the same version is another; a copy whose
    llama-perplexity was replaced is refused, naming the file."""
    from fq_core.errors import BuildChanged

    real = T.find_tools(real_bin)
    if T.build_record(real_bin) is None or not real.has_library:
        pytest.skip("llama.cpp comes from PATH / FQ_LLAMA_BIN_DIR here, not from fq's build")
    files = T.build_files(real_bin)
    libs = {p.name for p in real.lib_dir.iterdir() if T._is_library(p.name)}
    assert {f"lib/{n}" for n in libs} <= set(files) and "lib/libllama.so" in files
    assert "python/llama_cpp/llama_cpp.py" in files
    assert {f"bin/{t}" for t in T.REQUIRED_TOOLS} <= set(files)
    assert real.build_id == T.build_id_of(files)
    copy = tmp_path / "copy"
    shutil.copytree(real_bin.parent, copy, symlinks=True)
    assert T.find_tools(copy / "bin").build_id == real.build_id
    wrapper = tmp_path / "wrapper"
    wrapper.mkdir()
    (wrapper / "llama-completion").symlink_to(real_bin / "llama-completion")
    _script(wrapper / "llama-perplexity", f'#!/bin/sh\nexec {real_bin / "llama-perplexity"} "$@"\n')
    wrapped = T.find_tools(wrapper)
    assert wrapped.version == real.version and wrapped.build_id != real.build_id
    T.record_manifest(copy / "bin")  # a build made before manifests: recorded as it is
    (copy / "bin" / "llama-perplexity").unlink()
    shutil.copy2(wrapper / "llama-perplexity", copy / "bin" / "llama-perplexity")
    with pytest.raises(BuildChanged, match=r"bin/llama-perplexity: sha256 \w+ != manifest"):
        T.find_tools(copy / "bin")
