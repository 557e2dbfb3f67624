"""The README and docs/architecture.md stay true, by test (fast, offline: no llama.cpp or models).

Every list the docs and the code both hold is read from both sides and compared, so adding a
command, an option or a result field without documenting it (or documenting one that does not
exist) fails here:

- `fq` commands: the list comes from the argparse parser (`fq_core.cli.build_parser`). A
  command is documented when it is in the command summary block under "## The `fq` command"
  *and* has a `### ` heading naming it as `` `fq NAME ``; every name either place shows exists.
- pytest options: the lists come from `fq_pytest.plugin.pytest_addoption`. Every `fq_*` ini
  value is in the README (the settings table, with its default); every `--fq-*` flag is named
  in the README or is the flag of a documented ini value (`fq_chunks` <-> `--fq-chunks`, as the
  settings heading says); every `--fq-*` / `fq_*` the README names exists, and so does every
  `fq_*` key in pytest.ini. Defaults are `fq_core.definitions.settings`' alone: the plugins register
  them, pytest.ini sets no other value, and the library's own defaults are what they give.
- command flags: every `--flag` the `fq` chapter shows for a command exists on that command's
  parser (a flag in a section's prose belongs to the commands its heading names); the
  number-format bullets are `--format`'s choices, the models table is the registry, and the
  README's "Python ≥ X.Y" is pyproject's requires-python.
- result fields: every field of the stage-result schema in docs/architecture.md (and every
  top-level field and threshold the code writes is in that schema), its check names and
  statuses, and every field the README says a result records (README_CLAIMS), are written by
  the code. The record skeleton comes from `fq_core.experiment.protocol.header` / `skipped_result`;
  the measured sections from the real protocol (`fq_core.experiment.protocol.run_stage`) on a small
  factory GGUF with llama.cpp replaced by a stub returning the runner's own result types. A `llama`
  test repeats the key checks on the newest complete result a real run stored, if any.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import re
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
from gguf_factory import build_gguf

from fq_core.cli import build_parser
from fq_core.definitions import settings
from fq_core.definitions.formats import FORMATS, LLAMA_TYPES, ROUNDINGS
from fq_core.experiment import protocol, stages
from fq_core.experiment.checks import STATUSES
from fq_core.experiment.sweep import analysis as sweep_analysis
from fq_core.measurement.corpus import Corpus
from fq_core.measurement.evaluate import EvalSettings
from fq_core.measurement.llama.runner import (
    CommandRecord,
    Generation,
    LoadResult,
    PerplexityResult,
)
from fq_core.measurement.llama.tools import LlamaTools
from fq_core.measurement.models import REGISTRY, ModelRef
from fq_core.platform.hashing import sha256_file
from fq_core.storage import record, results
from fq_core.storage.record import KLD

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]")
FQ_FLAG = re.compile(r"(?<![\w-])--fq-[a-z0-9-]*[a-z0-9]")
# code spans in the `fq` chapter that show another program's flags, not fq's
EXTERNAL_PROGRAMS = ("pip", "pytest", "make", "cmake", "llama-")


# --- reading markdown -----------------------------------------------------------------------


def _chapter(text: str, heading: str) -> str:
    """From the `## ` heading starting with `heading` to the next `## ` heading."""
    start = text.index("\n" + heading) + 1
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def _fences(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)


def _prose(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _spans(text: str) -> list[str]:
    """Inline code spans outside fenced blocks."""
    return re.findall(r"`([^`\n]+)`", _prose(text))


def _h3_sections(chapter: str) -> tuple[str, list[tuple[str, str]]]:
    """(text before the first `### `, [(heading line, body)])."""
    parts = re.split(r"^(### .*)$", chapter, flags=re.M)
    return parts[0], list(zip(parts[1::2], parts[2::2], strict=True))


def _words(text: str) -> str:
    return re.sub(r"\s+", " ", text)


FQ_CHAPTER = _chapter(README, "## The `fq` command")
FQ_INTRO, FQ_SECTIONS = _h3_sections(FQ_CHAPTER)


def _fq_lines(block: str) -> list[str]:
    """Command lines of a code block: `fq ...` or `$ fq ...`, without the prompt."""
    lines = (line.strip().removeprefix("$ ") for line in block.splitlines())
    return [line for line in lines if line.startswith("fq ")]


def _summary_commands() -> list[str]:
    """`fq setup | doctor | ... | fetch NAME` -> setup, doctor, fetch (the summary block)."""
    names = []
    for block in _fences(FQ_INTRO):
        for line in _fq_lines(block):
            names += [part.split()[0] for part in line[3:].split(" | ")]
    return names


def _heading_commands(heading: str) -> list[str]:
    return re.findall(r"`fq ([a-z][a-z0-9-]*)", heading)


# --- the CLI ----------------------------------------------------------------------------------


def _subcommands() -> dict[str, tuple[argparse.ArgumentParser, str | None]]:
    """name -> (parser, help) from the parser `fq` itself builds (argparse keeps no public API
    for subcommands, so this reads its subparsers action)."""
    parser = build_parser()
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in action._choices_actions}
    return {name: (p, helps.get(name)) for name, p in action.choices.items()}


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


COMMANDS = _subcommands()


def test_readme_names_only_real_commands():
    named = set(_summary_commands())
    for heading, _ in FQ_SECTIONS:
        named |= set(_heading_commands(heading))
    named |= {line.split()[1] for b in _fences(FQ_CHAPTER) for line in _fq_lines(b)}
    named |= {s.split()[1] for s in _spans(FQ_CHAPTER) if s.startswith("fq ") and " " in s}
    assert named, "no fq commands found in the README: has the chapter moved?"
    assert sorted(named - set(COMMANDS)) == [], f"fq has only {sorted(COMMANDS)}"


def test_every_command_is_documented():
    """In the summary block and under a `### \\`fq NAME` heading of its own."""
    summary = set(_summary_commands())
    headed = {name for heading, _ in FQ_SECTIONS for name in _heading_commands(heading)}
    assert sorted(set(COMMANDS) - summary) == [], "missing from the README's command summary"
    assert sorted(set(COMMANDS) - headed) == [], "no `### `fq NAME` heading in the README"


