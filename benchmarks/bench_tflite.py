"""TFLite against ONNX Runtime and onnx2tf's own artifact (issue 19, "TFLite ahead"): a 6-layer,
384-wide BERT (transformers BertConfig, random weights, seed 0; bench_runtimes.make_bert) at
batch 1, sequence 128, 2 threads. In one run it prints:

- the operator counts of each .tflite (GELU, the Erf emulation's ABS/NEG/EXP, the LayerNorm
  ops MEAN/SQUARED_DIFFERENCE/RSQRT, TRANSPOSE, Flex): mtconvert's artifact now, "before" (the
  same route with the GELU fusion switched off: what mtconvert wrote before it), and onnx2tf at
  its defaults (``onnx2tf -i COPY.onnx -o OUT``, converter/raw.py). When onnx2tf's default
  artifact holds Flex ops (no interpreter here runs them) that is said, and what a user runs
  instead is timed: the same command with ``-rtpo Erf`` (onnx2tf's own advice);
- p50 latency, each artifact against ONNX Runtime on the same ONNX, by the project's interleaved
  timing (``mtconvert validate``: reference and target in alternating rounds, each warm in its
  own child), the artifacts taken in a rotating order, repeated --repeats times; the ratios'
  median and spread, and mtconvert's artifact against the others run by run.

The machine is shared (2 cores, other jobs running): the load average is printed with each
repeat. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/bench_tflite.py [--repeats 5] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    return default, out / f"{copy.stem}_float32.tflite", typed[-1] + " -rtpo Erf"


def op_row(path: Path) -> list[str]:
    from mtconvert.backends.tflite import tflite_ops

    ops = tflite_ops(path)
    cells = [str(sum(ops.values()) if names is None else sum(ops[n] for n in names))
             for names in COLUMNS.values()]
    flex = sorted(op for op in ops if ":" in op)
    return cells + [", ".join(flex) or "none"]


def validate(model: Path, artifact: Path, work: Path, tag: str, args: argparse.Namespace
             ) -> dict:
    """``mtconvert validate MODEL ARTIFACT``: the target's interleaved timing against ONNX
    Runtime (latency_vs_reference) and the reference's own p50."""
    path = work / f"validate-{tag}.json"
    subprocess.run([MTCONVERT, "validate", str(model), str(artifact), *SHAPE, "--threads",
                    str(args.threads), "--iterations", str(args.iterations), "--report-json",
                    str(path), "-q"], capture_output=True, text=True)
    report = json.loads(path.read_text())
    t = report["targets"][0]
    return {"vs": t.get("latency_vs_reference") or {}, "status": t["status"],
            "reason": t.get("reason"), "ref_p50": report["reference"]["latency"]["p50_ms"],
            "max_abs": ((t.get("numerics") or {}).get("worst") or {}).get("max_abs")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(tempfile.mkdtemp(prefix="bench-tflite-")))
    args = ap.parse_args()
    work = args.work
    model = make_bert(work / "bert6.onnx")
    t0 = time.perf_counter()
    mt, entry = convert_mtconvert(model, work, args.threads)
    mt_s = time.perf_counter() - t0
    before, fixed = convert_before(model, work)
    t0 = time.perf_counter()
    raw_default, raw_timed, raw_cmd = convert_raw(model, fixed, work)
    raw_s = time.perf_counter() - t0
    print(f"{model.name}: BERT 6 layers x 384, batch 1, sequence 128, {args.threads} threads; "
          f"machine: {os.cpu_count()} cores shared with other jobs")
    print(f"  mtconvert tflite: {entry['status']} (max abs {entry['numerics']['worst']['max_abs']:.2e})"
          f", conversion {mt_s:.0f} s with its validation")
    for step in entry["conversion"]["steps"]:
        print(f"      {step}"[:200])
    print(f"  onnx2tf: `{raw_cmd}` [{raw_s:.0f} s for the raw conversion(s)]")
    arts = {"mtconvert": mt, "before": before, "onnx2tf default": raw_default}
    if raw_timed is not None and raw_timed != raw_default:
        arts["onnx2tf -rtpo Erf"] = raw_timed
    print("\noperators " + "".join(f"| {c} " for c in [*COLUMNS, "Flex"]))
    for name, path in arts.items():
        print(f"  {name:<18}" + "".join(f"| {c:>{len(h)}} " for c, h in
                                         zip(op_row(path), [*COLUMNS, "Flex"], strict=True)))
    timed = {"mtconvert": mt, "before": before}
    if raw_timed is not None:
        timed["onnx2tf" + (" -rtpo Erf" if raw_timed != raw_default else "")] = raw_timed
    if raw_timed != raw_default:
        print("  onnx2tf's default artifact holds Flex ops: no interpreter here runs it (the app "
              "must link the Select-TF ops library); timed instead: "
              + ("onnx2tf -rtpo Erf" if raw_timed else "nothing (-rtpo Erf failed)"))
    ratios: dict[str, list[float]] = {n: [] for n in timed}
    ref_p50: list[float] = []
    p50: dict[str, list[float]] = {n: [] for n in timed}
    names = list(timed)
    print("\nrun  " + "".join(f"{n + ' / ORT':>28}" for n in names) + "   ORT p50    load")
    for i in range(args.repeats):
        order = names[i % len(names):] + names[:i % len(names)]  # rotate who goes first
        cells = {}
        for name in order:
            r = validate(model, timed[name], work, f"{i}-{name.replace(' ', '_')}", args)
            vs = r["vs"]
            if "ratio_p50" not in vs:
                cells[name] = f"{r['status']}: {r['reason']}"[:26]
                continue
            ratios[name].append(vs["ratio_p50"])
            p50[name].append(vs["target_p50_ms"])
            ref_p50.append(r["ref_p50"])
            lo, hi = vs["ci95"]
            cells[name] = f"{vs['ratio_p50']:.2f}x [{lo:.2f}-{hi:.2f}]{'?' if vs['noisy'] else ''}"
        print(f"{i:>3}  " + "".join(f"{cells[n]:>28}" for n in names)
              + f"   {statistics.median(ref_p50[-len(names):] or [0]):6.1f} ms  "
              f"{os.getloadavg()[0]:.1f}")
    print("\nratio of p50s against ONNX Runtime, timed interleaved ([95 % interval]; ? = too "
          "noisy to tell 10 %); load = 1-minute load average")
    for name in names:
        if ratios[name]:
            print(f"  {name:<18} {spread(ratios[name])}; p50 median "
                  f"{statistics.median(p50[name]):.1f} ms")
        else:
            print(f"  {name:<18} not measured")
    for other in names[1:]:
        paired = [a / b for a, b in zip(ratios["mtconvert"], ratios[other], strict=False)]
        if paired:
            print(f"  mtconvert / {other:<18} {spread(paired)} (run by run, each against the "
                  "same run's ONNX Runtime)")
    if ref_p50:
        print(f"  ONNX Runtime p50: median {statistics.median(ref_p50):.1f} ms, min "
              f"{min(ref_p50):.1f}, max {max(ref_p50):.1f}")


if __name__ == "__main__":
    main()
