"""A small mutable view of an ONNX graph with fixed shapes, for the lowering passes.

Every pass works on a copy: ``Graph(model)`` turns Constant nodes into initializers, infers
types and shapes, and offers what passes need (constants, types, consumers, fresh names, node
emission). ``Graph.model()`` gives the rewritten ModelProto back.
"""
from __future__ import annotations

from typing import Any

import numpy as np

FLOAT, INT32, INT64, BOOL = 1, 6, 7, 9
INT_TYPES = {2, 3, 4, 5, 6, 7, 12, 13}  # uint8..int64, uint32, uint64
FLOAT_TYPES = {1, 10, 11, 16}


def constants_to_initializers(model: Any) -> None:
    """Turn single-value Constant nodes into initializers, in place (passes read constants from
    the initializers; onnx2tf's strict mode rejects some scalar Constants)."""
    keep = []
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 \
                and node.attribute[0].name == "value":
            tensor = type(node.attribute[0].t)()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


class NotApplicable(Exception):
    """The pass cannot rewrite this graph (reported as the reason it was not applied)."""


class Graph:
    def __init__(self, model: Any):
        import onnx

        m = onnx.ModelProto()
        m.CopyFrom(model)
        constants_to_initializers(m)
        del m.graph.value_info[:]
        try:
            m = onnx.shape_inference.infer_shapes(m, data_prop=True)
        except Exception:  # a partial picture is still useful; passes check what they need
            pass
        self._m = m
        self.g = m.graph
        self.consts: dict[str, np.ndarray] = {}
        from onnx import numpy_helper
        for i in self.g.initializer:
            self.consts[i.name] = numpy_helper.to_array(i)
        self.types: dict[str, tuple[int, list[int] | None]] = {}
        for v in list(self.g.value_info) + list(self.g.input) + list(self.g.output):
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim] \
                if t.HasField("shape") else None
            self.types[v.name] = (t.elem_type, dims)
        for name, a in self.consts.items():
            self.types[name] = (onnx.helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
        self.inputs = [i.name for i in self.g.input if i.name not in self.consts]
        self.outputs = [o.name for o in self.g.output]
        self.nodes = list(self.g.node)
        self._names = {o for n in self.nodes for o in n.output} | set(self.consts) | set(self.inputs)
        self._new_inits: list[Any] = []
        self._k = 0

    # --- queries -------------------------------------------------------------------------
    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name) if name else None

    def elem(self, name: str) -> int | None:
        return self.types.get(name, (None, None))[0]

    def shape(self, name: str) -> list[int] | None:
        s = self.types.get(name, (None, None))[1]
        return s if s is not None and all(d >= 0 for d in s) else None

    def is_int(self, name: str) -> bool:
        return self.elem(name) in INT_TYPES

    def is_bool(self, name: str) -> bool:
        return self.elem(name) == BOOL

    def consumers(self, name: str) -> list[Any]:
        return [n for n in self.nodes if name in n.input]

    def producer(self, name: str) -> Any:
        return next((n for n in self.nodes if name in n.output), None)

    # --- building ------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        while True:
            self._k += 1
            name = f"mtc_{hint}_{self._k}"
            if name not in self._names:
                self._names.add(name)
                return name

    def add_const(self, value: Any, hint: str = "c", dtype: Any = np.float32) -> str:
        from onnx import numpy_helper

        a = np.asarray(value, dtype=dtype)
        name = self.fresh(hint)
        self._new_inits.append(numpy_helper.from_array(a, name))
        self.consts[name] = a
        self.types[name] = (FLOAT if a.dtype == np.float32 else
                            BOOL if a.dtype == bool else INT64, list(a.shape))
        return name

    def make(self, op: str, inputs: list[str], out: str | None = None, hint: str = "t",
             **attrs: Any) -> tuple[Any, str]:
        from onnx import helper

        out = out or self.fresh(hint)
        self._names.add(out)
        return helper.make_node(op, inputs, [out], **attrs), out

    def attr(self, node: Any, name: str, default: Any = None) -> Any:
        from onnx import helper

        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def model(self, nodes: list[Any] | None = None) -> Any:
        """The ModelProto with ``nodes`` (default: self.nodes) and the new initializers;
        unused initializers dropped, value_info cleared (shape inference redoes it)."""
        import onnx

        m = onnx.ModelProto()
        m.CopyFrom(self._m)
        g = m.graph
        del g.node[:]
        g.node.extend(self.nodes if nodes is None else nodes)
        g.initializer.extend(self._new_inits)
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        keep = [i for i in g.initializer if i.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
        del g.value_info[:]
        return m
