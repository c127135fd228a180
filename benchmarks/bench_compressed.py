"""Compressed sources (issue 20): the float BERT fixture beside its two int8 fixtures (ORT
quantize_static QDQ, quantize_dynamic) on each target, side by side: the files' bytes (and
against the source's), p50 and its interleaved ratio to ONNX Runtime on the same source (the
project's timing: target and reference in alternating rounds, each warm in its own child; the
95 % interval and round-to-round spreads are printed), and the error against the source (max
abs, cosine, SNR). One mtconvert run per model, all targets; asserts nothing.

The int8 / float p50 column divides two p50s measured in different runs (each interleaved with
its own reference, not with each other): read it with the spreads beside it.

    .venv/bin/python benchmarks/bench_compressed.py [--targets onnx-mobile,tflite,coreml,ncnn]
        [--seq 16] [--threads 2]

--calibrate instead measures, in ONNX Runtime alone, what the int8-source profile
(validators/tolerances.py) must admit: the float graph the non-ORT targets compute (weights
dequantized, the activations' QuantizeLinear/DequantizeLinear pairs dropped) against the
quantized source, and ORT's optimized run (integer kernels) against its unoptimized one, for
the two int8 fixtures and a 6-layer, 384-wide BERT encoder (bench_tflite.build_bert, random
weights) quantized by onnxruntime (QDQ per-tensor and per-channel, dynamic), on the lowering
checks' inputs (no, one and half padding) at sequence --seq.

    .venv/bin/python benchmarks/bench_compressed.py --calibrate [--seq 64]

--torch instead builds a small BERT encoder (transformers config, random weights, seeded) and
quantizes it the two PyTorch ways (torchao Int8WeightOnlyConfig; PT2E with the XNNPACK
quantizer on the linear layers, per-channel, calibrated on its example input; input_ids only), saves the three as .pt2 and runs
each through the targets, the int8 ones with --float-model (the float .pt2): size against the
source's, p50, error against the compressed source and against the float model.

    .venv/bin/python benchmarks/bench_compressed.py --torch [--targets onnx-mobile,tflite]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MTCONVERT = str(Path(sys.executable).parent / "mtconvert")
MODELS = ("bert_encoder", "bert_int8_qdq", "bert_int8_dynamic")


def run(model: str, tmp: Path, args: argparse.Namespace) -> dict:
    report = tmp / f"{model}.json"
    proc = subprocess.run([MTCONVERT, str(ROOT / "fixtures" / f"{model}.onnx"), "--to",
                           args.targets, "--out", str(tmp / model), "--input-shape",
                           f"input_ids=1x{args.seq}", "--threads", str(args.threads),
                           "--report-json", str(report), "--no-cache", "-q"],
                          capture_output=True, text=True)
    if not report.is_file():
        sys.exit(f"{model}: no report (exit {proc.returncode}): {proc.stderr[-400:]}")
    return json.loads(report.read_text())


def row(model: str, t: dict, source_bytes: int, float_p50: float | None) -> str:
    size = sum(a["bytes"] for a in t.get("artifacts", ()))
    lat, vs = t.get("latency") or {}, t.get("latency_vs_reference") or {}
    worst = (t.get("numerics") or {}).get("worst") or {}
    outs = (t.get("numerics") or {}).get("outputs") or {}
    snr = min((o.get("snr_db") or float("inf") for o in outs.values()), default=None)
    p50 = lat.get("p50_ms")
    vs_float = f"{p50 / float_p50:.2f}x" if p50 and float_p50 and model != MODELS[0] else "-"
    ci = vs.get("ci95") or [None, None]
    c = t.get("compressed") or {}
    kept = c.get("kept") or {}
    kept_s = "-"
    if "int8_tensors" in kept:
        kept_s = f"{kept['same_ints_and_scales']}/{kept['int8_tensors']}"
        kept_s += f" (+{kept['same_ints_other_scale']} other scale)" \
            if kept.get("same_ints_other_scale") else ""
        kept_s += f" (+{kept['not_from_source']} own ints)" \
            if kept.get("not_from_source") else ""
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    timing = (f"{fmt(vs.get('ratio_p50'), '.2f')}x [{fmt(ci[0], '.2f')}-{fmt(ci[1], '.2f')}] "
              f"spread ref {fmt(vs.get('reference_spread'), '.0%')} "
              f"tgt {fmt(vs.get('target_spread'), '.0%')}")
    return (f"| {model} | {t['name']} | {t['precision']} | {t['status']} "
            f"| {size / 1024:.1f} KiB | {size / source_bytes:.2f}x | {fmt(p50, '.3f')} "
            f"| {timing} | {vs_float} | {fmt(worst.get('max_abs'), '.3g')} "
            f"| {fmt(worst.get('cosine'), '.6f')} | {fmt(snr, '.1f')} | {kept_s} |")


def _metrics(ref: list[dict], got: list[dict]) -> tuple[float, float, float]:
    import numpy as np

    a = np.concatenate([x.ravel() for r in ref for x in r.values()]).astype(np.float64)
    b = np.concatenate([x.ravel() for g in got for x in g.values()]).astype(np.float64)
    cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    err = float(((a - b) ** 2).sum())
    snr = float("inf") if err == 0 else 10 * np.log10(float((a ** 2).sum()) / err)
    return float(np.abs(a - b).max()), cos, snr


def _quantize(src: Path, dst: Path, mode: str, feeds: list[dict]) -> None:
    import contextlib
    import warnings

    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self):  # noqa: ANN202
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), auto_merge=True)
        if mode == "dynamic":
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8)
        else:
            quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["MatMul", "Gemm"],
                            per_channel=mode == "qdq-per-channel",
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


def calibrate(args: argparse.Namespace) -> None:
    import onnx
    import onnxruntime as ort

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_tflite import build_bert

    from mtconvert.backends.lowering import check
    from mtconvert.backends.lowering.dequantize import dequantize

    def run(model: object, feeds: list[dict], optimize: bool) -> list[dict]:
        so = ort.SessionOptions()
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        sess = ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        return [dict(zip(names, sess.run(None, f))) for f in feeds]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = [(m, ROOT / "fixtures" / f"{m}.onnx") for m in MODELS[1:]]
        big = tmp / "bert6x384.onnx"
        build_bert(big, args.seq)
        model = onnx.load(str(big))
        shapes = {"input_ids": [2, args.seq], "attention_mask": [2, args.seq]}
        calib = check.make_feeds(model, shapes, check.embedding_sizes(model), seed=7)
        for mode in ("qdq-per-tensor", "qdq-per-channel", "dynamic"):
            _quantize(big, tmp / f"{mode}.onnx", mode, calib)
            cases.append((f"bert 6x384 {mode}", tmp / f"{mode}.onnx"))
        print(f"sequence {args.seq}, batch 2, the lowering checks' inputs; against the quantized "
              "source in ORT (unoptimized: float-simulated QDQ)")
        print("| source | bytes | what | max abs | cosine | SNR dB |")
        print("|---|---|---|---|---|---|")
        for name, path in cases:
            src = onnx.load(str(path))
            feeds = check.make_feeds(src, shapes, check.embedding_sizes(src))
            ref = run(src, feeds, optimize=False)
            for what, got in (("ORT optimized (integer kernels)", run(src, feeds, True)),
                              ("dequantized float graph", run(dequantize(src).model, feeds,
                                                              False))):
                mx, cos, snr = _metrics(ref, got)
                print(f"| {name} | {path.stat().st_size} | {what} | {mx:.3g} | {cos:.6f} "
                      f"| {snr:.1f} |")


def build_torch(folder: Path, seq: int) -> dict[str, Path]:
    """float / torchao / pt2e .pt2 files of one small seeded BERT encoder."""
    import torch
    import transformers
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            cfg = transformers.BertConfig(hidden_size=256, num_hidden_layers=4,
                                          num_attention_heads=4, intermediate_size=1024,
                                          vocab_size=2000, attn_implementation="eager")
            self.bert = transformers.BertModel(cfg).eval()

        def forward(self, input_ids):  # noqa: ANN001, ANN202
            return self.bert(input_ids=input_ids).last_hidden_state

    # no attention-mask input: PT2E's prepared program fails on BERT's mask indexing
    # ("tensors used as indices must be long"), seen with torchao 0.18 / executorch's quantizer
    args = (torch.randint(0, 2000, (1, seq), generator=torch.Generator().manual_seed(0)),)
    paths = {k: folder / f"bert_{k}.pt2" for k in ("float", "torchao", "pt2e")}
    torch.export.save(torch.export.export(Encoder().eval(), args), str(paths["float"]))
    ao = Encoder().eval()
    quantize_(ao, Int8WeightOnlyConfig())
    torch.export.save(torch.export.export(ao, args), str(paths["torchao"]))
    quantizer = XNNPACKQuantizer().set_operator_type(
        torch.ops.aten.linear.default, get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(Encoder().eval(), args).module(), quantizer)
    prepared(*args)
    torch.export.save(torch.export.export(convert_pt2e(prepared), args), str(paths["pt2e"]))
    return paths


def torch_sources(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = build_torch(folder, args.seq)
        reports = {}
        for kind, path in paths.items():
            extra = [] if kind == "float" else ["--float-model", str(paths["float"])]
            extra += ["--trust-pickle"] if kind == "torchao" else []
            report = folder / f"{kind}.json"
            proc = subprocess.run([MTCONVERT, str(path), "--to", args.targets, "--out",
                                   str(folder / kind), "--threads", str(args.threads),
                                   "--report-json", str(report), "--no-cache", "-q", *extra],
                                  capture_output=True, text=True)
            if not report.is_file():
                sys.exit(f"{kind}: no report (exit {proc.returncode}): {proc.stderr[-400:]}")
            reports[kind] = (json.loads(report.read_text()), path.stat().st_size)
    float_p50 = {t["name"]: (t.get("latency") or {}).get("p50_ms")
                 for t in reports["float"][0]["targets"]}
    print(f"BERT 4 layers x 256 (random weights), batch 1, sequence {args.seq}, "
          f"{args.threads} threads; source bytes: " + ", ".join(
              f"{k} {b / 1024:.0f} KiB" for k, (_, b) in reports.items()))
    print("| model | target | precision | status | files | vs source | p50 ms | vs ORT "
          "(interleaved, 95% CI) | int8/float p50 | max abs | cosine | SNR dB | int8 tensors "
          "with the source's ints+scales | vs float model: max abs, cosine |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, (report, size) in reports.items():
        for t in report["targets"]:
            v = (t.get("compressed") or {}).get("vs_float") or {}
            w = v.get("worst") or {}
            vf = f"{w['max_abs']:.3g}, {w['cosine']:.6f}" if w else "-"
            print(row(kind if kind != "float" else MODELS[0], t, size,
                      float_p50.get(t["name"])).replace(f"| {MODELS[0]} |", "| float |", 1)
                  + f" {vf} |")
    for kind, (report, _) in reports.items():
        for t in report["targets"]:
            if t["status"] != "passed":
                print(f"{kind}/{t['name']}: {t['status']}: {t.get('reason')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="onnx-mobile,tflite,coreml,ncnn")
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calibrate", action="store_true",
                    help="measure the int8-source profile's margins in ONNX Runtime instead")
    ap.add_argument("--torch", action="store_true",
                    help="quantized PyTorch sources (torchao, PT2E) instead")
    args = ap.parse_args()
    if args.torch:
        torch_sources(args)
        return
    if args.calibrate:
        calibrate(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        reports = {m: run(m, Path(tmp), args) for m in MODELS}
    float_p50 = {t["name"]: (t.get("latency") or {}).get("p50_ms")
                 for t in reports[MODELS[0]]["targets"]}
    print(f"batch 1, sequence {args.seq}, {args.threads} threads; error against each run's own "
          "source (the int8 fixtures: against the quantized source, int8-source profile)")
    print("| model | target | precision | status | files | vs source | p50 ms | vs ORT "
          "(interleaved, 95% CI) | int8/float p50 | max abs | cosine | SNR dB | int8 tensors "
          "with the source's ints+scales |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        source = (ROOT / "fixtures" / f"{model}.onnx").stat().st_size
        for t in reports[model]["targets"]:
            print(row(model, t, source, float_p50.get(t["name"])))
    for model in MODELS:
        for t in reports[model]["targets"]:
            if t["status"] != "passed":
                print(f"{model}/{t['name']}: {t['status']}: {t.get('reason')}")


if __name__ == "__main__":
    main()
