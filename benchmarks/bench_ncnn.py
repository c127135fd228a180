"""ncnn fp32 latency against ONNX Runtime, before and after mtconvert's ncnn speed rewrites
(issue 19: ncnn p50 <= 1.5x ONNX Runtime on BERT-class encoders).

The encoder is bench_runtimes.py's 6-layer, 384-wide BERT (transformers BertConfig, random
weights, seed 0), batch 1, sequence 128. mtconvert converts it once (the rewrites on; pnnx's
intermediate files kept), and pnnx's own .param of the same prepared graph is the "before".
Each repeat is one ``mtconvert validate`` of both .params: the project's interleaved timing
(reference and target in alternating rounds, each warm in its own child), so both ratios of a
repeat share the machine's state; the order of the two alternates between repeats. Prints
each repeat's ratios, their median and spread, and the machine's load (other processes on the
machine slow the runtimes unevenly: quote the load with the figures). First, a load-robust
table: single-thread CPU time per inference (ORT and both .params in one process, interleaved
rounds), the work each side does; then, with --threads above 1, how that work splits over the
threads (per-thread CPU time: the busiest thread bounds what an idle machine could give), and
in-process wall time at that thread count with ONNX Runtime's idle spinning on and off.
``--also NAME=PARAM`` adds other .params of the same model (e.g. an earlier mtconvert's
conversion) to every table. Asserts nothing.

The ncnn wheel runs its layers on libgomp, whose threads spin at every barrier by default: on
a busy 2-core machine a descheduled peer makes each of several hundred barriers per inference
wait a time slice (seen: 2-thread ncnn 300-7000 ms per inference at load 9, 60 ms with
OMP_WAIT_POLICY=PASSIVE). Run this script with and without that variable to see its effect
on your machine; the header prints what is set.

    .venv/bin/python benchmarks/bench_ncnn.py [--repeats 5] [--threads 2] [--work DIR]
                                              [--also NAME=PARAM ...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtimes import MTCONVERT, make_bert, spread  # noqa: E402

SHAPE = ["--input-shape", "input_ids=1x128", "--input-shape", "attention_mask=1x128"]


def build(work: Path, threads: int) -> tuple[Path, dict[str, Path], list[str]]:
    """(model, {"before": pnnx's .param, "after": mtconvert's}, mtconvert's steps)."""
    from mtconvert.backends.ncnn import pnnx_binary

    model = make_bert(work / "bert6.onnx")
    out = work / "out"
    after = out / "bert6.ncnn.param"
    if not after.is_file():
        subprocess.run([MTCONVERT, str(model), "--to", "ncnn", "--out", str(out), *SHAPE,
                        "--threads", str(threads), "--keep-intermediate", "--no-cache",
                        "--report-json", str(work / "convert.json"), "-q"], check=False,
                       capture_output=True)
    steps = json.loads((work / "convert.json").read_text())["targets"][0]["conversion"]["steps"]
    before_dir = work / "before"
    before = before_dir / "bert6.ncnn.param"
    if not before.is_file():
        before_dir.mkdir(exist_ok=True)
        shutil.copy(out / "bert6.ncnn-intermediate" / "model.onnx", before_dir)
        subprocess.run([str(pnnx_binary()), "model.onnx", "inputshape=[1,128]i64,[1,128]f32",
                        "fp16=0"], cwd=before_dir, capture_output=True, check=True)
        (before_dir / "model.ncnn.param").rename(before)
        (before_dir / "model.ncnn.bin").rename(before.with_suffix(".bin"))
        _declare_shapes(before)
    return model, {"before": before, "after": after}, steps


def _copy_param(param: Path, folder: Path) -> Path:
    """``param`` and its .bin copied to ``folder`` under the folder's name: ``mtconvert
    validate`` keeps one target per artifact file name (two bert6.ncnn.param share one row of
    its report, depending on their order)."""
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / f"{folder.name}.ncnn.param"
    shutil.copy(param, dst)
    shutil.copy(param.with_suffix(".bin"), dst.with_suffix(".bin"))
    return dst


def _declare_shapes(param: Path) -> None:
    from mtconvert.backends.ncnn import declare_input_shapes

    declare_input_shapes(param, [[1, 128], [1, 128]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-validate", action="store_true",
                    help="only the in-process tables, not the mtconvert validate repeats")
    ap.add_argument("--work", type=Path,
                    default=Path(tempfile.gettempdir()) / "mtconvert-bench-ncnn")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=PARAM",
                    help="another .param of the same model to time alongside (e.g. one "
                         "converted by an earlier mtconvert: the step-by-step gain)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model, params, steps = build(args.work, args.threads)
    params |= dict(a.split("=", 1) for a in args.also)
    params = {name: Path(p) if name == "after" else _copy_param(Path(p), args.work / "also" / name)
              for name, p in params.items()}
    print(f"{model.name}: 6 layers x 384, batch 1, sequence 128, {args.threads} threads; "
          f"load before the runs {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '(unset)')} (the ncnn wheel's "
          "libgomp reads them; the validate children inherit them)")
    speed = [s for s in steps if s.startswith(("sdpa", "innerproduct"))]
    print("  mtconvert's speed steps: " + ("; ".join(speed) or "none"))
    for name, p in params.items():
        print(f"  {name:<8} {p}  layers: {_layer_summary(p)}")
    cpu_table(model, params, args.repeats * 2)
    if args.threads > 1:
        thread_split(model, params, args.threads)
        for spinning in ("1", "0"):
            cpu_table(model, params, args.repeats * 2, threads=args.threads, spinning=spinning)
    if not args.no_validate:
        validate_table(model, params, args)


def validate_table(model: Path, params: dict[str, Path], args: argparse.Namespace) -> None:
    """``mtconvert validate`` of both .params, repeated: the project's interleaved ratios."""
    ratios: dict[str, list[float]] = {k: [] for k in params}
    print(f"\n{'run':>3} " + " ".join(f"{k:>22}" for k in params) +
          "   reference p50   load (1 min)")
    for i in range(args.repeats):
        order = list(params) if i % 2 == 0 else list(reversed(params))
        path = args.work / f"validate{i}.json"
        subprocess.run([MTCONVERT, "validate", str(model), *(str(params[k]) for k in order),
                        *SHAPE, "--threads", str(args.threads), "--iterations",
                        str(args.iterations), "--report-json", str(path), "-q"],
                       capture_output=True)
        report = json.loads(path.read_text())
        cells = {}
        for t in report["targets"]:
            which = next(k for k, p in params.items()
                         if any(a["path"] == str(p) for a in t.get("artifacts", [])))
            vs = t.get("latency_vs_reference") or {}
            if "ratio_p50" in vs:
                ratios[which].append(vs["ratio_p50"])
                lo, hi = vs["ci95"]
                cells[which] = f"{vs['ratio_p50']:.2f}x [{lo:.2f}-{hi:.2f}]" + (
                    "?" if vs["noisy"] else " ")
            else:
                cells[which] = f"{t['status']}"
        ref = report["reference"]["latency"]["p50_ms"]
        print(f"{i:>3} " + " ".join(f"{cells.get(k, '-'):>22}" for k in params) +
              f"   {ref:8.2f} ms      {os.getloadavg()[0]:.1f}")
    print(f"\nncnn p50 / ONNX Runtime p50 ([95% interval], ? = too noisy to tell 10 %); "
          f"{os.cpu_count()} cores; load = 1-minute load average after each run")
    for name, values in ratios.items():
        print(f"  {name:<8} {spread(values) if values else 'not measured'}")
    if ratios["before"] and ratios["after"]:
        gain = [b / a for b, a in zip(ratios["before"], ratios["after"], strict=False)]
        verdict = "meets" if statistics.median(ratios["after"]) <= 1.5 else "misses"
        print(f"  before/after per repeat: {', '.join(f'{g:.2f}' for g in gain)}; goal after "
              f"<= 1.5x: {verdict} at load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
              "(a verdict only on an otherwise idle machine: under load, 2-thread ONNX Runtime "
              "slows far more than ncnn)")


def cpu_table(model: Path, params: dict[str, Path], repeats: int, runs: int = 5,
              threads: int = 1, spinning: str = "1") -> None:
    """Per-inference time in one process, ONNX Runtime and each .param in turn, interleaved,
    ``repeats`` rounds of ``runs`` inferences (a round's figure is its median). One thread:
    CPU time (time.thread_time: the work done, which other processes on the machine change
    far less than wall time). More threads: wall time, with ONNX Runtime's idle-thread
    spinning as ``spinning`` (its threads spinning after a run take a core from the ncnn run
    that follows on a 2-core machine)."""
    import time

    import ncnn
    import numpy as np
    import onnxruntime as ort

    ids = np.random.default_rng(0).integers(0, 30522, 128)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    clock = time.thread_time if threads == 1 else time.perf_counter
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids[None].astype(np.int64),
             "attention_mask": np.ones((1, 128), np.int64)}
    nets = {}
    for name, p in params.items():
        net = ncnn.Net()
        net.opt.num_threads = threads
        net.opt.use_fp16_storage = net.opt.use_fp16_arithmetic = False
        net.opt.use_fp16_packed = net.opt.use_bf16_storage = False
        net.load_param(str(p))
        net.load_model(str(p.with_suffix(".bin")))
        nets[name] = net

    def ncnn_run(net: object) -> None:
        ex = net.create_extractor()
        ex.input("in0", ncnn.Mat(ids.astype(np.int32)).clone())
        ex.input("in1", ncnn.Mat(np.ones(128, np.float32)).clone())
        ex.extract("out0")

    sides = {"ort": lambda: sess.run(None, feeds),
             **{k: (lambda n: lambda: ncnn_run(n))(n) for k, n in nets.items()}}
    rounds: dict[str, list[float]] = {k: [] for k in sides}
    for f in sides.values():
        f()  # warm-up
    for _ in range(repeats):
        for k, f in sides.items():
            ms = []
            for _ in range(runs):
                t0 = clock()
                f()
                ms.append((clock() - t0) * 1000.0)
            rounds[k].append(statistics.median(ms))
    what = ("single-thread CPU ms (thread_time)" if threads == 1 else
            f"{threads}-thread wall ms, ONNX Runtime allow_spinning={spinning}")
    print(f"\n{what} per inference, one process; {repeats} interleaved rounds of {runs}; load "
          f"{os.getloadavg()[0]:.1f}")
    for k, v in rounds.items():
        ratio = [a / b for a, b in zip(v, rounds["ort"], strict=True)]
        print(f"  {k:<8} median {statistics.median(v):6.2f} ms (min {min(v):.2f}, max "
              f"{max(v):.2f})" + ("" if k == "ort" else f"  / ORT: {spread(ratio)}"))


def _thread_cpu_ms() -> dict[str, float]:
    """CPU ms (user + system) so far of each thread of this process (/proc, Linux)."""
    tick = 1000.0 / os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        out[tid] = (int(fields[11]) + int(fields[12])) * tick
    return out


def thread_split(model: Path, params: dict[str, Path], threads: int, runs: int = 40) -> None:
    """How each side's work splits over its threads: per-thread CPU ms per inference over
    ``runs`` inferences (ONNX Runtime without idle spinning; ncnn's libgomp spin-waits count
    as work unless OMP_WAIT_POLICY=PASSIVE). The busiest thread's share bounds the wall time
    an idle machine could give; unlike wall time, other processes barely change it."""
    import ncnn
    import numpy as np
    import onnxruntime as ort

    ids = np.random.default_rng(0).integers(0, 30522, 128)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids[None].astype(np.int64),
             "attention_mask": np.ones((1, 128), np.int64)}
    sides = {"ort": lambda: sess.run(None, feeds)}
    for name, p in params.items():
        net = ncnn.Net()
        net.opt.num_threads = threads
        net.opt.use_fp16_storage = net.opt.use_fp16_arithmetic = False
        net.opt.use_fp16_packed = net.opt.use_bf16_storage = False
        net.load_param(str(p))
        net.load_model(str(p.with_suffix(".bin")))

        def run(net: object = net) -> None:
            ex = net.create_extractor()
            ex.input("in0", ncnn.Mat(ids.astype(np.int32)).clone())
            ex.input("in1", ncnn.Mat(np.ones(128, np.float32)).clone())
            ex.extract("out0")
        sides[name] = run
    print(f"\n{threads}-thread work split: CPU ms per inference of each busy thread, {runs} "
          f"inferences; load {os.getloadavg()[0]:.1f}")
    for name, f in sides.items():
        f()
        before = _thread_cpu_ms()
        for _ in range(runs):
            f()
        after = _thread_cpu_ms()
        busy = sorted((after[t] - before.get(t, 0.0)) / runs for t in after)[::-1]
        busy = [b for b in busy if b > 0.05]
        print(f"  {name:<8} total {sum(busy):6.2f} ms: " + ", ".join(f"{b:.2f}" for b in busy))


def _layer_summary(param: Path) -> str:
    from mtconvert.backends.ncnn import param_layer_types

    types = param_layer_types(param)
    return ", ".join(f"{t}x{types.count(t)}" for t in sorted(set(types), key=types.count,
                                                              reverse=True)[:8])


if __name__ == "__main__":
    main()
