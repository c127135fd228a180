"""onnx-mobile on quantized sources (issue 20): does the `.ort` of an int8 model run ONNX
Runtime's integer kernels, and is it faster than the float model's `.ort`?

A 6-layer, 384-wide BERT encoder (bench_runtimes.make_bert: transformers config, random
weights, seed 0) is quantized by onnxruntime three ways (bench_compressed._quantize: static QDQ
per-tensor and per-channel, int8 activations and weights, calibrated on generated inputs; and
quantize_dynamic). Each is made into an `.ort`:

- ``before``: what onnx-mobile shipped before the uint8 re-encoding (onnxsim, then
  convert_onnx_models_to_ort, Fixed, target_platform arm): a QDQ source's MatMuls fuse into
  int8 x int8 QLinearMatMul, which MLAS runs with its generic kernel on x86;
- ``after``: the onnx-mobile backend's own convert() (its activations re-encoded as uint8 when
  bit-exact, backends/onnx_tools.qdq_uint8: uint8 x int8 QLinearMatMul, MLAS's VNNI kernel);

beside the float model's `.ort` (the backend's convert()) and each source `.onnx` in plain
ONNX Runtime (ORT_ENABLE_ALL, this machine's own fusions).

Timing: every session is opened as the backend opens it (OrtSession: --threads intra-op
threads, CPU EP, nothing else set) and warmed up; then --rounds rounds, each running every
session --iterations times in turn (interleaved); a session's per-round figure is its median.
Printed: p50 (median of the rounds) and the ratio to the float `.ort` in the same round
(median, min-max over rounds). The machine is shared: read the spreads.

Also printed, from ONNX Runtime's profiler on each artifact: how many matrix products run as
integer kernels (QLinearMatMul, MatMulInteger(ToFloat), DynamicQuantizeMatMul) and as float
MatMul/FusedMatMul, and the float operators' share of the time, largest first.

    .venv/bin/python benchmarks/bench_ort_int8.py [--seq 128] [--threads 2] [--rounds 7]
        [--iterations 10] [--work DIR]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compressed import _quantize  # noqa: E402
from bench_runtimes import make_bert, spread  # noqa: E402

INTEGER_OPS = {"QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "QGemm"}
FLOAT_MATMULS = {"MatMul", "FusedMatMul", "Gemm"}
CONVERSION_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def backend_ort(src: Path, out: Path, work: Path) -> Path:
    """The onnx-mobile backend's own conversion of ``src`` (fp32: the graph as it is)."""
    import onnx

    from mtconvert.backends.base import PreparedSource, TargetOptions
    from mtconvert.backends.onnx_mobile import OnnxMobileBackend

    name = src.stem
    model = onnx.load(str(src), load_external_data=False)
    prepared = PreparedSource(format="onnx", name=name, onnx_path=src, inputs=(), outputs=(),
                              input_shapes={i.name: (1, 128) for i in model.graph.input},
                              work_dir=work / name, path=src)
    out.mkdir(parents=True, exist_ok=True)
    art = OnnxMobileBackend().convert(prepared, out, TargetOptions())
    print(f"  {name} after: " + "; ".join(s.split(" [")[0][:110] for s in art.steps[1:]))
    return art.primary


def before_ort(src: Path, out: Path) -> Path:
    """onnxsim, then the ORT-format tool with the backend's flags: no uint8 re-encoding."""
    from mtconvert.backends.onnx_mobile import TARGET_PLATFORM
    from mtconvert.backends.onnx_tools import simplify
    from mtconvert.backends.process import python_cmd

    out.mkdir(parents=True, exist_ok=True)
    sim = out / f"{src.stem}.onnx"
    simplify(str(src), str(sim))
    subprocess.run(python_cmd("-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(sim),
                              "--output_dir", str(out), "--optimization_style", "Fixed",
                              "--target_platform", TARGET_PLATFORM),
                   check=True, capture_output=True)
    return out / f"{src.stem}.ort"


