"""First-divergence localization: which operator of the source graph is the first whose output
the target computes wrongly?

Where the target's intermediate tensors are addressable (``Backend.addressable_intermediates``),
one run of each side is matched by value (mtconvert.trace): seconds, and no re-conversion, so it
works on artifacts built elsewhere too. Otherwise, bisection over the source graph's float
tensors in topological order: a probe cuts the graph at one tensor (onnx.utils.Extractor),
converts that subgraph with the same backend, runs it in the isolated worker and compares it
with ONNX Runtime on the same subgraph and inputs, under the run's tolerance profile. It assumes
that once a value diverges, later ones do too (true of a broken layer feeding the rest); each
probe is a full conversion, so it stops after MAX_PROBES.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mtconvert.backends.base import Artifact, Backend, import_path
from mtconvert.errors import MtConvertError, RuntimeUnavailable
from mtconvert.validators import compare

if TYPE_CHECKING:
    from mtconvert.run.context import RunContext

MAX_PROBES = 12
_FLOAT = 1  # onnx.TensorProto.FLOAT


def candidates(model: Any) -> list[tuple[str, str, str]]:
    """(node name, op type, float output) in topological order, excluding graph outputs.
    ``model`` must carry inferred value_info (onnx.shape_inference.infer_shapes)."""
    floats = {v.name for v in list(model.graph.value_info) + list(model.graph.output)
              if v.type.tensor_type.elem_type == _FLOAT}
    final = {o.name for o in model.graph.output}
    return [(n.name or n.output[0], n.op_type, n.output[0]) for n in model.graph.node
            if n.output and n.output[0] in floats and n.output[0] not in final
            and n.op_type not in ("Constant", "Identity")]


def localize(ctx: RunContext, backend: Backend, artifact: Artifact, profile: str, *,
             converted: bool, nonfinite_outputs: bool = False) -> dict[str, Any]:
    """Diagnostics for the report: by intermediate tensors where the target has them, else by
    bisection (which re-converts, so needs a conversion run). Where the outputs hold NaN/Inf,
    the target's tensors also name the first op that produced them (no source graph needed)."""
    from mtconvert import trace

    has_source = Path(ctx.src.onnx_path).is_file()  # verify mode: a bundle carries none
    target, found = None, {}
    why_not = "the target's intermediate tensors are not addressable"
    if type(backend).addressable_intermediates and (has_source or nonfinite_outputs):
        try:
            target, found = target_tensors(ctx, backend, artifact)
        except (MtConvertError, OSError, ValueError) as exc:
            why_not = f"intermediate tensors unavailable: {exc}"
    if target is not None and nonfinite_outputs and (op := trace.first_nonfinite(target)):
        found["first_nonfinite_op"] = op
    if not has_source:
        return found | {"result": "not localized: no source graph to compare intermediate "
                                  "tensors with"}
    if target is not None:
        try:
            return found | trace.localize(
                ctx.src.onnx_path, ctx.feeds, target,
                lambda name: ctx.opts.tolerances.resolve(profile, name), ctx.opts.threads)
        except (MtConvertError, OSError, ValueError) as exc:
            why_not = f"source tensors unavailable: {exc}"
    if not converted:
        return found | {"result": f"not localized: {why_not}, and bisection needs a conversion "
                                  "run"}
    return found | bisect(ctx, backend, artifact.precision) | {"why_bisection": why_not}


def target_tensors(ctx: RunContext, backend: Backend,
                   artifact: Artifact) -> tuple[list[Any], dict[str, Any]]:
    """The target's intermediate tensors on the run's feeds (one worker run), and a note when
    the dump limit cut them short."""
    from mtconvert import trace
    from mtconvert.worker import run_session

    with tempfile.TemporaryDirectory(prefix="mtconvert-trace-") as tmp:
        folder = Path(tmp)
        run_session(name=backend.name, backend=import_path(type(backend)),
                    artifact=artifact.to_dict(), feeds=ctx.target_feeds, threads=ctx.opts.threads,
                    warmup=0, iterations=1, timeout_s=ctx.opts.timeout_s, intermediates=folder)
        index = json.loads((folder / "index.json").read_text())
        if "unavailable" in index:
            raise RuntimeUnavailable(index["unavailable"], target=backend.name)
        with np.load(folder / "tensors.npz") as data:
            target = [trace.Tensor(n, n, t, data[f"t{i}"])
                      for i, (n, t) in enumerate(index["tensors"])]
    note = {"note": "the target's tensors exceeded the dump limit; later ones not compared"}
    return target, note if index.get("truncated") else {}


