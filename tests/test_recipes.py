"""Recipes: the file a person edits (fq_core.measurement.recipe_file) and the choice of types
under a budget (fq_core.experiment.recipe), on factory models and synthetic prices."""

from __future__ import annotations

import itertools
import math

import pytest
from gguf_factory import build_gguf

from fq_core.errors import BadInput
from fq_core.experiment import recipe
from fq_core.measurement import recipe_file
from fq_core.measurement.gguf_index import read_index


@pytest.fixture
def index(tmp_path):
    # ffn_up: rows of 64 (n_embd) in 3 layers; token_embd rows of 64; norms of one dimension
    return read_index(build_gguf(tmp_path, n_layers=3).path)


def test_a_recipe_file_reads_back_as_written_and_speaks_llama_quantize():
    r = recipe_file.Recipe(
        "q4_k_m",
        (
            recipe_file.Line(recipe_file.layer_pattern("ffn_up", (0, 1)), "q8_0", "hot layers"),
            recipe_file.Line(recipe_file.layer_pattern("token_embd", None), "fp16"),
        ),
        ("chosen by hand",),
    )
    text = r.text()
    assert text.splitlines()[:3] == [
        "# chosen by hand",
        "base: q4_k_m",
        "^blk\\.(0|1)\\.ffn_up\\.weight$=q8_0".ljust(44) + "  # hot layers",
    ]
    assert recipe_file.parse(text) == r
    assert r.tensor_types() == [
        ("^blk\\.(0|1)\\.ffn_up\\.weight$", "q8_0"),
        ("^token_embd\\.weight$", "f16"),
    ]
    assert recipe_file.parse("base: Q8_0\n^x=F16\n").lines[0].fmt == "fp16"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("^a=q8_0\n", "recipe: no base line"),
        ("base: q4_k_m\nbase: q8_0\n", "recipe line 2: a second base line"),
        ("base: q9_x\n", "recipe line 1: base 'q9_x' is no llama-quantize type"),
        ("base: q4_k_m\njust words\n", "recipe line 2: 'just words' is not pattern=type"),
        ("base: q4_k_m\n^a=fp8_e4m3\n", "recipe line 2: 'fp8_e4m3' is no type llama.cpp stores"),
        ("base: q4_k_m\n(a=q8_0\n", "recipe line 2: '(a' is no regular expression"),
    ],
)
def test_a_bad_recipe_is_refused_naming_its_line(text, message):
    with pytest.raises(BadInput, match="^" + message.replace("(", r"\(").replace("'", "'")):
        recipe_file.parse(text)


def test_assign_is_first_match_and_refuses_before_anything_is_quantized(index):
    lines = (
        recipe_file.Line("^blk\\.0\\.ffn_up\\.weight$", "q4_0"),
        recipe_file.Line("ffn_up", "q8_0"),
    )
    got = recipe_file.assign(recipe_file.Recipe("q4_k_m", lines), index)
    assert got == {
        "blk.0.ffn_up.weight": "q4_0",
        "blk.1.ffn_up.weight": "q8_0",
        "blk.2.ffn_up.weight": "q8_0",
    }

    def refused(pattern: str, fmt: str) -> str:
        r = recipe_file.Recipe("q4_k_m", (recipe_file.Line(pattern, fmt),))
        with pytest.raises(BadInput) as caught:
            recipe_file.assign(r, index)
        return str(caught.value)

    assert refused("^blk\\.7\\.ffn_up\\.weight$", "q8_0") == (
        "recipe line 1: ^blk\\.7\\.ffn_up\\.weight$ names no tensor of model.gguf"
    )
    assert "names blk.0.ffn_norm.weight, a tensor of one dimension" in refused("ffn_norm", "q8_0")
    assert refused("ffn_up", "q4_k").startswith(
        "recipe line 1: blk.0.ffn_up.weight: rows of 64 values are not a multiple of q4_k's"
    )


def test_build_refuses_a_recipe_before_llama_quantize_runs(index, tmp_path):
    class NoRunner:
        def quantize(self, *a, **k):
            raise AssertionError("llama-quantize ran")

    r = recipe_file.Recipe("q4_k_m", (recipe_file.Line("attn_q", "q8_0"),))
    dst = tmp_path / "out.gguf"
    with pytest.raises(BadInput, match="names no tensor"):
        recipe_file.build(r, index.path, dst, NoRunner())
    assert not dst.exists() and not list(tmp_path.glob(".out.gguf*"))


