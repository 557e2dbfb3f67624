"""The protocol every stage × model runs, writing the typed record as it goes.

Protocol: fake-quantize the stage's layers (treatment) and, with the same selection, flip the
lowest mantissa bit by seeded masks (placebos); evaluate each with llama.cpp against the
cached baseline of the unmodified model; compare; decide every check. The result is written
to the store after each step, before anything asserts, so a failure or a crash still leaves
the evidence. Why placebos: on these quantized models any change to a norm weight, even
2^-24 relative, moves KLD by about as much as the real effect; without a control a threshold
judges engine noise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from .. import __version__
from ..errors import FqError
from ..figures import figure
from ..measurement import metrics, patch
from ..measurement.gguf_index import read_index, read_tensor
from ..platform import atomic, progress
from ..storage import codec, record, results
from ..storage.identity import machine_info
from ..storage.record import Check, StageRecord
from . import checks
from .measure import (
    ENGINE_WORDS,
    VARIANT_WORDS,
    Steps,
    Target,
    Treatment,
    commands_json,
    error_line,
    measure,
)
from .stages import CHECKS, GATE_STAGE, Context, Experiment, Stage

if TYPE_CHECKING:
    from ..measurement.corpus import Corpus
    from ..measurement.models import ModelRef

__all__ = ["ENGINE_WORDS", "VARIANT_WORDS", "header", "run_stage", "skipped_result"]

log = logging.getLogger(__name__)
replace_ = msgspec.structs.replace


# --- the record's parts ----------------------------------------------------------------------


def _check(status: str, detail: str, *, gates: bool = True) -> Check:
    return Check(status=status, detail=detail, gates=gates)


def model_info(model: ModelRef) -> record.ModelInfo:
    return record.ModelInfo(name=model.name, path=str(model.path), sha256=model.sha256)


def corpus_info(corpus: Corpus, n_tokens: int | None = None) -> record.CorpusInfo:
    return record.CorpusInfo(
        path=str(corpus.path), sha256=corpus.sha256, n_bytes=corpus.n_bytes, n_tokens=n_tokens
    )


def _pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else figure(x, f"+.{digits}f") + "%"


def _range(values: Sequence[float | None]) -> record.Range | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    return record.Range(min=min(vals), max=max(vals), mean=sum(vals) / len(vals))


def header(stage_: Stage, model: ModelRef, ctx: Context, exp: Experiment) -> StageRecord:
    """Everything a result file states before any measurement: what, on which inputs, how."""
    tools = ctx.tools
    return StageRecord(
        schema=results.SCHEMA,
        run_id=ctx.run_id,
        stage=stage_.id,
        stage_title=stage_.title,
        stage_index=stage_.index,
        layers=stage_.layers,
        variant=exp.variant,
        model=model_info(model),
        corpus=corpus_info(ctx.corpus),
        llama=record.LlamaInfo(
            version=tools.version,
            build_info=tools.build_info,
            bin_dir=str(tools.bin_dir),
            instruction_set=getattr(tools, "instruction_set", None),
            build_id=getattr(tools, "build_id", None) or None,
        ),
        fq_version=__version__,
        machine=machine_info(),
        settings=msgspec.convert(exp.settings_json(), record.Settings),
        thresholds=exp.thresholds,
        checks={},
        outcome="running",
        started_at=results.utc_now(),
    )


def skipped_result(
    stage_: Stage,
    model: ModelRef,
    ctx: Context,
    exp: Experiment,
    reason: str,
    variant: str = "deployed",
) -> StageRecord:
    """The result of a stage the gate closed: stored so the report can say why it did not run."""
    exp = exp.for_variant(variant)
    found = {n: _check("skipped", reason, gates=exp.thresholds.gates(n)) for n in CHECKS}
    return replace_(
        header(stage_, model, ctx, exp),
        checks=found,
        outcome="skipped",
        skip_reason=reason,
        finished_at=results.utc_now(),
    )


def _commands(rows: Sequence[dict]) -> tuple[record.Command, ...]:
    return tuple(codec.convert(r, record.Command) for r in rows)


# --- numeric evidence -----------------------------------------------------------------------


def _distribution(d: metrics.DistributionStats) -> record.Distribution:
    return record.Distribution(
        n=d.n,
        mean=d.mean,
        std=d.std,
        min=d.min,
        max=d.max,
        percentiles={str(k): v for k, v in d.percentiles.items()},
        n_nonfinite=d.n_nonfinite,
    )


def _focus(original: Path, candidate: Path, tensor_name: str, layer: int | None) -> record.Focus:
    """Before/after distributions and histograms of one patched tensor, for the report's charts."""
    a_idx, b_idx = read_index(original), read_index(candidate)
    before = read_tensor(a_idx, a_idx.tensor(tensor_name))
    after = read_tensor(b_idx, b_idx.tensor(tensor_name))
    edges, (h_before, h_after) = metrics.histogram(before, after, bins=50)
    rel = metrics.relative_errors(before, after)
    rel = rel[rel > 0]
    hi = float(rel.max()) if rel.size else 1e-2
    rel_edges, (rel_counts,) = metrics.histogram(rel, bins=40, value_range=(0.0, max(hi, 1e-12)))
    return record.Focus(
        layer=layer,
        tensor=tensor_name,
        before=_distribution(metrics.distribution(before)),
        after=_distribution(metrics.distribution(after)),
        hist_edges=tuple(edges),
        hist_before=tuple(h_before),
        hist_after=tuple(h_after),
        rel_error_edges=tuple(rel_edges),
        rel_error_counts=tuple(rel_counts),
    )


