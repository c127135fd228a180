"""ONNX Runtime's profiler: a second InferenceSession on the same model with
``SessionOptions.enable_profiling``, its Chrome-trace JSON read back. Each node's
``<node>_kernel_time`` events (category "Node") are its kernel time; their mean per run is
the node's figure. The first run (warm-up: allocations, first-touch) is left out: only events
after the first ``model_run`` ends count."""
from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from mtconvert.backends.base import OpTime

KERNEL_SUFFIX = "_kernel_time"


def profile(model: Path, threads: int, feeds: dict[str, Any], runs: int) -> list[OpTime]:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="mtconvert-ortprof-") as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(model), sess_options=so,
                                    providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    return aggregate(events, runs)


def aggregate(events: list[dict[str, Any]], runs: int) -> list[OpTime]:
    """Mean kernel milliseconds per node per run (``dur`` is in µs), the first run left out."""
    starts = sorted(e["ts"] + e.get("dur", 0) for e in events
                    if e.get("cat") == "Session" and e.get("name") == "model_run")
    after = starts[0] if len(starts) > runs else -1
    total: dict[str, float] = defaultdict(float)
    kind: dict[str, str] = {}
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") != "Node" or not name.endswith(KERNEL_SUFFIX) or e["ts"] < after:
            continue
        node = name[:-len(KERNEL_SUFFIX)]
        total[node] += float(e.get("dur", 0)) / 1000.0
        kind[node] = (e.get("args") or {}).get("op_name", "?")
    return [OpTime(n, kind[n], ms / max(runs, 1)) for n, ms in total.items()]
