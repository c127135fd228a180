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
import re
import shutil
import tempfile
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert.version import __version__
from mtconvert.backends.base import (Artifact, Backend, PreparedSource, TargetOptions,
                                     import_path)
from mtconvert.source import sha256_of



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


@cache
def _code_hash(backend: type[Backend]) -> str:
    """A changed converter never reuses old artifacts: the hash of ``code_modules``."""
    texts = code_modules(backend)
    h = hashlib.sha256()
    for name in sorted(texts):
        h.update(name.encode() + b"\0" + texts[name])
    return h.hexdigest()


def code_modules(backend: type[Backend]) -> dict[str, bytes]:
    """mtconvert's code that the backend runs: its module and every mtconvert module it imports,
    at any depth, function-level imports included (shared helpers such as the process runner
    or ONNX rewrites change artifacts too), by module name."""
    texts: dict[str, bytes] = {}
    todo = [backend.__module__]
    while todo:
        name = todo.pop()
        if name in texts:
            continue
        origin = _origin(name)
        if origin is None:
            continue
        texts[name] = origin.read_bytes()
        todo += [m for m in _imports(texts[name]) if m.startswith("mtconvert.")]
    return texts


_MODULE_NAME = re.compile(r"^mtconvert(\.\w+)+$")


def _origin(module: str) -> Path | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # "pkg.mod.Class": not a module
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _imports(source: bytes) -> list[str]:
    """Absolute module names a module's source names: imports (``from a import b``: a, a.b) and
    strings that name a module (a child process run as ``python -m mtconvert.backends.x``)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and _MODULE_NAME.match(node.value):
            found.append(node.value)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return found


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
        stored = dict(entry["artifact"])
        twin = stored.pop("fp32_twin", None)
        art = Artifact.from_dict(stored)
        if twin:
            art = replace(art, fp32_twin=_restore_twin(twin, entry_dir / "twin", work))
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
            relative = _rebase(replace(artifact, fp32_twin=None), staging, to_relative=True)
            stored = relative.to_dict()
            if artifact.fp32_twin is not None:
                stored["fp32_twin"] = _save_twin(artifact.fp32_twin, tmp / "twin")
            (tmp / "entry.json").write_text(json.dumps(
                {"artifact": stored, "files": rels, "seconds": seconds}))
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


def _save_twin(twin: Artifact, folder: Path) -> dict[str, Any]:
    """Copy every file of the fp32 twin (an ncnn .param has its .bin) into ``folder``, named
    relative to the twin's primary file's folder."""
    base = twin.primary.parent
    rels = [p.relative_to(base) if p.is_relative_to(base) else Path(p.name) for p in twin.files]
    for path, rel in zip(twin.files, rels, strict=True):
        _copy(path, folder / rel)
    return twin.to_dict() | {"primary": str(twin.primary.relative_to(base)),
                             "files": [str(r) for r in rels], "log_path": None}


def _restore_twin(stored: dict[str, Any], folder: Path, work: Path) -> Artifact:
    work.mkdir(parents=True, exist_ok=True)
    for rel in stored["files"]:
        _copy(folder / rel, work / rel)
    return Artifact.from_dict(stored | {"primary": str(work / stored["primary"]),
                                        "files": [str(work / f) for f in stored["files"]]})
