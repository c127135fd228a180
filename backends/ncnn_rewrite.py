"""ONNX legalization for ncnn, run in a child process through onnx_tools ("ncnn-prepare").

ncnn has no boolean logic, Where or int->float Cast layers, so HF's attention-mask preparation
(int mask -> bool -> where(finfo.min)) converts to a .param ncnn cannot load. The rewrite
replaces every tensor that depends only on a mask input and feeds the main graph with the
additive float bias ``(1 - mask) * -1e4`` of shape [b, 1, 1, s], and makes the mask input
float32. It is kept only when ONNX Runtime gives the same outputs before and after on several
padding patterns (exp of scores - 1e4 underflows to 0 in fp32 exactly as with finfo.min).

Then the general lowering passes for ncnn (mtconvert.backends.lowering, capability ``NCNN``):
InstanceNormalization -> LayerNormalization, IsNaN on finite values, logic/compare/Where ->
float arithmetic, CumSum -> MatMul, gathers at constant indices (GatherElements per row too),
Clip bounds, explicit Reshapes, ranks above 4, bias-free attention projections, opset; each kept
only when ONNX Runtime agrees with the fixed-shape source, each a step in ``result["steps"]``.
Every onnxsim run here skips the MatMul + Add -> Gemm fusions (lowering.GEMM_FUSIONS): the
Reshape it puts in front of a Gemm reaches ncnn as a batch-axis Reshape ncnn runs wrongly.
"""
from __future__ import annotations

from typing import Any

import numpy as np

NEG = -1e4
EQUIVALENCE_ATOL = 1e-5


def prepare(src: str, dst: str, shapes: dict[str, list[int]]) -> dict[str, Any]:
    import onnx
    import onnxsim

    from mtconvert.backends.lowering import GEMM_FUSIONS

    # MatMul + Add stay as they are (no Reshape -> Gemm -> Reshape): see lowering.NCNN
    original, ok = onnxsim.simplify(onnx.load(src), overwrite_input_shapes=shapes,
                                    skipped_optimizers=list(GEMM_FUSIONS))
    if not ok:
        raise RuntimeError("onnxsim could not simplify the graph with fixed input shapes")
    masks = [i.name for i in original.graph.input if "mask" in i.name.lower()
             and i.type.tensor_type.elem_type in (6, 7, 9)]  # int32, int64, bool
    result: dict[str, Any] = {"masks_rewritten": [], "rewrite_note": None, "casts_removed": []}
    model = original
    if masks:
        try:
            candidate = _rewrite(onnx.load_from_string(original.SerializeToString()), masks,
                                 shapes)
            diff = _max_diff(original, candidate, shapes, masks)
            if diff <= EQUIVALENCE_ATOL:
                model = candidate
                result |= {"masks_rewritten": masks, "equivalence_max_abs": diff}
            else:
                result["rewrite_note"] = f"mask rewrite changed outputs by {diff:.3g}; not applied"
        except Exception as exc:  # the rewrite is an optimisation; its absence is reported
            result["rewrite_note"] = f"mask rewrite not applicable: {exc}"
    if masks and not result["masks_rewritten"]:
        model, result["casts_removed"] = _float_mask_inputs(original, masks, shapes)
    model, result["steps"], result["lowered"] = _lower(model, original, shapes)
    onnx.save(model, dst)
    ops = {n.op_type for n in model.graph.node}
    result |= {"input_dtypes": {i.name: _np_type(i) for i in model.graph.input},
               "output_shapes": {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim]
                                 for o in model.graph.output},
               "tanh_gelu": {"Tanh", "Pow"} <= ops and "Erf" not in ops,
               "ops": sorted(ops)}
    return result


def _lower(model: Any, original: Any, shapes: dict[str, list[int]]) -> tuple[Any, list[str],
                                                                           list[str]]:
    """The ncnn lowering passes on what the mask rewrite left, checked against the source."""
    from mtconvert.backends.lowering import NCNN, lower, unsupported_ops

    try:
        done = lower(model, shapes, NCNN, reference_model=original)
    except Exception as exc:  # the reference itself could not run: convert as it is
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return model, [f"lower: not attempted ({first})"], []
    steps = list(done.steps)
    left = unsupported_ops(done.model, NCNN)
    if left:
        steps.append("lower: ops ncnn may lack still in the graph: " + ", ".join(left))
    return done.model, steps, done.applied


