"""The recipe stage's report: the recipe table (per group: the type chosen, its price and the
stock preset's), both files' bytes, and each answer's comparison against the float twin with
the paired difference recipe − stock and the verdict it supports; predicted against measured.
Markdown (reports/recipe.md) and a section of the pytest-html report, from stored records."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ..figures import interval, sci
from ..measurement.recipe_file import BASE
from ..platform import atomic
from ..storage.recipe_record import RecipeRecord
from .render import render

MARKDOWN = "recipe.md"


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:,.2f} MB"


def _pct(x, err=None) -> str:
    if x is None:
        return "—"
    return f"{x:+.2f} %" + (f" ± {err:.2f}" if err is not None else "")


def anchored_prediction(rec: RecipeRecord, stock_kld: float | None) -> float | None:
    """The recipe file's KLD predicted from the stock file's measured one: minus the priced
    groups as the stock stores them, plus as chosen. Unlike the sum of the chosen cells it
    counts what the recipe leaves to the preset (None where a group has no such price)."""
    if stock_kld is None or not rec.groups:
        return None
    as_stock = []
    for g in rec.groups:
        prices = dict((f, k) for f, k, _ in g.options)
        single = g.stock_types[0] if len(g.stock_types) == 1 else None
        kld = prices.get(BASE, prices.get(single))
        if kld is None:
            return None
        as_stock.append(kld)
    return stock_kld - math.fsum(as_stock) + math.fsum(g.kld for g in rec.groups)


def view(rec: RecipeRecord) -> dict:
    """What both templates print of one record."""
    answers = []
    for a in rec.answers:
        answers.append(
            {
                "variant": a.variant,
                "engine": a.engine,
                "rows": [
                    {
                        "file": name,
                        "bytes": _mb(size),
                        "kld": interval(f.kld) if f.kld else sci(f.kld_mean),
                        "dppl": _pct(f.delta_ppl_pct, f.delta_ppl_pct_err),
                        "same_top": "—" if f.same_top_pct is None else f"{f.same_top_pct:.2f} %",
                    }
                    for name, f, size in (
                        ("recipe", a.recipe, rec.recipe_bytes),
                        (rec.base, a.stock, rec.stock_bytes),
                    )
                ],
                "floor": sci(a.floor),
                "difference": interval(a.difference),
                "verdict": a.verdict,
                "measured": a.recipe.kld_mean,
            }
        )
    intrinsic = next((a for a in rec.answers if a.variant == "intrinsic"), None)
    measured = intrinsic.recipe.kld_mean if intrinsic else None
    ratio = measured / rec.predicted_kld if measured is not None and rec.predicted_kld else None
    anchored = anchored_prediction(rec, intrinsic.stock.kld_mean if intrinsic else None)
    anchored_ratio = measured / anchored if measured is not None and anchored else None
    status = "" if rec.status == "measured" else f" ({rec.status}: {rec.error or 'unfinished'})"

    def named(fmt: str) -> str:
        return f"as {rec.base}" if fmt == BASE else fmt

    return {
        "r": rec,
        "status": status,
        "groups": [
            {
                "label": g.label,
                "pattern": g.pattern,
                "chosen": named(g.chosen),
                "kld": sci(g.kld),
                "bytes": _mb(g.bytes),
                "stock": "/".join(g.stock_types),
                "stock_bytes": _mb(g.stock_bytes),
                "options": ", ".join(f"{named(f)} {sci(k)}" for f, k, _ in g.options),
            }
            for g in rec.groups
        ],
        "answers": answers,
        "recipe_bytes": _mb(rec.recipe_bytes),
        "stock_bytes": _mb(rec.stock_bytes),
        "chosen_bytes": _mb(sum(g.bytes for g in rec.groups)),
        "budget_bytes": _mb(rec.budget_bytes),
        "predicted": sci(rec.predicted_kld),
        "per_kind": sci(rec.per_kind_kld),
        "measured": sci(measured),
        "ratio": "—" if ratio is None else f"{ratio:.2f}×",
        "anchored": sci(anchored),
        "anchored_ratio": "—" if anchored_ratio is None else f"{anchored_ratio:.2f}×",
    }


def markdown(records: Sequence[RecipeRecord]) -> str:
    return render("recipe.md.j2", recipes=[view(r) for r in records])


def html_section(records: Sequence[RecipeRecord]) -> str:
    return render("recipe.section.html.j2", recipes=[view(r) for r in records])


def write_markdown(records: Sequence[RecipeRecord], out_dir: Path) -> Path:
    """reports/recipe.md; the directory is made (pytest-html makes the --html one only after
    the terminal summary that writes this)."""
    out = atomic.check_directory(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return atomic.write_text(out / MARKDOWN, markdown(records), force=True)
