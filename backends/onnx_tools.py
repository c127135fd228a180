"""ONNX graph tools (simplify also describes the source: ops, quantized ops, opsets) run in a
child process through the one job protocol (mtconvert.backends.process.run_job).

onnxsim and onnxruntime.quantization are native code that can crash or hang on hostile graphs;
the backend runs them here, with a time-out, and reads the result the child prints.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mtconvert.backends.process import child_main, run_job

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                 "QLinearMatMul", "QLinearConv", "ConvInteger", "DynamicQuantizeMatMul"}


def simplify(src: str, dst: str) -> dict:
    import onnx
    import onnxsim

    model = onnx.load(src)
    info = _describe(model)
    before = len(model.graph.node)
    simplified, ok = onnxsim.simplify(model)
    if not ok:
        onnx.save(model, dst)
        return info | {"simplified": False, "nodes_before": before, "nodes_after": before}
    onnx.save(simplified, dst)
    return info | {"simplified": True, "nodes_before": before,
                   "nodes_after": len(simplified.graph.node)}


def fix_shapes(src: str, dst: str, shapes: dict[str, list[int]]) -> dict:
    """Simplify with every input fixed to ``shapes``, and turn Constant nodes into initializers
    (onnx2tf's strict mode rejects some scalar Constants). Returns op counts and output shapes."""
    import onnx
    import onnxsim

    from mtconvert.backends.lowering.graph import constants_to_initializers

    model = onnx.load(src)
    info = _describe(model)
    simplified, ok = onnxsim.simplify(model, overwrite_input_shapes=shapes)
    if not ok:
        raise RuntimeError("onnxsim could not simplify the graph with fixed input shapes")
    constants_to_initializers(simplified)
    onnx.checker.check_model(simplified)
    onnx.save(simplified, dst)
    counts: dict[str, int] = {}
    for node in simplified.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    outputs = {o.name: [d.dim_value if d.HasField("dim_value") else None
                        for d in o.type.tensor_type.shape.dim] for o in simplified.graph.output}
    # from the source graph: the fixed graph's folded constants carry the input sizes themselves
    weight_dims = sorted({int(d) for i in model.graph.initializer if len(i.dims) >= 2
                          for d in i.dims if d > 1})
    return info | {"op_counts": counts, "output_shapes": outputs, "weight_dims": weight_dims,
                   "nodes_before": len(model.graph.node), "nodes_after": len(simplified.graph.node)}


def quantize_dynamic(src: str, dst: str, keep_float: list[str] | None = None) -> dict:
    """Weights QInt8; the nodes named in ``keep_float`` stay float (``nodes_to_exclude``).
    Returns which of them the graph has (``kept``) and which it has not (``missing``)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic as qd

    names = {n.name for n in onnx.load(src, load_external_data=False).graph.node}
    kept = [n for n in keep_float or () if n in names]
    qd(src, dst, weight_type=QuantType.QInt8, nodes_to_exclude=kept)
    return {"weight_type": "QInt8", "kept": kept,
            "missing": [n for n in keep_float or () if n not in names]}


def qdq_uint8(src: str, dst: str) -> dict:
    """The int8 activations of a QDQ graph re-encoded as uint8 (``activations_to_uint8``), kept
    (written to ``dst``) only when ONNX Runtime, unoptimized, gives the same outputs to the bit
    on generated inputs. Returns how many QuantizeLinear nodes changed and whether kept."""
    import onnx

    from mtconvert.backends.lowering import check

    model = onnx.load(src)
    before = onnx.load(src)
    changed = activations_to_uint8(model)
    if not changed:
        return {"rewritten": 0, "kept": False, "max_diff": 0.0}
    shapes = {i.name: [d.dim_value or 8 for d in i.type.tensor_type.shape.dim]
              for i in model.graph.input}
    feeds = check.make_feeds(before, shapes, check.embedding_sizes(before))
    try:
        diff = check.max_diff(_run_unoptimized(before, feeds), _run_unoptimized(model, feeds))
    except Exception as exc:  # ONNX Runtime refused the rewritten graph: keep the source's
        return {"rewritten": changed, "kept": False, "error": str(exc).splitlines()[0][:300]}
    if diff == 0.0:
        onnx.save(model, dst)
    return {"rewritten": changed, "kept": diff == 0.0, "max_diff": diff}


def activations_to_uint8(model) -> int:  # noqa: ANN001 - onnx.ModelProto
    """Each QuantizeLinear with an int8 zero-point initializer whose output only DequantizeLinear
    nodes read is made uint8 with zero point + 128, and so are those DequantizeLinears: the same
    real values (q + 128 - (zp + 128) = q - zp; the clamp [-128, 127] becomes [0, 255]). Weights
    (int8 initializers read by a DequantizeLinear) stay int8. ONNX Runtime's CPU kernels fuse
    DQ -> MatMul -> Q into QLinearMatMul either way, but on x86 an int8 x int8 QLinearMatMul
    runs MLAS's generic kernel while uint8 x int8 runs its VNNI/AVX-512 one (and on arm64 the
    udot one); ORT's own s8->u8 pass skips a Q read by several DQs. Returns the Qs changed."""
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    made: dict[str, str] = {}

    def shifted(name: str) -> str:
        if name not in made:
            values = numpy_helper.to_array(inits[name]).astype("int16") + 128
            made[name] = f"{name}_uint8"
            while made[name] in inits:
                made[name] += "_"
            model.graph.initializer.append(numpy_helper.from_array(values.astype("uint8"),
                                                                   made[name]))
        return made[name]

    def int8_zero_point(node) -> bool:  # noqa: ANN001
        return (len(node.input) >= 3 and node.input[2] in inits
                and inits[node.input[2]].data_type == TensorProto.INT8
                and not any(a.name == "output_dtype" for a in node.attribute))

    changed = 0
    value_info = {v.name: v for v in model.graph.value_info}
    for q in [n for n in model.graph.node if n.op_type == "QuantizeLinear"]:
        users = readers.get(q.output[0], [])
        if (not int8_zero_point(q) or not users or q.output[0] in outputs
                or not all(u.op_type == "DequantizeLinear" and int8_zero_point(u)
                           for u in users)):
            continue
        for node in (q, *users):
            node.input[2] = shifted(node.input[2])
        if q.output[0] in value_info:  # the shapes onnxsim inferred: the type changes too
            value_info[q.output[0]].type.tensor_type.elem_type = TensorProto.UINT8
        changed += 1
    used = {name for node in model.graph.node for name in node.input} | outputs
    unused = [i for i in model.graph.initializer if i.name in made and i.name not in used]
    for init in unused:
        model.graph.initializer.remove(init)
    return changed


