"""The JSON report (schema in mtconvert.report): to a file, written atomically, or a stream."""
from __future__ import annotations

from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from mtconvert.report import Report


def render(report: Report, destination: Path | IO[str]) -> None:
    from mtconvert.render import emit

    emit(destination, report.to_json() + "\n")
