"""Atomic outputs: a target writes into a staging folder inside --out; its files move in only
when it finishes. An errored target leaves its log and nothing else."""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from mtconvert.backends.base import Artifact
from mtconvert.report import ArtifactFile


def new_staging(out_dir: Path, target: str) -> Path:
    staging = out_dir / f".mtconvert-staging-{target}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True, exist_ok=True)
    return staging


def commit(artifact: Artifact, staging: Path, out_dir: Path) -> Artifact:
    """Move a finished target's files (and log) into --out, replacing older ones."""
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


def keep_log(log_path: Path, out_dir: Path) -> Path | None:
    """Move an errored target's log into --out; return its new path."""
    if not log_path.is_file():
        return None
    kept = out_dir / log_path.name
    log_path.replace(kept)
    return kept


def file_entries(artifact: Artifact) -> tuple[ArtifactFile, ...]:
    return tuple(ArtifactFile(str(p), size_of(p),
                              "artifact" if p == artifact.primary else "sidecar")
                 for p in artifact.files)


def size_of(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size
