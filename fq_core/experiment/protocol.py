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
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from .. import __version__
from ..errors import FqError
from ..figures import figure
from ..measurement import metrics, patch
from ..measurement.gguf_index import read_index, read_tensor
from ..platform import atomic, progress
from ..storage import cache, codec, record, results
from ..storage.identity import Identity, machine_info
from ..storage.record import StageRecord
from . import checks
from .stages import CHECKS, GATE_STAGE, Context, Experiment, Stage

if TYPE_CHECKING:
    from ..measurement.corpus import Corpus
    from ..measurement.evaluate import EvalSettings
    from ..measurement.llama.tools import LlamaTools
    from ..measurement.models import ModelRef

log = logging.getLogger(__name__)


# --- helpers -------------------------------------------------------------------------------


def _evaluate():
    from ..measurement import evaluate

    return evaluate


def _check(status: str, detail: str, *, gates: bool = True) -> dict:
    return checks.to_json(checks.Check(status=status, detail=detail, gates=gates))


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def model_json(model: ModelRef) -> dict:
    return {"name": model.name, "path": str(model.path), "sha256": model.sha256}


def corpus_json(corpus: Corpus, n_tokens: int | None = None) -> dict:
    return {
        "path": str(corpus.path),
        "sha256": corpus.sha256,
        "n_bytes": corpus.n_bytes,
        "n_tokens": n_tokens,
    }


def _pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else figure(x, f"+.{digits}f") + "%"


def _minmaxmean(values: Sequence[float]) -> dict | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    return {"min": min(vals), "max": max(vals), "mean": sum(vals) / len(vals)}


def header(stage_: Stage, model: ModelRef, ctx: Context, exp: Experiment) -> dict:
    """Everything a result file states before any measurement: what, on which inputs, how."""
    return {
        "schema": results.SCHEMA,
        "run_id": ctx.run_id,
        "stage": stage_.id,
        "stage_title": stage_.title,
        "stage_index": stage_.index,
        "layers": stage_.layers,
        "variant": exp.variant,
        "model": model_json(model),
        "twin": None,
        "corpus": corpus_json(ctx.corpus),
        "llama": {
            "version": ctx.tools.version,
            "build_info": ctx.tools.build_info,
            "bin_dir": str(ctx.tools.bin_dir),
            "instruction_set": getattr(ctx.tools, "instruction_set", None),
            "build_id": getattr(ctx.tools, "build_id", None) or None,
        },
        "fq_version": __version__,
        "machine": msgspec.to_builtins(machine_info()),
        "settings": exp.settings_json(),
        "thresholds": msgspec.to_builtins(exp.thresholds),
        "checks": {},
        "numeric": None,
        "baseline": None,
        "treatment": None,
        "placebo": None,
        "resolution": None,
        "commands": [],
        "cache": [],
        "outcome": "running",
        "skip_reason": None,
        "started_at": results.utc_now(),
        "finished_at": None,
    }


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
    data = header(stage_, model, ctx, exp)
    for name in CHECKS:
        data["checks"][name] = _check("skipped", reason, gates=exp.thresholds.gates(name))
    data["outcome"] = "skipped"
    data["skip_reason"] = reason
    data["finished_at"] = results.utc_now()
    return record.from_builtins(data, source=f"{stage_.id}/{model.name}")


def outcome(checks_: Mapping[str, Mapping[str, Any]]) -> str:
    return checks.stage_outcome(checks_)


def commands_json(role: str, records: Sequence[Any]) -> list[dict]:
    out = []
    for rec in records:
        if rec is None:
            continue
        d = rec.to_json() if hasattr(rec, "to_json") else dict(rec)
        d["role"] = role
        out.append(d)
    return out


# --- numeric evidence -----------------------------------------------------------------------


