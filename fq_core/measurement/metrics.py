"""Numeric effect of fake quantization: error statistics, distributions, and file comparison.

Relative error is ``|o - q| / (|o| + eps)`` with ``eps = np.finfo(np.float32).tiny``
(2**-126 ≈ 1.18e-38, the smallest normal float32).  It keeps the ratio defined where the
original is 0 while changing no relative error of a normal original by more than 2**-126 of
itself; a larger eps such as 1e-12 would understate the error of small weights (1e-10 and
below exist in real checkpoints).  Statistics use float64 so the mean of many tiny errors
does not lose precision.

Non-finite values are counted, never dropped silently.  A pair with NaN or ±Inf on either
side counts in ``n_nonfinite``; a finite original whose candidate is not (fp16 ``nearest``
turning 1e5 into +Inf, a tensor overwritten with NaN) also counts in ``n_became_nonfinite``.
Such a pair's error is +Inf (a finite value against ±Inf) or NaN (against NaN), and the
maximum errors say so: ``max_abs`` is NaN when any pair's error is NaN, else +Inf when any
is infinite.  A pair that stays the same non-finite value (NaN to NaN, +Inf to +Inf) has no
error.  The means are over the pairs where both values are finite (NaN when there is
none).  JSON has no Inf or NaN, so such a figure is written as the string "inf", "-inf" or
"nan" (fq_core.storage.codec).
"""

from __future__ import annotations

import json
import logging
import math
import mmap
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BadInput
from .gguf_index import read_index, read_tensor

log = logging.getLogger(__name__)

EPS = float(np.finfo(np.float32).tiny)
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
_BF16_MANTISSA_BITS = 7
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class ErrorStats:
    n_elements: int
    changed: int  # bitwise: -0.0 vs 0.0 and NaN payloads count
    fraction: float
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    max_ulp_bf16: float  # |o - q| in units of the last place of o's BF16 binade
    n_nonfinite: int = 0  # pairs with NaN or ±Inf on either side
    n_became_nonfinite: int = 0  # finite originals whose candidate is NaN or ±Inf

    @property
    def finite(self) -> bool:
        """No pair's error is NaN or infinite."""
        return all(math.isfinite(v) for v in (self.max_abs, self.max_rel, self.max_ulp_bf16))

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DistributionStats:
    n: int
    mean: float
    std: float
    min: float
    max: float
    percentiles: dict[int, float]
    n_nonfinite: int = 0

    def to_json(self) -> dict:
        d = asdict(self)
        d["percentiles"] = {str(k): v for k, v in self.percentiles.items()}
        return d


def _as_f32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32)).reshape(-1)


def worst(values) -> float:
    """The largest value, NaN if any is NaN (Python's max() depends on the order then)."""
    values = list(values)
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values, default=0.0)


def bf16_ulp(values: np.ndarray) -> np.ndarray:
    """Spacing of BF16 numbers in each value's binade (subnormals and 0 share 2**-133)."""
    v = np.abs(values.astype(np.float64))
    _, exp = np.frexp(v)  # v = m * 2**exp, m in [0.5, 1)
    exp = np.where(v == 0, -126, np.maximum(exp - 1, -126))  # binade exponent; 0 and
    # subnormals share the smallest normal binade's spacing
    return np.ldexp(1.0, exp - _BF16_MANTISSA_BITS)


def error_stats(orig, new) -> ErrorStats:
    """Error of `new` against `orig` (same shape, float32)."""
    o, q = _as_f32(orig), _as_f32(new)
    if o.shape != q.shape:
        raise ValueError(f"shapes differ: {o.shape} vs {q.shape}")
    n = int(o.size)
    changed = int(np.count_nonzero(o.view(np.uint32) != q.view(np.uint32)))
    o_finite, q_finite = np.isfinite(o), np.isfinite(q)
    finite = o_finite & q_finite
    n_nonfinite = int(n - np.count_nonzero(finite))
    n_became = int(np.count_nonzero(o_finite & ~q_finite))
    of, qf = o[finite].astype(np.float64), q[finite].astype(np.float64)
    if of.size:
        abs_err = np.abs(of - qf)
        rel_err = abs_err / (np.abs(of) + EPS)
        ulp_err = abs_err / bf16_ulp(of)
        max_abs, mean_abs = float(abs_err.max()), float(abs_err.mean())
        max_rel, mean_rel = float(rel_err.max()), float(rel_err.mean())
        max_ulp = float(ulp_err.max())
    else:  # no finite pair to average: NaN says so when there were pairs at all
        max_abs = max_rel = max_ulp = 0.0
        mean_abs = mean_rel = math.nan if n else 0.0
    if n_nonfinite:
        # the same non-finite value on both sides is no error; any other such pair's error is
        # |o - q|: +Inf against a finite value or the other infinity, NaN against NaN
        on, qn = o[~finite].astype(np.float64), q[~finite].astype(np.float64)
        same = (np.isnan(on) & np.isnan(qn)) | (on == qn)
        with np.errstate(invalid="ignore"):
            err = np.abs(on[~same] - qn[~same])
        if err.size:
            nonfinite_max = math.nan if np.isnan(err).any() else math.inf
            max_abs = max_rel = max_ulp = worst([max_abs, nonfinite_max])
    return ErrorStats(
        n_elements=n,
        changed=changed,
        fraction=changed / n if n else 0.0,
        max_abs=max_abs,
        mean_abs=mean_abs,
        max_rel=max_rel,
        mean_rel=mean_rel,
        max_ulp_bf16=max_ulp,
        n_nonfinite=n_nonfinite,
        n_became_nonfinite=n_became,
    )


