"""ncnn per-layer timing. The Python wheel is built without NCNN_BENCHMARK (ncnn's own
per-layer timer), so each layer is timed through the extractor: with light mode off, an
extractor keeps every blob it computed, so extracting the layers' output blobs one after the
other in .param order (a topological order) runs exactly one new layer per extract. The time of
that extract is the layer's time, plus ncnn's unpacking of its output blob to a plain Mat (a
copy, small beside the layer). One batch item, as ncnn runs them."""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from mtconvert.backends.base import OpTime

# (type, name, tops) per layer, in .param order
Layers = list[tuple[str, str, list[str]]]


def profile(new_extractor: Callable[[], Any], layers: Layers, runs: int) -> list[OpTime]:
    """``new_extractor()``: an extractor with the inputs set. The first run is a warm-up; a
    layer's figure is its median over the runs (robust to a preempted run)."""
    times: dict[str, list[float]] = defaultdict(list)
    for run in range(runs + 1):
        ex = new_extractor()
        ex.set_light_mode(False)
        for kind, name, tops in layers:
            if kind == "Input" or not tops:
                continue
            t0 = time.perf_counter()
            ex.extract(tops[0])  # its other tops come with it
            if run:
                times[name].append((time.perf_counter() - t0) * 1000.0)
    kinds = {name: kind for kind, name, _ in layers}
    return [OpTime(n, kinds[n], statistics.median(ms)) for n, ms in times.items()]
