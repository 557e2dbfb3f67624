"""The plan of a sweep: which cells, named so that `pytest -k` selects them, in an order
that makes each baseline once and gives pytest-split shards contiguous runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...definitions.formats import FORMATS, LLAMA_TYPES, ROUNDINGS
from ...errors import BadInput, BadSelection
from ...measurement.selection import block_count_of, format_layers, parse_layers, split_name
from ...storage.record import VARIANTS

#: The elementwise formats a sweep can fake-quantize: every one but the control itself. "all"
#: means these; llama.cpp's types (LLAMA_TYPES) are named one by one, so "all" does not grow
#: by 13 formats.
SWEEP_FORMATS = tuple(f for f in FORMATS if f != "placebo")
#: layer = one layer alone; cumulative = the first n layers; whole = a kind outside the blocks;
#: group = a run of layers priced together for a recipe (experiment.recipe), not ranked
SERIES = ("layer", "cumulative", "whole", "group")


@dataclass(frozen=True)
class Cell:
    """One case of the sweep; `id` names every axis (`-k "gemma3-270m and ffn_norm and bf16"`)."""

    model: str  # the model's id (registry name, or a path's stem)
    kind: str
    fmt: str
    rounding: str
    variant: str
    series: str  # one of SERIES
    layers: str  # the selection's --layers spec ("3", "0-3", "all")
    layer: int | None = None  # series "layer": the layer
    n_layers: int | None = None  # layers quantized (1 for "layer"; None for "whole")
    width: int = 2  # digits of layer numbers in the id (blk03, first04)

    @property
    def format_label(self) -> str:
        return self.fmt if self.rounding == "truncate" else f"{self.fmt}-{self.rounding}"

    @property
    def where(self) -> str:
        if self.series == "layer":
            return f"blk{self.layer:0{self.width}d}"
        if self.series == "cumulative":
            return f"first{self.n_layers:0{self.width}d}"
        if self.series == "group" and self.layers == "all":  # a kind outside the blocks
            return "all"
        if self.series == "group":  # "3-5": blk03-05; "0-1,4" (a preset's mix): blk00-01_04
            runs = []
            for run in self.layers.split(","):
                first, _, last = run.partition("-")
                runs.append(
                    f"{int(first):0{self.width}d}"
                    + (f"-{int(last):0{self.width}d}" if last else "")
                )
            return "blk" + "_".join(runs)
        return ""

    @property
    def id(self) -> str:
        # never "layer": `pytest -k layer0` is the stage gate and must not select sweep cells
        parts = (self.model, self.kind, self.where, self.format_label, self.variant)
        return "-".join(p for p in parts if p)

    @property
    def group(self) -> tuple[str, str, str]:
        """Cells ranked against each other: one model, variant and format."""
        return (self.model, self.variant, self.format_label)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "model": self.model,
            "kind": self.kind,
            "format": self.fmt,
            "rounding": self.rounding,
            "variant": self.variant,
            "series": self.series,
            "layers": self.layers,
            "layer": self.layer,
            "n_layers": self.n_layers,
        }


@dataclass(frozen=True)
class Plan:
    """The axes of a sweep. `kinds` ("all",) = every F32 kind the model has."""

    name: str
    models: tuple[str, ...]
    kinds: tuple[str, ...]
    formats: tuple[tuple[str, str], ...]  # (format, rounding)
    layers: str  # --layers grammar, applied to every kind that lives in the blocks
    variants: tuple[str, ...]
    cumulative: bool = True
    chunks: int | None = None  # None: the experiment's chunks (and KLD chunks)
    until_decided: int | None = None  # intrinsic cells: evaluated until decided, this cap
    rank_chunks: int = 0  # ranked cells until decided: the treatment's fixed chunks

    def rule_for(self, cell: Cell):
        """The sweep's stopping rule for this cell's variant, or None: a fixed chunk count.
        One rule per variant (it is part of the identity every cell shares); run.run_cell
        lets a cumulative cell, which is not ranked, stop its treatment with its placebo."""
        if self.until_decided is None or cell.variant != "intrinsic":
            return None
        from ...measurement.sequential import Rule

        rank = min(self.rank_chunks, self.until_decided)
        return Rule(max_chunks=self.until_decided, rank_chunks=rank)

    def describe(self) -> str:
        fmts = " ".join(f if r == "truncate" else f"{f}/{r}" for f, r in self.formats)
        chunks = f"; {self.chunks} chunks" if self.chunks else ""
        if self.until_decided and "intrinsic" in self.variants:
            chunks += f"; intrinsic until decided (cap {self.until_decided}"
            chunks += f", ranked on {self.rank_chunks})" if self.rank_chunks else ")"
        cum = "; cumulative curve" if self.cumulative else ""
        return (
            f"{self.name}: models {' '.join(self.models)}; kinds {' '.join(self.kinds)}; "
            f"formats {fmts}; layers {self.layers}; {' + '.join(self.variants)}{chunks}{cum}"
        )


#: What the default `pytest` run (CI, `make test`) sweeps: enough to exercise the machinery.
SMOKE = Plan(
    name="smoke",
    models=("gemma3-270m",),
    kinds=("ffn_norm",),
    formats=(("bf16", "truncate"),),
    layers="0-1",
    variants=("deployed",),
    cumulative=True,
    chunks=2,
)


def parse_formats(text: str | Sequence[str], default_rounding: str = "truncate"):
    """`bf16 fp8_e4m3/nearest`, or `all` (every format but placebo) -> ((format, rounding), ...)."""
    items = text.split() if isinstance(text, str) else list(text)
    items = [p.strip() for i in items for p in i.replace(",", " ").split() if p.strip()]
    if not items:
        raise BadInput("no format given; choose from " + ", ".join(SWEEP_FORMATS) + " or all")
    out: list[tuple[str, str]] = []
    for item in items:
        if item == "all":
            out += [(f, default_rounding) for f in SWEEP_FORMATS]
            continue
        fmt, _, rounding = item.partition("/")
        rounding = rounding or default_rounding
        if fmt not in SWEEP_FORMATS + LLAMA_TYPES:
            known = ", ".join(SWEEP_FORMATS + LLAMA_TYPES)
            raise BadInput(f"unknown sweep format {fmt!r}; choose from {known}")
        if rounding not in ROUNDINGS:
            raise BadInput(
                f"unknown rounding {rounding!r} in {item!r}; one of {', '.join(ROUNDINGS)}"
            )
        out.append((fmt, rounding))
    return tuple(dict.fromkeys(out))


def parse_variants(text: str) -> tuple[str, ...]:
    words = text.replace(",", " ").split()
    if words == ["both"] or words == ["all"]:
        return VARIANTS
    bad = [w for w in words if w not in VARIANTS]
    if bad or not words:
        raise BadInput(f"variants {text!r}: choose deployed, intrinsic or both")
    return tuple(dict.fromkeys(words))


#: integer tensors (token-id tables): no number format applies, the twin keeps them as they are
INTEGER_TYPES = ("I8", "I16", "I32", "I64")


def _reachable(type_name: str, twin: bool) -> bool:
    """Whether a tensor of this type can be fake-quantized: F32 in the file itself; on the
    float twin (the intrinsic answer) every float or quantized tensor, which it holds as F32."""
    return type_name == "F32" or (twin and type_name not in INTEGER_TYPES)


def kinds_of(index, *, twin: bool = False) -> tuple[str, ...]:
    """Every kind the variant can treat (F32 tensors; with `twin`, every weight): those in the
    blocks in blk order, then the others."""
    in_blocks: dict[str, None] = {}
    outside: dict[str, None] = {}
    for t in index.tensors:
        if not _reachable(t.type_name, twin):
            continue
        layer, kind = split_name(t.name)
        (outside if layer is None else in_blocks).setdefault(kind, None)
    return tuple(in_blocks) + tuple(k for k in outside if k not in in_blocks)


def _kind_layers(index, kind: str, twin: bool) -> tuple[int, ...]:
    return tuple(
        sorted(
            {
                layer
                for t in index.tensors
                if _reachable(t.type_name, twin)
                for layer, k in [split_name(t.name)]
                if k == kind and layer is not None
            }
        )
    )


def cumulative_sizes(n: int) -> tuple[int, ...]:
    """1, 2, 4, … up to n, and n itself: the x axis of "more layers, more error"."""
    sizes, k = [], 1
    while k < n:
        sizes.append(k)
        k *= 2
    return (*sizes, n) if n else ()


def reaches_every_weight(variant: str, fmt: str) -> bool:
    """The intrinsic answer treats every weight on the twin; the deployed one a llama.cpp type
    stores in the file itself (any tensor, measure.stores_real), an elementwise format only
    fake-quantizes the file's F32 tensors."""
    return variant == "intrinsic" or fmt in LLAMA_TYPES


