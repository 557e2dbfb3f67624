"""What a measurement depends on: one identity that is the cache key, the gate's key, the
regression's identity diff and the sweep's shard-merge check, and the machine it ran on.

Why one type: a number may be reused (a cache entry, a recorded Test 1, a shard) only when
everything it depends on is the same, and a comparison must say what was not. Four hand-made
lists of "what matters" drifted apart (a cache key once missed a field); here each use fills
the parts it depends on, `key` hashes exactly those, and `differences` names each one that
differs, marking those that do not change a number (threads, host, fq version, thresholds).
"""

from __future__ import annotations

import hashlib
import os
import platform
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from .record import StageRecord


class MachineInfo(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The machine a run measured on (stage and cell records, run manifests)."""

    hostname: str
    cpu: str
    cores: int | None
    python: str
    platform: str


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> MachineInfo:
    return MachineInfo(
        hostname=socket.gethostname(),
        cpu=cpu_name(),
        cores=os.cpu_count(),
        python=sys.version.split()[0],
        platform=platform.platform(),
    )


class Difference(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One part that differs, as printed (digests shortened)."""

    field: str
    reference: str
    now: str
    affects_numbers: bool  # False: host name, threads, thresholds, fq version, commit

    @classmethod
    def between(cls, label: str, a: Any, b: Any, *, affects_numbers: bool) -> Difference:
        sa, sb = _text(a), _text(b)
        if label.endswith("SHA-256"):
            sa, sb = (s[:12] + ("…" if len(s) > 12 else "") for s in (sa, sb))
        return cls(field=label, reference=sa, now=sb, affects_numbers=affects_numbers)

    @property
    def text(self) -> str:
        """`settings.chunks 8 → 4`: how a refusal names it in one line."""
        return f"{self.field} {self.reference} → {self.now}"


#: How a difference names each part; the order in which differences are listed.
LABELS = {
    "variant": "variant",
    "model_sha256": "model SHA-256",
    "measured_sha256": "twin SHA-256",  # the file measured: the float twin (a cell: or the model)
    "layers": "layers",
    "tensors": "tensors",
    "format": "format",
    "rounding": "rounding",
    "seed": "seed",
    "corpus_sha256": "corpus SHA-256",
    "base_sha256": "baseline logits SHA-256",
    "llama_version": "llama.cpp version",
    "llama_build_info": "llama.cpp build",
    "llama_build": "llama.cpp build SHA-256",
    "instruction_set": "llama.cpp instruction set",
    "logits": "KLD logits",
    "settings": "settings",
    "machine": "",  # its own fields: CPU, host, cores, python, platform
    "fq_version": "fq version",
    "thresholds": "thresholds",
}
_MACHINE = {
    "cpu": "CPU",
    "hostname": "host",
    "cores": "cores",
    "python": "python",
    "platform": "platform",
}
#: Settings that do not change a number: llama.cpp is bit-identical across thread counts.
UNNUMBERED_SETTINGS = frozenset({"threads"})


class Identity(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True
):
    """Everything one measurement (or verdict) depends on; unset parts are not part of it.

    `key` hashes every part that is set, so each use states what it covers by filling it:
    a baseline (model, corpus, build, settings), a treatment or placebo (plus the treated
    selection and the content of the baseline logits it is compared with), a sweep cell,
    the gate (plus the thresholds its verdict used), a stage record (plus the machine)."""

    variant: str | None = None
    model_sha256: str | None = None
    measured_sha256: str | None = None  # the file measured when it is not the model itself
    layers: str | None = None
    tensors: tuple[str, ...] | None = None  # kinds, or the resolved tensor names (a cell)
    format: str | None = None
    rounding: str | None = None
    seed: int | None = None  # a placebo's
    corpus_sha256: str | None = None
    base_sha256: str | None = None  # the baseline logits a treatment is compared with
    llama_version: str | None = None  # with the backend when not the CPU: "… [cuda; -ngl 99]"
    llama_build_info: str | None = None
    llama_build: str | None = None  # LlamaTools.build_id (its files by content), + backend
    instruction_set: str | None = None
    logits: str | None = None  # "full precision" | "llama-perplexity 16-bit"
    settings: dict[str, Any] = {}
    machine: MachineInfo | None = None  # its CPU changes numbers unless the build is fixed
    fq_version: str | None = None  # a cache entry's producer; never changes a number
    thresholds: dict[str, Any] = {}  # a verdict's limits; never change a number

    def to_json(self) -> dict:
        return msgspec.to_builtins(self)

    def key(self, what: str | None = None, *, length: int = 24, **kind: Any) -> str:
        """A stable key for anything computed from this identity; `what` and `kind` (the
        entry's schema) tell apart entries of different kinds with the same inputs."""
        parts = self.to_json()
        if what is not None:
            parts["what"] = what
        parts.update(kind)
        return cache_key(parts, length)

    def differences(self, other: Identity) -> tuple[Difference, ...]:
        """Each part that differs from `other` (self is the reference), those that change the
        numbers first, each group in `LABELS` order."""
        a, b = _flat(self), _flat(other)
        fixed = _fixed_level(self.instruction_set, other.instruction_set)
        out = []
        for name in dict.fromkeys([*a, *b]):
            x, y = a.get(name), b.get(name)
            if x == y:
                continue
            label, numbers = _describe(name, fixed)
            out.append(Difference.between(label, x, y, affects_numbers=numbers))
        return tuple(sorted(out, key=lambda d: not d.affects_numbers))

    @classmethod
    def of_record(cls, rec: StageRecord) -> Identity:
        """What produced a stage record, for `--fq-compare`."""
        return cls(
            variant=rec.variant,
            model_sha256=rec.model.sha256,
            measured_sha256=rec.twin.sha256 if rec.twin else None,
            layers=rec.layers,
            corpus_sha256=rec.corpus.sha256,
            llama_version=rec.llama.version,
            llama_build_info=rec.llama.build_info,
            llama_build=rec.llama.build_id,
            instruction_set=rec.llama.instruction_set,
            logits=_logits(rec),
            settings=msgspec.to_builtins(rec.settings),
            machine=rec.machine,
            fq_version=rec.fq_version,
            thresholds=msgspec.to_builtins(rec.thresholds),
        )


def cache_key(parts: dict[str, Any], length: int = 24) -> str:
    """The SHA-256 of the parts' canonical JSON, shortened."""
    from .results import canonical_json  # results reads records, which hold a MachineInfo

    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()[:length]


def _flat(ident: Identity) -> dict[str, Any]:
    """Parts in LABELS order; settings, machine and thresholds one entry per field (sorted)."""
    doc = msgspec.to_builtins(ident)
    flat: dict[str, Any] = {}
    for name in LABELS:
        value = doc.get(name)
        if name in ("settings", "thresholds"):
            for k in sorted(value or {}):
                flat[f"{name}.{k}"] = value[k]
        elif name == "machine":
            for k in _MACHINE:
                flat[f"machine.{k}"] = (value or {}).get(k)
        else:
            flat[name] = value
    return flat


def _describe(name: str, fixed_level: bool) -> tuple[str, bool]:
    """(label, whether the part changes the numbers)."""
    group, _, sub = name.partition(".")
    if group == "settings":
        return name, sub not in UNNUMBERED_SETTINGS
    if group == "thresholds":
        return name, False
    if group == "machine":
        # a native build's kernels follow the CPU; a fixed level (FQ_LLAMA_CPU) does not
        return _MACHINE[sub], sub == "cpu" and not fixed_level
    return LABELS[name], name != "fq_version"


def _fixed_level(a: str | None, b: str | None) -> bool:
    """Both built for one fixed instruction-set level: the CPU model does not change numbers."""
    return a is not None and a == b and not a.startswith("native")


def _text(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(_text(x) for x in v) if v else "—"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_text(x)}" for k, x in v.items())
    return "—" if v is None else str(v)


def _logits(rec: StageRecord) -> str | None:
    t = rec.treatment
    k = t.kld if t is not None else None
    if k is None:
        return None
    return "full precision" if k.exact else "llama-perplexity 16-bit"
