"""Choosing a mixed-precision recipe: a type per group of tensors (one kind in a run of layers)
that minimises the predicted KLD within a byte budget, or the bytes within a KLD target.

The prices are sweep cells of the intrinsic answer: a cell stores one group as one type in the
float twin and measures the mean KLD that costs (`Price`). The prediction of a mix is the sum of
its groups' KLDs — what the norm sweep found for single layers against their cumulative cells;
the recipe stage measures the mixed file to check it. The choice is an exact integer program
(scipy's milp: one type per group, a knapsack on bytes), not a greedy pass.

Besides llama.cpp's types a group can be priced as the base preset stores it (`BASE`): the
preset mixes types inside a kind (Q4_K_M gives some ffn_down layers Q6_K), which no single
type per group can price, so without this option a recipe at the preset's bytes could be
predicted worse than the preset itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgspec

from ..errors import BadInput
from ..measurement.recipe_file import BASE, Line, Recipe, layer_pattern


@dataclass(frozen=True)
class Group:
    """Tensors priced and typed together: one kind, in these layers (None: outside blocks)."""

    kind: str
    layers: tuple[int, ...] | None
    tensors: tuple[str, ...]

    @property
    def label(self) -> str:
        if self.layers is None:
            return self.kind
        from ..measurement.selection import format_layers

        return f"{self.kind} layers {format_layers(list(self.layers))}"

    @property
    def spec(self) -> str:
        """The group's --layers spec (a sweep cell's `layers`)."""
        from ..measurement.selection import format_layers

        return "all" if self.layers is None else format_layers(list(self.layers))

    @property
    def pattern(self) -> str:
        return layer_pattern(self.kind, self.layers)


@dataclass(frozen=True)
class Price:
    """What storing a group as a type costs: mean KLD (intrinsic) and bytes."""

    group: Group
    fmt: str  # a llama.cpp type, or BASE
    kld: float
    bytes: int
    cell: str = ""  # the sweep cell(s) that measured it
    parts: tuple[Price, ...] = ()  # BASE: one price per type the preset gives the group


@dataclass(frozen=True)
class Choice:
    chosen: tuple[Price, ...]  # one per group, in the groups' order
    budget_bytes: int | None
    kld_target: float | None

    @property
    def kld(self) -> float:
        return math.fsum(p.kld for p in self.chosen)

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.chosen)


def layer_groups(layers: Sequence[int], n_groups: int) -> list[tuple[int, ...]]:
    """`layers` cut into `n_groups` contiguous runs as even as they go (the first longer)."""
    if n_groups < 1:
        raise BadInput(f"groups must be at least 1, not {n_groups}")
    n = len(layers)
    k = min(n_groups, n)
    out, start = [], 0
    for i in range(k):
        size = n // k + (1 if i < n % k else 0)
        out.append(tuple(layers[start : start + size]))
        start += size
    return out


def groups_of(index, kinds: Iterable[str], n_groups: int) -> list[Group]:
    """Every weight of these kinds in `n_groups` runs of layers (a kind outside the blocks is
    one group); a kind the model lacks as a weight of two dimensions is refused."""
    from ..measurement.selection import split_name

    by_kind: dict[str, dict[int | None, str]] = {}
    for t in index.tensors:
        layer, kind = split_name(t.name)
        if len(t.shape) >= 2 and t.name.endswith(".weight"):
            by_kind.setdefault(kind, {})[layer] = t.name
    out = []
    for kind in kinds:
        found = by_kind.get(kind)
        if not found:
            have = ", ".join(by_kind) or "none"
            raise BadInput(f"the model has no weight matrix of kind {kind}; its kinds: {have}")
        if None in found:
            out.append(Group(kind, None, (found[None],)))
            continue
        for run in layer_groups(sorted(found), n_groups):
            out.append(Group(kind, run, tuple(found[n] for n in run)))
    return out


def choose(
    prices: Sequence[Price],
    groups: Sequence[Group],
    *,
    budget_bytes: int | None = None,
    kld_target: float | None = None,
) -> Choice:
    """One price per group: the least summed KLD within `budget_bytes`, or the fewest bytes
    within `kld_target`. A group without a price, or a budget no choice meets, is refused in
    one line before anything is built."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    if (budget_bytes is None) == (kld_target is None):
        raise ValueError("give a byte budget or a KLD target")
    options = [[p for p in prices if p.group == g] for g in groups]
    for g, opts in zip(groups, options, strict=True):
        if not opts:
            raise BadInput(f"no sweep cell prices {g.label}: sweep it before choosing")
        bad = [p for p in opts if not (math.isfinite(p.kld) and p.kld >= 0)]
        if bad:
            raise BadInput(f"{bad[0].cell or g.label}: no finite KLD to price {g.label} with")
    least_bytes = sum(min(p.bytes for p in opts) for opts in options)
    least_kld = math.fsum(min(p.kld for p in opts) for opts in options)
    if budget_bytes is not None and least_bytes > budget_bytes:
        raise BadInput(
            f"the budget of {budget_bytes:,} bytes cannot be met: the smallest priced types "
            f"of these groups take {least_bytes:,}"
        )
    if kld_target is not None and least_kld > kld_target:
        raise BadInput(
            f"the KLD target {kld_target:g} cannot be met: the best priced types of these "
            f"groups sum to {least_kld:.3g}"
        )
    flat = [p for opts in options for p in opts]
    kld = np.array([p.kld for p in flat])
    size = np.array([float(p.bytes) for p in flat])
    one_each = np.zeros((len(groups), len(flat)))
    j = 0
    for i, opts in enumerate(options):
        one_each[i, j : j + len(opts)] = 1
        j += len(opts)
    constraints = [LinearConstraint(one_each, 1, 1)]
    if budget_bytes is not None:
        cost = kld
        constraints.append(LinearConstraint(size[None, :], -np.inf, budget_bytes))
    else:
        cost = size
        constraints.append(LinearConstraint(kld[None, :], -np.inf, kld_target))
    res = milp(
        cost,
        integrality=np.ones(len(flat)),
        bounds=Bounds(0, 1),
        constraints=constraints,
    )
    if res.x is None:
        raise BadInput(f"no choice of priced types meets the constraint ({res.message})")
    picked = [p for p, x in zip(flat, res.x, strict=True) if x > 0.5]
    order = {g: i for i, g in enumerate(groups)}
    picked.sort(key=lambda p: order[p.group])
    return Choice(tuple(picked), budget_bytes, kld_target)


