"""``mtconvert validate SOURCE ARTIFACT...``: check artifacts built elsewhere against the source,
without converting. Same checks, report and exit codes as a conversion run."""
from __future__ import annotations

import datetime as _dt
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from mtconvert import __version__, inputs as feeds_mod, source as source_mod
from mtconvert.backends.base import Backend
from mtconvert.cache import ConversionCache
from mtconvert.errors import ModelLoadError, UsageError
from mtconvert.options import ConvertOptions
from mtconvert.reference import open_reference
from mtconvert.registry import Registry, default_registry
from mtconvert.report import ReferenceInfo, Report, SourceInfo, TargetMap, TargetReport
from mtconvert.target import Progress, RunContext, check_artifact, latency_of
from mtconvert.timing import Clock


def backend_for(registry: Registry, path: Path) -> str:
    suffix = path.suffix.lower()
    known = {}
    for name in registry.names():
        try:
            cls = registry.get(name)
        except Exception:  # a broken plugin cannot claim files
            continue
        known.update({s: name for s in cls.artifact_suffixes if s not in known})
    if suffix not in known:
        raise UsageError(f"no target validates {suffix or 'extension-less'} files "
                         f"({path.name}); known: {', '.join(sorted(known))}")
    return known[suffix]


def run_validate(model: Any, artifacts: list[Path], opts: ConvertOptions, *,
                 registry: Registry | None = None, progress: Progress | None = None) -> Report:
    registry = registry or default_registry()
    say = progress or (lambda _msg: None)
    for path in artifacts:
        if not Path(path).exists():
            raise ModelLoadError(f"artifact not found: {path}")
    pairs = [(Path(p).resolve(), backend_for(registry, Path(p))) for p in artifacts]
    clock = Clock()
    with tempfile.TemporaryDirectory(prefix="mtconvert-") as tmp:
        loaded = source_mod.load(model, Path(tmp), None, trust_pickle=opts.trust_pickle,
                                 max_bytes=opts.max_model_bytes)
        clock.lap("load_source_s")
        reports, first = [], None
        for path, name in pairs:
            report, ref, feeds, values = _one(registry, loaded, path, name, opts, say,
                                              _unique(name, path, reports))
            reports.append(report)
            first = first or (ref, feeds, values)
        clock.lap("validate_s")
    ref, feeds, values = first
    src = loaded.prepared
    return Report(source=SourceInfo(str(src.path) if src.path else None, src.format,
                                    loaded.sha256, tuple(s.to_dict() for s in src.inputs),
                                    tuple(s.to_dict() for s in src.outputs),
                                    {k: list(v.shape) for k, v in feeds.items()}, values),
                  reference=ReferenceInfo(ref.runtime, ref.version,
                                          latency_of(ref.latency, opts.threads)),
                  targets=TargetMap(reports), settings=opts.settings() | {"mode": "validate"},
                  timings=clock.laps, mtconvert_version=__version__,
                  created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def _unique(name: str, path: Path, done: list[TargetReport]) -> str:
    return name if all(r.name != name for r in done) else f"{name}:{path.name}"


def _one(registry: Registry, loaded: source_mod.LoadedSource, path: Path, name: str,
         opts: ConvertOptions, say: Progress, report_name: str) -> tuple:
    backend: Backend = registry.get(name)()
    artifact = backend.adopt(path, loaded.prepared, opts.target_options())
    fixed = {k: tuple(v) for k, v in artifact.meta.get("input_shapes", {}).items()}
    conflict = {k: v for k, v in opts.input_shapes.items() if k in fixed and fixed[k] != v}
    if conflict:
        raise UsageError(f"{path.name} is fixed to {fixed}; it cannot run --input-shape {conflict}")
    run_opts = replace(opts, input_shapes=dict(opts.input_shapes) | fixed)
    feeds, values = feeds_mod.prepare(loaded, run_opts)
    loaded.prepared.input_shapes = {k: tuple(v.shape) for k, v in feeds.items()}
    say(f"{report_name}: reference at {loaded.prepared.input_shapes}")
    ref = open_reference(loaded.prepared, feeds, run_opts)
    ctx = RunContext(registry, loaded.prepared, feeds, ref.outputs, run_opts, say,
                     ConversionCache(None), report_name=report_name)
    return check_artifact(ctx, backend, artifact, None), ref, feeds, values
