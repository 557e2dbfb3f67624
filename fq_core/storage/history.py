"""The history of runs: a manifest per run, the records of earlier runs, saved references.

Why: a run is only worth comparing with when it says what produced it. Every run directory
`results/<run-id>/` holds its stage records (`<stage>/<case>.json`, fq_core.storage.results) and a
small `run.json` (this module: git commit and whether the tree was dirty, timestamps,
argv, fq version, host — pytest-benchmark's autosave keeps the same). A *reference* is a
run's records copied into a small directory the user can commit (`fq-reference/` by
default, like pytest-regressions' data files): the same `<stage>/<case>.json` layout plus a
`reference.json` naming the run it came from.

Layout (none of these extra files matches `results.iter_records`' `*/*.json` glob):
- `results/<run-id>/run.json`                        the run manifest
- `results/<run-id>/<stage>/regression/<case>.json`  a comparison with the reference
  (fq_core.experiment.regression.RunComparison; one level deeper than the records, like `models/`)
- `<reference dir>/reference.json` + `<reference dir>/<stage>/<case>.json`

No pytest here; the only subprocess (`git status`) goes through commands.run_logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec

from .. import __version__
from ..errors import BadInput, OutputRefused
from ..platform import atomic
from . import record, results
from .identity import MachineInfo, machine_info
from .record import StageRecord

MANIFEST_FILE = "run.json"
REFERENCE_FILE = "reference.json"
REGRESSION_DIR = "regression"
#: Where `fq reference save` and `--fq-save-reference` write, and `--fq-compare` looks first.
DEFAULT_REFERENCE_DIR = "fq-reference"
SCHEMA = 1


class _Part(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    pass


class GitInfo(_Part, kw_only=True):
    commit: str | None
    branch: str | None
    dirty: bool | None  # None: not known (no git binary, or not a work tree)


class RunManifest(_Part, kw_only=True):
    """What produced a run: written when it starts, completed when it ends."""

    schema: int = SCHEMA
    run_id: str
    started_at: str
    finished_at: str | None = None
    exit_status: int | None = None
    argv: tuple[str, ...]
    cwd: str
    fq_version: str
    git: GitInfo
    host: MachineInfo
    ci: dict[str, str] = {}  # CI, GITHUB_SHA, GITHUB_RUN_ID, ... when set


class ReferenceCase(_Part, kw_only=True):
    stage: str
    case: str
    outcome: str
    format: str
    model_sha256: str
    llama_version: str


class ReferenceManifest(_Part, kw_only=True):
    schema: int = SCHEMA
    saved_at: str
    run_id: str
    source: str  # the run directory the records were copied from
    fq_version: str
    run: RunManifest | None = None
    cases: tuple[ReferenceCase, ...]


# --- the run manifest --------------------------------------------------------------------------


def _git_dir(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        dot = folder / ".git"
        if dot.is_dir():
            return dot
        if dot.is_file():  # a worktree or submodule: "gitdir: <path>"
            text = dot.read_text(encoding="utf-8", errors="replace").strip()
            if text.startswith("gitdir:"):
                found = Path(text.split(":", 1)[1].strip())
                return found if found.is_absolute() else (folder / found).resolve()
    return None


def _read_ref(git_dir: Path, ref: str) -> str | None:
    common = git_dir
    with contextlib.suppress(OSError):  # a worktree keeps shared refs in commondir
        common = (git_dir / (git_dir / "commondir").read_text().strip()).resolve()
    for base in dict.fromkeys((git_dir, common)):
        path = base / ref
        if path.is_file():
            return path.read_text(encoding="utf-8").strip() or None
        packed = base / "packed-refs"
        if packed.is_file():
            for line in packed.read_text(encoding="utf-8", errors="replace").splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0]
    return None


def git_info(start: str | os.PathLike[str] | None = None, *, dirty: bool = True) -> GitInfo:
    """Commit and branch read from `.git` itself (no git binary needed); `dirty` from
    `git status --porcelain --untracked-files=no` when git is installed."""
    folder = Path(start or Path.cwd()).resolve()
    git_dir = _git_dir(folder)
    if git_dir is None:
        return GitInfo(commit=None, branch=None, dirty=None)
    commit = branch = None
    try:
        head = (git_dir / "HEAD").read_text(encoding="utf-8").strip()
    except OSError:
        head = ""
    if head.startswith("ref:"):
        ref = head.split(":", 1)[1].strip()
        branch = ref.removeprefix("refs/heads/")
        commit = _read_ref(git_dir, ref)
    elif head:
        commit = head
    return GitInfo(commit=commit, branch=branch, dirty=_dirty(folder) if dirty else None)


def _dirty(folder: Path) -> bool | None:
    git = shutil.which("git")
    if git is None:
        return None
    from ..platform.commands import run_logged

    try:
        rec = run_logged(
            [git, "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            tool="git",
            timeout_s=30,
        )
    except (OSError, ValueError):
        return None
    if rec.exit_status != 0 or rec.timed_out:
        return None
    return bool(rec.stdout().strip())


_CI_VARS = (
    "CI",
    "GITHUB_SHA",
    "GITHUB_REF",
    "GITHUB_RUN_ID",
    "GITHUB_RUN_ATTEMPT",
    "GITHUB_WORKFLOW",
    "CI_COMMIT_SHA",
    "CI_PIPELINE_ID",
)


def new_manifest(
    run_id: str, argv: Sequence[str], *, cwd: str | os.PathLike[str] | None = None
) -> RunManifest:
    where = Path(cwd or Path.cwd())
    return RunManifest(
        run_id=run_id,
        started_at=results.utc_now(),
        argv=tuple(str(a) for a in argv),
        cwd=str(where),
        fq_version=__version__,
        git=git_info(where),
        host=machine_info(),
        ci={k: os.environ[k] for k in _CI_VARS if os.environ.get(k)},
    )


def manifest_path(run_id: str, root: str | os.PathLike[str] | None = None) -> Path:
    return results.run_dir(run_id, root) / MANIFEST_FILE


def write_manifest(manifest: RunManifest, root: str | os.PathLike[str] | None = None) -> Path:
    path = manifest_path(manifest.run_id, root)
    with results.lock_for(path):
        results.write_bytes_atomic(path, _encode(manifest))
    return path


def ensure_manifest(
    run_id: str,
    argv: Sequence[str],
    root: str | os.PathLike[str] | None = None,
    *,
    cwd: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the run's manifest unless one exists (of several workers, the first wins)."""
    path = manifest_path(run_id, root)
    with results.lock_for(path):
        if _read_manifest_file(path) is None:
            results.write_bytes_atomic(path, _encode(new_manifest(run_id, argv, cwd=cwd)))
    return path