def test_every_command_has_help():
    assert COMMANDS
    for name, (parser, help_text) in COMMANDS.items():
        assert help_text and help_text.strip(), f"fq {name} has no help text"
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"fq {name} {action.option_strings[0]} has no help text"


def _readme_command_flags() -> list[tuple[tuple[str, ...], str, str]]:
    """(commands one of which must take the flag, flag, where it is shown) for the fq chapter."""
    found = []
    for block in _fences(FQ_CHAPTER):
        for line in _fq_lines(block):
            for part in line[3:].split(" | "):
                name, *rest = part.split()
                found += [((name,), f, line) for f in FLAG.findall(" ".join(rest))]
    for heading, body in [("", FQ_INTRO), *FQ_SECTIONS]:
        owners = tuple(_heading_commands(heading)) or tuple(COMMANDS)
        for span in _spans(heading + "\n" + body):
            words = span.split()
            if words[0] == "fq" and len(words) > 1:
                found += [((words[1],), f, span) for f in FLAG.findall(span)]
            elif not words[0].startswith(EXTERNAL_PROGRAMS):
                found += [(owners, f, span) for f in FLAG.findall(span)]
    return found


def test_readme_command_flags_exist():
    shown = _readme_command_flags()
    assert any(f == "--kld-chunks" for _, f, _ in shown), "flag extraction found too little"
    wrong = [
        f"{flag} (shown in {where!r}) is not an option of fq {' / fq '.join(owners)}"
        for owners, flag, where in shown
        if not any(flag in _flags(COMMANDS[o][0]) for o in owners if o in COMMANDS)
    ]
    assert wrong == []


def test_number_formats_section_lists_every_format():
    """`### Number formats`: one bullet per `--format` choice, and both roundings."""
    (body,) = [b for h, b in FQ_SECTIONS if h.startswith("### Number formats")]
    bullets = re.findall(r"^- `([a-z0-9_]+)", body, re.M)  # each bullet opens with a format
    assert bullets and set(bullets) <= set(FORMATS), bullets
    named = {span.split()[0] for span in _spans(body)}
    assert sorted(set(FORMATS) - named) == [], "formats the section never names"
    for rounding in ROUNDINGS:
        assert f"`{rounding}`" in body or f" {rounding}`" in body, rounding
    assert sorted(set(LLAMA_TYPES) - named) == [], "llama.cpp types the section never names"
    choices = COMMANDS["quantize"][0]._option_string_actions["--format"].choices
    assert set(choices) == set(FORMATS + LLAMA_TYPES)


