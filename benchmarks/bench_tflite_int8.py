"""TFLite int8 of a QDQ source (issue 20): float vs dynamic-range int8 vs full-integer with the
source's own activation scales (backends/tflite_qparams.py), side by side.

A 6-layer, 384-wide BERT (bench_runtimes.make_bert, random weights) is quantized by ORT's
quantize_static QDQ, per-tensor and per-channel (bench_compressed._quantize, calibrated on the
lowering checks' inputs). Each source goes through the tflite backend once per route, called
directly (as the run does after the dequantize lowering), so both int8 artifacts exist even
when the run would keep only the first that passes: the float model at fp32, each QDQ source
dynamic-range (route onnx2tf) and full-integer with its scales (route
onnx2tf-int8-source-scales, as --int8-scheme full asks, 8 generated calibration samples). Then, in one process: each
artifact's error against its source (ONNX Runtime) on 4 inputs, and p50 of every artifact in
LiteRT (XNNPACK, --threads) in interleaved rounds (the order rotates each round), --repeats
times; ratios to tflite fp32 per repeat as median [min-max]. Asserts nothing.

    .venv/bin/python benchmarks/bench_tflite_int8.py [--seq 128] [--repeats 3] [--rounds 8]
        [--iterations 5] [--threads 2] [--work DIR]

The machine may be shared (other jobs running): the 1-minute load average is printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compressed import _quantize  # noqa: E402
from bench_ncnn_int8 import OrtRunner, interleaved  # noqa: E402
from bench_runtimes import make_bert  # noqa: E402

DYNAMIC, SOURCE_SCALES = "onnx2tf", "onnx2tf-int8-source-scales"


def feeds_for(model, seq: int, count: int) -> list[dict]:  # noqa: ANN001
    from mtconvert.backends.lowering import check

    sets = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        f = check.make_feeds(model, {"input_ids": [1, seq], "attention_mask": [1, seq]},
                             check.embedding_sizes(model))[0]
        f["input_ids"] = rng.integers(0, 30522, (1, seq)).astype(np.int64)
        f["attention_mask"][0, seq - 1 - 7 * seed:] = 0  # some padding
        sets.append(f)
    return sets


def convert(src: Path, out: Path, seq: int, precision: str, route: str,
            calib: Path) -> tuple[Path, list[str]]:
    """The tflite backend on ``src`` (a quantized source dequantized first, as the run does)."""
    from mtconvert import quantized
    from mtconvert.backends.base import PreparedSource, TargetOptions, TensorSpec
    from mtconvert.backends.tflite import TfliteBackend

    done = out / "done.json"
    if done.is_file():  # converted by an earlier run in the same --work
        import json

        d = json.loads(done.read_text())
        return Path(d["path"]), d["steps"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "work").mkdir(exist_ok=True)
    shapes = {"input_ids": (1, seq), "attention_mask": (1, seq)}
    prepared = PreparedSource("onnx", src.stem, src, tuple(TensorSpec(n, s, "int64")
                              for n, s in shapes.items()),
                              (TensorSpec("hidden", (1, seq, 384), "float32"),), shapes,
                              out / "work", path=src, quantization=quantized.describe_path(src))
    scheme = {"int8_scheme": "full"} if route == SOURCE_SCALES else {}  # the route's option
    topts = TargetOptions(precision=precision, calibration=calib, route=route, threads=2,
                          timeout_s=3600, extra=scheme)
    plan = quantized.plan_for(prepared, "tflite", ("fp32", "fp16", "int8"), precision)
    prepared, topts = quantized.lowered(prepared, "tflite", topts, plan)
    art = TfliteBackend().convert(prepared, out, topts)
    import json

    done.write_text(json.dumps({"path": str(art.primary), "steps": list(art.steps)}))
    return art.primary, list(art.steps)


class LiteRunner:
    def __init__(self, path: Path, threads: int):
        from ai_edge_litert.interpreter import Interpreter

        self.it = Interpreter(model_path=str(path), num_threads=threads)
        self.it.allocate_tensors()
        self.ins = {d["name"].split(":")[0].removeprefix("serving_default_"): d
                    for d in self.it.get_input_details()}
        self.out = self.it.get_output_details()[0]["index"]

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        for name, d in self.ins.items():
            self.it.set_tensor(d["index"], feeds[name].astype(d["dtype"]))
        self.it.invoke()
        return self.it.get_tensor(self.out).reshape(-1)


def _err(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.abs(a - b).max()), float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None,
                    help="keeps the models, and each artifact already converted there")
    ap.add_argument("--modes", default="qdq,qdq-per-channel")
    args = ap.parse_args()
    import onnx

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-tflite-int8-"))
    float_src = make_bert(work / "bert6.onnx", seq=args.seq)
    model = onnx.load(str(float_src))
    feeds = feeds_for(model, args.seq, 12)
    calib = work / "calib.npz"
    np.savez(calib, **{n: np.stack([f[n] for f in feeds[4:]]) for n in feeds[0]})
    sources = {}
    for mode in args.modes.split(","):
        sources[mode] = work / f"bert6.{mode}.onnx"
        if not sources[mode].is_file():
            _quantize(float_src, sources[mode], mode, feeds[4:])
    arts = {"tflite fp32 (float model)": (float_src, *convert(
        float_src, work / "float", args.seq, "fp32", DYNAMIC, calib))}
    for mode, src in sources.items():
        for label, route in (("dynamic-range int8", DYNAMIC),
                             ("full-integer, source scales", SOURCE_SCALES)):
            arts[f"{label} ({mode})"] = (src, *convert(src, work / f"{mode}.{route}", args.seq,
                                                       "int8", route, calib))
    print(f"\n## 6-layer 384-wide BERT, batch 1, sequence {args.seq}, {args.threads} threads, "
          f"LiteRT {_version('ai-edge-litert')} (XNNPACK)")
    print("| artifact | size | error vs its source on 4 inputs: max abs, min cosine |")
    print("|---|---|---|")
    runners = {}
    for name, (src, path, steps) in arts.items():
        runners[name] = LiteRunner(path, args.threads)
        ref = OrtRunner(src, args.threads)
        errs = [_err(ref([f[n] for n in ref.names]), runners[name](f))
                for f in feeds[:4]]
        print(f"| {name} | {path.stat().st_size / 2**20:.1f} MiB | "
              f"{max(e[0] for e in errs):.3g}, {min(e[1] for e in errs):.5f} |")
        for s in steps:
            if s.startswith(("int8 source scales", "int8 full-integer", "TFLiteConverter")):
                print(f"  {name}: {s[:300]}")
    ort = OrtRunner(float_src, args.threads)
    runners["ORT (float model)"] = lambda f: ort([f[n] for n in ort.names])
    p50s: dict[str, list[float]] = defaultdict(list)
    loads = []
    for _ in range(args.repeats):
        loads.append(os.getloadavg()[0])
        for n, v in interleaved(runners, feeds[0], args.rounds, args.iterations).items():
            p50s[n].append(v)
    base = p50s["tflite fp32 (float model)"]
    print(f"\np50 ms over {args.repeats} repeats ({args.rounds} interleaved rounds x "
          f"{args.iterations} runs each); ratio to tflite fp32 per repeat: median [min-max]; "
          f"1-min load average during the repeats: {', '.join(f'{x:.1f}' for x in loads)} "
          f"({os.cpu_count()} cores)")
    print("| runner | p50 ms per repeat | vs tflite fp32 |")
    print("|---|---|---|")
    for n, v in p50s.items():
        r = [a / b for a, b in zip(v, base, strict=True)]
        print(f"| {n} | {', '.join(f'{x:.1f}' for x in v)} | {statistics.median(r):.2f}x "
              f"[{min(r):.2f}-{max(r):.2f}] |")


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    main()
