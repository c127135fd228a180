"""Backend discovery through the entry-point group ``mtconvert.backends``.

Discovery reads package metadata only; a backend module is imported the first time it is used.
A plugin that fails to import is listed with the reason and never breaks the CLI. Two
distributions registering one name is an error naming both.
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING

from mtconvert.errors import EXIT_BACKEND, EXIT_USAGE, MtConvertError, UnknownTargetError

if TYPE_CHECKING:
    from mtconvert.backends.base import Backend

GROUP = "mtconvert.backends"


class BackendLoadError(MtConvertError):
    exit_code = EXIT_BACKEND


class DuplicateBackendError(MtConvertError):
    exit_code = EXIT_USAGE


@dataclass
class BackendEntry:
    name: str
    value: str  # "module:Class"
    dist: str | None = None
    cls: type[Backend] | None = None
    error: str | None = None

    def load(self) -> type[Backend]:
        if self.cls is None and self.error is None:
            self.cls, self.error = _import(self)
        if self.cls is None:
            raise BackendLoadError(f"backend {self.name!r} ({self.value}) failed to load: {self.error}")
        return self.cls


def _import(entry: BackendEntry) -> tuple[type[Backend] | None, str | None]:
    from mtconvert.backends.base import Backend

    try:
        obj = importlib.metadata.EntryPoint(entry.name, entry.value, GROUP).load()
    except Exception as exc:  # a broken plugin is reported, never fatal
        return None, f"{type(exc).__name__}: {exc}"
    if not (isinstance(obj, type) and issubclass(obj, Backend)):
        return None, f"{entry.value} is not a mtconvert Backend subclass"
    if obj.name != entry.name:
        return None, f"{entry.value} declares name {obj.name!r}, registered as {entry.name!r}"
    return obj, None


@dataclass
class Registry:
    entries: dict[str, BackendEntry] = field(default_factory=dict)

    @classmethod
    def from_entry_points(cls) -> Registry:
        reg = cls()
        for ep in importlib.metadata.entry_points(group=GROUP):
            dist = ep.dist.name if ep.dist else None
            reg.add(BackendEntry(ep.name, ep.value, dist))
        return reg

    def add(self, entry: BackendEntry) -> None:
        old = self.entries.get(entry.name)
        if old is not None and old.value != entry.value:
            raise DuplicateBackendError(
                f"backend name {entry.name!r} is registered twice: by {old.dist or old.value} "
                f"and by {entry.dist or entry.value}; uninstall one of them")
        self.entries.setdefault(entry.name, entry)

    def register(self, cls: type[Backend]) -> None:
        """Register a class directly (in-process plugins and tests)."""
        from mtconvert.backends.base import import_path

        self.add(BackendEntry(cls.name, import_path(cls), None, cls))

    def names(self) -> list[str]:
        return list(self.entries)

    def aliases(self) -> dict[str, str]:
        out = {}
        for name, entry in self.entries.items():
            try:
                out.update({a: name for a in entry.load().aliases})
            except BackendLoadError:
                continue
        return out

    def resolve(self, token: str) -> str:
        token = token.strip().lower()
        if token in self.entries:
            return token
        aliases = self.aliases()
        if token in aliases:
            return aliases[token]
        raise UnknownTargetError(token, list(self.entries) + list(aliases))

    def get(self, token: str) -> type[Backend]:
        return self.entries[self.resolve(token)].load()

    def available(self) -> list[str]:
        """Names of backends that load and can both convert and run here."""
        out = []
        for name, entry in self.entries.items():
            try:
                av = entry.load().availability()
            except BackendLoadError:
                continue
            if av.can_convert and av.can_run:
                out.append(name)
        return out


@cache
def default_registry() -> Registry:
    return Registry.from_entry_points()
