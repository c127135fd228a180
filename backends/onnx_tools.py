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
            "ncnn-prepare": ncnn_prepare}



def _handle(job: dict[str, Any]) -> dict[str, Any]:
    return COMMANDS[job["command"]](job["src"], job["dst"], *job["args"])


if __name__ == "__main__":
    child_main(_handle)
