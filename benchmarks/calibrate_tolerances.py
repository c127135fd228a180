"""Tolerance calibration (issue 6): measured error distributions behind validators/compare.py's
PROFILES. Prints one line per run, then markdown tables for docs/tolerances.md. Asserts nothing:
every number is printed, none is checked; the exit status is 0 whatever the verdicts were.

Zoo: BERT, DistilBERT, ALBERT, RoBERTa, GPT-2 and ViT built from transformers config classes
(2 layers, hidden 64, 4 heads, sequence 24 or 32x32 images), random weights, every bias
randomised to N(0, 0.05) (HF initialises biases to 0, which would hide bias faults), exported to
ONNX. Built once per weight regime:
  hf-init       initializer_range 0.02 (HF's default): attention is near-uniform, so query/key
                weights barely move the output;
  trained-like  initializer_range 0.2: attention as peaked as in trained models (mean max
                softmax probability 0.3-0.5).

1. Correct conversions: every model through every target (--targets) at every precision the
   target supports (the registry's ``precisions``); per run the status and the worst output's
   max abs error, cosine and SNR (dB). Known conversion bugs (KNOWN_BUGS: RoBERTa on ncnn,
   refused by the lint) are not tolerance questions: their rows are kept and listed apart, and
   their failures are left out of the worst-case columns; a known bug that passes counts as
   any other run and is marked in that list.
2. Faults: per model, its ONNX with one single-layer fault in the middle layer (layer 1 of 2),
   validated as an artifact against the clean source (mtconvert.validate, fp32 profile). Every
   fault applies to every architecture; a tensor the exporter shares between nodes (ALBERT's
   repeated layer, LayerNorm gammas deduplicated through Identity) gets a private copy for the
   one node changed:
     Q/K weights +1%     the query projection's weight x (1 + 0.01 N(0,1)) elementwise
                         (GPT-2: the query third of the fused c_attn)
     V/O/FFN weights +1% the FFN-down projection's weight, likewise
     bias zeroed         the value projection's bias (not a key bias: those cancel in softmax)
     heads swapped       heads 0 and 1 of the value projection (weight columns and bias entries;
                         GPT-2: two head blocks within c_attn's value third)
     gamma x1.01         the gamma of one LayerNorm (the layer's first)

    .venv/bin/python benchmarks/calibrate_tolerances.py [--regimes hf-init,trained-like]
        [--targets onnx-mobile,tflite,ncnn,coreml]
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

SEQ = 24
HEADS = 4
REGIMES = {"hf-init": 0.02, "trained-like": 0.2}
FAULTS = ("Q/K weights +1%", "V/O/FFN weights +1%", "bias zeroed", "heads swapped",
          "gamma x1.01")
# (model, target) pairs that fail for a reason other than tolerances; kept, listed apart
# (RoBERTa on coreml failed numerically until onnx2torch's CumSum default was mended.)
KNOWN_BUGS = {("roberta", "ncnn"): "lint: RoBERTa derives position ids from input_ids "
                                   "(CumSum, GatherElements, ...)"}


def zoo(folder: Path, init_range: float) -> dict[str, Path]:
    import torch
    import transformers as tr

    r = dict(initializer_range=init_range)
    small = dict(hidden_size=64, num_attention_heads=HEADS, intermediate_size=128,
                 attn_implementation="eager") | r
    text = {"bert": (tr.BertConfig, tr.BertModel, small | dict(num_hidden_layers=2,
                                                               vocab_size=500)),
            "distilbert": (tr.DistilBertConfig, tr.DistilBertModel,
                           dict(n_layers=2, dim=64, n_heads=HEADS, hidden_dim=128, vocab_size=500,
                                attn_implementation="eager") | r),
            "albert": (tr.AlbertConfig, tr.AlbertModel, small | dict(num_hidden_layers=2,
                                                                     vocab_size=500,
                                                                     embedding_size=32)),
            "roberta": (tr.RobertaConfig, tr.RobertaModel, small | dict(num_hidden_layers=2,
                                                                        vocab_size=500)),
            "gpt2": (tr.GPT2Config, tr.GPT2Model, dict(n_layer=2, n_embd=64, n_head=HEADS,
                                                       vocab_size=500, use_cache=False,
                                                       attn_implementation="eager") | r)}
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (cfg_cls, model_cls, kw) in text.items():
        torch.manual_seed(0)
        model = model_cls(cfg_cls(**kw)).eval()
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


def _shapes(name: str) -> dict[str, str]:
    return {} if name == "vit" else {"input_ids": f"1x{SEQ}"}


def _worst(t) -> dict:  # noqa: ANN001
    """max_abs, cosine and snr_db of a target report's worst output (empty when none ran)."""
    n = t.numerics
    if n is None or not n.worst:
        return {}
    o = n.outputs.get(n.worst.get("output"), {})
    return {"max_abs": o.get("max_abs", n.worst.get("max_abs")),
            "cosine": o.get("cosine", n.worst.get("cosine")), "snr_db": o.get("snr_db")}


