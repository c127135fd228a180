"""One target's run: convert (or reuse a cached conversion), lint, run the artifact in a child
process, compare with the reference. Every failure ends in this target's report."""
from __future__ import annotations

import shutil
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert import staging as stg
from mtconvert.backends.base import (Artifact, Backend, Finding, PreparedSource,
                                     format_shapes, import_path)
from mtconvert.cache import ConversionCache
from mtconvert.errors import (BackendUnavailableError, ConversionError, MtConvertError,
                              RuntimeUnavailable, StepError, UsageError)
from mtconvert.options import ConvertOptions
from mtconvert.registry import Registry
from mtconvert.report import Conversion, Latency, Memory, Numerics, TargetReport
from mtconvert.timing import Clock
from mtconvert.validators import compare
from mtconvert.worker import SessionResult, run_session

Progress = Callable[[str], None]


@dataclass
class RunContext:
    """What every target of one run shares."""

    registry: Registry
    src: PreparedSource
    feeds: dict[str, np.ndarray]
    ref_out: dict[str, np.ndarray]
    opts: ConvertOptions
    say: Progress
    cache: ConversionCache
    report_name: str | None = None  # validate mode: a name per artifact file
    # dynamic-shape sweep: (feeds, reference outputs) at every extra shape
    sweep: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = field(default_factory=list)
    reference_info: dict[str, Any] | None = None  # {runtime, version}, for golden bundles
    # conversions may overlap; timed validation runs never do, or latency figures would lie
    validate_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def target_feeds(self) -> dict[str, np.ndarray]:
        return {s.name: self.feeds[s.name] for s in self.src.inputs}


