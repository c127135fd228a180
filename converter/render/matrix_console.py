"""The matrix on a terminal: a pass/fail/error grid (a row per model, a column per target and
precision), then each cell that did not pass with its reason, then the verdict. rich is
imported here only."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from mtconvert.matrix_report import Cell, MatrixReport

_STYLE = {"passed": "bold green", "failed": "bold red", "error": "bold magenta",
          "skipped": "yellow"}


def render(report: MatrixReport, destination: Any) -> None:
    """To a rich Console, or a text stream (120 columns when it is no terminal)."""
    from rich.console import Console

    console = destination if isinstance(destination, Console) else Console(
        file=destination, highlight=False, width=None if destination.isatty() else 120)
    _render(report, console)


def _render(report: MatrixReport, console: Console) -> None:
    from rich.markup import escape
    from rich.table import Table

    s = report.settings
    console.print(f"[bold]Matrix[/] {escape(str(s.get('matrix', '')))}  [dim]{len(report.cells)} "
                  f"cells, executor {s.get('executor')}, {report.seconds:.1f} s"
                  + (f", {s['resumed_cells']} kept from an earlier run"
                     if s.get("resumed_cells") else "") + "[/]")
    table = Table(header_style="bold")
    table.add_column("model", no_wrap=True, min_width=min(12, max(map(len, report.models))))
    # many columns (--raw doubles them): statuses only, headers wrap, so none collapses
    compact = len(report.columns) > 5
    tasks = any(c.task for c in report.cells) and not compact
    if tasks:
        table.add_column("task", style="dim")
    for col in report.columns:
        table.add_column(escape(report.label(col)), no_wrap=not compact, min_width=6,
                         overflow="fold" if compact else "ellipsis")
    for model in report.models:
        first = next(c for c in report.cells if c.model == model)
        row = [escape(model)] + ([escape(first.task or "")] if tasks else [])
        for col in report.columns:
            cell = report.cell(model, col)
            row.append(_entry(cell, compact) if cell else "[dim]-[/]")
        table.add_row(*row)
    console.print(table)
    for c in report.cells:
        if c.status != "passed":
            console.print(f"[{_STYLE[c.status]}]{c.status}[/] {escape(c.id)}: "
                          f"{escape(c.reason or c.error or c.status)}")
            if c.report and c.report.log and c.status == "error":
                console.print(f"  [dim]log: {escape(c.report.log)}[/]")
    counts = report.counts()
    verdict = "[bold green]PASSED[/]" if report.ok else "[bold red]FAILED[/]"
    others = ", ".join(f"{n} {s}" for s, n in counts.items() if n and s != "passed")
    if report.raw_summary():
        console.print(f"[dim]{escape(report.raw_summary())}[/]")
    console.print(f"{verdict}  {counts['passed']}/{len(report.gated)} cells passed"
                  + (f" ({others})" if others else "")
                  + f" [dim](exit code {report.exit_code})[/]")


def _entry(c: Cell, compact: bool = False) -> str:
    text = f"[{_STYLE[c.status]}]{c.status}[/]"
    if compact:
        return text + (" [dim](kept)[/]" if c.resumed else "")
    t = c.report
    worst = (t.numerics.worst or {}) if t and t.numerics else {}
    if worst.get("cosine") is not None:
        text += f" [dim]cos {worst['cosine']:.4f}[/]"
    if t and t.latency:
        text += f" [dim]{t.latency.p50_ms:.2f} ms[/]"
    return text + (" [dim](kept)[/]" if c.resumed else "")