def test_models_table_is_the_registry():
    (body,) = [b for h, b in FQ_SECTIONS if "`fq models`" in h]
    names = re.findall(r"^\| `([^`]+)` \|", body, re.M)
    assert names == list(REGISTRY)


def test_python_version_is_the_packages():
    """README's "Python ≥ X.Y" is pyproject's requires-python."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    required = meta["project"]["requires-python"]
    documented = re.findall(r"Python ≥ (\d+\.\d+)", README)
    assert documented, "README no longer says which Python it needs"
    assert {f">={v}" for v in documented} == {required.replace(" ", "")}


# --- pytest options ---------------------------------------------------------------------------


class _OptionRecorder:
    """Stands in for pytest's parser and group: records what the plugin declares."""

    def __init__(self) -> None:
        self.flags: dict[str, dict] = {}
        self.inis: dict[str, tuple[str, object]] = {}

    def getgroup(self, *args, **kwargs):
        return self

    def addoption(self, *names, **kwargs) -> None:
        for name in names:
            self.flags[name] = kwargs

    def addini(self, name, help, type=None, default=None) -> None:  # noqa: A002
        self.inis[name] = (help, default)


@pytest.fixture(scope="module")
def plugin_options() -> _OptionRecorder:
    from fq_pytest import plugin, recipe, regression, sweep

    rec = _OptionRecorder()
    plugin.pytest_addoption(rec)
    regression.pytest_addoption(rec)
    sweep.pytest_addoption(rec)
    recipe.pytest_addoption(rec)
    assert rec.flags and rec.inis
    return rec


def _readme_ini_names() -> set[str]:
    packages = {p.name for p in ROOT.iterdir() if p.is_dir()}
    return {s for s in _spans(README) if re.fullmatch(r"fq_[a-z0-9_]+", s)} - packages


def test_readme_names_only_real_pytest_options(plugin_options):
    named_flags = set(FQ_FLAG.findall(README))
    assert named_flags, "README names no --fq-* flag"
    assert sorted(named_flags - set(plugin_options.flags)) == []
    assert sorted(_readme_ini_names() - set(plugin_options.inis)) == []


def test_every_pytest_option_is_documented(plugin_options):
    inis = set(plugin_options.inis)
    assert sorted(inis - _readme_ini_names()) == [], "ini values missing from the README"
    named = set(FQ_FLAG.findall(README))
    undocumented = [
        flag
        for flag, kw in plugin_options.flags.items()
        if flag.startswith("--fq-") and flag not in named and kw.get("dest") not in inis
    ]
    assert undocumented == [], "flags the README never names (and without an ini value)"


def test_every_pytest_option_has_help(plugin_options):
    for flag, kw in plugin_options.flags.items():
        assert kw.get("help", "").strip(), flag
    for name, (help_text, _) in plugin_options.inis.items():
        assert help_text.strip(), name


def _settings_table() -> dict[str, str]:
    """ini name -> default as the README's settings table states it."""
    (chapter,) = [b for h, b in _h3_sections(README)[1] if h.startswith("### Settings")]
    rows = {}
    for line in chapter.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) < 3 or not cells[0].startswith("`fq_"):
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        defaults = re.findall(r"`([^`]*)`", cells[1]) or [cells[1]]
        assert len(names) == len(defaults), line
        rows.update(zip(names, defaults, strict=True))
    return rows


# how the table words a default the code spells as a string
DEFAULT_WORDS = {"unset": "", "all cores": "auto"}


def test_settings_table_defaults_are_the_plugins(plugin_options):
    table = _settings_table()
    assert set(table) == set(plugin_options.inis), "the settings table lists other ini values"
    for name, (_, default) in plugin_options.inis.items():
        code = " ".join(default) if isinstance(default, list) else str(default)
        assert DEFAULT_WORDS.get(table[name], table[name]) == code, name


def _pytest_ini() -> dict[str, str]:
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(ROOT / "pytest.ini", encoding="utf-8")
    return {k: v for k, v in ini["pytest"].items() if k.startswith("fq_")}


def test_pytest_ini_sets_only_known_options(plugin_options):
    keys = set(_pytest_ini())
    assert keys, "pytest.ini sets no fq_* value"
    assert sorted(keys - set(plugin_options.inis)) == []


