"""Which tensors to fake-quantize: the `--layers` / `--tensors` grammar, resolved against a GGUF.

Grammar (documented in `fq quantize --help` and the README):

* ``--layers``: ``all``, a layer ``0``, an inclusive range ``0-2``, or a comma list of those
  (``0,4,9``, ``0-2,9``).  A comma is a *list*: ``0,2`` is layers 0 and 2, not 0..2.
* ``--tensors``: one or more patterns, each one of

  - a *kind*: the tensor name without ``blk.N.`` and ``.weight`` (``ffn_norm``,
    ``attn_norm``, ``post_ffw_norm``, ``output_norm``);
  - an exact tensor name (``blk.3.attn_q_norm.weight``, ``output_norm.weight``);
  - a shell glob on the full name when it contains ``*``, ``?`` or ``[`` (``blk.*.attn_*``);
  - a Python regex on the full name after ``re:`` (``re:blk\\.\\d+\\.(ffn|attn)_norm\\.weight``),
    matched with ``re.fullmatch``.

``--layers`` restricts tensors that live in a block (``blk.N.``).  Tensors outside the blocks
(``output_norm.weight``) have no layer: a kind or exact name selects them whatever
``--layers`` says; a glob or regex selects them only with ``--layers all``, so a wide pattern
such as ``*_norm*`` with ``--layers 0`` stays inside layer 0.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import BadSelection

log = logging.getLogger(__name__)

DEFAULT_TENSORS = ("ffn_norm",)

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
_LAYER_ITEM_RE = re.compile(r"^(\d+)(?:-(\d+))?$")


@dataclass(frozen=True)
class SelectedTensor:
    info: object  # gguf_index.TensorInfo
    layer: int | None
    kind: str


@dataclass(frozen=True)
class Selection:
    layers_spec: str
    tensors_spec: tuple[str, ...]
    layers: tuple[int, ...] | None  # None = all layers
    tensors: tuple[SelectedTensor, ...]
    block_count: int | None = None

    @property
    def n_elements(self) -> int:
        return sum(t.info.n_elements for t in self.tensors)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.info.name for t in self.tensors)

    def to_json(self) -> dict:
        return {
            "layers": self.layers_spec,
            "tensors": list(self.tensors_spec),
            "resolved_layers": "all" if self.layers is None else list(self.layers),
            "resolved_tensors": list(self.names),
            "n_tensors": len(self.tensors),
            "n_elements": self.n_elements,
        }


def split_name(name: str) -> tuple[int | None, str]:
    """(layer, kind) of a tensor name: ``blk.3.ffn_norm.weight`` -> (3, "ffn_norm")."""
    m = _BLOCK_RE.match(name)
    layer, rest = (int(m.group(1)), m.group(2)) if m else (None, name)
    kind = rest[: -len(".weight")] if rest.endswith(".weight") else rest
    return layer, kind


def parse_layers(spec: str, block_count: int) -> tuple[int, ...]:
    """Sorted, de-duplicated layer numbers of a ``--layers`` spec; checked against the model."""
    text = str(spec).strip()
    if text.lower() == "all":
        return tuple(range(block_count))
    if not text:
        raise BadSelection("--layers is empty; give 'all', a layer (0), a range (0-2) or a list")
    layers: set[int] = set()
    beyond: list[int] = []
    for item in text.split(","):
        item = item.strip().replace(" ", "")
        m = _LAYER_ITEM_RE.match(item)
        if not m:
            raise BadSelection(
                f"--layers {spec!r}: cannot read {item!r}; use 'all', 0, 0-2 or 0,4,9"
            )
        lo = _layer_number(m.group(1), spec)
        hi = _layer_number(m.group(2), spec) if m.group(2) is not None else lo
        if hi < lo:
            raise BadSelection(f"--layers {spec!r}: range {item!r} runs backwards; write {hi}-{lo}")
        if hi >= block_count:  # checked before the range is expanded: 0-100000000000 is no list
            beyond.append(max(lo, block_count))
            continue
        layers.update(range(lo, hi + 1))
    if beyond:
        raise BadSelection(
            f"--layers {spec!r}: layer {min(beyond)} is beyond the model's {block_count} blocks "
            f"(layers 0-{block_count - 1})"
        )
    return tuple(sorted(layers))


def _layer_number(digits: str, spec: str) -> int:
    if len(digits) > 18:  # no model has 10**18 blocks; int() of a huge string is slow or refused
        raise BadSelection(f"--layers {spec!r}: {digits[:12]}… is not a layer number of any model")
    return int(digits)


def _looks_like_plan_range(spec: str) -> tuple[int, int] | None:
    """`"0,2"` / `"0,9"`: the plan writes ranges this way; here they are two-layer lists."""
    parts = [p.strip() for p in str(spec).split(",")]
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        lo, hi = int(parts[0]), int(parts[1])
        if hi > lo + 1:
            return lo, hi
    return None


def _matcher(pattern: str):
    """(predicate on full name, is_wide) for one --tensors pattern."""
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as exc:
            raise BadSelection(f"--tensors {pattern!r}: not a valid regex ({exc})") from None
        return (lambda name: rx.fullmatch(name) is not None), True
    if any(c in pattern for c in "*?["):
        return (lambda name: fnmatch.fnmatchcase(name, pattern)), True
    if "." in pattern:  # exact tensor name
        return (lambda name: name == pattern), False
    return (lambda name: split_name(name)[1] == pattern), False


def block_count_of(index) -> int:
    """The header's block count, else one more than the highest layer a tensor names."""
    bc = getattr(index, "block_count", None)
    if bc is not None:
        return int(bc)
    layers = [split_name(t.name)[0] for t in index.tensors]
    return max((n for n in layers if n is not None), default=-1) + 1