def run_target(ctx: RunContext, name: str) -> TargetReport:
    opts = ctx.opts
    try:
        backend = _backend(ctx.registry, name)
        backend.check_precision(opts.precision)
    except UsageError as exc:
        return TargetReport(name, "skipped", str(exc), precision=opts.precision)
    except MtConvertError as exc:
        return TargetReport(name, "error", str(exc), precision=opts.precision)
    out_dir = Path(opts.out_dir).resolve()
    staging = stg.new_staging(out_dir, name)
    log_path = staging / f"{ctx.src.name}.{name}.log"
    try:
        return _convert_and_validate(ctx, backend, staging, out_dir)
    except StepError as exc:  # the log moves to --out; the report points there
        return _error_report(name, opts, exc.reason, log_path, out_dir)
    except MtConvertError as exc:
        return _error_report(name, opts, str(exc), log_path, out_dir)
    except Exception as exc:  # a bug in a backend or a tool: this target's error, not the run's
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as fh:
            fh.write(traceback.format_exc())
        return _error_report(name, opts, f"unexpected {type(exc).__name__}: {exc}", log_path,
                             out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _backend(registry: Registry, name: str) -> Backend:
    cls = registry.get(name)
    av = cls.availability()
    if not av.can_convert:
        raise BackendUnavailableError(name, av.missing, cls.extra)
    return cls()


def _convert(ctx: RunContext, backend: Backend, staging: Path,
             route: str = "") -> tuple[Artifact, Conversion]:
    topts = ctx.opts.target_options(route)
    key = ctx.cache.key(type(backend), ctx.src, topts)
    hit = ctx.cache.load(key, staging, ctx.src.work_dir / backend.name)
    if hit is not None:
        artifact, seconds = hit
        ctx.say(f"{backend.name}: reusing the cached conversion")
        return artifact, Conversion(seconds, artifact.steps, artifact.tool_versions, cached=True)
    clock = Clock()
    ctx.say(f"{backend.name}: converting" + (f" (route {route})" if route else ""))
    artifact = backend.convert(ctx.src, staging, topts)
    seconds = clock.lap("convert_s")
    ctx.cache.store(key, artifact, staging, seconds)
    return artifact, Conversion(seconds, artifact.steps, artifact.tool_versions)


def _convert_and_validate(ctx: RunContext, backend: Backend, staging: Path,
                          out_dir: Path) -> TargetReport:
    routes = backend.routes(ctx.src) or [""]
    if len(routes) == 1:
        clock = Clock()
        artifact, conversion = _convert(ctx, backend, staging, routes[0])
        clock.lap("convert_s")
        artifact = stg.commit(artifact, staging, out_dir)
        report = check_artifact(ctx, backend, artifact, conversion, clock)
        return _bundled(ctx, artifact, report, out_dir)
    return _first_passing_route(ctx, backend, routes, staging, out_dir)


def _first_passing_route(ctx: RunContext, backend: Backend, routes: list[str], staging: Path,
                         out_dir: Path) -> TargetReport:
    """Convert and validate each route in its own staging area; commit the first that passes.
    If none passes, commit the first route that produced an artifact (its failed or error
    report stands); if none produced one, raise with every route's reason."""
    rejected: list[str] = []
    first: tuple | None = None
    for route in routes:
        area = staging / route
        area.mkdir()
        clock = Clock()
        try:
            artifact, conversion = _convert(ctx, backend, area, route)
        except StepError as exc:
            rejected.append(f"route {route} rejected: {exc.reason}")
            _move_log(area, staging)
            continue
        clock.lap("convert_s")
        report = check_artifact(ctx, backend, artifact, conversion, clock)
        if report.status == "passed":
            return _commit_route(ctx, report, artifact, conversion, area, out_dir, route,
                                 rejected)
        rejected.append(f"route {route} rejected: {report.status}: {report.reason}")
        first = first or (report, artifact, conversion, area, route)
    if first is None:
        raise ConversionError("; ".join(rejected), target=backend.name)
    report, artifact, conversion, area, route = first
    others = [r for r in rejected if not r.startswith(f"route {route} ")]
    return _commit_route(ctx, report, artifact, conversion, area, out_dir, route, others)


def _commit_route(ctx: RunContext, report: TargetReport, artifact: Artifact,
                  conversion: Conversion, area: Path, out_dir: Path, route: str,
                  rejected: list[str]) -> TargetReport:
    committed = stg.commit(artifact, area, out_dir)
    steps = (*rejected, f"route {route}: chosen ({report.status})", *conversion.steps)
    report = replace(report, artifacts=stg.file_entries(committed),
                     log=str(committed.log_path) if committed.log_path else None,
                     conversion=replace(conversion, steps=steps))
    return _bundled(ctx, committed, report, out_dir)


def _bundled(ctx: RunContext, artifact: Artifact, report: TargetReport,
             out_dir: Path) -> TargetReport:
    """--bundle: write the golden bundle of a validated artifact (not of one that errored)."""
    if not ctx.opts.extra.get("bundle") or report.numerics is None:
        return report
    from mtconvert import bundle

    where = bundle.write(ctx, artifact, report, out_dir)
    return replace(report, conversion=replace(
        report.conversion, steps=(*report.conversion.steps, f"golden bundle: {where}")))


def _move_log(area: Path, staging: Path) -> None:
    for log in area.glob("*.log"):
        log.replace(staging / log.name)


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
        input_shapes={k: list(v.shape) for k, v in ctx.target_feeds.items()})
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        return TargetReport(status="failed", reason="; ".join(f.message for f in errors), **base)
    if not type(backend).availability().can_run:
        return TargetReport(status="skipped", reason="artifact cannot be run on this machine",
                            **base)
    try:
        with ctx.validate_lock:
            ctx.say(f"{name}: validating")
            result = _session(ctx, backend, artifact.to_dict(), opts.warmup, opts.iterations)
    except RuntimeUnavailable as exc:
        return TargetReport(status="skipped", reason=f"numerics not checked: {exc.reason}",
                            **base)
    except StepError as exc:  # the artifact is finished and kept; running it failed
        return TargetReport(status="error", reason=exc.reason, **base)
    numerics = numerics_of(ctx.ref_out, result.outputs, opts, profile_of(artifact),
                           result.runtime)
    if "fp32_variant" in artifact.meta:
        numerics = _with_fp32_change(ctx, backend, artifact, numerics, result.outputs)
    sweep = _sweep(ctx, backend, artifact)
    clock.lap("validate_s")
    diagnostics = None
    if opts.localize or not numerics.passed:
        from mtconvert.localize import localize

        ctx.say(f"{name}: localizing the first divergence")
        diagnostics = localize(
            ctx, backend, artifact, profile_of(artifact), converted=conversion is not None,
            nonfinite_outputs=not all(np.isfinite(v).all() for v in result.outputs.values()
                                      if v.dtype.kind == "f"))
        clock.lap("localize_s")
    bad = [f"shape {format_shapes(e['input_shapes'])}: {e['reason']}" for e in sweep
           if e["status"] in ("failed", "error")]
    reasons = ([] if numerics.passed else [_numerics_reason(numerics)]) + bad
    return TargetReport(status="failed" if reasons else "passed",
                        reason="; ".join(reasons) or None, sweep=sweep, diagnostics=diagnostics,
                        numerics=numerics, latency=latency_of(result.latency, opts.threads),
                        latency_unavailable=result.latency_unavailable,
                        memory=Memory(round(result.peak_rss_mb, 1),
                                      round(result.baseline_rss_mb, 1)), **base)