def _focus_json(original: Path, candidate: Path, tensor_name: str, layer: int | None) -> dict:
    """Before/after distributions and histograms of one patched tensor, for the report's charts."""
    a_idx, b_idx = read_index(original), read_index(candidate)
    before = read_tensor(a_idx, a_idx.tensor(tensor_name))
    after = read_tensor(b_idx, b_idx.tensor(tensor_name))
    edges, (h_before, h_after) = metrics.histogram(before, after, bins=50)
    rel = metrics.relative_errors(before, after)
    rel = rel[rel > 0]
    hi = float(rel.max()) if rel.size else 1e-2
    rel_edges, (rel_counts,) = metrics.histogram(rel, bins=40, value_range=(0.0, max(hi, 1e-12)))
    return {
        "layer": layer,
        "tensor": tensor_name,
        "before": metrics.distribution(before).to_json(),
        "after": metrics.distribution(after).to_json(),
        "hist_edges": edges,
        "hist_before": h_before,
        "hist_after": h_after,
        "rel_error_edges": rel_edges,
        "rel_error_counts": rel_counts,
    }


def _numeric_json(manifest: patch.Manifest, original: Path, candidate: Path) -> dict:
    t = manifest.totals
    per_tensor = [
        {
            "name": c.name,
            "layer": c.layer,
            "changed": c.changed,
            "n_elements": c.n_elements,
            "max_abs": c.max_abs,
            "mean_abs": c.mean_abs,
            "max_rel": c.max_rel,
            "mean_rel": c.mean_rel,
            "n_nonfinite": c.n_nonfinite,
            "n_became_nonfinite": c.n_became_nonfinite,
        }
        for c in manifest.tensors
    ]
    focus = None
    if manifest.tensors:
        first = manifest.tensors[0]
        try:
            focus = _focus_json(original, candidate, first.name, first.layer)
        except (FqError, OSError, ValueError) as exc:  # charts are evidence, not a verdict
            log.warning("no focus distribution for %s: %s", first.name, exc)
    return {
        "manifest": manifest.path,
        "n_tensors": len(manifest.tensors),
        "n_elements": manifest.total_elements,
        "changed": manifest.total_changed,
        "max_abs": t.max_abs,
        "mean_abs": t.mean_abs,
        "max_rel": t.max_rel,
        "mean_rel": t.mean_rel,
        "max_ulp_bf16": getattr(t, "max_ulp_bf16", None),
        "n_nonfinite": t.n_nonfinite,
        "n_became_nonfinite": t.n_became_nonfinite,
        "summary": manifest.summary(),
        "per_tensor": per_tensor,
        "focus": focus,
    }


def _quantize_check(cmp: metrics.Comparison, manifest: patch.Manifest) -> dict:
    return checks.to_json(
        checks.quantize_check(
            cmp.unexpected,
            manifest.total_changed,
            manifest.total_elements,
            len(manifest.tensors),
            sum(d.differing_bytes for d in cmp.differing),
            cmp.file_size,
            manifest.format,
            manifest.nothing_changed,
        )
    )


def _numeric_check(manifest: patch.Manifest, limit: float) -> dict:
    t = manifest.totals
    return checks.to_json(
        checks.numeric_check(t.max_rel, manifest.total_changed, manifest.total_elements, limit)
    )


# --- evaluation evidence --------------------------------------------------------------------


def _gen_json(g: Any) -> dict:
    return {
        "prompt": g.prompt,
        "chat": g.chat,
        "text": g.text,
        "n_tokens": g.n_tokens,
        "tokens_per_s": g.tokens_per_s,
        "tool": getattr(g, "tool", None),
    }


def _baseline_json(base: Any) -> dict:
    p = base.perplexity
    return {
        "ppl": p.ppl,
        "ppl_err": p.ppl_err,
        "chunk_ppls": list(p.chunk_ppls),
        "n_chunks": p.n_chunks,
        "tokens_per_s": p.tokens_per_s,
        "load_time_ms": base.load.load_time_ms if base.load else None,
        "generations": [_gen_json(g) for g in base.generations],
        "cached": getattr(base, "cached", None),
        "key": getattr(base, "key", None),
    }


def _speed_ratio(base: float | None, cand: float | None) -> float | None:
    return cand / base if base and cand else None


