"""--sparse (issue 20): a pruned model on each target, dense vs --sparse, side by side: the
artifact's bytes, the worst error against the reference (max abs, from the run's own report),
the storage the report states, and for .tflite the p50 of the dense and the sparse artifact
timed against each other in alternating rounds in one LiteRT process (XNNPACK, the same
threads; median of the per-round p50s and the spread of those, min-max). Asserts nothing.

Core ML's latency is not measurable here (Core ML runs only on Apple platforms; the
mil-reference interpreter densifies every weight): its p50 column is '-'. onnx-mobile stores
dense either way (the report says why); it is listed as the yardstick.

Models: the bert_pruned fixture (50 % L1-unstructured of every encoder Linear); with --big also
a 6-layer, 384-wide BERT encoder (transformers config, random weights, seeded) pruned 50 % and
80 % (torch.nn.utils.prune.l1_unstructured on every encoder Linear). The big models' tflite
conversions take minutes each on two cores.

    .venv/bin/python benchmarks/bench_sparse.py [--big] [--targets tflite,coreml,onnx-mobile]
        [--seq 32] [--threads 2] [--rounds 7] [--work DIR]
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

ROOT = Path(__file__).resolve().parent.parent
MTCONVERT = str(Path(sys.executable).parent / "mtconvert")


def build_pruned(path: Path, amount: float, seq: int) -> Path:
    import torch
    import transformers
    from torch.nn.utils import prune

    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                  intermediate_size=1536, vocab_size=30522,
                                  attn_implementation="eager")
    model = transformers.BertModel(cfg).eval()
    for module in model.encoder.modules():
        if isinstance(module, torch.nn.Linear):
            prune.l1_unstructured(module, "weight", amount=amount)
            prune.remove(module, "weight")

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN202
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(0, cfg.vocab_size, (1, seq))
    mask = torch.ones(1, seq, dtype=torch.long)
    torch.onnx.export(Encoder().eval(), (ids, mask), str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"])
    return path


def convert(model: Path, out: Path, args: argparse.Namespace, sparse: bool) -> dict:
    report = out / "report.json"
    if report.is_file():  # --work: an earlier run's conversion
        return json.loads(report.read_text())
    cmd = [MTCONVERT, str(model), "--to", args.targets, "--out", str(out), "--input-shape",
           f"input_ids=1x{args.seq}", "--threads", str(args.threads), "--report-json",
           str(report), "--no-cache", "-q"] + (["--sparse"] if sparse else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if not report.is_file():
        sys.exit(f"{model.name}: no report (exit {proc.returncode}): {proc.stderr[-400:]}")
    return json.loads(report.read_text())


def tflite_p50s(dense: Path, sparse: Path, feeds_from: Path, args: argparse.Namespace,
                ) -> dict[str, list[float]]:
    """Per-round p50 (ms) of each .tflite, rounds alternating dense / sparse."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interps = {}
    for name, path in (("dense", dense), ("sparse", sparse)):
        it = Interpreter(model_path=str(path), num_threads=args.threads)
        it.allocate_tensors()
        for d in it.get_input_details():
            high = 2 if "mask" in d["name"] else 1000
            it.set_tensor(d["index"], np.random.default_rng(0).integers(
                1, high, d["shape"]).astype(d["dtype"]))
        interps[name] = it
    out: dict[str, list[float]] = {"dense": [], "sparse": []}
    for r in range(args.rounds):
        for name in (("dense", "sparse") if r % 2 == 0 else ("sparse", "dense")):
            it, laps = interps[name], []
            it.invoke()
            for _ in range(args.runs):
                t0 = time.perf_counter()
                it.invoke()
                laps.append((time.perf_counter() - t0) * 1e3)
            out[name].append(statistics.median(laps))
    return out


def size(t: dict) -> int:
    return sum(a["bytes"] for a in t.get("artifacts", ()) if a.get("role") == "artifact")


def storage(t: dict) -> str:
    s = t.get("sparsity") or {}
    return s.get("storage", "-") + (f" ({s['sparse_tensors']})" if s.get("sparse_tensors")
                                    else "")


def report_model(name: str, model: Path, tmp: Path, args: argparse.Namespace) -> None:
    dense = convert(model, tmp / f"{name}-dense", args, False)
    sparse = convert(model, tmp / f"{name}-sparse", args, True)
    src = dense["source"].get("sparsity") or {}
    print(f"\n{name}: {src.get('zero_share', 0):.1%} of the weights zero "
          f"({src.get('pruned_tensors')} pruned tensors at {src.get('pruned_zero_share', 0):.1%})")
    print(f"{'target':12} {'status d/s':13} {'bytes dense':>12} {'bytes sparse':>12} "
          f"{'ratio':>6} {'max abs d':>10} {'max abs s':>10} {'storage s':12} p50 ms dense / "
          "sparse (median of rounds, min-max)")
    for target in args.targets.split(","):
        d, s = (next((t for t in r["targets"] if t["name"] == target), {})
                for r in (dense, sparse))
        wd = ((d.get("numerics") or {}).get("worst") or {}).get("max_abs")
        ws = ((s.get("numerics") or {}).get("worst") or {}).get("max_abs")
        lat = "-"
        if target == "tflite" and d.get("status") == "passed" and s.get("status") == "passed":
            p = tflite_p50s(Path(d["artifacts"][0]["path"]), Path(s["artifacts"][0]["path"]),
                            model, args)
            lat = " / ".join(f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"
                             for v in (p["dense"], p["sparse"]))
        elif target == "coreml":
            lat = "not measurable here (no Mac)"
        ratio = size(s) / size(d) if size(d) else float("nan")
        fmt = (lambda v: f"{v:.2e}" if isinstance(v, float) else "-")  # noqa: E731
        print(f"{target:12} {d.get('status', '-')[:6]}/{s.get('status', '-')[:6]:6} "
              f"{size(d):>12} {size(s):>12} {ratio:>6.3f} {fmt(wd):>10} {fmt(ws):>10} "
              f"{storage(s):12} {lat}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--targets", default="tflite,coreml,onnx-mobile")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--work", type=Path, help="keep conversions here (reused when present)")
    args = ap.parse_args()
    print("machine shared with other jobs while measuring: read the spreads")
    with tempfile.TemporaryDirectory(prefix="bench-sparse-") as tmp_name:
        tmp = args.work or Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        report_model("bert_pruned", ROOT / "fixtures" / "bert_pruned.onnx", tmp, args)
        if args.big:
            for amount in (0.5, 0.8):
                name = f"bert6x384_pruned{int(amount * 100)}"
                path = tmp / f"{name}.onnx"
                if not path.is_file():
                    build_pruned(path, amount, args.seq)
                report_model(name, path, tmp, args)


if __name__ == "__main__":
    main()
