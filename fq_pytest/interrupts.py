"""Interruptions under pytest: SIGTERM and SIGHUP end the session the way Ctrl-C does, and a
new session first clears what killed ones left behind.

Why: pytest leaves SIGTERM at its default, so the process died on the spot and no `finally`
ran: the baseline's KLD logits (up to 134 MB) and the fake-quantized GGUFs (253 MB) stayed in
the cache and under results/. A KeyboardInterrupt unwinds every `with` of fq_core.platform.atomic
(temporaries, owned files), tears the fixtures down and ends the session as interrupted; an
FqError would not do: the protocol records it as a failed step and the next test starts.
A kill -9 cannot be caught; what it leaves names its dead owner, and the next session (the
controller, before any test) removes it from the cache and the results store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path

import pytest

log = logging.getLogger("fq.interrupts")

_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: pytest ends the session as interrupted (exit status 2)."""


def _children() -> list[int]:
    """This process's children (Linux /proc; elsewhere none)."""
    me, found = os.getpid(), []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                found.append(int(entry.name))
    return found


def _raise(signum, frame) -> None:
    raise Terminated(f"terminated by {signal.Signals(signum).name}")


def _forward_then_raise(signum, frame) -> None:
    """The xdist controller passes the signal on: its workers would otherwise be killed
    outright by the teardown, leaving their scratch files to the next session."""
    for pid in _children():
        with contextlib.suppress(OSError):
            os.kill(pid, signum)
    _raise(signum, frame)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    dist = getattr(config.option, "dist", "no") != "no" and not hasattr(config, "workerinput")
    handler = _forward_then_raise if dist else _raise
    previous = {}
    for sig in _SIGNALS:
        with contextlib.suppress(ValueError, OSError):  # not the main thread
            previous[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                if signal.getsignal(sig) is handler:
                    signal.signal(sig, old)

    config.add_cleanup(restore)


def pytest_sessionstart(session: pytest.Session) -> None:
    if getattr(session.config, "workerinput", None) is not None:
        return  # the controller has cleared them before starting its workers
    from fq_core.platform import atomic
    from fq_core.platform.paths import cache_dir

    from .plugin import results_root

    removed = atomic.remove_stale_under([cache_dir(), results_root(session.config)])
    for path in removed:
        log.warning("removed %s, left by an fq process that was killed", path)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if removed and reporter is not None:
        reporter.write_line(
            f"fq: removed {len(removed)} file(s) left by killed fq processes (e.g. {removed[0]})"
        )