# "`fq_twin_kld_mean_max` (1e-3)", "(`fq_sweep_fdr`, 0.05)": a default the prose repeats
PROSE_DEFAULT = re.compile(r"`(fq_[a-z0-9_]+)`(?: \(|, )(\d[\d.e-]*)( ?%)?\)")


def test_defaults_the_docs_repeat_are_the_settings():
    found = PROSE_DEFAULT.findall(README + ARCHITECTURE)
    assert len(found) >= 4, "the docs no longer repeat a default: update PROSE_DEFAULT"
    for name, number, percent in found:
        stated = float(number) / (100 if percent else 1)
        assert stated == pytest.approx(settings.default(name), rel=1e-12), name


def test_every_default_is_the_settings_definition(plugin_options):
    """fq_core.definitions.settings is the one definition: the plugins register its defaults,
    pytest.ini sets nothing else (else the README's table would not be what `pytest` runs with), and
    the library's own defaults (record.Thresholds, stages.Experiment, EvalSettings, the sweep's q,
    `fq evaluate`) are what the options give when none is set."""
    every = (*settings.STAGE, *settings.SWEEP, *settings.RECIPE)
    registered = {name: default for name, (_, default) in plugin_options.inis.items()}
    assert registered == {"fq_models": list(settings.MODELS)} | {s.name: s.default for s in every}
    for name, text in _pytest_ini().items():
        if name == "fq_models":
            assert text.split() == list(settings.MODELS)
        else:
            assert settings.BY_NAME[name].parse(text) == settings.default(name), name
    given = stages.experiment_from(settings.defaults())
    assert given.settings.threads == os.cpu_count()  # fq_threads = auto; the library: None
    given = replace(given, settings=replace(given.settings, threads=None))
    assert given == stages.Experiment(), "a library default differs from its setting's"
    assert stages.Experiment().thresholds == record.Thresholds()
    assert sweep_analysis.Q_DEFAULT == settings.default("fq_sweep_fdr")
    (evaluate,) = [p for name, (p, _) in COMMANDS.items() if name == "evaluate"]
    cli = {a.dest: a.default for a in evaluate._actions}
    lib = EvalSettings()
    assert (cli["ctx"], cli["chunks"], cli["gen_tokens"]) == (lib.ctx, lib.chunks, lib.gen_tokens)


# --- result fields ----------------------------------------------------------------------------

_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|//[^\n]*|[{}\[\]:,]')


def _schema_block() -> str:
    chapter = _chapter(ARCHITECTURE, "## The record")
    (block,) = [b for b in _fences(chapter) if b.lstrip().startswith("{")]
    return block


def _parse_schema(text: str) -> dict:
    """The documented JSON, which is JSON with comments, `...` and `"a" | "b"` alternatives, as
    a tree of keys: dict = documented object, [dict] = list of such objects, None/[] = a value."""
    tokens = [t for t in _TOKEN.findall(text) if not t.startswith("//")]
    pos = 0

    def value():
        nonlocal pos
        found = None
        while tokens[pos] not in (",", "}", "]"):
            token = tokens[pos]
            pos += 1
            if token == "{":
                found = obj()
            elif token == "[":
                found = arr()
        return found

    def obj() -> dict:
        nonlocal pos
        out = {}
        while tokens[pos] != "}":
            if tokens[pos] == ",":
                pos += 1
                continue
            key = json.loads(tokens[pos])
            assert tokens[pos + 1] == ":", f"no ':' after {key!r} in the documented schema"
            pos += 2
            out[key] = value()
        pos += 1
        return out

    def arr() -> list:
        nonlocal pos
        items = []
        while tokens[pos] != "]":
            assert tokens[pos] != "}", "unbalanced brackets in the documented schema"
            if tokens[pos] == ",":
                pos += 1
                continue
            item = value()
            if isinstance(item, dict):
                items.append(item)
        pos += 1
        return items

    assert tokens[0] == "{"
    pos = 1
    return obj()


SCHEMA = _parse_schema(_schema_block())


