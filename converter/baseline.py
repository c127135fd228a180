"""Baselines: ``--save-baseline FILE`` keeps what a run measured per target (latency samples and
the interleaved ratio to the reference, size, each output's error metrics); ``--baseline FILE``
fails a later run's target whose latency regressed by more than ``--max-latency-regression``,
whose size grew by more than ``--max-size-growth``, or whose output error worsened beyond its
tolerance. The decisions are validators.gates'.

Latency is compared noise-aware. When the source is the same model as the baseline's, the
target/reference ratio (both timed interleaved, so the machine's state cancels out) is compared
with the baseline's ratio; otherwise the target's own samples with the baseline's, by a
bootstrap interval of the ratio of medians (then a change of machine load between the two runs
is not cancelled, and the report says so). A change whose interval straddles the limit is
``inconclusive``: reported, not failed.
"""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from mtconvert.errors import ModelLoadError
from mtconvert.report import Report, TargetReport
from mtconvert.validators import gates
from mtconvert.version import __version__

FORMAT = 1


def save(report: Report, path: Path) -> None:
    from mtconvert.render import write_atomic

    targets = {t.name: _entry(t) for t in report.targets.values()
               if t.status in ("passed", "failed")}
    write_atomic(Path(path), json.dumps({
        "baseline_format": FORMAT, "mtconvert_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source_sha256": report.source.sha256, "targets": targets}, indent=1))


def _entry(t: TargetReport) -> dict[str, Any]:
    return {"precision": t.precision, "size_bytes": _size(t),
            "latency": {"p50_ms": t.latency.p50_ms, "samples_ms": list(t.latency.samples_ms)}
            if t.latency else None,
            "latency_vs_reference": t.latency_vs_reference,
            "outputs": {k: {m: v.get(m) for m in ("max_abs", "cosine")}
                        for k, v in (t.numerics.outputs if t.numerics else {}).items()}}


def _size(t: TargetReport) -> int:
    return sum(a.bytes for a in t.artifacts)


def load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"baseline {path}: unreadable ({exc})") from None
    if not isinstance(data, dict) or data.get("baseline_format") != FORMAT:
        raise ModelLoadError(f"baseline {path}: not a mtconvert baseline (format "
                             f"{data.get('baseline_format') if isinstance(data, dict) else None!r})")
    return data


def apply(targets: list[TargetReport], base: dict[str, Any], source_sha256: str | None,
          limits: dict[str, float], path: Path) -> list[TargetReport]:
    """Each checked target with its ``baseline`` comparison; one that regressed fails."""
    same_source = bool(source_sha256) and source_sha256 == base.get("source_sha256")
    out = []
    for t in targets:
        before = base["targets"].get(t.name)
        if t.status not in ("passed", "failed"):
            out.append(t)
            continue
        checks = ([{"check": "baseline", "status": "skipped",
                    "message": f"{t.name} is not in the baseline"}] if before is None
                  else _checks(t, before, same_source, limits))
        failed = [c["message"] for c in checks if c["status"] == "failed"]
        reason = "; ".join(filter(None, [t.reason, *(f"baseline: {m}" for m in failed)]))
        out.append(replace(t, status="failed" if failed else t.status, reason=reason or None,
                           baseline={"file": str(path), "same_source": same_source,
                                     "checks": checks}))
    return out


def _checks(t: TargetReport, before: dict[str, Any], same_source: bool,
            limits: dict[str, float]) -> list[dict[str, Any]]:
    return [_latency(t, before, same_source, limits["max_latency_regression"]),
            _size_check(t, before, limits["max_size_growth"]), *_outputs(t, before)]


def _latency(t: TargetReport, before: dict[str, Any], same_source: bool,
             limit: float) -> dict[str, Any]:
    now, then = t.latency_vs_reference or {}, before.get("latency_vs_reference") or {}
    if same_source and "ratio_p50" in now and "ratio_p50" in then:
        change = now["ratio_p50"] / then["ratio_p50"]
        lo, hi = now["ci95"][0] / then["ci95"][1], now["ci95"][1] / then["ci95"][0]
        how = "target/reference ratio, both timed interleaved"
    elif t.latency and t.latency.samples_ms and (before.get("latency") or {}).get("samples_ms"):
        change, lo, hi = gates.median_ratio(list(t.latency.samples_ms),
                                            before["latency"]["samples_ms"])
        how = "p50 against the baseline's (machine load between the runs not cancelled)"
    else:
        return {"check": "latency", "status": "skipped",
                "message": "no latency to compare in this run or the baseline"}
    status = gates.regression(change, lo, hi, limit)
    return {"check": "latency", "status": status, "change": round(change, 4),
            "ci95": [round(lo, 4), round(hi, 4)], "limit": limit, "method": how,
            "message": f"latency {change - 1:+.1%} (95% interval {lo - 1:+.1%} to {hi - 1:+.1%};"
                       f" limit +{limit:.0%}; {how})"}


def _size_check(t: TargetReport, before: dict[str, Any], limit: float) -> dict[str, Any]:
    now, then = _size(t), before.get("size_bytes") or 0
    growth = now / then - 1 if then else 0.0
    return {"check": "size", "status": "failed" if growth > limit else "passed",
            "change": round(growth, 4), "limit": limit,
            "message": f"size {now} bytes vs {then} ({growth:+.1%}; limit +{limit:.0%})"}


def _outputs(t: TargetReport, before: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    for name, m in (t.numerics.outputs if t.numerics else {}).items():
        then = before.get("outputs", {}).get(name)
        if then is None:
            continue
        why = gates.worsened(m, then, m.get("tolerance") or {})
        checks.append({"check": f"numerics {name}", "status": "failed" if why else "passed",
                       "message": f"{name}: {why}" if why else f"{name}: within its tolerance "
                                                                "of the baseline"})
    return checks
