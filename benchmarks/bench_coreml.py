"""Core ML benchmark (issue 5): the 6-layer, 384-wide BERT encoder of the TFLite benchmark
(transformers.BertConfig, random weights, batch 1, sequence 128). In one run it prints:

- mtconvert's coreml conversion seconds from ONNX (onnx2torch route) and from the PyTorch
  module (torch.export route), per compute precision;
- the mil-reference interpreter's seconds per inference on the saved .mlpackage (median of
  several runs, after one warm-up), next to ONNX Runtime CPU on the same ONNX and inputs.

    .venv/bin/python benchmarks/bench_coreml.py [--seq 128] [--runs 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tflite import build_bert  # noqa: E402  (same model as the TFLite benchmark)


def interpreter_seconds(package: Path, feeds: dict, runs: int) -> tuple[float, float]:
    from mtconvert.backends.coreml.interp import MilInterpreter

    t0 = time.perf_counter()
    interp = MilInterpreter.open(package)
    load_s = time.perf_counter() - t0
    interp.run(feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        interp.run(feeds)
        times.append(time.perf_counter() - t)
    return load_s, statistics.median(times)


def ort_seconds(onnx_path: Path, feeds: dict, runs: int) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    import numpy as np

    import mtconvert

    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        onnx_path = tmp_p / "bert6.onnx"
        build_bert(onnx_path, args.seq)
        rng = np.random.default_rng(0)
        feeds = {"input_ids": rng.integers(0, 30522, (1, args.seq)).astype(np.int64),
                 "attention_mask": np.ones((1, args.seq), np.int64)}
        np.savez(tmp_p / "inputs.npz", **feeds)
        ort_s = ort_seconds(onnx_path, feeds, args.runs)
        rows = []
        for precision in ("fp32", "fp16"):
            out = tmp_p / precision
            t0 = time.perf_counter()
            report = mtconvert.convert(onnx_path, targets=["coreml"], out_dir=out,
                                       precision=precision, inputs=tmp_p / "inputs.npz",
                                       iterations=1, warmup=0, cache=False)
            wall = time.perf_counter() - t0
            t = report.targets["coreml"]
            package = Path(t.artifacts[0].path)
            load_s, run_s = interpreter_seconds(package, feeds, args.runs)
            rows.append((precision, t.status, t.conversion.seconds, wall,
                         t.numerics.worst["max_abs"], load_s, run_s))
    print(f"6-layer BERT (hidden 384), batch 1, seq {args.seq}; ONNX Runtime CPU p50 "
          f"{ort_s * 1e3:.1f} ms (2 threads)")
    print(f"{'precision':>9} {'status':>7} {'convert s':>9} {'run wall s':>10} "
          f"{'max abs':>9} {'interp load s':>13} {'interp s/inference':>18} {'vs ORT':>7}")
    for precision, status, conv, wall, worst, load_s, run_s in rows:
        print(f"{precision:>9} {status:>7} {conv:>9.1f} {wall:>10.1f} {worst:>9.2e} "
              f"{load_s:>13.2f} {run_s:>18.3f} {run_s / ort_s:>6.1f}x")


if __name__ == "__main__":
    main()