def recipe_of(choice: Choice, base: str, header: Sequence[str] = ()) -> Recipe:
    """The choice as a recipe file: a line per group (per type the preset gives it, for a
    group kept as the base stores it), its price as the line's comment."""
    lines = []
    for p in choice.chosen:
        for part in p.parts or (p,):
            as_base = f" (as {base})" if p.parts else ""
            lines.append(
                Line(
                    part.group.pattern,
                    part.fmt,
                    f"{part.group.label}{as_base}: predicted KLD {part.kld:.3g}, "
                    f"{part.bytes:,} bytes",
                )
            )
    return Recipe(base, tuple(lines), tuple(header))


def base_split(groups: Sequence[Group], stock: dict[str, str]) -> dict[Group, tuple]:
    """{group: ((subgroup, type), …)}: each group's tensors by the type the base preset gives
    them (`stock`: {tensor: fq's format name}), the subgroups a BASE price is summed from."""
    out = {}
    for g in groups:
        by_fmt: dict[str, list[str]] = {}
        for n in g.tensors:
            by_fmt.setdefault(stock[n], []).append(n)
        parts = []
        for fmt, names in by_fmt.items():
            if g.layers is None:
                parts.append((g, fmt))
                continue
            layers = tuple(ln for ln, n in zip(g.layers, g.tensors, strict=True) if n in names)
            parts.append((Group(g.kind, layers, tuple(names)), fmt))
        out[g] = tuple(parts)
    return out


