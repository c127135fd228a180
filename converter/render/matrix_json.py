"""The matrix's JSON report (schema in mtconvert.matrix_report): to a file, written atomically,
or a stream."""
from __future__ import annotations

from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from mtconvert.matrix_report import MatrixReport


def render(report: MatrixReport, destination: Path | IO[str]) -> None:
    from mtconvert.render import emit

    emit(destination, report.to_json() + "\n")