def _sweep(ctx: RunContext, backend: Backend, artifact: Artifact) -> tuple[dict[str, Any], ...]:
    """Validate the artifact at every extra shape of a dynamic-shape sweep (one run each)."""
    entries = []
    made_for = format_shapes({k: v.shape for k, v in ctx.target_feeds.items()})
    for feeds, ref_out in ctx.sweep:
        shapes = {s.name: list(feeds[s.name].shape) for s in ctx.src.inputs}
        entry: dict[str, Any] = {"input_shapes": shapes, "status": "skipped", "worst": None,
                                 "reason": f"the artifact is fixed to {made_for}"}
        if not type(backend).fixed_shapes:
            try:
                result = _session(ctx, backend, artifact.to_dict(), 0, 1, feeds)
                n = numerics_of(ref_out, result.outputs, ctx.opts, profile_of(artifact),
                                result.runtime)
                entry |= {"status": "passed" if n.passed else "failed", "worst": n.worst,
                          "reason": None if n.passed else _numerics_reason(n)}
            except StepError as exc:
                entry |= {"status": "error", "reason": exc.reason}
        entries.append(entry)
    return tuple(entries)


def profile_of(artifact: Artifact) -> str:
    """The tolerance profile: the precision's, unless the backend names another (weights
    compressed by palettization are judged like int8 weights, whatever the compute precision)."""
    return artifact.meta.get("tolerance_profile", artifact.precision)


def _session(ctx: RunContext, backend: Backend, artifact: dict[str, Any], warmup: int,
             iterations: int, feeds: dict[str, np.ndarray] | None = None) -> SessionResult:
    feeds = ctx.target_feeds if feeds is None else {s.name: feeds[s.name] for s in ctx.src.inputs}
    return run_session(name=backend.name,
                       backend=import_path(type(backend)),
                       artifact=artifact, feeds=feeds, threads=ctx.opts.threads,
                       warmup=warmup, iterations=iterations, timeout_s=ctx.opts.timeout_s)


def numerics_of(ref_out: dict[str, np.ndarray], out: dict[str, np.ndarray], opts: ConvertOptions,
                precision: str, runtime: str) -> Numerics:
    results = [compare.compare_output(n, r, out.get(n), opts.tolerances.resolve(precision, n))
               for n, r in ref_out.items()]
    w = compare.worst(results)
    worst = None if w is None else {"output": w.name, "max_abs": w.metrics.get("max_abs"),
                                    "cosine": w.metrics.get("cosine")}
    return Numerics(passed=all(r.passed for r in results), runtime=runtime, worst=worst,
                    outputs={r.name: r.to_dict() for r in results})


def _with_fp32_change(ctx: RunContext, backend: Backend, artifact: Artifact, numerics: Numerics,
                      out: dict[str, np.ndarray]) -> Numerics:
    """Run the backend's fp32 twin of a reduced-precision artifact and record the change.
    The twin is a yardstick: if it cannot run, the artifact's own verdict stands."""
    try:
        twin = _session(ctx, backend, artifact.meta["fp32_variant"], 0, 1)
    except StepError as exc:
        return replace(numerics, fp32_worst={"error": exc.reason})
    fp32 = numerics_of(ctx.ref_out, twin.outputs, ctx.opts, "fp32", twin.runtime)
    change = {k: compare.metrics(twin.outputs[k], out[k]) for k in ctx.ref_out
              if k in out and k in twin.outputs and out[k].shape == twin.outputs[k].shape}
    return replace(numerics, fp32_worst=fp32.worst, vs_fp32=change)


def _numerics_reason(n: Numerics) -> str:
    bad = [f"{k}: {v['reason']}" for k, v in n.outputs.items() if not v["passed"]]
    return "numerics: " + "; ".join(bad)


def latency_of(d: dict[str, Any], threads: int) -> Latency | None:
    if not d:
        return None
    return Latency(**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()},
                   threads=threads)


def _error_report(name: str, opts: ConvertOptions, reason: str, log_path: Path,
                  out_dir: Path) -> TargetReport:
    """An errored target leaves only its log in --out (no half-written artifact)."""
    kept = stg.keep_log(log_path, out_dir)
    return TargetReport(name, "error", reason, precision=opts.precision,
                        log=str(kept) if kept else None)
