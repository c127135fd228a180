"""Tolerance calibration (issue 6): measured error distributions behind validators/compare.py's
PROFILES. Prints a table; commit it to docs/tolerances.md. Asserts nothing.

1. Correct conversions: a zoo of Transformers built from transformers config classes with random
   weights (BERT, DistilBERT, ALBERT, RoBERTa, GPT-2, ViT) through every available target at
   every precision it supports; the worst max-abs error and cosine per target and precision.
2. Corrupted artifacts: per model, the ONNX itself with one deliberate fault (one weight matrix
   perturbed by 1%, one bias zeroed, two attention heads swapped, one LayerNorm gamma x1.01),
   validated as an artifact against the clean source: the fp32 profile must fail every one.

    .venv/bin/python benchmarks/calibrate_tolerances.py [--targets onnx-mobile,tflite,ncnn]
"""
from __future__ import annotations

import argparse
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

SEQ = 24


def zoo(folder: Path) -> dict[str, Path]:
    import torch
    import transformers as tr

    small = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                 attn_implementation="eager")
    text = {"bert": (tr.BertConfig, tr.BertModel, dict(num_hidden_layers=2, vocab_size=500)),
            "distilbert": (tr.DistilBertConfig, tr.DistilBertModel,
                           dict(n_layers=2, dim=64, n_heads=4, hidden_dim=128, vocab_size=500,
                                attn_implementation="eager")),
            "albert": (tr.AlbertConfig, tr.AlbertModel, dict(num_hidden_layers=2, vocab_size=500,
                                                             embedding_size=32)),
            "roberta": (tr.RobertaConfig, tr.RobertaModel, dict(num_hidden_layers=2,
                                                                vocab_size=500)),
            "gpt2": (tr.GPT2Config, tr.GPT2Model, dict(n_layer=2, n_embd=64, n_head=4,
                                                       vocab_size=500, use_cache=False,
                                                       attn_implementation="eager"))}
    out = {}
    for name, (cfg_cls, model_cls, kw) in text.items():
        torch.manual_seed(0)
        cfg_kw = kw if name in ("distilbert", "gpt2") else small | kw
        model = model_cls(cfg_cls(**cfg_kw)).eval()
        out[name] = _export(model, name, folder, with_mask=name != "gpt2")
    torch.manual_seed(0)
    vit = tr.ViTModel(tr.ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2,
                                   **small)).eval()
    out["vit"] = _export(vit, "vit", folder, image=True)
    return out


def _export(model, name, folder: Path, with_mask=True, image=False) -> Path:  # noqa: ANN001
    import torch

    with torch.no_grad():  # HF initialises biases to 0: zeroing one would be no fault at all
        for pname, param in model.named_parameters():
            if pname.endswith("bias"):
                param.normal_(0.0, 0.05)

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, *args):  # noqa: ANN002, ANN202
            names = ["pixel_values"] if image else ["input_ids", "attention_mask"][:len(args)]
            return self.m(**dict(zip(names, args))).last_hidden_state

    path = folder / f"{name}.onnx"
    if image:
        args, names = (torch.randn(1, 3, 32, 32),), ["pixel_values"]
        axes = {"pixel_values": {0: "batch"}}
    else:
        ids = torch.randint(0, 500, (1, SEQ))
        args = (ids, torch.ones_like(ids)) if with_mask else (ids,)
        names = ["input_ids", "attention_mask"][:len(args)]
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
    if name == "gpt2":  # transformers 5 calls torch.diff on position ids without a mask
        inner = model.forward
        model.forward = lambda input_ids: inner(input_ids=input_ids,  # type: ignore[method-assign]
                                                attention_mask=torch.ones_like(input_ids))
    torch.onnx.export(Wrap().eval(), args, str(path), input_names=names,
                      output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17,
                      dynamo=False)
    return path


def correct_runs(models: dict[str, Path], targets: list[str], out: Path) -> list[tuple]:
    import mtconvert
    from mtconvert.registry import default_registry

    rows = []
    for name, path in models.items():
        for target in targets:
            for precision in default_registry().get(target).precisions:
                shapes = {} if name == "vit" else {"input_ids": f"1x{SEQ}"}
                rep = mtconvert.convert(path, targets=[target], precision=precision,
                                        out_dir=out / f"{name}-{target}-{precision}",
                                        input_shapes=shapes, iterations=1, warmup=0)
                t = rep.targets[target]
                worst = (t.numerics.worst if t.numerics else None) or {}
                rows.append((name, target, precision, t.status, worst.get("max_abs"),
                             worst.get("cosine")))
                print(f"  {name:10} {target:11} {precision:4} {t.status:7} "
                      f"max_abs={worst.get('max_abs')} cosine={worst.get('cosine')}", flush=True)
    return rows


