"""Dependency helper: is a package installed, and which version, without importing it."""
from __future__ import annotations

import importlib.metadata
import importlib.machinery
import importlib.util
import sys

from mtconvert.errors import BackendUnavailableError


def module_present(module: str) -> bool:
    """Installed, judged from the import path. A None entry in sys.modules (how the coreml
    backend hides tensorflow from coremltools, for a moment, in whatever thread) is not
    "missing": find_spec would say so, so top-level names are looked up on sys.path."""
    try:
        if "." not in module and sys.modules.get(module, 0) is None:
            return importlib.machinery.PathFinder.find_spec(module) is not None
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def dist_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_modules(modules: dict[str, str]) -> list[str]:
    """modules maps import name -> distribution name; returns the distributions missing."""
    return [dist for mod, dist in modules.items() if not module_present(mod)]


def versions(distributions: list[str]) -> dict[str, str]:
    return {d: v for d in distributions if (v := dist_version(d)) is not None}


def require(target: str, modules: dict[str, str], extra: str) -> None:
    missing = missing_modules(modules)
    if missing:
        raise BackendUnavailableError(target, missing, extra)
