"""What the experiment is doing, on the terminal, while a stage's long work runs.

A listener on fq_core.platform.progress events (the step declared by the library, the chunks the
llama.cpp runner reports) written through pytest's terminal reporter:

- a terminal (stdout a tty, CI unset): one line rewritten in place,
  `fq: Test 1 gemma3-270m · placebo 2/3 · chunk 5/8 · ETA 12 s`, which becomes a one-line
  summary of the steps when the test's result is reported;
- CI logs (stdout not a tty, or CI / BUILD_NUMBER set): one line per finished step with its
  duration, `fq: Test 1 gemma3-270m · placebo 2/3 · 14.2 s · 8 chunks, 1.63 s/pass`;
- `-q`: nothing.

With pytest-xdist the work runs in the workers, whose terminal output pytest does not show:
workers do not subscribe and the controller receives no events, so nothing is shown there.
Writes bypass pytest's output capture (as live logging does), so they reach the terminal
while a fixture runs, not the captured output of the test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from fq_core.platform import progress
from fq_core.platform.progress import Event

PLUGIN_NAME = "fq-progress-terminal"


def on_ci() -> bool:
    """pytest's own rule (CI or BUILD_NUMBER in the environment), with CI=false/0 meaning no."""
    ci = os.environ.get("CI")
    if ci is not None and ci.strip().lower() not in ("", "0", "false", "no"):
        return True
    return "BUILD_NUMBER" in os.environ


def duration(seconds: float, *, precise: bool = False) -> str:
    """'12 s' ('12.3 s' precise), '2 min 05 s', '1 h 02 min'."""
    s = max(0.0, seconds)
    if s < 59.5:
        return f"{s:.1f} s" if precise else f"{s:.0f} s"
    s = round(s)
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _where(event: Event) -> str:
    return " ".join(p for p in (event.stage, event.model) if p)


@dataclass
class _Active:
    start: Event
    started: float  # listener clock at the start
    chunks: Event | None = None  # the latest chunk event within this step


