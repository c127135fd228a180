"""The ceiling of ncnn fp32 on a BERT-class encoder: its matrix products alone against ONNX
Runtime's (issue 19: ncnn p50 <= 1.5x ONNX Runtime on a 6-layer, 384-wide BERT, batch 1,
sequence 128, 2 threads).

The encoder's dense layers are [128, 384] x [384, 384] (Q, K, V, attention output),
[128, 384] x [384, 1536] (FFN in) and [128, 1536] x [1536, 384] (FFN out), with a bias. Each
runs here alone, three ways, on the same random weights:
  ort      ONNX Runtime MatMul + Add on [1, 128, K] (the exported BERT's own nodes; MLAS)
  gemm     ncnn Gemm with constant B and C, as pnnx writes it (2=0 3=1 5=1 6=1 7=M 8=N 9=K
           10=4)
  ip       ncnn InnerProduct on the 2-D [128, K] blob (the same weights, [out, in])
at 1 and 2 threads, in one process, in interleaved rounds (ort, gemm, ip, ort, ...; each
round the median of --runs calls): one thread in CPU time (time.thread_time: both runtimes
compute in the calling thread; other processes change it far less than wall time), two
threads in wall time. Each ncnn kernel's time is divided by ONNX
Runtime's of the same round. If ncnn's best kernel is above 1.5x MLAS on these shapes (about
75 % of ncnn's encoder time is in them), no graph rewrite reaches the goal. The outputs are
checked against numpy before timing. Also prints which x86 ISA the wheel's layers dispatch to
(the wheel's build and this CPU's flags) and the load. Asserts nothing.

    .venv/bin/python benchmarks/bench_ncnn_ceiling.py [--repeats 15] [--runs 10]
"""
from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtimes import spread  # noqa: E402

SHAPES = [(128, 384, 384), (128, 384, 1536), (128, 1536, 384)]  # M, K, N


def ncnn_net(work: Path, name: str, layer: str, m: int, k: int, w: np.ndarray,
             b: np.ndarray, threads: int) -> Any:
    """A two-layer .param (Input [m, k] -> ``layer``) and its .bin, loaded at ``threads``."""
    import ncnn

    n = w.shape[0]
    flag = struct.pack("<I", 0)  # ncnn's "raw fp32 follows" tag of a type-0 weight
    if layer == "gemm":
        line = (f"Gemm g 1 1 in0 out0 2=0 3=1 4=0 5=1 6=1 7={m} 8={n} 9={k} 10=4")
        blob = flag + w.tobytes() + flag + b.tobytes()  # B [n, k], C [n] both type 0
    else:
        line = f"InnerProduct g 1 1 in0 out0 0={n} 1=1 2={n * k}"
        blob = flag + w.tobytes() + b.tobytes()  # weight type 0, bias raw
    param = work / f"{name}.param"
    param.write_text(f"7767517\n2 2\nInput in0 0 1 in0 0={k} 1={m}\n{line}\n")
    param.with_suffix(".bin").write_bytes(blob)
    net = ncnn.Net()
    net.opt.num_threads = threads
    net.opt.use_fp16_storage = net.opt.use_fp16_arithmetic = False
    net.opt.use_fp16_packed = net.opt.use_bf16_storage = False
    assert net.load_param(str(param)) == 0 and net.load_model(str(param.with_suffix(".bin"))) == 0
    return net


def ncnn_call(net: Any, x: np.ndarray) -> Callable[[], np.ndarray]:
    import ncnn

    def run() -> np.ndarray:
        ex = net.create_extractor()
        ex.input("in0", ncnn.Mat(x).clone())
        return np.array(ex.extract("out0")[1].numpy())
    return run