def relative_errors(orig, new) -> np.ndarray:
    """Per-element |o - q| / (|o| + eps) over finite pairs (for histograms)."""
    o, q = _as_f32(orig), _as_f32(new)
    finite = np.isfinite(o) & np.isfinite(q)
    of, qf = o[finite].astype(np.float64), q[finite].astype(np.float64)
    return np.abs(of - qf) / (np.abs(of) + EPS)


def distribution(values) -> DistributionStats:
    """Summary of the finite values (non-finite ones are counted, not averaged)."""
    v = _as_f32(values)
    finite = v[np.isfinite(v)].astype(np.float64)
    if not finite.size:
        nan = float("nan")
        return DistributionStats(0, nan, nan, nan, nan, {p: nan for p in PERCENTILES}, int(v.size))
    pct = np.percentile(finite, PERCENTILES)
    return DistributionStats(
        n=int(finite.size),
        mean=float(finite.mean()),
        std=float(finite.std()),
        min=float(finite.min()),
        max=float(finite.max()),
        percentiles={p: float(x) for p, x in zip(PERCENTILES, pct, strict=True)},
        n_nonfinite=int(v.size - finite.size),
    )


def histogram(
    *arrays, bins: int = 50, value_range: tuple[float, float] | None = None
) -> tuple[list[float], list[list[int]]]:
    """Histograms of several arrays over shared edges (so before/after line up)."""
    finite = [a[np.isfinite(a)] for a in (_as_f32(x).astype(np.float64) for x in arrays)]
    if value_range is None:
        lo = min((float(a.min()) for a in finite if a.size), default=0.0)
        hi = max((float(a.max()) for a in finite if a.size), default=1.0)
        value_range = (lo, hi if hi > lo else lo + 1.0)
    edges = np.histogram_bin_edges(np.empty(0), bins=bins, range=value_range)
    counts = [np.histogram(a, bins=edges)[0].astype(int).tolist() for a in finite]
    return edges.tolist(), counts


# --- comparing two GGUF files -------------------------------------------------------------


@dataclass(frozen=True)
class TensorDiff:
    name: str
    layer: int | None
    type_name: str
    shape: tuple[int, ...]
    n_bytes: int
    differing_bytes: int
    expected: bool  # listed in the candidate's manifest (or F32 when there is none)
    stats: ErrorStats | None  # F32 tensors only

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["stats"] = self.stats.to_json() if self.stats else None
        return d


@dataclass(frozen=True)
class FocusTensor:
    name: str
    kind: str
    shape: tuple[int, ...]
    errors: ErrorStats
    before: DistributionStats
    after: DistributionStats

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "errors": self.errors.to_json(),
            "before": self.before.to_json(),
            "after": self.after.to_json(),
        }


