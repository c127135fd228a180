"""Content-addressed conversion cache: a warm re-run re-validates without re-converting.

Keyed by the ONNX handed to backends, target, precision, backend options, input shapes,
calibration data, tool versions and mtconvert's own backend code. Lives under
``MTCONVERT_CACHE_DIR``, else ``$XDG_CACHE_HOME/mtconvert``, else ``~/.cache/mtconvert``.
Entries are written to a temporary folder and renamed into place, so a reader never sees half.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert import __version__
from mtconvert.backends.base import (Artifact, Backend, PreparedSource, TargetOptions,
                                     import_path)
from mtconvert.source import sha256_of

VARIANTS = ("fp32_variant",)  # artifact.meta entries naming files outside the shipped set


def default_root() -> Path:
    if env := os.environ.get("MTCONVERT_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mtconvert"


def _sha_arrays(path: Path | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with np.load(path) as data:
        for k in sorted(data.files):
            a = data[k]
            h.update(f"{k}:{a.dtype}:{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _code_hash(backend: type[Backend]) -> str:
    """mtconvert's backend code: a changed converter must not reuse old artifacts."""
    import inspect

    folder = Path(inspect.getfile(backend)).parent
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()


class ConversionCache:
    def __init__(self, root: Path | None):
        self.root = root  # None: disabled

    def key(self, backend: type[Backend], src: PreparedSource, opts: TargetOptions) -> str | None:
        if self.root is None:
            return None
        parts = {"mtconvert": __version__, "backend": import_path(backend),
                 "code": _code_hash(backend), "tools": backend.availability().versions,
                 "onnx": sha256_of(src.onnx_path), "precision": opts.precision,
                 "extra": opts.extra, "route": opts.route, "shapes": {k: list(v) for k, v in src.input_shapes.items()},
                 "calibration": _sha_arrays(opts.calibration) if opts.precision == "int8" else None}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def load(self, key: str | None, staging: Path, work: Path) -> tuple[Artifact, float] | None:
        """Copy a cached artifact into ``staging`` (variants into ``work``); None on a miss."""
        if key is None or self.root is None or not (self.root / key / "entry.json").is_file():
            return None
        entry_dir = self.root / key
        entry = json.loads((entry_dir / "entry.json").read_text())
        for rel in entry["files"]:
            _copy(entry_dir / "files" / rel, staging / rel)
        meta = dict(entry["artifact"]["meta"])
        for name in VARIANTS:
            if name in meta:
                meta[name] = _restore_variant(meta[name], entry_dir / "variants" / name, work)
        art = Artifact.from_dict(entry["artifact"] | {"meta": meta})
        return _rebase(art, staging), entry["seconds"]

    def store(self, key: str | None, artifact: Artifact, staging: Path, seconds: float) -> None:
        if key is None or self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            rels = [str(p.relative_to(staging)) for p in _all_files(artifact)]
            for rel in rels:
                _copy(staging / rel, tmp / "files" / rel)
            meta = dict(artifact.meta)
            for name in VARIANTS:
                if name in meta:
                    meta[name] = _save_variant(meta[name], tmp / "variants" / name)
            relative = _rebase(replace(artifact, meta=meta), staging, to_relative=True)
            (tmp / "entry.json").write_text(json.dumps(
                {"artifact": relative.to_dict(), "files": rels, "seconds": seconds}))
            dest = self.root / key
            if not dest.exists():
                try:
                    tmp.replace(dest)
                except OSError:  # another run stored the same key first
                    pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _all_files(artifact: Artifact) -> list[Path]:
    return list(artifact.files) + ([artifact.log_path] if artifact.log_path else [])


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        shutil.copy2(src, dst)


def _rebase(art: Artifact, staging: Path, to_relative: bool = False) -> Artifact:
    def move(p: Path | None) -> Path | None:
        if p is None:
            return None
        return p.relative_to(staging) if to_relative else staging / p

    return replace(art, primary=move(art.primary), files=tuple(move(p) for p in art.files),
                   log_path=move(art.log_path))


def _save_variant(variant: dict[str, Any], folder: Path) -> dict[str, Any]:
    primary = Path(variant["primary"])
    _copy(primary, folder / primary.name)
    return variant | {"primary": primary.name, "files": [primary.name], "log_path": None}


def _restore_variant(variant: dict[str, Any], folder: Path, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    _copy(folder / variant["primary"], work / variant["primary"])
    path = str(work / variant["primary"])
    return variant | {"primary": path, "files": [path]}