def with_base(
    prices: Sequence[Price], groups: Sequence[Group], split: dict[Group, tuple]
) -> list[Price]:
    """The groups' own prices and, for each group in `split`, its BASE price: the sum of its
    parts' (the additivity the recipe's prediction rests on); a group whose part is unpriced
    gets none."""
    own = {(p.group, p.fmt): p for p in prices}
    out = [p for p in prices if p.group in set(groups)]
    for g, parts in split.items():
        found = [own.get((sub, fmt)) for sub, fmt in parts]
        if any(p is None for p in found):
            continue
        out.append(
            Price(
                g,
                BASE,
                math.fsum(p.kld for p in found),
                sum(p.bytes for p in found),
                " + ".join(p.cell for p in found),
                tuple(found),
            )
        )
    return out


def pricing_cells(model_id: str, index, groups: Sequence[Group], types: Sequence[str]):
    """The sweep cells (intrinsic, series "group" or "whole") that price every group in every
    type whose blocks divide its rows; and one line per (group, type) that cannot exist."""
    from ..measurement.ggml_types import unfit
    from ..measurement.selection import block_count_of
    from .sweep.plan import Cell

    blocks = block_count_of(index)
    width = max(2, len(str(max(blocks - 1, 0))))
    shapes = {t.name: tuple(t.shape) for t in index.tensors}
    cells, unfit_lines = [], []
    for g in groups:
        refused = []
        for fmt in types:
            if fmt == BASE:
                continue
            why = next((w for n in g.tensors if (w := unfit(fmt, n, shapes[n]))), None)
            if why:
                refused.append(fmt)
                continue
            cells.append(
                Cell(
                    model=model_id,
                    kind=g.kind,
                    fmt=fmt,
                    rounding="truncate",
                    variant="intrinsic",
                    series="group",  # priced for a recipe: not in the sweep's rankings
                    layers=g.spec,
                    n_layers=None if g.layers is None else len(g.layers),
                    width=width,
                )
            )
        if refused:
            row = shapes[g.tensors[0]][0]
            unfit_lines.append(f"{g.label}: {', '.join(refused)} (rows of {row} values)")
    return cells, unfit_lines


def prices_from_cells(records: Iterable, groups: Sequence[Group], model_sha256: str) -> list[Price]:
    """Prices from sweep cell records: measured, intrinsic, of this model, whose tensors are
    exactly one group's; a cell measured twice (two runs) keeps its latest."""
    by_tensors = {frozenset(g.tensors): g for g in groups}
    latest: dict[tuple[Group, str], tuple[str, Price]] = {}
    for rec in records:
        if rec.status != "measured" or rec.cell.variant != "intrinsic":
            continue
        if rec.identity.model_sha256 != model_sha256 or rec.numeric is None:
            continue
        g = by_tensors.get(frozenset(rec.numeric.tensors))
        t = rec.treatment
        if g is None or t is None or rec.numeric.bytes_format is None:
            continue
        kld = 0.0 if t.identical else t.kld_mean
        if kld is None:
            continue
        price = Price(g, rec.cell.format, float(kld), int(rec.numeric.bytes_format), rec.cell.id)
        when = rec.finished_at or ""
        key = (g, rec.cell.format)
        if key not in latest or when >= latest[key][0]:
            latest[key] = (when, price)
    return [p for _, p in latest.values()]


# --- building, proving, the stage ----------------------------------------------------------


