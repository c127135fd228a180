"""Cache and parallel-targets benchmark (issue 7), on fixture (a) to every available target.
Prints, from one run on this machine:

- cold (empty cache) vs warm (cache filled by the cold run) wall time, and warm as % of cold;
- every target in one run (--jobs = cores, no cache) vs the targets run one by one (no cache).

    .venv/bin/python benchmarks/bench_reliability.py [--model fixtures/bert_encoder.onnx]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MTCONVERT = str(Path(sys.executable).parent / "mtconvert")


def timed(args: list[str], cache: Path, out: Path) -> tuple[float, dict]:
    report = out / "report.json"
    env = {**os.environ, "MTCONVERT_CACHE_DIR": str(cache)}
    t0 = time.perf_counter()
    proc = subprocess.run([MTCONVERT, *args, "--out", str(out), "--report-json", str(report),
                           "-q"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if not report.exists():
        raise SystemExit(f"mtconvert failed ({proc.returncode}): {proc.stderr.strip()}")
    return wall, json.loads(report.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=ROOT / "fixtures" / "bert_encoder.onnx")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        cold, rep = timed([str(args.model)], t / "cache", t / "cold")
        names = [x["name"] for x in rep["targets"]]
        warm, rep_w = timed([str(args.model)], t / "cache", t / "warm")
        together, _ = timed([str(args.model), "--no-cache"], t / "c2", t / "all")
        apart = sum(timed([str(args.model), "--to", n, "--no-cache"], t / "c3", t / n)[0]
                    for n in names)
    cached = [x["name"] for x in rep_w["targets"] if x["conversion"] and x["conversion"]["cached"]]
    statuses = {x["name"]: x["status"] for x in rep_w["targets"]}
    print(f"{args.model.name} to {', '.join(names)} ({os.cpu_count()} cores)")
    print(f"  cold (empty cache)                 {cold:7.1f} s")
    print(f"  warm (conversions from the cache)  {warm:7.1f} s   = {100 * warm / cold:.0f}% of "
          f"cold; reused: {', '.join(cached)}; statuses {statuses}")
    print(f"  all targets in one run (--jobs {rep['settings']['jobs']})  {together:7.1f} s")
    print(f"  targets one by one (sum)           {apart:7.1f} s   = {together / apart:.2f}x "
          "of one by one")


if __name__ == "__main__":
    main()
