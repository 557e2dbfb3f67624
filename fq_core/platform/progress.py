"""Progress of long work as events: which step runs (stage, model, what) and how far it is.

The library declares what it is doing and the llama.cpp runner reports chunks as they finish;
whoever shows it (the pytest plugin, a CLI) subscribes a listener. Nothing here prints.

    with progress.context(stage="Test 1", model="gemma3-270m"):
        with progress.step("placebo 2/3"):
            ...                               # the runner calls progress.chunks(5, 8, 1.63)

Steps and context live in a `contextvars.ContextVar`: each thread (and asyncio task) has its
own current step, so events carry the step of the code that emitted them. Listeners are
called synchronously in the emitting thread and must be quick and thread-safe; a listener
that raises is dropped (and logged), never allowed to break the measurement. With no listener
subscribed, `chunks` returns at once and `step` only sets and resets a context variable.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

log = logging.getLogger(__name__)

START, CHUNKS, END = "start", "chunks", "end"


@dataclass(frozen=True)
class Event:
    """One progress event; `kind` is "start" or "end" of a step, or "chunks" within it."""

    kind: str
    stage: str | None
    model: str | None
    what: str | None  # the step ("baseline", "treatment", "placebo 2/3"); None outside steps
    elapsed_s: float  # since the step started (0 outside any step)
    done: int | None = None  # "chunks": chunks finished so far
    total: int | None = None  # "chunks": chunks in this run, when known
    seconds_per_pass: float | None = None  # "chunks": llama.cpp's own time per pass
    eta_s: float | None = None  # "chunks": seconds left in this run, when known
    ok: bool | None = None  # "end": False when the step raised
    notes: tuple[str, ...] = ()  # "end": e.g. ("cached",)

    @property
    def label(self) -> str:
        """'Test 1 gemma3-270m · placebo 2/3' (the parts that are known)."""
        where = " ".join(p for p in (self.stage, self.model) if p)
        return " · ".join(p for p in (where, self.what) if p)


Listener = Callable[[Event], None]


@dataclass(frozen=True)
class _Frame:
    stage: str | None = None
    model: str | None = None
    what: str | None = None
    started: float | None = None  # _clock() at the step's start
    notes: list[str] = field(default_factory=list, compare=False)


_OUTSIDE = _Frame()  # no step, no context (never gets notes: note() needs a step)
_current: contextvars.ContextVar[_Frame | None] = contextvars.ContextVar(
    "fq_progress", default=None
)
_listeners: tuple[Listener, ...] = ()  # replaced, never mutated: emitters read it without a lock
_lock = threading.Lock()
_clock = time.monotonic  # step durations (a module attribute, so tests can fix the time)


def subscribe(listener: Listener) -> Listener:
    """Deliver every event (from any thread) to listener(event) until unsubscribed."""
    global _listeners
    with _lock:
        _listeners = (*_listeners, listener)
    return listener


def unsubscribe(listener: Listener) -> None:
    """Stop delivering to listener; unknown listeners are ignored."""
    global _listeners
    with _lock:
        if listener in _listeners:
            i = _listeners.index(listener)
            _listeners = _listeners[:i] + _listeners[i + 1 :]


def listening() -> bool:
    """Whether anyone listens: emitters may skip work (parsing output) when not."""
    return bool(_listeners)


def _emit(kind: str, frame: _Frame, now: float | None = None, **fields) -> None:
    listeners = _listeners
    if not listeners:
        return
    now = _clock() if now is None else now
    elapsed = now - frame.started if frame.started is not None else 0.0
    event = Event(kind, frame.stage, frame.model, frame.what, elapsed, **fields)
    for listener in listeners:
        try:
            listener(event)
        except Exception:
            log.warning("progress listener %r failed; unsubscribed", listener, exc_info=True)
            unsubscribe(listener)


@contextlib.contextmanager
def context(*, stage: str | None = None, model: str | None = None) -> Iterator[None]:
    """Name the stage and/or model for the steps inside (no event of its own)."""
    outer = _current.get() or _OUTSIDE
    token = _current.set(replace(outer, stage=stage or outer.stage, model=model or outer.model))
    try:
        yield
    finally:
        _current.reset(token)


@contextlib.contextmanager
def step(what: str, *, stage: str | None = None, model: str | None = None) -> Iterator[None]:
    """Declare a step: a "start" event now, an "end" event (with its duration) when it ends.

    Also a decorator (`@progress.step("baseline")`). Stage and model default to the enclosing
    `context`. Steps may nest; events carry the innermost step.
    """
    outer = _current.get() or _OUTSIDE
    frame = _Frame(stage or outer.stage, model or outer.model, what, _clock())
    token = _current.set(frame)
    _emit(START, frame, frame.started)
    ok = False
    try:
        yield
        ok = True
    finally:
        _current.reset(token)
        _emit(END, frame, ok=ok, notes=tuple(frame.notes))


def note(text: str) -> None:
    """Add a note to the current step, reported with its end (e.g. "cached")."""
    frame = _current.get()
    if frame is not None and frame.what is not None:
        frame.notes.append(text)


def chunks(
    done: int,
    total: int | None,
    seconds_per_pass: float | None = None,
    *,
    eta_s: float | None = None,
) -> None:
    """Report chunk progress of the current step's llama.cpp run (the runner calls this).

    eta_s defaults to seconds_per_pass × chunks left."""
    if not _listeners:
        return
    if eta_s is None and seconds_per_pass is not None and total is not None:
        eta_s = seconds_per_pass * max(0, total - done)
    frame = _current.get() or _OUTSIDE
    _emit(CHUNKS, frame, done=done, total=total, seconds_per_pass=seconds_per_pass, eta_s=eta_s)


def current() -> tuple[str | None, str | None, str | None]:
    """(stage, model, step) in effect here."""
    frame = _current.get() or _OUTSIDE
    return frame.stage, frame.model, frame.what
