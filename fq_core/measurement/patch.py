"""Write a fake-quantized copy of a GGUF: fast copy, patch in place, verify, atomic rename.

The output differs from the input only inside the selected tensors' data.  Rather than
re-serialising the model (GGUFReader + GGUFWriter: ~13 s and 1.25 GB for Gemma3), the
input is copied with the kernel's fast path (``shutil.copyfile`` -> sendfile /
copy_file_range) into a temporary file beside the output, the selected byte ranges are
overwritten through a memory map, read back and checked, the file is fsync'ed and renamed
over the output in one step.  While the kernel copies, a second thread reads the input once
and computes both SHA-256s from those bytes: the input's, and the output's (the input with
the new tensor data substituted), so the manifest costs no extra pass and never records a
hash remembered from an earlier look at the file.  Any failure or Ctrl-C removes the
temporary files: there is never a partial OUTPUT or OUTPUT.fq.json, and never an OUTPUT
without its manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import __version__
from ..definitions.formats import FORMATS, LLAMA_TYPES, ROUNDINGS, fake_quantize
from ..errors import BadInput
from ..platform import atomic, hashing
from ..storage import codec
from .gguf_index import read_index, read_tensor
from .metrics import ErrorStats, combine, error_stats
from .selection import DEFAULT_TENSORS, Selection, resolve

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".fq.json"
MANIFEST_SCHEMA = 1
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class Patch:
    """New bytes for one byte range of the file."""

    offset: int
    data: bytes


@dataclass(frozen=True)
class FileRecord:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class TensorChange:
    name: str
    layer: int | None
    kind: str
    shape: tuple[int, ...]
    offset: int
    n_elements: int
    changed: int
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    max_ulp_bf16: float
    n_nonfinite: int = 0  # pairs with NaN or ±Inf on either side (metrics.ErrorStats)
    n_became_nonfinite: int = 0  # finite values the conversion made NaN or ±Inf

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass(frozen=True)
class Manifest:
    tool: str
    tool_version: str
    created_at: str
    input: FileRecord
    output: FileRecord
    format: str
    rounding: str
    seed: int
    selection: dict
    tensors: tuple[TensorChange, ...]
    total_elements: int
    total_changed: int
    totals: ErrorStats
    duration_s: float
    path: str = ""

    @property
    def nothing_changed(self) -> bool:
        return self.total_changed == 0

    def summary(self) -> str:
        """One line for the terminal; says plainly when no element changed."""
        if self.nothing_changed:
            return (
                f"0 of {self.total_elements:,} elements changed: the selected tensors are "
                f"already exactly representable in {self.format} ({self.rounding}); "
                "the output is byte-identical to the input"
            )
        t = self.totals
        text = (
            f"{self.total_changed:,} of {self.total_elements:,} elements changed "
            f"({100 * t.fraction:.2f}%) in {len(self.tensors)} tensors; "
            f"max abs error {t.max_abs:.3g}, max rel error {t.max_rel:.3g}, "
            f"mean rel error {t.mean_rel:.3g}"
        )
        if t.n_became_nonfinite:
            text += (
                f"; {t.n_became_nonfinite:,} finite values became NaN/±Inf "
                f"(beyond what {self.format} can hold)"
            )
        already = t.n_nonfinite - t.n_became_nonfinite
        if already:
            text += f"; {already:,} values were NaN/±Inf in the input"
        return text

    def to_json(self) -> dict:
        return {
            "schema": MANIFEST_SCHEMA,
            "tool": self.tool,
            "tool_version": self.tool_version,
            "created_at": self.created_at,
            "input": asdict(self.input),
            "output": asdict(self.output),
            "format": self.format,
            "rounding": self.rounding,
            "seed": self.seed,
            "selection": self.selection,
            "tensors": [t.to_json() for t in self.tensors],
            "total_elements": self.total_elements,
            "total_changed": self.total_changed,
            "nothing_changed": self.nothing_changed,
            "totals": self.totals.to_json(),
            "summary": self.summary(),
            "duration_s": round(self.duration_s, 4),
        }


def manifest_path(dst) -> Path:
    return Path(f"{dst}{MANIFEST_SUFFIX}")


def read_manifest(dst_or_manifest_path) -> dict:
    """The manifest of an output (give the output or the .fq.json itself)."""
    p = Path(dst_or_manifest_path)
    if not p.name.endswith(MANIFEST_SUFFIX):
        p = manifest_path(p)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise BadInput(f"no fq manifest at {p}") from None
    except (OSError, ValueError) as exc:
        raise BadInput(f"{p}: unreadable fq manifest ({exc})") from None


# --- refusals ---------------------------------------------------------------------------


def check_output(src, dst, *, force: bool = False) -> None:
    """Refuse an OUTPUT (or its manifest) that is the INPUT, through links too, or exists."""
    for target in (dst, manifest_path(dst)):
        atomic.check_target(target, force=force, inputs=[src])


# --- the copy-and-patch core ------------------------------------------------------------


def copy_and_patch(
    src, tmp, patches: Sequence[Patch], *, header_end: int = 0, fsync: bool = True
) -> None:
    """Copy `src` to `tmp` with the kernel's fast path, patch through mmap, verify, fsync.

    Verification re-reads every patched range and the first `header_end` bytes from the
    written file with pread (not through the map) and compares them with what they must be.
    """
    src, tmp = Path(src), Path(tmp)
    shutil.copyfile(src, tmp)
    size = os.path.getsize(src)
    with open(tmp, "r+b") as f:
        if patches:
            with mmap.mmap(f.fileno(), 0) as mm:
                for p in patches:
                    end = p.offset + len(p.data)
                    if p.offset < header_end or end > size:
                        raise BadInput(f"patch at {p.offset}+{len(p.data)} outside the data")
                    mm[p.offset : end] = p.data
                mm.flush()
        fd = f.fileno()
        if os.fstat(fd).st_size != size:
            raise OSError(f"{tmp}: size changed while writing")
        for p in patches:
            if os.pread(fd, len(p.data), p.offset) != p.data:
                raise OSError(f"{tmp}: verification failed at offset {p.offset}")
        if header_end:
            with open(src, "rb") as fs:
                for pos in range(0, header_end, 1 << 20):  # chunked: bounded memory
                    n = min(1 << 20, header_end - pos)
                    if os.pread(fs.fileno(), n, pos) != os.pread(fd, n, pos):
                        raise OSError(f"{tmp}: header region differs from the input")
        if fsync:
            os.fsync(fd)


class _Hasher(threading.Thread):
    """SHA-256 of the input and of the output, from one read of the input's bytes.

    The output's hash is the input's bytes with the patches substituted, which is what
    copy_and_patch writes (it verifies the patched ranges and the header read back).
    """

    def __init__(self, src: Path, patches: Sequence[Patch]):
        super().__init__(name="fq-sha256", daemon=True)
        self.src, self.patches = src, sorted(patches, key=lambda p: p.offset)
        self.stop = threading.Event()
        self.in_hexdigest: str | None = None
        self.hexdigest: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            digest_in, digest_out = hashlib.sha256(), hashlib.sha256()
            buf = bytearray(_CHUNK)
            view = memoryview(buf)
            pos = 0
            with open(self.src, "rb", buffering=0) as f:
                while not self.stop.is_set():
                    n = f.readinto(buf)
                    if not n:
                        break
                    digest_in.update(view[:n])
                    for p in self.patches:
                        lo, hi = max(p.offset, pos), min(p.offset + len(p.data), pos + n)
                        if lo < hi:
                            buf[lo - pos : hi - pos] = p.data[lo - p.offset : hi - p.offset]
                    digest_out.update(view[:n])
                    pos += n
            if not self.stop.is_set():
                self.in_hexdigest, self.hexdigest = digest_in.hexdigest(), digest_out.hexdigest()
        except BaseException as exc:  # re-raised in the caller's thread
            self.error = exc


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """What must not change while the input is copied and hashed."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _gguf_version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def _converter(fmt: str, rounding: str, seed: int, selection: Selection, lib_dir):
    """values, name -> fake-quantized values: an elementwise format, or llama.cpp's type T
    stored by ggml's own code and read back (every selected tensor checked to fit T first,
    so a refusal comes before any work)."""
    if fmt not in LLAMA_TYPES:
        return lambda x, name: fake_quantize(x, fmt, rounding, seed=seed, tensor_name=name)
    from . import ggml_types

    for sel in selection.tensors:
        why = ggml_types.unfit(fmt, sel.info.name, tuple(sel.info.shape))
        if why:
            raise BadInput(why)
    ggml = ggml_types.quantizer(lib_dir)
    return lambda x, name: ggml.fake(x, fmt, name)