def kernels(path: Path, threads: int, feeds: dict) -> str:
    from mtconvert.backends.profiling import ort as ort_profiling

    times = ort_profiling.profile(path, threads, feeds, runs=5)
    count = Counter(t.op_type for t in times)
    total = sum(t.ms for t in times) or 1.0
    by_op: Counter = Counter()
    for t in times:
        if t.op_type not in INTEGER_OPS and t.op_type not in CONVERSION_OPS:
            by_op[t.op_type] += t.ms
    integer = sum(count[o] for o in INTEGER_OPS)
    floats = sum(count[o] for o in FLOAT_MATMULS)
    conv = sum(t.ms for t in times if t.op_type in CONVERSION_OPS)
    top = ", ".join(f"{op} {ms / total:.0%}" for op, ms in by_op.most_common(5))
    return (f"integer matmuls {integer}, float matmuls {floats}; (de)quantize "
            f"{conv / total:.0%}; float ops: {top}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--work", type=Path,
                    default=Path(tempfile.gettempdir()) / "mtconvert-bench-ort-int8")
    args = ap.parse_args()

    import time

    import numpy as np
    import onnx

    from mtconvert.backends.lowering import check
    from mtconvert.backends.onnx_mobile import OrtSession

    work = args.work
    src = make_bert(work / "bert6.onnx", seq=args.seq)
    model = onnx.load(str(src))
    shapes = {i.name: [1, args.seq] for i in model.graph.input}
    calib = check.make_feeds(model, shapes, check.embedding_sizes(model), seed=7)
    sources = {"float": src}
    for mode in ("qdq-per-tensor", "qdq-per-channel", "dynamic"):
        dst = work / f"bert6_{mode.replace('-', '_')}.onnx"
        if not dst.is_file():
            _quantize(src, dst, mode, calib)
        sources[mode] = dst

    print("converting (the backend's convert(), and the previous recipe for 'before')")
    files: dict[str, Path] = {}
    for kind, path in sources.items():
        files[f"{kind} .ort"] = backend_ort(path, work / "after" / kind, work / "tmp")
        if kind != "float":
            files[f"{kind} .ort before"] = before_ort(path, work / "before" / kind)
        files[f"{kind} .onnx (plain ORT)"] = path

    rng = np.random.default_rng(0)
    vocab = check.embedding_sizes(model)
    feeds = {"input_ids": rng.integers(0, min(vocab.values()), (1, args.seq)).astype(np.int64),
             "attention_mask": np.ones((1, args.seq), np.int64)}
    sessions = {k: OrtSession(p, args.threads) for k, p in files.items()}
    for s in sessions.values():
        for _ in range(3):
            s.run(feeds)
    per_round: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(args.rounds):
        for k, s in sessions.items():
            ts = []
            for _ in range(args.iterations):
                t0 = time.perf_counter()
                s.run(feeds)
                ts.append((time.perf_counter() - t0) * 1e3)
            per_round[k].append(statistics.median(ts))
    base = per_round["float .ort"]
    print(f"\nBERT 6 layers x 384, batch 1, sequence {args.seq}, {args.threads} threads, "
          f"{args.rounds} interleaved rounds x {args.iterations} runs (shared machine)")
    print("| artifact | MB | p50 ms | vs float .ort p50 (same round; median, min-max) |")
    print("|---|---|---|---|")
    for k, v in per_round.items():
        ratios = [a / b for a, b in zip(v, base, strict=True)]
        mb = files[k].stat().st_size / 1e6
        print(f"| {k} | {mb:.1f} | {statistics.median(v):.1f} | {spread(ratios)} |")
    print("\nONNX Runtime's profiler, per artifact (5 runs):")
    for k, p in files.items():
        print(f"- {k}: {kernels(p, args.threads, feeds)}")


if __name__ == "__main__":
    main()