def _fmt(m: dict) -> str:
    def g(k: str, spec: str) -> str:
        v = m.get(k)
        return "-" if v is None else format(v, spec)
    return f"max_abs={g('max_abs', '.3g')} cosine={g('cosine', '.9f')} snr_db={g('snr_db', '.1f')}"


def correct_runs(regime: str, models: dict[str, Path], targets: list[str], out: Path) -> list:
    import mtconvert
    from mtconvert.registry import default_registry

    rows = []
    for name, path in models.items():
        for target in targets:
            for precision in default_registry().get(target).precisions:
                t0 = time.monotonic()
                try:
                    rep = mtconvert.convert(path, targets=[target], precision=precision,
                                            out_dir=out / f"{regime}-{name}-{target}-{precision}",
                                            input_shapes=_shapes(name), iterations=1, warmup=0)
                    t = rep.targets[target]
                    status, reason, m = t.status, t.reason, _worst(t)
                except Exception as exc:  # noqa: BLE001  a crash is a result too; go on
                    status, reason, m = "error", f"{type(exc).__name__}: {exc}", {}
                row = dict(regime=regime, model=name, target=target, precision=precision,
                           status=status, reason=reason, known=KNOWN_BUGS.get((name, target)),
                           **m)
                rows.append(row)
                note = " [known bug]" if row["known"] else ""
                why = f" ({(reason or '')[:120]})" if status != "passed" else ""
                print(f"  {regime:12} {name:10} {target:11} {precision:4} {status:7} {_fmt(m)} "
                      f"{time.monotonic() - t0:.0f}s{note}{why}", flush=True)
    return rows


# --- faults --------------------------------------------------------------------------------

_ROLES = {"query": r"/(query|q_lin|q_proj)(_\d+)?/",
          "value": r"/(value|v_lin|v_proj)(_\d+)?/",
          "qkv": r"/c_attn(_\d+)?/",
          "ffn_down": r"/(output/dense|ffn/lin2|mlp/fc2|ffn_output|mlp/c_proj)(_\d+)?/"}


def _role(node_name: str) -> str | None:
    for role, pat in _ROLES.items():
        if re.search(pat, node_name):
            if role == "ffn_down" and "attention/output/dense" in node_name:
                continue
            return role
    return None


def _layer(node_name: str) -> int | None:
    """Transformer layer index from the exporter's node name; ALBERT's one shared layer runs
    twice, its second application's modules carry a _1 suffix."""
    if "albert_layers." in node_name:
        tail = node_name.split("albert_layers.", 1)[1].split("/")[:-1]
        return max([int(m.group(1)) for s in tail if (m := re.search(r"_(\d+)$", s))],
                   default=0)
    m = re.search(r"/(?:layer|layers|h)\.(\d+)/", node_name)
    return int(m.group(1)) if m else None