def _numeric(manifest: patch.Manifest, original: Path, candidate: Path) -> record.Numeric:
    t = manifest.totals
    per_tensor = tuple(
        record.TensorError(
            name=c.name,
            layer=c.layer,
            changed=c.changed,
            n_elements=c.n_elements,
            max_abs=c.max_abs,
            mean_abs=c.mean_abs,
            max_rel=c.max_rel,
            mean_rel=c.mean_rel,
            n_nonfinite=c.n_nonfinite,
            n_became_nonfinite=c.n_became_nonfinite,
        )
        for c in manifest.tensors
    )
    focus = None
    if manifest.tensors:
        first = manifest.tensors[0]
        try:
            focus = _focus(original, candidate, first.name, first.layer)
        except (FqError, OSError, ValueError) as exc:  # charts are evidence, not a verdict
            log.warning("no focus distribution for %s: %s", first.name, exc)
    return record.Numeric(
        manifest=manifest.path,
        n_tensors=len(manifest.tensors),
        n_elements=manifest.total_elements,
        changed=manifest.total_changed,
        max_abs=t.max_abs,
        mean_abs=t.mean_abs,
        max_rel=t.max_rel,
        mean_rel=t.mean_rel,
        max_ulp_bf16=getattr(t, "max_ulp_bf16", None),
        n_nonfinite=t.n_nonfinite,
        n_became_nonfinite=t.n_became_nonfinite,
        summary=manifest.summary(),
        per_tensor=per_tensor,
        focus=focus,
    )


def _quantize_check(cmp: metrics.Comparison, manifest: patch.Manifest) -> Check:
    return checks.quantize_check(
        cmp.unexpected,
        manifest.total_changed,
        manifest.total_elements,
        len(manifest.tensors),
        sum(d.differing_bytes for d in cmp.differing),
        cmp.file_size,
        manifest.format,
        manifest.nothing_changed,
    )


# --- evaluation evidence --------------------------------------------------------------------


def _generation(g: Any, source: str | None = None) -> record.GenerationInfo:
    return record.GenerationInfo(
        prompt=g.prompt,
        chat=g.chat,
        text=g.text,
        n_tokens=g.n_tokens,
        tokens_per_s=g.tokens_per_s,
        tool=getattr(g, "tool", None),
        chat_template=getattr(g, "chat_template", None) if g.chat else None,
        chat_template_source=source if g.chat else None,
    )


def template_source(exp: Any, model: Any) -> str:
    """Where the chat prompts' template came from: the setting overrides the model's."""
    if exp.settings.chat_template:
        return "fq_chat_template"
    return getattr(model, "chat_template_source", "none")


