"""One artifact checked: lint, run in a child process, compare with the reference (and the fp32
twin, and every sweep shape), localize a divergence. Every failure ends in the TargetReport."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert import float_compare, localize as localize_mod, staging as stg
from mtconvert.backends.base import (Artifact, Backend, Finding, TensorSpec, format_shapes,
                                     import_path)
from mtconvert.errors import RuntimeUnavailable, StepError
from mtconvert.report import Conversion, Latency, Memory, Numerics, TargetReport
from mtconvert.run import accuracy, profile, timing
from mtconvert.run.context import RunContext
from mtconvert.timing import Clock
from mtconvert.validators import gates, latency
from mtconvert.worker import SessionResult, run_session


def check_artifact(ctx: RunContext, backend: Backend, artifact: Artifact,
                   conversion: Conversion | None, clock: Clock | None = None) -> TargetReport:
    """Lint an artifact, run it in a child process and compare it with the reference."""
    name, opts = backend.name, ctx.opts
    clock = clock or Clock()
    findings = backend.lint(artifact)
    if conversion is None and artifact.steps:  # adopted: how it was mapped
        findings.append(Finding("info", "adopted", "; ".join(artifact.steps)))
    clock.lap("lint_s")
    base: dict[str, Any] = dict(
        name=ctx.report_name or name, precision=artifact.precision,
        artifacts=stg.file_entries(artifact), conversion=conversion,
        findings=tuple(f.to_dict() for f in findings),
        log=str(artifact.log_path) if artifact.log_path else None, timings=clock.laps,
        input_shapes={k: list(v.shape) for k, v in ctx.target_feeds.items()},
        snippets=snippets(ctx, backend, artifact))
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        return TargetReport(status="failed", reason="; ".join(f.message for f in errors), **base)
    if not type(backend).availability().can_run:
        return TargetReport(status="skipped", reason="artifact cannot be run on this machine",
                            **base)
    try:
        with ctx.validate_lock:
            ctx.say(f"{name}: validating")
            result, timed, vs_ref = _run_and_time(ctx, backend, artifact)
            prof = _profile(ctx, backend, artifact) if opts.profile else None
    except RuntimeUnavailable as exc:
        return TargetReport(status="skipped", reason=f"numerics not checked: {exc.reason}",
                            **base)
    except StepError as exc:  # the artifact is finished and kept; running it failed
        return TargetReport(status="error", reason=exc.reason, **base)
    numerics = numerics_of(ctx, ctx.ref_out, result, artifact.profile)
    vs_float = float_compare.judge(ctx, result.outputs)
    if artifact.fp32_twin is not None:
        numerics = _with_fp32_change(ctx, backend, artifact.fp32_twin, numerics, result.outputs)
    sweep = _sweep(ctx, backend, artifact)
    clock.lap("validate_s")
    diagnostics = None
    if opts.localize or not numerics.passed:
        ctx.say(f"{name}: localizing the first divergence")
        diagnostics = localize_mod.localize(
            ctx, backend, artifact, artifact.profile, converted=conversion is not None,
            nonfinite_outputs=gates.nonfinite(result.outputs))
        clock.lap("localize_s")
    if artifact.precision == "int8" and not numerics.passed:  # which layers to keep in float
        from mtconvert import quant_error

        ctx.say(f"{name}: per-layer quantization error")
        diagnostics = (diagnostics or {}) | {
            "quantization_error": quant_error.layers(ctx, backend, artifact)}
    bad = [f"shape {format_shapes(e['input_shapes'])}: {e['reason']}" for e in sweep
           if e["status"] in ("failed", "error")]
    acc = _accuracy(ctx, backend, artifact)
    vs_float = float_compare.with_accuracy(ctx, vs_float, acc)
    if acc and not acc.get("passed", True):
        bad.append(gates.accuracy_reason(acc))
    status, reason = gates.verdict(
        ([] if numerics.passed else [gates.numerics_reason(numerics.outputs)]) + bad)
    return TargetReport(status=status, reason=reason, sweep=sweep, diagnostics=diagnostics,
                        numerics=numerics, latency=latency_of(timed, opts.threads),
                        latency_unavailable=result.latency_unavailable,
                        latency_vs_reference=vs_ref, accuracy=acc, profile=prof,
                        memory=Memory(round(result.peak_rss_mb, 1),
                                      round(result.baseline_rss_mb, 1)),
                        compressed={"vs_float": vs_float} if vs_float else None, **base)


def snippets(ctx: RunContext, backend: Backend, artifact: Artifact) -> dict[str, str]:
    """The backend's deployment snippets for the artifact, at the validated shapes (outputs
    shaped as the reference's). A convenience: a backend whose hook fails gets none."""
    ins = [TensorSpec(k, tuple(v.shape), str(v.dtype)) for k, v in ctx.target_feeds.items()]
    outs = [TensorSpec(s.name, tuple(ctx.ref_out[s.name].shape) if s.name in ctx.ref_out
                       else s.shape, s.dtype) for s in ctx.src.outputs]
    try:
        return dict(backend.snippets(artifact, ins, outs))
    except Exception as exc:  # noqa: BLE001 - never the target's failure
        ctx.say(f"{backend.name}: no deployment snippets ({type(exc).__name__}: {exc})")
        return {}


def _profile(ctx: RunContext, backend: Backend, artifact: Artifact) -> dict[str, Any]:
    """--profile: the artifact's top operators by time, from its runtime's profiler."""
    ctx.say(f"{backend.name}: profiling operators")
    return profile.measure(backend.name, import_path(type(backend)), artifact.to_dict(),
                           ctx.target_feeds, ctx.opts.threads, ctx.opts.iterations,
                           ctx.opts.timeout_s)