def _run_unoptimized(model, feeds: list[dict]) -> list[dict]:  # noqa: ANN001
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(names, f), strict=True)) for f in feeds]


def _describe(model) -> dict:  # noqa: ANN001 - onnx.ModelProto
    ops = sorted({n.op_type for n in model.graph.node})
    return {"ops": ops, "quantized_ops": sorted(set(ops) & QUANTIZED_OPS),
            "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import}}


def run_onnx_tool(cmd: str, src: Path, dst: Path, *args: Any, step: str, log: Path,
                  timeout: float | None, target: str) -> dict[str, Any]:
    """Run one onnx_tools command in a child and return its result (with its seconds)."""
    t0 = time.perf_counter()
    job = {"command": cmd, "src": str(src), "dst": str(dst), "args": list(args)}
    result = run_job(__name__, job, Path(dst).with_suffix(f".{cmd}.job.json"), target=target,
                     step=step, log_path=log, timeout_s=timeout)
    return result | {"seconds": time.perf_counter() - t0}


def ncnn_prepare(src: str, dst: str, shapes: dict[str, list[int]]) -> dict:
    from mtconvert.backends.ncnn_rewrite import prepare

    return prepare(src, dst, shapes)


COMMANDS = {"simplify": simplify, "quantize-dynamic": quantize_dynamic, "fix-shapes": fix_shapes,
            "ncnn-prepare": ncnn_prepare, "qdq-uint8": qdq_uint8}



def _handle(job: dict[str, Any]) -> dict[str, Any]:
    return COMMANDS[job["command"]](job["src"], job["dst"], *job["args"])


if __name__ == "__main__":
    child_main(_handle)
