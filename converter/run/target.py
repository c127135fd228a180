"""One target converted: through each of the backend's routes (or from the cache), the first
artifact that passes its check kept, a golden bundle written. Every failure ends in this
target's report."""
from __future__ import annotations

import shutil
import traceback
from dataclasses import replace
from pathlib import Path

from mtconvert import bundle, quantized, staging as stg
from mtconvert.backends.base import Artifact, Backend
from mtconvert.errors import (BackendUnavailableError, ConversionError, MtConvertError,
                              StepError, UsageError)
from mtconvert.options import ConvertOptions
from mtconvert.registry import Registry
from mtconvert.report import Conversion, TargetReport
from mtconvert.run import fallback
from mtconvert.run.check import check_artifact
from mtconvert.run.context import RunContext
from mtconvert.timing import Clock


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
        plan = quantized.plan_for(ctx.src, name, backend.precisions, opts.precision)
        return quantized.summary(_convert_and_validate(ctx, backend, staging, out_dir, plan),
                                 name, plan)
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


def _convert(ctx: RunContext, backend: Backend, staging: Path, route: str = "",
             plan: dict | None = None, keep_float: tuple[str, ...] = ()
             ) -> tuple[Artifact, Conversion]:
    """A quantized source (``plan``) reaches the backend as the plan says (dequantized and
    re-compressed, or as it is) and is judged by the int8-source profile. ``keep_float``: the
    float fallback's source nodes (mtconvert.run.fallback)."""
    topts = replace(ctx.opts.target_options(route), keep_float=keep_float)
    src, topts = quantized.lowered(ctx.src, backend.name, topts, plan)
    artifact, conversion = _convert_source(ctx, backend, staging, src, topts, route)
    if plan is None:
        return artifact, conversion
    artifact = quantized.judged(artifact, plan)
    return artifact, replace(conversion, steps=artifact.steps)


def _convert_source(ctx: RunContext, backend: Backend, staging: Path, src, topts,
                    route: str) -> tuple[Artifact, Conversion]:
    key = ctx.cache.key(type(backend), src, topts)
    hit = ctx.cache.load(key, staging, src.work_dir / backend.name)
    if hit is not None:
        artifact, seconds = hit
        ctx.say(f"{backend.name}: reusing the cached conversion")
        return artifact, Conversion(seconds, artifact.steps, artifact.tool_versions, cached=True)
    clock = Clock()
    ctx.say(f"{backend.name}: converting" + (f" (route {route})" if route else ""))
    artifact = backend.convert(src, staging, topts)
    seconds = clock.lap("convert_s")
    ctx.cache.store(key, artifact, staging, seconds)
    return artifact, Conversion(seconds, artifact.steps, artifact.tool_versions)


def _convert_and_validate(ctx: RunContext, backend: Backend, staging: Path,
                          out_dir: Path, plan: dict | None = None) -> TargetReport:
    routes = backend.routes(ctx.src) or [""]
    if len(routes) == 1:
        clock = Clock()
        artifact, conversion = _convert(ctx, backend, staging, routes[0], plan)
        clock.lap("convert_s")
        artifact = stg.commit(artifact, staging, out_dir)
        report = check_artifact(ctx, backend, artifact, conversion, clock)
        outcome = _float_fallback(ctx, backend, report, staging, routes[0], plan)
        if outcome.chosen is not None:  # the fallback's artifact replaces the failing one
            for p in (*artifact.files, artifact.log_path):
                if p is not None and p.is_file():
                    p.unlink()
            new, _, area = outcome.chosen
            new = stg.commit(new, area, out_dir)
            report = replace(outcome.report, artifacts=stg.file_entries(new),
                             log=str(new.log_path) if new.log_path else None)
            return _bundled(ctx, new, report, out_dir)
        return _bundled(ctx, artifact, outcome.report, out_dir)
    return _first_passing_route(ctx, backend, routes, staging, out_dir, plan)


def _float_fallback(ctx: RunContext, backend: Backend, report: TargetReport, staging: Path,
                    route: str, plan: dict | None) -> fallback.Outcome:
    """A failing int8 artifact converted again with its worst layers in float
    (mtconvert.run.fallback), each round in its own staging area."""
    def convert(keep: tuple[str, ...]) -> tuple[Artifact, Conversion, Path]:
        area = staging / f"float-fallback-{len(keep)}"
        area.mkdir()
        artifact, conversion = _convert(ctx, backend, area, route, plan, keep)
        return artifact, conversion, area

    return fallback.attempt(ctx, backend, report, plan, convert,
                            lambda a, c: check_artifact(ctx, backend, a, c))


def _first_passing_route(ctx: RunContext, backend: Backend, routes: list[str], staging: Path,
                         out_dir: Path, plan: dict | None = None) -> TargetReport:
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
            artifact, conversion = _convert(ctx, backend, area, route, plan)
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
    outcome = _float_fallback(ctx, backend, report, staging, route, plan)
    report = outcome.report
    if outcome.chosen is not None:
        artifact, conversion, area = outcome.chosen
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
    if ctx.opts.bundle is None or report.numerics is None:
        return report
    where = bundle.write(ctx.opts.bundle, ctx, artifact, report, out_dir)
    return replace(report, conversion=replace(
        report.conversion, steps=(*report.conversion.steps, f"golden bundle: {where}")))


def _move_log(area: Path, staging: Path) -> None:
    for log in area.glob("*.log"):
        log.replace(staging / log.name)


def _error_report(name: str, opts: ConvertOptions, reason: str, log_path: Path,
                  out_dir: Path) -> TargetReport:
    """An errored target leaves only its log in --out (no half-written artifact)."""
    kept = stg.keep_log(log_path, out_dir)
    return TargetReport(name, "error", reason, precision=opts.precision,
                        log=str(kept) if kept else None)
