"""Core ML check benchmark (issue 5): what checking a saved .mlpackage off macOS costs, on the
6-layer, 384-wide BERT encoder of bench_coreml.py (random weights, batch 1, sequence 128).
In one run it prints, side by side:

- lint seconds in a fresh process: before (the coremltools path: import coremltools for its
  protobuf classes, as the lint did) and after (``CoremlBackend.lint``: coremltools' protobuf
  files loaded by the protobuf runtime alone), and whether coremltools / torch got imported;
- load seconds in a fresh process (``MilInterpreter.open``: protobuf, weight blob, constants,
  plans), next to what importing coremltools alone costs (the old load paid that first);
- the mil-reference interpreter's seconds per inference (one warm-up, then --runs runs:
  median and spread, wall and CPU) with BLAS on one thread (the session's setting) and with
  BLAS threads as configured, next to ONNX Runtime CPU on the same ONNX and inputs;
- the interpreter's max abs difference from ONNX Runtime;
- ``mtconvert.validate`` wall seconds (reference, worker, lint, one inference, gates).

    .venv/bin/python benchmarks/bench_coreml_check.py [--seq 128] [--runs 5] [--repeat 3]
        [--workdir DIR] [--precisions fp32,fp16]

With --workdir the ONNX model and the converted packages are kept there and reused by later
runs (conversion takes a minute or two per precision). The machine's other load shows in the
wall spread; CPU seconds move less.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tflite import build_bert  # noqa: E402  (same model as the TFLite benchmark)

LINT_BEFORE = """
import json, sys, time
from collections import Counter
from pathlib import Path
t0 = time.perf_counter()
from mtconvert.backends.coreml import ops as kernels
from mtconvert.backends.coreml._ct import coremltools
from mtconvert.backends.coreml.program import model_path
coremltools()
from coremltools.proto import Model_pb2
spec = Model_pb2.Model()
spec.ParseFromString(model_path(Path(sys.argv[1])).read_bytes())
fn = spec.mlProgram.functions["main"]
block = fn.block_specializations[fn.opset or next(iter(fn.block_specializations))]
counts = Counter(op.type for op in block.operations)
kernels.missing(list(counts))
print(json.dumps({"seconds": time.perf_counter() - t0, "ops": sum(counts.values()),
                  "coremltools": "coremltools" in sys.modules, "torch": "torch" in sys.modules}))
"""

LINT_AFTER = """
import json, sys, time
from pathlib import Path
from mtconvert.backends.base import Artifact
from mtconvert.backends.coreml.backend import CoremlBackend
path = Path(sys.argv[1])
t0 = time.perf_counter()
findings = CoremlBackend().lint(Artifact("coreml", path, (path,)))
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "ops": int(findings[0].message.split()[0]),
                  "coremltools": "coremltools" in sys.modules, "torch": "torch" in sys.modules}))
"""

LOAD = """
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
from mtconvert.backends.coreml.interp import MilInterpreter
interp = MilInterpreter.open(Path(sys.argv[1]))
print(json.dumps({"seconds": time.perf_counter() - t0, "ops": interp.operation_count,
                  "coremltools": "coremltools" in sys.modules, "torch": "torch" in sys.modules}))
"""

IMPORT_COREMLTOOLS = """
import json, time
t0 = time.perf_counter()
from mtconvert.backends.coreml._ct import coremltools
coremltools()
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def child(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def repeated(code: str, repeat: int, *args: str) -> tuple[list[float], dict]:
    results = [child(code, *args) for _ in range(repeat)]
    return [r["seconds"] for r in results], results[-1]


def spread(values: list[float], unit: float = 1.0, digits: int = 2) -> str:
    v = [x * unit for x in values]
    return f"{statistics.median(v):.{digits}f} ({min(v):.{digits}f}-{max(v):.{digits}f})"


def prepare(work: Path, seq: int, precisions: list[str]) -> tuple[Path, dict, dict]:
    import numpy as np

    import mtconvert

    onnx_path = work / f"bert6_seq{seq}.onnx"
    if not onnx_path.is_file():
        build_bert(onnx_path, seq)
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 30522, (1, seq)).astype(np.int64),
             "attention_mask": np.ones((1, seq), np.int64)}
    np.savez(work / "inputs.npz", **feeds)
    packages = {}
    for precision in precisions:
        out = work / f"{precision}_seq{seq}"
        found = sorted(out.glob("*.mlpackage"))
        if not found:
            report = mtconvert.convert(onnx_path, targets=["coreml"], out_dir=out,
                                       precision=precision, inputs=work / "inputs.npz",
                                       iterations=1, warmup=0, cache=False)
            t = report.targets["coreml"]
            if t.status not in ("passed", "failed"):
                raise RuntimeError(f"coreml {precision}: {t.status} {t.reason}")
            found = [Path(t.artifacts[0].path)]
        packages[precision] = found[0]
    return onnx_path, feeds, packages