def cells_for(plan: Plan, model_id: str, index) -> tuple[Cell, ...]:
    """Every cell of `plan` for one model (its GGUF index gives the kinds and layers). A kind
    a variant and format cannot reach (reaches_every_weight) is refused before any cell runs."""
    blocks = block_count_of(index)
    wanted = set(parse_layers(plan.layers, blocks)) if blocks > 0 else set()
    width = max(2, len(str(max(blocks - 1, 0))))
    out: list[Cell] = []
    for variant in plan.variants:
        for fmt, rounding in plan.formats:
            every = reaches_every_weight(variant, fmt)
            available = kinds_of(index, twin=every)
            kinds = available if plan.kinds == ("all",) else plan.kinds
            missing = [k for k in kinds if k not in available]
            if missing:
                where = "tensor" if every else "F32 tensor"
                raise BadSelection(
                    f"{model_id} has no {where} of kind {', '.join(missing)}"
                    + (
                        ""
                        if every
                        else f" to fake-quantize as {fmt} (the intrinsic answer reaches every "
                        "weight on the twin; a llama.cpp type, every weight as deployed)"
                    )
                    + f"; its {variant} kinds: {', '.join(available) or 'none'}"
                )
            for kind in kinds:
                base = dict(
                    model=model_id,
                    kind=kind,
                    fmt=fmt,
                    rounding=rounding,
                    variant=variant,
                    width=width,
                )
                layers = _kind_layers(index, kind, every)
                if not layers:
                    out.append(Cell(series="whole", layers="all", **base))
                    continue
                chosen = [n for n in layers if n in wanted]
                out += [
                    Cell(series="layer", layers=str(n), layer=n, n_layers=1, **base) for n in chosen
                ]
                if plan.cumulative:
                    for n in cumulative_sizes(len(chosen)):
                        if n == 1:  # the first layer's own cell is that point of the curve
                            continue
                        first = chosen[:n]
                        spec = "all" if first == list(range(blocks)) else format_layers(first)
                        out.append(Cell(series="cumulative", layers=spec, n_layers=n, **base))
    return tuple(out)


def refusal(cell: Cell, index) -> str | None:
    """Why this cell cannot be made, in one line (a llama.cpp type whose block does not divide
    a selected tensor's rows), or None. Checked at collection: such a cell is skipped with this
    reason, before any cell runs."""
    if cell.fmt not in LLAMA_TYPES:
        return None
    from ...measurement.ggml_types import unfit

    wanted = (
        None if cell.series == "whole" else set(parse_layers(cell.layers, block_count_of(index)))
    )
    for t in index.tensors:
        layer, kind = split_name(t.name)
        if kind == cell.kind and (wanted is None or layer in wanted):
            why = unfit(cell.fmt, t.name, tuple(t.shape))
            if why:
                return why
    return None


def sort_key(cell: Cell) -> tuple:
    """Model, variant, format, kind, then layers in order, cumulative after single layers:
    the baseline is made once, first, and shards of pytest-split get contiguous runs."""
    return (
        cell.model,
        VARIANTS.index(cell.variant) if cell.variant in VARIANTS else 9,
        cell.format_label,
        cell.kind,
        SERIES.index(cell.series),
        cell.layer or 0,
        cell.n_layers or 0,
    )