def _missing(schema: dict, record, path: str = "") -> list[str]:
    """Documented keys the record lacks (a `<name>` key stands for every entry of an object)."""
    out: list[str] = []
    for key, sub in schema.items():
        if key.startswith("<"):
            entries = record.items() if isinstance(record, dict) else ()
            if not entries:
                out.append(f"{path}{key} (no entries)")
            for name, value in entries:
                out += _missing_in(sub, value, f"{path}{name}")
        elif not isinstance(record, dict) or key not in record:
            out.append(path + key)
        else:
            out += _missing_in(sub, record[key], path + key)
    return list(dict.fromkeys(out))


def _missing_in(sub, value, path: str) -> list[str]:
    if isinstance(sub, dict):
        if not isinstance(value, dict):
            return [f"{path} (documented as an object, written as {value!r:.60})"]
        return _missing(sub, value, path + ".")
    if isinstance(sub, list) and sub:
        if not isinstance(value, list) or not value:
            return [f"{path}[] (documented entries, written as {value!r:.60})"]
        return [m for v in value for s in sub for m in _missing_in(s, v, path + "[]")]
    return []


def test_schema_is_read_from_the_doc():
    assert {"schema", "checks", "numeric", "treatment", "placebo", "commands"} <= set(SCHEMA)
    assert "max_rel" in SCHEMA["numeric"]["per_tensor"][0]
    assert set(SCHEMA["checks"]) == {"<check>"}


def test_documented_checks_are_the_protocols():
    """The schema's `// checks:` comment and the README's list of check tests name CHECKS;
    the schema's check statuses are the ones a check can have."""
    (comment,) = re.findall(r"//\s*checks:\s*(.+)", _schema_block())
    assert [c.strip() for c in comment.split(",")] == list(stages.CHECKS)
    (statuses,) = re.findall(r'"status": "([a-z|]+)"', _schema_block())
    assert statuses.split("|") == list(STATUSES)
    listed = re.search(r"Each check is its own test \(([^)]*)\)", _words(README))
    assert listed, "README no longer lists the check tests"
    assert re.findall(r"`test_(\w+)`", listed.group(1)) == list(stages.CHECKS)


def _inputs(tmp: Path) -> tuple[ModelRef, Corpus, LlamaTools]:
    model = build_gguf(tmp / "model", "factory.gguf", n_layers=3)
    corpus_path = tmp / "corpus.txt"
    corpus_path.write_text(" = Valkyria Chronicles III = \n" * 50, encoding="utf-8")
    ref = ModelRef("factory", model.path, sha256_file(model.path), None)
    corpus = Corpus(corpus_path, sha256_file(corpus_path), corpus_path.stat().st_size)
    tools = LlamaTools(
        bin_dir=tmp / "bin",
        version="0000 (stub)",
        build_info="stub",
        source="flag",
        build_id="0" * 64,
    )
    return ref, corpus, tools


def test_record_skeleton_has_every_documented_top_level_field(tmp_path):
    """header() is what every result starts as; skipped_result() what a closed gate stores."""
    ref, corpus, tools = _inputs(tmp_path)
    ctx = stages.Context("R-docs", None, tools, corpus, tmp_path / "results")
    exp = stages.Experiment()
    head = record.to_builtins(protocol.header(stages.GATE_STAGE, ref, ctx, exp))
    assert sorted(set(SCHEMA) - set(head)) == [], "documented, never written"
    assert sorted(set(head) - set(SCHEMA)) == [], "written, not in docs/architecture.md's schema"
    for name in ("model", "corpus", "llama", "machine", "settings", "thresholds"):
        assert _missing({name: SCHEMA[name]}, head) == [], name
    assert set(head["thresholds"]) == set(SCHEMA["thresholds"]), "every threshold documented"
    # corpus.n_tokens: the key only (its value is known to stay null; a fix is under way)
    assert "n_tokens" in head["corpus"]
    skipped = record.to_builtins(
        protocol.skipped_result(stages.STAGES[1], ref, ctx, exp, "gate: closed")
    )
    assert list(skipped["checks"]) == list(stages.CHECKS)
    assert _missing({"checks": SCHEMA["checks"]}, skipped) == []
    assert (skipped["outcome"], skipped["skip_reason"]) == ("skipped", "gate: closed")