def _baseline(base: Any, source: str | None = None) -> record.Baseline:
    p = base.perplexity
    return record.Baseline(
        ppl=p.ppl,
        ppl_err=p.ppl_err,
        chunk_ppls=tuple(p.chunk_ppls),
        n_chunks=p.n_chunks,
        tokens_per_s=p.tokens_per_s,
        load_time_ms=base.load.load_time_ms if base.load else None,
        generations=tuple(_generation(g, source) for g in base.generations),
        cached=getattr(base, "cached", None),
        key=getattr(base, "key", None),
    )


def _speed_ratio(base: float | None, cand: float | None) -> float | None:
    return cand / base if base and cand else None


def _agreement(cmp: Any) -> record.Agreement | None:
    per_prompt = tuple(
        record.PromptAgreement(
            prompt=a.prompt,
            chat=a.chat,
            same_text=a.same_text,
            token_agreement=a.token_agreement,
            first_divergence=a.first_divergence,
        )
        for a in cmp.agreement
    )
    if not per_prompt:
        return None
    vals = [a.token_agreement for a in per_prompt if a.token_agreement is not None]
    divs = [a.first_divergence for a in per_prompt if a.first_divergence is not None]
    return record.Agreement(
        token_agreement=min(vals) if vals else None,
        first_divergence=min(divs) if divs else None,
        per_prompt=per_prompt,
    )


def _treatment(t: Treatment, source: str | None = None) -> record.Treatment:
    """The stage's treatment part; a byte-identical file ran nothing, so it has no speed or
    load time of its own."""
    ev, cmp, f = t.evaluation, t.comparison, t.figures
    p = ev.perplexity
    ran = not f.identical
    return record.Treatment(
        ppl=p.ppl,
        ppl_err=p.ppl_err,
        chunk_ppls=tuple(p.chunk_ppls),
        delta_ppl=cmp.delta_ppl,
        delta_ppl_pct=f.delta_ppl_pct,
        delta_ppl_pct_err=f.delta_ppl_pct_err,
        kld=f.kld,
        tokens_per_s=p.tokens_per_s if ran else None,
        speed_ratio=_speed_ratio(cmp.baseline_ppl_tokens_per_s, cmp.ppl_tokens_per_s)
        if ran
        else None,
        gen_tokens_per_s=cmp.gen_tokens_per_s if ran else None,
        baseline_gen_tokens_per_s=cmp.baseline_gen_tokens_per_s,
        load_time_ms=ev.load.load_time_ms if ran else None,
        generations=tuple(_generation(g, source) for g in ev.generations),
        agreement=_agreement(cmp),
        identical_to_baseline=f.identical,
    )


def _speed(
    ctx: Context,
    exp: Experiment,
    pair: tuple[ModelRef, ModelRef],
    baseline: Any,
    ev: Any,
    treatment_cached: bool,
) -> tuple[Check, float | None, list]:
    """The speed check, its ratio and the runs measured for it: both throughputs from one
    session. A cached run was timed apart, perhaps under another load (0.31× seen where
    runs measured together gave 0.98×): with a limit both are measured again, back to back;
    without one the ratio is not stated and gates nothing."""
    from ..measurement import evaluate

    limit = exp.thresholds.speed_ratio_min
    base_tps, tps = baseline.perplexity.tokens_per_s, ev.perplexity.tokens_per_s
    cached = [
        w for w, hit in (("baseline", baseline.cached), ("treatment", treatment_cached)) if hit
    ]
    if not cached:
        ratio = _speed_ratio(base_tps, tps)
        return checks.speed_check(ratio, base_tps, tps, limit), ratio, []
    if limit is None:
        apart = (
            f"the {' and the '.join(cached)} came from the cache, timed apart (perhaps "
            "under another load); set fq_speed_ratio_min to time both now"
        )
        return checks.speed_check(None, base_tps, tps, None, apart=apart), None, []
    s = exp.settings
    perplexity = evaluate.ppl_call(ctx.runner, s)
    try:
        with progress.step("speed"):
            runs = [perplexity(m, ctx.corpus.path, chunks=s.chunks) for m in pair]
    except FqError as exc:
        note = f"timing both now failed: {error_line(exc)}"
        return checks.speed_check(None, None, None, limit, note=note), None, []
    base_tps, tps = (r.tokens_per_s for r in runs)
    ratio = _speed_ratio(base_tps, tps)
    note = f"both timed now, back to back: the {' and the '.join(cached)} came from the cache"
    check = checks.speed_check(ratio, base_tps, tps, limit, note=note)
    return check, ratio, [r.command for r in runs]


