"""Golden bundles of a generation: with ``--bundle``, each target's bundle (mtconvert.bundle:
the step graph's artifact, one step's inputs and reference outputs) also carries the prompt,
the reference's greedy tokens and teacher-forced logits, the step graph's geometry and the
logits' tolerance (``generation.json`` + ``generation.npz``, the array file's sha256 in the
JSON); `mtconvert verify` then steps the bundled artifact through the same generation and
judges it as the conversion did, without the source model. An encoder-decoder's bundle also
carries its encoder graph's own bundle (sub-folder ``encoder``, written by the encoder graph's
run) and the encoder input (``encoder_input.<name>`` arrays; the reference's "prompt" is then
the decoder start tokens): verify runs the encoder artifact, then steps the step artifact."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert import bundle as bundle_mod
from mtconvert.backends.base import Artifact, Backend
from mtconvert.errors import ModelLoadError
from mtconvert.generation.encdec import ENCODER_ROLE
from mtconvert.generation.reference import Reference
from mtconvert.generation.step import Geometry
from mtconvert.source import sha256_of
from mtconvert.staging import file_entries
from mtconvert.generation.target import EncoderInput, generated
from mtconvert.report import TargetReport
from mtconvert.validators.tolerances import Tolerance

FORMAT = 1
MANIFEST, ARRAYS = "generation.json", "generation.npz"
ENCODER_DIR, ENCODER_INPUT = "encoder", "encoder_input."


def add(bundle_dir: Path, ref: Reference, geo: Geometry, tol: Tolerance,
        encoder: tuple[Path, dict[str, np.ndarray], list[int] | None] | None = None) -> None:
    """Write the generation beside a target's bundle (written by the pipeline just before).
    ``encoder``: an encoder-decoder's (encoder graph's bundle, encoder input, the prompt ids
    the report shows or None), copied in."""
    extra: dict[str, Any] = {}
    if encoder is not None:
        enc_bundle, feeds, shown = encoder
        if (bundle_dir / ENCODER_DIR).exists():
            shutil.rmtree(bundle_dir / ENCODER_DIR)
        shutil.copytree(enc_bundle, bundle_dir / ENCODER_DIR)
        extra = {"encoder": {"bundle": ENCODER_DIR, "inputs": list(feeds),
                             "prompt_tokens": shown}}
    np.savez(bundle_dir / ARRAYS, reference_logits=ref.logits,
             prompt=np.asarray(ref.prompt, np.int64),
             reference_tokens=np.asarray(ref.tokens, np.int64),
             **{ENCODER_INPUT + k: v for k, v in (encoder[1] if encoder else {}).items()})
    (bundle_dir / MANIFEST).write_text(json.dumps({
        "format": FORMAT, "geometry": vars(geo), "tolerance": tol.to_dict(),
        "reference": {"runtime": ref.runtime, "version": ref.version},
        "arrays_sha256": sha256_of(bundle_dir / ARRAYS), **extra}, indent=2))


def verify(bundle_dir: Path, opts: Any, backend: Backend, artifact: Artifact,
           report: TargetReport) -> TargetReport:
    """``report`` (the bundle's one-step check) with the bundled generation judged; unchanged
    for a bundle without one."""
    if not (bundle_dir / MANIFEST).is_file():
        return report
    manifest, ref = read(bundle_dir)
    geo = Geometry(**manifest["geometry"])
    encoder = encoder_input(bundle_dir, manifest)
    if encoder is not None:  # the encoder graph's files listed as a conversion lists them
        report = replace(report, artifacts=report.artifacts + tuple(
            replace(f, role=ENCODER_ROLE) if f.role == "artifact" else f
            for f in file_entries(encoder.artifact)))
    return generated(opts, backend, artifact, report, ref, geo, Tolerance(**manifest["tolerance"]),
                     encoder)


def encoder_input(bundle_dir: Path, manifest: dict[str, Any]) -> EncoderInput | None:
    """An encoder-decoder bundle's encoder graph (its own bundle, checked like any) and input;
    None for a decoder-only one."""
    enc = manifest.get("encoder")
    if enc is None:
        return None
    where = bundle_dir / enc["bundle"]
    if not (where / bundle_mod.MANIFEST).is_file():
        raise ModelLoadError(f"bundle {bundle_dir.name}: the encoder graph's bundle "
                             f"{enc['bundle']}/ is missing")
    enc_manifest = bundle_mod.read(where)
    with np.load(bundle_dir / ARRAYS, allow_pickle=False) as data:
        feeds = {k: data[ENCODER_INPUT + k] for k in enc["inputs"]}
    return EncoderInput(bundle_mod.artifact(where, enc_manifest), feeds, enc["prompt_tokens"])


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
