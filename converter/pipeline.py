"""The conversion pipeline: source -> reference -> per target convert, lint, run, compare.

Data flows one way; each target's failure is recorded in its report and never stops the others.
Artifacts are written to a staging folder inside --out and moved in only when the target finishes.
"""
from __future__ import annotations

import datetime as _dt
import shutil
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert import __version__, inputs as feeds_mod, source as source_mod
from mtconvert.backends.base import Artifact, Backend, PreparedSource, TargetOptions
from mtconvert.errors import (BackendUnavailableError, MtConvertError, RuntimeUnavailable,
                              StepError, UsageError)
from mtconvert.options import ConvertOptions
from mtconvert.reference import Reference, open_reference
from mtconvert.registry import Registry, default_registry
from mtconvert.report import (ArtifactFile, Conversion, Latency, Memory, Numerics, ReferenceInfo,
                              Report, SourceInfo, TargetMap, TargetReport)
from mtconvert.validators import compare
from mtconvert.validators.latency import measure
from mtconvert.worker import run_session

Progress = Callable[[str], None]


def run(model: Any, opts: ConvertOptions, *, example_inputs: Any = None,
        registry: Registry | None = None, progress: Progress | None = None) -> Report:
    registry = registry or default_registry()
    say = progress or (lambda _msg: None)
    names = resolve_targets(registry, opts.targets)
    clock = _Clock()
    with tempfile.TemporaryDirectory(prefix="mtconvert-") as tmp:
        say("loading source")
        loaded = source_mod.load(model, Path(tmp), example_inputs)
        feeds, values = feeds_mod.prepare(loaded, opts)
        src = loaded.prepared
        src.input_shapes = {k: tuple(v.shape) for k, v in feeds.items()}
        settings = opts.settings()
        if opts.precision == "int8":
            calib, how = feeds_mod.calibration_set(loaded, opts, feeds, Path(tmp) / "calib.npz")
            opts = replace(opts, calibration=calib)
            settings["calibration"] = how
        clock.lap("load_source_s")
        say(f"reference: running {src.format} source")
        ref = open_reference(src, opts.threads)
        ref_out = ref.run(feeds)
        ref_latency = measure(lambda: ref.run(feeds), warmup=opts.warmup,
                              iterations=opts.iterations)
        clock.lap("reference_s")
        reports = []
        for name in names:
            say(f"{name}: converting")
            reports.append(run_target(registry, name, src, feeds, ref_out, opts, say))
    return Report(source=_source_info(loaded, feeds, values),
                  reference=ReferenceInfo(ref.runtime, ref.version,
                                          _latency(ref_latency.to_dict(), opts.threads)),
                  targets=TargetMap(reports), settings=settings, timings=clock.laps,
                  mtconvert_version=__version__,
                  created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


class _Clock:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._t, 3)
        self._t = now


def resolve_targets(registry: Registry, targets: tuple[str, ...] | None) -> list[str]:
    if targets is None:
        names = registry.available()
        if not names:
            raise UsageError("no target can convert and run here; see `mtconvert backends`")
        return names
    names = []
    for token in targets:
        name = registry.resolve(token)
        if name not in names:
            names.append(name)
    if not names:
        raise UsageError("no target given")
    return names


