"""TFLite against ONNX Runtime and onnx2tf's own artifact (issue 19, "TFLite ahead"): a 6-layer,
384-wide BERT (transformers BertConfig, random weights, seed 0; bench_runtimes.make_bert) at
batch 1, sequence 128, 2 threads. In one run it prints:

- the operator counts of each .tflite (GELU, the Erf emulation's ABS/NEG/EXP, the LayerNorm
  ops MEAN/SQUARED_DIFFERENCE/RSQRT, TRANSPOSE, Flex): mtconvert's artifact now, "before" (the
  same route with the GELU fusion switched off: what mtconvert wrote before it), and onnx2tf at
  its defaults (``onnx2tf -i COPY.onnx -o OUT``, converter/raw.py). When onnx2tf's default
  artifact holds Flex ops (no interpreter here runs them) that is said, and what a user runs
  instead is timed: the same command with ``-rtpo Erf`` (onnx2tf's own advice);
- which ops LiteRT's XNNPACK delegate leaves out, and how many partitions it makes;
- each .tflite's max abs difference from ONNX Runtime, then p50 ratios by pairs: each artifact
  against ONNX Runtime (same ONNX, same input, same threads) and mtconvert's artifact against
  the others, every pair timed by the project's interleaved timing (converter/run/timing.py:
  both sides warm in their own child, ABBA rounds, more rounds while unclear), the pairs in a
  rotating order, repeated --repeats times; the ratios' median and spread.

- where the time goes (``--sections where``): ONNX Runtime's profiler on the ONNX and LiteRT's
  (its C API, backends/profiling/tflite.py) on mtconvert's .tflite, alternating, repeated: each
  side's matrix multiplies (ORT MatMul/FusedMatMul, XNNPACK Fully Connected / Batch Matrix
  Multiply), the rest, and the builtin kernels LiteRT runs outside XNNPACK;
- one projection alone (``--sections gemm``): y = x·W + b at the BERT's three shapes as ONNX
  (MatMul + Add) and as .tflite (TensorFlow's converter: one FULLY_CONNECTED), same weights,
  timed interleaved in warm children: XNNPACK's fp32 GEMM against ONNX Runtime's.

The machine is shared (2 cores, other jobs running): the load average is printed with each
repeat. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/bench_tflite.py [--repeats 5] [--work DIR [--reuse]]
        [--sections ratios,where,gemm] [--profile-runs 10]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtimes import make_bert, spread  # noqa: E402

MTCONVERT = str(Path(sys.executable).parent / "mtconvert")
SHAPE = ["--input-shape", "input_ids=1x128", "--input-shape", "attention_mask=1x128"]
COLUMNS = {"GELU": ("GELU",), "Erf emulation (ABS/NEG/EXP)": ("ABS", "NEG", "EXP"),
           "LayerNorm (MEAN/SQ_DIFF/RSQRT)": ("MEAN", "SQUARED_DIFFERENCE", "RSQRT"),
           "TRANSPOSE": ("TRANSPOSE",), "all ops": None}
# mtconvert's tflite child with tflite_routes.fuse_gelu switched off: the route as it was
BEFORE = """
import sys
from mtconvert.backends import tflite_routes
tflite_routes.fuse_gelu = lambda model: 0
from mtconvert.backends.process import child_main
from mtconvert.backends.tflite_convert import convert
child_main(convert)
"""


def convert_mtconvert(model: Path, work: Path, threads: int) -> tuple[Path, dict]:
    """``mtconvert MODEL --to tflite`` with an empty cache: the artifact and its report entry."""
    env = {**os.environ, "MTCONVERT_CACHE_DIR": str(work / "cache")}
    report = work / "convert.json"
    subprocess.run([MTCONVERT, str(model), "--to", "tflite", "--out", str(work / "mt"), *SHAPE,
                    "--threads", str(threads), "--iterations", "5", "--report-json",
                    str(report), "-q"], env=env, capture_output=True, text=True)
    return work / "mt" / f"{model.stem}.tflite", json.loads(report.read_text())["targets"][0]


def convert_before(model: Path, work: Path) -> tuple[Path, Path]:
    """mtconvert's tflite route with the GELU fusion switched off (Erf emulated by onnx2tf's
    pseudo operator), from the same fixed-shape graph mtconvert's convert starts from."""
    from mtconvert.backends.onnx_tools import fix_shapes
    from mtconvert.backends.tflite import PSEUDO_OPS

    fixed, out = work / "fixed" / f"{model.stem}.onnx", work / "before" / f"{model.stem}.tflite"
    fixed.parent.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    fix_shapes(str(model), str(fixed), {"input_ids": [1, 128], "attention_mask": [1, 128]})
    job = {"onnx": str(fixed), "out": str(out), "precision": "fp32", "fp32_twin": None,
           "int8_scheme": "dynamic", "keep_layout_inputs": [], "route": "onnx2tf",
           "pseudo_map": PSEUDO_OPS, "calibration": None,
           "input_order": ["input_ids", "attention_mask"], "per_tensor_weights": False}
    (work / "before.job.json").write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, "-c", BEFORE, str(work / "before.job.json")],
                          capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if proc.returncode or not out.is_file():
        raise SystemExit(f"the 'before' conversion failed: {proc.stderr.strip()[-400:]}")
    return out, fixed


