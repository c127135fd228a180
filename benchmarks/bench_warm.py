"""Warm re-run against cold: the same four-target run twice with one conversion cache (issue
19: warm <= 10 % of cold, same numerics), then the load of a .pt2 source with and without the
source cache (the .pt2 -> ONNX export kept by file hash). Each run is a fresh `mtconvert`
process, timed from outside (wall clock). Prints figures; asserts nothing.

    .venv/bin/python benchmarks/bench_warm.py [--model fixtures/bert_encoder.onnx]
        [--targets tflite,coreml,ncnn,onnx-mobile] [--warm 3] [--pt2 fixtures/bert_encoder.pt2]
        [--only run|pt2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MTCONVERT = str(Path(sys.executable).parent / "mtconvert")

LOAD = """
import sys, tempfile, time
from pathlib import Path
t0 = time.perf_counter()
from mtconvert import source
from mtconvert.cache import SourceCache, default_root
cache = SourceCache(default_root()) if sys.argv[2] == "cache" else None
source.load(sys.argv[1], Path(tempfile.mkdtemp()), cache=cache)
print(time.perf_counter() - t0)
"""


def run(model: Path, targets: str, out: Path, env: dict[str, str]) -> tuple[float, dict]:
    report = out / "report.json"
    t0 = time.perf_counter()
    proc = subprocess.run([MTCONVERT, str(model), "--to", targets, "--out", str(out),
                           "--report-json", str(report), "-q"], env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    data = json.loads(report.read_text()) if report.is_file() else {}
    data["exit"] = proc.returncode
    return wall, data


def stages(report: dict) -> str:
    shared = report.get("timings", {})
    parts = [f"load {shared.get('load_source_s', 0):.2f}",
             f"ref {shared.get('reference_s', 0):.2f}"]
    for t in report.get("targets", []):
        tm = t.get("timings", {})
        parts.append(f"{t['name']} conv {tm.get('convert_s', 0):.2f}"
                     f"+check {tm.get('lint_s', 0) + tm.get('validate_s', 0):.2f}")
    return ", ".join(parts)


def numerics(report: dict) -> dict:
    return {t["name"]: (t["status"], (t.get("numerics") or {}).get("outputs"))
            for t in report.get("targets", [])}


def four_targets(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-warm-") as tmp:
        env = {**os.environ, "MTCONVERT_CACHE_DIR": str(Path(tmp) / "cache")}
        cold, first = run(args.model, args.targets, Path(tmp) / "cold", env)
        print(f"{args.model.name} -> {args.targets}")
        print(f"  cold   {cold:7.2f} s  exit {first['exit']}  [{stages(first)}]")
        warm = []
        for i in range(args.warm):
            wall, rep = run(args.model, args.targets, Path(tmp) / f"warm{i}", env)
            warm.append(wall)
            cached = all((t.get("conversion") or {}).get("cached") for t in rep.get("targets", []))
            same = numerics(rep) == numerics(first)
            print(f"  warm {i} {wall:7.2f} s  exit {rep['exit']}  {wall / cold:6.1%} of cold  "
                  f"all cached: {cached}  numerics identical: {same}  [{stages(rep)}]")
        med = statistics.median(warm)
        print(f"  warm/cold: median {med / cold:.1%} (warm median {med:.2f} s, min "
              f"{min(warm):.2f}, max {max(warm):.2f}; cold {cold:.2f} s)  goal <= 10 %\n")


def pt2_load(args: argparse.Namespace) -> None:
    print(f"{args.pt2.name}: source load (fresh process each: torch import, torch.export.load, "
          "ONNX export or its cached copy)")
    with tempfile.TemporaryDirectory(prefix="bench-pt2-") as tmp:
        env = {**os.environ, "MTCONVERT_CACHE_DIR": str(Path(tmp) / "cache")}

        def load(mode: str) -> float:
            out = subprocess.run([sys.executable, "-c", LOAD, str(args.pt2), mode], env=env,
                                 capture_output=True, text=True, check=True)
            return float(out.stdout.strip().splitlines()[-1])

        first = load("cache")  # fills the cache
        rows = [(load("nocache"), load("cache")) for _ in range(args.warm)]  # interleaved
        print(f"  cache filled by a first load: {first:.2f} s")
        for i, (before, after) in enumerate(rows):
            print(f"  round {i}: export every time {before:6.2f} s   export cached {after:6.2f} s")
        b, a = (statistics.median(r[k] for r in rows) for k in (0, 1))
        print(f"  median: {b:.2f} s -> {a:.2f} s ({a / b:.0%})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=ROOT / "fixtures" / "bert_encoder.onnx")
    ap.add_argument("--targets", default="tflite,coreml,ncnn,onnx-mobile")
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--pt2", type=Path, default=ROOT / "fixtures" / "bert_encoder.pt2")
    ap.add_argument("--only", choices=("run", "pt2"), help="one of the two measurements")
    args = ap.parse_args()
    if args.only != "pt2":
        four_targets(args)
    if args.only != "run":
        pt2_load(args)


if __name__ == "__main__":
    main()
