"""The go/no-go gate: later stages run only after Test 1 passed for the same model and setup.

Why a record and not just this session: `pytest -k layers0-2` on its own must not re-run Test 1
when it already passed with the very same model, corpus, llama.cpp, format, settings and
thresholds — and must refuse when any of those changed, because then the pass proves nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from ..storage.identity import Identity
from ..storage.record import StageRecord
from ..storage.results import gate_entries, lookup_gate
from . import checks


@dataclass(frozen=True)
class GateDecision:
    open: bool
    reason: str  # one line, shown as the skip reason when closed
    source: str  # "session" | "record" | "missing" | "stale" | "ignored"
    run_id: str | None = None


def failure_reason(result: StageRecord) -> str | None:
    """Why a stored Test 1 result gives no GO (checks.decide: its failing gating checks'
    own lines, or why it decides nothing), or None when it is a GO."""
    decision = checks.decide(result)
    return None if decision.go else decision.detail


def describe_changes(recorded: Mapping[str, Any], current: Identity) -> list[str]:
    """What differs between a recorded gate identity (gate.json's components) and the current
    one, e.g. `corpus SHA-256 cdcdcdcdcdcd… → 0123456789ab…`."""
    try:
        then = msgspec.convert(recorded, Identity)
    except msgspec.ValidationError as exc:
        return [f"a setup this version cannot read ({exc})"]
    return [d.text for d in then.differences(current)]


def decide(
    model: str,
    components: Identity,
    *,
    session_result: StageRecord | None = None,
    ignore: bool = False,
    root: str | os.PathLike[str] | None = None,
) -> GateDecision:
    """Open when Test 1 passed for `model` in this session, or in a recorded run with this key.

    `session_result` is this run's stored Test 1 result for the model (None when Test 1 is not
    part of this session); it takes precedence over any record.
    """
    decision = _decide(model, components, session_result, root)
    if ignore and not decision.open:
        return GateDecision(True, f"gate ignored (--fq-ignore-gate); {decision.reason}", "ignored")
    return decision


def _decide(
    model: str,
    components: Identity,
    session_result: StageRecord | None,
    root: str | os.PathLike[str] | None,
) -> GateDecision:
    prefix = f"gate: Test 1 has not passed for {model}"
    if session_result is not None:
        run_id = session_result.run_id
        reason = failure_reason(session_result)
        if reason is None:
            return GateDecision(True, f"Test 1 passed for {model} in this run", "session", run_id)
        return GateDecision(False, f"{prefix}: {reason}", "session", run_id)

    entry = lookup_gate(components, root)
    if entry is not None:
        if entry.outcome == "passed":
            return GateDecision(
                True, f"Test 1 passed for {model} in run {entry.run_id}", "record", entry.run_id
            )
        why = entry.reason or "it failed"
        return GateDecision(False, f"{prefix}: {why} (run {entry.run_id})", "record", entry.run_id)

    same_model = [
        e
        for e in gate_entries(root)
        if e.model == model or e.components.get("model_sha256") == components.model_sha256
    ]
    if same_model:
        latest = max(same_model, key=lambda e: e.recorded_at)
        changes = describe_changes(latest.components, components)
        shown = ", ".join(changes[:3]) + (
            f" and {len(changes) - 3} more" if len(changes) > 3 else ""
        )
        return GateDecision(
            False,
            f"{prefix}: its recorded Test 1 (run {latest.run_id}, {latest.outcome}) was for a "
            f"different setup: {shown}; run `pytest -k layer0`",
            "stale",
            latest.run_id,
        )
    return GateDecision(
        False, f"{prefix}: no recorded Test 1 for this setup; run `pytest -k layer0`", "missing"
    )
