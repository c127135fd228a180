"""Validate mode (``mtconvert validate SOURCE ARTIFACT...``): artifacts built elsewhere checked
against the source, without converting. Same checks, report and exit codes as a conversion."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from mtconvert import quantized
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
    artifacts = [Path(p) for p in artifacts] + (_listed(opts.from_report) if opts.from_report
                                                else [])
    if not artifacts:
        raise UsageError("give the ARTIFACT files to validate, or --from-report REPORT.json")
    for path in artifacts:
        if not Path(path).exists():
            raise ModelLoadError(f"artifact not found: {path}")
    sidecars = _sidecars(skeleton.registry)
    skipped = [p.name for p in artifacts if p.suffix.lower() in sidecars]
    if skipped:
        skeleton.settings["side_files_skipped"] = skipped
        skeleton.say(f"side files, validated with their artifact: {', '.join(skipped)}")
    pairs = [(p.resolve(), backend_for(skeleton.registry, p)) for p in artifacts
             if p.suffix.lower() not in sidecars]
    if not pairs:
        raise UsageError(f"only side files given ({', '.join(skipped)}); give the artifacts "
                         "they ship with")
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


def _listed(report_path: Path) -> list[Path]:
    """The artifacts (role "artifact") of a convert report's targets."""
    from mtconvert.report import Report

    try:
        report = Report.from_json(Path(report_path).read_text())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"--from-report {report_path}: not a mtconvert report "
                             f"({type(exc).__name__}: {exc})") from None
    return [Path(a.path) for t in report.targets.values() for a in t.artifacts
            if a.role == "artifact"]


def _sidecars(registry: Registry) -> set[str]:
    found = set()
    for name in registry.names():
        try:
            found |= set(registry.get(name).sidecar_suffixes)
        except Exception:  # a broken plugin declares nothing
            continue
    return found


def _unique(name: str, path: Path, done: list[TargetReport]) -> str:
    """The report's name for one artifact: the target's name, then with the file's name, then
    with its path (artifacts of one name in different folders), so no report replaces another."""
    taken = {r.name for r in done}
    for candidate in (name, f"{name}:{path.name}", f"{name}:{path}"):
        if candidate not in taken:
            return candidate
    return next(f"{name}:{path}#{k}" for k in range(2, len(taken) + 3)
                if f"{name}:{path}#{k}" not in taken)


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
    plan = _quantized_plan(src, backend, skeleton.opts.precision)
    report = check_artifact(ctx, backend, quantized.judged(artifact, plan), None)
    return quantized.summary(report, name, plan), point


def _quantized_plan(src: Any, backend: Backend, precision: str) -> dict[str, Any] | None:
    """A quantized source judges an artifact built elsewhere as it judges its own conversion:
    the int8-source profile and the size against the source's bytes (no weight record: the
    artifact's conversion is not known, so ``kept`` is not read)."""
    plan = quantized.plan_for(src, backend.name, backend.precisions, precision)
    if plan is None:
        return None
    stated = ({"fallback": f"{backend.name} has no int8 form here: its float artifact is "
                           "not held to the source's size"} if plan.get("fallback") else {})
    return plan | {"record": None, "route": "built elsewhere (validate)"} | stated
