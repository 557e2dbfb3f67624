"""llama.cpp's types as formats: ggml's own quantization (the pinned build's libggml-base),
read back by gguf-py's dequantizer (the twin's)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fq_core.definitions.formats import LLAMA_TYPES
from fq_core.errors import BadInput
from fq_core.measurement import ggml_types
from fq_core.measurement.llama.tools import find_tools

pytestmark = pytest.mark.llama  # needs the build's libggml-base

#: the types gguf-py can also quantize: ggml's bytes must be gguf-py's, bit for bit
GGUF_PY_QUANTIZES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "mxfp4")


@pytest.fixture(scope="module")
def quantizer() -> ggml_types.Quantizer:
    return ggml_types.Quantizer(find_tools().library()[0])


@settings(max_examples=30, deadline=None)
@given(
    fmt=st.sampled_from(GGUF_PY_QUANTIZES),
    rows=st.integers(1, 4),
    blocks=st.integers(1, 3),
    scale=st.sampled_from([1e-4, 0.02, 3.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_ggml_writes_the_bytes_gguf_py_writes(quantizer, fmt, rows, blocks, scale, seed):
    """Where both can quantize, the two implementations are one codec."""
    x = (np.random.default_rng(seed).standard_normal((rows, 32 * blocks)) * scale).astype("f4")
    ours = quantizer.quantize(x, fmt)
    theirs = gguf.quants.quantize(x, ggml_types.TYPES[fmt])
    assert ours.tobytes() == np.ascontiguousarray(theirs).tobytes()


def test_each_type_reads_back_with_its_expected_error(quantizer):
    """Gaussian weights of 256-wide rows: every type comes back with a relative RMS error in
    the band its bits per weight allow, and fewer bits never do better within a family."""
    x = np.random.default_rng(0).normal(0, 0.02, (64, 1024)).astype(np.float32)
    err = {}
    for fmt in LLAMA_TYPES:
        y = quantizer.fake(x, fmt)
        assert y.dtype == np.float32 and y.shape == x.shape
        err[fmt] = float(np.sqrt(np.mean((y - x) ** 2)) / x.std())
    assert err["q8_0"] < 0.01
    ladder = ["q8_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k"]
    assert [err[f] for f in ladder] == sorted(err[f] for f in ladder), err
    assert all(0 < e < 0.4 for e in err.values()), err


def test_a_row_the_block_does_not_divide_is_refused_naming_the_tensor(quantizer):
    x = np.zeros((2, 640), dtype=np.float32)  # Gemma3-270M's rows
    with pytest.raises(
        BadInput, match=r"blk\.0\.attn_v\.weight: rows of 640 .* q4_k's block of 256"
    ):
        quantizer.quantize(x, "q4_k", "blk.0.attn_v.weight")
    assert quantizer.quantize(x, "q8_0").shape == (2, 640 // 32 * 34)


def test_fq_quantize_stores_and_reads_back_a_weight_matrix(
    tmp_path, monkeypatch, capsys, quantizer
):
    """`fq quantize --format q4_k` on an F32 weight matrix: the output holds exactly what
    ggml's q4_k and gguf-py's dequantizer make of it; a matrix whose rows the block does not
    divide is refused in one line, before any file appears."""
    from gguf_factory import build_gguf

    from fq_core.cli import main
    from fq_core.measurement.gguf_index import read_index, read_tensor

    monkeypatch.setenv("FQ_LLAMA_BIN_DIR", str(find_tools().bin_dir))  # the build, named
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    w = np.random.default_rng(1).normal(0, 0.05, (4, 512)).astype(np.float32)
    odd = np.ones((4, 96), dtype=np.float32)
    m = build_gguf(
        tmp_path / "in",
        n_layers=1,
        extra_tensors={"blk.0.attn_v.weight": w, "blk.0.attn_k.weight": odd},
    )
    dst = tmp_path / "out.gguf"
    argv = ["quantize", str(m.path), str(dst), "--tensors", "attn_v", "--format", "q4_k"]
    assert main(argv) == 0, capsys.readouterr().err
    index = read_index(dst)
    got = read_tensor(index, next(t for t in index.tensors if t.name == "blk.0.attn_v.weight"))
    assert got.tobytes() == quantizer.fake(w, "q4_k").tobytes()
    assert not np.array_equal(got, w)
    capsys.readouterr()
    bad = tmp_path / "bad.gguf"
    argv = ["quantize", str(m.path), str(bad), "--tensors", "attn_k", "--format", "q4_k"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "blk.0.attn_k.weight: rows of 96" in err
    assert not bad.exists() and not (tmp_path / "bad.gguf.fq.json").exists()


@pytest.mark.models
@pytest.mark.parametrize("fmt", ["q8_0", "q4_k", "mxfp4"])
def test_the_twin_of_the_real_file_is_the_fake_file(gemma3_gguf, tmp_path, fmt, quantizer):
    """Gemma3's ffn_down of layers 0-1 stored as a llama.cpp type in the quantized model
    itself (the file deployed) and in its float twin: the twin of either real file equals,
    byte for byte, the fake file `fq quantize` writes from the twin (the same tensors
    quantized by ggml and read back), so what the intrinsic answer measures is exactly the
    real file's values. Every other tensor of the real file keeps its bytes."""
    from fq_core.measurement import twin
    from fq_core.measurement.gguf_index import read_index
    from fq_core.measurement.models import resolve_model
    from fq_core.measurement.patch import fake_quantize_file
    from fq_core.platform.hashing import sha256_file

    model = resolve_model("gemma3-270m")
    float_twin = twin.twin_for(model).path
    names = {"blk.0.ffn_down.weight": fmt, "blk.1.ffn_down.weight": fmt}
    lib = quantizer.path.parent
    fake = tmp_path / "fake.gguf"
    fake_quantize_file(
        float_twin, fake, layers="0-1", tensors=("ffn_down",), fmt=fmt, lib_dir=lib, fsync=False
    )
    want = sha256_file(fake)
    fake.unlink()
    for source in (gemma3_gguf, float_twin):
        real = tmp_path / "real.gguf"
        m = twin.make_real(source, real, names, lib_dir=lib, fsync=False)
        index, before = read_index(real), read_index(source)
        got_types = {t.name: t.type_name for t in index.tensors if t.name in names}
        assert got_types == dict.fromkeys(names, fmt.upper()), got_types
        assert m.n_converted == 2 and m.summary().startswith(f"stored 2 of {len(index.tensors)}")
        with open(source, "rb") as a, open(real, "rb") as b:  # the others: the same bytes
            for t, u in zip(before.tensors, index.tensors, strict=True):
                if t.name in names:
                    continue
                a.seek(t.offset)
                b.seek(u.offset)
                assert a.read(t.n_bytes) == b.read(u.n_bytes), t.name
        real_twin = tmp_path / "real-twin.gguf"
        twin.make_twin(real, real_twin, fsync=False)
        assert sha256_file(real_twin) == want, source.name
        for f in (real, real_twin):
            f.unlink()
            twin.manifest_path(f).unlink()