def convert_raw(model: Path, fixed: Path, work: Path) -> tuple[Path, Path | None, str]:
    """onnx2tf at its defaults on a copy of the model (converter/raw.py); if it fails on the
    dynamic axes, on the fixed-shape graph ``fixed``; when its artifact needs Flex, the same
    command with ``-rtpo Erf``. Returns (default artifact, artifact to time or None, what was
    run)."""
    from mtconvert import raw
    from mtconvert.backends.process import run_tool
    from mtconvert.backends.tflite import tflite_ops
    from mtconvert.errors import MtConvertError

    typed: list[str] = []
    try:
        default = raw.onnx2tf(model, work / "raw", 1800, None, typed.append)
    except MtConvertError as exc:
        note = f"on the dynamic-axes model it failed ({str(exc)[:120]}); on the fixed-shape graph: "
        try:
            model = fixed
            default = raw.onnx2tf(fixed, work / "raw-fixed", 1800, None, typed.append)
            typed[-1] = note + typed[-1]
        except MtConvertError as exc2:
            raise SystemExit(f"onnx2tf at its defaults failed: {exc}; {exc2}") from exc2
    if not [op for op in tflite_ops(default) if op.startswith("FLEX:")]:
        return default, default, typed[-1]
    out = work / "raw-rtpo"
    copy = raw._copy_model(model, out)
    cmd = [raw._bin("onnx2tf"), "-i", str(copy), "-o", str(out), "-rtpo", "Erf"]
    try:
        run_tool(cmd, target="tflite", step="onnx2tf", log_path=out / "raw.log", timeout_s=1800,
                 cwd=out)
    except MtConvertError as exc:
        return default, None, f"{typed[-1]}; with -rtpo Erf it failed: {exc}"
    return default, out / f"{copy.stem}_float32.tflite", (f"{typed[-1]}; then, its artifact "
                                                         "needing Flex, the same with -rtpo Erf")


def op_row(path: Path) -> list[str]:
    from mtconvert.backends.tflite import tflite_ops

    ops = tflite_ops(path)
    cells = [str(sum(ops.values()) if names is None else sum(ops[n] for n in names))
             for names in COLUMNS.values()]
    flex = sorted(op for op in ops if ":" in op)
    return cells + [", ".join(flex) or "none"]


