"""Content-addressed conversion cache: a warm re-run re-validates without re-converting.

Keyed by the ONNX handed to backends, target, precision, backend options, input shapes,
calibration data, tool versions and mtconvert's own backend code. Lives under
``MTCONVERT_CACHE_DIR``, else ``$XDG_CACHE_HOME/mtconvert``, else ``~/.cache/mtconvert``.
Entries are written to a temporary folder and renamed into place, so a reader never sees half,
and two writers of one key never mix: the first rename wins. Processes sharing the cache (a
matrix's workers, Ray tasks, parallel CI jobs) also take a lock file per key
(``.KEY.lock``, fcntl.flock) from a miss until the entry is stored: a second process asking
for the same conversion waits, then reuses it, instead of converting it twice at once. The
lock file goes once the entry is in place (a later locker finds the entry and never converts).
The lock is released by ``store``, ``release``, or when the cache object goes (a conversion that
failed), and the kernel drops it when the process dies; a waiter gives up after
``LOCK_WAIT_S`` and converts by itself.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert.version import __version__
from mtconvert.backends.base import (Artifact, Backend, PreparedSource, TargetOptions,
                                     import_path)
from mtconvert.source import sha256_of

try:
    import fcntl
except ImportError:  # Windows: no lock; the atomic rename still keeps entries whole
    fcntl = None  # type: ignore[assignment]

LOCK_WAIT_S = 3600.0  # longest wait for another process converting the same key


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
        todo += [m for m in _imports_memo(texts[name]) if m.startswith("mtconvert.")]
    _IMPORTS.save()
    return texts


class _ImportsMemo:
    """``_imports`` of a module's source by the source's sha256, in this process and in the
    cache folder (``code-imports.json``): parsing every module a backend runs took 0.1-0.25 s
    per backend on each run, the same modules again for each backend."""

    def __init__(self) -> None:
        self._known: dict[str, list[str]] | None = None
        self._new = False
        self._mutex = threading.Lock()

    def _path(self) -> Path:
        return default_root() / "code-imports.json"

    def __call__(self, source: bytes) -> list[str]:
        digest = hashlib.sha256(source).hexdigest()
        with self._mutex:
            if self._known is None:
                try:
                    self._known = dict(json.loads(self._path().read_text()))
                except (OSError, ValueError, TypeError):
                    self._known = {}
            if digest in self._known:
                return list(self._known[digest])
            # parsed under the lock: CPython 3.11's ast.parse from two threads at once can
            # raise "SystemError: AST constructor recursion depth mismatch" (targets convert
            # in threads)
            found = _imports(source)
            self._known[digest], self._new = found, True
        return list(found)

    def save(self) -> None:
        with self._mutex:
            if not self._new or self._known is None:
                return
            self._new = False
            known = dict(self._known)
        try:
            path = self._path()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(known))
            tmp.replace(path)
        except OSError:  # a read-only cache folder: parse again next time
            pass


_IMPORTS = _ImportsMemo()
_imports_memo = _IMPORTS


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
        self._held: dict[str, int] = {}  # key -> descriptor of its lock file, miss to store
        self._mutex = threading.Lock()

    def key(self, backend: type[Backend], src: PreparedSource, opts: TargetOptions) -> str | None:
        if self.root is None:
            return None
        parts = {"mtconvert": __version__, "backend": import_path(backend),
                 "code": _code_hash(backend), "tools": backend.availability().versions,
                 "onnx": sha256_of(src.onnx_path), "precision": opts.precision,
                 # the artifacts are named after the source: a byte-identical model under
                 # another name is another entry (a hit restored tiny2.pte for tiny.pt2)
                 "name": src.name,
                 "extra": opts.extra, "route": opts.route, "shapes": {k: list(v) for k, v in src.input_shapes.items()},
                 "calibration": _sha_arrays(opts.calibration) if opts.precision == "int8" else None}
        if opts.keep_float:  # the float fallback's nodes (absent otherwise: older keys hold)
            parts["keep_float"] = sorted(opts.keep_float)
        if opts.sparse:  # --sparse (absent otherwise: older keys hold)
            parts["sparse"] = True
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def load(self, key: str | None, staging: Path, work: Path) -> tuple[Artifact, float] | None:
        """Copy a cached artifact into ``staging`` (variants into ``work``); None on a miss.
        A miss takes the key's lock (waiting while another process converts it, then looking
        again): the caller converts and ``store``s, which releases it."""
        if key is None or self.root is None:
            return None
        hit = self._read(key, staging, work)
        if hit is None and self._lock(key):
            hit = self._read(key, staging, work)  # stored while we waited
            if hit is not None:
                self.release(key)
        return hit

    def _read(self, key: str, staging: Path, work: Path) -> tuple[Artifact, float] | None:
        assert self.root is not None
        if not (self.root / key / "entry.json").is_file():
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
            self.release(key)

    def _lock(self, key: str) -> bool:
        """Hold ``key``'s lock file (True), or give up after LOCK_WAIT_S (False)."""
        if fcntl is None or self.root is None:
            return False
        with self._mutex:
            if key in self._held:
                return True
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path(key), os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # held in this very process (another run's cache object, not yet collected,
                # after a failed conversion): waiting could never end; convert alongside
                if os.pread(fd, 32, 0) == str(os.getpid()).encode() \
                        or time.monotonic() > deadline:
                    os.close(fd)
                    return False
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)  # who holds it
        with self._mutex:
            self._held[key] = fd
        return True

    def _lock_path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / f".{key}.lock"

    def release(self, key: str | None) -> None:
        """Let other processes convert ``key`` (after a failed conversion; ``store`` does it)."""
        with self._mutex:
            fd = self._held.pop(key, None) if key is not None else None
        if fd is not None:
            if self.root is not None and (self.root / key / "entry.json").is_file():
                self._lock_path(key).unlink(missing_ok=True)  # stored: no one needs it now
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __del__(self) -> None:
        try:
            for key in list(getattr(self, "_held", {})):
                self.release(key)
        except Exception:  # interpreter shutdown: the kernel drops the locks anyway
            pass


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


