"""What ``mtconvert backends`` shows: every registered backend, including broken plugins."""
from __future__ import annotations

from typing import Any

from mtconvert.registry import BackendLoadError, Registry, default_registry


def describe_backends(registry: Registry | None = None) -> list[dict[str, Any]]:
    registry = registry or default_registry()
    rows = []
    for name, entry in registry.entries.items():
        row: dict[str, Any] = {"name": name, "entry_point": entry.value, "distribution": entry.dist,
                               "aliases": [], "precisions": [], "can_convert": False,
                               "can_run": False, "versions": {}, "install_hint": None,
                               "reason": None, "error": None}
        try:
            cls = entry.load()
        except BackendLoadError:
            row["error"] = f"failed to load: {entry.error}"
            rows.append(row)
            continue
        av = cls.availability()
        row.update(aliases=list(cls.aliases), precisions=list(cls.precisions),
                   can_convert=av.can_convert, can_run=av.can_run, versions=av.versions,
                   install_hint=av.install_hint, reason=av.reason, description=cls.description)
        rows.append(row)
    return rows
