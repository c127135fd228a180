"""Localization benchmark (issue 6): intermediate-tensor matching against bisection over
re-converted subgraphs, on the same failure, in one process, side by side.

Case 1: onnx2tf's equal-size trap (the distilled BERT fixture at sequence 32 == hidden 32 gives
wrong TFLite logits): the same conversion run localized both ways (bisection forced by
switching TfliteBackend.addressable_intermediates off).
Case 2: the 6-layer, 384-wide BERT of bench_tflite.py at sequence 128 converted to TFLite and
ncnn, then validated against a copy of its ONNX with one FFN weight of layer 3 perturbed by 1%:
what intermediate matching names, and how long it takes (bisection cannot run in validate mode).

    .venv/bin/python benchmarks/bench_localize.py
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tflite import build_bert  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _line(label: str, t, seconds: float) -> None:  # noqa: ANN001
    d = t.diagnostics or {}
    first = d.get("first_divergence") or {}
    print(f"| {label} | {t.status} | {first.get('op_type')} {first.get('node')} | "
          f"{d.get('exact')} | {d.get('probes', '-')} | {d.get('seconds')} | {seconds:.1f} |",
          flush=True)


def trap_case(tmp: Path) -> None:
    import mtconvert
    from mtconvert.backends.tflite import TfliteBackend

    src = FIXTURES / "bert_distilled.onnx"
    for method, addressable in (("intermediates", True), ("bisection", False)):
        TfliteBackend.addressable_intermediates = addressable
        t0 = time.perf_counter()
        rep = mtconvert.convert(src, targets=["tflite"], out_dir=tmp / method, iterations=1,
                                warmup=0, input_shapes={"input_ids": "1x32"})
        _line(f"trap, tflite, {method}", rep.targets["tflite"], time.perf_counter() - t0)
    TfliteBackend.addressable_intermediates = True


def perturbed_case(tmp: Path, seq: int = 128) -> None:
    import onnx
    from onnx import numpy_helper

    import mtconvert

    clean = tmp / "bert6.onnx"
    build_bert(clean, seq)
    shapes = {"input_ids": f"1x{seq}"}
    rep = mtconvert.convert(clean, targets=["tflite", "ncnn"], out_dir=tmp / "bert6",
                            iterations=1, warmup=0, input_shapes=shapes)
    model = onnx.load(str(clean))
    inits = {i.name: i for i in model.graph.initializer}
    node, name = next((n, x) for n in model.graph.node if n.op_type == "MatMul"
                      and "layer.3/intermediate" in n.name for x in n.input if x in inits)
    w = numpy_helper.to_array(inits[name])
    noise = 1 + 0.01 * np.random.default_rng(0).standard_normal(w.shape)
    inits[name].CopyFrom(numpy_helper.from_array((w * noise).astype(w.dtype), name))
    bad = tmp / "bert6_perturbed.onnx"
    onnx.save(model, str(bad))
    print(f"\nperturbed: {node.name} (weights x (1 + 0.01 N(0,1)))")
    for target in ("tflite", "ncnn"):
        art = next(Path(a.path) for a in rep.targets[target].artifacts
                   if a.path.endswith((".tflite", ".param")))
        t0 = time.perf_counter()
        val = mtconvert.validate(bad, [art], iterations=1, warmup=0, localize=True)
        _line(f"6-layer BERT seq {seq}, {target}, validate", val.targets[target],
              time.perf_counter() - t0)


def main() -> None:
    print("| case | status | first divergence | exact | probes | localize s | run s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-localize-") as tmp:
        trap_case(Path(tmp))
        perturbed_case(Path(tmp))


if __name__ == "__main__":
    main()