def off_xnnpack(path: Path) -> str:
    """The ops LiteRT's default XNNPACK delegate leaves to the builtin kernels, and how many
    partitions it made: walking back from the delegate nodes' inputs and the graph outputs to
    the ops that produce them outside any partition."""
    import warnings
    from collections import Counter

    from ai_edge_litert.interpreter import Interpreter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interp = Interpreter(model_path=str(path), num_threads=1)
    try:
        interp.allocate_tensors()
    except RuntimeError as exc:  # Flex ops: no interpreter here
        return f"does not load ({str(exc).splitlines()[0][:60]})"
    ops = interp._get_ops_details()
    parts = [o for o in ops if o["op_name"] == "DELEGATE"]
    producer = {t: o for o in ops if o["op_name"] != "DELEGATE" for t in o["outputs"]}
    from_parts = {t for o in parts for t in o["outputs"]}
    need = [t for o in parts for t in o["inputs"]] + [d["index"]
                                                       for d in interp.get_output_details()]
    plain: dict[int, str] = {}
    seen: set[int] = set()
    while need:
        t = need.pop()
        if t in seen or t < 0 or t in from_parts or t not in producer:
            continue
        seen.add(t)
        op = producer[t]
        if op["index"] not in plain:
            plain[op["index"]] = op["op_name"]
            need += list(op["inputs"])
    counts = ", ".join(f"{k}x{v}" for k, v in sorted(Counter(plain.values()).items()))
    return f"{len(parts)} partitions; outside: {counts or 'none'}"


def open_sessions(stack: contextlib.ExitStack, model: Path, arts: dict[str, Path],
                  threads: int) -> dict[str, Any]:
    """Each side warm in its own child (the project's WarmSession, as validation times them):
    ONNX Runtime on the ONNX, LiteRT (XNNPACK) on each .tflite; one seeded input."""
    import numpy as np

    from mtconvert.backends.base import Artifact
    from mtconvert.backends.tflite import map_io
    from mtconvert.worker import WarmSession

    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 30522, (1, 128)).astype(np.int64),
             "attention_mask": np.ones((1, 128), np.int64)}
    ref = Artifact(target="reference", primary=model, files=(model,))
    sides = {"ONNX Runtime": stack.enter_context(WarmSession(
        name="reference", backend="mtconvert.reference:OrtReference", artifact=ref.to_dict(),
        feeds=feeds, threads=threads, timeout_s=900))}
    for name, path in arts.items():
        io_map, _ = map_io(path, list(feeds), ["hidden"], {"hidden": [1, 128, 384]})
        art = Artifact(target="tflite", primary=path, files=(path,),
                       meta=io_map | {"allow_flex": False})
        sides[name] = stack.enter_context(WarmSession(
            name="tflite", backend="mtconvert.backends.tflite:TfliteBackend",
            artifact=art.to_dict(), feeds=feeds, threads=threads, timeout_s=900))
    return sides


def max_abs(sides: dict[str, Any]) -> dict[str, float]:
    """Each .tflite's largest absolute difference from ONNX Runtime on the seeded input."""
    import numpy as np

    ref = sides["ONNX Runtime"].result().outputs["hidden"]
    return {n: float(np.abs(s.result().outputs["hidden"] - ref).max())
            for n, s in sides.items() if n != "ONNX Runtime"}


def pair(a: Any, b: Any, args: argparse.Namespace) -> dict[str, Any]:
    """a/b latency from the project's interleaved timing (converter/run/timing.interleave:
    warm-up until stable, alternating ABBA rounds, more rounds while unclear)."""
    from mtconvert.run.timing import interleave
    from mtconvert.validators import latency

    opts = SimpleNamespace(iterations=args.iterations, warmup=2)
    b_rounds, a_rounds, _ = interleave(b.time, a.time, opts)
    return latency.interleaved(b_rounds, a_rounds)


GEMM_TYPES = ("MatMul", "Gemm", "Fully Connected", "Batch Matrix Multiply")


