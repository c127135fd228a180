"""Latency statistics: warm-up, then N timed runs; percentiles in milliseconds, and the timed
samples themselves (in run order, rounded to 0.1 µs) for plotting their distribution."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    iterations: int
    warmup: int
    samples_ms: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, float | int | tuple[float, ...]]:
        return asdict(self)


def summarize(samples_ms: list[float], warmup: int) -> LatencyStats:
    if not samples_ms:
        raise ValueError("no latency samples")
    a = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = (float(x) for x in np.percentile(a, [50, 90, 99]))
    return LatencyStats(p50_ms=p50, p90_ms=p90, p99_ms=p99, mean_ms=float(a.mean()),
                        iterations=len(samples_ms), warmup=warmup,
                        samples_ms=tuple(round(float(x), 4) for x in samples_ms))


def measure(fn: Callable[[], object], *, warmup: int, iterations: int) -> LatencyStats:
    """Call ``fn`` ``warmup`` times untimed, then ``iterations`` times timed."""
    if iterations < 1 or warmup < 0:
        raise ValueError("iterations must be >= 1 and warmup >= 0")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000.0)
    return summarize(samples, warmup)


NOISY_CI_WIDTH = 0.2  # a 95 % interval wider than ±10 % of the ratio cannot tell a 10 % change


def interleaved(ref_rounds: list[list[float]], tgt_rounds: list[list[float]], *,
                seed: int = 0, resamples: int = 2000) -> dict[str, Any]:
    """Target/reference latency from rounds timed alternately. Each round's ratio of medians
    pairs the two sides under one machine state; the ratio is the median of those ratios and
    its 95 % confidence interval a bootstrap over rounds. ``noisy``: the interval is too wide
    (> NOISY_CI_WIDTH of the ratio) to tell a 10 % change from noise."""
    if not ref_rounds or len(ref_rounds) != len(tgt_rounds):
        raise ValueError("interleaved timing needs as many reference rounds as target rounds")
    r = np.array([np.median(x) for x in ref_rounds])
    t = np.array([np.median(x) for x in tgt_rounds])
    ratios = t / r
    ratio = float(np.median(ratios))
    idx = np.random.default_rng(seed).integers(0, len(ratios), (resamples, len(ratios)))
    lo, hi = (float(v) for v in np.percentile(np.median(ratios[idx], axis=1), [2.5, 97.5]))
    width = (hi - lo) / ratio if ratio > 0 else float("inf")
    return {"ratio_p50": round(ratio, 4), "ci95": [round(lo, 4), round(hi, 4)],
            "rounds": len(ratios), "per_round": len(tgt_rounds[0]),
            "reference_p50_ms": round(float(np.median(np.concatenate(ref_rounds))), 4),
            "target_p50_ms": round(float(np.median(np.concatenate(tgt_rounds))), 4),
            "reference_spread": round(_spread(r), 4), "target_spread": round(_spread(t), 4),
            "noisy": bool(width > NOISY_CI_WIDTH)}


def _spread(round_medians: np.ndarray) -> float:
    """(max - min) / median of the per-round medians: how much one side moved during the run."""
    return float((round_medians.max() - round_medians.min()) / np.median(round_medians))


def stable(history: list[float], tolerance: float = 0.1) -> bool:
    """Two consecutive warm-up rounds within ``tolerance`` of each other."""
    return len(history) >= 2 and abs(history[-1] - history[-2]) <= tolerance * history[-2]
