"""Corpus resolution: argument, FQ_TEXT, the checkout's ../shared and data/, the per-user cache,
download (into the cache); bytes kept exactly. Never relative to where the code is installed."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from fq_core.errors import BadInput, CorpusMissing, FetchFailed
from fq_core.measurement import corpus
from fq_core.measurement.corpus import ZIP_MEMBER, resolve_corpus

ROOT = Path(__file__).resolve().parent.parent
REAL_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
REAL_BYTES = 1_290_547
TEXT = b" = Valkyria Chronicles III = \r\n\r\n Senj\xc5\x8d no Valkyria 3 \r\n"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.delenv("FQ_TEXT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # hash cache stays private


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A project directory with nothing in it; ../shared is its sibling."""
    root = tmp_path / "ws" / "proj"
    root.mkdir(parents=True)
    return root


def _put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_text_argument_bytes_untouched(tmp_path, checkout):
    f = _put(tmp_path / "t.raw", TEXT)
    c = resolve_corpus(f, checkout=checkout, download=False)
    assert (c.path, c.n_bytes, c.source) == (f, len(TEXT), "argument")
    assert c.sha256 == hashlib.sha256(TEXT).hexdigest()
    assert f.read_bytes() == TEXT  # CRLF and UTF-8 kept


def test_resolution_order(tmp_path, checkout, monkeypatch):
    arg = _put(tmp_path / "arg.raw", b"arg\r\n")
    env = _put(tmp_path / "env.raw", b"env\n")
    shared = _put(checkout.parent / "shared" / "data" / ZIP_MEMBER, b"shared\r\n")
    data = _put(checkout / "data" / ZIP_MEMBER, b"data\n")
    monkeypatch.setenv("FQ_TEXT", str(env))
    assert resolve_corpus(arg, checkout=checkout).path == arg
    assert resolve_corpus(checkout=checkout).source == "FQ_TEXT"
    monkeypatch.delenv("FQ_TEXT")
    c = resolve_corpus(checkout=checkout)
    assert (c.path, c.source) == (shared, "shared")
    shared.unlink()
    c = resolve_corpus(checkout=checkout, download=False)
    assert (c.path, c.source, c.n_bytes) == (data, "data", 5)


def test_given_path_errors(tmp_path, checkout, monkeypatch):
    with pytest.raises(BadInput, match=r"corpus file not found \(--text\): .*missing.raw"):
        resolve_corpus(tmp_path / "missing.raw", checkout=checkout)
    with pytest.raises(BadInput, match="corpus file is empty"):
        resolve_corpus(_put(tmp_path / "empty.raw", b""), checkout=checkout)
    with pytest.raises(BadInput, match="not a file"):
        resolve_corpus(tmp_path, checkout=checkout)
    monkeypatch.setenv("FQ_TEXT", str(tmp_path / "gone.raw"))
    with pytest.raises(BadInput, match=r"\(FQ_TEXT\): .*gone.raw"):
        resolve_corpus(checkout=checkout)


def test_cache_comes_after_the_checkout(tmp_path, checkout):
    cached = _put(corpus.cache_corpus_path(), b"cached\n")
    assert cached == tmp_path / "xdg" / "fq-suite" / "corpus" / ZIP_MEMBER
    c = resolve_corpus(checkout=checkout, download=False)
    assert (c.path, c.source) == (cached, "cache")
    data = _put(checkout / "data" / ZIP_MEMBER, b"data\n")
    assert resolve_corpus(checkout=checkout, download=False).path == data


