"""The int8 float fallback: an int8 artifact whose numerics fail is converted again with the
layers that add the most quantization error (``diagnostics.quantization_error``, see
mtconvert.quant_error) kept in float, in a growing set (ROUNDS), until one passes.

Bounded: at most ROUNDS rounds and MAX_SHARE of the weight layers. Each round ranks again: the
layers of the latest failing artifact's ranking come first, then the earlier ones. The first
artifact whose numerics pass is the target's artifact (its size and latency gates still
apply); if none passes, the last round's artifact is, and the target fails with the kept layers
named. Runs only where the backend honours ``TargetOptions.keep_float``
(``Backend.keeps_float``) and the user did not pass ``--no-float-fallback``. A quantized source
is not covered (keeping a layer in float would mean dequantizing that layer's weight).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mtconvert.backends.base import Artifact, Backend
from mtconvert.errors import StepError
from mtconvert.report import Conversion, TargetReport
from mtconvert.run.context import RunContext

ROUNDS = (1, 2, 4)  # layers kept in float per round, at most
MAX_SHARE = 0.25  # of the weight layers, at most, kept in float

# convert with these source nodes kept in float -> (artifact, conversion, its staging area)
Convert = Callable[[tuple[str, ...]], tuple[Artifact, Conversion, Path]]
Check = Callable[[Artifact, Conversion], TargetReport]


@dataclass(frozen=True)
class Outcome:
    """The target's report (with ``float_fallback``), and the chosen round's artifact (None: the
    first artifact stands)."""

    report: TargetReport
    chosen: tuple[Artifact, Conversion, Path] | None = None


def why_not(ctx: RunContext, backend: Backend, report: TargetReport,
            plan: dict[str, Any] | None) -> str | None:
    """Why the fallback does not run for this failing int8 report (None: it runs)."""
    if not ctx.opts.float_fallback:
        return "--no-float-fallback"
    if plan is not None:
        return ("the source is quantized (keeping a layer in float would mean dequantizing its "
                "weight; not covered)")
    if not backend.keeps_float(ctx.opts.target_options()):
        return f"{backend.name} cannot keep layers in float at these settings"
    ranked = _ranked(report)
    if not ranked:
        q = (report.diagnostics or {}).get("quantization_error") or {}
        return f"no per-layer quantization error ({q.get('unavailable', 'none measured')})"
    return None


def attempt(ctx: RunContext, backend: Backend, report: TargetReport, plan: dict[str, Any] | None,
            convert: Convert, check: Check) -> Outcome:
    """``report`` as it is unless it is an int8 numerics failure; then the fallback's rounds."""
    if report.precision != "int8" or report.numerics is None or report.numerics.passed:
        return Outcome(report)
    reason = why_not(ctx, backend, report, plan)
    if reason is not None:
        return Outcome(replace(report, float_fallback={"applied": False, "reason": reason}))
    q = report.diagnostics["quantization_error"]
    limit = max(1, int(MAX_SHARE * q["weight_layers"]))
    rankings, kept, rounds = [_ranked(report)], (), []
    chosen, last = None, report
    for size in ROUNDS:
        grown = _grow(kept, rankings, min(size, limit))
        if grown == kept:  # nothing more to keep within the bounds
            break
        kept = grown
        ctx.say(f"{backend.name}: int8 float fallback, keeping {len(kept)} layer(s) in float")
        try:
            artifact, conversion, area = convert(kept)
        except StepError as exc:
            rounds.append({"kept": list(kept), "status": "error", "reason": exc.reason})
            break
        last, chosen = check(artifact, conversion), (artifact, conversion, area)
        rounds.append(_round(kept, last))
        if last.numerics is not None and last.numerics.passed:
            break
        rankings.insert(0, _ranked(last))
    final = _final(report, last, q["weight_layers"], rounds, chosen is not None)
    if chosen is not None:  # its conversion as the report says it (with the rounds' steps)
        chosen = (chosen[0], final.conversion, chosen[2])
    return Outcome(final, chosen)


def _ranked(report: TargetReport) -> list[str]:
    q = (report.diagnostics or {}).get("quantization_error") or {}
    return [e["node"] for e in q.get("layers", ())]


def _grow(kept: tuple[str, ...], rankings: list[list[str]], size: int) -> tuple[str, ...]:
    """``kept`` and then the best-ranked layers not yet kept (latest ranking first), to
    ``size``."""
    out = list(kept)
    for node in (n for ranking in rankings for n in ranking):
        if len(out) >= size:
            break
        if node not in out:
            out.append(node)
    return tuple(out)


def _round(kept: tuple[str, ...], report: TargetReport) -> dict[str, Any]:
    worst = (report.numerics.worst if report.numerics else None) or {}
    return {"kept": list(kept), "status": report.status,
            "numerics_passed": bool(report.numerics and report.numerics.passed),
            "worst": {k: worst.get(k) for k in ("output", "max_abs", "cosine") if k in worst}}


def _final(first: TargetReport, last: TargetReport, weight_layers: int,
           rounds: list[dict[str, Any]], converted: bool) -> TargetReport:
    """The report of the artifact the target keeps, with ``float_fallback``."""
    passed = bool(rounds) and rounds[-1].get("numerics_passed", False)
    kept = rounds[-1]["kept"] if rounds else []
    field = {"applied": True, "passed": passed, "kept": kept, "weight_layers": weight_layers,
             "rounds": rounds, "first": _round((), first)["worst"]}
    if not converted:
        return replace(first, float_fallback=field,
                       reason=f"{first.reason}; float fallback: {rounds[-1]['reason']}")
    base = last if passed else replace(
        last, reason=f"{last.reason}; float fallback: still failing with {len(kept)} of "
                     f"{weight_layers} weight layers kept in float: {', '.join(kept)}")
    steps = (*base.conversion.steps, *(f"float fallback round {i + 1}: {len(r['kept'])} kept, "
                                       f"{r['status']}" for i, r in enumerate(rounds)))
    return replace(base, float_fallback=field, conversion=replace(base.conversion, steps=steps))
