"""Tiny ONNX models built with onnx.helper (no torch), for fast tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny_encoder(path: Path, vocab: int = 50, hidden: int = 8, classes: int = 3,
                 seed: int = 0) -> Path:
    """ids [batch, seq] -> Gather(embedding) -> masked mean -> MatMul -> logits [batch, classes].
    Inputs: input_ids (int64), attention_mask (int64), with dynamic batch and sequence axes."""
    rng = np.random.default_rng(seed)
    emb = numpy_helper.from_array(rng.standard_normal((vocab, hidden)).astype(np.float32), "emb")
    w = numpy_helper.from_array(rng.standard_normal((hidden, classes)).astype(np.float32), "w")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axes2"], ["m3"]),
        helper.make_node("Mul", ["h", "m3"], ["hm"]),
        helper.make_node("ReduceSum", ["hm", "axes"], ["s"], keepdims=0),
        helper.make_node("ReduceSum", ["m", "axes"], ["n"], keepdims=1),
        helper.make_node("Div", ["s", "n"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "w"], ["logits"]),
    ]
    axes2 = numpy_helper.from_array(np.array([2], dtype=np.int64), "axes2")
    graph = helper.make_graph(
        nodes, "tiny_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [emb, w, axes, axes2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def quick_convert(target: str, model, out: Path, **kw):  # noqa: ANN001, ANN201
    """mtconvert.convert to one real target with a short latency protocol, for backend tests."""
    import mtconvert

    return mtconvert.convert(model, targets=[target], out_dir=out, iterations=3, warmup=1, **kw)



def perturb(src: Path, dst: Path, op_type: str = "Add", scale: float = 0.05) -> str:
    """Write ``src`` with N(0, scale) noise added to the middle float initializer that an
    ``op_type`` node reads; return that node's name (where localization must point)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    found = [(n, x) for n in model.graph.node if n.op_type == op_type for x in n.input
             if x in inits and inits[x].dims]
    node, name = found[len(found) // 2]
    value = numpy_helper.to_array(inits[name])
    noise = np.random.default_rng(0).standard_normal(value.shape) * scale
    inits[name].CopyFrom(numpy_helper.from_array((value + noise).astype(value.dtype), name))
    onnx.save(model, str(dst))
    return node.name or node.output[0]