def plan_changes(
    index, selection: Selection, fmt: str, rounding: str, seed: int, lib_dir=None
) -> tuple[list[Patch], list[TensorChange], list[ErrorStats]]:
    """New bytes and error statistics per selected tensor (read from the input)."""
    patches: list[Patch] = []
    changes: list[TensorChange] = []
    stats: list[ErrorStats] = []
    convert = _converter(fmt, rounding, seed, selection, lib_dir)
    for sel in selection.tensors:
        info = sel.info
        orig = read_tensor(index, info)
        new = convert(orig, info.name)
        new = np.ascontiguousarray(new, dtype=np.float32).reshape(-1)
        es = error_stats(orig, new)
        stats.append(es)
        changes.append(
            TensorChange(
                name=info.name,
                layer=sel.layer,
                kind=sel.kind,
                shape=tuple(int(d) for d in info.shape),
                offset=int(info.offset),
                n_elements=int(info.n_elements),
                changed=es.changed,
                max_abs=es.max_abs,
                mean_abs=es.mean_abs,
                max_rel=es.max_rel,
                mean_rel=es.mean_rel,
                max_ulp_bf16=es.max_ulp_bf16,
                n_nonfinite=es.n_nonfinite,
                n_became_nonfinite=es.n_became_nonfinite,
            )
        )
        if es.changed:
            patches.append(Patch(int(info.offset), new.astype("<f4").tobytes()))
    return patches, changes, stats