@dataclass(frozen=True)
class Comparison:
    original: Path
    candidate: Path
    file_size: int
    data_start: int
    n_tensors: int
    bytes_compared: int
    header_identical: bool
    padding_identical: bool
    differing: tuple[TensorDiff, ...]
    unexpected: tuple[str, ...]  # tensor names / regions that differ but should not
    manifest: Path | None
    focus_layer: int | None
    focus: tuple[FocusTensor, ...] = field(default=())

    @property
    def identical_elsewhere(self) -> bool:
        """True when nothing outside the expected tensors differs."""
        return not self.unexpected

    @property
    def became_nonfinite(self) -> int:
        """Finite values of the original that are NaN or ±Inf in the candidate."""
        return sum(d.stats.n_became_nonfinite for d in self.differing if d.stats is not None)

    @property
    def total(self) -> ErrorStats | None:
        stats = [d.stats for d in self.differing if d.stats is not None]
        return combine(stats) if stats else None

    def to_json(self) -> dict:
        total = self.total
        return {
            "original": str(self.original),
            "candidate": str(self.candidate),
            "file_size": self.file_size,
            "data_start": self.data_start,
            "n_tensors": self.n_tensors,
            "bytes_compared": self.bytes_compared,
            "header_identical": self.header_identical,
            "padding_identical": self.padding_identical,
            "identical_elsewhere": self.identical_elsewhere,
            "unexpected": list(self.unexpected),
            "became_nonfinite": self.became_nonfinite,
            "manifest": str(self.manifest) if self.manifest else None,
            "differing": [d.to_json() for d in self.differing],
            "total": total.to_json() if total else None,
            "focus_layer": self.focus_layer,
            "focus": [f.to_json() for f in self.focus],
        }


def combine(stats: Sequence[ErrorStats]) -> ErrorStats:
    """Totals over several tensors (means weighted by their finite element counts; a NaN
    maximum anywhere makes the total's maximum NaN)."""
    n = sum(s.n_elements for s in stats)
    changed = sum(s.changed for s in stats)
    weights = [s.n_elements - s.n_nonfinite for s in stats]
    wsum = sum(weights)

    def wmean(attr: str) -> float:
        if not wsum:  # no finite pair anywhere
            return math.nan if n else 0.0
        return sum(getattr(s, attr) * w for s, w in zip(stats, weights, strict=True) if w) / wsum

    return ErrorStats(
        n_elements=n,
        changed=changed,
        fraction=changed / n if n else 0.0,
        max_abs=worst(s.max_abs for s in stats),
        mean_abs=wmean("mean_abs"),
        max_rel=worst(s.max_rel for s in stats),
        mean_rel=wmean("mean_rel"),
        max_ulp_bf16=worst(s.max_ulp_bf16 for s in stats),
        n_nonfinite=sum(s.n_nonfinite for s in stats),
        n_became_nonfinite=sum(s.n_became_nonfinite for s in stats),
    )


def _count_diff(a: memoryview, b: memoryview, start: int, stop: int) -> int:
    """Number of differing bytes in [start, stop) of two maps; memcmp first, numpy if needed."""
    diff = 0
    pos = start
    while pos < stop:
        end = min(pos + _CHUNK, stop)
        if a[pos:end] != b[pos:end]:
            x = np.frombuffer(a[pos:end], dtype=np.uint8)
            y = np.frombuffer(b[pos:end], dtype=np.uint8)
            diff += int(np.count_nonzero(x != y))
        pos = end
    return diff