def profiled(model: Path, tflite: Path, threads: int, runs: int,
             litert_first: bool) -> dict[str, dict[str, float]]:
    """One profile of each side on the seeded input (ONNX Runtime's profiler on the ONNX,
    LiteRT's through its C API on the .tflite), each in ms per inference: its matrix
    multiplies (ORT MatMul/FusedMatMul/Gemm, XNNPACK Fully Connected/Batch Matrix Multiply),
    the rest, and (LiteRT) the builtin kernels XNNPACK leaves out."""
    import numpy as np

    from mtconvert.backends.profiling import ort as ort_profiling
    from mtconvert.backends.profiling import tflite as tflite_profiling
    from mtconvert.backends.tflite import _io

    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 30522, (1, 128)).astype(np.int64),
             "attention_mask": np.ones((1, 128), np.int64)}
    by_index = {t["index"]: t["name"] for t in _io(tflite)[0]}
    tfl_feeds = {i: feeds[next(n for n in feeds if n in name)] for i, name in by_index.items()}
    sides = {"ONNX Runtime": lambda: ort_profiling.profile(model, threads, feeds, runs),
             "LiteRT": lambda: tflite_profiling.profile(tflite, threads, tfl_feeds, runs)}
    out = {}
    for side in (["LiteRT", "ONNX Runtime"] if litert_first else ["ONNX Runtime", "LiteRT"]):
        ops = sides[side]()
        gemm = sum(o.ms for o in ops if any(k in o.op_type for k in GEMM_TYPES))
        total = sum(o.ms for o in ops)
        out[side] = {"gemm": gemm, "rest": total - gemm, "total": total,
                     "builtin": sum(o.ms for o in ops if "(builtin kernel)" in o.name),
                     "types": _by_type(ops)}
    return out


def _by_type(ops: list[Any]) -> dict[str, float]:
    found: dict[str, float] = {}
    for o in ops:
        found[o.op_type] = found.get(o.op_type, 0.0) + o.ms
    return found


