"""ExecuTorch benchmark (issue 16): the .pte's p50 latency next to ONNX Runtime's on a 6-layer,
384-wide BERT encoder (transformers.BertConfig, random weights, 12 heads, intermediate 1536),
batch 1, sequence 128, 2 threads, at fp32 and int8.

Each precision is converted once by mtconvert (ONNX source, the onnx2torch route, XNNPACK
lowering); then ``--repeats`` runs of mtconvert's own latency protocol time the .pte in
ExecuTorch's runtime against ONNX Runtime on the source ONNX (fp32), each in its own warm child,
in alternating rounds (converter/run/timing.py, validators/latency.interleaved). Every repeat
prints both p50s, the ratio with its 95 % interval, and how much each side moved from round to
round (spread); the last line per precision gives the range of the ratio over the repeats.

    .venv/bin/python benchmarks/bench_executorch.py [--seq 128] [--threads 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


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
    torch.onnx.export(Encoder().eval(), (ids, mask), str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"])


def one_run(onnx_path: Path, out: Path, precision: str, args: argparse.Namespace):  # noqa: ANN201
    import mtconvert

    report = mtconvert.convert(onnx_path, targets=["executorch"], out_dir=out,
                               precision=precision, threads=args.threads,
                               iterations=args.iterations, warmup=3)
    return report.targets["executorch"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precisions", default="fp32,int8")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-executorch-"))
    os.environ["MTCONVERT_CACHE_DIR"] = str(tmp / "cache")  # repeats reuse the conversion
    try:
        onnx_path = tmp / "bert6.onnx"
        build_bert(onnx_path, args.seq)
        print(f"BERT 6 layers x 384 (12 heads, intermediate 1536), batch 1, sequence "
              f"{args.seq}, {args.threads} threads; .pte in ExecuTorch's runtime vs ONNX "
              "Runtime CPU (fp32) on the source ONNX, timed interleaved")
        for precision in args.precisions.split(","):
            ratios = []
            for repeat in range(1, args.repeats + 1):
                t0 = time.perf_counter()
                t = one_run(onnx_path, tmp / f"out-{precision}", precision, args)
                took = time.perf_counter() - t0
                if repeat == 1:
                    worst = (t.numerics.worst or {}) if t.numerics else {}
                    print(f"\n{precision}: status {t.status}"
                          f"{' (' + t.reason + ')' if t.reason else ''}; conversion "
                          f"{t.conversion.seconds:.1f} s; max abs vs ONNX Runtime "
                          f"{worst.get('max_abs', float('nan')):.2e}; "
                          f"{Path(t.artifacts[0].path).name if t.artifacts else '-'} "
                          f"{t.artifacts[0].bytes / 1e6 if t.artifacts else 0:.1f} MB")
                vs = t.latency_vs_reference or {}
                if "ratio_p50" not in vs:
                    print(f"  repeat {repeat}: no interleaved timing ({vs.get('error')})")
                    continue
                ratios.append(vs["ratio_p50"])
                print(f"  repeat {repeat}: ONNX Runtime p50 {vs['reference_p50_ms']:7.2f} ms | "
                      f".pte p50 {vs['target_p50_ms']:7.2f} ms | ratio {vs['ratio_p50']:.2f}x "
                      f"(95% {vs['ci95'][0]:.2f}-{vs['ci95'][1]:.2f}, {vs['rounds']} rounds "
                      f"x {vs['per_round']}) | spread ORT {vs['reference_spread']:.0%}, "
                      f".pte {vs['target_spread']:.0%}{' NOISY' if vs['noisy'] else ''} "
                      f"[{took:.0f} s]")
            if ratios:
                print(f"  {precision}: .pte/ONNX Runtime ratio over {len(ratios)} repeats: "
                      f"{min(ratios):.2f}x-{max(ratios):.2f}x (median "
                      f"{sorted(ratios)[len(ratios) // 2]:.2f}x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