def _speed(
    ctx: Context,
    exp: Experiment,
    pair: tuple[ModelRef, ModelRef],
    baseline: Any,
    ev: Any,
    treatment_cached: bool,
) -> tuple[record.Check, float | None, list]:
    """The speed check, its ratio and the runs measured for it: both throughputs from one
    session. A cached run was timed apart, perhaps under another load (0.31× seen where
    runs measured together gave 0.98×): with a limit both are measured again, back to back;
    without one the ratio is not stated and gates nothing."""
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
    perplexity = _evaluate().ppl_call(ctx.runner, s)
    try:
        with progress.step("speed"):
            runs = [perplexity(m, ctx.corpus.path, chunks=s.chunks) for m in pair]
    except FqError as exc:
        note = f"timing both now failed: {_error(exc)}"
        return checks.speed_check(None, None, None, limit, note=note), None, []
    base_tps, tps = (r.tokens_per_s for r in runs)
    ratio = _speed_ratio(base_tps, tps)
    note = f"both timed now, back to back: the {' and the '.join(cached)} came from the cache"
    check = checks.speed_check(ratio, base_tps, tps, limit, note=note)
    return check, ratio, [r.command for r in runs]


def _treatment_json(ev: Any, cmp: Any) -> dict:
    p = ev.perplexity
    return {
        "ppl": p.ppl,
        "ppl_err": p.ppl_err,
        "chunk_ppls": list(p.chunk_ppls),
        "delta_ppl": cmp.delta_ppl,
        "delta_ppl_pct": cmp.delta_ppl_pct,
        "delta_ppl_pct_err": cmp.delta_ppl_pct_err,
        "kld": msgspec.to_builtins(p.kld),  # the dicts of this module hold floats
        "tokens_per_s": p.tokens_per_s,
        "speed_ratio": _speed_ratio(cmp.baseline_ppl_tokens_per_s, cmp.ppl_tokens_per_s),
        "gen_tokens_per_s": cmp.gen_tokens_per_s,
        "baseline_gen_tokens_per_s": cmp.baseline_gen_tokens_per_s,
        "load_time_ms": ev.load.load_time_ms,
        "generations": [_gen_json(g) for g in ev.generations],
        "agreement": _agreement_json(cmp),
    }


def _agreement_json(cmp: Any) -> dict | None:
    per_prompt = [
        {
            "prompt": a.prompt,
            "chat": a.chat,
            "same_text": a.same_text,
            "token_agreement": a.token_agreement,
            "first_divergence": a.first_divergence,
        }
        for a in cmp.agreement
    ]
    if not per_prompt:
        return None
    vals = [a["token_agreement"] for a in per_prompt if a["token_agreement"] is not None]
    divs = [a["first_divergence"] for a in per_prompt if a["first_divergence"] is not None]
    return {
        "token_agreement": min(vals) if vals else None,
        "first_divergence": min(divs) if divs else None,
        "per_prompt": per_prompt,
    }


def _load_check(ev: Any) -> dict:
    return checks.to_json(checks.load_check(ev.load.ok, ev.load.load_time_ms, ev.load.error))


def _generate_check(ev: Any) -> dict:
    gens = [(g.prompt, g.chat, g.n_tokens, g.text) for g in ev.generations]
    return checks.to_json(checks.generate_check(gens))


placebo_verdict = checks.placebo_verdict


def _placebo_check(placebo: dict, limit: float | None, error: str | None = None) -> dict:
    kl = placebo.get("kld_mean") or {}
    return checks.to_json(
        checks.placebo_check(
            placebo["kld_ratio"],
            placebo["verdict"],
            len(placebo["seeds"]),
            kl.get("min"),
            kl.get("max"),
            limit,
            error,
        )
    )


# --- placebo runs ---------------------------------------------------------------------------