def where_the_time_goes(model: Path, tflite: Path, args: argparse.Namespace) -> None:
    """Both profilers, one side after the other in this process (each profile's session is
    closed before the next starts), the order swapped each repeat."""
    print(f"\nwhere the time goes: each runtime's own profiler, median of {args.profile_runs} "
          f"runs per profile, {args.threads} threads, the two sides alternating")
    rows = []
    for i in range(args.repeats):
        rows.append(profiled(model, tflite, args.threads, args.profile_runs, i % 2 == 0))
        o, t = rows[-1]["ONNX Runtime"], rows[-1]["LiteRT"]
        print(f"  {i}: matrix multiplies LiteRT {t['gemm']:.2f} ms vs ORT {o['gemm']:.2f} ms "
              f"({t['gemm'] / o['gemm']:.2f}x); the rest {t['rest']:.2f} vs {o['rest']:.2f} ms "
              f"({t['rest'] / o['rest']:.2f}x; LiteRT's builtin kernels, outside XNNPACK: "
              f"{t['builtin']:.2f} ms); total {t['total']:.2f} vs {o['total']:.2f} ms   load "
              f"{os.getloadavg()[0]:.1f}")
    for key, what in (("gemm", "matrix multiplies"), ("rest", "the rest"), ("total", "total")):
        ratios = [r["LiteRT"][key] / r["ONNX Runtime"][key] for r in rows]
        print(f"  LiteRT / ORT, {what:<17} {spread(ratios)}")
    for side in ("LiteRT", "ONNX Runtime"):
        types = rows[len(rows) // 2][side]["types"]
        top = sorted(types.items(), key=lambda kv: -kv[1])[:8]
        print(f"  {side} (repeat {len(rows) // 2}): " + ", ".join(f"{k} {v:.2f}" for k, v in top))


def gemm_models(work: Path, k: int, n: int) -> tuple[Path, Path]:
    """One projection y = x·W + b at a BERT shape (x [1, 128, k]), as ONNX (MatMul + Add) and
    as .tflite (TensorFlow's converter: one FULLY_CONNECTED with the bias), same weights."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    onnx_path, tfl_path = work / f"gemm_{k}x{n}.onnx", work / f"gemm_{k}x{n}.tflite"
    if onnx_path.is_file() and tfl_path.is_file():
        return onnx_path, tfl_path
    rng = np.random.default_rng(k * 7 + n)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"],
                                                                          ["y"])], "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128, n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8  # what ONNX Runtime 1.31 reads
    onnx.save(proto, onnx_path)
    script = (f"import numpy as np, tensorflow as tf\n"
              f"wb = np.load({str(work / 'wb.npz')!r})\n"
              "f = tf.function(lambda x: {'y': tf.matmul(x, wb['w']) + wb['b']}, "
              f"input_signature=[tf.TensorSpec([1, 128, {k}], tf.float32, name='x')])\n"
              "c = tf.lite.TFLiteConverter.from_concrete_functions("
              "[f.get_concrete_function()], f)\n"
              f"open({str(tfl_path)!r}, 'wb').write(c.convert())\n")
    np.savez(work / "wb.npz", w=w, b=b)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return onnx_path, tfl_path


def gemm_bench(work: Path, args: argparse.Namespace) -> None:
    """XNNPACK's FULLY_CONNECTED against ONNX Runtime's MatMul + Add at the BERT's three
    projection shapes, each pair timed interleaved in warm children, repeated."""
    import numpy as np

    from mtconvert.backends.base import Artifact
    from mtconvert.backends.tflite import map_io
    from mtconvert.worker import WarmSession

    print(f"\none projection alone, x [1, 128, K] · W [K, N] + b, {args.threads} threads: "
          "LiteRT (XNNPACK) / ONNX Runtime p50, interleaved in warm children")
    work.mkdir(parents=True, exist_ok=True)
    for k, n in ((384, 384), (384, 1536), (1536, 384)):
        onnx_path, tfl_path = gemm_models(work, k, n)
        feeds = {"x": np.random.default_rng(1).standard_normal((1, 128, k)).astype(np.float32)}
        io_map, _ = map_io(tfl_path, ["x"], ["y"], {"y": [1, 128, n]})
        with contextlib.ExitStack() as stack:
            ref = stack.enter_context(WarmSession(
                name="reference", backend="mtconvert.reference:OrtReference",
                artifact=Artifact(target="reference", primary=onnx_path,
                                  files=(onnx_path,)).to_dict(),
                feeds=feeds, threads=args.threads, timeout_s=600))
            tfl = stack.enter_context(WarmSession(
                name="tflite", backend="mtconvert.backends.tflite:TfliteBackend",
                artifact=Artifact(target="tflite", primary=tfl_path, files=(tfl_path,),
                                  meta=io_map | {"allow_flex": False}).to_dict(),
                feeds=feeds, threads=args.threads, timeout_s=600))
            diff = float(np.abs(tfl.result().outputs["y"] - ref.result().outputs["y"]).max())
            runs = [pair(tfl, ref, args) for _ in range(args.repeats)]
        print(f"  K {k:>4}, N {n:>4}: {spread([r['ratio_p50'] for r in runs])}; p50 "
              f"{statistics.median(r['target_p50_ms'] for r in runs):.3f} ms vs "
              f"{statistics.median(r['reference_p50_ms'] for r in runs):.3f} ms; max abs "
              f"difference {diff:.1e}; load {os.getloadavg()[0]:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile-runs", type=int, default=10)
    ap.add_argument("--sections", default="ratios,where,gemm",
                    help="ratios (operator counts, XNNPACK partitions, p50 ratios), where "
                    "(both runtimes' profilers), gemm (one projection alone)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.mkdtemp(prefix="bench-tflite-")))
    ap.add_argument("--reuse", action="store_true", help="reuse the 'before' and onnx2tf "
                    "artifacts an earlier run left in --work (mtconvert's comes from its cache)")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    work = args.work
    model = make_bert(work / "bert6.onnx")
    t0 = time.perf_counter()
    mt, entry = convert_mtconvert(model, work, args.threads)
    mt_s = time.perf_counter() - t0
    print(f"{model.name}: BERT 6 layers x 384, batch 1, sequence 128, {args.threads} threads; "
          f"machine: {os.cpu_count()} cores shared with other jobs")
    worst = entry["numerics"]["worst"]["max_abs"]
    print(f"  mtconvert tflite: {entry['status']} (max abs {worst:.2e}), conversion {mt_s:.0f} s "
          "with its validation")
    for step in entry["conversion"]["steps"]:
        print(f"      {step}"[:200])
    if "ratios" in sections:
        ratios(model, mt, work, args)
    if "where" in sections:
        where_the_time_goes(model, mt, args)
    if "gemm" in sections:
        gemm_bench(work / "gemm", args)


def ratios(model: Path, mt: Path, work: Path, args: argparse.Namespace) -> None:
    """Operator counts, XNNPACK partitions and p50 ratios of mtconvert's artifact, 'before'
    and onnx2tf's, each against ONNX Runtime and mtconvert's against the others."""
    done = work / "conversions.json"  # --reuse: the 'before' and onnx2tf artifacts of a run
    if args.reuse and done.is_file():
        kept = json.loads(done.read_text())
        before, raw_default = Path(kept["before"]), Path(kept["raw_default"])
        raw_timed = Path(kept["raw_timed"]) if kept["raw_timed"] else None
        raw_cmd, raw_s = kept["raw_cmd"], kept["raw_s"]
    else:
        before, fixed = convert_before(model, work)
        t0 = time.perf_counter()
        raw_default, raw_timed, raw_cmd = convert_raw(model, fixed, work)
        raw_s = time.perf_counter() - t0
        done.write_text(json.dumps({"before": str(before), "raw_default": str(raw_default),
                                    "raw_timed": str(raw_timed) if raw_timed else None,
                                    "raw_cmd": raw_cmd, "raw_s": raw_s}))
    print(f"  onnx2tf: `{raw_cmd}` [{raw_s:.0f} s for the raw conversion(s)]")
    arts = {"mtconvert": mt, "before": before, "onnx2tf default": raw_default}
    if raw_timed is not None and raw_timed != raw_default:
        arts["onnx2tf -rtpo Erf"] = raw_timed
    print("\noperators " + "".join(f"| {c} " for c in [*COLUMNS, "Flex"]))
    for name, path in arts.items():
        print(f"  {name:<18}" + "".join(f"| {c:>{len(h)}} " for c, h in
                                         zip(op_row(path), [*COLUMNS, "Flex"], strict=True)))
    print("\nXNNPACK (LiteRT's default delegate, 1 thread here)")
    for name, path in arts.items():
        print(f"  {name:<18} {off_xnnpack(path)}")
    timed = {"mtconvert": mt, "before": before}
    if raw_timed is not None:
        timed["onnx2tf" + (" -rtpo Erf" if raw_timed != raw_default else "")] = raw_timed
    if raw_timed != raw_default:
        print("  onnx2tf's default artifact holds Flex ops: no interpreter here runs it (the app "
              "must link the Select-TF ops library); timed instead: "
              + ("onnx2tf -rtpo Erf" if raw_timed else "nothing (-rtpo Erf failed)"))
    pairs = [("mtconvert", "ONNX Runtime"), *((o, "ONNX Runtime") for o in timed
                                              if o != "mtconvert"),
             *(("mtconvert", o) for o in timed if o != "mtconvert")]
    found: dict[tuple[str, str], list[dict]] = {p: [] for p in pairs}
    with contextlib.ExitStack() as stack:
        sides = open_sessions(stack, model, timed, args.threads)
        print("\nmax abs difference from ONNX Runtime (seeded input): " + ", ".join(
            f"{n} {v:.2e}" for n, v in max_abs(sides).items()))
        print("\nrun " + "".join(f"{a + ' / ' + b:>36}" for a, b in pairs) + "   load")
        for i in range(args.repeats):
            cells = {}
            for a, b in pairs[i % len(pairs):] + pairs[:i % len(pairs)]:  # rotate the order
                st = pair(sides[a], sides[b], args)
                found[(a, b)].append(st)
                lo, hi = st["ci95"]
                cells[(a, b)] = (f"{st['ratio_p50']:.2f}x [{lo:.2f}-{hi:.2f}]"
                                 f"{'?' if st['noisy'] else ''}")
            print(f"{i:>3} " + "".join(f"{cells[p]:>36}" for p in pairs)
                  + f"   {os.getloadavg()[0]:.1f}")
    print("\nratio of p50s, each pair timed interleaved in warm children ([95 % interval]; "
          "? = too noisy to tell 10 %); load = 1-minute load average on "
          f"{os.cpu_count()} cores")
    for (a, b), runs in found.items():
        print(f"  {a + ' / ' + b:<36} {spread([r['ratio_p50'] for r in runs])}; p50 "
              f"{statistics.median(r['target_p50_ms'] for r in runs):.1f} ms vs "
              f"{statistics.median(r['reference_p50_ms'] for r in runs):.1f} ms")



if __name__ == "__main__":
    main()