def _float_mask_inputs(original: Any, masks: list[str],
                       shapes: dict[str, list[int]]) -> tuple[Any, list[str]]:
    """An int 0/1 mask whose only consumers cast it to float becomes a float input (ncnn has no
    int->float Cast). Kept only when ONNX Runtime agrees before and after."""
    import onnx
    from onnx import TensorProto

    model = onnx.load_from_string(original.SerializeToString())
    g = model.graph
    done = []
    for mask in masks:
        users = [n for n in g.node if mask in n.input]
        to_float = [n for n in users if n.op_type == "Cast" and any(
            a.name == "to" and a.i == TensorProto.FLOAT for a in n.attribute)]
        if not users or len(to_float) != len(users):
            continue
        for cast in to_float:
            for n in g.node:
                for j, name in enumerate(n.input):
                    if name == cast.output[0]:
                        n.input[j] = mask
            for o in g.output:
                if o.name == cast.output[0]:
                    return original, []  # a graph output: leave the graph alone
            g.node.remove(cast)
        next(i for i in g.input if i.name == mask).type.tensor_type.elem_type = TensorProto.FLOAT
        done.append(mask)
    if not done:
        return original, []
    onnx.checker.check_model(model)
    if _max_diff(original, model, shapes, done) > EQUIVALENCE_ATOL:
        return original, []
    return model, done


def _np_type(vi: Any) -> str:
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)).name


def _descendants(graph: Any, root: str) -> set[str]:
    found, changed = {root}, True
    while changed:
        changed = False
        for n in graph.node:
            if any(i in found for i in n.input) and not all(o in found for o in n.output):
                found.update(n.output)
                changed = True
    return found


def _rewrite(model: Any, masks: list[str], shapes: dict[str, list[int]]) -> Any:
    import onnx
    import onnxsim
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    others: set[str] = set()
    for i in g.input:
        if i.name not in masks:
            others |= _descendants(g, i.name)
    new_nodes, drop = [], set()
    for k, mask in enumerate(masks):
        only_mask = _descendants(g, mask) - others
        boundary = {i for n in g.node if any(o in others for o in n.output)
                    for i in n.input if i in only_mask}
        if not boundary:
            raise ValueError(f"{mask} does not feed the main graph")
        bias = f"mtconvert_{k}_bias4d"
        # Reshape, not Unsqueeze: pnnx turns Unsqueeze(axes=[1,2]) into ncnn ExpandDims without
        # allowing for ncnn's missing batch axis, so the bias broadcast along the query axis
        # (a constant per row, which softmax ignores: the mask had no effect)
        shape = [shapes[mask][0], 1, 1, shapes[mask][-1]]
        g.initializer.extend([numpy_helper.from_array(np.array(1.0, np.float32), f"mtc_{k}_one"),
                              numpy_helper.from_array(np.array(NEG, np.float32), f"mtc_{k}_neg"),
                              numpy_helper.from_array(np.array(shape, np.int64), f"mtc_{k}_shape")])
        new_nodes += [helper.make_node("Sub", [f"mtc_{k}_one", mask], [f"mtc_{k}_inv"]),
                      helper.make_node("Mul", [f"mtc_{k}_inv", f"mtc_{k}_neg"], [f"mtc_{k}_b2"]),
                      helper.make_node("Reshape", [f"mtc_{k}_b2", f"mtc_{k}_shape"], [bias])]
        for n in g.node:
            for j, name in enumerate(n.input):
                if name in boundary:
                    n.input[j] = bias
        drop |= only_mask
        next(i for i in g.input if i.name == mask).type.tensor_type.elem_type = TensorProto.FLOAT
    keep = [n for n in g.node if not (n.output and all(o in drop for o in n.output))]
    del g.node[:]
    g.node.extend(new_nodes + keep)
    from mtconvert.backends.lowering import GEMM_FUSIONS

    simplified, ok = onnxsim.simplify(model, overwrite_input_shapes=shapes,
                                      skipped_optimizers=list(GEMM_FUSIONS))
    if not ok:
        raise RuntimeError("the rewritten graph failed onnxsim's check")
    onnx.checker.check_model(simplified)
    return simplified


def _max_diff(original: Any, rewritten: Any, shapes: dict[str, list[int]],
              masks: list[str]) -> float:
    """Largest output difference in ONNX Runtime over padding patterns: none, one, half."""
    import onnxruntime as ort

    a = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst = 0.0
    for keep_frac in (1.0, 0.75, 0.5):
        feeds_a, feeds_b = {}, {}
        for i in a.get_inputs():
            shape = shapes.get(i.name) or [d if isinstance(d, int) else 1 for d in i.shape]
            if i.name in masks:
                m = (np.arange(shape[-1]) < max(1, int(shape[-1] * keep_frac))).astype(np.int64)
                m = np.broadcast_to(m, shape).copy()
                feeds_a[i.name] = m.astype(bool) if i.type == "tensor(bool)" else m
                feeds_b[i.name] = m.astype(np.float32)
            elif "int" in i.type:
                feeds_a[i.name] = feeds_b[i.name] = rng.integers(0, 2, shape).astype(np.int64)
            else:
                feeds_a[i.name] = feeds_b[i.name] = rng.standard_normal(shape).astype(np.float32)
        for x, y in zip(a.run(None, feeds_a), b.run(None, feeds_b), strict=True):
            worst = max(worst, float(np.abs(np.asarray(x, np.float64) - y).max()))
    return worst
