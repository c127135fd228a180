"""Generation (issue 15): per-token decode latency of the decode-step graph with the host's KV
cache (mtconvert.generation.loop) against PyTorch eager on the original Hugging Face model with
its own DynamicCache, side by side, on one random-weight Llama-style model saved as a folder.
The step graph is the onnx-mobile artifact mtconvert writes (.ort, ONNX Runtime, in this
process). The two sides decode the same greedy continuation in alternating rounds (A B A B ...),
each round a whole generation of --new tokens; per side: p50 of each round's per-token median,
and the round-to-round spread (max/min of those medians). Also whether the tokens agree.
Asserts nothing.

With --seq2seq: the encoder-decoder families instead (tiny T5, BART, Marian, Whisper folders of
mtconvert.generation.fixtures): each family converted once to every target that can run here
(both graphs), then every target's generation (encoder artifact, then the step artifact with
its own KV cache, in a child process per target) repeated --rounds times, the targets in
turn within each round; per target: tokens agree, time to first token (encoder + first
step) and decode ms/token p50, each the median over rounds with its spread (min-max).

    .venv/bin/python benchmarks/bench_generation.py [--layers 4] [--hidden 256] [--new 32]
        [--rounds 7] [--threads 2]
    .venv/bin/python benchmarks/bench_generation.py --seq2seq [--families t5,whisper]
        [--targets onnx-mobile,tflite] [--new 16] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def folder(path: Path, layers: int, hidden: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=8,
        num_key_value_heads=2, intermediate_size=hidden * 3, vocab_size=1000,
        max_position_embeddings=256, tie_word_embeddings=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "lm_head" in name:
                p.normal_(0.0, 1.0)
    model.eval().save_pretrained(str(path))
    return path


def eager_decode(model, prompt, new):
    import torch
    from transformers import DynamicCache

    cache, times, tokens = DynamicCache(), [], []
    ids = torch.tensor([list(prompt)])
    with torch.inference_mode():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        tok = int(out.logits[0, -1].argmax())
        tokens.append(tok)
        for _ in range(new - 1):
            t0 = time.perf_counter()
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
            tok = int(out.logits[0, -1].argmax())
            times.append((time.perf_counter() - t0) * 1000.0)
            tokens.append(tok)
    return tokens, times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq2seq", action="store_true", help="the encoder-decoder families")
    ap.add_argument("--families", default="t5,bart,marian,whisper")
    ap.add_argument("--targets", default=None, help="default: every target that runs here")
    args = ap.parse_args()
    if args.seq2seq:
        seq2seq_main(args)
        return

    import onnxruntime as ort
    import torch

    import mtconvert
    from mtconvert.generation import folder as folder_mod, step
    from mtconvert.generation.loop import decode

    torch.set_num_threads(args.threads)
    prompt = (1, 2, 3, 4, 5, 6, 7, 8)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = folder(Path(tmp) / "llama", args.layers, args.hidden)
        report = mtconvert.convert(hf_dir, "onnx-mobile", Path(tmp) / "out", None,
                                   prompt_ids=",".join(map(str, prompt)),
                                   max_new_tokens=args.new, iterations=3, warmup=1,
                                   threads=args.threads, cache=False)
        t = report.targets["onnx-mobile"]
        print(f"mtconvert: {t.status}; generation tokens agree "
              f"{t.generation['tokens_agree']:.0%}, KV cache {t.generation['kv_cache_bytes']} B "
              f"at {t.generation['max_cache']} slots")
        ort_path = next(a.path for a in t.artifacts if a.role == "artifact")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        sess = ort.InferenceSession(ort_path, opts, providers=["CPUExecutionProvider"])
        model = folder_mod.load_model(folder_mod.open_folder(hf_dir, None, False))
        _, geo = step.build(model, t.generation["max_cache"])

        def run(feeds):
            names = [o.name for o in sess.get_outputs()]
            return dict(zip(names, sess.run(None, feeds), strict=True))

        eager_decode(model, prompt, 4)  # warm both sides
        decode(run, geo, prompt, 4)
        sides = {"pytorch eager + DynamicCache": [], "step graph (.ort) + host cache": []}
        agree = True
        for _ in range(args.rounds):
            ref_tokens, times = eager_decode(model, prompt, args.new)
            sides["pytorch eager + DynamicCache"].append(statistics.median(times))
            got = decode(run, geo, prompt, args.new)
            sides["step graph (.ort) + host cache"].append(
                statistics.median(got.step_ms[len(prompt):]))
            agree &= got.tokens == ref_tokens
    print(f"Llama-style {args.layers} layers, hidden {args.hidden}, 8 heads / 2 kv heads, "
          f"vocab 1000; prompt {len(prompt)}, {args.new} new tokens, {args.rounds} rounds "
          f"interleaved, {args.threads} threads")
    for name, meds in sides.items():
        print(f"  {name:34s} decode ms/token p50 {statistics.median(meds):7.3f}  "
              f"(round medians {min(meds):.3f}-{max(meds):.3f}, spread "
              f"{max(meds) / min(meds) - 1:.0%})")
    a, b = (statistics.median(m) for m in sides.values())
    print(f"  ratio step graph / eager: {b / a:.2f}x; greedy tokens identical in every round: "
          f"{agree}")


def seq2seq_main(args: argparse.Namespace) -> None:
    from mtconvert import optspec
    from mtconvert.generation.fixtures import tiny_folder
    from mtconvert.generation.run import Generation
    from mtconvert.registry import default_registry
    from mtconvert.run.convert import run_targets
    from mtconvert.run.skeleton import Run

    reg = default_registry()
    targets = args.targets.split(",") if args.targets else reg.available()
    print(f"encoder-decoder families, 2 layers, d_model 32, vocab 300; {args.new} new tokens, "
          f"{args.rounds} rounds (targets in turn within a round), {args.threads} threads; the "
          "machine is shared with other jobs, so spreads are wide")
    for kind in args.families.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            hf_dir = tiny_folder(kind, Path(tmp) / f"tiny-{kind}")
            values = {"targets": targets, "out_dir": Path(tmp) / "out",
                      "max_new_tokens": args.new, "iterations": 2, "warmup": 0,
                      "threads": args.threads, "jobs": 1}
            if kind != "whisper":
                values["prompt_ids"] = "5,17,42,8,9"
            opts = optspec.build("convert", values)
            with Generation(Run("convert", opts), hf_dir) as gen:
                step_reports, enc_reports = (run_targets(c, targets) for c in gen.contexts)
                rounds = [gen.judged(step_reports, enc_reports) for _ in range(args.rounds)]
        print(f"{kind}: prompt {gen.skeleton.settings['generation']['prompt']}")
        for i, name in enumerate(targets):
            per = [r[i] for r in rounds]
            g = [t.generation or {} for t in per]
            if "steps" not in g[0]:
                print(f"  {name:12s} {per[0].status}: {per[0].reason or g[0]}")
                continue
            print(f"  {name:12s} {per[0].status:7s} tokens agree "
                  f"{min(x['tokens_agree'] for x in g):.0%}  "
                  f"TTFT ms {_spread([x.get('time_to_first_token_ms') for x in g])}  "
                  f"decode ms/token p50 {_spread([x.get('decode_ms_p50') for x in g])}")


def _spread(values: list) -> str:
    if any(v is None for v in values):
        return "   -  (not measured)     "
    return f"{statistics.median(values):7.3f} ({min(values):.3f}-{max(values):.3f})"


if __name__ == "__main__":
    main()
