"""Pass/fail decisions and their reasons, as pure functions of measured values (no I/O, no
converter or backend types): the converter asks, these answer."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtconvert.validators import compare


@dataclass(frozen=True)
class Judgement:
    """Every output compared: the verdict, the worst output and each output's metrics."""

    passed: bool
    worst: dict[str, Any] | None  # {output, max_abs, cosine}
    outputs: dict[str, dict[str, Any]]  # name -> metrics, verdict and the tolerance used


def judge(ref_out: dict[str, np.ndarray], out: dict[str, np.ndarray],
          tolerance: Callable[[str], compare.Tolerance]) -> Judgement:
    """Each reference output against the target's (a missing one fails)."""
    results = [compare.compare_output(n, r, out.get(n), tolerance(n)) for n, r in ref_out.items()]
    w = compare.worst(results)
    worst = None if w is None else {"output": w.name, "max_abs": w.metrics.get("max_abs"),
                                    "cosine": w.metrics.get("cosine")}
    return Judgement(all(r.passed for r in results), worst,
                     {r.name: r.to_dict() for r in results})


def numerics_reason(outputs: dict[str, dict[str, Any]]) -> str:
    """``numerics: logits: max abs ... > ...; ...`` for the outputs that failed."""
    bad = [f"{k}: {v['reason']}" for k, v in outputs.items() if not v["passed"]]
    return "numerics: " + "; ".join(bad)


def change(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> dict[str, Any]:
    """Metrics of ``after`` against ``before`` for the outputs both have at one shape (what a
    reduced precision changes against its fp32 twin)."""
    return {k: compare.metrics(before[k], after[k]) for k in before
            if k in after and after[k].shape == before[k].shape}


def nonfinite(outputs: dict[str, np.ndarray]) -> bool:
    """Does any floating-point output hold NaN or Inf?"""
    return not all(np.isfinite(v).all() for v in outputs.values() if v.dtype.kind == "f")


def verdict(reasons: list[str]) -> tuple[str, str | None]:
    """A checked artifact's status from the reasons it failed (none: passed)."""
    return ("failed", "; ".join(reasons)) if reasons else ("passed", None)
