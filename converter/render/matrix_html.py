"""The matrix as one self-contained HTML page: the verdict, the grid (a row per model, a column
per target and precision, each cell coloured by status with its cosine and p50), and why each
cell did not pass. Nothing fetched, no script (the same Content-Security-Policy as the single
run's page); every string from the report is escaped."""
from __future__ import annotations

from html import escape
from pathlib import Path
from typing import IO, TYPE_CHECKING

from mtconvert.render.html import COLORS, CSP

if TYPE_CHECKING:
    from mtconvert.matrix_report import Cell, MatrixReport

STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;color:#1f2328}"
         "table{border-collapse:collapse}td,th{border:1px solid #d0d7de;padding:4px 8px;"
         "text-align:left}th{background:#f6f8fa}.s{color:#fff;font-weight:600}"
         "small{color:#57606a}")


def render(report: MatrixReport, destination: Path | IO[str]) -> None:
    from mtconvert.render import emit

    emit(destination, to_html(report))


def to_html(report: MatrixReport) -> str:
    e = lambda x: escape(str(x), quote=True)  # noqa: E731
    counts = report.counts()
    verdict = "PASSED" if report.ok else "FAILED"
    rows = []
    for model in report.models:
        cells = "".join(_td(report.cell(model, col)) for col in report.columns)
        rows.append(f"<tr><th>{e(model)}</th>{cells}</tr>")
    why = "".join(f"<li><b>{e(c.id)}</b> ({e(c.status)}): {e(c.reason or c.error or '')}</li>"
                  for c in report.cells if c.status != "passed")
    head = "".join(f"<th>{e(report.label(col))}</th>" for col in report.columns)
    raw = report.raw_summary()
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>mtconvert matrix: {verdict}</title><style>{STYLE}</style></head><body>"
            f"<h1>mtconvert matrix: {verdict}</h1><p>{counts['passed']}/{len(report.gated)} "
            f"cells passed (exit code {report.exit_code}); executor "
            f"{e(report.settings.get('executor'))}, {report.seconds:.1f} s</p>"
            + (f"<p>{e(raw)}; a raw column follows its target's column.</p>" if raw else "")
            + f"<table><tr><th>model</th>{head}</tr>{''.join(rows)}</table>"
            + (f"<h2>Why not passed</h2><ul>{why}</ul>" if why else "")
            + f"<footer><small>mtconvert {e(report.mtconvert_version)} · "
            f"{e(report.created)}</small></footer></body></html>\n")


def _td(c: Cell | None) -> str:
    if c is None:
        return "<td>-</td>"
    t = c.report
    worst = (t.numerics.worst or {}) if t and t.numerics else {}
    extra = []
    if worst.get("cosine") is not None:
        extra.append(f"cos {worst['cosine']:.4f}")
    if t and t.latency:
        extra.append(f"{t.latency.p50_ms:.2f} ms")
    return (f'<td class="s" style="background:{COLORS[c.status]}">{escape(c.status)}'
            + (f"<br><small style=\"color:#fff\">{escape(', '.join(extra))}</small>"
               if extra else "") + "</td>")