class _Graph:
    def __init__(self, model) -> None:  # noqa: ANN001
        self.m = model
        self.inits = {i.name: i for i in model.graph.initializer}
        self.ident = {n.output[0]: n.input[0] for n in model.graph.node
                      if n.op_type == "Identity"}

    def init_of(self, name: str) -> str | None:
        """The initializer behind ``name``, through Identity nodes; None for computed tensors."""
        seen = set()
        while name not in self.inits and name in self.ident and name not in seen:
            seen.add(name)
            name = self.ident[name]
        return name if name in self.inits else None

    def edit(self, node, index: int, fn) -> str:  # noqa: ANN001
        """Give ``node`` a private, changed copy of its constant input ``index``: the shared
        original stays with every other consumer. Returns the original initializer's name."""
        from onnx import numpy_helper

        src = self.init_of(node.input[index])
        arr = numpy_helper.to_array(self.inits[src]).copy()
        new = f"{src}__fault"
        self.m.graph.initializer.append(numpy_helper.from_array(fn(arr).astype(arr.dtype), new))
        self.inits[new] = self.m.graph.initializer[-1]
        node.input[index] = new
        if not any(src in n.input for n in self.m.graph.node):
            self.m.graph.initializer.remove(self.inits.pop(src))
        return src


def corrupt(src: Path, kind: str, dst: Path) -> str | None:
    """Write ``src`` with one fault in its middle layer; returns the node changed, None when no
    such tensor was found."""
    import onnx
    from onnx import helper

    m = onnx.load(str(src))
    g = _Graph(m)
    nodes = list(m.graph.node)
    layers = [x for n in nodes if (x := _layer(n.name)) is not None]
    mid = (max(layers) + 1) // 2 if layers else 0
    here = [n for n in nodes if _layer(n.name) == mid]
    rng = np.random.default_rng(0)

    def matmul(role: str):  # noqa: ANN202
        return next((n for n in here if n.op_type in ("MatMul", "Gemm") and _role(n.name) == role
                     and len(n.input) > 1 and g.init_of(n.input[1])), None)

    def out_axis(n) -> int:  # noqa: ANN001  weight axis of the output features
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        return 0 if n.op_type == "Gemm" and attrs.get("transB", 0) else 1

    def bias_of(role: str):  # noqa: ANN202  (node, input index) of the projection's bias
        mm = matmul(role)
        if mm is not None and mm.op_type == "Gemm" and len(mm.input) > 2 \
                and g.init_of(mm.input[2]):
            return mm, 2
        for n in here:
            if n.op_type == "Add" and _role(n.name) == role:
                for i, x in enumerate(n.input):
                    c = g.init_of(x)
                    if c and len(g.inits[c].dims) == 1:
                        return n, i
        return None

    def along(axis: int, sl: slice, fn):  # noqa: ANN001, ANN202  fn on a slice of one axis
        def apply(a: np.ndarray) -> np.ndarray:
            idx = [slice(None)] * a.ndim
            idx[axis] = sl
            a[tuple(idx)] = fn(a[tuple(idx)])
            return a
        return apply

    def third(role_fused: bool, width: int, k: int) -> slice:  # q/k/v third of a fused qkv
        return slice(k * width // 3, (k + 1) * width // 3) if role_fused else slice(None)

    def noise(a: np.ndarray) -> np.ndarray:
        return a * (1 + 0.01 * rng.standard_normal(a.shape))

    def swap_heads(a: np.ndarray) -> np.ndarray:  # heads 0 and 1 of the last axis
        d = a.shape[-1] // HEADS
        b = a.copy()
        b[..., :d], b[..., d:2 * d] = a[..., d:2 * d], a[..., :d]
        return b

    fused = matmul("query") is None and matmul("qkv") is not None
    if kind in ("Q/K weights +1%", "V/O/FFN weights +1%", "heads swapped"):
        role = {"Q/K weights +1%": "query", "V/O/FFN weights +1%": "ffn_down",
                "heads swapped": "value"}[kind]
        qkv = fused and role in ("query", "value")
        n = matmul("qkv" if qkv else role)
        if n is None:
            return None
        ax = out_axis(n)
        width = g.inits[g.init_of(n.input[1])].dims[ax]
        sl = third(qkv, width, 0 if role == "query" else 2)
        if kind == "heads swapped":
            g.edit(n, 1, along(ax, sl, lambda a: np.moveaxis(swap_heads(np.moveaxis(a, ax, -1)),
                                                             -1, ax)))
            b = bias_of("qkv" if qkv else role)
            if b is not None:
                g.edit(b[0], b[1], along(0, sl, swap_heads))
        else:
            g.edit(n, 1, along(ax, sl, noise))
    elif kind == "bias zeroed":
        b = bias_of("qkv" if fused else "value")
        if b is None:
            return None
        n = b[0]
        width = g.inits[g.init_of(n.input[b[1]])].dims[0]
        g.edit(n, b[1], along(0, third(fused, width, 2), np.zeros_like))
    elif kind == "gamma x1.01":
        n = next((n for n in here if n.op_type == "LayerNormalization" and len(n.input) > 1
                  and g.init_of(n.input[1])), None)
        if n is None:
            return None
        g.edit(n, 1, lambda a: a * np.float32(1.01))
    else:
        raise ValueError(kind)
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return n.name


def fault_runs(regime: str, models: dict[str, Path], folder: Path) -> list:
    import mtconvert

    rows = []
    for name, path in models.items():
        for kind in FAULTS:
            bad = folder / f"{name}-{re.sub(r'[^A-Za-z0-9]+', '_', kind)}.onnx"
            where = corrupt(path, kind, bad)
            if where is None:
                rows.append(dict(regime=regime, model=name, kind=kind, status="n/a"))
                print(f"  {regime:12} {name:10} {kind:20} n/a (no such tensor)", flush=True)
                continue
            t0 = time.monotonic()
            try:
                rep = mtconvert.validate(path, [bad], input_shapes=_shapes(name), iterations=1,
                                         warmup=0)
                t = next(iter(rep.targets.values()))
                status, m = t.status, _worst(t)
            except Exception as exc:  # noqa: BLE001
                status, m = f"error: {type(exc).__name__}: {exc}"[:100], {}
            rows.append(dict(regime=regime, model=name, kind=kind, status=status, node=where,
                             **m))
            print(f"  {regime:12} {name:10} {kind:20} {status:7} {_fmt(m)} "
                  f"{time.monotonic() - t0:.0f}s  [{where}]", flush=True)
    return rows


# --- tables --------------------------------------------------------------------------------

def _g(v: float | None, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def tables(correct: list[dict], faults: list[dict], regimes: list[str]) -> None:
    from mtconvert.validators.compare import PROFILES

    def excused(r: dict) -> bool:
        return bool(r["known"]) and r["status"] != "passed"

    print("\n### Correct conversions (metrics of the worst output; failures of known conversion "
          "bugs are counted in runs but left out of the worst-case columns)\n")
    print("| regime | precision | runs | passed | worst max abs (where) | lowest cosine "
          "| lowest SNR dB (where) | profile |")
    print("|---|---|---|---|---|---|---|---|")
    for regime in regimes:
        for p in ("fp32", "fp16", "int8"):
            runs = [r for r in correct if r["regime"] == regime and r["precision"] == p]
            if not runs:
                continue
            passed = sum(r["status"] == "passed" for r in runs)
            bugs = sum(excused(r) for r in runs)
            clean = [r for r in runs if not excused(r)]
            ma = [r for r in clean if r.get("max_abs") is not None]
            co = [r for r in clean if r.get("cosine") is not None]
            sn = [r for r in clean if r.get("snr_db") is not None]
            w = max(ma, key=lambda r: r["max_abs"], default=None)
            c = min(co, key=lambda r: r["cosine"], default=None)
            s = min(sn, key=lambda r: r["snr_db"], default=None)
            pr = PROFILES[p]
            print(f"| {regime} | {p} | {len(runs)} | {passed}"
                  + (f" (+{bugs} known-bug failures)" if bugs else "") + " | "
                  + (f"{w['max_abs']:.3g} ({w['model']}/{w['target']})" if w else "-") + " | "
                  + (f"{c['cosine']:.9f} (1-cos {1 - c['cosine']:.2g})" if c else "-") + " | "
                  + (f"{s['snr_db']:.1f} ({s['model']}/{s['target']})" if s else "-") + " | "
                  + f"atol={pr.atol} rtol={pr.rtol} min_cosine={pr.min_cosine} "
                    f"min_snr_db={pr.min_snr_db} |")

    bugs = [r for r in correct if r["known"]]
    print("\n### Known conversion bugs (not tolerance questions)\n")
    print("| regime | model | target | precision | status | max abs | cosine | SNR dB | reason |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in bugs:
        print(f"| {r['regime']} | {r['model']} | {r['target']} | {r['precision']} | "
              f"{r['status']} | {_g(r.get('max_abs'))} | {_g(r.get('cosine'), '.6f')} | "
              f"{_g(r.get('snr_db'), '.1f')} | "
              + ((r["reason"] or "")[:100] if excused(r) else "passed: no longer fails?")
              + " |")
    bad = [r for r in correct if not r["known"] and r["status"] != "passed"]
    print(f"\nOther correct conversions not passed: {len(bad)}"
          + "".join(f"\n- {r['regime']} {r['model']}/{r['target']}/{r['precision']}: "
                    f"{r['status']}, {_fmt(r)}: {(r['reason'] or '')[:200]}" for r in bad))

    print("\n### Single-layer faults, validated against the clean source under the fp32 "
          "profile\n")
    print("| regime | fault | applied | caught (fp32) | smallest effect (highest SNR): max abs "
          "| SNR dB | model |")
    print("|---|---|---|---|---|---|---|")
    for regime in regimes:
        for kind in FAULTS:
            rows = [r for r in faults if r["regime"] == regime and r["kind"] == kind]
            applied = [r for r in rows if r["status"] != "n/a"]
            caught = sum(r["status"] == "failed" for r in applied)
            # the smallest effect: highest SNR (smallest relative L2), else smallest max abs
            small = min((r for r in applied if r.get("max_abs") is not None),
                        key=lambda r: (-(r.get("snr_db") or float("inf")), r["max_abs"]),
                        default=None)
            print(f"| {regime} | {kind} | {len(applied)}/{len(rows)} | {caught}/{len(applied)} | "
                  + (f"{small['max_abs']:.3g} | {_g(small.get('snr_db'), '.1f')} | "
                     f"{small['model']} |" if small else "- | - | - |"))
    missed = [r for r in faults if r["status"] not in ("failed", "n/a")]
    print(f"\nFaults not caught: {len(missed)}"
          + "".join(f"\n- {r['regime']} {r['model']} {r['kind']}: {r['status']}, {_fmt(r)} "
                    f"[{r.get('node')}]" for r in missed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regimes", default=",".join(REGIMES),
                    help=f"comma-separated, of {', '.join(REGIMES)} "
                         "(or an initializer_range value)")
    ap.add_argument("--targets", default="onnx-mobile,tflite,ncnn,coreml")
    args = ap.parse_args()
    regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
    ranges = {r: REGIMES[r] if r in REGIMES else float(r) for r in regimes}
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mtconvert-calibrate-") as tmp:
        folder = Path(tmp)
        os.environ.setdefault("MTCONVERT_CACHE_DIR", str(folder / "cache"))
        correct, faults = [], []
        for regime, init_range in ranges.items():
            print(f"== regime {regime} (initializer_range {init_range})", flush=True)
            models = zoo(folder / regime, init_range)
            print("Correct conversions:", flush=True)
            correct += correct_runs(regime, models, targets, folder / "out")
            print("Faults (validated against the clean source at fp32):", flush=True)
            faults += fault_runs(regime, models, folder / regime)
        tables(correct, faults, regimes)
    print(f"\nwall time {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
