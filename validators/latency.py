"""Latency statistics: warm-up, then N timed runs; percentiles in milliseconds, and the timed
samples themselves (in run order, rounded to 0.1 µs) for plotting their distribution."""
from __future__ import annotations

import time
from collections.abc import Callable
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
