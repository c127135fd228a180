"""The matrix as Markdown (a pull-request comment or a results page): the verdict, a grid with
a row per model and a column per target and precision, then why each cell did not pass."""
from __future__ import annotations

from pathlib import Path
from typing import IO, TYPE_CHECKING

from mtconvert.render.markdown import _STATUS, _esc, _one_line

if TYPE_CHECKING:
    from mtconvert.matrix_report import Cell, MatrixReport

_REASON_CHARS = 400


def render(report: MatrixReport, destination: Path | IO[str]) -> None:
    from mtconvert.render import emit

    emit(destination, to_markdown(report))


def to_markdown(report: MatrixReport) -> str:
    counts = report.counts()
    verdict = "✅ PASSED" if report.ok else "❌ FAILED"
    others = ", ".join(f"{n} {s}" for s, n in counts.items() if n and s != "passed")
    lines = [f"### mtconvert matrix: {verdict} — {counts['passed']}/{len(report.gated)} cells "
             f"passed" + (f" ({others})" if others else "") + f" (exit code {report.exit_code})",
             "", f"{len(report.models)} models × "
             f"{len({c.column for c in report.gated})} target/precision columns"
             + (f" (+ {len({c.column for c in report.raw_cells})} raw)" if report.raw_cells
                else "")
             + f", executor {report.settings.get('executor')}, {report.seconds:.1f} s", ""]
    if report.raw_summary():
        lines += [report.raw_summary() + "; a raw column follows its target's column.", ""]
    tasks = any(c.task for c in report.cells)
    header = ["model"] + (["task"] if tasks else []) + [_esc(report.label(c))
                                                          for c in report.columns]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for model in report.models:
        first = next(c for c in report.cells if c.model == model)
        row = [_esc(model)] + ([_esc(first.task or "")] if tasks else [])
        row += [_entry(report.cell(model, col)) for col in report.columns]
        lines.append("| " + " | ".join(row) + " |")
    failing = [c for c in report.cells if c.status != "passed"]
    if failing:
        lines += ["", "**Why not passed**", ""]
        for c in failing:
            reason = _one_line(c.reason or c.error or c.status)
            if len(reason) > _REASON_CHARS:
                reason = reason[:_REASON_CHARS] + "…"
            lines.append(f"- **{_esc(c.id)}** ({c.status}): {_esc(reason)}")
    return "\n".join(lines).rstrip() + "\n"


def _entry(c: Cell | None) -> str:
    if c is None:
        return "–"
    text = _STATUS[c.status]
    t = c.report
    worst = (t.numerics.worst or {}) if t and t.numerics else {}
    if worst.get("cosine") is not None:
        text += f" (cos {worst['cosine']:.4f})"
    return text