def fake_quantize_file(
    src,
    dst,
    *,
    layers: str = "all",
    tensors=DEFAULT_TENSORS,
    fmt: str = "bf16",
    rounding: str = "truncate",
    seed: int = 0,
    force: bool = False,
    on_selection: Callable[[Selection], None] | None = None,
    fsync: bool = True,
    lib_dir=None,
) -> Manifest:
    """Write `dst` = `src` with the selected F32 tensors fake-quantized, and `dst`.fq.json.
    A llama.cpp type is quantized by ggml's code in `lib_dir` (default: the build fq uses)."""
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if fmt not in FORMATS + LLAMA_TYPES:
        known = ", ".join(FORMATS + LLAMA_TYPES)
        raise BadInput(f"unknown format {fmt!r}; choose one of {known}")
    if rounding not in ROUNDINGS:
        raise BadInput(f"unknown rounding {rounding!r}; choose one of {', '.join(ROUNDINGS)}")
    if not src.is_file():
        raise BadInput(f"input not found or not a file: {src}")
    check_output(src, dst, force=force)
    index = read_index(src)
    selection = resolve(index, layers, tensors)
    if on_selection is not None:
        on_selection(selection)
    patches, changes, stats = plan_changes(index, selection, fmt, rounding, seed, lib_dir)
    st_before = os.stat(src)

    hasher = _Hasher(src, patches)
    mpath = manifest_path(dst)
    try:
        with atomic.temporary_for(dst, force=force, inputs=[src], fsync=fsync) as tmp:
            hasher.start()
            copy_and_patch(src, tmp, patches, header_end=index.data_start, fsync=fsync)
            hasher.join()
            if hasher.error is not None:
                raise hasher.error
            st_after = os.stat(src)
            if _identity(st_after) != _identity(st_before):
                raise BadInput(f"input {src} changed while it was being copied")
            size = os.path.getsize(tmp)
            os.chmod(tmp, _umask_mode())
            manifest = Manifest(
                tool="fq-suite",
                tool_version=__version__,
                created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
                input=FileRecord(str(src.resolve()), hasher.in_hexdigest, st_before.st_size),
                output=FileRecord(str(dst.resolve()), hasher.hexdigest, size),
                format=fmt,
                rounding=rounding,
                seed=seed,
                selection=selection.to_json(),
                tensors=tuple(changes),
                total_elements=sum(c.n_elements for c in changes),
                total_changed=sum(c.changed for c in changes),
                totals=combine(stats),
                duration_s=time.perf_counter() - started,
                path=str(mpath),
            )
            doc = manifest.to_json()
            doc["gguf_py_version"] = _gguf_version()
            manifest_bytes = (codec.dumps(doc, indent=2) + "\n").encode()
            # the manifest is checked now so that a refusal comes before the model appears
            atomic.check_target(mpath, force=force, inputs=[src])
        # the model is published; its manifest follows, or the model goes again
        atomic.write_bytes(mpath, manifest_bytes, force=force, inputs=[src], fsync=fsync)
    except BaseException:
        # Whatever stopped us (an error, Ctrl-C, SIGTERM): a model of ours without its
        # manifest is removed; once the manifest is published both stand (the work is done).
        if atomic.published(dst) and not atomic.published(mpath):
            dst.unlink(missing_ok=True)
        hasher.stop.set()
        if hasher.is_alive():
            hasher.join()
        raise
    with contextlib.suppress(OSError):
        # the input's hash was computed from its bytes as st_before saw them (unchanged since)
        hashing.remember_sha256(
            src, manifest.input.sha256, key=hashing.stat_key(src, st_before), from_bytes=True
        )
        hashing.remember_sha256(dst, manifest.output.sha256)
    log.info("%s: %s", dst, manifest.summary())
    return manifest
