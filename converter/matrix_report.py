"""The MatrixReport: what one ``mtconvert matrix`` run found, as frozen data. A cell is one model
x target x precision with the cell's TargetReport, or the error that kept it from one (its
worker died, timed out, or the model could not be loaded). Renderers are functions of it alone.

A raw cell (``raw`` set, ``mtconvert matrix --raw``) is the same model through the target's raw
toolchain at its defaults, judged by the same validator (``mtconvert validate``): shown beside
mtconvert's cell for comparison, never gated (``ok``, ``exit_code`` and ``counts`` read
mtconvert's cells only; ``raw_counts`` the raw ones).

JSON field names are a contract (matrix schema_version 1): later versions add fields, never
rename. Exit code as for a single run: 0 every cell passed, 1 a cell failed or was skipped,
3 a cell errored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mtconvert.errors import EXIT_BACKEND, EXIT_CHECK_FAILED, EXIT_PASSED
from mtconvert.report import STATUSES, TargetReport

MATRIX_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Cell:
    model: str
    target: str
    precision: str
    status: str  # passed | failed | error | skipped
    reason: str | None = None
    report: TargetReport | None = None  # None when the cell has no report (``error`` says why)
    error: str | None = None  # the cell's own error: worker died, time-out, unreadable model
    source: str | None = None  # the model's path
    task: str | None = None  # what the matrix file says the model does (free text)
    seconds: float = 0.0  # wall time of the cell, worker start to result
    reference_p50_ms: float | None = None  # the cell's reference latency, for ratios
    resumed: bool = False  # True: read back from an earlier run (--resume), not run now
    raw: str | None = None  # the raw toolchain (onnx2tf, pnnx, ...); None: mtconvert's cell
    command: str | None = None  # raw: what was run, as a user would type it

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {self.status!r}")

    @property
    def id(self) -> str:
        return f"{self.model}/{self.target}/{self.precision}" + (f"/raw-{self.raw}"
                                                                  if self.raw else "")

    @property
    def column(self) -> str:
        return f"{self.target} {self.precision}" + (f" raw {self.raw}" if self.raw else "")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "target": self.target, "precision": self.precision,
                "status": self.status, "reason": self.reason,
                "report": self.report.to_dict() if self.report else None, "error": self.error,
                "source": self.source, "task": self.task, "seconds": self.seconds,
                "reference_p50_ms": self.reference_p50_ms, "resumed": self.resumed,
                "raw": self.raw, "command": self.command}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cell:
        rep = d.get("report")
        return cls(d["model"], d["target"], d["precision"], d["status"], d.get("reason"),
                   TargetReport.from_dict(rep) if rep else None, d.get("error"),
                   d.get("source"), d.get("task"), float(d.get("seconds", 0.0)),
                   d.get("reference_p50_ms"), bool(d.get("resumed", False)), d.get("raw"),
                   d.get("command"))


@dataclass(frozen=True)
class MatrixReport:
    cells: tuple[Cell, ...]
    settings: dict[str, Any] = field(default_factory=dict)  # matrix file, executor, jobs, out
    seconds: float = 0.0
    mtconvert_version: str = ""
    created: str = ""
    schema_version: int = MATRIX_SCHEMA_VERSION

    @property
    def gated(self) -> tuple[Cell, ...]:
        """mtconvert's cells: the ones the verdict and the exit code read (not the raw ones)."""
        return tuple(c for c in self.cells if not c.raw)

    @property
    def raw_cells(self) -> tuple[Cell, ...]:
        return tuple(c for c in self.cells if c.raw)

    @property
    def ok(self) -> bool:
        """True when at least one cell ran and every (mtconvert) cell passed."""
        return bool(self.gated) and all(c.status == "passed" for c in self.gated)

    @property
    def exit_code(self) -> int:
        if any(c.status == "error" for c in self.gated):
            return EXIT_BACKEND
        return EXIT_PASSED if self.ok else EXIT_CHECK_FAILED

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(c.model for c in self.cells))

    @property
    def columns(self) -> list[str]:
        """``target precision`` of every cell, in the order first met."""
        return list(dict.fromkeys(c.column for c in self.cells))

    def label(self, column: str) -> str:
        """A column's header: ``target precision``, or ``raw TOOL`` for a raw column (it sits
        right after its target's column)."""
        first = next((c for c in self.cells if c.column == column), None)
        return f"raw {first.raw}" if first is not None and first.raw else column

    def raw_summary(self) -> str | None:
        """``raw toolchains (not gated): 3/8 passed (4 failed, 1 error)``, None without --raw."""
        if not self.raw_cells:
            return None
        n = self.raw_counts()
        others = ", ".join(f"{k} {s}" for s, k in n.items() if k and s != "passed")
        return (f"raw toolchains at their defaults (not gated): {n['passed']}/"
                f"{len(self.raw_cells)} passed" + (f" ({others})" if others else ""))

    def counts(self) -> dict[str, int]:
        """Statuses of mtconvert's cells (the gate)."""
        return {s: sum(c.status == s for c in self.gated) for s in STATUSES}

    def raw_counts(self) -> dict[str, int]:
        """Statuses of the raw-toolchain cells (--raw), per status."""
        return {s: sum(c.status == s for c in self.raw_cells) for s in STATUSES}

    def cell(self, model: str, column: str) -> Cell | None:
        return next((c for c in self.cells if c.model == model and c.column == column), None)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "matrix", "schema_version": self.schema_version, "ok": self.ok,
                "exit_code": self.exit_code, "counts": self.counts(),
                "raw_counts": self.raw_counts(),
                "mtconvert_version": self.mtconvert_version, "created": self.created,
                "seconds": self.seconds, "settings": self.settings,
                "cells": [c.to_dict() for c in self.cells]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MatrixReport:
        if d.get("kind") != "matrix" or d.get("schema_version") != MATRIX_SCHEMA_VERSION:
            raise ValueError(f"not a matrix report of schema_version {MATRIX_SCHEMA_VERSION}")
        return cls(tuple(Cell.from_dict(c) for c in d["cells"]), dict(d.get("settings", {})),
                   float(d.get("seconds", 0.0)), d.get("mtconvert_version", ""),
                   d.get("created", ""))

    @classmethod
    def from_json(cls, text: str) -> MatrixReport:
        return cls.from_dict(json.loads(text))
