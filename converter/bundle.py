"""Golden bundles: ``--bundle DIR`` writes, per target, the artifact with the inputs, reference
outputs, tolerances and tool versions it was validated with; ``mtconvert verify DIR`` re-checks
the artifact against them on another machine (a macOS CI worker, a device lab) without the
source model or its toolchain. Same report and exit codes as a conversion.

Layout: ``DIR/<target>/bundle.json``, ``inputs.npz``, ``reference.npz`` and the artifact files.
"""
from __future__ import annotations

import datetime as _dt
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert import __version__
from mtconvert.backends.base import Artifact, PreparedSource, TensorSpec
from mtconvert.errors import ModelLoadError, UsageError
from mtconvert.report import ReferenceInfo, Report, SourceInfo, TargetMap, TargetReport

BUNDLE_FORMAT = 1
MANIFEST = "bundle.json"


def write(ctx: Any, artifact: Artifact, report: TargetReport,
          out_dir: Path) -> Path:
    """Write one target's bundle into ``ctx.opts.extra['bundle']`` (replacing an older one)."""
    root = Path(ctx.opts.extra["bundle"]).resolve()
    root.mkdir(parents=True, exist_ok=True)
    final = root / report.name
    with tempfile.TemporaryDirectory(prefix=".mtconvert-bundle-", dir=root) as tmp:
        stage = Path(tmp) / "b"
        stage.mkdir()
        for path in artifact.files:
            _copy(path, stage / path.relative_to(out_dir))
        np.savez(stage / "inputs.npz", **ctx.target_feeds)
        np.savez(stage / "reference.npz", **ctx.ref_out)
        (stage / MANIFEST).write_text(json.dumps(_manifest(ctx, artifact, report, out_dir),
                                                 indent=2))
        if final.exists():
            shutil.rmtree(final)
        stage.replace(final)
    return final


def _manifest(ctx: Any, artifact: Artifact, report: TargetReport, out_dir: Path) -> dict:
    meta = {k: v for k, v in artifact.meta.items() if k != "fp32_variant"}
    from mtconvert.target import profile_of

    tolerances = {name: ctx.opts.tolerances.resolve(profile_of(artifact), name).to_dict()
                  for name in ctx.ref_out}
    return {
        "bundle_format": BUNDLE_FORMAT, "target": report.name, "backend": artifact.target,
        "precision": artifact.precision,
        "artifact": {"primary": str(artifact.primary.relative_to(out_dir)),
                     "files": [str(p.relative_to(out_dir)) for p in artifact.files],
                     "meta": meta},
        "source": {"name": ctx.src.name, "format": ctx.src.format,
                   "inputs": [s.to_dict() for s in ctx.src.inputs],
                   "outputs": [s.to_dict() for s in ctx.src.outputs]},
        "tolerances": tolerances, "reference": ctx.reference_info,
        "tool_versions": dict(artifact.tool_versions), "validated_here": {
            "status": report.status, "runtime": report.numerics.runtime if report.numerics
            else None, "worst": report.numerics.worst if report.numerics else None},
        "mtconvert_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


# --- verify -----------------------------------------------------------------------------------

def find(folder: Path) -> list[Path]:
    """The bundles in ``folder``: the folder itself, or its sub-folders holding bundle.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"bundle folder not found: {folder}")
    if (folder / MANIFEST).is_file():
        return [folder]
    found = sorted(p.parent for p in folder.glob(f"*/{MANIFEST}"))
    if not found:
        raise ModelLoadError(f"no {MANIFEST} in {folder} or its sub-folders: not a bundle")
    return found


def read(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder / MANIFEST}: unreadable ({exc})") from None
    if manifest.get("bundle_format") != BUNDLE_FORMAT:
        raise ModelLoadError(f"{folder / MANIFEST}: bundle format "
                             f"{manifest.get('bundle_format')!r}, expected {BUNDLE_FORMAT}")
    for name in ("inputs.npz", "reference.npz", manifest["artifact"]["primary"]):
        if not (folder / name).exists():
            raise ModelLoadError(f"bundle {folder.name} lacks {name}")
    return manifest


def run_verify(folder: Path, opts: Any, *, registry: Any = None,
               progress: Any = None) -> Report:
    from mtconvert.cache import ConversionCache
    from mtconvert.registry import default_registry
    from mtconvert.target import RunContext, check_artifact
    from mtconvert.timing import Clock
    from mtconvert.validators.compare import ToleranceOverrides

    registry = registry or default_registry()
    say = progress or (lambda _msg: None)
    clock = Clock()
    reports, first = [], None
    for bundle in find(folder):
        manifest = read(bundle)
        src, feeds, ref_out = _loaded(bundle, manifest)
        try:
            backend = registry.get(manifest["backend"])()
        except Exception as exc:
            raise UsageError(f"bundle {bundle.name}: target {manifest['backend']!r} is not "
                             f"available here ({exc})") from None
        tol = ToleranceOverrides(per_output=manifest["tolerances"])
        run_opts = replace(opts, tolerances=tol, precision=manifest["precision"])
        ctx = RunContext(registry, src, feeds, ref_out, run_opts, say, ConversionCache(None),
                         report_name=manifest["target"])
        say(f"{manifest['target']}: verifying {bundle}")
        reports.append(check_artifact(ctx, backend, _artifact(bundle, manifest), None))
        first = first or (manifest, src, feeds)
    clock.lap("verify_s")
    manifest, src, feeds = first
    ref = manifest.get("reference") or {}
    kind = f"bundle ({manifest['source']['format']} source)"
    return Report(source=SourceInfo(str(folder), kind, None, tuple(s.to_dict() for s in src.inputs),
                                    tuple(s.to_dict() for s in src.outputs),
                                    {k: list(v.shape) for k, v in feeds.items()},
                                    {k: "from the bundle" for k in feeds}),
                  reference=ReferenceInfo(ref.get("runtime", "bundle"), ref.get("version"), None),
                  targets=TargetMap(reports),
                  settings=opts.settings() | {"mode": "verify", "bundle": str(folder)},
                  timings=clock.laps, mtconvert_version=__version__,
                  created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def _loaded(bundle: Path, manifest: dict[str, Any]) -> tuple:
    with np.load(bundle / "inputs.npz") as data:
        feeds = {k: data[k] for k in data.files}
    with np.load(bundle / "reference.npz") as data:
        ref_out = {k: data[k] for k in data.files}
    source = manifest["source"]
    src = PreparedSource(format=source["format"], name=source["name"], onnx_path=Path(),
                         inputs=tuple(TensorSpec.from_dict(d) for d in source["inputs"]),
                         outputs=tuple(TensorSpec.from_dict(d) for d in source["outputs"]),
                         input_shapes={k: tuple(v.shape) for k, v in feeds.items()},
                         work_dir=bundle)
    return src, feeds, ref_out


def _artifact(bundle: Path, manifest: dict[str, Any]) -> Artifact:
    art = manifest["artifact"]
    return Artifact(target=manifest["backend"], primary=bundle / art["primary"],
                    files=tuple(bundle / f for f in art["files"]),
                    precision=manifest["precision"], steps=("verified from a bundle",),
                    tool_versions=manifest.get("tool_versions", {}), meta=art["meta"])