class StubRunner:
    """LlamaRunner's interface and result types with no process behind it: what llama.cpp
    would report, fixed numbers (a treated model a little worse than the baseline, placebos
    a little less)."""

    threads = 1
    log_dir = None
    timeout_s = 60.0

    def __init__(self, tools: LlamaTools, tmp: Path) -> None:
        self.tools = tools
        self.tmp = tmp

    def _record(self, tool: str, *args) -> CommandRecord:
        return CommandRecord(
            argv=(str(self.tools.bin_dir / tool), *map(str, args)),
            cwd=str(self.tmp),
            env={},
            started_at=results.utc_now(),
            duration_s=0.01,
            exit_status=0,
            stdout_path=self.tmp / "stdout",
            stderr_path=self.tmp / "stderr",
            timed_out=False,
            tool=tool,
        )

    def load(self, model, *, check: bool = True) -> LoadResult:
        return LoadResult(True, 12.5, 1_000, self._record("llama-completion", model.path))

    def generate(self, model, prompt, n_tokens, *, chat=False, chat_template=None, **kw):
        ids = tuple(range(n_tokens)) if "+" not in model.name else (*range(n_tokens - 2), 0, 0)
        text = " ".join(map(str, ids))
        rec = self._record("llama-completion", "-m", model.path, "-p", prompt)
        return Generation(prompt, chat, text, n_tokens, 120.0, "llama-completion", rec, ids)

    def count_tokens(self, model, text) -> int:
        return 1_234

    def perplexity(
        self, model, text, *, ctx=512, batch=512, chunks=None, kl_base=None, kl_against=None
    ) -> PerplexityResult:
        if kl_base is not None:
            Path(kl_base).write_bytes(b"logits")
        n = chunks or 8
        scale = 1.0 if "+" not in model.name else 1.004 if "placebo" in model.name else 1.008
        chunk_ppls = tuple(17.0 * scale * (1 + 0.01 * (i % 3)) for i in range(n))
        kld = None
        if kl_against is not None:
            mean = 0.003 if "placebo" in model.name else 0.006
            kld = KLD(
                mean=mean,
                mean_err=0.0003,
                median=mean / 2,
                p90=mean * 3,
                p99=mean * 8,
                p999=mean * 20,
                max=mean * 50,
                same_top_pct=96.0,
                same_top_err=0.5,
                rms_dp_pct=1.2,
                ppl_ratio=scale,
            )
        rec = self._record("llama-perplexity", "-m", model.path, "-f", text, "--chunks", n)
        return PerplexityResult(chunk_ppls[-1], 0.5, chunk_ppls, n, ctx, 2500.0, kld, rec)


@pytest.fixture(scope="module")
def stub_result(tmp_path_factory) -> dict:
    """Test 1 through the real protocol (quantize, compare, baseline, treatment, placebos,
    checks, results store) with llama.cpp stubbed; the result as stored on disk."""
    tmp = tmp_path_factory.mktemp("stub-stage")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp / "cache"))
        ref, corpus, tools = _inputs(tmp)
        ctx = stages.Context(
            results.new_run_id(), StubRunner(tools, tmp), tools, corpus, tmp / "results"
        )
        data = protocol.run_stage(stages.GATE_STAGE, ref, ctx, stages.Experiment())
    stored = results.read_json(
        results.result_path(ctx.run_id, data.stage, ref.name, ctx.results_root)
    )
    problems = {n: c["detail"] for n, c in stored["checks"].items() if c["status"] == "error"}
    assert problems == {}, "the stub run did not get through the protocol"
    assert list(stored["checks"]) == list(stages.CHECKS)
    return stored


def test_stage_result_has_every_documented_field(stub_result):
    """Every key of docs/architecture.md's result schema, down to the section fields."""
    assert _missing(SCHEMA, stub_result) == []
    assert sorted(set(stub_result) - set(SCHEMA)) == [], "written, not in the documented schema"