def placebo_key(
    model: ModelRef,
    corpus: Corpus,
    tools: LlamaTools,
    exp: Experiment,
    layers: str,
    seed: int,
    *,
    base_sha256: str,
) -> str:
    """`base_sha256`: the baseline logits the placebo is compared with (its numbers depend
    on their content, not on the baseline's key)."""
    s = exp.settings
    return Identity(
        model_sha256=model.sha256,
        layers=layers,
        tensors=tuple(exp.tensors),
        seed=seed,
        corpus_sha256=corpus.sha256,
        base_sha256=base_sha256,
        llama_build=tools.build_id,
        settings={
            "ctx": s.ctx,
            "batch": s.batch,
            "chunks": s.chunks,
            "kld_chunks": s.kld_chunks,
            "engine": getattr(s, "engine", "llama-perplexity"),
        },
        fq_version=__version__,
    ).key("placebo")


def _placebo_run(payload: dict) -> dict:
    """A cached placebo has the record's shape (record.PlaceboRun) or is not one; its
    numbers are read as floats (storage.codec: "nan" in the file is NaN here)."""
    run = codec.convert({k: v for k, v in payload.items() if k != "commands"}, record.PlaceboRun)
    if not isinstance(payload.get("commands", []), list):
        raise TypeError("commands is not a list")
    floats = msgspec.to_builtins(run)
    return {k: floats.get(k, v) for k, v in payload.items()}


def run_placebo(
    model: ModelRef,
    baseline: Any,
    ctx: Context,
    exp: Experiment,
    layers: str,
    seed: int,
) -> tuple[dict, cache.Entry]:
    """One placebo run, a verified cache entry shared across stages, runs and workers:
    (record, its cache entry)."""
    key = placebo_key(
        model, ctx.corpus, ctx.tools, exp, layers, seed, base_sha256=baseline.kld_base_sha256
    )

    def compute(folder: Path) -> dict:
        dst = folder / f"{results.safe_name(model.name)}.placebo{seed}.gguf"
        with atomic.owned(dst):  # the GGUF lives only while it is evaluated
            manifest = patch.fake_quantize_file(
                model.path,
                dst,
                layers=layers,
                tensors=exp.tensors,
                fmt="placebo",
                seed=seed,
                force=True,
                fsync=False,
            )
            ref = replace(
                model,
                name=f"{model.name}+placebo{seed}",
                path=dst,
                sha256=manifest.output.sha256,
                spec=None,
            )
            ev = perplexity_only(ctx, ref, baseline, exp.settings)
            cmp = _evaluate().compare(baseline, ev)
        kld = ev.perplexity.kld
        return {
            "seed": seed,
            "key": key,
            "layers": layers,
            "manifest": manifest.path,
            "changed": manifest.total_changed,
            "n_elements": manifest.total_elements,
            "ppl": ev.perplexity.ppl,
            "ppl_err": ev.perplexity.ppl_err,
            "delta_ppl_pct": cmp.delta_ppl_pct,
            "delta_ppl_pct_err": cmp.delta_ppl_pct_err,
            "kld_mean": kld.mean if kld else None,
            "same_top_pct": kld.same_top_pct if kld else None,
            "kld": kld,
            "commands": commands_json(f"placebo seed {seed}", ppl_commands(ev)),
        }

    entry = cache.verified("placebos", key, "placebo.json", compute, decode=_placebo_run)
    return entry.value, entry


def _as_baseline(treated: ModelRef, baseline: Any):
    """The evaluation of a file byte-identical to the baseline's: the baseline's own numbers,
    with the KL divergence of a model against itself (zero, every top token the same)."""
    zero = record.KLD(
        mean=0.0,
        mean_err=0.0,
        median=0.0,
        p90=0.0,
        p99=0.0,
        p999=0.0,
        max=0.0,
        same_top_pct=100.0,
        same_top_err=0.0,
        rms_dp_pct=0.0,
        ppl_ratio=1.0,
    )
    ppl = replace(baseline.perplexity, kld=zero, tokens_per_s=None)
    return _evaluate().ModelEvaluation(treated, baseline.load, baseline.generations, ppl, ppl)