def bisect(ctx: RunContext, backend: Backend, precision: str) -> dict[str, Any]:
    import onnx

    t0 = time.perf_counter()
    model = onnx.shape_inference.infer_shapes(onnx.load(str(ctx.src.onnx_path)))
    cands = candidates(model)
    if not cands:
        return {"method": "bisection", "result": "no intermediate float tensors to probe"}

    lo, hi, history = 0, len(cands) - 1, []
    with tempfile.TemporaryDirectory(prefix="mtconvert-localize-") as tmp:
        while lo <= hi and len(history) < MAX_PROBES:
            mid, verdict = _conclusive(ctx, backend, model, cands, (lo + hi) // 2, hi,
                                       Path(tmp), precision, history)
            if verdict is None or verdict["diverged"]:
                hi = (lo + hi) // 2 - 1
            else:
                lo = mid + 1
    return _summary(cands, history) | {
        "method": "bisection over converted subgraphs", "probes": len(history),
        "candidates": len(cands), "seconds": round(time.perf_counter() - t0, 1),
        "history": history}


def _summary(cands: list, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The first conclusively diverging node after the last matching one, and the bracket."""
    matches = [h["index"] for h in history if h["verdict"] == "matches"]
    last_match = max(matches, default=-1)
    diverged = [h for h in history if h["verdict"] == "diverged" and h["index"] > last_match]
    if not diverged:
        return {"result": "every conclusive probe matches; the divergence is after the last "
                          "probed operator or in a part no subgraph could isolate"}
    first = min(diverged, key=lambda h: h["index"])
    unresolved = first["index"] - last_match - 1
    node, op, tensor = cands[first["index"]]
    return {"first_divergence": {"node": node, "op_type": op, "output": tensor,
                                 "max_abs": first.get("max_abs"), "cosine": first.get("cosine")},
            "last_match": cands[last_match][0] if last_match >= 0 else None,
            "unresolved_between": unresolved, "exact": unresolved == 0}


INCONCLUSIVE_STEPS = 3


def _conclusive(ctx: RunContext, backend: Backend, model: Any, cands: list, start: int, hi: int,
                tmp: Path, precision: str, history: list) -> tuple[int, dict | None]:
    """Probe ``start``; when its subgraph cannot be converted or run, the next candidates."""
    for k in range(start, min(hi, start + INCONCLUSIVE_STEPS - 1) + 1):
        verdict = _probe(ctx, backend, model, cands[k], tmp / f"p{len(history)}", precision)
        history.append({"index": k, "node": cands[k][0], "op_type": cands[k][1],
                        "verdict": "inconclusive" if verdict is None else
                        ("diverged" if verdict["diverged"] else "matches")}
                       | ({} if verdict is None else {"max_abs": verdict["max_abs"],
                                                      "cosine": verdict["cosine"]}))
        if verdict is not None:
            return k, verdict
    return start, None


def _probe(ctx: RunContext, backend: Backend, model: Any, cand: tuple[str, str, str],
           folder: Path, precision: str) -> dict[str, Any] | None:
    import onnx

    from mtconvert.reference import open_reference
    from mtconvert.source import describe_onnx
    from mtconvert.worker import run_session

    folder.mkdir(parents=True)
    path = folder / f"{ctx.src.name}.onnx"
    names = [i.name for i in model.graph.input
             if i.name not in {t.name for t in model.graph.initializer}]
    try:
        sub = onnx.utils.Extractor(model).extract_model(names, [cand[2]])
        onnx.save(sub, str(path))
        inputs, outputs = describe_onnx(sub)
        src = replace(ctx.src, onnx_path=path, inputs=inputs, outputs=outputs,
                      torch_module=None, format="onnx", work_dir=folder,
                      input_shapes={s.name: ctx.src.input_shapes[s.name] for s in inputs})
        feeds = {s.name: ctx.feeds[s.name] for s in inputs}
        once = replace(ctx.opts, warmup=0, iterations=1)
        ref = open_reference(src, feeds, once).outputs
        art = backend.convert(src, folder, ctx.opts.target_options(precision=precision))
        result = run_session(name=backend.name, backend=import_path(type(backend)),
                             artifact=art.to_dict(), feeds=feeds, threads=ctx.opts.threads,
                             warmup=0, iterations=1, timeout_s=ctx.opts.timeout_s)
    except (MtConvertError, ValueError, RuntimeError, KeyError):
        return None
    tol = ctx.opts.tolerances.resolve(precision, cand[2])
    res = compare.compare_output(cand[2], np.asarray(ref[cand[2]]),
                                 result.outputs.get(cand[2]), tol)
    return {"diverged": not res.passed, "max_abs": res.metrics.get("max_abs"),
            "cosine": res.metrics.get("cosine"), "reason": res.reason}