def finish_manifest(
    run_id: str,
    exit_status: int | None,
    argv: Sequence[str],
    root: str | os.PathLike[str] | None = None,
    *,
    cwd: str | os.PathLike[str] | None = None,
) -> Path:
    """Complete the run's manifest (or write it now, when the start was not recorded)."""
    current = read_manifest(run_id, root) or new_manifest(run_id, argv, cwd=cwd)
    done = msgspec.structs.replace(current, finished_at=results.utc_now(), exit_status=exit_status)
    return write_manifest(done, root)


def read_manifest(run_id: str, root: str | os.PathLike[str] | None = None) -> RunManifest | None:
    return _read_manifest_file(manifest_path(run_id, root))


def _read_manifest_file(path: Path) -> RunManifest | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BadInput(f"{path}: cannot read run manifest ({exc.strerror or exc})") from exc
    try:
        manifest = msgspec.json.decode(raw, type=RunManifest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadInput(f"{path}: not an fq-suite run manifest ({exc})") from exc
    _known_schema(path, "run manifest", manifest.schema)
    return manifest


_ENCODER = msgspec.json.Encoder()


def _encode(value: msgspec.Struct) -> bytes:
    return msgspec.json.format(_ENCODER.encode(value), indent=2) + b"\n"


# --- sources: a run or a reference, as a directory of <stage>/<case>.json ---------------------


@dataclass(frozen=True)
class Source:
    """Somewhere stage records are read from: a run directory or a saved reference."""

    kind: Literal["run", "reference"]
    path: Path
    run_id: str | None  # the run the records come from

    @property
    def label(self) -> str:
        if self.kind == "reference":
            return f"reference {self.path} (run {self.run_id})"
        return f"run {self.run_id}"

    def record_path(self, stage: str, case: str) -> Path:
        return self.path / results.safe_name(stage) / f"{results.safe_name(case)}.json"

    def load(self, stage: str, case: str) -> StageRecord | None:
        """The record of one stage × case, or None; an unreadable one is BadInput naming it."""
        path = self.record_path(stage, case)
        return record.read(path) if path.is_file() else None

    def record_paths(self) -> list[Path]:
        return sorted(p for p in self.path.glob("*/*.json") if p.is_file())

    def records(self) -> list[StageRecord]:
        return [record.read(p) for p in self.record_paths()]


def _has_records(path: Path) -> bool:
    return path.is_dir() and any(p.is_file() for p in path.glob("*/*.json"))


def open_directory(path: str | os.PathLike[str]) -> Source:
    """A run directory or a reference directory; BadInput when it holds no stage records."""
    path = Path(path)
    if not path.is_dir():
        raise BadInput(f"{path}: no such directory")
    ref_file = path / REFERENCE_FILE
    if ref_file.is_file():
        manifest = read_reference(path)
        if not _has_records(path):
            raise BadInput(f"{path}: a reference without stage records (<stage>/<case>.json)")
        return Source("reference", path, manifest.run_id)
    if not _has_records(path):
        raise BadInput(f"{path}: no stage records (<stage>/<case>.json) in this directory")
    return Source("run", path, path.name)


def resolve(spec: str, root: str | os.PathLike[str] | None = None) -> Source:
    """RUN_ID (under the results root), `latest`, or a directory (a run's or a reference's)."""
    spec = str(spec).strip()
    if not spec:
        raise BadInput("empty run id or directory")
    base = Path(root) if root is not None else results.results_dir()
    if spec == "latest":
        latest = results.latest_run_id(base)
        if latest is None:
            raise BadInput(f"no run with stage records in {base}")
        return open_directory(base / latest)
    if Path(spec).is_dir():
        return open_directory(spec)
    try:
        candidate = results.run_dir(spec, base)
    except BadInput:
        candidate = None
    if candidate is not None and candidate.is_dir():
        return open_directory(candidate)
    raise BadInput(f"unknown run or directory {spec!r}: no {base / spec} and no directory {spec}")


def reference_dir(base: str | os.PathLike[str] | None = None) -> Path:
    """The default reference directory: `fq-reference/` in `base` (the checkout)."""
    return Path(base or Path.cwd()) / DEFAULT_REFERENCE_DIR


def saved_reference(path: str | os.PathLike[str]) -> Source | None:
    """The reference saved in the directory `path`, when there is one."""
    path = Path(path)
    if (path / REFERENCE_FILE).is_file() and _has_records(path):
        return open_directory(path)
    return None


def _measured(rec: StageRecord) -> bool:
    return rec.outcome not in ("running", "skipped") and (
        rec.treatment is not None or rec.numeric is not None
    )


def runs_with(
    stage: str,
    case: str,
    root: str | os.PathLike[str] | None = None,
    *,
    exclude: str | None = None,
    before: str | None = None,
) -> Iterator[tuple[Source, StageRecord]]:
    """Every run in the store with a measured record of this stage × case, newest first
    (by the record's start time, UTC ISO text; `before`: started no later than that).
    Unreadable records are skipped: an old file of another layout must not break a
    comparison with a newer run."""
    base = Path(root) if root is not None else results.results_dir()
    if not base.is_dir():
        return
    found: list[tuple[str, str, Source, StageRecord]] = []
    for folder in base.iterdir():
        if not folder.is_dir() or folder.name == exclude:
            continue
        source = Source("run", folder, folder.name)
        path = source.record_path(stage, case)
        if not path.is_file():
            continue
        try:
            rec = record.read(path)
        except BadInput:
            continue
        if _measured(rec) and (before is None or rec.started_at <= before):
            found.append((rec.started_at, folder.name, source, rec))
    for _, _, source, rec in sorted(found, key=lambda t: (t[0], t[1]), reverse=True):
        yield source, rec


def latest_run_with(
    stage: str,
    case: str,
    root: str | os.PathLike[str] | None = None,
    *,
    exclude: str | None = None,
    before: str | None = None,
) -> tuple[Source, StageRecord] | None:
    return next(iter(runs_with(stage, case, root, exclude=exclude, before=before)), None)


def source_manifest(source: Source) -> RunManifest | None:
    """The run manifest behind a source (a run's run.json, or the one a reference kept);
    None when there is none or it cannot be read (it only adds the git commit to a report)."""
    try:
        if source.kind == "reference":
            return read_reference(source.path).run
        return _read_manifest_file(source.path / MANIFEST_FILE)
    except BadInput:
        return None


# --- references --------------------------------------------------------------------------------


def read_reference(path: str | os.PathLike[str]) -> ReferenceManifest:
    file = Path(path) / REFERENCE_FILE
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise BadInput(f"{file}: cannot read ({exc.strerror or exc})") from exc
    try:
        manifest = msgspec.json.decode(raw, type=ReferenceManifest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadInput(f"{file}: not an fq-suite reference ({exc})") from exc
    _known_schema(file, "reference", manifest.schema)
    return manifest


def _known_schema(file: Path, what: str, schema: int) -> None:
    """A manifest of a schema this version does not know is refused by name, never read as if
    its fields meant what ours mean."""
    if schema != SCHEMA:
        raise BadInput(
            f"{file}: unknown {what} schema {schema} (fq-suite {__version__} reads schema {SCHEMA})"
        )


@dataclass(frozen=True)
class SavedReference:
    path: Path
    manifest: ReferenceManifest
    skipped: tuple[str, ...]  # stage/case records not saved (not measured), with why


def save_reference(
    source: Source,
    dest: str | os.PathLike[str],
    *,
    force: bool = False,
    root: str | os.PathLike[str] | None = None,
) -> SavedReference:
    """Copy a run's measured records (validated) into `dest`, with `reference.json`.

    The directory is built beside `dest` and renamed into place, so a reader never sees
    half a reference. What `dest` may hold is `check_reference_dest`'s rule: nothing, or a
    reference fq-suite wrote and nothing else (replaced only with `force`).
    """
    dest = Path(dest)
    check_reference_dest(dest, force=force, source=source, root=root)
    kept: list[tuple[Path, StageRecord]] = []
    skipped: list[str] = []
    for path in source.record_paths():
        rec = record.read(path)  # BadInput names a broken record
        if _measured(rec):
            kept.append((path, rec))
        else:
            skipped.append(f"{rec.stage}/{rec.case}: {rec.outcome}, nothing measured")
    if not kept:
        raise BadInput(f"{source.path}: no measured stage records to save as a reference")
    run = None
    if source.kind == "run":
        with contextlib.suppress(BadInput):
            run = _read_manifest_file(source.path / MANIFEST_FILE)
    elif source.kind == "reference":
        run = read_reference(source.path).run
    manifest = ReferenceManifest(
        saved_at=results.utc_now(),
        run_id=source.run_id or source.path.name,
        source=str(source.path.resolve()),
        fq_version=__version__,
        run=run,
        cases=tuple(
            ReferenceCase(
                stage=rec.stage,
                case=rec.case,
                outcome=rec.outcome,
                format=rec.settings.format,
                model_sha256=rec.model.sha256,
                llama_version=rec.llama.version,
            )
            for _, rec in kept
        ),
    )
    files = {_case_file(rec.stage, rec.case): record.encode(rec) for _, rec in kept}
    files[REFERENCE_FILE] = _encode(manifest)
    with atomic.output_errors(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        # not named *.fq-tmp: atomic.remove_stale unlinks files of that name, not directories
        build = dest.parent / f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.building"
        build.mkdir()  # ours from here on, so ours to remove
        try:
            for rel, data in files.items():
                (build / rel).parent.mkdir(parents=True, exist_ok=True)
                with open(build / rel, "wb") as f:
                    f.write(data)
                    os.fsync(f.fileno())
            _swap_in(build, dest)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return SavedReference(dest, manifest, tuple(skipped))


def _case_file(stage: str, case: str) -> str:
    return f"{results.safe_name(stage)}/{results.safe_name(case)}.json"


def check_reference_dest(
    dest: str | os.PathLike[str],
    *,
    force: bool,
    source: Source | None = None,
    root: str | os.PathLike[str] | None = None,
) -> None:
    """Every refusal a reference directory can meet, before anything is copied (pytest makes
    them before the session runs).

    Why so strict: replacing a directory deletes what is in it. `dest` is replaced only when
    it holds a reference fq-suite wrote (its `reference.json` and the records it names) and
    nothing else, and only with `force`; anything else in it is refused, `force` or not. The
    results store, a directory inside it or holding it, and the source are never a `dest`.
    """
    dest = Path(dest)
    if dest.is_symlink():
        raise OutputRefused(f"{dest} is a symbolic link; give the reference directory itself")
    atomic.check_directory(dest, what="reference directory")
    here = dest.resolve()
    store = (Path(root) if root is not None else results.results_dir()).resolve()
    for what, there in (
        ("the results store", store),
        ("the run being saved", source.path.resolve() if source else None),
    ):
        if there is None:
            continue
        if here == there:
            raise OutputRefused(
                f"{dest} is {what}; save the reference elsewhere (default {DEFAULT_REFERENCE_DIR}/)"
            )
        if here.is_relative_to(there):
            raise OutputRefused(f"{dest} is inside {what} {there}; save the reference elsewhere")
        if there.is_relative_to(here):
            raise OutputRefused(f"{dest} holds {what} {there}; refusing to replace it")
    if not dest.is_dir() or not any(dest.iterdir()):
        return
    foreign = foreign_files(dest)
    if foreign:
        shown = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        raise OutputRefused(
            f"{dest} holds files fq-suite did not write ({shown}); refusing to "
            "replace it, --force or not: choose a new or empty directory"
        )
    if not force:
        run_id = read_reference(dest).run_id
        raise OutputRefused(
            f"{dest} holds the reference of run {run_id}; pass --force to replace it"
        )


def _suite_files(path: Path) -> tuple[set[str], set[str]]:
    """(files, directories) a reference fq-suite wrote at `path` consists of, relative to it;
    nothing when its reference.json is missing or is not one this version reads."""
    try:
        manifest = read_reference(path)
    except BadInput:
        return set(), set()
    files = {REFERENCE_FILE} | {_case_file(c.stage, c.case) for c in manifest.cases}
    return files, {f.split("/")[0] for f in files if "/" in f}


def foreign_files(path: str | os.PathLike[str]) -> list[str]:
    """What the directory `path` holds besides a reference fq-suite wrote (relative paths; a
    directory ends in "/"; links and unreadable directories count as foreign)."""
    path = Path(path)
    files, dirs = _suite_files(path)
    found: list[str] = []

    def unreadable(exc: OSError) -> None:
        found.append(f"{Path(exc.filename).relative_to(path).as_posix()}/ (unreadable)")

    for here, subdirs, names in os.walk(path, onerror=unreadable):
        rel = Path(here).relative_to(path)
        ours = []
        for name in subdirs:
            r = (rel / name).as_posix()
            if r in dirs and not Path(here, name).is_symlink():
                ours.append(name)
            else:
                found.append(r + "/")
        subdirs[:] = ours
        for name in names:
            r = (rel / name).as_posix()
            if r not in files or Path(here, name).is_symlink():
                found.append(r)
    return sorted(found)


def _swap_in(build: Path, dest: Path) -> None:
    """`build` becomes `dest` in one rename (signals held: never neither of them in place); an
    old reference is moved aside first and then removed file by file, what it named only."""
    old = None
    with atomic.held_signals():
        if dest.exists():
            old = dest.parent / f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.replaced"
            os.rename(dest, old)
            foreign = foreign_files(old)
            if foreign:  # written into it since it was checked
                os.rename(old, dest)
                raise OutputRefused(
                    f"{dest} holds files fq-suite did not write "
                    f"({', '.join(foreign[:3])}); refusing to replace it"
                )
        try:
            os.rename(build, dest)
        except OSError:
            if old is not None:
                os.rename(old, dest)
            raise
    if old is not None:
        _remove_reference(old)


def _remove_reference(path: Path) -> None:
    """Remove a replaced reference: the files its manifest names, then the emptied directories;
    anything else (written meanwhile) stays, with the directory, and is logged."""
    files, dirs = _suite_files(path)
    try:
        for rel in sorted(files, key=lambda f: f == REFERENCE_FILE):  # the manifest last
            (path / rel).unlink(missing_ok=True)
        for rel in dirs:
            (path / rel).rmdir()
        path.rmdir()
    except OSError as exc:
        logging.getLogger(__name__).warning("left %s: %s", path, exc.strerror or exc)


# --- where comparisons are stored ----------------------------------------------------------


def comparison_path(
    run_id: str, stage: str, case: str, root: str | os.PathLike[str] | None = None
) -> Path:
    """results/<run-id>/<stage>/regression/<case>.json (outside iter_records' `*/*.json`)."""
    return (
        results.run_dir(run_id, root)
        / results.safe_name(stage)
        / REGRESSION_DIR
        / f"{results.safe_name(case)}.json"
    )


def comparison_paths(run_id: str, root: str | os.PathLike[str] | None = None) -> list[Path]:
    base = results.run_dir(run_id, root)
    return sorted(base.glob(f"*/{REGRESSION_DIR}/*.json")) if base.is_dir() else []
