"""Import coremltools without its TensorFlow front end.

coremltools imports tensorflow at import time when it is installed. With tensorflow 2.21 and
torch 2.13 in one process that aborts the interpreter ("LLVM ERROR: inconsistency in
registered CommandLine options": both bundle LLVM). mtconvert converts Core ML from PyTorch
only, so tensorflow is hidden from coremltools; this must run before coremltools is imported.
Its import-time chatter (untested torch version; no Core ML runtime off macOS) is silenced:
the report says what matters.
"""
from __future__ import annotations

import logging
import sys
import warnings
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