def test_fq_quantize_real_stores_the_type_llama_cpp_runs(tmp_path, monkeypatch, capsys, quantizer):
    """`fq quantize --real`: a Q8_0 matrix of the model stored as q4_0, every other tensor as
    it was; its twin is the fake file of the model's twin; an elementwise format is refused."""
    from gguf_factory import build_gguf

    from fq_core.cli import main
    from fq_core.measurement import twin
    from fq_core.measurement.gguf_index import read_index
    from fq_core.platform.hashing import sha256_file

    monkeypatch.setenv("FQ_LLAMA_BIN_DIR", str(find_tools().bin_dir))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    m = build_gguf(tmp_path / "in", n_layers=2)  # ffn_up: Q8_0, rows of 64
    real = tmp_path / "real.gguf"
    argv = ["quantize", str(m.path), str(real), "--tensors", "ffn_up", "--layers", "0"]
    assert main([*argv, "--format", "q4_0", "--real"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "q4_0: stored 1 of" in out and twin.manifest_path(real).is_file()
    types = {t.name: t.type_name for t in read_index(real).tensors}
    assert types == {
        **{t.name: t.type_name for t in read_index(m.path).tensors},
        "blk.0.ffn_up.weight": "Q4_0",
    }
    float_twin, real_twin, fake = (tmp_path / f"{n}.gguf" for n in ("twin", "real-twin", "fake"))
    twin.make_twin(m.path, float_twin, fsync=False)
    twin.make_twin(real, real_twin, fsync=False)
    fargv = ["quantize", str(float_twin), str(fake), "--tensors", "ffn_up", "--layers", "0"]
    assert main([*fargv, "--format", "q4_0"]) == 0
    assert sha256_file(real_twin) == sha256_file(fake)
    capsys.readouterr()
    bad = tmp_path / "bad.gguf"
    assert main(["quantize", str(m.path), str(bad), "--format", "fp8_e4m3", "--real"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--real stores the types llama.cpp has" in err, err
    assert not bad.exists()


#: one override per tensor and type: every block size and kind of row Gemma3-270M offers
#: (ffn_down rows 2048 take the 256-blocks of the k-quants; attn_v and attn_k rows 640 the
#: 32-blocks), and the elementwise types llama.cpp stores
LLAMA_QUANTIZE_OVERRIDES = {
    "blk.0.ffn_down.weight": "q4_k",
    "blk.1.ffn_down.weight": "q6_k",
    "blk.2.ffn_down.weight": "q3_k",
    "blk.3.ffn_down.weight": "q2_k",
    "blk.4.ffn_down.weight": "q5_k",
    "blk.5.ffn_down.weight": "iq4_xs",
    "blk.0.attn_v.weight": "q8_0",
    "blk.1.attn_v.weight": "q5_0",
    "blk.2.attn_v.weight": "q5_1",
    "blk.3.attn_v.weight": "q4_0",
    "blk.4.attn_v.weight": "q4_1",
    "blk.5.attn_v.weight": "iq4_nl",
    "blk.6.attn_v.weight": "mxfp4",
    "blk.0.attn_k.weight": "bf16",
    "blk.1.attn_k.weight": "fp16",
}


@pytest.mark.models
def test_llama_quantize_writes_the_suites_tensor_bytes(tmp_path, quantizer):
    """The suite's real file and llama-quantize's, from Gemma3's float twin with the same
    overrides (`--tensor-type name=type`, then `.=f32`: every other tensor kept as the twin
    holds it), have every tensor in the same type with the same bytes: ggml's quantization
    called through ctypes is llama-quantize's."""
    from fq_core.measurement import twin
    from fq_core.measurement.gguf_index import read_index
    from fq_core.measurement.llama.runner import LlamaRunner
    from fq_core.measurement.models import resolve_model

    float_twin = twin.twin_for(resolve_model("gemma3-270m")).path
    ours, theirs = tmp_path / "fq.gguf", tmp_path / "llama-quantize.gguf"
    twin.make_real(float_twin, ours, LLAMA_QUANTIZE_OVERRIDES, fsync=False)
    overrides = [
        ("^" + name.replace(".", r"\.") + "$", ggml_types.llama_name(fmt))
        for name, fmt in LLAMA_QUANTIZE_OVERRIDES.items()
    ]
    LlamaRunner(find_tools(), threads=2).quantize(
        float_twin, theirs, "q8_0", tensor_types=[*overrides, (".", "f32")]
    )
    a, b = read_index(ours), read_index(theirs)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    want = {n: ggml_types.STORED[f].name for n, f in LLAMA_QUANTIZE_OVERRIDES.items()}
    assert {t.name: t.type_name for t in b.tensors if t.type_name != "F32"} == want
    with open(ours, "rb") as fa, open(theirs, "rb") as fb:
        for t, u in zip(a.tensors, b.tensors, strict=True):
            assert (t.type_name, t.shape, t.n_bytes) == (u.type_name, u.shape, u.n_bytes), t.name
            fa.seek(t.offset)
            fb.seek(u.offset)
            assert fa.read(t.n_bytes) == fb.read(u.n_bytes), f"{t.name} ({t.type_name})"


def test_format_of_is_the_inverse_of_llama_name():
    for fmt in ggml_types.STORED:
        name = ggml_types.llama_name(fmt)
        assert ggml_types.format_of(name) == ggml_types.format_of(name.upper()) == fmt
    assert ggml_types.format_of("f16") == "fp16" and ggml_types.format_of("F32") is None