placebo_verdict = checks.placebo_verdict


def _placebo(
    runs: Sequence[record.PlaceboRun],
    seeds: Sequence[int],
    numeric: record.Numeric | None,
    treatment: record.Treatment,
) -> record.Placebo:
    """The placebos' summary and the treatment against them: decided here, rendered by the
    report."""
    klds = [r.kld_mean for r in runs if r.kld_mean is not None]
    kld = treatment.kld
    treatment_kld = kld.mean if kld else None
    ratio, verdict = placebo_verdict(treatment_kld, klds) if seeds else (None, "control not run")
    d = _range([r.delta_ppl_pct for r in runs])
    same = _range([r.same_top_pct for r in runs])
    compared = record.PlaceboComparison(
        kld=checks.kld_vs_placebo(numeric.changed if numeric else None, len(seeds), ratio, verdict),
        delta_ppl=checks.delta_vs_placebo(
            treatment.delta_ppl_pct, d.min if d else None, d.max if d else None
        ),
        same_top=checks.same_top_vs_placebo(
            kld.same_top_pct if kld else None, same.min if same else None
        ),
    )
    return record.Placebo(
        seeds=tuple(seeds),
        runs=tuple(runs),
        kld_mean=_range(klds),
        delta_ppl_pct=d,
        same_top_pct=same,
        kld_ratio=ratio,
        verdict=verdict,
        compared=compared,
    )


def _placebo_check(placebo: record.Placebo, limit: float | None, error: str | None) -> Check:
    kl = placebo.kld_mean
    return checks.placebo_check(
        placebo.kld_ratio,
        placebo.verdict,
        len(placebo.seeds),
        kl.min if kl else None,
        kl.max if kl else None,
        limit,
        error,
    )


# --- the protocol ---------------------------------------------------------------------------


def run_stage(
    stage_: Stage, model: ModelRef, ctx: Context, exp: Experiment, variant: str = "deployed"
) -> StageRecord:
    """Run one stage on one model, store the result after every step, record Test 1's verdict.

    `variant` "deployed" measures the model as given; "intrinsic" measures its float twin
    (every quantized tensor dequantized) with full-precision logits, through the same checks.
    The fake-quantized model (results/<run>/<stage>/models/) is owned by this process: an
    interruption removes it, even with keep_models.
    """
    exp = exp.for_variant(variant)
    path = results.result_path(
        ctx.run_id, stage_.id, record.case_name(model.name, variant), ctx.results_root
    )
    # models/ keeps the GGUF and its manifest out of the results glob (<stage>/*.json)
    with atomic.owned(path.parent / "models" / f"{path.stem}.gguf", keep=exp.keep_models) as dst:
        stage = _Stage(stage_, model, ctx, exp, dst)
        stage.run()
        return stage.finish()


