"""TFLite benchmark (issue 3): a 6-layer, 384-wide BERT encoder built from transformers.BertConfig
with random weights, batch 1, sequence 128, 2 threads. In one run it prints:

- raw onnx2tf (its defaults, as a user would call it, plus the Erf replacement needed to avoid
  Flex) conversion seconds, unless --skip-raw;
- mtconvert's tflite conversion seconds, and the artifact's p50 latency next to ONNX Runtime CPU
  on the same ONNX (same inputs, same thread count), from mtconvert's own report.

    .venv/bin/python benchmarks/bench_tflite.py [--seq 128] [--threads 2] [--skip-raw]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MTCONVERT = str(Path(sys.executable).parent / "mtconvert")


def build_bert(path: Path, seq: int) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                  intermediate_size=1536, vocab_size=30522,
                                  attn_implementation="eager")
    model = transformers.BertModel(cfg).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN202
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(0, cfg.vocab_size, (1, seq))
    mask = torch.ones(1, seq, dtype=torch.long)
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(Encoder().eval(), (ids, mask), str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"],
                      dynamic_axes={"input_ids": axes, "attention_mask": axes,
                                    "last_hidden_state": axes})


RAW = """
import sys, onnx2tf
onnx2tf.convert(input_onnx_file_path=sys.argv[1], output_folder_path=sys.argv[2],
                replace_to_pseudo_operators=["erf"], non_verbose=True)
"""


def raw_onnx2tf(onnx_path: Path, seq: int, tmp: Path) -> str:
    """onnx2tf with its defaults, from the same graph mtconvert hands it: shapes fixed and
    Constant nodes made initializers (with dynamic axes it crashes in Expand; with the scalar
    Constants its strict mode raises on attention's Mul)."""
    from mtconvert.backends.onnx_tools import fix_shapes

    fixed = tmp / "fixed.onnx"
    fix_shapes(str(onnx_path), str(fixed), {"input_ids": [1, seq], "attention_mask": [1, seq]})
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RAW, str(fixed), str(tmp / "raw")],
                          capture_output=True, text=True)
    secs = time.perf_counter() - t0
    return f"{secs:.1f} s" if proc.returncode == 0 else f"failed (exit {proc.returncode})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--skip-raw", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tflite-"))
    try:
        onnx_path = tmp / "bert6.onnx"
        build_bert(onnx_path, args.seq)
        raw = "skipped" if args.skip_raw else raw_onnx2tf(onnx_path, args.seq, tmp)
        report_path = tmp / "report.json"
        subprocess.run([MTCONVERT, str(onnx_path), "--to", "tflite", "--out", str(tmp / "out"),
                        "--input-shape", f"input_ids=1x{args.seq}", "--threads",
                        str(args.threads), "--iterations", str(args.iterations),
                        "--report-json", str(report_path), "-q"], capture_output=True)
        report = json.loads(report_path.read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t = report["targets"][0]
    ref, lat = report["reference"]["latency"], t.get("latency") or {}
    print(f"BERT 6 layers x 384, batch 1, sequence {args.seq}, {args.threads} threads")
    print(f"  raw onnx2tf (defaults + erf replacement, same fixed graph)  {raw}")
    print(f"  mtconvert tflite conversion (all steps)                     "
          f"{t['conversion']['seconds']:.1f} s"
          f"   (status {t['status']}, max abs {t['numerics']['worst']['max_abs']:.2e})")
    for step in t["conversion"]["steps"]:
        print(f"      {step}")
    print(f"  p50 latency: ONNX Runtime CPU {ref['p50_ms']:.2f} ms | tflite "
          f"({t['numerics']['runtime']}) {lat.get('p50_ms', float('nan')):.2f} ms | ratio "
          f"{lat.get('p50_ms', float('nan')) / ref['p50_ms']:.2f}x ({lat.get('iterations')} runs)")


if __name__ == "__main__":
    main()
