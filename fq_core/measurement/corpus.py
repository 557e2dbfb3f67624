"""The perplexity corpus (WikiText-2 raw test split): found locally or downloaded once.

Resolved like the models, never relative to where the code is installed: the command line
(``--text``), the environment (``FQ_TEXT``), the checkout the command runs in (the current
directory or the nearest parent whose pyproject.toml names the fq-suite project: its
``../shared/data/...`` then its ``data/...``), then the per-user cache
(``$XDG_CACHE_HOME/fq-suite/corpus/...``), which is also where a download goes.

Bytes are used exactly as found: a changed line ending changes tokenization and therefore
perplexity, so nothing here decodes, re-encodes or normalises the text.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from ..errors import BadInput, CorpusMissing
from ..platform.hashing import copy_hashing, remember_sha256, sha256_file
from ..platform.paths import cache_dir

log = logging.getLogger(__name__)

# The location llama.cpp's scripts/get-wikitext-2.sh downloads from.
WIKITEXT_URL = "https://huggingface.co/datasets/ggml-org/ci/resolve/main/wikitext-2-raw-v1.zip"
ZIP_MEMBER = "wikitext-2-raw/wiki.test.raw"
DOWNLOAD_TIMEOUT_S = 60.0
PROJECT_NAME = "fq-suite"
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Corpus:
    path: Path
    sha256: str
    n_bytes: int
    # "argument" | "FQ_TEXT" | "shared" | "data" | "cache" | "downloaded"
    source: str = "path"


def _is_project(directory: Path) -> bool:
    """True when `directory` holds a pyproject.toml whose project is fq-suite."""
    try:
        import tomllib

        with open(directory / "pyproject.toml", "rb") as f:
            name = tomllib.load(f).get("project", {}).get("name", "")
    except (OSError, ValueError):
        return False
    return isinstance(name, str) and name.lower().replace("_", "-") == PROJECT_NAME


def project_root(start: str | os.PathLike[str] | None = None) -> Path | None:
    """The fq-suite checkout the command runs in: `start` (default: the current directory)
    or its nearest parent with fq-suite's pyproject.toml; None outside any checkout."""
    try:
        here = (Path(start) if start is not None else Path.cwd()).absolute()
    except OSError:  # the current directory was removed
        return None
    for directory in (here, *here.parents):
        if _is_project(directory):
            return directory
    return None


def shared_corpus_path(checkout: Path) -> Path:
    """The corpus kept beside a checkout (../shared/data/...), shared by several clones."""
    return Path(checkout).parent / "shared" / "data" / ZIP_MEMBER


def data_corpus_path(checkout: Path) -> Path:
    """A checkout's own copy."""
    return Path(checkout) / "data" / ZIP_MEMBER


def cache_corpus_path() -> Path:
    """The per-user copy; also where a downloaded corpus goes."""
    return cache_dir() / "corpus" / ZIP_MEMBER


def wikitext_url() -> str:
    return os.environ.get("FQ_WIKITEXT_URL") or WIKITEXT_URL


def resolve_corpus(
    text: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    checkout: str | os.PathLike[str] | None = None,
) -> Corpus:
    """Pick the corpus: `text`, then $FQ_TEXT, then the checkout's ../shared/data and data/,
    then the per-user cache, then download (into the cache).

    `checkout` names the project directory instead of looking for it from the current
    directory (tests).
    """
    root = Path(checkout) if checkout is not None else project_root()
    if text is not None and os.fspath(text) != "":
        return _given(Path(text).expanduser(), "argument", "--text")
    env = os.environ.get("FQ_TEXT")
    if env:
        return _given(Path(env).expanduser(), "FQ_TEXT", "FQ_TEXT")
    for path, source in _candidates(root):
        if path.is_file():
            if path.stat().st_size == 0:
                log.warning("ignoring empty corpus file %s", path)
                continue
            log.info("corpus: %s (%s)", path, source)
            return _corpus(path, source)
    if not download:
        raise CorpusMissing(_missing_message("downloading is disabled", root))
    return _download(wikitext_url(), root)


def _candidates(root: Path | None) -> list[tuple[Path, str]]:
    found = []
    if root is not None:
        found += [(shared_corpus_path(root), "shared"), (data_corpus_path(root), "data")]
    return [*found, (cache_corpus_path(), "cache")]


def _given(path: Path, source: str, what: str) -> Corpus:
    if not path.exists():
        raise BadInput(f"corpus file not found ({what}): {path}")
    if not path.is_file():
        raise BadInput(f"corpus path is not a file ({what}): {path}")
    if path.stat().st_size == 0:
        raise BadInput(f"corpus file is empty ({what}): {path}")
    return _corpus(path, source)


def _corpus(path: Path, source: str) -> Corpus:
    try:
        return Corpus(path, sha256_file(path), path.stat().st_size, source)
    except OSError as exc:
        raise BadInput(f"cannot read corpus file {path}: {exc.strerror}") from None


def _missing_message(reason: str, root: Path | None) -> str:
    where = " or ".join(str(path) for path, _ in _candidates(root))
    outside = "" if root is not None else " (not run inside an fq-suite checkout)"
    return (
        f"no WikiText-2 corpus ({reason}); put wiki.test.raw at {where}, "
        f"or pass --text PATH / set FQ_TEXT{outside}"
    )


def _download(url: str, root: Path | None) -> Corpus:
    """Fetch the zip, extract the test split into the per-user cache, rename into place."""
    dest = cache_corpus_path()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CorpusMissing(_missing_message(f"cannot create {dest.parent}: {exc}", root)) from None
    with FileLock(str(dest) + ".lock"):
        if dest.is_file() and dest.stat().st_size > 0:  # another process got there first
            return _corpus(dest, "cache")
        with tempfile.TemporaryDirectory(prefix=".corpus-", dir=dest.parent) as tmp:
            zip_path = Path(tmp) / "wikitext.zip"
            log.info("corpus: downloading %s", url)
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                    with open(zip_path, "wb") as out:
                        shutil.copyfileobj(resp, out, _CHUNK)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise CorpusMissing(
                    _missing_message(f"download of {url} failed: {reason}", root)
                ) from None
            partial = Path(tmp) / dest.name
            digest = hashlib.sha256()
            try:
                with zipfile.ZipFile(zip_path) as zf, zf.open(ZIP_MEMBER) as src:
                    with open(partial, "wb") as out:
                        copy_hashing(src, out, digest)
                        out.flush()
                        os.fsync(out.fileno())
            except KeyError:
                raise CorpusMissing(
                    _missing_message(f"the zip from {url} has no member {ZIP_MEMBER}", root)
                ) from None
            except zipfile.BadZipFile as exc:
                raise CorpusMissing(
                    _missing_message(f"the download from {url} is not a valid zip: {exc}", root)
                ) from None
            n_bytes = partial.stat().st_size
            if n_bytes == 0:
                raise CorpusMissing(_missing_message(f"{ZIP_MEMBER} in {url} is empty", root))
            os.replace(partial, dest)
    hexdigest = digest.hexdigest()
    remember_sha256(dest, hexdigest)
    log.info("corpus: %s (%d bytes, sha256 %s) from %s", dest, n_bytes, hexdigest, url)
    return Corpus(dest, hexdigest, n_bytes, "downloaded")
