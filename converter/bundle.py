"""Golden bundles: ``--bundle DIR`` writes, per target, the artifact with the inputs, reference
outputs, tolerances and tool versions it was validated with; ``mtconvert verify DIR`` re-checks
the artifact against them on another machine (a macOS CI worker, a device lab) without the
source model or its toolchain (the verify mode is mtconvert.run.verify).

Layout: ``DIR/<target>/bundle.json``, ``inputs.npz``, ``reference.npz`` and the artifact files.
"""
from __future__ import annotations

import datetime as _dt
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mtconvert.version import __version__
from mtconvert.backends.base import Artifact, PreparedSource, TensorSpec
from mtconvert.errors import ModelLoadError
from mtconvert.report import TargetReport

if TYPE_CHECKING:
    from mtconvert.run.context import RunContext

BUNDLE_FORMAT = 1
MANIFEST = "bundle.json"


def write(root: Path, ctx: RunContext, artifact: Artifact, report: TargetReport,
          out_dir: Path) -> Path:
    """Write one target's bundle into ``root``/<target> (replacing an older one)."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    final = root / report.name
    with tempfile.TemporaryDirectory(prefix=".mtconvert-bundle-", dir=root) as tmp:
        stage = Path(tmp) / "b"
        stage.mkdir()
        for path in artifact.files:
            _copy(path, stage / path.relative_to(out_dir))
        np.savez(stage / "inputs.npz", **ctx.target_feeds)
        np.savez(stage / "reference.npz", **ctx.ref_out)
        manifest = _manifest(ctx, artifact, report, out_dir) | {"files_sha256": _hashes(stage)}
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if final.exists():
            shutil.rmtree(final)
        stage.replace(final)
    return final


def _manifest(ctx: RunContext, artifact: Artifact, report: TargetReport,
              out_dir: Path) -> dict:
    tolerances = {name: ctx.opts.tolerances.resolve(artifact.profile, name).to_dict()
                  for name in ctx.ref_out}
    return {
        "bundle_format": BUNDLE_FORMAT, "target": report.name, "backend": artifact.target,
        "precision": artifact.precision,
        "artifact": {"primary": str(artifact.primary.relative_to(out_dir)),
                     "files": [str(p.relative_to(out_dir)) for p in artifact.files],
                     "meta": artifact.meta, "tolerance_profile": artifact.tolerance_profile,
                     "input_shapes": {k: list(v) for k, v in artifact.input_shapes.items()}},
        "source": {"name": ctx.src.name, "format": ctx.src.format,
                   "inputs": [s.to_dict() for s in ctx.src.inputs],
                   "outputs": [s.to_dict() for s in ctx.src.outputs]},
        "tolerances": tolerances, "reference": ctx.reference_info,
        "tool_versions": dict(artifact.tool_versions), "validated_here": {
            "status": report.status, "runtime": report.numerics.runtime if report.numerics
            else None, "worst": report.numerics.worst if report.numerics else None},
        "mtconvert_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` but the manifest, by relative path."""
    from mtconvert.source import sha256_of

    return {str(p.relative_to(folder)): sha256_of(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def _check_hashes(folder: Path, expected: dict[str, str]) -> None:
    """Every file the manifest lists is there and unchanged (a bundle moved between machines
    must not be validated with a swapped artifact or reference)."""
    from mtconvert.source import sha256_of

    for rel, digest in expected.items():
        path = folder / rel
        if not path.is_file():
            raise ModelLoadError(f"bundle {folder.name}: {rel} is missing")
        if sha256_of(path) != digest:
            raise ModelLoadError(f"bundle {folder.name}: {rel} does not match the SHA-256 in "
                                 f"{MANIFEST} (changed after the bundle was written)")


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


# --- reading ------------------------------------------------------------------------------------

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
    _check_hashes(folder, manifest.get("files_sha256") or {})
    return manifest


def load(bundle: Path, manifest: dict[str, Any]) -> tuple[PreparedSource, dict[str, np.ndarray],
                                                       dict[str, np.ndarray]]:
    """The bundle's source description, inputs and reference outputs."""
    feeds, ref_out = _arrays(bundle / "inputs.npz"), _arrays(bundle / "reference.npz")
    source = manifest["source"]
    src = PreparedSource(format=source["format"], name=source["name"], onnx_path=Path(),
                         inputs=tuple(TensorSpec.from_dict(d) for d in source["inputs"]),
                         outputs=tuple(TensorSpec.from_dict(d) for d in source["outputs"]),
                         input_shapes={k: tuple(v.shape) for k, v in feeds.items()},
                         work_dir=bundle)
    return src, feeds, ref_out


def _arrays(path: Path) -> dict[str, np.ndarray]:
    """An .npz of plain arrays; never unpickles (an object array is refused)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"bundle {path.parent.name}: {path.name} is not an array file "
                             f"without pickles ({exc})") from None


def artifact(bundle: Path, manifest: dict[str, Any]) -> Artifact:
    """The bundled artifact, as its backend described it (bundles written before the typed
    fields kept the profile and shapes in ``meta``)."""
    art = manifest["artifact"]
    meta = dict(art["meta"])
    profile = art.get("tolerance_profile") or meta.pop("tolerance_profile", None)
    shapes = art.get("input_shapes") or meta.pop("input_shapes", None) or {}
    return Artifact(target=manifest["backend"], primary=bundle / art["primary"],
                    files=tuple(bundle / f for f in art["files"]),
                    precision=manifest["precision"], steps=("verified from a bundle",),
                    tool_versions=manifest.get("tool_versions", {}), meta=meta,
                    tolerance_profile=profile,
                    input_shapes={k: tuple(v) for k, v in shapes.items()})
