"""--profile: where an artifact's inference time goes, from its runtime's own profiler
(Session.profile, run in the worker), summed up for the report: the top operators and the
top operator types by mean time per inference, each with its share of the profiled total."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from mtconvert.errors import StepError
from mtconvert.worker import run_profile

TOP = 10  # operators and operator types listed


def measure(name: str, backend: str, artifact: dict[str, Any], feeds: dict[str, np.ndarray],
            threads: int, runs: int, timeout_s: float | None) -> dict[str, Any]:
    """The report's ``profile`` entry for one artifact: a summary, or {"unavailable": why},
    or {"error": why} when the profiled run failed."""
    try:
        found = run_profile(name=name, backend=backend, artifact=artifact, feeds=feeds,
                            threads=threads, runs=runs, timeout_s=timeout_s)
    except StepError as exc:
        return {"error": exc.reason}
    if "ops" not in found:
        return {"unavailable": found.get("unavailable") or "no profile"}
    return summarize(found["ops"], runs) | {"runtime": found.get("runtime", name)}


def summarize(ops: list[tuple[str, str, float]], runs: int, top: int = TOP) -> dict[str, Any]:
    """{runs, total_ms, ops: [{name, op_type, ms, share}], op_types: [{op_type, ms, share,
    count}]}, each list the ``top`` largest by ms; share is of total_ms (the operators' sum)."""
    total = float(sum(ms for _, _, ms in ops))
    by_type: dict[str, list[float]] = defaultdict(list)
    for _, kind, ms in ops:
        by_type[kind].append(ms)

    def share(ms: float) -> float:
        return round(ms / total, 4) if total > 0 else 0.0

    largest = sorted(ops, key=lambda o: -o[2])[:top]
    types = sorted(by_type.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {"runs": runs, "total_ms": round(total, 4), "operators": len(ops),
            "ops": [{"name": n, "op_type": k, "ms": round(ms, 4), "share": share(ms)}
                    for n, k, ms in largest],
            "op_types": [{"op_type": k, "ms": round(sum(v), 4), "share": share(sum(v)),
                          "count": len(v)} for k, v in types]}
