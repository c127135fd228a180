"""Quantized ONNX -> a float graph plus the record of every int8 weight's quantization.

For the targets whose converters cannot consume ONNX's quantization ops (onnx2tf keeps
QuantizeLinear's clip as a Flex op, onnx2torch has no DequantizeLinear, pnnx passes them through
as layers ncnn cannot create): the graph is rewritten in float and each target re-compresses the
weights natively from the record (``Record``: scale, zero point, axis and the int values of
every weight that was int8/uint8 in the source), so the artifact stays compressed.

- ``DequantizeLinear(constant)``: folded into a float initializer (int8/uint8 weights recorded;
  int32 biases just folded);
- ``Gather(int8 constant table) -> DequantizeLinear``: a Gather from the folded float table;
- ``QuantizeLinear -> DequantizeLinear`` on an activation: both dropped (the target computes that
  activation in float, or re-quantizes it itself): the rounding the source applied there is
  gone, at most half a step of that QuantizeLinear's scale per value;
- ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(x_scale * w_scale)``: a float
  ``MatMul`` with the dequantized weight;
- QLinear* (QOperator format) ops are not rewritten: ``NotApplicable`` names them.

The driver in ``backends.lowering`` keeps a pass only when ONNX Runtime's outputs do not move;
this rewrite moves them by the source's own activation rounding, so it is not one of its passes:
``dequantize`` measures that change (``max_abs``) and the run judges the target against the
quantized source with the int8-source profile. Heavy imports happen inside functions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mtconvert.backends.lowering.graph import NotApplicable

QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class Dequantized:
    model: Any
    weights: dict[str, dict[str, Any]] = field(default_factory=dict)  # float name -> record
    steps: list[str] = field(default_factory=list)


def record(ints: np.ndarray, scale: np.ndarray, zero: np.ndarray | None,
           axis: int | None) -> dict[str, Any]:
    """One int8 weight as the source stores it (JSON-serialisable; ints kept as a list)."""
    return {"dtype": str(ints.dtype), "shape": list(ints.shape),
            "scale": np.asarray(scale, np.float32).ravel().tolist(),
            "zero_point": [] if zero is None else np.asarray(zero).ravel().astype(int).tolist(),
            "axis": axis, "ints": ints.ravel().astype(int).tolist()}


def values(r: dict[str, Any]) -> np.ndarray:
    """The float weight a record stands for, exactly as the rewrite folded it."""
    ints = np.asarray(r["ints"], np.int64).reshape(r["shape"]).astype(r["dtype"])
    zero = np.asarray(r["zero_point"]) if r["zero_point"] else None
    return _dequant(ints, np.asarray(r["scale"], np.float32), zero, r["axis"])


def _input_quantization(g: Any, weight: str, consts: dict[str, np.ndarray],
                        producer: dict[str, int],
                        users: dict[str, list[int]]) -> dict[str, Any] | None:
    """The static QuantizeLinear -> DequantizeLinear on the other input of the one node that
    reads a dequantized weight (a QDQ source's activation scale feeding that weight layer):
    {"scale", "zero_point", "dtype"}, None when there is none (dynamic, weight-only, shared)."""
    readers = users.get(weight, [])
    if len(readers) != 1:
        return None
    other = [x for x in g.node[readers[0]].input[:2] if x != weight]
    dq = g.node[producer[other[0]]] if other and other[0] in producer else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in producer or \
            g.node[producer[dq.input[0]]].op_type != "QuantizeLinear":
        return None
    scale = consts.get(dq.input[1])
    zero = consts.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if scale is None or scale.size != 1:
        return None
    return {"scale": float(scale.ravel()[0]),
            "zero_point": 0 if zero is None else int(zero.ravel()[0]),
            "dtype": "uint8" if zero is None else str(zero.dtype)}


def _dequant(ints: np.ndarray, scale: np.ndarray, zero: np.ndarray | None,
             axis: int | None) -> np.ndarray:
    s = np.asarray(scale, np.float32)
    z = np.zeros_like(s) if zero is None else np.asarray(zero).astype(np.float32)
    if s.ndim == 1 and s.size > 1:  # per-axis
        shape = [1] * ints.ndim
        shape[(axis if axis is not None else 1) % ints.ndim] = s.size
        s, z = s.reshape(shape), z.reshape(shape)
    return ((ints.astype(np.float32) - z) * s).astype(np.float32)


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def dequantize(model: Any) -> Dequantized:
    """The float graph of a quantized ``model`` (not modified) and its weights' records."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    bad = sorted({n.op_type for n in g.node if n.op_type.startswith("QLinear")
                  or n.op_type in ("ConvInteger", "QGemm", "QAttention")})
    if bad:
        raise NotApplicable(f"QOperator ops not rewritten yet: {', '.join(bad)}")
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    # exporters share one constant through Identity nodes (torch's zero points)
    consts |= {n.output[0]: consts[n.input[0]] for n in g.node
               if n.op_type == "Identity" and n.input[0] in consts}
    out = Dequantized(model=m)
    new_inits: dict[str, np.ndarray] = {}
    renames: dict[str, str] = {}
    drop: set[int] = set()
    producer = {o: i for i, n in enumerate(g.node) for o in n.output}
    users: dict[str, list[int]] = {}
    for i, n in enumerate(g.node):
        for name in n.input:
            users.setdefault(name, []).append(i)
    counts = {"weights": 0, "tables": 0, "biases": 0, "pairs": 0, "matmuls": 0}

    def qparams(n: Any) -> tuple[np.ndarray, np.ndarray | None, int | None]:
        scale = consts.get(n.input[1])
        if scale is None:
            raise NotApplicable(f"{n.op_type} {n.name!r} has a computed scale")
        zero = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        return scale, zero, _attr(n, "axis", 1) if scale.size > 1 else None

    for i, n in enumerate(g.node):
        if n.op_type == "DequantizeLinear" and n.input[0] in consts:
            scale, zero, axis = qparams(n)
            ints = consts[n.input[0]]
            new_inits[n.output[0]] = _dequant(ints, scale, zero, axis)
            if ints.dtype in (np.int8, np.uint8):
                out.weights[n.output[0]] = record(ints, scale, zero, axis)
                feeding = _input_quantization(g, n.output[0], consts, producer, users)
                if feeding:  # kept for targets with static activation scales (ncnn int8)
                    out.weights[n.output[0]]["input"] = feeding
                counts["weights"] += 1
            else:
                counts["biases"] += 1
            drop.add(i)
        elif n.op_type == "DequantizeLinear" and n.input[0] in producer and \
                g.node[producer[n.input[0]]].op_type == "Gather" and \
                g.node[producer[n.input[0]]].input[0] in consts:
            gi = producer[n.input[0]]
            gather = g.node[gi]
            scale, zero, axis = qparams(n)
            if axis is not None or len(users.get(gather.output[0], [])) != 1:
                raise NotApplicable(f"Gather -> DequantizeLinear {n.name!r} is per-axis or shared")
            ints = consts[gather.input[0]]
            table = gather.input[0] + "_dequantized"
            new_inits[table] = _dequant(ints, scale, zero, None)
            out.weights[table] = record(ints, scale, zero, None)
            gather.input[0] = table
            gather.output[0] = n.output[0]
            counts["tables"] += 1
            drop.add(i)
        elif n.op_type == "QuantizeLinear" and n.input[0] not in consts:
            dqs = users.get(n.output[0], [])
            if not dqs or any(g.node[j].op_type != "DequantizeLinear" for j in dqs):
                raise NotApplicable(f"QuantizeLinear {n.name!r} feeds a non-DequantizeLinear op")
            drop.add(i)
            for j in dqs:
                renames[g.node[j].output[0]] = n.input[0]
                drop.add(j)
                counts["pairs"] += 1
        elif n.op_type == "MatMulInteger":
            i_new = _matmul_integer(g, i, consts, producer, users, new_inits, out, drop)
            counts["matmuls"] += i_new
    _rewire(g, renames, drop)
    _replace_initializers(m, new_inits)
    _prune(g)
    left = sorted({n.op_type for n in g.node if n.op_type in QDQ or n.op_type in (
        "DynamicQuantizeLinear", "MatMulInteger")})
    if left:
        raise NotApplicable(f"quantization ops left after the rewrite: {', '.join(left)}")
    out.steps.append(
        f"dequantize: {counts['weights']} int8 weights and {counts['tables']} int8 tables "
        f"folded to float (scales recorded), {counts['biases']} int32 biases folded, "
        f"{counts['pairs']} activation QuantizeLinear/DequantizeLinear pairs dropped, "
        f"{counts['matmuls']} MatMulInteger back to MatMul")
    return out