@dataclass(frozen=True)
class RecipePlan:
    """What a recipe stage prices and how it chooses (definitions.settings: fq_recipe_*)."""

    kinds: tuple[str, ...]
    groups: int  # runs of layers per kind
    types: tuple[str, ...]
    base: str = "q4_k_m"  # the stock preset: the budget, the comparison, untouched tensors
    kld_target: float | None = None  # else: the stock preset's bytes of the priced groups
    price_chunks: int = 8  # the cap of a pricing cell, evaluated until decided
    rank_chunks: int = 4  # a pricing cell's treatment chunks (its KLD's precision)
    chunks: int | None = None  # the proof's chunks (None: the experiment's)
    variants: tuple[str, ...] = ("intrinsic", "deployed")

    @classmethod
    def from_settings(cls, values) -> RecipePlan:
        """The plan the fq_recipe_* values (definitions.settings.RECIPE, parsed) describe."""
        return cls(
            kinds=values["fq_recipe_kinds"],
            groups=values["fq_recipe_groups"],
            types=values["fq_recipe_types"],
            base=values["fq_recipe_base"],
            kld_target=values["fq_recipe_kld_target"],
            price_chunks=values["fq_recipe_price_chunks"],
            rank_chunks=values["fq_recipe_rank_chunks"],
            chunks=values["fq_recipe_chunks"],
        )


def built(recipe: Recipe, source, ctx):
    """The recipe's GGUF made from `source` (the float twin) by the pinned llama-quantize,
    cached by recipe and source (cache_dir()/recipes/<key>/); a ModelRef of it."""
    from .. import __version__
    from ..measurement import recipe_file
    from ..measurement.models import ModelRef
    from ..storage import cache, results
    from ..storage.identity import Identity

    key = Identity(
        model_sha256=source.sha256, llama_build=ctx.tools.build_id, fq_version=__version__
    ).key("recipe-file", base=recipe.base, lines=[list(t) for t in recipe.tensor_types()])
    label = recipe.base if not recipe.lines else f"{recipe.base}-mix"
    name = f"{results.safe_name(source.name)}.{label}.gguf"

    def compute(folder):
        rec = recipe_file.build(recipe, source.path, folder / name, ctx.runner, force=True)
        return {"base": recipe.base, "lines": recipe.text(), "command": rec.to_json()}

    entry = cache.verified("recipes", key, "recipe.json", compute, files=[name])
    return ModelRef(
        name=f"{source.name}.{label}", path=entry.folder / name, sha256=entry.files[name], spec=None
    )


def tensor_bytes(path) -> dict[str, tuple[str, int]]:
    """{tensor name: (type, bytes)} of a GGUF."""
    from ..measurement.gguf_index import read_index

    return {t.name: (t.type_name, t.n_bytes) for t in read_index(path).tensors}


def _answer(file, baseline, ctx, exp):
    """One file against the baseline (the float twin's logits): perplexity-only, cached by
    the file and the baseline's content."""
    from .. import __version__
    from ..measurement import evaluate
    from ..storage import cache, codec
    from ..storage.identity import Identity
    from ..storage.recipe_record import FileAnswer
    from . import stats
    from .measure import perplexity_only

    key = Identity(
        measured_sha256=file.sha256,
        base_sha256=baseline.kld_base_sha256,
        corpus_sha256=ctx.corpus.sha256,
        llama_build=ctx.tools.build_id,
        settings=exp.settings.perplexity_fields(),
        fq_version=__version__,
    ).key("recipe-answer")

    def compute(folder):
        ev = perplexity_only(ctx, file, baseline, exp.settings)
        cmp = evaluate.compare(baseline, ev)
        kld = ev.perplexity.kld
        chunks = tuple(kld.chunk_means) if kld else ()
        return FileAnswer(
            sha256=file.sha256,
            ppl=cmp.ppl,
            delta_ppl_pct=cmp.delta_ppl_pct,
            delta_ppl_pct_err=cmp.delta_ppl_pct_err,
            kld_mean=kld.mean if kld else None,
            kld=stats.mean_interval(list(chunks)),
            chunk_klds=chunks,
            same_top_pct=kld.same_top_pct if kld else None,
            llama_s=ev.perplexity.command.duration_s if ev.perplexity.command else None,
        )

    entry = cache.verified(
        "recipe-answers",
        key,
        "answer.json",
        compute,
        decode=lambda payload: codec.convert(payload, FileAnswer),
    )
    return msgspec.structs.replace(entry.value, cached=entry.hit)


