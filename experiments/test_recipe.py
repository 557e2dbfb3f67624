"""The recipe stage: a mixed-precision recipe chosen from intrinsic sweep cells, built with
llama-quantize from the float twin, and measured against the stock preset of the same twin.

One test per model of `fq_recipe_models` (default: SmolLM2, ffn_down and attn_v, 2 chunks —
CI's small recipe), gated on that model's Test 1 (`pytest -k recipe`). The record
(results/<run>/recipe/<model>/recipe.json) and reports/recipe.md hold the recipe table, both
files' bytes, both answers with intervals, the paired difference and the verdict; the test
asserts what must hold of any recipe, not its numbers.
"""

from __future__ import annotations

import pytest

from fq_core.measurement import recipe_file

pytestmark = [pytest.mark.recipe, pytest.mark.llama, pytest.mark.models]


def test_recipe(fq_recipe):
    rec = fq_recipe
    assert rec.status == "measured", rec.error
    recipe = recipe_file.parse(rec.recipe_text)
    written = [line for g in rec.groups for line in g.lines]  # base: a line per preset type
    chosen = recipe.lines[: len(written)]  # then the stock preset's types, pinned
    assert [(line.pattern, line.fmt) for line in chosen] == written
    for g in rec.groups:  # base: a line per type the preset gives the group, in that type
        if g.chosen == recipe_file.BASE:
            assert sorted({fmt for _, fmt in g.lines}) == sorted(g.stock_types)
        else:
            assert g.lines == ((g.pattern, g.chosen),)
    if rec.budget_bytes is not None:  # the budget holds for the priced groups
        assert sum(g.bytes for g in rec.groups) <= rec.budget_bytes
        assert sum(g.stock_bytes for g in rec.groups) == rec.budget_bytes
    assert rec.predicted_kld == pytest.approx(sum(g.kld for g in rec.groups))
    assert {a.variant for a in rec.answers} == {"intrinsic", "deployed"}
    for a in rec.answers:
        for f in (a.recipe, a.stock):
            assert f.kld_mean is not None and f.kld_mean >= 0 and f.chunk_klds
            assert f.delta_ppl_pct is not None and f.same_top_pct is not None
        assert a.difference is not None and a.verdict.split()[0] in ("better", "worse", "no")
        assert a.verdict.startswith("no difference: the same file") == (
            a.recipe.sha256 == a.stock.sha256
        )
        assert len(a.placebo_klds) > 0
