"""Golden bundles of a generation: with ``--bundle``, each target's bundle (mtconvert.bundle:
the step graph's artifact, one step's inputs and reference outputs) also carries the prompt,
the reference's greedy tokens and teacher-forced logits, the step graph's geometry and the
logits' tolerance (``generation.json`` + ``generation.npz``, the array file's sha256 in the
JSON); `mtconvert verify` then steps the bundled artifact through the same generation and
judges it as the conversion did, without the source model."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert.backends.base import Artifact, Backend
from mtconvert.errors import ModelLoadError
from mtconvert.generation.reference import Reference
from mtconvert.generation.step import Geometry
from mtconvert.source import sha256_of
from mtconvert.generation.target import generated
from mtconvert.report import TargetReport
from mtconvert.validators.tolerances import Tolerance

FORMAT = 1
MANIFEST, ARRAYS = "generation.json", "generation.npz"


def add(bundle_dir: Path, ref: Reference, geo: Geometry, tol: Tolerance) -> None:
    """Write the generation beside a target's bundle (written by the pipeline just before)."""
    np.savez(bundle_dir / ARRAYS, reference_logits=ref.logits,
             prompt=np.asarray(ref.prompt, np.int64),
             reference_tokens=np.asarray(ref.tokens, np.int64))
    (bundle_dir / MANIFEST).write_text(json.dumps({
        "format": FORMAT, "geometry": vars(geo), "tolerance": tol.to_dict(),
        "reference": {"runtime": ref.runtime, "version": ref.version},
        "arrays_sha256": sha256_of(bundle_dir / ARRAYS)}, indent=2))


def verify(bundle_dir: Path, opts: Any, backend: Backend, artifact: Artifact,
           report: TargetReport) -> TargetReport:
    """``report`` (the bundle's one-step check) with the bundled generation judged; unchanged
    for a bundle without one."""
    if not (bundle_dir / MANIFEST).is_file():
        return report
    manifest, ref = read(bundle_dir)
    geo = Geometry(**manifest["geometry"])
    return generated(opts, backend, artifact, report, ref, geo, Tolerance(**manifest["tolerance"]))


def read(bundle_dir: Path) -> tuple[dict[str, Any], Reference]:
    try:
        manifest = json.loads((bundle_dir / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"bundle {bundle_dir.name}: {MANIFEST} unreadable ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise ModelLoadError(f"bundle {bundle_dir.name}: {MANIFEST} format "
                             f"{manifest.get('format')!r}, expected {FORMAT}")
    arrays = bundle_dir / ARRAYS
    if not arrays.is_file() or sha256_of(arrays) != manifest.get("arrays_sha256"):
        raise ModelLoadError(f"bundle {bundle_dir.name}: {ARRAYS} is missing or was changed")
    with np.load(arrays, allow_pickle=False) as data:
        ref = Reference(tuple(int(i) for i in data["prompt"]),
                        tuple(int(i) for i in data["reference_tokens"]),
                        data["reference_logits"], manifest["reference"]["runtime"],
                        manifest["reference"]["version"])
    return manifest, ref
