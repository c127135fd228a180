"""ncnn, onnx-mobile and tflite against ONNX Runtime on a BERT-class encoder: a 6-layer,
384-wide BERT (transformers BertConfig, random weights, seed 0) at batch 1, sequence 128,
2 threads. Each target's p50 ratio to the reference comes from the project's interleaved
timing (`mtconvert validate`: reference and target in alternating rounds, each warm in its own
child), repeated to show its run-to-run spread. Goals from issue 19: ncnn <= 1.5x,
onnx-mobile <= 1.0x, tflite <= 1.0x. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/bench_runtimes.py [--repeats 5] [--work DIR]

The conversions go through `mtconvert` once (kept in --work/cache: later runs reuse them).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MTCONVERT = str(Path(sys.executable).parent / "mtconvert")
GOALS = {"ncnn": 1.5, "onnx-mobile": 1.0, "tflite": 1.0}
SUFFIXES = (".ort", ".tflite", ".param")


def make_bert(path: Path, layers: int = 6, hidden: int = 384, seq: int = 128) -> Path:
    """A BertModel-based encoder with random weights (no download), exported to ONNX with
    the batch and sequence axes dynamic; its last hidden state is the output."""
    if path.is_file():
        return path
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=12, intermediate_size=4 * hidden,
                        max_position_embeddings=512)
    model = BertModel(config).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask):  # noqa: ANN001
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(0, config.vocab_size, (1, seq))
    mask = torch.ones(1, seq, dtype=torch.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(Encoder().eval(), (ids, mask), str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                      dynamic_axes={"input_ids": axes, "attention_mask": axes,
                                    "hidden": axes})
    return path


def spread(values: list[float]) -> str:
    med = statistics.median(values)
    return (f"median {med:.3f}x, min {min(values):.3f}, max {max(values):.3f} "
            f"(±{max(med - min(values), max(values) - med) / med:.0%})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--targets", default="ncnn,onnx-mobile,tflite")
    ap.add_argument("--work", type=Path,
                    default=Path(tempfile.gettempdir()) / "mtconvert-bench-bert6")
    args = ap.parse_args()
    model = make_bert(args.work / "bert6.onnx")
    env = {**os.environ, "MTCONVERT_CACHE_DIR": str(args.work / "cache")}
    out = args.work / "out"
    shape = ["--input-shape", "input_ids=1x128", "--input-shape", "attention_mask=1x128"]
    conv = subprocess.run([MTCONVERT, str(model), "--to", args.targets, "--out", str(out),
                           "--threads", str(args.threads), *shape, "--report-json",
                           str(args.work / "convert.json"), "-q"], env=env, capture_output=True,
                          text=True)
    convert = json.loads((args.work / "convert.json").read_text())
    artifacts = [str(p) for p in sorted(out.iterdir()) if p.suffix in SUFFIXES]
    print(f"{model.name}: 6 layers, 384 wide, batch 1, sequence 128, {args.threads} threads; "
          f"convert exit {conv.returncode}")
    for t in convert["targets"]:
        print(f"  {t['name']:<12} {t['status']:<8} {t.get('reason') or ''}"[:160])
    ratios: dict[str, list[float]] = {}
    ref_p50: list[float] = []
    loads: list[float] = []
    print(f"\n{'run':>3} " + " ".join(f"{n:>24}" for n in GOALS) + "   reference p50   load")
    for i in range(args.repeats):
        path = args.work / f"validate{i}.json"
        subprocess.run([MTCONVERT, "validate", str(model), *artifacts, *shape, "--threads",
                        str(args.threads), "--iterations", str(args.iterations),
                        "--report-json", str(path), "-q"], env=env, capture_output=True)
        report = json.loads(path.read_text())
        by_name = {t["name"].split(" ")[0]: t for t in report["targets"]}
        cells = []
        for name in GOALS:
            t = next((v for k, v in by_name.items() if k.startswith(name)), None)
            vs = (t or {}).get("latency_vs_reference") or {}
            if "ratio_p50" not in vs:
                cells.append(f"{'-':>24}")
                continue
            ratios.setdefault(name, []).append(vs["ratio_p50"])
            lo, hi = vs["ci95"]
            cells.append(f"{vs['ratio_p50']:.2f}x [{lo:.2f}-{hi:.2f}]{'?' if vs['noisy'] else ' '}"
                         .rjust(24))
        ref_p50.append(report["reference"]["latency"]["p50_ms"])
        loads.append(os.getloadavg()[0])
        print(f"{i:>3} " + " ".join(cells) + f"   {ref_p50[-1]:8.2f} ms   {loads[-1]:.1f}")
    print("\nratio target/reference p50 ([95% interval], ? = too noisy to tell 10 %; load: the "
          f"machine's 1-minute load average after the run, {os.cpu_count()} cores)")
    for name, goal in GOALS.items():
        values = ratios.get(name)
        if not values:
            print(f"  {name:<12} not measured")
            continue
        verdict = ("meets" if statistics.median(values) <= goal else "misses") \
            if max(loads) <= (os.cpu_count() or 1) else \
            f"cannot tell (load up to {max(loads):.1f} on {os.cpu_count()} cores: under load " \
            "2-thread ONNX Runtime slows far more than the targets)"
        print(f"  {name:<12} {spread(values)}  goal <= {goal}x: {verdict}")
    print(f"  reference p50 ms: median {statistics.median(ref_p50):.2f}, "
          f"min {min(ref_p50):.2f}, max {max(ref_p50):.2f}")


if __name__ == "__main__":
    main()