class SourceCache:
    """What loading a source computes once per file content: an ONNX model's description
    (inputs, outputs, id bounds, weight sizes), a .pt2 program's ONNX export with it. Under
    ``<root>/sources/<key>/`` (``meta.json`` and the files), written whole and renamed into
    place like conversions. The key is the file's sha256, mtconvert's version and the code that
    describes and exports sources, and the versions of the tools involved (``parts``)."""

    CODE = ("mtconvert.source", "mtconvert.torch_source", "mtconvert.safety",
            "mtconvert.quantized")

    def __init__(self, root: Path | None):
        self.root = None if root is None else root / "sources"

    def key(self, file_sha256: str, **parts: Any) -> str | None:
        if self.root is None:
            return None
        code = hashlib.sha256(b"".join(p.read_bytes() for p in map(_origin, self.CODE) if p))
        blob = {"mtconvert": __version__, "code": code.hexdigest(), "file": file_sha256,
                **parts}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()

    def get(self, key: str | None) -> tuple[dict[str, Any], Path] | None:
        """(the stored meta, the folder holding the stored files), or None."""
        if key is None or self.root is None or not (self.root / key / "meta.json").is_file():
            return None
        try:
            return json.loads((self.root / key / "meta.json").read_text()), self.root / key
        except (OSError, ValueError):  # unreadable: as if absent
            return None

    def put(self, key: str | None, meta: dict[str, Any], files: tuple[Path, ...] = ()) -> None:
        """Store ``meta`` and copies of ``files`` (by name) under ``key``; a failure to write
        the cache never fails the run."""
        if key is None or self.root is None or (self.root / key).exists():
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        except OSError:
            return
        try:
            for f in files:
                _copy(f, tmp / f.name)
            (tmp / "meta.json").write_text(json.dumps(meta))
            tmp.replace(self.root / key)
        except OSError:  # another run stored it first, or the disk is full
            pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