def _accuracy(ctx: RunContext, backend: Backend, artifact: Artifact) -> dict[str, Any] | None:
    """--eval-data: the task metric of the target against the reference's (None without)."""
    if ctx.evals is None:
        return None
    ctx.say(f"{backend.name}: task accuracy on {ctx.evals.items} items")
    try:
        return accuracy.measure(ctx.evals, backend, artifact, ctx.opts)
    except (StepError, ValueError) as exc:
        return {"error": getattr(exc, "reason", str(exc)), "passed": False}


def _can_interleave(ctx: RunContext) -> bool:
    """The reference can be timed beside the target when the source is here (not in verify
    mode, whose bundle holds no source model)."""
    return ctx.src.torch_module is not None or Path(ctx.src.onnx_path).is_file()


def _run_and_time(ctx: RunContext, backend: Backend, artifact: Artifact
                  ) -> tuple[SessionResult, dict[str, Any], dict[str, Any] | None]:
    """(the artifact's outputs and memory, its latency statistics, its comparison with the
    reference). Where the reference can be timed beside it, one warm child gives the outputs
    and is then timed interleaved with the run's shared reference; else one run times it
    alone."""
    opts = ctx.opts
    if not _can_interleave(ctx):
        result = session(ctx, backend, artifact, opts.warmup, opts.iterations)
        return result, result.latency, None
    with timing.target_session(backend, artifact, ctx.target_feeds, opts) as warm:
        result = warm.result()
        if result.latency_unavailable:
            return result, {}, None
        ctx.say(f"{backend.name}: timing against the reference, interleaved")
        timed, vs_ref = _interleaved(ctx, backend, artifact, warm)
    return result, timed, vs_ref


def _interleaved(ctx: RunContext, backend: Backend, artifact: Artifact, warm: Any = None
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the target's latency statistics, its comparison with the reference), both from one
    interleaved timing. If the two cannot be timed together, the target alone, as before."""
    opts = ctx.opts
    try:
        vs = timing.versus_reference(ctx.src, backend, artifact, ctx.target_feeds, opts,
                                     reference=ctx.reference, target=warm)
    except (StepError, OSError) as exc:
        alone = session(ctx, backend, artifact, opts.warmup, opts.iterations)
        return alone.latency, {"error": getattr(exc, "reason", str(exc))}
    samples = vs.pop("target_samples_ms")
    return latency.summarize(samples, opts.warmup).to_dict(), vs


def _sweep(ctx: RunContext, backend: Backend, artifact: Artifact) -> tuple[dict[str, Any], ...]:
    """Validate the artifact at every extra shape of a dynamic-shape sweep (one run each)."""
    entries = []
    made_for = format_shapes({k: v.shape for k, v in ctx.target_feeds.items()})
    for feeds, ref_out in ctx.sweep:
        shapes = {s.name: list(feeds[s.name].shape) for s in ctx.src.inputs}
        entry: dict[str, Any] = {"input_shapes": shapes, "status": "skipped", "worst": None,
                                 "reason": f"the artifact is fixed to {made_for}"}
        if backend.runs_other_shapes(artifact):
            try:
                result = session(ctx, backend, artifact, 0, 1, feeds)
                n = numerics_of(ctx, ref_out, result, artifact.profile)
                entry |= {"status": "passed" if n.passed else "failed", "worst": n.worst,
                          "reason": None if n.passed else gates.numerics_reason(n.outputs)}
            except StepError as exc:
                entry |= {"status": "error", "reason": exc.reason}
        entries.append(entry)
    return tuple(entries)


def session(ctx: RunContext, backend: Backend, artifact: Artifact, warmup: int,
            iterations: int, feeds: dict[str, np.ndarray] | None = None) -> SessionResult:
    """Run ``artifact`` in the isolated worker on the run's feeds (or ``feeds``)."""
    feeds = ctx.target_feeds if feeds is None else {s.name: feeds[s.name] for s in ctx.src.inputs}
    return run_session(name=backend.name, backend=import_path(type(backend)),
                       artifact=artifact.to_dict(), feeds=feeds, threads=ctx.opts.threads,
                       warmup=warmup, iterations=iterations, timeout_s=ctx.opts.timeout_s)


def numerics_of(ctx: RunContext, ref_out: dict[str, np.ndarray], result: SessionResult,
                profile: str) -> Numerics:
    j = gates.judge(ref_out, result.outputs,
                    lambda name: ctx.opts.tolerances.resolve(profile, name))
    return Numerics(passed=j.passed, runtime=result.runtime, worst=j.worst, outputs=j.outputs)


def _with_fp32_change(ctx: RunContext, backend: Backend, twin: Artifact, numerics: Numerics,
                      out: dict[str, np.ndarray]) -> Numerics:
    """Run the backend's fp32 twin of a reduced-precision artifact and record the change.
    The twin is a yardstick: if it cannot run, the artifact's own verdict stands."""
    try:
        result = session(ctx, backend, twin, 0, 1)
    except StepError as exc:
        return replace(numerics, fp32_worst={"error": exc.reason})
    fp32 = numerics_of(ctx, ctx.ref_out, result, "fp32")
    change = gates.change({k: v for k, v in result.outputs.items() if k in ctx.ref_out}, out)
    return replace(numerics, fp32_worst=fp32.worst, vs_fp32=change)


def latency_of(d: dict[str, Any], threads: int) -> Latency | None:
    if not d:
        return None
    return Latency(**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()},
                   threads=threads)