def corrupt(src: Path, kind: str, dst: Path) -> bool:
    """Write ``src`` with one fault; False when this architecture has no such tensor."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    inits = {i.name: i for i in m.graph.initializer}
    consumers = [(n, x) for n in m.graph.node for x in n.input if x in inits]
    rng = np.random.default_rng(0)

    def edit(name: str, fn) -> None:  # noqa: ANN001
        arr = numpy_helper.to_array(inits[name]).copy()
        inits[name].CopyFrom(numpy_helper.from_array(fn(arr).astype(arr.dtype), name))

    mats = [x for n, x in consumers if n.op_type in ("MatMul", "Gemm")
            and inits[x].dims and len(inits[x].dims) == 2]
    biases = [x for n, x in consumers if n.op_type == "Add" and len(inits[x].dims) == 1
              and "bias" in x]
    gammas = [n.input[1] for n in m.graph.node if n.op_type == "LayerNormalization"
              and n.input[1] in inits]
    values = [x for n, x in consumers if n.op_type == "MatMul" and
              any(k in n.name for k in ("value", "v_lin"))]
    if kind == "weights+1%" and mats:
        edit(mats[len(mats) // 2], lambda a: a * (1 + 0.01 * rng.standard_normal(a.shape)))
    elif kind == "bias zeroed" and biases:
        edit(biases[len(biases) // 2], np.zeros_like)
    elif kind == "heads swapped" and values:
        def swap(a: np.ndarray) -> np.ndarray:
            d = a.shape[1] // 4
            b = a.copy()
            b[:, :d], b[:, d:2 * d] = a[:, d:2 * d], a[:, :d]
            return b
        edit(values[0], swap)
    elif kind == "gamma x1.01" and gammas:
        edit(gammas[len(gammas) // 2], lambda a: a * 1.01)
    else:
        return False
    onnx.save(m, str(dst))
    return True


def corrupted_runs(models: dict[str, Path], folder: Path) -> list[tuple]:
    import mtconvert

    rows = []
    for name, path in models.items():
        for kind in ("weights+1%", "bias zeroed", "heads swapped", "gamma x1.01"):
            bad = folder / f"{name}-{kind.replace(' ', '_').replace('%', 'pc')}.onnx"
            if not corrupt(path, kind, bad):
                rows.append((name, kind, "n/a", None, None))
                continue
            shapes = {} if name == "vit" else {"input_ids": f"1x{SEQ}"}
            rep = mtconvert.validate(path, [bad], input_shapes=shapes, iterations=1, warmup=0)
            t = next(iter(rep.targets.values()))
            w = (t.numerics.worst if t.numerics else None) or {}
            rows.append((name, kind, t.status, w.get("max_abs"), w.get("cosine")))
            print(f"  {name:10} {kind:14} {t.status:7} max_abs={w.get('max_abs')} "
                  f"cosine={w.get('cosine')}", flush=True)
    return rows


def table(correct: list[tuple], corrupted: list[tuple]) -> None:
    from mtconvert.validators.compare import PROFILES

    by = defaultdict(list)
    for name, target, precision, status, max_abs, cos in correct:
        by[precision].append((max_abs, cos, status, f"{name}/{target}"))
    print("\n| precision | runs | passed | worst max abs (where) | lowest cosine | profile |")
    print("|---|---|---|---|---|---|")
    for p in ("fp32", "fp16", "int8"):
        rows = [r for r in by.get(p, []) if r[0] is not None]
        if not rows:
            continue
        worst = max(rows, key=lambda r: r[0])
        low = min(r[1] for r in rows)
        passed = sum(r[2] == "passed" for r in by[p])
        prof = PROFILES[p]
        print(f"| {p} | {len(by[p])} | {passed} | {worst[0]:.3g} ({worst[3]}) | {low:.6f} | "
              f"atol={prof.atol} rtol={prof.rtol} min_cosine={prof.min_cosine} |")
    applied = [r for r in corrupted if r[2] != "n/a"]
    caught = sum(r[2] == "failed" for r in applied)
    smallest = min((r for r in applied if r[3] is not None), key=lambda r: r[3], default=None)
    print(f"\nCorrupted artifacts under the fp32 profile: {caught}/{len(applied)} failed"
          + (f"; smallest fault effect: max abs {smallest[3]:.3g}, cosine {smallest[4]:.6f} "
             f"({smallest[0]}, {smallest[1]})" if smallest else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--targets", default="onnx-mobile,tflite,ncnn")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mtconvert-calibrate-") as tmp:
        folder = Path(tmp)
        os.environ.setdefault("MTCONVERT_CACHE_DIR", str(folder / "cache"))
        models = zoo(folder)
        print("Correct conversions:")
        correct = correct_runs(models, args.targets.split(","), folder / "out")
        print("Corrupted artifacts (validated against the clean source at fp32):")
        corrupted = corrupted_runs(models, folder)
        table(correct, corrupted)


if __name__ == "__main__":
    main()
