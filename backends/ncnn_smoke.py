"""Smoke-run an ncnn artifact in a child process: ``python -m mtconvert.backends.ncnn_smoke
ARTIFACT.json``. Loads it, feeds zeros (ones for masks) and extracts every output; exit 0 only
when all outputs come back with the expected sizes. ncnn can segfault: the parent reads the
exit code."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from mtconvert.backends.base import Artifact
from mtconvert.backends.ncnn import NcnnSession


def main(job: Path) -> None:
    spec = json.loads(job.read_text())
    artifact = Artifact.from_dict(spec["artifact"])
    with NcnnSession(artifact, threads=1) as session:
        feeds = {name: (np.ones if "mask" in name.lower() else np.zeros)(shape, dtype=dtype)
                 for name, (shape, dtype) in spec["inputs"].items()}
        outputs = session.run(feeds)
    for name, value in outputs.items():
        if not np.all(np.isfinite(value)):
            sys.exit(f"output {name} is not finite on a smoke input")
    print("MTCONVERT-SMOKE ok")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
