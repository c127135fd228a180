"""ncnn benchmark (issue 4): the 6-layer, 384-wide BERT of bench_tflite.py (random weights from
transformers.BertConfig), batch 1, sequence 128, 2 threads. Prints, from one mtconvert run,
conversion seconds and the ncnn artifact's p50 next to ONNX Runtime CPU on the same ONNX, for
the exact fp32 mode and the phone fp16 mode.

    .venv/bin/python benchmarks/bench_ncnn.py [--seq 128] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tflite import MTCONVERT, build_bert  # noqa: E402


def run(onnx_path: Path, tmp: Path, precision: str, args: argparse.Namespace) -> dict:
    report = tmp / f"{precision}.json"
    subprocess.run([MTCONVERT, str(onnx_path), "--to", "ncnn", "--precision", precision,
                    "--out", str(tmp / precision), "--input-shape", f"input_ids=1x{args.seq}",
                    "--threads", str(args.threads), "--iterations", str(args.iterations),
                    "--report-json", str(report), "--no-cache", "-q"], capture_output=True)
    return json.loads(report.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=50)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ncnn-"))
    try:
        onnx_path = tmp / "bert6.onnx"
        build_bert(onnx_path, args.seq)
        reports = {p: run(onnx_path, tmp, p, args) for p in ("fp32", "fp16")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"BERT 6 layers x 384, batch 1, sequence {args.seq}, {args.threads} threads")
    for precision, rep in reports.items():
        t = rep["targets"][0]
        ref = rep["reference"]["latency"]["p50_ms"]
        lat = (t.get("latency") or {}).get("p50_ms")
        worst = (t.get("numerics") or {}).get("worst") or {}
        ratio = f"{lat / ref:.2f}x" if lat else "-"
        lat_s = f"{lat:.2f} ms" if lat else "-"
        print(f"  ncnn {precision}: status {t['status']}, convert {t['conversion']['seconds']:.1f} s, "
              f"max abs {worst.get('max_abs', float('nan')):.2e}, p50 {lat_s} vs ONNX Runtime "
              f"{ref:.2f} ms = {ratio}  ({(t.get('numerics') or {}).get('runtime')})")


if __name__ == "__main__":
    main()
