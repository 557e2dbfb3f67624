"""The recipe's report (fq_core.report.recipe) from a stored record: the table names a group
kept as the preset stores it, each answer gives both files and the verdict, and the markdown
is written even where its directory does not exist yet (pytest-html makes it later)."""

from __future__ import annotations

import msgspec
import pytest

from fq_core.experiment.stats import Interval
from fq_core.report import recipe as recipe_report
from fq_core.storage.identity import Identity
from fq_core.storage.recipe_record import (
    Answer,
    FileAnswer,
    GroupChoice,
    RecipeRecord,
    read_recipe,
    save_recipe,
)


def _file(sha: str, kld: float) -> FileAnswer:
    iv = Interval(estimate=kld, low=kld * 0.9, high=kld * 1.1, level=0.95, n=2, method="t")
    return FileAnswer(
        sha256=sha,
        ppl=17.0,
        delta_ppl_pct=0.5,
        delta_ppl_pct_err=0.1,
        kld_mean=kld,
        kld=iv,
        chunk_klds=(kld * 0.9, kld * 1.1),
        same_top_pct=97.0,
    )


def _record() -> RecipeRecord:
    diff = Interval(estimate=-2e-3, low=-3e-3, high=-1e-3, level=0.95, n=2, method="t")
    return RecipeRecord(
        schema=1,
        run_id="20261206T000000Z-abcdef",
        model="m",
        identity=Identity(model_sha256="a" * 64),
        status="measured",
        base="q4_k_m",
        budget="the bytes q4_k_m from the same twin gives these groups (1,000)",
        budget_bytes=1000,
        recipe_text="base: q4_k_m\n^a=q8_0\n",
        groups=(
            GroupChoice(
                label="ffn_down layers 0-2",
                pattern="^blk\\.(0|1|2)\\.ffn_down\\.weight$",
                tensors=3,
                chosen="base",
                kld=1e-6,
                bytes=600,
                stock_types=("q4_k", "q6_k"),
                stock_bytes=600,
                options=(("q4_k", 4e-3, 500), ("base", 1e-6, 600)),
                lines=(
                    ("^blk\\.(0|2)\\.ffn_down\\.weight$", "q6_k"),
                    ("^blk\\.1\\.ffn_down", "q4_k"),
                ),
            ),
            GroupChoice(
                label="attn_v",
                pattern="^blk\\.\\d+\\.attn_v\\.weight$",
                tensors=3,
                chosen="q8_0",
                kld=2e-6,
                bytes=400,
                stock_types=("q5_0",),
                stock_bytes=400,
                options=(("q5_0", 1e-3, 300), ("q8_0", 2e-6, 400)),
            ),
        ),
        predicted_kld=3e-6,
        recipe_bytes=1100,
        stock_bytes=1100,
        answers=(
            Answer(
                variant="intrinsic",
                engine="full logits",
                recipe=_file("r" * 64, 1e-3),
                stock=_file("s" * 64, 3e-3),
                floor=2e-7,
                placebo_klds=(2e-7,),
                difference=diff,
                verdict="better by 2.0e-03 [1.0e-03, 3.0e-03]",
            ),
        ),
    )


def test_the_recipe_report_names_base_groups_and_the_verdict(tmp_path):
    path = save_recipe(_record(), tmp_path / "results")
    rec = read_recipe(path)
    assert rec.groups[0].lines[1] == ("^blk\\.1\\.ffn_down", "q4_k")
    out = recipe_report.write_markdown([rec], tmp_path / "reports" / "new")
    text = out.read_text()
    assert out == tmp_path / "reports" / "new" / "recipe.md"
    assert "| ffn_down layers 0-2 | as q4_k_m | 1.0e-06 |" in text
    assert "q4_k 0.0040, as q4_k_m 1.0e-06" in text
    assert "**better by 2.0e-03 [1.0e-03, 3.0e-03]**" in text
    # from the measured stock file: 3e-3 − (1e-6 as it stores ffn_down + 1e-3 its q5_0 attn_v)
    # + the chosen 3e-6 = 2.002e-3, of which the recipe's measured 1e-3 is half
    assert recipe_report.anchored_prediction(rec, 3e-3) == pytest.approx(2.002e-3)
    assert "its KLD − the priced groups as it stores them + as chosen" in text
    assert ": 0.0020 (measured 0.50× of it)" in text
    no_price = msgspec.structs.replace(rec.groups[1], options=(("q8_0", 2e-6, 400),))
    bare = msgspec.structs.replace(rec, groups=(rec.groups[0], no_price))
    assert recipe_report.anchored_prediction(bare, 3e-3) is None
    html = recipe_report.html_section([rec])
    assert "<td>as q4_k_m</td>" in html and "better by 2.0e-03" in html
