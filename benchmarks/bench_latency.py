"""Latency a gate can trust: the same artifacts validated N times; each run's target/reference
p50 ratio from separate timings (reference at the start, target later: the old way) next to
the interleaved ratio and its 95 % interval. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/bench_latency.py [--model fixtures/bert_encoder.onnx]
        [--targets onnx-mobile,tflite] [--repeats 10] [--iterations 20]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MTCONVERT = str(Path(sys.executable).parent / "mtconvert")


def spread(values: list[float]) -> str:
    med = statistics.median(values)
    return (f"median {med:.3f}, min {min(values):.3f}, max {max(values):.3f} "
            f"(range {(max(values) - min(values)) / med:.0%} of the median, "
            f"±{max(med - min(values), max(values) - med) / med:.0%})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=ROOT / "fixtures" / "bert_encoder.onnx")
    ap.add_argument("--targets", default="onnx-mobile,tflite")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        subprocess.run([MTCONVERT, str(args.model), "--to", args.targets, "--out", str(out),
                        "-q"], check=False, capture_output=True)
        artifacts = [str(p) for p in sorted(out.iterdir())
                     if p.suffix in (".ort", ".tflite", ".param", ".mlpackage")]
        rows: dict[str, dict[str, list[float]]] = {}
        print(f"{args.model.name}: {len(artifacts)} artifacts, {args.repeats} validate runs, "
              f"{args.iterations} timed runs per side\n")
        print(f"{'run':>3} {'target':<14} {'separate':>9} {'interleaved':>11} {'95% interval':>16}"
              f" {'noisy':>6}")
        for i in range(args.repeats):
            report_path = Path(tmp) / f"r{i}.json"
            subprocess.run([MTCONVERT, "validate", str(args.model), *artifacts, "--report-json",
                            str(report_path), "--iterations", str(args.iterations), "-q"],
                           check=False, capture_output=True)
            report = json.loads(report_path.read_text())
            ref = report["reference"]["latency"]["p50_ms"]
            for t in report["targets"]:
                vs = t.get("latency_vs_reference") or {}
                if not t.get("latency") or "ratio_p50" not in vs:
                    continue
                sep = t["latency"]["p50_ms"] / ref
                row = rows.setdefault(t["name"], {"separate": [], "interleaved": []})
                row["separate"].append(sep)
                row["interleaved"].append(vs["ratio_p50"])
                lo, hi = vs["ci95"]
                print(f"{i + 1:>3} {t['name']:<14} {sep:>8.3f}x {vs['ratio_p50']:>10.3f}x "
                      f"{lo:>7.3f}-{hi:<7.3f} {str(vs['noisy']):>6}")
        print("\nRun-to-run spread of the target/reference ratio:")
        for name, row in rows.items():
            print(f"  {name}\n    separate timings:    {spread(row['separate'])}"
                  f"\n    interleaved timings: {spread(row['interleaved'])}")


if __name__ == "__main__":
    main()