def perplexity_only(ctx: Context, model: ModelRef, baseline: Any, settings: EvalSettings):
    """A placebo needs no load or generation check: one llama-perplexity run for PPL and KLD."""
    ev = _evaluate()
    s = settings
    perplexity = ev.ppl_call(ctx.runner, s)  # llama-perplexity, or the exact engine
    kld_run = perplexity(model, ctx.corpus.path, chunks=s.kld_chunks, kl_against=baseline.kld_base)
    ppl = kld_run
    if s.chunks != s.kld_chunks:
        plain = perplexity(model, ctx.corpus.path, chunks=s.chunks)
        ppl = replace(plain, kld=kld_run.kld)
    return ev.ModelEvaluation(model, None, (), ppl, kld_run)


def ppl_commands(ev: Any) -> list:
    runs = [ev.perplexity]
    if ev.kld_perplexity is not None and ev.kld_perplexity is not ev.perplexity:
        runs.append(ev.kld_perplexity)
    return [r.command for r in runs]


def _placebo_summary(runs: list[dict], seeds: Sequence[int], treatment_kld: float | None) -> dict:
    klds = [r["kld_mean"] for r in runs if r.get("kld_mean") is not None]
    ratio, verdict = placebo_verdict(treatment_kld, klds) if seeds else (None, "control not run")
    return {
        "seeds": list(seeds),
        "runs": [{k: v for k, v in r.items() if k != "commands"} for r in runs],
        "kld_mean": _minmaxmean(klds),
        "delta_ppl_pct": _minmaxmean([r.get("delta_ppl_pct") for r in runs]),
        "same_top_pct": _minmaxmean([r.get("same_top_pct") for r in runs]),
        "kld_ratio": ratio,
        "verdict": verdict,
    }


def _compared(numeric: dict, treatment: dict, placebo: dict) -> dict:
    """The treatment against its placebos, category and words: decided here, rendered by the
    report."""
    d, same = placebo.get("delta_ppl_pct") or {}, placebo.get("same_top_pct") or {}
    kld = treatment.get("kld") or {}
    compared = {
        "kld": checks.kld_vs_placebo(
            numeric.get("changed"), len(placebo["seeds"]), placebo["kld_ratio"], placebo["verdict"]
        ),
        "delta_ppl": checks.delta_vs_placebo(
            treatment.get("delta_ppl_pct"), d.get("min"), d.get("max")
        ),
        "same_top": checks.same_top_vs_placebo(kld.get("same_top_pct"), same.get("min")),
    }
    return msgspec.to_builtins(compared)


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
    with atomic.owned(path.parent / "models" / f"{path.stem}.gguf", keep=exp.keep_models) as dst:
        return _run_stage(stage_, model, ctx, exp, dst)


