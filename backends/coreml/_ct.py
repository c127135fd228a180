"""Import coremltools without its TensorFlow front end; or use its protobuf files without
importing it at all (``proto``: what reading a saved .mlpackage needs).

coremltools imports tensorflow at import time when it is installed. With tensorflow 2.21 and
torch 2.13 in one process that aborts the interpreter ("LLVM ERROR: inconsistency in
registered CommandLine options": both bundle LLVM). mtconvert converts Core ML from PyTorch
only, so tensorflow is hidden from coremltools; this must run before coremltools is imported.
Its import-time chatter (untested torch version; no Core ML runtime off macOS) is silenced:
the report says what matters.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import logging
import sys
import warnings
from pathlib import Path
from types import ModuleType

_HIDDEN = ("tensorflow", "tf_keras")


def coremltools() -> ModuleType:
    """The ``coremltools`` module, imported with tensorflow hidden (if tensorflow is not
    already loaded in this process, in which case nothing can be hidden)."""
    if "coremltools" not in sys.modules:
        for name in _HIDDEN:
            if name not in sys.modules:
                sys.modules[name] = None  # type: ignore[assignment]  # import now raises
        quiet = logging.getLogger("coremltools")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "untested torch version", "no libcoremlpython" (Linux)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import coremltools as ct  # noqa: F401
        finally:
            quiet.setLevel(level)
            for name in _HIDDEN:
                if sys.modules.get(name, 0) is None:
                    del sys.modules[name]
    return sys.modules["coremltools"]


# --- coremltools' files without coremltools ---------------------------------------------------
#
# Reading a saved .mlpackage needs only coremltools' generated protobuf classes, and importing
# the coremltools package for them costs seconds (it imports torch). The generated modules are
# plain protobuf-runtime code that import one another relatively (``from . import MIL_pb2``), so
# they are loaded from coremltools' proto folder as the submodules of a stand-in package:
# same descriptors in protobuf's default pool, hence the very same message classes as
# ``coremltools.proto.*`` if coremltools is imported later in the process (or earlier).

_PROTO_PACKAGE = "mtconvert_coremltools_proto"


def package_folder() -> Path | None:
    """coremltools' installed folder, found on the import path without importing it."""
    loaded = sys.modules.get("coremltools")
    if loaded is not None and getattr(loaded, "__path__", None):
        return Path(list(loaded.__path__)[0])
    try:
        spec = importlib.machinery.PathFinder.find_spec("coremltools")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def proto(name: str) -> ModuleType:
    """coremltools' generated protobuf module ``name`` (``"Model_pb2"``, ``"MIL_pb2"``...),
    without importing coremltools: coremltools' own module when it is loaded already, else
    the file from its proto folder (the protobuf runtime is all it needs)."""
    own = sys.modules.get(f"coremltools.proto.{name}")
    if own is not None:
        return own
    if _PROTO_PACKAGE not in sys.modules:
        folder = package_folder()
        if folder is None or not (folder / "proto" / f"{name}.py").is_file():
            raise ImportError(f"coremltools' protobuf module {name} was not found: "
                              "pip install coremltools")
        package = ModuleType(_PROTO_PACKAGE, "coremltools' proto folder, loaded by path")
        package.__path__ = [str(folder / "proto")]
        package.__package__ = _PROTO_PACKAGE
        sys.modules[_PROTO_PACKAGE] = package
    return importlib.import_module(f"{_PROTO_PACKAGE}.{name}")