def test_groups_cut_layers_into_even_runs(index):
    assert recipe.layer_groups(list(range(18)), 3) == [
        tuple(range(0, 6)),
        tuple(range(6, 12)),
        tuple(range(12, 18)),
    ]
    assert recipe.layer_groups(list(range(5)), 2) == [(0, 1, 2), (3, 4)]
    assert recipe.layer_groups([0, 1], 5) == [(0,), (1,)]
    groups = recipe.groups_of(index, ["ffn_up", "token_embd"], 2)
    assert [(g.kind, g.layers, g.label) for g in groups] == [
        ("ffn_up", (0, 1), "ffn_up layers 0-1"),
        ("ffn_up", (2,), "ffn_up layers 2"),
        ("token_embd", None, "token_embd"),
    ]
    with pytest.raises(BadInput, match="no weight matrix of kind ffn_norm"):
        recipe.groups_of(index, ["ffn_norm"], 1)


def _prices():
    a = recipe.Group("ffn_up", (0,), ("blk.0.ffn_up.weight",))
    b = recipe.Group("ffn_up", (1,), ("blk.1.ffn_up.weight",))
    c = recipe.Group("token_embd", None, ("token_embd.weight",))
    table = {  # fmt: (bytes, KLD) per group; b is sensitive, c is big
        a: {"q4_0": (18, 0.010), "q8_0": (34, 0.001)},
        b: {"q4_0": (18, 0.100), "q8_0": (34, 0.002)},
        c: {"q4_0": (180, 0.050), "q5_0": (220, 0.020), "q8_0": (340, 0.004)},
    }
    prices = [
        recipe.Price(g, f, kld, size, f"{g.label}-{f}")
        for g, opts in table.items()
        for f, (size, kld) in opts.items()
    ]
    return [a, b, c], prices


def _brute(groups, prices, budget=None, target=None):
    best = None
    for combo in itertools.product(*[[p for p in prices if p.group == g] for g in groups]):
        size, kld = sum(p.bytes for p in combo), math.fsum(p.kld for p in combo)
        if budget is not None and size <= budget:
            key = (kld, size)
        elif target is not None and kld <= target:
            key = (size, kld)
        else:
            continue
        best = min(best, (key, combo)) if best else (key, combo)
    return best[1]


@pytest.mark.parametrize("budget", [216, 232, 252, 272, 292, 408])
def test_the_choice_is_the_best_within_the_budget(budget):
    groups, prices = _prices()
    got = recipe.choose(prices, groups, budget_bytes=budget)
    want = _brute(groups, prices, budget=budget)
    assert got.bytes <= budget and math.isclose(got.kld, math.fsum(p.kld for p in want))
    assert [p.group for p in got.chosen] == groups


@pytest.mark.parametrize("target", [0.007, 0.03, 0.2])
def test_the_choice_is_the_smallest_within_a_kld_target(target):
    groups, prices = _prices()
    got = recipe.choose(prices, groups, kld_target=target)
    want = _brute(groups, prices, target=target)
    assert got.kld <= target and got.bytes == sum(p.bytes for p in want)


def test_an_impossible_choice_is_one_line():
    groups, prices = _prices()
    with pytest.raises(BadInput, match=r"^the budget of 200 bytes cannot be met: .* take 216$"):
        recipe.choose(prices, groups, budget_bytes=200)
    with pytest.raises(BadInput, match=r"^the KLD target 0.001 cannot be met: .* sum to 0.007$"):
        recipe.choose(prices, groups, kld_target=0.001)
    with pytest.raises(BadInput, match="no sweep cell prices ffn_up layers 0"):
        recipe.choose(prices[2:], groups, budget_bytes=10**6)