@pytest.mark.skipif(
    not corpus.shared_corpus_path(ROOT).is_file(), reason="no ../shared corpus beside this checkout"
)
def test_real_shared_corpus(tmp_path):
    c = resolve_corpus(checkout=ROOT, download=False)
    assert c.source == "shared" and c.path == corpus.shared_corpus_path(ROOT)
    assert c.n_bytes == REAL_BYTES == c.path.stat().st_size
    assert c.sha256 == REAL_SHA256 == hashlib.sha256(c.path.read_bytes()).hexdigest()
    # found from the checkout the command runs in, also from a directory inside it
    script = (
        "from fq_core.measurement.corpus import resolve_corpus; "
        "print(resolve_corpus(download=False))"
    )
    for cwd in (ROOT, ROOT / "tests"):
        run = subprocess.run(
            [sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, check=True
        )
        assert str(c.path) in run.stdout and REAL_SHA256 in run.stdout


def _project(directory: Path, name: str = "fq-suite") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(f'[project]\nname = "{name}"\n')
    return directory


def test_project_root_is_found_from_the_working_directory(tmp_path, monkeypatch):
    proj = _project(tmp_path / "ws" / "proj")
    (proj / "a" / "b").mkdir(parents=True)
    assert corpus.project_root(proj / "a" / "b") == proj
    assert corpus.project_root(proj) == proj
    _project(proj / "a", name="something-else")  # another project's pyproject is no checkout
    assert corpus.project_root(proj / "a" / "b") == proj
    assert corpus.project_root(tmp_path) is None
    assert corpus.project_root(ROOT / "tests") == ROOT
    monkeypatch.chdir(proj / "a")
    assert corpus.project_root() == proj


def test_installed_copy_run_from_a_checkout_finds_its_corpus(tmp_path):
    """`pip install .` (not editable) puts fq_core in site-packages; run from the checkout,
    the corpus beside the checkout is found, not one beside the installed code."""
    site = tmp_path / "site"
    shutil.copytree(
        ROOT / "fq_core", site / "fq_core", ignore=shutil.ignore_patterns("__pycache__")
    )
    proj = _project(tmp_path / "ws" / "proj")
    (proj / "sub").mkdir()
    shared = _put(tmp_path / "ws" / "shared" / "data" / ZIP_MEMBER, TEXT)
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
        "FQ_LOG_DIR": str(tmp_path / "logs"),
    }
    env.pop("FQ_TEXT", None)
    script = (
        "import fq_core, sys; print(fq_core.__file__);"
        "from fq_core.cli import main; sys.exit(main(['doctor']))"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=proj / "sub", env=env, capture_output=True, text=True
    )
    assert run.stdout.splitlines()[0] == str(site / "fq_core" / "__init__.py")
    assert f"[ok  ] corpus (shared): {shared}" in run.stdout, run.stdout + run.stderr
    # outside any checkout: the per-user cache, or a message naming where to put it
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert "[MISS] corpus: no WikiText-2 corpus" in run.stdout
    assert str(tmp_path / "xdg" / "fq-suite" / "corpus" / ZIP_MEMBER) in run.stdout
    assert "not run inside an fq-suite checkout" in run.stdout


# --- download -------------------------------------------------------------------------


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def server():
    """A local HTTP server: routes path -> (status, body); records every request path."""
    routes: dict[str, tuple[int, bytes]] = {}
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            status, body = routes.get(self.path, (404, b"not found"))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield base, routes, hits
    httpd.shutdown()
    httpd.server_close()


def test_download_extracts_member_atomically(server, checkout, monkeypatch):
    base, routes, hits = server
    body = TEXT * 1000
    routes["/wt.zip"] = (
        200,
        _zip({"wikitext-2-raw/wiki.train.raw": b"train", ZIP_MEMBER: body}),
    )
    monkeypatch.setenv("FQ_WIKITEXT_URL", f"{base}/wt.zip")
    c = resolve_corpus(checkout=checkout)
    dest = corpus.cache_corpus_path()  # the per-user cache, not the checkout or the code
    assert (c.path, c.source, c.n_bytes) == (dest, "downloaded", len(body))
    assert dest.read_bytes() == body and c.sha256 == hashlib.sha256(body).hexdigest()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["wiki.test.raw", "wiki.test.raw.lock"]
    assert not (checkout / "data").exists()
    again = resolve_corpus(checkout=checkout)
    assert (again.source, again.sha256) == ("cache", c.sha256) and hits == ["/wt.zip"]


@pytest.mark.parametrize(
    "route, match",
    [
        ((200, _zip({"wikitext-2-raw/wiki.valid.raw": b"x"})), f"has no member {ZIP_MEMBER}"),
        ((200, b"<html>not a zip</html>"), "is not a valid zip"),
        ((404, b"gone"), "failed: Not Found"),
    ],
)
def test_download_bad_responses(server, checkout, monkeypatch, route, match):
    base, routes, _ = server
    routes["/wt.zip"] = route
    monkeypatch.setenv("FQ_WIKITEXT_URL", f"{base}/wt.zip")
    with pytest.raises(CorpusMissing, match=match):
        resolve_corpus(checkout=checkout)
    dest = corpus.cache_corpus_path()
    assert not dest.exists()
    assert [p.name for p in dest.parent.iterdir()] == ["wiki.test.raw.lock"]


def test_no_network_says_where_to_put_the_file(checkout, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("FQ_WIKITEXT_URL", f"http://127.0.0.1:{port}/wikitext-2-raw-v1.zip")
    with pytest.raises(CorpusMissing) as info:
        resolve_corpus(checkout=checkout)
    msg = str(info.value)
    assert "Connection refused" in msg
    assert str(checkout.parent / "shared" / "data" / ZIP_MEMBER) in msg
    assert str(checkout / "data" / ZIP_MEMBER) in msg and "FQ_TEXT" in msg
    assert str(corpus.cache_corpus_path()) in msg
    assert isinstance(info.value, FetchFailed) and info.value.exit_status == 1
    with pytest.raises(CorpusMissing, match="downloading is disabled"):
        resolve_corpus(checkout=checkout, download=False)


def test_default_url_is_llama_cpp_s(monkeypatch):
    monkeypatch.delenv("FQ_WIKITEXT_URL", raising=False)
    assert corpus.wikitext_url() == (
        "https://huggingface.co/datasets/ggml-org/ci/resolve/main/wikitext-2-raw-v1.zip"
    )
