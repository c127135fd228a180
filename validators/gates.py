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


def median_ratio(current: list[float], before: list[float], *, seed: int = 0,
                 resamples: int = 2000) -> tuple[float, float, float]:
    """median(current) / median(before) and its 95 % bootstrap interval (two independent sets
    of latency samples, e.g. this run's and a baseline's)."""
    a, b = np.asarray(current, np.float64), np.asarray(before, np.float64)
    rng = np.random.default_rng(seed)
    boot = (np.median(rng.choice(a, (resamples, a.size)), axis=1)
            / np.median(rng.choice(b, (resamples, b.size)), axis=1))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(np.median(a) / np.median(b)), float(lo), float(hi)


def regression(change: float, lo: float, hi: float, limit: float) -> str:
    """A latency change judged against ``limit`` (0.10: 10 % slower) with its interval:
    ``failed`` when even the interval's low end is past the limit, ``passed`` when its high end
    is within it, ``inconclusive`` when the noise straddles the limit."""
    if lo > 1 + limit:
        return "failed"
    if hi <= 1 + limit:
        return "passed"
    return "inconclusive"


def worsened(current: dict[str, Any], before: dict[str, Any],
             tolerance: dict[str, Any]) -> str | None:
    """Why an output's error grew beyond its tolerance since the baseline (None: it did not):
    max abs by more than atol, cosine down by more than 1 - min_cosine."""
    why = []
    atol, min_cos = tolerance.get("atol"), tolerance.get("min_cosine")
    now, then = current.get("max_abs"), before.get("max_abs")
    if atol is not None and now is not None and then is not None and now > then + atol:
        why.append(f"max abs {now:.3g} vs {then:.3g} (> +atol {atol:g})")
    now, then = current.get("cosine"), before.get("cosine")
    if min_cos is not None and now is not None and then is not None \
            and now < then - (1 - min_cos):
        why.append(f"cosine {now:.6f} vs {then:.6f} (> -{1 - min_cos:.2g})")
    return "; ".join(why) or None


def accuracy_reason(result: dict[str, Any]) -> str:
    """``accuracy: 0.812 vs the reference's 0.850 (-3.8 points > 0.5)`` for a failed gate."""
    if "error" in result:
        return f"accuracy: not measured ({result['error']})"
    return (f"accuracy: {result['metric']} {result['target']:.4g} vs the reference's "
            f"{result['reference']:.4g} (-{result['drop_points']:.2f} points > "
            f"{result['max_drop_points']:g})")
