"""The stored result of a recipe stage: the priced groups, the choice, both files' bytes, and
each answer's comparison of the recipe file and the stock preset file against the float twin.

Layout: results/<run-id>/recipe/<model>/recipe.json (one per model, a level below the stage
records' results/<run-id>/<stage>/<model>.json; the reports read it back).
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from . import codec, results
from .identity import Identity, MachineInfo
from .record import Interval

RECIPE_SCHEMA = 1
RECIPE_DIR = "recipe"
Num = float | None


class GroupChoice(msgspec.Struct, frozen=True, kw_only=True):
    """One group of the recipe: its line, the type chosen and what the prices said."""

    label: str
    pattern: str
    tensors: int
    chosen: str
    kld: float  # the chosen type's cell
    bytes: int
    stock_types: tuple[str, ...]  # what the stock preset stores these tensors as
    stock_bytes: int
    options: tuple[tuple[str, float, int], ...]  # every priced (type, KLD, bytes)
    lines: tuple[tuple[str, str], ...] = ()  # its recipe lines (pattern, type): several for base


class FileAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """One file measured against the float twin by one answer."""

    sha256: str
    ppl: Num
    delta_ppl_pct: Num
    delta_ppl_pct_err: Num
    kld_mean: Num
    kld: Interval | None  # the mean KLD's bootstrap interval over chunks
    chunk_klds: tuple[Num, ...]
    same_top_pct: Num
    llama_s: Num = None
    cached: bool = False


class Answer(msgspec.Struct, frozen=True, kw_only=True):
    """Recipe and stock against the twin, by one answer, with its placebos' floor."""

    variant: str
    engine: str
    recipe: FileAnswer
    stock: FileAnswer
    floor: Num  # the largest placebo's mean KLD
    placebo_klds: tuple[Num, ...]
    difference: Interval | None  # recipe − stock, chunk by chunk
    verdict: str


class RecipeRecord(msgspec.Struct, kw_only=True):
    schema: int
    run_id: str
    model: str
    identity: Identity
    machine: MachineInfo | None = None
    status: str = "running"  # "measured" | "error" | "running"
    error: str | None = None
    base: str = ""
    budget: str = ""  # in words: "the bytes of q4_k_m from the same twin (…)"
    budget_bytes: int | None = None  # of the priced groups
    kld_target: Num = None
    recipe_text: str = ""
    groups: tuple[GroupChoice, ...] = ()
    unfit: tuple[str, ...] = ()  # (group, type) pairs no cell could price, one line each
    predicted_kld: Num = None  # the sum of the chosen cells
    per_kind_kld: Num = None  # the best choice with one type per kind, same budget
    recipe_bytes: int | None = None  # tensor data of the built files
    stock_bytes: int | None = None
    answers: tuple[Answer, ...] = ()
    prices_s: Num = None
    seconds: Num = None
    started_at: str = ""
    finished_at: str | None = None


def recipe_path(run_id: str, model: str, root=None) -> Path:
    return results.run_dir(run_id, root) / RECIPE_DIR / results.safe_name(model) / "recipe.json"


def recipe_paths(run_dir: Path) -> list[Path]:
    return sorted(Path(run_dir).glob(f"{RECIPE_DIR}/*/recipe.json"))


def save_recipe(rec: RecipeRecord, root=None) -> Path:
    path = recipe_path(rec.run_id, rec.model, root)
    with results.lock_for(path):
        results.write_bytes_atomic(path, codec.encode(rec, indent=2) + b"\n")
    return path


def read_recipe(path: str | Path) -> RecipeRecord:
    return codec.decode(Path(path).read_bytes(), RecipeRecord)


__all__ = [
    "RECIPE_SCHEMA",
    "Answer",
    "FileAnswer",
    "GroupChoice",
    "RecipeRecord",
    "read_recipe",
    "recipe_path",
    "recipe_paths",
    "save_recipe",
]
