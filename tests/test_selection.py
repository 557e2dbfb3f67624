"""The --layers / --tensors grammar, resolved against factory and real GGUF files."""

from __future__ import annotations

import pytest
from gguf_factory import build_gguf

from fq_core.errors import BadSelection
from fq_core.measurement.gguf_index import read_index
from fq_core.measurement.selection import describe, format_layers, parse_layers, resolve, split_name


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_gguf(tmp_path_factory.mktemp("sel"), n_layers=10)


@pytest.fixture(scope="module")
def index(model):
    return read_index(model.path)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("all", tuple(range(10))),
        ("0", (0,)),
        ("0-2", (0, 1, 2)),
        ("0-9", tuple(range(10))),
        ("0,4,9", (0, 4, 9)),
        ("0,2", (0, 2)),
        ("0,9", (0, 9)),
        ("0-2,9", (0, 1, 2, 9)),
        (" 3 , 1 ", (1, 3)),
        ("2,2,1-2", (1, 2)),
    ],
)
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 10) == expected


@pytest.mark.parametrize(
    "spec, words",
    [
        ("10", "layer 10 is beyond"),
        ("0-10", "layer 10 is beyond"),
        ("5-2", "backwards"),
        ("", "empty"),
        ("a", "cannot read"),
        ("-1", "cannot read"),
        ("0,,1", "cannot read"),
        ("1.5", "cannot read"),
    ],
)
def test_parse_layers_errors_name_the_problem(spec, words):
    with pytest.raises(BadSelection, match=words):
        parse_layers(spec, 10)


def test_split_name():
    assert split_name("blk.12.ffn_norm.weight") == (12, "ffn_norm")
    assert split_name("output_norm.weight") == (None, "output_norm")
    assert split_name("blk.0.attn_q.bias") == (0, "attn_q.bias")


def test_format_layers():
    assert format_layers((0, 1, 2, 5, 7, 8)) == "0-2,5,7-8"


def test_default_is_every_ffn_norm(index, model):
    sel = resolve(index)
    assert sel.names == tuple(f"blk.{i}.ffn_norm.weight" for i in range(10))
    assert sel.layers is None
    assert sel.n_elements == sum(model.f32[n].size for n in sel.names)


def test_plan_style_list_is_two_layers_and_says_so(index):
    sel = resolve(index, "0,2")
    assert [t.layer for t in sel.tensors] == [0, 2]
    text = describe(sel)
    assert "LIST of two layers (0 and 2)" in text and "--layers 0-2" in text
    ranged = resolve(index, "0-2")
    assert [t.layer for t in ranged.tensors] == [0, 1, 2]
    assert "LIST" not in describe(ranged)
    assert "LIST" not in describe(resolve(index, "0,1"))  # adjacent: list and range agree


def test_kinds_globs_regexes_and_exact_names(index):
    assert resolve(index, "1", ["attn_norm", "ffn_norm"]).names == (
        "blk.1.attn_norm.weight",
        "blk.1.ffn_norm.weight",
    )
    assert resolve(index, "0-1", ["blk.*.attn_*"]).names == (
        "blk.0.attn_norm.weight",
        "blk.1.attn_norm.weight",
    )
    assert resolve(index, "all", [r"re:blk\.[35]\.ffn_norm\.weight"]).names == (
        "blk.3.ffn_norm.weight",
        "blk.5.ffn_norm.weight",
    )
    assert resolve(index, "all", "attn_norm,ffn_norm").n_elements == 20 * 64
    assert resolve(index, "all", ["output_norm"]).names == ("output_norm.weight",)
    assert resolve(index, "all", ["blk.7.ffn_norm.weight"]).names == ("blk.7.ffn_norm.weight",)


def test_layerless_tensors_with_layers(index):
    # a kind names output_norm on purpose: kept with any --layers
    assert "output_norm.weight" in resolve(index, "0", ["ffn_norm", "output_norm"]).names
    # a wide glob stays inside the chosen layers
    assert resolve(index, "0", ["*_norm*"]).names == (
        "blk.0.attn_norm.weight",
        "blk.0.ffn_norm.weight",
    )
    assert "output_norm.weight" in resolve(index, "all", ["*_norm*"]).names


@pytest.mark.parametrize(
    "layers, tensors, words",
    [
        ("12", ["ffn_norm"], "layer 12 is beyond the model's 10 blocks"),
        ("all", ["ffn_nrom"], "matches no tensor.*kinds there: .*ffn_norm"),
        ("all", ["ffn_up"], "blk.0.ffn_up.weight is Q8_0, not F32"),
        ("all", ["token_embd"], "token_embd.weight is F16, not F32"),
        ("0", ["re:output_.*"], "selection is empty"),
        ("all", ["re:("], "not a valid regex"),
        ("all", [], "--tensors is empty"),
    ],
)
def test_bad_selections_name_the_problem(index, layers, tensors, words):
    with pytest.raises(BadSelection, match=words):
        resolve(index, layers, tensors)


def test_describe_lists_every_tensor(index):
    text = describe(resolve(index, "0-2,9"))
    assert text.startswith("selection: 4 tensors (ffn_norm), 256 elements, 4 layers: 0-2,9")
    for n in (0, 1, 2, 9):
        assert f"blk.{n}.ffn_norm.weight" in text


def test_real_models(real_gguf):
    idx = read_index(real_gguf)
    sel = resolve(idx)
    assert len(sel.tensors) == idx.block_count
    assert all(t.kind == "ffn_norm" and t.info.type_name == "F32" for t in sel.tensors)
    with pytest.raises(BadSelection, match=f"layer {idx.block_count} is beyond"):
        resolve(idx, str(idx.block_count))
    with pytest.raises(BadSelection, match="not F32"):
        resolve(idx, "0", ["blk.*.ffn_down*"])


@pytest.mark.parametrize(
    "spec, words",
    [
        ("0-100000000000", "layer 10 is beyond the model's 10 blocks"),
        ("3,5-99999999999999999", "layer 10 is beyond"),
        ("0-" + "9" * 5000, "is not a layer number of any model"),  # int() would refuse it
    ],
)
def test_huge_ranges_are_checked_before_they_are_expanded(spec, words):
    """No MemoryError and no wait: the bounds are checked against the block count first."""
    import time

    started = time.monotonic()
    with pytest.raises(BadSelection, match=words):
        parse_layers(spec, 10)
    assert time.monotonic() - started < 0.5
