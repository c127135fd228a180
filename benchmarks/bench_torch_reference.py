"""The PyTorch reference at PyTorch's real speed: a .pt2 program's module (inference mode, the
run's threads) timed in fresh processes with OpenMP's wait policy unset (its default) and set to
PASSIVE (what the mtconvert CLI sets), next to ONNX Runtime on the same model. Prints medians
of 20 runs, repeated; asserts nothing.

    .venv/bin/python benchmarks/bench_torch_reference.py [--model fixtures/bert_encoder]
        [--threads 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = r'''
import sys, time, numpy as np
kind, stem, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
import torch
ep = torch.export.load(stem + ".pt2")
args = ep.example_inputs[0]
if kind == "torch":
    torch.set_num_threads(threads)
    m = ep.module()
    def run():
        with torch.inference_mode():
            m(*args)
else:
    import onnx, onnxruntime as ort
    so = ort.SessionOptions(); so.intra_op_num_threads = threads
    s = ort.InferenceSession(stem + ".onnx", so, providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    feeds = {n: a.numpy() for n, a in zip(names, args)}
    def run():
        s.run(None, feeds)
for _ in range(3):
    run()
ts = []
for _ in range(20):
    t0 = time.perf_counter(); run(); ts.append((time.perf_counter() - t0) * 1000)
print(np.median(ts))
'''


def once(kind: str, stem: str, threads: int, policy: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", CHILD, kind, stem, str(threads)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(ROOT / "fixtures" / "bert_encoder"),
                    help="path stem with .pt2 and .onnx beside it")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"{Path(args.model).name}, {args.threads} threads, p50 ms of 20 runs per process")
    rows = [("onnxruntime", "ort", None), ("pytorch, OMP_WAIT_POLICY unset", "torch", None),
            ("pytorch, OMP_WAIT_POLICY=PASSIVE", "torch", "PASSIVE")]
    for label, kind, policy in rows:
        vals = [once(kind, args.model, args.threads, policy) for _ in range(args.repeats)]
        print(f"  {label:<34} " + "  ".join(f"{v:9.3f}" for v in vals))


if __name__ == "__main__":
    main()