# What the README says a result (and so the report built from results alone) records, and
# where the result file holds it. `[]` = every entry of a list, `*` = every entry of an object.
README_CLAIMS = {
    "max/mean absolute and relative error and elements changed": (
        "numeric.max_abs",
        "numeric.mean_abs",
        "numeric.max_rel",
        "numeric.mean_rel",
        "numeric.changed",
    ),
    "baseline and fake-quantized PPL with ± error": (
        "baseline.ppl",
        "baseline.ppl_err",
        "treatment.ppl",
        "treatment.ppl_err",
    ),
    "ΔPPL absolute and % with a paired uncertainty": (
        "treatment.delta_ppl",
        "treatment.delta_ppl_pct",
        "treatment.delta_ppl_pct_err",
    ),
    "mean KLD and its percentiles, same-top-token %": (
        "treatment.kld.mean",
        "treatment.kld.median",
        "treatment.kld.p99",
        "treatment.kld.same_top_pct",
    ),
    "greedy-generation agreement (first divergence)": (
        "treatment.agreement.token_agreement",
        "treatment.agreement.first_divergence",
    ),
    "tokens/s of both": ("baseline.tokens_per_s", "treatment.tokens_per_s"),
    "the placebo's min–max and the verdict in words": (
        "placebo.kld_mean.min",
        "placebo.kld_mean.max",
        "placebo.verdict",
    ),
    "**thresholds** used": ("thresholds.ppl_delta_max", "thresholds.kld_mean_max"),
    "which passed, failed, were only reported, were skipped, and why": (
        "checks.*.status",
        "checks.*.detail",
    ),
    "model name, path, SHA-256": ("model.name", "model.path", "model.sha256"),
    "corpus path, SHA-256, bytes, tokens": (
        "corpus.path",
        "corpus.sha256",
        "corpus.n_bytes",
        "corpus.n_tokens",
    ),
    "Its path, SHA-256, bytes and token count are recorded in every result": (
        "corpus.path",
        "corpus.sha256",
        "corpus.n_bytes",
        "corpus.n_tokens",
    ),
    "llama.cpp version, build flags and build id; fq version; machine": (
        "llama.version",
        "llama.build_info",
        "llama.build_id",
        "fq_version",
        "machine.cpu",
    ),
    "**commands** each check ran": ("commands[].argv",),
    "and the generated text": ("baseline.generations[].text", "treatment.generations[].text"),
    "weight distribution before/after (focused layer)": (
        "numeric.focus.layer",
        "numeric.focus.before",
        "numeric.focus.after",
        "numeric.focus.hist_before",
        "numeric.focus.hist_after",
    ),
    "histogram of relative errors": ("numeric.focus.rel_error_counts",),
    "per-layer max relative error": ("numeric.per_tensor[].layer", "numeric.per_tensor[].max_rel"),
    "per-chunk PPL baseline vs treated": ("baseline.chunk_ppls", "treatment.chunk_ppls"),
    "format, rounding, thresholds and settings, and every command line": (
        "settings.format",
        "settings.rounding",
        "thresholds",
        "settings",
        "commands[].argv",
    ),
}
# A key that must exist but whose value may be null even in a complete run.
KEY_ONLY = {
    "corpus.n_tokens",  # known: never filled yet (a fix is under way elsewhere)
}


def _values(record, path: str) -> list:
    """Every value at a dotted path (KeyError, TypeError or AssertionError when absent)."""
    values = [record]
    for part in path.split("."):
        key, every = (part[:-2], True) if part.endswith("[]") else (part, False)
        if key == "*":
            values = [v for d in values for v in d.values()]
            assert values, f"{path}: no entries"
            continue
        values = [d[key] for d in values]
        if every:
            assert all(isinstance(v, list) and v for v in values), f"{path}: no entries"
            values = [x for v in values for x in v]
    return values


def _unfulfilled(record: dict, *, key_only: bool) -> list[str]:
    out = []
    for phrase, paths in README_CLAIMS.items():
        for path in paths:
            try:
                values = _values(record, path)
            except (KeyError, TypeError, AssertionError) as exc:
                out.append(f"{phrase!r}: {path} not written ({exc!r:.60})")
                continue
            if not key_only and path not in KEY_ONLY and any(v is None for v in values):
                out.append(f"{phrase!r}: {path} is null")
    return out


def test_readme_claims_are_in_the_readme():
    text = _words(README)
    assert [p for p in README_CLAIMS if p not in text] == [], "README reworded: update the claims"


def test_readme_claims_are_recorded(stub_result):
    assert _unfulfilled(stub_result, key_only=False) == []


def _stored_real_results() -> list[Path]:
    """Complete stage results of real runs in the results store, newest run first."""
    found = []
    for path in sorted(results.results_dir().glob("*/*/*.json"), reverse=True):
        try:
            data = results.read_json(path)
        except (OSError, ValueError):
            continue
        if (
            isinstance(data, dict)
            and data.get("schema") == results.SCHEMA
            and data.get("outcome") in ("passed", "failed")
            and set(data.get("checks", {})) == set(stages.CHECKS)
            and all(c.get("status") != "error" for c in data["checks"].values())
        ):
            found.append(path)
    return found