def ort_call(m: int, w: np.ndarray, b: np.ndarray, x: np.ndarray,
             threads: int) -> Callable[[], np.ndarray]:
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    n, k = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wt"], ["y0"]), helper.make_node("Add", ["y0", "b"],
                                                                             ["y"])],
        "dense", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, m, k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, m, n])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "wt"),
         numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    feeds = {"x": x[None]}
    return lambda: sess.run(None, feeds)[0][0]


def isa_line() -> str:
    """What the wheel can run here: its per-ISA layer builds and this CPU's flags."""
    import ncnn

    lib = Path(ncnn.__file__).parent / next(p.name for p in Path(ncnn.__file__).parent.iterdir()
                                             if p.suffix == ".so")
    data = lib.read_bytes()
    builds = [isa for isa in ("avx512", "fma", "avx", "xop", "avx512vnni", "avx512bf16",
                              "avx512fp16", "avxvnni")
              if f"Gemm_x86_{isa}E".encode() in data]
    flags = set(Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n")[0].split())
    cpu = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                       "amx_tile") if f in flags]
    return (f"ncnn {ncnn.__version__}: Gemm built for x86 {', '.join(builds) or 'base only'}; "
            f"this CPU: {', '.join(cpu)}")


def measure(shape: tuple[int, int, int], threads: int, repeats: int, runs: int,
            work: Path) -> dict[str, list[float]]:
    m, k, n = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    want = x @ w.T + b
    sides = {"ort": ort_call(m, w, b, x, threads),
             **{kind: ncnn_call(ncnn_net(work, f"{kind}{m}x{k}x{n}t{threads}", kind, m, k, w, b,
                                         threads), x) for kind in ("gemm", "ip")}}
    for name, f in sides.items():
        err = float(np.abs(f().reshape(want.shape) - want).max())
        if err > 1e-3:
            raise SystemExit(f"{name} {shape}: wrong output (max abs {err:.3g})")
        f()
    rounds: dict[str, list[float]] = {k: [] for k in sides}
    import time

    clock = time.thread_time if threads == 1 else time.perf_counter
    for _ in range(repeats):
        for name, f in sides.items():
            ms = []
            for _ in range(runs):
                t0 = clock()
                f()
                ms.append((clock() - t0) * 1000.0)
            rounds[name].append(statistics.median(ms))
    return rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    print(isa_line())
    print(f"{os.cpu_count()} cores; load before the runs {os.getloadavg()[0]:.1f} (other "
          "processes share the machine: wall times under load favour whichever side needs "
          "fewer cores)")
    best: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for threads in map(int, args.threads.split(",")):
            what = "CPU ms (thread_time)" if threads == 1 else "wall ms"
            print(f"\n{threads} thread(s): {what} per call (median of {args.repeats} "
                  f"interleaved rounds of {args.runs}); ncnn / ORT per round")
            for shape in SHAPES:
                r = measure(shape, threads, args.repeats, args.runs, Path(tmp))
                m, k, n = shape
                cells = [f"ort {statistics.median(r['ort']):6.3f}"]
                for kind in ("gemm", "ip"):
                    ratio = [a / o for a, o in zip(r[kind], r["ort"], strict=True)]
                    cells.append(f"{kind} {statistics.median(r[kind]):6.3f} ({spread(ratio)})")
                weights = {(128, 384, 384): 4, (128, 384, 1536): 1, (128, 1536, 384): 1}[shape]
                best.setdefault(threads, []).extend(
                    [min(statistics.median(r["gemm"]), statistics.median(r["ip"])) * weights,
                     statistics.median(r["ort"]) * weights])
                print(f"  [{m},{k}]x[{k},{n}]  " + "   ".join(cells))
            ncnn_ms = sum(best[threads][0::2])
            ort_ms = sum(best[threads][1::2])
            print(f"  one encoder layer's dense products (4 of 384x384, 1536-in, 1536-out), "
                  f"ncnn's faster kernel per shape: {ncnn_ms:.2f} ms vs ORT {ort_ms:.2f} ms "
                  f"= {ncnn_ms / ort_ms:.2f}x; load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