def ort_run(onnx_path: Path, feeds: dict, runs: int) -> tuple[dict, list[float]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, feeds), strict=True))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return out, times


def interpreter_run(package: Path, feeds: dict, runs: int,
                    blas_threads: int | None = 1) -> tuple[dict, list[float], list[float]]:
    from mtconvert.backends.coreml.interp import MilInterpreter

    interp = MilInterpreter.open(package, blas_threads=blas_threads)
    mine = {v.name: feeds[v.name].astype(v.dtype) for v in interp.program.inputs}
    out = interp.run(mine)  # warm-up
    wall, cpu = [], []
    for _ in range(runs):
        t, c = time.perf_counter(), time.process_time()
        interp.run(mine)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return out, wall, cpu


def validate_seconds(onnx_path: Path, package: Path, inputs: Path) -> tuple[float, str]:
    import mtconvert

    t0 = time.perf_counter()
    report = mtconvert.validate(onnx_path, [package], inputs=inputs, iterations=1, warmup=0)
    t = next(iter(report.targets.values()))
    return time.perf_counter() - t0, f"{t.status} ({t.numerics.runtime})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5, help="timed inferences (after a warm-up)")
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per lint/load figure")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep (and reuse) the ONNX model and the packages here")
    ap.add_argument("--precisions", default="fp32")
    args = ap.parse_args()
    import numpy as np

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        onnx_path, feeds, packages = prepare(work, args.seq, precisions)
        ort_out, ort_times = ort_run(onnx_path, feeds, args.runs)
        ct_import, _ = repeated(IMPORT_COREMLTOOLS, 1)
        rows = []
        for precision, package in packages.items():
            before, before_last = repeated(LINT_BEFORE, args.repeat, str(package))
            after, after_last = repeated(LINT_AFTER, args.repeat, str(package))
            assert before_last["ops"] == after_last["ops"]
            load, load_last = repeated(LOAD, args.repeat, str(package))
            out, wall, cpu = interpreter_run(package, feeds, args.runs)
            free, free_wall, free_cpu = interpreter_run(package, feeds, args.runs, None)
            same = all(np.array_equal(out[k], free[k]) for k in out)
            worst = max(float(np.max(np.abs(np.asarray(out[k], np.float64) - ort_out[k])))
                        for k in ort_out if k in out)
            if precision == "fp32":  # validate mode judges any package with the fp32 profile
                val_s, verdict = validate_seconds(onnx_path, package, work / "inputs.npz")
            else:
                val_s, verdict = float("nan"), "not run (validate mode is fp32-only here)"
            rows.append((precision, before, after, after_last, load, load_last, wall, cpu,
                         free_wall, free_cpu, same, worst, val_s, verdict))
    print(f"6-layer BERT (hidden 384), batch 1, seq {args.seq}; {args.runs} timed runs after a "
          f"warm-up, {args.repeat} fresh processes per lint/load figure; median (min-max)")
    print(f"ONNX Runtime CPU (2 threads): {spread(ort_times, 1e3, 1)} ms per inference; "
          f"importing coremltools alone: {ct_import[0]:.2f} s")
    for (precision, before, after, after_last, load, load_last, wall, cpu, free_wall,
         free_cpu, same, worst, val_s, verdict) in rows:
        print(f"\n[{precision}] {after_last['ops']} MIL operations, "
              f"{load_last['ops']} run by the interpreter")
        print(f"  lint s            before (coremltools) {spread(before)}   after {spread(after)}"
              f"   coremltools imported after: {after_last['coremltools']}, torch: "
              f"{after_last['torch']}")
        print(f"  load s            {spread(load)}   coremltools imported: "
              f"{load_last['coremltools']}")
        print(f"  interp s/infer    wall {spread(wall, 1, 3)}   cpu {spread(cpu, 1, 3)}   "
              f"vs ORT {statistics.median(wall) / statistics.median(ort_times):.0f}x   "
              "(BLAS 1 thread, the session's setting)")
        print(f"                    wall {spread(free_wall, 1, 3)}   cpu "
              f"{spread(free_cpu, 1, 3)}   (BLAS threads as configured; outputs "
              f"{'bit-identical' if same else 'DIFFER'})")
        print(f"  max abs vs ORT    {worst:.3g}")
        print(f"  validate wall s   {val_s:.2f}  {verdict}")


if __name__ == "__main__":
    main()