@pytest.mark.llama
def test_real_stored_result_has_the_documented_fields():
    """The same checks on what a real llama.cpp stage run stored (newest complete result)."""
    stored = _stored_real_results()
    if not stored:
        pytest.skip(f"no complete stage result under {results.results_dir()} (run make gate)")
    data = results.read_json(stored[0])
    assert _missing(SCHEMA, data) == [], stored[0]
    assert _unfulfilled(data, key_only=True) == [], stored[0]


# --- docs/ci-example.yml: a CI recipe that survives a first run --------------------------------


def _ci_jobs() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "docs" / "ci-example.yml").read_text(encoding="utf-8"))["jobs"]


def _step(steps: list[dict], uses: str) -> int:
    found = [i for i, s in enumerate(steps) if s.get("uses", "").startswith(uses + "@")]
    assert len(found) == 1, f"{uses}: {len(found)} steps"
    return found[0]


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip()]


@pytest.mark.parametrize("job", ["gate", "save-reference"])
def test_ci_cache_is_saved_even_when_the_gate_fails(job):
    """A first run (no reference, or a failing gate) still leaves its build and models cached."""
    steps = _ci_jobs()[job]["steps"]
    assert not any(s.get("uses", "").startswith("actions/cache@") for s in steps)
    restore, save = _step(steps, "actions/cache/restore"), _step(steps, "actions/cache/save")
    gate = [i for i, s in enumerate(steps) if "make gate" in s.get("run", "")]
    assert gate and restore < min(gate) and max(gate) < save
    assert steps[save]["if"] == "always()"
    assert "${{ github.run_id }}" in steps[restore]["with"]["key"]  # a saved key is never rewritten
    assert steps[save]["with"]["key"] == (
        f"${{{{ steps.{steps[restore]['id']}.outputs.cache-primary-key }}}}"
    )


def test_ci_cache_is_the_stated_budget():
    """The cached folders are paths.CI_CACHED (logits and twins left out), stated in the file."""
    from fq_core.platform import paths

    wanted = [f"~/.cache/fq-suite/{name}" for name in paths.CI_CACHED]
    for job in _ci_jobs().values():
        for uses in ("actions/cache/restore", "actions/cache/save"):
            steps = job["steps"]
            assert _lines(steps[_step(steps, uses)]["with"]["path"]) == wanted
    assert not {"baselines", "twins", "recipes"} & set(paths.CI_CACHED)
    text = (ROOT / "docs" / "ci-example.yml").read_text(encoding="utf-8")
    assert f"Budget: under {paths.CI_CACHE_BUDGET_GB} GB" in text
    # every folder fq makes in the cache is either cached in CI or left out on purpose
    made = set()
    for src in (ROOT / "fq_core").rglob("*.py"):
        code = src.read_text(encoding="utf-8")
        made |= set(re.findall(r'cache_dir\(\) / "([^"]+)"', code))
        made |= set(re.findall(r'(?:folder_for|verified)\(\s*"([^"]+)"', code))
    made.add("sha256-cache.json")
    assert made >= {"baselines", "twins", "models", "llama.cpp", "placebos"}, made
    remade = {"baselines", "twins", "recipes"}  # logits and GGUFs, remade from what is cached
    assert made - remade <= set(paths.CI_CACHED), made - set(paths.CI_CACHED)


def test_ci_uploads_the_command_logs(tmp_path):
    """Every file a logged command leaves (the report links them) is in the uploaded artifact."""
    from fq_core.platform.commands import run_logged

    run_logged(["echo", "fq-probe"], tool="echo", timeout_s=30, log_dir=tmp_path / "logs")
    logs = (tmp_path / "logs").rglob("*")
    written = [p.relative_to(tmp_path).as_posix() for p in logs if p.is_file()]
    assert any(w.startswith("logs/commands/") for w in written), written
    upload = next(s for s in _ci_jobs()["gate"]["steps"] if "upload-artifact" in s.get("uses", ""))
    assert upload["if"] == "always()"
    uploaded = _lines(upload["with"]["path"])
    for w in written:
        assert any(w == u or (u.endswith("/") and w.startswith(u)) for u in uploaded), w