def _run_stage(
    stage_: Stage, model: ModelRef, ctx: Context, exp: Experiment, dst: Path
) -> StageRecord:
    data = header(stage_, model, ctx, exp)
    found = data["checks"]
    save = lambda: results.save_result(data, ctx.results_root)  # noqa: E731
    save()
    log.info("%s %s: %s (%s)", stage_.title, stage_.id, model.name, exp.variant)

    def fail_rest(reason: str, names: Sequence[str]) -> None:
        for n in names:
            found.setdefault(n, _check("error", reason, gates=exp.thresholds.gates(n)))

    measured = model  # the file the stage patches and evaluates
    if exp.variant == "intrinsic":
        try:
            with progress.step("float twin"):
                measured = _twin().twin_for(model, exp.twin_dtype)
        except FqError as exc:
            fail_rest(f"no float twin of {model.name}: {_error(exc)}", CHECKS)
            return _finish(data, stage_, model, ctx, exp, dst)
        data["twin"] = {
            "path": str(measured.path),
            "sha256": measured.sha256,
            "dtype": exp.twin_dtype,
            "source_sha256": model.sha256,
        }
        save()

    # 1-2. fake quantization and its numeric effect
    # models/ keeps the GGUF and its manifest out of the results glob (<stage>/*.json)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        manifest = patch.fake_quantize_file(
            measured.path,
            dst,
            layers=stage_.layers,
            tensors=exp.tensors,
            fmt=exp.fmt,
            rounding=exp.rounding,
            force=True,
        )
        cmp_files = metrics.compare_files(measured.path, dst)
        found["quantize"] = _quantize_check(cmp_files, manifest)
        data["numeric"] = _numeric_json(manifest, measured.path, dst)
        found["numeric"] = _numeric_check(manifest, exp.thresholds.max_rel_error)
    except FqError as exc:
        found["quantize"] = _check("error", f"fake quantization failed: {_error(exc)}")
        fail_rest("no fake-quantized model (quantize failed)", CHECKS)
        return _finish(data, stage_, model, ctx, exp, dst)
    save()

    # 3-6, 8, 9. the treatment against the cached baseline (one llama-perplexity run for PPL+KLD)
    try:
        baseline = _evaluate().evaluate_baseline(ctx.runner, measured, ctx.corpus, exp.settings)
        data["baseline"] = _baseline_json(baseline)
        data["commands"] += [
            dict(c, cached=baseline.cached) for c in commands_json("baseline", baseline.commands())
        ]
        data["corpus"]["n_tokens"] = baseline.n_tokens
        data["cache"].append(baseline.provenance)
    except FqError as exc:
        fail_rest(f"baseline evaluation failed: {_error(exc)}", CHECKS)
        return _finish(data, stage_, model, ctx, exp, dst)
    save()

    treated = replace(
        measured, name=f"{measured.name}+{exp.fmt}", path=dst, sha256=manifest.output.sha256
    )
    identical = manifest.output.sha256 == measured.sha256
    try:
        treatment_cached = False
        if identical:  # the SHA-256 proves the outcome: llama.cpp would rerun the baseline
            ev = _as_baseline(treated, baseline)
        else:
            ev, entry = _evaluate().evaluate_against_cached(
                ctx.runner, treated, baseline, ctx.corpus, exp.settings
            )
            treatment_cached = entry.hit
            data["cache"].append(entry.provenance("treatment"))
    except FqError as exc:
        found["load"] = _check("failed", f"llama.cpp failed on the treated model: {_error(exc)}")
        fail_rest("treated model not evaluated (llama.cpp failed)", CHECKS)
        return _finish(data, stage_, model, ctx, exp, dst)
    cmp = _evaluate().compare(baseline, ev)
    data["commands"] += [
        dict(c, cached=treatment_cached)
        for c in commands_json("treatment", [] if identical else ev.commands())
    ]
    data["treatment"] = _treatment_json(ev, cmp)
    data["treatment"]["identical_to_baseline"] = identical
    if identical:  # nothing ran: no speed or load time of its own to report
        for key in ("tokens_per_s", "speed_ratio", "gen_tokens_per_s", "load_time_ms"):
            data["treatment"][key] = None
    found["load"] = _load_check(ev)
    found["generate"] = _generate_check(ev)
    if identical:
        same = f"byte-identical to the baseline (SHA-256 {measured.sha256[:12]}…): "
        found["load"] = _check("passed", same + "the baseline's load stands")
        found["generate"] = _check("passed", same + "the baseline's generations stand")
    t = exp.thresholds
    found["perplexity"] = checks.to_json(
        checks.perplexity_check(
            cmp.delta_ppl_pct,
            cmp.delta_ppl_pct_err,
            t.ppl_delta_max,
            baseline.perplexity.ppl,
            ev.perplexity.ppl,
        )
    )
    kld = ev.perplexity.kld
    found["kld"] = checks.to_json(
        checks.kld_check(
            kld.mean if kld else None,
            kld.same_top_pct if kld else None,
            t.kld_mean_max,
            t.same_top_min,
        )
    )
    agreement = data["treatment"]["agreement"] or {}
    found["agreement"] = checks.to_json(
        checks.agreement_check(
            agreement.get("token_agreement"), agreement.get("first_divergence"), t.agreement_min
        )
    )
    if identical:
        found["speed"] = _check(
            "skipped", "not run: the file is byte-identical to the baseline", gates=False
        )
    else:
        speed, data["treatment"]["speed_ratio"], speed_runs = _speed(
            ctx, exp, (measured, treated), baseline, ev, treatment_cached
        )
        found["speed"] = checks.to_json(speed)
        data["commands"] += commands_json("speed", speed_runs)
    save()
    if not exp.keep_models:
        dst.unlink(missing_ok=True)

    # 7. the selection-matched placebos: the engine's noise, against which an effect is read.
    # A byte-identical file has no effect to read, so its placebos would be minutes for nothing.
    if identical:
        treatment_kld = ev.perplexity.kld.mean if ev.perplexity.kld else None
        data["placebo"] = _placebo_summary([], (), treatment_kld)
        data["placebo"]["compared"] = _compared(data["numeric"], data["treatment"], data["placebo"])
        data["resolution"] = _resolution(exp, ev, [], identical)
        found["placebo"] = _check(
            "skipped",
            "not run: the treated file is byte-identical to the baseline "
            f"(SHA-256 {measured.sha256[:12]}…), so there is no effect to compare with the "
            "engine's noise",
            gates=False,
        )
        return _finish(data, stage_, model, ctx, exp, dst)
    runs: list[dict] = []
    placebo_error = None
    try:
        n = len(exp.placebo_seeds)
        for i, seed in enumerate(exp.placebo_seeds, start=1):
            with progress.step(f"placebo {i}/{n}"):
                run, entry = run_placebo(measured, baseline, ctx, exp, stage_.layers, seed)
                hit = entry.hit
                if hit:
                    progress.note("cached")
            data["cache"].append(entry.provenance(f"placebo seed {seed}"))
            run = dict(run, cached=hit)
            runs.append(run)
            data["commands"] += [dict(c, cached=hit) for c in run.get("commands", [])]
    except FqError as exc:
        placebo_error = _error(exc)
    treatment_kld = ev.perplexity.kld.mean if ev.perplexity.kld else None
    data["placebo"] = _placebo_summary(runs, exp.placebo_seeds, treatment_kld)
    data["placebo"]["compared"] = _compared(data["numeric"], data["treatment"], data["placebo"])
    found["placebo"] = _placebo_check(data["placebo"], t.noise_factor_max, placebo_error)
    data["resolution"] = _resolution(exp, ev, runs, identical)
    found["placebo"]["detail"] += f"; resolution: {data['resolution']['sentence']}"
    return _finish(data, stage_, model, ctx, exp, dst)


