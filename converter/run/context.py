"""What every target of one run shares: the data a target's check reads, nothing it writes."""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mtconvert.backends.base import PreparedSource
from mtconvert.cache import ConversionCache
from mtconvert.options import ConvertOptions
from mtconvert.registry import Registry

Progress = Callable[[str], None]


@dataclass
class RunContext:
    registry: Registry
    src: PreparedSource
    feeds: dict[str, np.ndarray]
    ref_out: dict[str, np.ndarray]
    opts: ConvertOptions
    say: Progress
    cache: ConversionCache
    report_name: str | None = None  # validate mode: a name per artifact file
    # dynamic-shape sweep: (feeds, reference outputs) at every extra shape
    sweep: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = field(default_factory=list)
    reference_info: dict[str, Any] | None = None  # {runtime, version}, for golden bundles
    # conversions may overlap; timed validation runs never do, or latency figures would lie
    validate_lock: threading.Lock = field(default_factory=threading.Lock)
    evals: Any = None  # run.accuracy.EvalSet with --eval-data
    # run.timing.SharedReference: the reference's warm child, shared by the targets' timings
    reference: Any = None
    float_model: Any = None  # float_compare.FloatModel with --float-model

    @property
    def target_feeds(self) -> dict[str, np.ndarray]:
        return {s.name: self.feeds[s.name] for s in self.src.inputs}
