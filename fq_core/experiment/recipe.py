"""Choosing a mixed-precision recipe: a type per group of tensors (one kind in a run of layers)
that minimises the predicted KLD within a byte budget, or the bytes within a KLD target.

The prices are sweep cells of the intrinsic answer: a cell stores one group as one type in the
float twin and measures the mean KLD that costs (`Price`). The prediction of a mix is the sum of
its groups' KLDs — what the norm sweep found for single layers against their cumulative cells;
the recipe stage measures the mixed file to check it. The choice is an exact integer program
(scipy's milp: one type per group, a knapsack on bytes), not a greedy pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import BadInput
from ..measurement.recipe_file import Line, Recipe, layer_pattern


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
    fmt: str
    kld: float
    bytes: int
    cell: str = ""  # the sweep cell that measured it


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
    """The choice as a recipe file: a line per group, its price as the line's comment."""
    lines = tuple(
        Line(
            p.group.pattern,
            p.fmt,
            f"{p.group.label}: predicted KLD {p.kld:.3g}, {p.bytes:,} bytes",
        )
        for p in choice.chosen
    )
    return Recipe(base, lines, tuple(header))


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
        for fmt in types:
            why = next((w for n in g.tensors if (w := unfit(fmt, n, shapes[n]))), None)
            if why:
                unfit_lines.append(why)
                continue
            cells.append(
                Cell(
                    model=model_id,
                    kind=g.kind,
                    fmt=fmt,
                    rounding="truncate",
                    variant="intrinsic",
                    series="whole" if g.layers is None else "group",
                    layers=g.spec,
                    n_layers=None if g.layers is None else len(g.layers),
                    width=width,
                )
            )
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


__all__ = [
    "Choice",
    "Group",
    "Price",
    "choose",
    "groups_of",
    "layer_groups",
    "prices_from_cells",
    "pricing_cells",
    "recipe_of",
]
