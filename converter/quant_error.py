"""Per-layer quantization error of a failing int8 artifact: which layers add the most error, so
the user knows which to keep in float.

It reuses the localization's machinery (mtconvert.localize, mtconvert.trace): one worker run
dumps the target's intermediate tensors, ONNX Runtime computes every float tensor of the source
graph (the float reference), and each weight layer's output (MatMul, Gemm, Conv, ...) is matched
by value to its closest target tensor. A layer's error is its output's relative error
(‖target − source‖ / ‖source‖); what the layer *adds* is that minus the largest error among the
tensors it reads, so error carried in from earlier layers is not charged to it. The layers are
listed by what they add, largest first (``TOP``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mtconvert.errors import MtConvertError

WEIGHT_LAYERS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulInteger"})
# a target fuses these into the layer before them (FULLY_CONNECTED with a fused ReLU): the
# layer's output is then observable only after them
FUSED = frozenset({"Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "Add"})
TOP = 5


def layers(ctx: Any, backend: Any, artifact: Any) -> dict[str, Any]:
    """``{"layers": [...], "method"}`` or ``{"unavailable": why}``; never raises."""
    from mtconvert import localize, trace

    if not type(backend).addressable_intermediates:
        return {"unavailable": f"{backend.name}'s intermediate tensors are not addressable"}
    if not Path(ctx.src.onnx_path).is_file():
        return {"unavailable": "no source graph to compare with"}
    try:
        target, _ = localize.target_tensors(ctx, backend, artifact)
        source = trace.source_tensors(ctx.src.onnx_path, ctx.feeds, ctx.opts.threads)
    except (MtConvertError, OSError, ValueError) as exc:
        return {"unavailable": f"intermediate tensors unavailable: {exc}"}
    errors = _errors(source, target, lambda n: ctx.opts.tolerances.resolve("int8", n))
    ranked = sorted((e for e in errors if e["op_type"] in WEIGHT_LAYERS),
                    key=lambda e: -e["added"])
    return {"method": "the target's tensors against the float source's, matched by value",
            "weight_layers": len(ranked), "layers": ranked[:TOP]}


def _errors(source: list[Any], target: list[Any], tol_for: Any) -> list[dict[str, Any]]:
    """Each source tensor's relative error at its closest target tensor (None: no same-size
    tensor), and what its node adds to its inputs' error."""
    from mtconvert import trace

    by_size: dict[int, list[tuple[float, Any]]] = {}
    for t in target:
        by_size.setdefault(t.value.size, []).append((trace._norm(t.value), t))
    rel, best = [], []
    for s in source:
        cands = by_size.get(s.value.size, [])
        best.append(trace._best(s, cands, tol_for(s.name), exhaustive=True)[1] if cands else {})
        rel.append(_relative(s, best[-1], {t.name: t for _, t in cands}))
    children: dict[int, list[int]] = {}
    for i, s in enumerate(source):
        for p in s.parents:
            children.setdefault(p, []).append(i)
    out = []
    for i, s in enumerate(source):
        err, at = rel[i], i
        kids = children.get(i, [])
        if len(kids) == 1 and source[kids[0]].op_type in FUSED and rel[kids[0]] is not None \
                and (err is None or rel[kids[0]] < err):  # observed after a fused activation
            err, at = rel[kids[0]], kids[0]
        if err is None:
            continue
        carried = max((rel[p] for p in s.parents if rel[p] is not None), default=0.0)
        out.append({"node": s.op, "op_type": s.op_type, "output": source[at].name,
                    "relative_error": round(err, 6), "added": round(err - carried, 6),
                    "cosine": best[at].get("cosine"), "target": best[at].get("target")})
    return out


def _relative(src: Any, best: dict[str, Any], by_name: dict[str, Any]) -> float | None:
    """‖target − source‖ / ‖source‖ for the closest target tensor (in the source's layout)."""
    from mtconvert import trace

    cand = by_name.get(best.get("target"))
    if cand is None:
        return None
    ref = src.value.astype(np.float64)
    norm = float(np.linalg.norm(ref))
    if not norm:
        return None
    return min(float(np.linalg.norm(v.astype(np.float64) - ref)) / norm
               for v in trace._views(src.value, cand.value))