def run_target(registry: Registry, name: str, src: PreparedSource, feeds: dict[str, np.ndarray],
               ref_out: dict[str, np.ndarray], opts: ConvertOptions, say: Progress) -> TargetReport:
    out_dir = Path(opts.out_dir).resolve()
    staging = out_dir / f".mtconvert-staging-{name}-{uuid.uuid4().hex[:8]}"
    log_path = staging / f"{src.name}.{name}.log"
    try:
        backend = _backend(registry, name)
        backend.check_precision(opts.precision)
    except UsageError as exc:
        return TargetReport(name, "skipped", str(exc), precision=opts.precision)
    except MtConvertError as exc:
        return TargetReport(name, "error", str(exc), precision=opts.precision)
    staging.mkdir(parents=True, exist_ok=True)
    try:
        return _convert_and_validate(backend, src, feeds, ref_out, opts, staging, out_dir, say)
    except StepError as exc:  # the log moves to --out; the report points there
        return _error_report(name, opts, exc.reason, staging, out_dir, log_path)
    except MtConvertError as exc:
        return _error_report(name, opts, str(exc), staging, out_dir, log_path)
    except Exception as exc:  # a bug in a backend or a tool: this target's error, not the run's
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as fh:
            fh.write(traceback.format_exc())
        return _error_report(name, opts, f"unexpected {type(exc).__name__}: {exc}", staging,
                             out_dir, log_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _backend(registry: Registry, name: str) -> Backend:
    cls = registry.get(name)
    av = cls.availability()
    if not av.can_convert:
        raise BackendUnavailableError(name, av.missing, cls.extra)
    return cls()


def _convert_and_validate(backend: Backend, src: PreparedSource, feeds: dict[str, np.ndarray],
                          ref_out: dict[str, np.ndarray], opts: ConvertOptions, staging: Path,
                          out_dir: Path, say: Progress) -> TargetReport:
    name = backend.name
    topts = TargetOptions(precision=opts.precision, threads=opts.threads, timeout_s=opts.timeout_s,
                          calibration=opts.calibration, extra=dict(opts.extra))
    clock = _Clock()
    artifact = backend.convert(src, staging, topts)
    clock.lap("convert_s")
    conversion = Conversion(clock.laps["convert_s"], artifact.steps, artifact.tool_versions)
    findings = backend.lint(artifact)
    clock.lap("lint_s")
    artifact = _commit(artifact, staging, out_dir)
    base = dict(name=name, precision=opts.precision, artifacts=_files(artifact),
                conversion=conversion, findings=tuple(f.to_dict() for f in findings),
                log=str(artifact.log_path) if artifact.log_path else None, timings=clock.laps)
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        return TargetReport(status="failed", reason="; ".join(f.message for f in errors), **base)
    if not type(backend).availability().can_run:
        return TargetReport(status="skipped", reason="artifact cannot be run on this machine",
                            **base)
    say(f"{name}: validating")
    try:
        result = run_session(name=name, backend=f"{type(backend).__module__}:{type(backend).__qualname__}",
                             artifact=artifact.to_dict(),
                             feeds={k: feeds[k] for k in (s.name for s in src.inputs)},
                             threads=opts.threads, warmup=opts.warmup,
                             iterations=opts.iterations, timeout_s=opts.timeout_s)
    except RuntimeUnavailable as exc:
        return TargetReport(status="skipped", reason=f"numerics not checked: {exc.reason}",
                            **base)
    except StepError as exc:  # the artifact is finished and kept; running it failed
        return TargetReport(status="error", reason=exc.reason, **base)
    numerics = _numerics(ref_out, result.outputs, opts, artifact.precision, result.runtime)
    if "fp32_variant" in artifact.meta:
        numerics = _with_fp32_change(numerics, name, backend, artifact, ref_out, result.outputs,
                                     {k: feeds[k] for k in (s.name for s in src.inputs)}, opts)
    clock.lap("validate_s")
    status = "passed" if numerics.passed else "failed"
    reason = None if numerics.passed else _numerics_reason(numerics)
    return TargetReport(status=status, reason=reason, numerics=numerics,
                        latency=_latency(result.latency, opts.threads),
                        memory=Memory(round(result.peak_rss_mb, 1),
                                      round(result.baseline_rss_mb, 1)), **base)


def _numerics(ref_out: dict[str, np.ndarray], out: dict[str, np.ndarray], opts: ConvertOptions,
              precision: str, runtime: str) -> Numerics:
    results = [compare.compare_output(n, r, out.get(n), opts.tolerances.resolve(precision, n))
               for n, r in ref_out.items()]
    w = compare.worst(results)
    worst = None if w is None else {"output": w.name, "max_abs": w.metrics.get("max_abs"),
                                    "cosine": w.metrics.get("cosine")}
    return Numerics(passed=all(r.passed for r in results), runtime=runtime, worst=worst,
                    outputs={r.name: r.to_dict() for r in results})


def _with_fp32_change(numerics: Numerics, name: str, backend: Backend, artifact: Artifact,
                      ref_out: dict[str, np.ndarray], out: dict[str, np.ndarray],
                      feeds: dict[str, np.ndarray], opts: ConvertOptions) -> Numerics:
    """Run the backend's fp32 twin of a reduced-precision artifact and record the change.
    The twin is a yardstick: if it cannot run, the artifact's own verdict stands."""
    try:
        twin = run_session(name=name,
                           backend=f"{type(backend).__module__}:{type(backend).__qualname__}",
                           artifact=artifact.meta["fp32_variant"], feeds=feeds,
                           threads=opts.threads, warmup=0, iterations=1, timeout_s=opts.timeout_s)
    except StepError as exc:
        return replace(numerics, fp32_worst={"error": exc.reason})
    fp32 = _numerics(ref_out, twin.outputs, opts, "fp32", twin.runtime)
    change = {k: compare.metrics(twin.outputs[k], out[k]) for k in ref_out
              if k in out and k in twin.outputs and out[k].shape == twin.outputs[k].shape}
    return replace(numerics, fp32_worst=fp32.worst, vs_fp32=change)


def _numerics_reason(n: Numerics) -> str:
    bad = [f"{k}: {v['reason']}" for k, v in n.outputs.items() if not v["passed"]]
    return "numerics: " + "; ".join(bad)


def _latency(d: dict[str, Any], threads: int) -> Latency:
    return Latency(**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()},
                   threads=threads)


def _files(artifact: Artifact) -> tuple[ArtifactFile, ...]:
    return tuple(ArtifactFile(str(p), _size(p)) for p in artifact.files)


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def _commit(artifact: Artifact, staging: Path, out_dir: Path) -> Artifact:
    """Move a finished target's files from staging into --out, replacing older ones."""
    moving = list(artifact.files) + ([artifact.log_path] if artifact.log_path else [])
    for p in moving:
        if not p.exists():
            continue
        dest = out_dir / p.relative_to(staging)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        p.replace(dest)
    return artifact.relocated(staging, out_dir)


def _error_report(name: str, opts: ConvertOptions, reason: str, staging: Path, out_dir: Path,
                  log_path: Path) -> TargetReport:
    """An errored target leaves only its log in --out (no half-written artifact)."""
    kept = None
    if log_path.is_file():
        kept = out_dir / log_path.name
        log_path.replace(kept)
    return TargetReport(name, "error", reason, precision=opts.precision,
                        log=str(kept.resolve()) if kept else None)


def _source_info(loaded: source_mod.LoadedSource, feeds: dict[str, np.ndarray],
                 values: dict[str, str]) -> SourceInfo:
    src = loaded.prepared
    return SourceInfo(path=str(src.path) if src.path else None, format=src.format,
                      sha256=loaded.sha256, inputs=tuple(s.to_dict() for s in src.inputs),
                      outputs=tuple(s.to_dict() for s in src.outputs),
                      input_shapes={k: list(v.shape) for k, v in feeds.items()},
                      input_values=values)