def test_the_recipe_of_a_choice_names_each_group_and_its_price(index):
    groups, prices = _prices()
    choice = recipe.choose(prices, groups, budget_bytes=272)
    r = recipe.recipe_of(choice, "q4_k_m", ["budget 272 bytes"])
    assert [(line.pattern, line.fmt) for line in r.lines] == [
        (p.group.pattern, p.fmt) for p in choice.chosen
    ]
    assert recipe_file.assign(r, index) == {
        name: p.fmt for p in choice.chosen for name in p.group.tensors
    }
    assert "predicted KLD" in r.text() and recipe_file.parse(r.text()) == r


def test_base_is_priced_as_the_sum_of_the_types_the_preset_mixes_in_a_group(index):
    """A preset that gives ffn_up 0 and 2 q8_0 and ffn_up 1 q4_0 is no single type: its price
    is the sum of the two cells it splits into, its recipe lines are theirs, and at the
    preset's own bytes the choice is never predicted worse than keeping the preset."""
    g = recipe.Group("ffn_up", (0, 1, 2), tuple(f"blk.{n}.ffn_up.weight" for n in range(3)))
    stock = {"blk.0.ffn_up.weight": "q8_0", "blk.1.ffn_up.weight": "q4_0"}
    stock["blk.2.ffn_up.weight"] = "q8_0"
    split = recipe.base_split([g], stock)
    eights = recipe.Group("ffn_up", (0, 2), ("blk.0.ffn_up.weight", "blk.2.ffn_up.weight"))
    fours = recipe.Group("ffn_up", (1,), ("blk.1.ffn_up.weight",))
    assert split == {g: ((eights, "q8_0"), (fours, "q4_0"))}
    assert eights.spec == "0,2" and eights.pattern == "^blk\\.(0|2)\\.ffn_up\\.weight$"
    parts = [recipe.Price(eights, "q8_0", 1e-4, 100, "a"), recipe.Price(fours, "q4_0", 3e-3, 40)]
    own = [recipe.Price(g, "q5_0", 2e-3, 130, "c"), recipe.Price(g, "q4_0", 5e-3, 110, "d")]
    prices = recipe.with_base([*own, *parts], [g], split)
    base = next(p for p in prices if p.fmt == recipe.BASE)
    assert (base.kld, base.bytes, base.parts) == (pytest.approx(3.1e-3), 140, tuple(parts))
    assert {p.fmt for p in prices} == {"q5_0", "q4_0", recipe.BASE}  # the parts are no option
    assert recipe.choose(prices, [g], budget_bytes=140).chosen == (own[0],)
    kept = recipe.choose([own[1], base], [g], budget_bytes=140)
    assert kept.chosen == (base,)
    r = recipe.recipe_of(kept, "q4_0_m")
    assert [(line.pattern, line.fmt) for line in r.lines] == [
        (eights.pattern, "q8_0"),
        (fours.pattern, "q4_0"),
    ]
    assert "(as q4_0_m)" in r.lines[0].note
    assert recipe_file.assign(r, index) == stock
    assert recipe.with_base(parts[:1], [g], split) == []  # a part unpriced: no base option


def test_the_cells_that_price_a_split_group_name_and_select_its_layers(index):
    """A base part's layers need not be a run (a preset gives q8_0 to layers 0 and 2): its
    cell is named by its runs and selects exactly its tensors, no other layer."""
    from fq_core.experiment.sweep.plan import refusal
    from fq_core.measurement.selection import resolve

    g = recipe.Group("ffn_up", (0, 1, 2), tuple(f"blk.{n}.ffn_up.weight" for n in range(3)))
    stock = {"blk.0.ffn_up.weight": "q8_0", "blk.1.ffn_up.weight": "q4_0"}
    stock["blk.2.ffn_up.weight"] = "q8_0"
    (eights, fmt), (fours, _) = recipe.base_split([g], stock)[g]
    cells, unfit = recipe.pricing_cells("m", index, [g, eights, fours], ["q8_0", "q4_k"])
    assert [c.id for c in cells] == [
        "m-ffn_up-blk00-02-q8_0-intrinsic",
        "m-ffn_up-blk00_02-q8_0-intrinsic",
        "m-ffn_up-blk01-q8_0-intrinsic",
    ]
    assert len(unfit) == 3 and unfit[1].startswith("ffn_up layers 0,2: q4_k (rows of 64")
    assert refusal(cells[1], index) is None
    assert resolve(index, cells[1].layers, "ffn_up", any_type=True).names == eights.tensors