ENGINE_WORDS = {
    "llama-perplexity": "llama-perplexity --kl-divergence (16-bit base log-probabilities, "
    "F16 KV cache)",
    "logits": "full-precision logits through llama.cpp's library (F32 KV cache)",
}
VARIANT_WORDS = {"deployed": "as deployed", "intrinsic": "intrinsically"}


def _resolution(exp: Experiment, ev: Any, runs: Sequence[dict], identical: bool) -> dict:
    """The treatment's KLD against the floor this variant's own method measured."""
    from . import stats

    kld = ev.perplexity.kld
    engine = getattr(exp.settings, "engine", "llama-perplexity")
    res = stats.resolution(
        engine=ENGINE_WORDS.get(engine, engine),
        treatment_chunks=list(kld.chunk_means) if kld else [],
        treatment_mean=kld.mean if kld else None,
        placebo_chunks=[list((r.get("kld") or {}).get("chunk_means") or ()) for r in runs],
        placebo_means=[r.get("kld_mean") for r in runs],
        identical=identical,
        label=VARIANT_WORDS[exp.variant],
    )
    return msgspec.to_builtins(res)


def _twin():
    from ..measurement import twin

    return twin


def _finish(
    data: dict, stage_: Stage, model: ModelRef, ctx: Context, exp: Experiment, dst: Path
) -> StageRecord:
    data["checks"] = {n: data["checks"][n] for n in CHECKS if n in data["checks"]}
    data["outcome"] = outcome(data["checks"])
    data["finished_at"] = results.utc_now()
    if not exp.keep_models:
        dst.unlink(missing_ok=True)
    rec = record.from_builtins(codec.to_builtins(data), source=f"{stage_.id}/{model.name}")
    results.save_result(rec, ctx.results_root)
    if stage_.id == GATE_STAGE.id and exp.variant == exp.gate_variant:
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