def _matmul_integer(g: Any, i: int, consts: dict[str, np.ndarray], producer: dict[str, int],
                    users: dict[str, list[int]], new_inits: dict[str, np.ndarray],
                    out: Dequantized, drop: set[int]) -> int:
    """DynamicQuantizeLinear(x) -> MatMulInteger(xq, Wq) -> Cast -> Mul(S), S = x_scale * w_scale:
    the last Mul becomes MatMul(x, (Wq - w_zero) * w_scale)."""
    from onnx import helper

    n = g.node[i]
    dql = g.node[producer[n.input[0]]] if n.input[0] in producer else None
    w = consts.get(n.input[1])
    if dql is None or dql.op_type != "DynamicQuantizeLinear" or w is None:
        raise NotApplicable(f"MatMulInteger {n.name!r}: not DynamicQuantizeLinear x constant")
    casts = users.get(n.output[0], [])
    if len(casts) != 1 or g.node[casts[0]].op_type != "Cast":
        raise NotApplicable(f"MatMulInteger {n.name!r}: its output is not cast to float once")
    cast = g.node[casts[0]]
    muls = users.get(cast.output[0], [])
    if len(muls) != 1 or g.node[muls[0]].op_type != "Mul":
        raise NotApplicable(f"MatMulInteger {n.name!r}: not scaled by one Mul")
    mul = g.node[muls[0]]
    s_name = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
    smul = g.node[producer[s_name]] if s_name in producer else None
    if smul is None or smul.op_type != "Mul" or dql.output[1] not in smul.input:
        raise NotApplicable(f"MatMulInteger {n.name!r}: scale is not x_scale * w_scale")
    w_scale = consts.get(smul.input[1] if smul.input[0] == dql.output[1] else smul.input[0])
    if w_scale is None:
        raise NotApplicable(f"MatMulInteger {n.name!r}: computed weight scale")
    w_zero = consts.get(n.input[3]) if len(n.input) > 3 and n.input[3] else None
    axis = 1 if w_scale.size > 1 else None  # per output column of a [K, N] weight
    name = n.input[1] + "_dequantized"
    new_inits[name] = _dequant(w, w_scale, w_zero, axis)
    out.weights[name] = record(w, w_scale, w_zero, axis)
    g.node.append(helper.make_node("MatMul", [dql.input[0], name], [mul.output[0]],
                                   name=n.name + "_float"))
    drop.update({i, casts[0], muls[0]})
    return 1


