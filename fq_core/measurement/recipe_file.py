"""A mixed-precision recipe as a file a person reads and edits: a llama.cpp preset for every
tensor no line names (`base: q4_k_m`), then `pattern=type` lines in `llama-quantize
--tensor-type` terms (a regular expression on tensor names; the first line whose pattern
matches a tensor decides its type, as in llama-quantize). `#` starts a comment.

    # gemma3-270m: …
    base: q4_k_m
    ^token_embd\\.weight$=q5_0          # predicted KLD 1.2e-03, 106,954,752 bytes
    ^blk\\.(0|1|2)\\.ffn_down\\.weight$=q6_k

Checked against a model before anything is quantized (`assign`): every line must name a
tensor the model has, a type llama.cpp stores, and only tensors of two or more dimensions
(llama-quantize never quantizes a norm) whose rows the type's blocks divide. Built by the
pinned llama-quantize from the float twin (`build`), published atomically.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..definitions.formats import LLAMA_PRESETS
from ..definitions.settings import RECIPE_BASE_OPTION
from ..errors import BadInput
from ..platform import atomic

if TYPE_CHECKING:
    from .gguf_index import GGUFIndex

PRESETS = LLAMA_PRESETS  # what a `base:` line may name


#: a recipe option besides the types: each tensor of a group as the base preset stores it
BASE = RECIPE_BASE_OPTION


@dataclass(frozen=True)
class Line:
    pattern: str  # a regular expression on tensor names (llama-quantize's --tensor-type)
    fmt: str  # a format llama.cpp stores (ggml_types.STORED)
    note: str = ""  # the comment after it


@dataclass(frozen=True)
class Recipe:
    base: str  # the preset for every tensor no line names
    lines: tuple[Line, ...]
    header: tuple[str, ...] = ()  # comment lines before the recipe (without "# ")

    def tensor_types(self) -> list[tuple[str, str]]:
        """(pattern, llama.cpp's type name) per line: llama-quantize's --tensor-type."""
        from .ggml_types import llama_name

        return [(line.pattern, llama_name(line.fmt)) for line in self.lines]

    def text(self) -> str:
        out = [f"# {h}".rstrip() for h in self.header]
        out.append(f"base: {self.base}")
        for line in self.lines:
            rule = f"{line.pattern}={line.fmt}"
            out.append(f"{rule:<44}  # {line.note}" if line.note else rule)
        return "\n".join(out) + "\n"


def layer_pattern(kind: str, layers: Sequence[int] | None) -> str:
    """The pattern naming one kind's weight in these layers (None: a tensor outside blocks)."""
    if layers is None:
        return f"^{re.escape(kind)}\\.weight$"
    alt = "|".join(str(n) for n in sorted(layers))
    group = alt if len(layers) == 1 else f"({alt})"
    return f"^blk\\.{group}\\.{re.escape(kind)}\\.weight$"


def pinned(recipe: Recipe, index: GGUFIndex, types: dict[str, str], note: str) -> Recipe:
    """`recipe` with a line for every matrix it leaves to the base preset, typed as `types`
    says ({tensor: type name as GGUF writes it}: the stock file's). llama-quantize's mixture
    is not a fixed map: lines that override some tensors shift which layers the preset gives
    more bits (its per-kind counters skip overridden tensors), so a recipe names every
    matrix and the preset decides none."""
    from .ggml_types import format_of
    from .selection import split_name

    named = assign(recipe, index)
    runs: dict[tuple[str, str], list[int | None]] = {}
    for t in index.tensors:
        if len(t.shape) < 2 or t.name in named or t.name not in types:
            continue
        fmt = format_of(types[t.name])
        if fmt is None:  # kept as F32 by the preset: no line can say so to llama-quantize
            raise BadInput(f"{t.name}: the base preset keeps it {types[t.name]}; name its type")
        layer, kind = split_name(t.name)
        runs.setdefault((kind, fmt), []).append(layer)
    lines = list(recipe.lines)
    for (kind, fmt), layers in runs.items():
        outside = None in layers
        lines.append(Line(layer_pattern(kind, None if outside else layers), fmt, note))
    return Recipe(recipe.base, tuple(lines), recipe.header)


def parse(text: str, source: str = "recipe") -> Recipe:
    """A recipe from its text; the first fault is a BadInput naming the line."""
    from .ggml_types import STORED, format_of

    base, lines, header = None, [], []
    for n, raw in enumerate(text.splitlines(), start=1):
        body, _, comment = raw.partition("#")
        body, comment = body.strip(), comment.strip()
        if not body:
            if comment and base is None and not lines:
                header.append(comment)
            continue
        where = f"{source} line {n}"
        if body.startswith("base:"):
            value = body.removeprefix("base:").strip().lower()
            if base is not None:
                raise BadInput(f"{where}: a second base line")
            if value not in PRESETS:
                raise BadInput(f"{where}: base {value!r} is no llama-quantize type")
            base = value
            continue
        pattern, eq, fmt = body.rpartition("=")
        fmt = fmt.strip().lower()
        if not eq or not pattern.strip():
            raise BadInput(f"{where}: {body!r} is not pattern=type")
        fmt = fmt if fmt in STORED else format_of(fmt) or fmt  # llama.cpp's f16: our fp16
        if fmt not in STORED:
            raise BadInput(f"{where}: {fmt!r} is no type llama.cpp stores")
        try:
            re.compile(pattern.strip())
        except re.error as exc:
            raise BadInput(
                f"{where}: {pattern.strip()!r} is no regular expression: {exc}"
            ) from None
        lines.append(Line(pattern.strip(), fmt, comment))
    if base is None:
        raise BadInput(f"{source}: no base line (e.g. `base: q4_k_m`)")
    return Recipe(base, tuple(lines), tuple(header))


def read(path: str | Path) -> Recipe:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"recipe not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"recipe {p} cannot be read: {exc}") from None
    return parse(text, str(p))


def write(path: str | Path, recipe: Recipe, *, force: bool = False) -> Path:
    return atomic.write_text(path, recipe.text(), force=force)


def assign(recipe: Recipe, index: GGUFIndex) -> dict[str, str]:
    """{tensor name: format} for the tensors the recipe's lines name (the first line that
    matches wins); BadInput in one line for a line naming no tensor of the model, a tensor
    llama-quantize would not quantize (fewer than two dimensions) or rows the type's blocks
    do not divide — before anything is quantized."""
    from .ggml_types import unfit

    out: dict[str, str] = {}
    name = Path(index.path).name
    for i, line in enumerate(recipe.lines, start=1):
        rx = re.compile(line.pattern)
        hits = [t for t in index.tensors if rx.search(t.name)]
        if not hits:
            raise BadInput(f"recipe line {i}: {line.pattern} names no tensor of {name}")
        for t in hits:
            if t.name in out:
                continue
            if len(t.shape) < 2:
                raise BadInput(
                    f"recipe line {i}: {line.pattern} names {t.name}, a tensor of one dimension "
                    "llama-quantize never quantizes"
                )
            why = unfit(line.fmt, t.name, tuple(t.shape))
            if why:
                raise BadInput(f"recipe line {i}: {why}")
            out[t.name] = line.fmt
    return out


def build(recipe: Recipe, source: str | Path, dst: str | Path, runner, *, force: bool = False):
    """The recipe's GGUF, written by the pinned llama-quantize from `source` (the float twin),
    published atomically; checked against `source` first. Returns llama-quantize's record."""
    from .gguf_index import read_index

    assign(recipe, read_index(source))
    with atomic.temporary_for(dst, force=force, inputs=[source]) as tmp:
        rec = runner.quantize(source, tmp, recipe.base, tensor_types=recipe.tensor_types())
    return rec


__all__ = [
    "BASE",
    "PRESETS",
    "Line",
    "Recipe",
    "assign",
    "build",
    "layer_pattern",
    "parse",
    "pinned",
    "read",
    "write",
]
