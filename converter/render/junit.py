"""JUnit XML for CI test views (GitLab, Jenkins, GitHub test-report actions): one testsuite per
target, one testcase per check, written with junitparser.

Testcases of a target, in order:
- ``conversion`` (convert mode; validate/verify adopt an artifact built elsewhere and have none,
  unless loading it failed: then ``artifact``);
- ``mobile-compatibility``: the lint; fails on error findings, every finding in system-out;
- ``numerics: <output>`` per output, and ``numerics at <shapes>`` per extra shape of a sweep;
  failure messages carry the figures (max abs, cosine, SNR) and the tolerance;
- ``latency``: passes when measured, skipped with ``latency_unavailable`` when not;
- ``accuracy: <metric>`` per task-level accuracy gate, once the report carries accuracy data
  (``_accuracy`` is the hook: none yet);
- ``verdict``: the target's status as the exit code sees it: a failed target fails, an errored
  one errors, and a skipped target fails (nothing unproven passes: exit code 1) while its checks
  that could not run are skipped.

So the file agrees with the exit code: errors > 0 exactly when it is 3, otherwise failures > 0
exactly when it is 1.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from junitparser import JUnitXml, TestCase

    from mtconvert.report import Report, TargetReport

# control characters (ANSI colours in tool output...) are not allowed in XML 1.0
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def render(report: Report, destination: Path | IO[Any]) -> None:
    """To a file (written atomically) or a stream (text or binary)."""
    data = build(report).tostring()
    data = b'<?xml version="1.0" encoding="utf-8"?>\n' + data + b"\n"
    from mtconvert.render import emit_bytes

    emit_bytes(destination, data)


def build(report: Report) -> JUnitXml:
    from junitparser import Failure, JUnitXml, TestCase, TestSuite

    xml = JUnitXml("mtconvert")
    mode = report.settings.get("mode", "convert")
    for t in report.targets.values():
        suite = TestSuite(f"{t.name} {t.precision}")
        for key, value in _properties(report, t).items():
            suite.add_property(key, _text(value))
        suite.add_testcases(_cases(t, mode))
        xml.add_testsuite(suite)
    if not report.targets:  # no target ran: exit code 1, so a failure
        suite = TestSuite("mtconvert")
        case = TestCase("targets", "mtconvert")
        case.result = [Failure("no target ran")]
        suite.add_testcase(case)
        xml.add_testsuite(suite)
    xml.update_statistics()
    return xml


def _properties(report: Report, t: TargetReport) -> dict[str, Any]:
    props = {"target": t.name, "precision": t.precision, "status": t.status,
             "source": report.source.path or "(in-memory module)",
             "mtconvert_version": report.mtconvert_version, "exit_code": report.exit_code}
    if t.numerics is not None:
        props["runtime"] = t.numerics.runtime
    if t.artifacts:
        props["artifacts"] = ", ".join(a.path for a in t.artifacts)
    if t.log:
        props["log"] = t.log
    if t.float_fallback:  # the int8 float fallback in one line (mtconvert.run.fallback)
        from mtconvert.render import float_fallback_line

        props["float_fallback"] = float_fallback_line(t.float_fallback)
    return props


class _Cases:
    """The testcases of one target; once a stage stops the target, later ones are skipped."""

    def __init__(self, t: TargetReport):
        self.t, self.cases, self.stopped = t, [], None  # type: ignore[var-annotated]
        self.classname = f"mtconvert.{t.name}"

    def add(self, name: str, result: Any = None, out: str | None = None,
            time: float | None = None) -> TestCase:
        from junitparser import TestCase

        case = TestCase(_text(name), self.classname, time)
        if result is not None:
            case.result = [result]
        if out:
            case.system_out = _text(out)
        self.cases.append(case)
        return case

    def not_run(self, name: str, why: str | None = None) -> None:
        from junitparser import Skipped

        self.add(name, Skipped(_text(f"not run: {self.stopped or why}")))


def _cases(t: TargetReport, mode: str) -> list[TestCase]:
    from junitparser import Error, Failure, Skipped

    c = _Cases(t)
    reason = t.reason or t.status
    # where the artifact came from
    if mode == "convert":
        if t.conversion is not None:
            c.add("conversion", out=_conversion_text(t), time=t.timings.get("convert_s"))
        elif t.status == "error":
            c.add("conversion", Error(_text(reason), "conversion"))
            c.stopped = "the conversion failed"
        else:
            c.add("conversion", Skipped(_text(reason)))
            c.stopped = f"the target was skipped ({reason})"
    elif not t.artifacts:
        result = Error(_text(reason), "artifact") if t.status == "error" else Skipped(_text(reason))
        c.add("artifact", result)
        c.stopped = "the artifact could not be loaded"
    # mobile compatibility
    if c.stopped or not t.artifacts:
        c.not_run("mobile-compatibility", "no artifact")
    else:
        errors = [f for f in t.findings if f.get("severity") == "error"]
        listing = "\n".join(f"{f.get('severity')} {f.get('code')}: {f.get('message')}"
                            for f in t.findings)
        result = Failure(_text("; ".join(f"{f.get('code')}: {f.get('message')}" for f in errors)),
                         "mobile-compatibility") if errors else None
        c.add("mobile-compatibility", result, listing or None, t.timings.get("lint_s"))
        if errors:
            c.stopped = "the mobile-compatibility check failed"
    _numerics(c, reason)
    _latency(c)
    for case in _accuracy(t) + _generation(t):
        c.cases.append(case)
    _baseline(c)
    verdict = {"failed": Failure(_text(reason), "failed"),
               "error": Error(_text(reason), "error"),
               "skipped": Failure(_text(f"skipped: {reason}; a target that was not checked does "
                                        "not pass (exit code 1)"), "skipped")}.get(t.status)
    c.add("verdict", verdict)
    return c.cases


def _numerics(c: _Cases, reason: str) -> None:
    from junitparser import Error, Failure, Skipped

    t = c.t
    if t.numerics is None:
        if c.stopped:
            c.not_run("numerics")
        elif t.status == "error":  # the artifact was made but did not run
            c.add("numerics", Error(_text(reason), "run"))
            c.stopped = "the artifact did not run"
        else:
            c.add("numerics", Skipped(_text(reason)))
            c.stopped = reason
        return
    for name, m in t.numerics.outputs.items():
        figures = _figures(m)
        result = None if m.get("passed") else Failure(
            _text(f"{name}: {m.get('reason')}; {figures}"), "numerics")
        c.add(f"numerics: {name}", result, f"{name}: {figures}\nruntime: {t.numerics.runtime}",
              None)
    for entry in t.sweep:
        shapes = ", ".join(f"{k}={'x'.join(map(str, v))}"
                           for k, v in (entry.get("input_shapes") or {}).items())
        worst = entry.get("worst") or {}
        figures = (f"worst output {worst.get('output')}: max abs {_g(worst.get('max_abs'))}, "
                   f"cosine {_cos(worst.get('cosine'))}") if worst else ""
        status, why = entry.get("status"), entry.get("reason") or ""
        # a sweep shape that errored fails the target (exit code 1): a failure here too
        result = {"failed": Failure(_text(f"{why}; {figures}".strip("; ")), "numerics"),
                  "error": Failure(_text(f"error: {why}"), "error"),
                  "skipped": Skipped(_text(why))}.get(status)
        c.add(f"numerics at {shapes}", result, figures or None)


def _latency(c: _Cases) -> None:
    from junitparser import Skipped

    t = c.t
    if t.latency is not None:
        lat = t.latency
        c.add("latency", out=f"p50 {lat.p50_ms:.4g} ms, p90 {lat.p90_ms:.4g} ms, p99 "
                             f"{lat.p99_ms:.4g} ms, mean {lat.mean_ms:.4g} ms ({lat.iterations} "
                             f"iterations after {lat.warmup} warm-up, {lat.threads} threads)")
    elif t.latency_unavailable:
        c.add("latency", Skipped(_text(t.latency_unavailable)))
    elif c.stopped or t.numerics is None:
        c.not_run("latency", "the artifact did not run")
    else:
        c.add("latency", Skipped("not measured"))


def _baseline(c: _Cases) -> None:
    """--baseline: one testcase per comparison (latency, size, each output's error); an
    inconclusive latency change is skipped with its figures, never passed or failed."""
    from junitparser import Failure, Skipped

    for check in (c.t.baseline or {}).get("checks", ()):
        status, message = check["status"], _text(check["message"])
        result = {"failed": Failure(message, "baseline"), "skipped": Skipped(message),
                  "inconclusive": Skipped(f"inconclusive: {message}")}.get(status)
        c.add(f"baseline: {check['check']}", result, None if result else message)


def _accuracy(t: TargetReport) -> list[TestCase]:
    """The accuracy gate (--eval-data): one testcase with the metric, the reference's value and
    the drop against its limit."""
    from junitparser import Failure, TestCase

    a = t.accuracy
    if not a:
        return []
    case = TestCase(_text(f"accuracy: {a.get('metric', 'task metric')}"), f"mtconvert.{t.name}")
    if "error" in a:
        case.result = [Failure(_text(f"not measured: {a['error']}"), "failed")]
    elif not a["passed"]:
        case.result = [Failure(_text(
            f"{a['target']:.4g} vs the reference's {a['reference']:.4g} on {a['items']} items: "
            f"-{a['drop_points']:.2f} points > {a['max_drop_points']:g}"), "failed")]
    return [case]


def _generation(t: TargetReport) -> list[TestCase]:
    """Generative models: one testcase, failed when the generation did not pass, skipped when
    it was not judged; its text the headline and any differing token ids."""
    from junitparser import Failure, Skipped, TestCase

    from mtconvert.render import generation_differences, generation_headline

    g = t.generation
    if not g:
        return []
    case = TestCase("generation", f"mtconvert.{t.name}")
    text = generation_headline(g)
    differ = generation_differences(g)
    if differ:
        text += "\n" + "\n".join(f"step {k}: reference {r}, target {o}" for k, r, o in differ)
    if "steps" not in g:
        case.result = [Skipped(_text(text))]
    elif not g.get("passed"):
        case.result = [Failure(_text(text), "generation")]
    else:
        case.system_out = _text(text)
    return [case]


def _figures(m: dict[str, Any]) -> str:
    tol = m.get("tolerance") or {}
    bounds = ", ".join(f"{k} {v:g}" for k, v in tol.items() if v is not None)
    snr = m.get("snr_db")
    return (f"max abs {_g(m.get('max_abs'))}, cosine {_cos(m.get('cosine'))}"
            + (f", SNR {snr:.1f} dB" if snr is not None else "")
            + f" (tolerance: {bounds or 'none'})")


def _g(x: Any) -> str:
    return "-" if x is None else f"{x:.3g}"


def _cos(x: Any) -> str:
    return "-" if x is None else f"{x:.6f}"


def _conversion_text(t: TargetReport) -> str:
    conv = t.conversion
    assert conv is not None
    head = (f"{conv.seconds:.1f} s" + (" (reused from the cache)" if conv.cached else ""))
    return "\n".join([head, *conv.steps])


def _text(value: Any) -> str:
    return _NOT_XML.sub("", _ANSI.sub("", str(value)))
