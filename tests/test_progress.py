"""Progress of long work: parsing llama-perplexity's progress, the event API, the terminal.

Fast tier except the last test (a real llama-perplexity run, marked llama + models).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from fq_core.measurement.llama import parse
from fq_core.measurement.llama.runner import _chunk_watch, run_logged
from fq_core.platform import progress
from fq_pytest.progress import TerminalProgress, duration, on_ci

pytest_plugins = ("pytester",)

DATA = Path(__file__).parent / "data" / "llama_output"


def read(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


@pytest.fixture
def events(monkeypatch) -> list[progress.Event]:
    """A private listener list (the session's own terminal listener does not see these)."""
    monkeypatch.setattr(progress, "_listeners", ())
    got: list[progress.Event] = []
    progress.subscribe(got.append)
    return got


# -- parsing llama-perplexity's progress --------------------------------------------------------


def test_progress_of_a_finished_perplexity_run():
    p = parse.parse_progress(read("perplexity_smollm2.stdout"), read("perplexity_smollm2.stderr"))
    assert (p.done, p.total, p.seconds_per_pass, p.n_seq) == (2, 2, 2.30, 1)
    assert p.eta_s() == 0


def test_progress_of_a_finished_kld_run():
    """KLD: chunks are table rows; the statistics blocks after them are not counted."""
    p = parse.parse_progress(read("kld_smollm2.stdout"), read("kld_smollm2.stderr"))
    assert (p.done, p.total, p.seconds_per_pass) == (2, 2, 2.00)


def test_progress_while_running_from_partial_output():
    err = read("perplexity_smollm2.stderr")
    before_first_pass = err[: err.index("0.03.444.425")]  # "calculating … over 2 chunks" seen
    p = parse.parse_progress("", before_first_pass)
    assert (p.done, p.total, p.seconds_per_pass) == (0, 2, None)
    assert p.eta_s() is None  # no per-pass time before the first pass
    after_first = err[: err.index("Final estimate")]  # "… seconds per pass - ETA " (no newline)
    p = parse.parse_progress("0.07 minutes\n[1]12.6138,", after_first)
    assert (p.done, p.total, p.seconds_per_pass) == (1, 2, 2.30)
    assert p.eta_s() == pytest.approx(2.30)
    # the runner reads tails: a cut first line does not matter
    p = parse.parse_progress("[1]12.6138,", after_first[-200:])
    assert (p.done, p.total) == (1, 2)


def test_progress_of_a_partial_kld_table():
    out = read("kld_smollm2.stdout")
    first_row = out[: out.index("   2 ")]
    err = read("kld_smollm2.stderr")
    assert parse.parse_progress(first_row, err).done == 1
    assert parse.parse_progress(first_row[: first_row.index("   1 ")], err).done == 0


def test_progress_eta_counts_passes_of_n_seq_chunks():
    err = "perplexity: calculating perplexity over 8 chunks, n_ctx=512, batch_size=1024, n_seq=2\n"
    err += "perplexity: 3.00 seconds per pass - ETA "
    p = parse.parse_progress("1 hours 2.50 minutes\n[1]17.0123,[2]18.5,", err)
    assert (p.done, p.total, p.n_seq) == (2, 8, 2)
    assert p.eta_s() == pytest.approx(9.0)  # 6 chunks left = 3 passes of 2


def test_no_progress_before_the_chunks_or_from_other_tools():
    assert parse.parse_progress("", "0.02.135.813 I perplexity: tokenizing the input ..\n") is None
    assert (
        parse.parse_progress(read("completion_smollm2.stdout"), read("completion_smollm2.stderr"))
        is None
    )


# -- the event API ------------------------------------------------------------------------------


def test_steps_and_chunks_arrive_with_stage_model_and_step(events):
    with progress.context(stage="Test 1", model="gemma3-270m"):
        with progress.step("placebo 2/3"):
            assert progress.current() == ("Test 1", "gemma3-270m", "placebo 2/3")
            progress.chunks(5, 8, 1.5)
            progress.note("cached")
    assert [e.kind for e in events] == ["start", "chunks", "end"]
    start, chunk, end = events
    assert start.label == chunk.label == end.label == "Test 1 gemma3-270m · placebo 2/3"
    assert (chunk.done, chunk.total, chunk.seconds_per_pass) == (5, 8, 1.5)
    assert chunk.eta_s == pytest.approx(4.5)  # default: per pass × chunks left
    assert end.ok is True and end.notes == ("cached",) and end.elapsed_s >= 0
    assert progress.current() == (None, None, None)


def test_a_failed_step_ends_with_ok_false_and_the_error_passes_through(events):
    with pytest.raises(RuntimeError), progress.step("treatment", model="m"):
        raise RuntimeError("llama.cpp failed")
    assert events[-1].kind == "end" and events[-1].ok is False
    assert events[-1].label == "m · treatment"


def test_step_as_decorator_and_nesting(events):
    @progress.step("baseline")
    def evaluate():
        progress.chunks(1, 2, None, eta_s=7.0)
        return 42

    with progress.step("outer", stage="Test 2"):
        assert evaluate() == 42
        assert progress.current() == ("Test 2", None, "outer")
    whats = [(e.kind, e.what, e.stage) for e in events]
    assert whats == [
        ("start", "outer", "Test 2"),
        ("start", "baseline", "Test 2"),
        ("chunks", "baseline", "Test 2"),
        ("end", "baseline", "Test 2"),
        ("end", "outer", "Test 2"),
    ]
    assert events[2].eta_s == 7.0


def test_unsubscribe_and_no_listener(events, monkeypatch):
    assert progress.listening()
    progress.unsubscribe(events.append)
    progress.unsubscribe(events.append)  # unknown: ignored
    assert not progress.listening()
    with progress.step("nobody listens"):
        progress.chunks(1, 2, 1.0)
    assert events == []


def test_a_failing_listener_is_dropped_not_raised(events, caplog):
    def broken(event):
        raise ValueError("terminal gone")

    progress.subscribe(broken)
    with progress.step("baseline"):
        progress.chunks(1, 2)
    assert len(events) == 3  # the other listener got everything
    assert "unsubscribed" in caplog.text
    assert broken not in progress._listeners


def test_each_thread_has_its_own_step(events):
    seen = {}

    def other():
        progress.chunks(1, 4)
        seen["other"] = progress.current()

    with progress.step("main step"):
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen["other"] == (None, None, None)
    (chunk,) = [e for e in events if e.kind == "chunks"]
    assert chunk.what is None


# -- the runner's side --------------------------------------------------------------------------


def test_chunk_watch_turns_llama_output_into_chunk_events(events):
    watch = _chunk_watch()
    err = read("perplexity_smollm2.stderr")
    watch("", "0.00.302.592 I perplexity: tokenizing the input ..\n")  # nothing yet
    watch("0.07 minutes\n[1]12.6138,", err[: err.index("Final estimate")])
    assert [(e.done, e.total, e.seconds_per_pass) for e in events] == [(1, 2, 2.30)]
    assert 0 <= events[0].eta_s <= 2.30
    watch(read("perplexity_smollm2.stdout"), err, final=True)  # after the run: all done
    assert (events[-1].done, events[-1].total, events[-1].eta_s) == (2, 2, 0.0)


def test_chunk_watch_never_raises_into_the_run(events, monkeypatch, caplog):
    def broken(stdout, stderr):
        raise ValueError("unexpected llama.cpp output")

    monkeypatch.setattr(parse, "parse_progress", broken)
    _chunk_watch()("[1]12.6,", "")  # a raise here would kill llama-perplexity (run_logged)
    assert events == [] and "cannot report" in caplog.text


def test_run_logged_watch_sees_both_streams_as_they_grow(tmp_path):
    script = (
        "echo 'perplexity: calculating perplexity over 3 chunks, n_ctx=512, batch_size=512,"
        " n_seq=1' >&2; sleep 0.4; printf 'perplexity: 0.40 seconds per pass - ETA ' >&2;"
        " printf '0.02 minutes\\n[1]5.0,'; sleep 0.4; printf '[2]6.0,'; sleep 0.4;"
        " printf '[3]7.0,\\n'"
    )
    seen = []
    rec = run_logged(
        ["sh", "-c", script],
        tool="sh",
        timeout_s=30,
        log_dir=tmp_path,
        heartbeat_s=0.1,
        watch=lambda out, err: seen.append(parse.parse_progress(out, err)),
    )
    assert rec.ok
    got = [(p.done, p.total) for p in seen if p is not None]
    assert (0, 3) in got and (2, 3) in got
    assert got == sorted(got)
    assert rec.stdout() == "0.02 minutes\n[1]5.0,[2]6.0,[3]7.0,\n"  # output untouched


# -- the terminal listener ----------------------------------------------------------------------


class FakeReporter:
    """The part of pytest's TerminalReporter the listener uses, recording what reaches the
    screen (a carriage return starts the line over)."""

    def __init__(self, verbosity: int = 0):
        self.chunks: list[str] = []
        self.currentfspath: str | None = "experiments/test_stages.py"
        self.chunks.append("experiments/test_stages.py ")
        self.showlongtestinfo = verbosity > 0
        self.showfspath = verbosity >= 0

    def write(self, text: str, *, flush: bool = False, **markup) -> None:
        self.chunks.append(text)

    def ensure_newline(self) -> None:
        if self.currentfspath:
            self.chunks.append("\n")
            self.currentfspath = None

    def write_fspath_result(self, nodeid: str, res: str, **markup) -> None:
        path = nodeid.split("::")[0]
        if self.currentfspath != path:
            self.chunks.append("\n" + path + " ")
            self.currentfspath = path
        self.chunks.append(res)

    @property
    def raw(self) -> str:
        return "".join(self.chunks)

    @property
    def screen(self) -> list[str]:
        return [line.rsplit("\r", 1)[-1].rstrip() for line in self.raw.split("\n")]


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _run_steps(listener, clock, monkeypatch):
    monkeypatch.setattr(progress, "_listeners", ())
    monkeypatch.setattr(progress, "_clock", clock)
    progress.subscribe(listener)
    with progress.context(stage="Test 1", model="gemma3-270m"):
        with progress.step("baseline"):
            progress.note("cached")
        with progress.step("placebo 2/3"):
            clock.now += 8.0
            progress.chunks(0, 8)
            clock.now += 1.6
            progress.chunks(5, 8, 4.0)
            clock.now += 4.0
            progress.chunks(8, 8, 4.0, eta_s=0.0)
        with pytest.raises(RuntimeError), progress.step("treatment"):
            raise RuntimeError


def test_tty_one_line_rewritten_in_place_then_a_summary(monkeypatch):
    rep, clock = FakeReporter(), Clock()
    listener = TerminalProgress(rep, live=True, width=120, clock=clock)
    shown = []
    monkeypatch.setattr(listener, "_rewrite", _spy(listener._rewrite, shown))
    _run_steps(listener, clock, monkeypatch)
    assert "fq: Test 1 gemma3-270m · placebo 2/3 · 0 s" in shown
    assert "fq: Test 1 gemma3-270m · placebo 2/3 · chunk 0/8" in shown
    assert "fq: Test 1 gemma3-270m · placebo 2/3 · chunk 5/8 · ETA 12 s" in shown
    assert "fq: Test 1 gemma3-270m · placebo 2/3 · chunk 8/8" in shown
    # all of it on one screen line: no newline while the work runs
    assert rep.screen[:1] == ["experiments/test_stages.py"] and len(rep.screen) == 2
    assert all(len(chunk) <= 120 for chunk in rep.chunks)
    listener.release("experiments/test_stages.py::test_quantize[layer0-gemma3-270m]")
    assert rep.screen == [
        "experiments/test_stages.py",
        "fq: Test 1 gemma3-270m · baseline cached, placebo 2/3 14 s, treatment failed · 14 s",
        "experiments/test_stages.py",  # the reporter goes on writing its dots after this
    ]
    listener.release("experiments/test_stages.py::test_numeric[layer0-gemma3-270m]")
    assert len(rep.screen) == 3  # nothing more to hand back


def _spy(fn, seen):
    def inner(text):
        seen.append(text)
        return fn(text)

    return inner


def test_tty_summary_shortens_to_fit_the_width(monkeypatch):
    rep, clock = FakeReporter(verbosity=1), Clock()
    listener = TerminalProgress(rep, live=True, width=60, clock=clock)
    _run_steps(listener, clock, monkeypatch)
    listener.release("experiments/test_stages.py::test_quantize[layer0-gemma3-270m]")
    assert rep.screen[1] == "fq: Test 1 gemma3-270m · 3 steps in 14 s, 1 failed"
    assert len(rep.screen) == 2  # -v: the reporter starts its own line with the test id


def test_tty_shows_chunks_of_a_run_outside_declared_steps(monkeypatch):
    rep, clock = FakeReporter(), Clock()
    listener = TerminalProgress(rep, live=True, width=100, clock=clock)
    monkeypatch.setattr(progress, "_listeners", (listener,))
    with progress.context(stage="Test 1", model="gemma3-270m"):
        with progress.step("treatment"):
            pass
        progress.chunks(3, 8, 2.0)  # e.g. a placebo's llama-perplexity, no step declared
    assert rep.screen[-1] == "fq: Test 1 gemma3-270m · chunk 3/8 · ETA 10 s"


def test_ci_one_line_per_finished_step(monkeypatch):
    rep, clock = FakeReporter(), Clock()
    listener = TerminalProgress(rep, live=False, clock=clock)
    _run_steps(listener, clock, monkeypatch)
    assert "\r" not in rep.raw
    assert rep.screen == [
        "experiments/test_stages.py",
        "fq: Test 1 gemma3-270m · baseline · cached · 0.0 s",
        "fq: Test 1 gemma3-270m · placebo 2/3 · 13.6 s · 8 chunks, 4.00 s/pass",
        "fq: Test 1 gemma3-270m · treatment · failed after 0.0 s",
    ]
    listener.release(None)  # session end
    assert rep.raw.endswith("failed after 0.0 s\n")


def test_durations():
    assert [duration(s) for s in (0.2, 12.4, 59.4, 59.6, 125, 3725)] == [
        "0 s",
        "12 s",
        "59 s",
        "1 min 00 s",
        "2 min 05 s",
        "1 h 02 min",
    ]
    assert duration(3.14159, precise=True) == "3.1 s"


@pytest.mark.parametrize(
    ("env", "ci"),
    [({}, False), ({"CI": "true"}, True), ({"CI": "false"}, False), ({"BUILD_NUMBER": "7"}, True)],
)
def test_on_ci(monkeypatch, env, ci):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("BUILD_NUMBER", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert on_ci() is ci


# -- the plugin in a real pytest session --------------------------------------------------------

INNER = """
import pytest
from fq_core.platform import progress

@pytest.fixture(scope="module")
def result():
    with progress.context(stage="Test 1", model="smollm2-135m"):
        with progress.step("baseline"):
            progress.chunks(2, 2, 0.5)
        with progress.step("treatment"):
            pass
    return 1

def test_a(result):
    assert result

def test_b(result):
    assert result
"""


#: The progress plugin alone: the installed wiring (entry point `fq_pytest`) is left out.
PROGRESS_ONLY = ("-p", "no:fq_pytest", "-p", "fq_pytest.progress")


@pytest.fixture
def inner(pytester, monkeypatch):
    monkeypatch.setattr(progress, "_listeners", ())
    pytester.makepyfile(test_inner=INNER)
    return pytester


def test_plugin_ci_lines_in_a_pytest_session(inner):
    result = inner.runpytest(*PROGRESS_ONLY, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    lines = [ln for ln in result.outlines if ln.startswith("fq:")]
    assert len(lines) == 2
    assert lines[0].startswith("fq: Test 1 smollm2-135m · baseline · ")
    assert lines[0].endswith(" s · 2 chunks, 0.50 s/pass")
    assert lines[1].startswith("fq: Test 1 smollm2-135m · treatment · ")
    assert any(ln.startswith("test_inner.py ..") for ln in result.outlines)
    assert not progress.listening()  # unsubscribed at the end of the session


def test_plugin_tty_line_in_a_pytest_session(inner, monkeypatch, capsys):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("BUILD_NUMBER", raising=False)
    inner.makeconftest(
        """
        import pytest

        @pytest.hookimpl(trylast=True)  # the mode is decided at the first event, after this
        def pytest_configure(config):
            config.pluginmanager.get_plugin("terminalreporter").isatty = lambda: True
        """
    )
    result = inner.runpytest(*PROGRESS_ONLY, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    raw = capsys.readouterr().out  # pytester echoes the inner output, carriage returns kept
    screen = [ln.rsplit("\r", 1)[-1].rstrip() for ln in raw.split("\n")]
    assert "\rfq: Test 1 smollm2-135m · baseline · chunk 2/2" in raw  # rewritten in place
    summary = [ln for ln in screen if ln.startswith("fq:")]
    assert len(summary) == 1 and summary[0].startswith("fq: Test 1 smollm2-135m · baseline ")
    assert "treatment" in summary[0]
    assert screen[screen.index(summary[0]) + 1].startswith("test_inner.py ..")


def test_plugin_quiet_shows_nothing(inner):
    result = inner.runpytest("-p", "fq_pytest.progress", "-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=2)
    assert not [ln for ln in result.outlines if "fq:" in ln]


# -- a real llama-perplexity run ----------------------------------------------------------------


@pytest.mark.llama
@pytest.mark.models
def test_perplexity_reports_chunks_as_they_finish(events, tmp_path):
    from fq_core.measurement.corpus import resolve_corpus
    from fq_core.measurement.llama.runner import LlamaRunner
    from fq_core.measurement.llama.tools import find_tools
    from fq_core.measurement.models import resolve_model

    runner = LlamaRunner(find_tools(), log_dir=tmp_path / "logs", timeout_s=600)
    smol, corpus = resolve_model("smollm2-135m"), resolve_corpus()
    with progress.step("baseline", stage="Test 1", model="smollm2-135m"):
        result = runner.perplexity(smol, corpus, chunks=2)
    chunks = [e for e in events if e.kind == "chunks"]
    assert chunks, [e.kind for e in events]
    assert all(e.label == "Test 1 smollm2-135m · baseline" for e in chunks)
    assert all(e.total == 2 for e in chunks)
    assert [e.done for e in chunks] == sorted(e.done for e in chunks)
    last = chunks[-1]
    assert (last.done, last.eta_s) == (2, 0.0) and last.seconds_per_pass > 0
    assert result.n_chunks == 2 and len(result.chunk_ppls) == 2
    print(f"{len(chunks)} chunk events, {last.seconds_per_pass} s/pass", file=sys.stderr)