def _rewire(g: Any, renames: dict[str, str], drop: set[int]) -> None:
    from onnx import helper

    keep = [n for i, n in enumerate(g.node) if i not in drop]
    for dst in renames:  # chained pairs (Q -> DQ -> Q -> DQ, PT2E's shared qparams)
        while renames[dst] in renames:
            renames[dst] = renames[renames[dst]]
    for n in keep:
        for k, name in enumerate(n.input):
            if name in renames:
                n.input[k] = renames[name]
    outputs = {o.name for o in g.output}
    extra = [helper.make_node("Identity", [src], [dst], name=dst + "_identity")
             for dst, src in renames.items() if dst in outputs]
    del g.node[:]
    g.node.extend(_toposort(keep + extra))


def _toposort(nodes: list[Any]) -> list[Any]:
    made = {o for n in nodes for o in n.output}
    ready: set[str] = set()
    done: list[Any] = []
    pending = list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(x == "" or x not in made or x in ready for x in n.input):
                done.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise NotApplicable("the rewritten graph has a cycle")
        pending = rest
    return done


def _replace_initializers(m: Any, new: dict[str, np.ndarray]) -> None:
    from onnx import numpy_helper

    for name, value in new.items():
        m.graph.initializer.append(numpy_helper.from_array(value, name))


def _prune(g: Any) -> None:
    """Drop the nodes and initializers nothing reads any more."""
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(n.input)
    del g.node[:]
    g.node.extend(reversed(keep))
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)


def max_change(source: Any, lowered: Any, shapes: dict[str, list[int]]) -> float:
    """Largest output change of the float graph against the quantized source in ONNX Runtime
    on the lowering checks' inputs (the source's activation rounding, now gone)."""
    from mtconvert.backends.lowering import check

    vocab = check.embedding_sizes(source)
    feeds = check.make_feeds(source, shapes, vocab)
    return check.max_diff(check.run(source, feeds), check.run(lowered, feeds))
