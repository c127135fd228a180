"""Verify mode (``mtconvert verify DIR``): the artifacts of golden bundles re-checked against
their stored inputs, reference outputs and tolerances, without the source or its toolchain."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from mtconvert import bundle
from mtconvert.errors import UsageError
from mtconvert.generation import golden
from mtconvert.options import ConvertOptions
from mtconvert.registry import Registry
from mtconvert.report import Report, SourceInfo
from mtconvert.run.check import check_artifact
from mtconvert.run.context import Progress
from mtconvert.run.skeleton import Run
from mtconvert.validators.compare import ToleranceOverrides


def run(folder: Path, opts: ConvertOptions, *, registry: Registry | None = None,
        progress: Progress | None = None) -> Report:
    skeleton = Run("verify", opts, registry, progress)
    skeleton.settings["bundle"] = str(folder)
    reports, first = [], None
    for found in bundle.find(folder):
        manifest = bundle.read(found)
        src, feeds, ref_out = bundle.load(found, manifest)
        try:
            backend = skeleton.registry.get(manifest["backend"])()
        except Exception as exc:
            raise UsageError(f"bundle {found.name}: target {manifest['backend']!r} is not "
                             f"available here ({exc})") from None
        ref = manifest.get("reference") or {}
        point = skeleton.given(feeds, ref_out, ref.get("runtime", "bundle"), ref.get("version"))
        run_opts = replace(opts, tolerances=ToleranceOverrides(per_output=manifest["tolerances"]),
                           precision=manifest["precision"])
        ctx = skeleton.context(src, point, report_name=manifest["target"], opts=run_opts)
        skeleton.say(f"{manifest['target']}: verifying {found}")
        artifact = bundle.artifact(found, manifest)
        report = check_artifact(ctx, backend, artifact, None)
        reports.append(golden.verify(found, run_opts, backend, artifact, report))
        first = first or (manifest, src, point)
    skeleton.clock.lap("verify_s")
    manifest, src, point = first
    info = SourceInfo(str(folder), f"bundle ({manifest['source']['format']} source)", None,
                      tuple(s.to_dict() for s in src.inputs),
                      tuple(s.to_dict() for s in src.outputs),
                      {k: list(v) for k, v in point.shapes.items()}, point.values)
    return skeleton.report(reports, point, source=info)