def resolve(
    index,
    layers: str = "all",
    tensors: str | Sequence[str] = DEFAULT_TENSORS,
    *,
    any_type: bool = False,
) -> Selection:
    """Resolve a selection; every fault (unknown layer, no match, non-F32) is a BadSelection.
    `any_type`: tensors of every type qualify (a real file stores them anew from their values)."""
    patterns = _normalise_patterns(tensors)
    block_count = block_count_of(index)
    layers_spec = str(layers).strip()
    all_layers = layers_spec.lower() == "all"
    if all_layers:
        layer_set = None
    elif block_count <= 0:
        raise BadSelection(f"--layers {layers_spec!r}: the model has no blocks (blk.N.*)")
    else:
        layer_set = parse_layers(layers_spec, block_count)

    chosen: dict[str, SelectedTensor] = {}
    for pattern in patterns:
        match, wide = _matcher(pattern)
        hits = [t for t in index.tensors if match(t.name)]
        if not hits:
            raise BadSelection(
                f"--tensors {pattern!r} matches no tensor in {_model_name(index)}; "
                f"kinds there: {', '.join(candidate_kinds(index)) or 'none'}"
            )
        for info in hits:
            layer, kind = split_name(info.name)
            if layer is None:
                if wide and not all_layers:
                    continue
            elif layer_set is not None and layer not in layer_set:
                continue
            chosen.setdefault(info.name, SelectedTensor(info=info, layer=layer, kind=kind))

    if not chosen:
        raise BadSelection(
            f"selection is empty: --tensors {' '.join(patterns)} in --layers {layers_spec} "
            f"selects no tensor of {_model_name(index)}"
        )
    order = {t.name: i for i, t in enumerate(index.tensors)}
    selected = tuple(sorted(chosen.values(), key=lambda s: order[s.info.name]))
    for s in selected:
        if s.info.type_name != "F32" and not any_type:
            raise BadSelection(
                f"{s.info.name} is {s.info.type_name}, not F32; only F32 tensors can be "
                "fake-quantized (narrow --tensors or --layers)"
            )
    sel = Selection(
        layers_spec=layers_spec,
        tensors_spec=patterns,
        layers=layer_set,
        tensors=selected,
        block_count=block_count if block_count > 0 else None,
    )
    log.info("selected %d tensors, %d elements", len(sel.tensors), sel.n_elements)
    return sel


def _normalise_patterns(tensors: str | Iterable[str] | None) -> tuple[str, ...]:
    if tensors is None:
        return DEFAULT_TENSORS
    items = [tensors] if isinstance(tensors, str) else list(tensors)
    patterns: list[str] = []
    for item in items:
        # "ffn_norm,attn_norm" is accepted too, except inside a regex (which may hold commas).
        parts = [item] if item.startswith("re:") else item.split(",")
        patterns.extend(p.strip() for p in parts if p.strip())
    if not patterns:
        raise BadSelection("--tensors is empty; give a kind (ffn_norm), a glob or re:REGEX")
    return tuple(dict.fromkeys(patterns))


def _model_name(index) -> str:
    path = getattr(index, "path", None)
    return getattr(path, "name", None) or "the model"


def candidate_kinds(index, *, f32_only: bool = False) -> tuple[str, ...]:
    """Kinds present in the model, in file order (for error messages and `fq inspect`)."""
    kinds: dict[str, None] = {}
    for t in index.tensors:
        if f32_only and t.type_name != "F32":
            continue
        kinds.setdefault(split_name(t.name)[1], None)
    return tuple(kinds)


def format_layers(layers: Sequence[int]) -> str:
    """Compact form of a layer list: (0, 1, 2, 5) -> '0-2,5'."""
    out: list[str] = []
    items = sorted(layers)
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(out)


def describe(selection: Selection) -> str:
    """The text printed before anything is written: what will change, in plain words."""
    n = len(selection.tensors)
    lines: list[str] = []
    if selection.layers is None:
        bc = selection.block_count
        where = f"all {bc} layers" if bc else "all layers"
    else:
        k = len(selection.layers)
        where = f"{k} layer{'s' if k != 1 else ''}: {format_layers(selection.layers)}"
    kinds = ", ".join(dict.fromkeys(t.kind for t in selection.tensors))
    lines.append(
        f"selection: {n} tensor{'s' if n != 1 else ''} ({kinds}), "
        f"{selection.n_elements:,} elements, {where}"
    )
    lines.append(
        f"  --layers {selection.layers_spec}  --tensors {' '.join(selection.tensors_spec)}"
    )
    plan = _looks_like_plan_range(selection.layers_spec)
    if plan:
        lo, hi = plan
        lines.append(
            f"  note: '{selection.layers_spec}' is a LIST of two layers ({lo} and {hi}), "
            f"not the range {lo}..{hi}; for the range write --layers {lo}-{hi}"
        )
    for t in selection.tensors:
        shape = "x".join(str(d) for d in t.info.shape)
        lines.append(f"  {t.info.name:<36} {t.info.type_name:<4} [{shape}]")
    return "\n".join(lines)