def test_base_is_a_recipe_type_and_nothing_else_new():
    from fq_core.definitions.settings import BY_NAME

    parse = BY_NAME["fq_recipe_types"].parse
    assert parse("q8_0 base") == ("q8_0", "base") and parse("base") == ("base",)
    with pytest.raises(ValueError, match="^basis is not one of llama.cpp's types"):
        parse("q8_0 basis")


@pytest.mark.llama
@pytest.mark.models
def test_llama_quantize_builds_the_recipe_the_suite_would_write(tmp_path):
    """The round trip: a recipe file (Q4_K_M for everything it does not name, q6_k, q8_0 and
    q5_0 where it does), built by llama-quantize from SmolLM2's float twin, holds exactly the
    tensors the suite writes itself (twin.make_real with the recipe's types and the stock
    preset's for the rest): the same type and bytes for every tensor."""
    from fq_core.measurement import twin
    from fq_core.measurement.llama.runner import LlamaRunner
    from fq_core.measurement.llama.tools import find_tools
    from fq_core.measurement.models import resolve_model

    source = twin.twin_for(resolve_model("smollm2-135m")).path
    text = (
        "# edited by hand\nbase: q4_k_m\n"
        + recipe_file.layer_pattern("ffn_down", range(10))
        + "=q6_k\n"
        + recipe_file.layer_pattern("attn_v", None).replace("^attn_v", "^blk\\.\\d+\\.attn_v")
        + "=q8_0  # every layer\n"
        + "^token_embd\\.weight$=q5_0\n"
    )
    (tmp_path / "recipe.txt").write_text(text)
    r = recipe_file.read(tmp_path / "recipe.txt")
    runner = LlamaRunner(find_tools(), threads=2, log_dir=tmp_path / "logs")
    stock = tmp_path / "stock.gguf"
    recipe_file.build(recipe_file.Recipe("q4_k_m", ()), source, stock, runner)
    stock_types = {t.name: t.type_name for t in read_index(stock).tensors}
    index = read_index(source)
    assert len(recipe_file.assign(r, index)) == 10 + 30 + 1
    # the preset's own types, pinned: with only three lines, llama-quantize would give
    # ffn_down 10-12 the extra bits its mixture gives the first layers (its counters skip
    # overridden tensors), so the file would not be the stock preset plus the recipe
    full_recipe = recipe_file.pinned(r, index, stock_types, "as q4_k_m stores it")
    (tmp_path / "pinned.txt").write_text(full_recipe.text())
    full = recipe_file.assign(recipe_file.read(tmp_path / "pinned.txt"), index)
    assert set(full) == {n for n, t in stock_types.items() if t != "F32"}
    built = tmp_path / "recipe.gguf"
    recipe_file.build(full_recipe, source, built, runner)
    ours = tmp_path / "fq.gguf"
    twin.make_real(source, ours, full, fsync=False)
    a, b = read_index(ours), read_index(built)
    theirs = {u.name: u for u in b.tensors}  # llama-quantize writes them in its own order
    assert sorted(theirs) == sorted(t.name for t in a.tensors)
    with open(ours, "rb") as fa, open(built, "rb") as fb:
        for t in a.tensors:
            u = theirs[t.name]
            assert (t.type_name, t.n_bytes) == (u.type_name, u.n_bytes), t.name
            fa.seek(t.offset)
            fb.seek(u.offset)
            assert fa.read(t.n_bytes) == fb.read(u.n_bytes), f"{t.name} ({t.type_name})"
    types = {t.name: t.type_name for t in b.tensors}
    assert types["blk.0.ffn_down.weight"] == "Q6_K" and types["token_embd.weight"] == "Q5_0"
    assert types["blk.29.attn_v.weight"] == "Q8_0"
    assert types["blk.29.ffn_down.weight"] == stock_types["blk.29.ffn_down.weight"]


