"""Foundation benchmark: CLI start-up time, and one full onnx-mobile run on fixture (a) with the
time split by stage. Prints figures side by side; asserts nothing.

    .venv/bin/python benchmarks/bench_foundation.py [--runs 10] [--model fixtures/bert_encoder.onnx]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MTCONVERT = str(Path(sys.executable).parent / "mtconvert")


def wall(cmd: list[str], runs: int) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def startup(runs: int) -> None:
    print(f"CLI start-up ({runs} runs each)                   median s   min s")
    for label, cmd in [("python -c pass (interpreter alone)", [sys.executable, "-c", "pass"]),
                       ("mtconvert --help", [MTCONVERT, "--help"]),
                       ("mtconvert convert --help (+ backend options)",
                        [MTCONVERT, "convert", "--help"]),
                       ("mtconvert backends", [MTCONVERT, "backends"])]:
        med, low = wall(cmd, runs)
        print(f"  {label:<46} {med:8.3f} {low:7.3f}")


def full_run(model: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        t0 = time.perf_counter()
        proc = subprocess.run([MTCONVERT, str(model), "--to", "onnx-mobile", "--out", tmp,
                               "--report-json", str(report_path), "-q"], capture_output=True,
                              text=True)
        total = time.perf_counter() - t0
        if not report_path.exists():
            print(proc.stderr)
            raise SystemExit(f"run failed with exit code {proc.returncode}")
        report = json.loads(report_path.read_text())
    t = report["targets"][0]
    print(f"\nFull run: mtconvert {model.name} --to onnx-mobile  (exit {proc.returncode}, "
          f"status {t['status']})")
    rows = [("load source + make inputs", report["timings"]["load_source_s"]),
            ("reference (ORT CPU, run + latency)", report["timings"]["reference_s"]),
            ("onnx-mobile convert", t["timings"]["convert_s"]),
            ("onnx-mobile lint (EP partitioning)", t["timings"]["lint_s"]),
            ("onnx-mobile validate (child: load, run, latency)", t["timings"]["validate_s"])]
    accounted = sum(s for _, s in rows)
    for label, secs in rows:
        print(f"  {label:<50} {secs:7.2f} s")
    print(f"  {'process start, imports, rendering (rest)':<50} {total - accounted:7.2f} s")
    print(f"  {'total wall':<50} {total:7.2f} s")
    print("  conversion steps:")
    for step in t["conversion"]["steps"]:
        print(f"    {step}")
    ref, lat = report["reference"]["latency"], t["latency"]
    print(f"  latency p50: reference {ref['p50_ms']:.3f} ms, .ort {lat['p50_ms']:.3f} ms "
          f"({lat['p50_ms'] / ref['p50_ms']:.2f}x), {lat['threads']} threads, "
          f"{lat['iterations']} runs; peak RSS {t['memory']['peak_rss_mb']:.0f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--model", type=Path, default=ROOT / "fixtures" / "bert_encoder.onnx")
    args = ap.parse_args()
    startup(args.runs)
    full_run(args.model)


if __name__ == "__main__":
    main()