def verdict(diff, *, same_file: bool = False) -> str:
    """What the interval of recipe − stock (mean KLD per chunk) supports."""
    from ..figures import sci

    if same_file:
        return "no difference: the same file (the recipe chose what the preset stores)"
    if diff is None or diff.low is None or diff.high is None:
        return "not compared (too few chunks)"
    if diff.high < 0:
        return f"better by {sci(-diff.estimate)} [{sci(-diff.high)}, {sci(-diff.low)}]"
    if diff.low > 0:
        return f"worse by {sci(diff.estimate)} [{sci(diff.low)}, {sci(diff.high)}]"
    return f"no measurable difference ({sci(diff.estimate)} [{sci(diff.low)}, {sci(diff.high)}])"


def prove(twin_ref, recipe_ref, stock_ref, ctx, exp, plan: RecipePlan):
    """Both files against the float twin by each answer, with that answer's placebos (the
    twin's ffn_norm, lowest bit flipped) and the paired difference recipe − stock."""
    from dataclasses import replace

    from ..measurement import evaluate, twin
    from ..storage.recipe_record import Answer
    from . import stats
    from .measure import ENGINE_WORDS, run_placebo

    out = []
    for variant in plan.variants:
        e = exp.for_variant(variant)
        if plan.chunks:
            e = replace(e, settings=replace(e.settings, chunks=plan.chunks, kld_chunks=plan.chunks))
        baseline = evaluate.evaluate_baseline(ctx.runner, twin_ref, ctx.corpus, e.settings)
        if variant == "intrinsic":  # the fake files: the twins of the real ones
            files = [twin.twin_for(f, e.twin_dtype) for f in (recipe_ref, stock_ref)]
        else:
            files = [recipe_ref, stock_ref]
        r, s = (_answer(f, baseline, ctx, e) for f in files)
        placebos = [
            run_placebo(twin_ref, baseline, ctx, e, "all", seed) for seed in e.placebo_seeds
        ]
        klds = tuple(p.run.kld_mean for p in placebos)
        finite = [k for k in klds if k is not None and math.isfinite(k)]
        diff = stats.paired_excess(list(r.chunk_klds), [list(s.chunk_klds)])
        out.append(
            Answer(
                variant=variant,
                engine=ENGINE_WORDS.get(e.settings.engine, e.settings.engine),
                recipe=r,
                stock=s,
                floor=max(finite) if finite else None,
                placebo_klds=klds,
                difference=diff,
                verdict=verdict(diff, same_file=r.sha256 == s.sha256),
            )
        )
    return tuple(out)


def _least_bytes(groups: Sequence[Group], types: Sequence[str], shapes, as_base) -> int:
    """The fewest bytes any choice of these types can give the groups (no measurement);
    `as_base`: {group: its bytes as the base preset stores it}, an option where BASE is."""
    from ..measurement.ggml_types import stored_bytes

    total = 0
    for g in groups:
        each = ([stored_bytes(f, shapes[n]) for n in g.tensors] for f in types if f != BASE)
        sizes = [sum(b) for b in each if None not in b]
        if BASE in types and g in as_base:
            sizes.append(as_base[g])
        if not sizes:
            raise BadInput(f"none of the types {' '.join(types)} can store {g.label}")
        total += min(sizes)
    return total


def _bytes_as(type_name: str, shape) -> int:
    """A tensor's bytes in llama.cpp's type `type_name` (as llama-quantize names it)."""
    from ..measurement.ggml_types import format_of, stored_bytes

    if type_name == "f32":
        return 4 * math.prod(shape)
    fmt = format_of(type_name)
    size = stored_bytes(fmt, shape) if fmt else None
    if size is None:
        raise BadInput(f"llama-quantize plans type {type_name}, which fq cannot size")
    return size


def _base_options(groups: Sequence[Group], in_stock, types) -> dict[Group, tuple]:
    """base_split for the groups where BASE is an option of its own: not one the preset stores
    in a single type already among `types` (the same option twice), nor one with a matrix the
    preset keeps F32 (no llama-quantize line says so)."""
    from ..measurement.ggml_types import format_of

    stock = {n: format_of(t) for n, (t, _) in in_stock.items()}
    storable = [g for g in groups if all(stock.get(n) for n in g.tensors)]
    split = base_split(storable, stock)
    return {g: ps for g, ps in split.items() if not (len(ps) == 1 and ps[0][1] in types)}


