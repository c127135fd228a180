"""Validate mode (``mtconvert validate SOURCE ARTIFACT...``): artifacts built elsewhere checked
against the source, without converting. Same checks, report and exit codes as a conversion."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from mtconvert.backends.base import Backend
from mtconvert.errors import ModelLoadError, UsageError
from mtconvert.options import ConvertOptions
from mtconvert.registry import Registry
from mtconvert.report import Report, TargetReport
from mtconvert.run.check import check_artifact
from mtconvert.run.context import Progress
from mtconvert.run.skeleton import Run


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


def run(model: Any, artifacts: list[Path], opts: ConvertOptions, *,
        registry: Registry | None = None, progress: Progress | None = None) -> Report:
    skeleton = Run("validate", opts, registry, progress)
    for path in artifacts:
        if not Path(path).exists():
            raise ModelLoadError(f"artifact not found: {path}")
    pairs = [(Path(p).resolve(), backend_for(skeleton.registry, Path(p))) for p in artifacts]
    with tempfile.TemporaryDirectory(prefix="mtconvert-") as tmp:
        src = skeleton.load(model, Path(tmp))
        skeleton.clock.lap("load_source_s")
        reports, first = [], None
        for path, name in pairs:
            report, point = _one(skeleton, src, path, name, _unique(name, path, reports))
            reports.append(report)
            first = first or point
        skeleton.clock.lap("validate_s")
    return skeleton.report(reports, first)


def _unique(name: str, path: Path, done: list[TargetReport]) -> str:
    return name if all(r.name != name for r in done) else f"{name}:{path.name}"


def _one(skeleton: Run, src: Any, path: Path, name: str, report_name: str) -> tuple:
    """Adopt one artifact, and check it at the shapes it was made for (the reference at those
    shapes is computed once, whatever the number of artifacts)."""
    backend: Backend = skeleton.registry.get(name)()
    artifact = backend.adopt(path, src, skeleton.opts.target_options())
    fixed = artifact.input_shapes
    given = skeleton.opts.input_shapes
    conflict = {k: v for k, v in given.items() if k in fixed and tuple(fixed[k]) != v}
    if conflict:
        raise UsageError(f"{path.name} is fixed to {dict(fixed)}; it cannot run "
                         f"--input-shape {conflict}")
    point = skeleton.point(dict(given) | {k: tuple(v) for k, v in fixed.items()})
    skeleton.say(f"{report_name}: reference at {point.shapes}")
    ctx = skeleton.context(src, point, report_name=report_name)
    return check_artifact(ctx, backend, artifact, None), point