def _manifest_names(candidate: Path) -> tuple[Path | None, set[str] | None]:
    path = Path(f"{candidate}.fq.json")
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text())
        return path, {t["name"] for t in data["tensors"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"{path}: unreadable fq manifest ({exc})") from None


def _layout(index) -> tuple:
    return (
        index.data_start,
        index.file_size,
        index.alignment,
        tuple((t.name, t.ggml_type, t.shape, t.offset) for t in index.tensors),
    )


def compare_files(original, candidate, focus_layer: int | None = None) -> Comparison:
    """Compare two GGUFs of one layout byte by byte; error statistics for differing F32 tensors.

    Every byte is accounted for: the header and metadata region, each tensor's data, and the
    padding between and after them.  Differences are expected only inside the tensors the
    candidate's manifest (``CANDIDATE.fq.json``) lists, or, without a manifest, inside F32
    tensors; anything else is reported in ``unexpected``.
    """
    from .selection import split_name

    original, candidate = Path(original), Path(candidate)
    a_idx, b_idx = read_index(original), read_index(candidate)
    if _layout(a_idx) != _layout(b_idx):
        raise BadInput(
            f"{candidate.name} does not share {original.name}'s header layout "
            "(tensor names, types, shapes, offsets or file size differ); "
            "compare only a file with its fake-quantized copy"
        )
    manifest, expected_names = _manifest_names(candidate)
    if focus_layer is not None:
        bc = a_idx.block_count
        if bc is not None and not 0 <= focus_layer < bc:
            raise BadInput(f"--focus-layer {focus_layer} is beyond the model's {bc} blocks")

    size = a_idx.file_size
    unexpected: list[str] = []
    differing: list[TensorDiff] = []
    focus: list[FocusTensor] = []
    with open(original, "rb") as fa, open(candidate, "rb") as fb:
        if size == 0:
            raise BadInput(f"{original}: empty file")
        with (
            mmap.mmap(fa.fileno(), 0, access=mmap.ACCESS_READ) as ma,
            mmap.mmap(fb.fileno(), 0, access=mmap.ACCESS_READ) as mb,
        ):
            va, vb = memoryview(ma), memoryview(mb)
            try:
                header_diff = _count_diff(va, vb, 0, a_idx.data_start)
                if header_diff:
                    unexpected.append(f"header/metadata ({header_diff} bytes)")
                padding_diff = 0
                pos = a_idx.data_start
                for info in sorted(a_idx.tensors, key=lambda t: t.offset):
                    if info.offset > pos:
                        padding_diff += _count_diff(va, vb, pos, info.offset)
                    n_bytes = info.n_bytes
                    end = info.offset + n_bytes
                    nd = _count_diff(va, vb, info.offset, end)
                    pos = max(pos, end)
                    layer, kind = split_name(info.name)
                    is_f32 = info.type_name == "F32"
                    in_focus = focus_layer is not None and layer == focus_layer and is_f32
                    if not nd and not in_focus:
                        continue
                    orig = read_tensor(a_idx, info) if is_f32 else None
                    new = read_tensor(b_idx, info) if is_f32 else None
                    stats = error_stats(orig, new) if is_f32 else None
                    if nd:
                        expected = (
                            info.name in expected_names if expected_names is not None else is_f32
                        )
                        if not expected:
                            unexpected.append(info.name)
                        differing.append(
                            TensorDiff(
                                info.name,
                                layer,
                                info.type_name,
                                tuple(info.shape),
                                n_bytes,
                                nd,
                                expected,
                                stats,
                            )
                        )
                    if in_focus:
                        focus.append(
                            FocusTensor(
                                info.name,
                                kind,
                                tuple(info.shape),
                                stats,
                                distribution(orig),
                                distribution(new),
                            )
                        )
                if pos < size:
                    padding_diff += _count_diff(va, vb, pos, size)
                if padding_diff:
                    unexpected.append(f"padding ({padding_diff} bytes)")
            finally:
                va.release()
                vb.release()
    return Comparison(
        original=original,
        candidate=candidate,
        file_size=size,
        data_start=a_idx.data_start,
        n_tensors=len(a_idx.tensors),
        bytes_compared=size,
        header_identical=not header_diff,
        padding_identical=not padding_diff,
        differing=tuple(differing),
        unexpected=tuple(unexpected),
        manifest=manifest,
        focus_layer=focus_layer,
        focus=tuple(focus),
    )


# --- what each format would do (fq inspect) ---------------------------------------------


@dataclass(frozen=True)
class KindSummary:
    kind: str
    type_name: str
    shapes: tuple[tuple[int, ...], ...]
    layers: tuple[int, ...]
    n_tensors: int
    n_elements: int
    would_change: dict[str, int]  # "bf16/truncate" -> elements changed

    def to_json(self) -> dict:
        d = asdict(self)
        d["shapes"] = [list(s) for s in self.shapes]
        return d


def f32_kinds(index, formats: Sequence[tuple[str, str]]) -> tuple[KindSummary, ...]:
    """F32 tensors grouped by kind, with the elements each (format, rounding) would change."""
    from ..definitions.formats import fake_quantize
    from .selection import split_name

    groups: dict[str, list] = {}
    for info in index.tensors:
        if info.type_name == "F32":
            groups.setdefault(split_name(info.name)[1], []).append(info)
    out = []
    for kind, infos in groups.items():
        counts = {f"{f}/{r}": 0 for f, r in formats}
        for info in infos:
            orig = read_tensor(index, info)
            for fmt, rounding in formats:
                try:
                    new = fake_quantize(orig, fmt, rounding, tensor_name=info.name)
                    counts[f"{fmt}/{rounding}"] += int(
                        np.count_nonzero(orig.view(np.uint32) != new.view(np.uint32))
                    )
                except BadInput:
                    counts[f"{fmt}/{rounding}"] = -1  # not representable (e.g. int8 with NaN)
        layers = tuple(sorted({n for n in (split_name(i.name)[0] for i in infos) if n is not None}))
        out.append(
            KindSummary(
                kind=kind,
                type_name="F32",
                shapes=tuple(dict.fromkeys(tuple(i.shape) for i in infos)),
                layers=layers,
                n_tensors=len(infos),
                n_elements=sum(i.n_elements for i in infos),
                would_change=counts,
            )
        )
    return tuple(out)
