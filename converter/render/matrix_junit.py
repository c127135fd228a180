"""The matrix as JUnit XML (junitparser): one testsuite per model, one testcase per cell
(``target precision``). A failed cell fails, an errored one errors, a skipped one fails (as
in a single run's report: nothing unproven passes), so the file agrees with the exit code:
errors > 0 exactly when it is 3, otherwise failures > 0 exactly when it is 1. A raw-toolchain
cell (--raw) is not gated: its testcase (``target precision raw TOOL``) is skipped, its status
and reason in the message. Each case's system-out holds the cell's figures; the cell's own
report has every check."""
from __future__ import annotations

from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from mtconvert.render.junit import _figures, _text

if TYPE_CHECKING:
    from junitparser import JUnitXml, TestCase

    from mtconvert.matrix_report import Cell, MatrixReport


def render(report: MatrixReport, destination: Path | IO[Any]) -> None:
    """To a file (written atomically) or a stream (text or binary)."""
    data = b'<?xml version="1.0" encoding="utf-8"?>\n' + build(report).tostring() + b"\n"
    from mtconvert.render import emit_bytes

    emit_bytes(destination, data)


def build(report: MatrixReport) -> JUnitXml:
    from junitparser import Failure, JUnitXml, TestCase, TestSuite

    xml = JUnitXml("mtconvert matrix")
    for model in report.models:
        cells = [c for c in report.cells if c.model == model]
        suite = TestSuite(model)
        props = {"model": model, "source": cells[0].source or "", "task": cells[0].task or "",
                 "mtconvert_version": report.mtconvert_version,
                 "matrix_exit_code": report.exit_code}
        for key, value in props.items():
            suite.add_property(key, _text(value))
        suite.add_testcases([_case(c) for c in cells])
        xml.add_testsuite(suite)
    if not report.cells:
        suite = TestSuite("mtconvert matrix")
        case = TestCase("cells", "mtconvert.matrix")
        case.result = [Failure("no cell ran")]
        suite.add_testcase(case)
        xml.add_testsuite(suite)
    xml.update_statistics()
    return xml


def _case(c: Cell) -> TestCase:
    from junitparser import Error, Failure, Skipped, TestCase

    case = TestCase(_text(c.column), _text(f"mtconvert.matrix.{c.model}"), c.seconds)
    reason = _text(c.reason or c.error or c.status)
    if c.raw:  # shown, not gated
        result = Skipped(_text(f"raw {c.raw} at its defaults, not gated: {c.status}"
                               + (f": {reason}" if c.status != "passed" else "")), "raw")
    else:
        result = {"failed": Failure(reason, "failed"), "error": Error(reason, "error"),
                  "skipped": Failure(_text(f"skipped: {reason}; a cell that was not checked "
                                           "does not pass (exit code 1)"), "skipped")
                  }.get(c.status)
    if result is not None:
        case.result = [result]
    out = []
    t = c.report
    if t and t.numerics:
        out += [f"{name}: {_figures(m)}" for name, m in t.numerics.outputs.items()]
    if t and t.latency:
        out.append(f"latency p50 {t.latency.p50_ms:.4g} ms")
    if t and t.artifacts:
        out.append("artifacts: " + ", ".join(a.path for a in t.artifacts))
    if t and t.log:
        out.append(f"log: {t.log}")
    if c.resumed:
        out.append("kept from an earlier run (--resume)")
    if c.command:
        out.append(f"command: {c.command}")
    if out:
        case.system_out = _text("\n".join(out))
    return case
