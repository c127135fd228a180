"""End to end (issue 19): one cold four-target run of mtconvert against the raw toolchains run by
hand on the same model. The model: a ~22M-parameter encoder (BERT, 6 layers, 384 wide, vocab
30522, random weights, seed 0), batch 1, sequence 128.

- mtconvert: ``mtconvert bert6.onnx --to tflite,coreml,ncnn,onnx-mobile`` with an empty cache
  (conversion AND validation: reference, lint, numerics, interleaved latency per target);
- by hand, one tool after another, each at its defaults (converter/raw.py, what
  ``mtconvert matrix --raw`` runs): ``onnx2tf -i COPY.onnx -o OUT``; ``pnnx bert6.onnx
  inputshape=...``; ``ct.convert(torch.export.load('bert6.pt2').run_decompositions({}))``;
  ``python -m onnxruntime.tools.convert_onnx_models_to_ort bert6.onnx``. No validation.

Prints both wall times, their ratio (issue goal <= 0.5x), each raw tool's time and outcome, and
where mtconvert's time goes (its report's stage timings). The two sides alternate which goes
first, --repeats times. The machine is shared (2 cores, other jobs running): the load average is
printed with each run. Exporting the model (.onnx and .pt2) is not timed on either side.

    .venv/bin/python benchmarks/bench_e2e.py [--repeats 2] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MTCONVERT = str(Path(sys.executable).parent / "mtconvert")
TARGETS = "tflite,coreml,ncnn,onnx-mobile"
SEQ = 128
SHAPE = ["--input-shape", f"input_ids=1x{SEQ}", "--input-shape", f"attention_mask=1x{SEQ}"]


def build(folder: Path) -> tuple[Path, Path, int]:
    """The encoder as .onnx (opset 17, batch and sequence axes dynamic) and .pt2
    (torch.export), from one module; returns both paths and its parameter count."""
    import torch
    from transformers import BertConfig, BertModel

    onnx_path, pt2_path = folder / "bert6.onnx", folder / "bert6.pt2"
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                                num_attention_heads=12, intermediate_size=1536,
                                max_position_embeddings=512)).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN202
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    model = Encoder().eval()
    params = sum(p.numel() for p in model.parameters())
    if onnx_path.is_file() and pt2_path.is_file():
        return onnx_path, pt2_path, params
    args = (torch.randint(0, 30522, (1, SEQ)), torch.ones(1, SEQ, dtype=torch.int64))
    axes = {0: "batch", 1: "sequence"}
    folder.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, args, str(onnx_path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                      dynamic_axes={"input_ids": axes, "attention_mask": axes, "hidden": axes})
    with torch.no_grad():
        torch.export.save(torch.export.export(model, args), str(pt2_path))
    return onnx_path, pt2_path, params


def run_mtconvert(onnx_path: Path, work: Path) -> tuple[float, dict, int]:
    """One cold run: empty cache and output folders. Returns (wall s, report, exit code)."""
    cache, out = work / "mt-cache", work / "mt-out"
    for d in (cache, out):
        shutil.rmtree(d, ignore_errors=True)
    report = work / "mt-report.json"
    env = {**os.environ, "MTCONVERT_CACHE_DIR": str(cache)}
    t0 = time.perf_counter()
    proc = subprocess.run([MTCONVERT, str(onnx_path), "--to", TARGETS, "--out", str(out), *SHAPE,
                           "--report-json", str(report), "-q"], env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    return wall, json.loads(report.read_text()) if report.is_file() else {}, proc.returncode


def run_raw(onnx_path: Path, pt2_path: Path, work: Path) -> tuple[float, list[tuple]]:
    """The four raw tools one after another (converter/raw.py's functions). Returns (wall s,
    [(tool, seconds, outcome)])."""
    from mtconvert import raw
    from mtconvert.errors import MtConvertError

    shapes = [((1, SEQ), "int64"), ((1, SEQ), "int64")]
    jobs = [("onnx2tf", onnx_path), ("pnnx", onnx_path), ("coremltools", pt2_path),
            ("ort-format-tool", onnx_path)]
    done, t_all = [], time.perf_counter()
    for tool, model in jobs:
        out = work / f"raw-{tool}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        t0 = time.perf_counter()
        try:
            artifact = raw.CONVERTERS[tool](model, out, 1800, lambda: shapes, lambda _: None)
            outcome = f"ok: {artifact.name}"
        except (MtConvertError, OSError) as exc:
            outcome = f"FAILED: {str(exc).splitlines()[0][:110]}"
            if tool == "onnx2tf":  # what its users do: fix the shapes, run it again (timed too)
                outcome = _onnx2tf_fixed(model, out, outcome)
        done.append((tool, time.perf_counter() - t0, outcome))
    return time.perf_counter() - t_all, done


def _onnx2tf_fixed(model: Path, out: Path, failure: str) -> str:
    """onnx2tf at its defaults again, on the model with its shapes fixed by onnxsim (the
    toolchain notes' workaround for its crash on dynamic axes)."""
    from mtconvert import raw
    from mtconvert.backends.onnx_tools import fix_shapes
    from mtconvert.backends.tflite import tflite_ops
    from mtconvert.errors import MtConvertError

    fixed = out.parent / f"{out.name}-fixed" / model.name
    fixed.parent.mkdir(parents=True, exist_ok=True)
    fix_shapes(str(model), str(fixed), {"input_ids": [1, SEQ], "attention_mask": [1, SEQ]})
    try:
        artifact = raw.onnx2tf(fixed, out.parent / f"{out.name}-fixed-out", 1800, None,
                               lambda _: None)
    except MtConvertError as exc:
        return f"{failure}; with fixed shapes also: {str(exc).splitlines()[0][:80]}"
    flex = sorted(op for op in tflite_ops(artifact) if op.startswith("FLEX:"))
    return (f"on the dynamic axes {failure[:70]}...; shapes fixed (onnxsim) and run again: "
            f"{artifact.name}" + (f" (holds {', '.join(flex)}: stock LiteRT rejects it)"
                                  if flex else ""))


def where_time_goes(report: dict) -> list[str]:
    lines = ["    shared: " + ", ".join(f"{k} {v:.1f} s" for k, v in
                                          (report.get("timings") or {}).items())]
    for t in report.get("targets", []):
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in (t.get("timings") or {}).items())
        lines.append(f"    {t['name']:<18} {t['status']:<8} {stages}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(tempfile.mkdtemp(prefix="bench-e2e-")))
    args = ap.parse_args()
    onnx_path, pt2_path, params = build(args.work / "model")
    print(f"bert6: {params / 1e6:.1f}M parameters, batch 1, sequence {SEQ}; targets {TARGETS}; "
          f"machine: {os.cpu_count()} cores shared with other jobs (timings are inflated and "
          "noisy)")
    ratios = []
    for i in range(args.repeats):
        sides = ["mtconvert", "raw"] if i % 2 == 0 else ["raw", "mtconvert"]
        for side in sides:
            if side == "mtconvert":
                mt_s, report, code = run_mtconvert(onnx_path, args.work)
            else:
                raw_s, tools = run_raw(onnx_path, pt2_path, args.work)
        ratios.append(mt_s / raw_s)
        print(f"\nrun {i} ({' first, '.join(sides)} second; load {os.getloadavg()[0]:.1f})")
        print(f"  mtconvert cold, 4 targets, with validation: {mt_s:7.1f} s (exit {code})")
        print("\n".join(where_time_goes(report)))
        print(f"  raw toolchains by hand, no validation:      {raw_s:7.1f} s")
        for tool, secs, outcome in tools:
            print(f"    {tool:<18} {secs:6.1f} s  {outcome}")
        print(f"  ratio mtconvert / raw: {ratios[-1]:.2f}x (issue goal <= 0.5x)")
    print(f"\nratio over {len(ratios)} runs: " + ", ".join(f"{r:.2f}x" for r in ratios)
          + f"; goal <= 0.5x: {'met' if max(ratios) <= 0.5 else 'not met'}")


if __name__ == "__main__":
    main()
