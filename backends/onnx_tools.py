"""ONNX graph tools (simplify also describes the source: ops, quantized ops, opsets) run in a child process: ``python -m mtconvert.backends.onnx_tools CMD IN OUT``.

onnxsim and onnxruntime.quantization are native code that can crash or hang on hostile graphs;
the backend runs them here, with a time-out, and reads one JSON line of results from stdout.
"""
from __future__ import annotations

import json
import sys

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


def quantize_dynamic(src: str, dst: str) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic as qd

    qd(src, dst, weight_type=QuantType.QInt8)
    return {"weight_type": "QInt8"}


def _describe(model) -> dict:  # noqa: ANN001 - onnx.ModelProto
    ops = sorted({n.op_type for n in model.graph.node})
    return {"ops": ops, "quantized_ops": sorted(set(ops) & QUANTIZED_OPS),
            "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import}}


COMMANDS = {"simplify": simplify, "quantize-dynamic": quantize_dynamic}

if __name__ == "__main__":
    cmd, src, dst = sys.argv[1:4]
    print("MTCONVERT-RESULT " + json.dumps(COMMANDS[cmd](src, dst)))
