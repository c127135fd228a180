"""ONNX Runtime's profiler: a second InferenceSession on the same model with
``SessionOptions.enable_profiling``, its Chrome-trace JSON read back. Each node's
``<node>_kernel_time`` events (category "Node") are its kernel time; their median over the
runs is the node's figure (a median: one preempted kernel on a busy machine does not make an
operator look slow). The first run (warm-up: allocations, first-touch) is left out: only events
after the first ``model_run`` ends count."""
from __future__ import annotations

import bisect
import json
import statistics
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
    """Median kernel milliseconds per node per run (``dur`` is in µs), the first run left out;
    a node run several times in one inference (loops) counts the sum per run."""
    ends = sorted(e["ts"] + e.get("dur", 0) for e in events
                    if e.get("cat") == "Session" and e.get("name") == "model_run")
    after = ends[0] if len(ends) > runs else -1
    runs_of: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    kind: dict[str, str] = {}
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") != "Node" or not name.endswith(KERNEL_SUFFIX) or e["ts"] < after:
            continue
        node = name[:-len(KERNEL_SUFFIX)]
        run = bisect.bisect_right(ends, e["ts"])  # which model_run it belongs to
        runs_of[node][run] += float(e.get("dur", 0)) / 1000.0
        kind[node] = (e.get("args") or {}).get("op_name", "?")
    return [OpTime(n, kind[n], statistics.median(per.values())) for n, per in runs_of.items()]