def _per_kind(prices: Sequence[Price], groups: Sequence[Group], budget, target) -> float | None:
    """The best predicted KLD with one type per kind (its groups' prices summed): what a
    coarser recipe would reach, the benefit of pricing runs of layers."""
    kinds: dict[str, list[Group]] = {}
    for g in groups:
        kinds.setdefault(g.kind, []).append(g)
    whole, merged = [], []
    for kind, gs in kinds.items():
        w = Group(kind, None, tuple(n for g in gs for n in g.tensors))
        whole.append(w)
        by_fmt: dict[str, list[Price]] = {}
        for p in prices:
            if p.group in gs:
                by_fmt.setdefault(p.fmt, []).append(p)
        for fmt, ps in by_fmt.items():
            if len(ps) == len(gs):
                merged.append(Price(w, fmt, math.fsum(p.kld for p in ps), sum(p.bytes for p in ps)))
    try:
        return choose(merged, whole, budget_bytes=budget, kld_target=target).kld
    except BadInput:
        return None


def run_recipe(
    model, model_id: str, ctx, exp, plan: RecipePlan, *, on_record=None, prove_it: bool = True
):
    """The recipe stage for one model: price every group in every type (sweep cells, cached),
    choose within the stock preset's bytes (or the KLD target), build both files from the float
    twin with llama-quantize, and prove them against the twin by both answers. Refusals (a kind
    the model lacks, an unmeetable budget) come before any quantization."""
    import time

    from ..measurement import twin
    from ..measurement.gguf_index import read_index
    from ..measurement.sequential import Rule
    from ..storage import results
    from ..storage.identity import Identity, machine_info
    from ..storage.recipe_record import RECIPE_SCHEMA, GroupChoice, RecipeRecord
    from .sweep.run import run_cell

    t0 = time.perf_counter()
    rec = RecipeRecord(
        schema=RECIPE_SCHEMA,
        run_id=ctx.run_id,
        model=model_id,
        identity=Identity(
            model_sha256=model.sha256,
            corpus_sha256=ctx.corpus.sha256,
            llama_version=ctx.tools.version,
            llama_build=ctx.tools.build_id,
            settings={
                "kinds": list(plan.kinds),
                "groups": plan.groups,
                "types": list(plan.types),
                "base": plan.base,
                "kld_target": plan.kld_target,
                "price_chunks": plan.price_chunks,
                "rank_chunks": plan.rank_chunks,
                "chunks": plan.chunks or exp.settings.chunks,
            },
        ),
        machine=machine_info(),
        base=plan.base,
        started_at=results.utc_now(),
    )
    save = on_record or (lambda r: None)
    float_twin = twin.twin_for(model, exp.twin_dtype)
    index = read_index(float_twin.path)
    groups = groups_of(index, plan.kinds, plan.groups)
    shapes = {t.name: tuple(t.shape) for t in index.tensors}
    stock_plan = ctx.runner.quantize_plan(float_twin.path, plan.base)  # --dry-run
    in_stock = {n: (t.upper(), _bytes_as(t, shapes[n])) for n, t in stock_plan.items()}
    stock_group = {g: sum(in_stock[n][1] for n in g.tensors) for g in groups}
    split = _base_options(groups, in_stock, plan.types) if BASE in plan.types else {}
    as_base = {g: stock_group[g] for g in split}
    least = _least_bytes(groups, plan.types, shapes, as_base)  # refusals before quantization
    budget = None if plan.kld_target is not None else sum(stock_group.values())
    if budget is not None and least > budget:
        raise BadInput(
            f"the budget of {budget:,} bytes ({plan.base} of these groups) cannot be met: the "
            f"smallest of {' '.join(plan.types)} take {least:,}"
        )
    words = (
        f"the bytes {plan.base} from the same twin gives these groups ({budget:,})"
        if budget is not None
        else f"a mean KLD of at most {plan.kld_target:g}, fewest bytes"
    )
    cells, unfit_lines = pricing_cells(model_id, index, groups, plan.types)
    for parts in split.values():  # the cells a BASE price sums (some the types priced already)
        for sub, fmt in parts:
            cells.extend(pricing_cells(model_id, index, [sub], [fmt])[0])
    cells = list({c.id: c for c in cells}.values())
    rule = Rule(max_chunks=plan.price_chunks, rank_chunks=min(plan.rank_chunks, plan.price_chunks))
    t1 = time.perf_counter()
    records = [run_cell(c, model, ctx, exp, rule=rule) for c in cells]
    failed = [r for r in records if r.status != "measured"]
    if failed:
        raise BadInput(f"pricing cell {failed[0].cell.id} failed: {failed[0].error}")
    prices_s = time.perf_counter() - t1
    subgroups = {sub for parts in split.values() for sub, _ in parts}
    prices = prices_from_cells(records, [*groups, *(subgroups - set(groups))], model.sha256)
    prices = with_base(prices, groups, split)
    choice = choose(prices, groups, budget_bytes=budget, kld_target=plan.kld_target)
    header = [
        f"fq recipe for {model_id} (model sha256 {model.sha256[:16]}…, float twin "
        f"{float_twin.sha256[:16]}…)",
        f"budget: {words}",
        f"predicted mean KLD {choice.kld:.3g} against the twin (the sum of the chosen cells)",
        f"build: llama-quantize --tensor-type <each line> TWIN OUT {plan.base}; the lines "
        f"after the priced groups pin what {plan.base} stores (its mixture shifts otherwise)",
    ]
    from ..measurement.recipe_file import pinned

    stock_types = {n: t for n, (t, _) in in_stock.items()}
    recipe = pinned(recipe_of(choice, plan.base, header), index, stock_types, f"as {plan.base}")
    stock = built(Recipe(plan.base, ()), float_twin, ctx)
    mixed = built(recipe, float_twin, ctx)
    in_mix = tensor_bytes(mixed.path)
    rec = msgspec.structs.replace(
        rec,
        budget=words,
        budget_bytes=budget,
        kld_target=plan.kld_target,
        recipe_text=recipe.text(),
        unfit=tuple(unfit_lines),
        groups=tuple(
            GroupChoice(
                label=p.group.label,
                pattern=p.group.pattern,
                tensors=len(p.group.tensors),
                chosen=p.fmt,
                kld=p.kld,
                bytes=p.bytes,
                stock_types=tuple(sorted({in_stock[n][0].lower() for n in p.group.tensors})),
                stock_bytes=stock_group[p.group],
                options=tuple((o.fmt, o.kld, o.bytes) for o in prices if o.group == p.group),
                lines=tuple((q.group.pattern, q.fmt) for q in p.parts or (p,)),
            )
            for p in choice.chosen
        ),
        predicted_kld=choice.kld,
        per_kind_kld=_per_kind(prices, groups, budget, plan.kld_target),
        recipe_bytes=sum(b for _, b in in_mix.values()),
        stock_bytes=sum(b for _, b in tensor_bytes(stock.path).values()),
        prices_s=prices_s,
    )
    save(rec)
    answers = prove(float_twin, mixed, stock, ctx, exp, plan) if prove_it else ()
    return msgspec.structs.replace(
        rec,
        answers=answers,
        status="measured",
        seconds=time.perf_counter() - t0,
        finished_at=results.utc_now(),
    )


__all__ = [
    "BASE",
    "Choice",
    "Group",
    "Price",
    "RecipePlan",
    "base_split",
    "built",
    "choose",
    "groups_of",
    "layer_groups",
    "prices_from_cells",
    "pricing_cells",
    "prove",
    "recipe_of",
    "run_recipe",
    "verdict",
    "with_base",
]