class _Stage(Steps):
    """One stage run: the record built step by step and saved after each (an interrupted
    stage leaves a "running" record holding the checks it has)."""

    def __init__(self, stage_: Stage, model: ModelRef, ctx: Context, exp: Experiment, dst: Path):
        self.stage, self.model, self.ctx, self.exp, self.dst = stage_, model, ctx, exp, dst
        self.rec = header(stage_, model, ctx, exp)
        self.found: dict[str, Check] = {}
        self.measured = model  # the file the stage patches and evaluates
        self.reached = "start"  # the last step done: how far an FqError got
        self.base: Any = None  # the baseline evaluation, once made

    # the record
    def set(self, **parts: Any) -> None:
        self.rec = replace_(self.rec, **parts)

    def add(self, *, commands: Sequence[dict] = (), cache: Sequence[dict] = ()) -> None:
        self.set(
            commands=self.rec.commands + _commands(commands),
            cache=self.rec.cache
            + tuple(msgspec.convert(c, record.CacheUse) for c in cache if c is not None),
        )

    def save(self) -> None:
        results.save_result(replace_(self.rec, checks=dict(self.found)), self.ctx.results_root)

    def fail_rest(self, reason: str) -> None:
        gates = self.exp.thresholds.gates
        for n in CHECKS:
            self.found.setdefault(n, _check("error", reason, gates=gates(n)))

    # the steps
    def run(self) -> None:
        self.save()
        log.info(
            "%s %s: %s (%s)", self.stage.title, self.stage.id, self.model.name, self.exp.variant
        )
        if self.exp.variant == "intrinsic" and not self.twin():
            return
        try:
            m = measure(
                Target(self.measured, self.stage.layers),
                self.ctx,
                self.exp,
                file=self.dst,
                steps=self,
            )
        except FqError as exc:
            self.failed(exc)
            return
        self.placebos(m)
        self.deployable(m.treatment.figures.quantized.tensors)

    def twin(self) -> bool:
        from ..measurement import twin

        try:
            with progress.step("float twin"):
                self.measured = twin.twin_for(self.model, self.exp.twin_dtype)
        except FqError as exc:
            self.fail_rest(f"no float twin of {self.model.name}: {error_line(exc)}")
            return False
        m = self.measured
        self.set(
            twin=record.TwinInfo(
                path=str(m.path),
                sha256=m.sha256,
                dtype=self.exp.twin_dtype,
                source_sha256=self.model.sha256,
            )
        )
        self.save()
        return True

    def failed(self, exc: FqError) -> None:
        """An FqError from the measurement: the step it reached says which check it was."""
        why = error_line(exc)
        if self.reached == "start":
            self.found["quantize"] = _check("error", f"fake quantization failed: {why}")
            self.fail_rest("no fake-quantized model (quantize failed)")
        elif self.reached == "quantized":
            self.fail_rest(f"baseline evaluation failed: {why}")
        else:
            self.found["load"] = _check("failed", f"llama.cpp failed on the treated model: {why}")
            self.fail_rest("treated model not evaluated (llama.cpp failed)")

    def quantized(self, manifest: patch.Manifest, file: Path) -> None:
        # 1-2. fake quantization and its numeric effect
        cmp_files = metrics.compare_files(self.measured.path, file)
        self.found["quantize"] = _quantize_check(cmp_files, manifest)
        self.set(numeric=_numeric(manifest, self.measured.path, file))
        t = manifest.totals
        self.found["numeric"] = checks.numeric_check(
            t.max_rel,
            manifest.total_changed,
            manifest.total_elements,
            self.exp.thresholds.max_rel_error,
        )
        self.reached = "quantized"
        self.save()

    def baseline(self, baseline: Any) -> None:
        self.base = baseline
        self.set(
            baseline=_baseline(baseline, template_source(self.exp, self.measured)),
            corpus=replace_(self.rec.corpus, n_tokens=baseline.n_tokens),
        )
        self.add(
            commands=[
                dict(c, cached=baseline.cached)
                for c in commands_json("baseline", baseline.commands())
            ],
            cache=[baseline.provenance],
        )
        self.reached = "baseline"
        self.save()

    def treated(self, t: Treatment) -> None:
        # 3-6, 8, 9. the treatment against the cached baseline
        self.reached = "treated"
        baseline, ev, f = self.base, t.evaluation, t.figures
        if t.entry is not None:
            self.add(cache=[t.entry.provenance("treatment")])
        self.add(commands=f.commands)
        treatment = _treatment(t, template_source(self.exp, self.measured))
        th, found = self.exp.thresholds, self.found
        found["perplexity"] = checks.perplexity_check(
            f.delta_ppl_pct, f.delta_ppl_pct_err, th.ppl_delta_max, baseline.perplexity.ppl, f.ppl
        )
        kld = f.kld
        found["kld"] = checks.kld_check(
            kld.mean if kld else None,
            kld.same_top_pct if kld else None,
            th.kld_mean_max,
            th.same_top_min,
        )
        agreement = treatment.agreement
        found["agreement"] = checks.agreement_check(
            agreement.token_agreement if agreement else None,
            agreement.first_divergence if agreement else None,
            th.agreement_min,
        )
        if f.identical:  # nothing ran: the baseline's load and generations stand, no speed
            same = f"byte-identical to the baseline (SHA-256 {self.measured.sha256[:12]}…): "
            found["load"] = _check("passed", same + "the baseline's load stands")
            found["generate"] = _check("passed", same + "the baseline's generations stand")
            found["speed"] = _check(
                "skipped", "not run: the file is byte-identical to the baseline", gates=False
            )
        else:
            found["load"] = checks.load_check(ev.load.ok, ev.load.load_time_ms, ev.load.error)
            gens = [(g.prompt, g.chat, g.n_tokens, g.text) for g in ev.generations]
            found["generate"] = checks.generate_check(gens)
            speed, ratio, runs = _speed(
                self.ctx, self.exp, (self.measured, ev.model), baseline, ev, t.entry.hit
            )
            found["speed"] = speed
            treatment = replace_(treatment, speed_ratio=ratio)
            self.add(commands=commands_json("speed", runs))
        self.set(treatment=treatment)
        self.save()
        if not self.exp.keep_models:
            self.dst.unlink(missing_ok=True)

    def placebos(self, m: Any) -> None:
        # 7. the selection-matched placebos: the engine's noise, against which an effect is
        # read. A byte-identical file has no effect to read: measure ran none.
        identical = m.treatment.figures.identical
        for p in m.placebos:
            self.add(cache=[p.entry.provenance(f"placebo seed {p.run.seed}")], commands=p.commands)
        seeds = () if identical else self.exp.placebo_seeds
        placebo = _placebo([p.run for p in m.placebos], seeds, self.rec.numeric, self.rec.treatment)
        self.set(placebo=placebo, resolution=m.resolution)
        if identical:
            self.found["placebo"] = _check(
                "skipped",
                "not run: the treated file is byte-identical to the baseline "
                f"(SHA-256 {self.measured.sha256[:12]}…), so there is no effect to compare with "
                "the engine's noise",
                gates=False,
            )
            return
        check = _placebo_check(placebo, self.exp.thresholds.noise_factor_max, m.placebo_error)
        self.found["placebo"] = replace_(
            check, detail=check.detail + f"; resolution: {m.resolution.sentence}"
        )

    def deployable(self, names: Sequence[str]) -> None:
        # 10. whether the real file (the tensors stored as the format) runs in llama.cpp
        if self.exp.variant != "deployed":
            self.found["deployable"] = _check(
                "skipped",
                "the deployed answer says whether the real file runs in llama.cpp; this one "
                "measures the float twin",
                gates=False,
            )
            return
        from .deployable import deployability

        try:
            with progress.step("deployable"):
                d, entry = deployability(self.measured, names, self.exp.fmt, self.ctx)
        except FqError as exc:
            self.found["deployable"] = _check(
                "error", f"the real file could not be tried: {error_line(exc)}", gates=False
            )
            return
        if entry is not None:
            self.add(cache=[entry.provenance("deployable")])
        self.found["deployable"] = checks.deployable_check(d.sentence, d.runs, d.untried)
        self.save()

    def finish(self) -> StageRecord:
        found = {n: self.found[n] for n in CHECKS if n in self.found}
        rec = replace_(
            self.rec,
            checks=found,
            outcome=checks.stage_outcome(found),
            finished_at=results.utc_now(),
        )
        if not self.exp.keep_models:
            self.dst.unlink(missing_ok=True)
        results.save_result(rec, self.ctx.results_root)
        ctx, exp, model = self.ctx, self.exp, self.model
        if self.stage.id == GATE_STAGE.id and exp.variant == exp.gate_variant:
            from .gate import failure_reason

            reason = failure_reason(rec)  # None: a GO (checks.decide), what opens the gate
            results.record_gate(
                exp.gate_identity(model, ctx.corpus, ctx.tools),
                model=model.name,
                outcome="passed" if reason is None else "failed",
                run_id=ctx.run_id,
                reason=reason,
                root=ctx.results_root,
            )
        return rec