@pytest.mark.llama
@pytest.mark.models
def test_fq_recipe_refuses_in_one_line_before_any_quantization(tmp_path, capsys):
    """An unmeetable budget (q8_0 within Q2_K's bytes), a kind the model lacks, a recipe line
    naming no tensor: one line, exit 2, nothing written and nothing quantized (the budget comes
    from llama-quantize's --dry-run plan, not a built file)."""
    from fq_core.cli import main
    from fq_core.storage import cache

    out, gguf = tmp_path / "r.txt", tmp_path / "r.gguf"
    made = cache.folder_for("recipes", "x").parent

    def entries():
        return sorted(made.glob("*/*.gguf")) if made.is_dir() else []

    before = entries()
    base = ["recipe", "smollm2-135m", "--out", str(out), "--results", str(tmp_path / "res")]
    cases = [
        (
            [*base, "--kinds", "ffn_down", "--types", "q8_0", "--base", "q2_k"],
            "the budget of 11,404,800 bytes (q2_k of these groups) cannot be met: the smallest "
            "of q8_0 take 28,200,960",
        ),
        (
            [*base, "--kinds", "ffn_norm"],
            "the model has no weight matrix of kind ffn_norm",
        ),
    ]
    (tmp_path / "bad.txt").write_text("base: q4_k_m\n^blk\\.99\\.ffn_down\\.weight$=q8_0\n")
    cases.append(
        (
            ["recipe", "smollm2-135m", "--from", str(tmp_path / "bad.txt"), "--gguf", str(gguf)],
            "recipe line 1: ^blk\\.99\\.ffn_down\\.weight$ names no tensor of",
        )
    )
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not out.exists() and not gguf.exists() and not list(tmp_path.glob(".*fq-tmp"))
    assert entries() == before and not (tmp_path / "res").exists()


def test_pinned_names_every_matrix_the_recipe_leaves_to_the_preset(index):
    """The preset's own types become lines, one per kind and type (its layers in one pattern,
    in the file's order), after the recipe's own; a matrix the preset keeps as F32 cannot be
    pinned."""
    r = recipe_file.Recipe("q4_k_m", (recipe_file.Line("^blk\\.0\\.ffn_up\\.weight$", "q8_0"),))
    stock = {
        "blk.0.ffn_up.weight": "Q4_0",
        "blk.1.ffn_up.weight": "Q4_0",
        "blk.2.ffn_up.weight": "Q5_0",
        "token_embd.weight": "Q8_0",
        "blk.0.ffn_norm.weight": "F32",  # one dimension: never a line
    }
    got = recipe_file.pinned(r, index, stock, "as q4_k_m")
    assert [(line.pattern, line.fmt) for line in got.lines] == [
        ("^blk\\.0\\.ffn_up\\.weight$", "q8_0"),
        ("^token_embd\\.weight$", "q8_0"),
        ("^blk\\.1\\.ffn_up\\.weight$", "q4_0"),
        ("^blk\\.2\\.ffn_up\\.weight$", "q5_0"),
    ]
    assert recipe_file.assign(got, index) == {
        "blk.0.ffn_up.weight": "q8_0",
        "blk.1.ffn_up.weight": "q4_0",
        "blk.2.ffn_up.weight": "q5_0",
        "token_embd.weight": "q8_0",
    }
    with pytest.raises(BadInput, match="token_embd.weight: the base preset keeps it F32"):
        recipe_file.pinned(r, index, {**stock, "token_embd.weight": "F32"}, "as q4_k_m")


def test_the_verdict_says_what_the_paired_interval_supports():
    from fq_core.experiment.stats import paired_excess

    stock = [1e-3, 2e-3, 1.5e-3, 1e-3]
    better = paired_excess([k - 5e-4 for k in stock], [stock])
    assert recipe.verdict(better) == "better by 5.0e-04 [5.0e-04, 5.0e-04]"
    assert recipe.verdict(paired_excess([k + 2e-3 for k in stock], [stock])).startswith(
        "worse by 0.0020"
    )
    mixed = paired_excess(
        [k + d for k, d in zip(stock, [1e-4, -1e-4, 2e-4, -2e-4], strict=True)], [stock]
    )
    assert recipe.verdict(mixed).startswith("no measurable difference (")
    assert recipe.verdict(paired_excess(stock, [stock]), same_file=True) == (
        "no difference: the same file (the recipe chose what the preset stores)"
    )
    assert recipe.verdict(None) == "not compared (too few chunks)"