class TerminalProgress:
    """Event listener writing through a pytest TerminalReporter; see the module docstring.

    `live`: the tty mode (one line rewritten in place), else one line per finished step.
    Also a pytest plugin: before the reporter writes a test's result, the line is handed back.
    """

    def __init__(
        self,
        reporter,
        *,
        live: bool | None = None,
        capture=None,
        width: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reporter = reporter
        self._live = live
        self.capture = capture  # pytest's CaptureManager, suspended around each write
        self._fixed_width = width
        self._clock = clock
        self._lock = threading.RLock()
        self._open = False  # our text ends the terminal's current line (no newline after it)
        self._handed_back = False  # -v: released, the reporter has not started its line yet
        self._loose: Event | None = None  # live: chunks of a run outside any declared step
        self._active: list[_Active] = []  # steps running, innermost last
        self._done: list[tuple[Event, float]] = []  # live: (end event, wall s) on the line
        self._group: tuple[str | None, str | None] | None = None  # live: (stage, model)
        self._group_started = 0.0

    @property
    def live(self) -> bool:
        """The tty mode; None given = decided at the first event (stdout a tty, CI unset)."""
        if self._live is None:
            self._live = bool(self.reporter.isatty()) and not on_ci()
        return self._live

    # -- events ------------------------------------------------------------------------------
    def __call__(self, event: Event) -> None:
        with self._lock, self._uncaptured():
            if event.kind == progress.START:
                self._start(event)
            elif event.kind == progress.CHUNKS:
                if self._active:
                    self._active[-1].chunks = event
                self._loose = None if self._active else event  # a run outside declared steps
                if self.live:
                    self._render()
            elif event.kind == progress.END:
                self._end(event)

    def _start(self, event: Event) -> None:
        now = self._clock()
        self._loose = None
        if self.live and self._group != (event.stage, event.model):
            if self._open and (self._done or self._active):
                self._summarize()
                self._newline()
            self._group, self._group_started, self._done = (event.stage, event.model), now, []
        self._active.append(_Active(event, now - event.elapsed_s))
        if self.live:
            self._render()

    def _end(self, event: Event) -> None:
        self._loose = None
        entry = None
        for i in range(len(self._active) - 1, -1, -1):
            a = self._active[i].start
            if (a.stage, a.model, a.what) == (event.stage, event.model, event.what):
                entry = self._active.pop(i)
                break
        chunks = entry.chunks if entry else None
        if self.live:
            self._done.append((event, event.elapsed_s))
            self._render()
        else:
            self._line(self.step_line(event, chunks))

    # -- text --------------------------------------------------------------------------------
    @staticmethod
    def step_line(event: Event, chunks: Event | None = None) -> str:
        """CI: `fq: Test 1 gemma3-270m · baseline · 95.3 s · 8 chunks, 1.63 s/pass`."""
        parts = [f"fq: {event.label}"] if event.label else ["fq:"]
        parts += list(event.notes)
        took = duration(event.elapsed_s, precise=True)
        parts.append(took if event.ok is not False else f"failed after {took}")
        if chunks is not None and chunks.done:
            per_pass = chunks.seconds_per_pass
            n = f"{chunks.done} chunk{'s' if chunks.done != 1 else ''}"
            parts.append(n + (f", {per_pass:.2f} s/pass" if per_pass else ""))
        return " · ".join(parts)

    def live_line(self) -> str:
        """tty: `fq: Test 1 gemma3-270m · placebo 2/3 · chunk 5/8 · ETA 12 s`."""
        if self._active:
            top = self._active[-1]
            if top.chunks is not None and top.chunks.total:
                return self._chunk_text(top.chunks)
            return f"fq: {top.start.label} · {duration(self._clock() - top.started)}"
        if self._loose is not None and self._loose.total:
            return self._chunk_text(self._loose)
        if self._done:
            last, took = self._done[-1]
            how = "done in" if last.ok is not False else "failed after"
            return f"fq: {last.label} · {how} {duration(took)}"
        return "fq:"

    @staticmethod
    def _chunk_text(c: Event) -> str:
        parts = [f"fq: {c.label}" if c.label else "fq:", f"chunk {c.done}/{c.total}"]
        if c.eta_s is not None and c.total and c.done < c.total:
            parts.append(f"ETA {duration(c.eta_s)}")
        return " · ".join(parts)

    def summary_line(self) -> str:
        """tty, when the test's result comes: the steps that ran with their durations."""
        first = self._done[0][0] if self._done else self._active[0].start
        head = f"fq: {_where(first)}" if _where(first) else "fq:"
        wall = duration(self._clock() - self._group_started)
        steps = []
        for event, took in self._done:
            what = event.what or "step"
            if event.ok is False:
                steps.append(f"{what} failed")
            elif event.notes:
                steps.append(f"{what} {', '.join(event.notes)}")
            else:
                steps.append(f"{what} {duration(took)}")
        detailed = f"{head} · {', '.join(steps)} · {wall}"
        if len(detailed) < self.width:
            return detailed
        failed = sum(1 for event, _ in self._done if event.ok is False)
        n = len(self._done)
        return f"{head} · {n} step{'s' if n != 1 else ''} in {wall}" + (
            f", {failed} failed" if failed else ""
        )

    # -- writing -----------------------------------------------------------------------------
    @property
    def width(self) -> int:
        if self._fixed_width:
            return self._fixed_width
        cols = shutil.get_terminal_size(fallback=(80, 24)).columns  # as pytest's writer does
        return cols if cols >= 40 else 80

    def _uncaptured(self):
        if self.capture is None:
            return contextlib.nullcontext()
        return self.capture.global_and_fixture_disabled()

    def _render(self) -> None:
        self._rewrite(self.live_line())

    def _rewrite(self, text: str) -> None:
        w = self.width - 1
        if not self._open:
            self._begin()
        self.reporter.write("\r" + text[:w].ljust(w), flush=True)
        self._open = True

    def _summarize(self) -> None:
        if self._done or self._active:
            self._rewrite(self.summary_line())
        self._done, self._group = [], None

    def _line(self, text: str) -> None:
        if self._open:
            self.reporter.write("\n")
        else:
            self._begin()
        self.reporter.write(text, flush=True)
        self._open = True

    def _begin(self) -> None:
        """Start on a line of our own (the reporter's current line, if any, is ended)."""
        if self._handed_back and self.reporter.currentfspath is None:
            self.reporter.write("\n")  # still on our released line: the reporter wrote nothing
        else:
            self.reporter.ensure_newline()
        self._handed_back = False

    def _newline(self) -> None:
        self.reporter.write("\n", flush=True)
        self._open = False

    def release(self, nodeid: str | None = None) -> None:
        """Hand the line back to pytest: before a test's result, and at the end."""
        with self._lock, self._uncaptured():
            if (self._done or self._active) and self.live:
                self._summarize()
            if not self._open:
                return
            self._open = False
            r = self.reporter
            if nodeid and not r.showlongtestinfo and r.showfspath:
                r.write_fspath_result(nodeid, "")  # newline, then the file's path as before
            elif not nodeid or not r.showlongtestinfo:
                r.write("\n", flush=True)
            else:  # -v: the reporter starts its own line with the test id
                self._handed_back = True

    # -- pytest hooks (registered as a plugin object) ----------------------------------------
    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.release(report.nodeid)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self) -> None:
        self.release()


@pytest.hookimpl(trylast=True)  # after the terminal reporter exists
def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput") or config.get_verbosity() < 0:
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    listener = TerminalProgress(
        reporter,
        capture=config.pluginmanager.get_plugin("capturemanager"),
    )
    config.pluginmanager.register(listener, PLUGIN_NAME)
    progress.subscribe(listener)
    config.add_cleanup(lambda: progress.unsubscribe(listener))
