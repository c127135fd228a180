"""The lowering passes: each a small ONNX -> ONNX rewrite of one op class a target cannot run
into ops it can. A pass takes a ``Graph`` (a private copy) and the ``Context`` and returns the
rewritten ModelProto and a one-line detail, or None when the graph has nothing for it; it raises
``NotApplicable`` when it finds its ops but cannot express them. Passes never decide whether a
rewrite is kept: the driver checks every result against ONNX Runtime.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from mtconvert.backends.lowering.graph import (BOOL, FLOAT, FLOAT_TYPES, INT_TYPES, Graph,
                                               NotApplicable)

SAFE_NEG = -1e4  # a finite "minus infinity" for additive masks: exp underflows to 0 in fp32
                 # and it survives fp16 (max 65504), unlike finfo(float32).min or -inf


@dataclass
class Context:
    shapes: dict[str, list[int]]
    vocab: dict[str, int] = field(default_factory=dict)   # int input -> embedding table size
    max_rank: int = 4
    max_opset: int | None = None


Pass = Callable[[Graph, Context], "tuple[Any, str] | None"]
PASSES: dict[str, Pass] = {}


def lowering_pass(name: str) -> Callable[[Pass], Pass]:
    def register(fn: Pass) -> Pass:
        fn.pass_name = name  # type: ignore[attr-defined]
        PASSES[name] = fn
        return fn
    return register


def _count(items: list[Any]) -> str:
    ops: dict[str, int] = {}
    for n in items:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(ops.items()))


# --- 2. IsNaN / IsInf on values that cannot be NaN / Inf -----------------------------------

_F32_MAX = float(np.finfo(np.float32).max)
_BOUNDED = {"Sigmoid": (0.0, 1.0), "Tanh": (-1.0, 1.0), "Erf": (-1.0, 1.0),
            "Softmax": (0.0, 1.0), "Cos": (-1.0, 1.0), "Sin": (-1.0, 1.0),
            "Not": (0.0, 1.0), "And": (0.0, 1.0), "Or": (0.0, 1.0), "Xor": (0.0, 1.0),
            "Equal": (0.0, 1.0), "Less": (0.0, 1.0), "Greater": (0.0, 1.0),
            "LessOrEqual": (0.0, 1.0), "GreaterOrEqual": (0.0, 1.0),
            "IsNaN": (0.0, 1.0), "IsInf": (0.0, 1.0)}
# ops whose output is finite when their inputs are (magnitudes aside, see _finite_ranges)
_PRESERVING = {"Add", "Sub", "Mul", "MatMul", "Gemm", "Neg", "Abs", "Relu", "Gelu", "Where",
               "Cast", "Reshape", "Transpose", "Expand", "Concat", "Slice", "Split", "Gather",
               "GatherND", "GatherElements", "Squeeze", "Unsqueeze", "Flatten", "Identity",
               "Dropout", "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "Min", "Max",
               "Clip", "Conv", "LayerNormalization", "CumSum", "Tile", "Pad", "ReduceL2",
               "Floor", "Ceil", "Round", "Trilu", "Range", "Shape", "Size",
               "ConstantOfShape", "BatchNormalization", "InstanceNormalization",
               "SimplifiedLayerNormalization", "Softplus", "Elu", "LeakyRelu", "HardSigmoid",
               "HardSwish", "Mish", "PRelu", "Einsum", "ArgMax", "ArgMin", "TopK", "Sign",
               "Neg"}
_BIG = 1e30  # unknown-but-finite magnitude: a float input or an activation


def _arith(op: str, a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float] | None:
    """Interval of a op b, or None when fp32 could overflow. Unknown activations (+-_BIG) are
    assumed not to overflow among themselves (as a MatMul of them is); next to a huge constant
    (a finfo.min mask) only Add/Sub is safe: fp32 rounds finfo.min + x back to finfo.min for
    |x| < 1e31 (half an ulp there)."""
    mag = lambda r: max(abs(r[0]), abs(r[1]))  # noqa: E731
    activations = mag(a) <= _BIG and mag(b) <= _BIG
    if op == "Add":
        c = (a[0] + b[0], a[1] + b[1])
    elif op == "Sub":
        c = (a[0] - b[1], a[1] - b[0])
    else:
        if _BIG in (mag(a), mag(b)) and not activations:
            return None
        p = [a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]]
        c = (min(p), max(p))
    if activations:
        return (min(max(c[0], -_BIG), _BIG), max(min(c[1], _BIG), -_BIG))
    if mag(c) >= _F32_MAX + 1e31:
        return None
    return (max(c[0], -_F32_MAX), min(c[1], _F32_MAX))


def _finite_ranges(g: Graph, ctx: Context) -> dict[str, tuple[float, float]]:
    """Interval per tensor that is provably finite (NaN/Inf-free) assuming finite graph inputs:
    integer and bool inputs, finite constants, and ops that keep finite values finite (with
    overflow ruled out by the intervals where one side is huge). Missing = may be non-finite."""
    r: dict[str, tuple[float, float]] = {}
    for name in g.inputs:
        if g.is_bool(name):
            r[name] = (0.0, 1.0)
        elif g.is_int(name):
            v = ctx.vocab.get(name)
            r[name] = (0.0, float(v - 1)) if v else (0.0, 1.0) if "mask" in name.lower() \
                else (-2.0 ** 63, 2.0 ** 63)  # ids index their table; masks hold 0/1
        elif g.elem(name) in FLOAT_TYPES:
            r[name] = (-_BIG, _BIG)  # assumed finite: the source is validated on finite inputs
    for name, a in g.consts.items():
        if a.dtype.kind in "fiub" and a.size and np.isfinite(a.astype(np.float64)).all():
            r[name] = (float(a.min()), float(a.max()))
        elif a.size == 0:
            r[name] = (0.0, 0.0)
    for n in g.nodes:
        ins = [r.get(i) for i in n.input if i]
        op = n.op_type
        out: tuple[float, float] | None = None
        if op in _BOUNDED:
            if op == "Softmax" and None in ins:
                out = None
            else:
                out = _BOUNDED[op]
        elif op == "Where" and len(ins) == 3 and ins[1] and ins[2]:
            out = (min(ins[1][0], ins[2][0]), max(ins[1][1], ins[2][1]))
        elif None in ins or not ins:
            out = None
        elif op in ("Add", "Sub", "Mul"):
            out = _arith(op, ins[0], ins[1])
        elif op == "Div":
            b0, b1 = ins[1]
            out = (-_BIG, _BIG) if (b0 > 1e-30 or b1 < -1e-30) else None
            if out and b0 > 1e-30 and ins[0][0] >= 0:
                out = (0.0, _BIG)
        elif op == "Cast" and g.attr(n, "to") == BOOL:
            out = (0.0, 1.0)
        elif op == "Clip" and len(n.input) > 1 and n.input[1] in g.consts:
            lo = float(g.consts[n.input[1]].min())
            out = (lo, max(lo, ins[0][1]))
        elif op in ("Relu",):
            out = (0.0, max(0.0, ins[0][1]))
        elif op in ("Sqrt",):
            out = (float(np.sqrt(ins[0][0])), float(np.sqrt(ins[0][1]))) if ins[0][0] >= 0 \
                else None
        elif op == "Exp":
            out = (0.0, float(np.exp(ins[0][1]))) if ins[0][1] < 80 else None
        elif op == "Pow" and n.input[1] in g.consts and float(g.consts[n.input[1]].min()) >= 0 \
                and np.all(np.mod(g.consts[n.input[1]], 1) == 0):
            even = np.all(np.mod(g.consts[n.input[1]], 2) == 0)
            out = (0.0, _BIG) if even else (-_BIG, _BIG)
        elif op == "Reciprocal":
            lo, hi = ins[0]
            out = (1 / hi, 1 / lo) if lo > 1e-30 else (1 / hi, 1 / lo) if hi < -1e-30 else None
        elif op in ("MatMul", "Gemm", "ReduceSum", "ReduceMean", "ReduceL2", "Conv", "CumSum",
                    "LayerNormalization", "Einsum", "BatchNormalization", "Gelu", "Softplus"):
            big = max(max(abs(x), abs(y)) for x, y in ins)
            out = (-_BIG, _BIG) if big <= _BIG else None
            if out and op in ("ReduceSum", "ReduceMean", "ReduceL2") and ins[0][0] >= 0:
                out = (0.0, _BIG)
        elif op in _PRESERVING:  # elementwise: the union of the data inputs' intervals
            lo, hi = min(x for x, _ in ins[:2]), max(y for _, y in ins[:2])
            if op in ("Reshape", "Expand", "Unsqueeze", "Squeeze", "Slice", "Tile", "Gather",
                      "GatherElements", "GatherND", "Transpose", "Flatten", "Identity",
                      "Dropout", "Cast", "Split", "ReduceMax", "ReduceMin", "Pad", "TopK"):
                lo, hi = ins[0]
            elif op == "Concat":
                lo, hi = min(x for x, _ in ins), max(y for _, y in ins)
            out = (lo, hi)
        if out is not None:
            for o in n.output:
                if o:
                    r[o] = out
    return r


@lowering_pass("nan-checks")
def remove_impossible_nan_checks(g: Graph, ctx: Context) -> tuple[Any, str] | None:
    """IsNaN/IsInf of a value that cannot be NaN/Inf becomes constant false; Where/And/Or/Not
    with a constant condition are then folded."""
    checks = [n for n in g.nodes if n.op_type in ("IsNaN", "IsInf")]
    if not checks:
        return None
    ranges = _finite_ranges(g, ctx)
    done = []
    for n in checks:
        if n.input[0] in ranges and g.shape(n.output[0]) is not None:
            g.consts[n.output[0]] = np.zeros(g.shape(n.output[0]), bool)
            g._new_inits.append(_init(np.zeros(g.shape(n.output[0]), bool), n.output[0]))
            done.append(n)
    if not done:
        raise NotApplicable(f"{_count(checks)} on values that may be NaN/Inf")
    g.nodes = [n for n in g.nodes if n not in done]
    folded = _fold_constant_logic(g)
    left = len(checks) - len(done)
    return g.model(), (f"{_count(done)} on provably finite values -> false"
                       + (f"; {folded} Where/And/Or folded" if folded else "")
                       + (f"; {left} left (value may be non-finite)" if left else ""))


def _init(a: np.ndarray, name: str) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(a, name)


def _fold_constant_logic(g: Graph) -> int:
    """Where(const c, x, y) with c all true/false -> x/y (when shapes allow); And/Or with a
    constant all-true/all-false side."""
    k, changed = 0, True
    while changed:
        changed = False
        for n in list(g.nodes):
            pick = None
            if n.op_type == "Where":
                c = g.const(n.input[0])
                if c is not None and c.size and (c.all() or not c.any()):
                    pick = n.input[1] if c.all() else n.input[2]
            elif n.op_type in ("And", "Or"):
                for a, b in ((0, 1), (1, 0)):
                    c = g.const(n.input[a])
                    if c is not None and c.size and (c.all() if n.op_type == "And" else not c.any()):
                        pick = n.input[b]
            if pick is None or g.shape(pick) != g.shape(n.output[0]):
                continue
            _rename(g, n.output[0], pick, drop=n)
            k, changed = k + 1, True
    return k


def _rename(g: Graph, old: str, new: str, drop: Any) -> None:
    g.nodes = [n for n in g.nodes if n is not drop]
    if old in g.outputs:
        g.nodes.append(g.make("Identity", [new], old)[0])
        return
    for n in g.nodes:
        for j, name in enumerate(n.input):
            if name == old:
                n.input[j] = new


# --- 1. bool / compare / logical ops and Where -> float arithmetic on 0/1 masks ------------

# inputs that carry data (others are shapes, axes, starts: they stay integer constants)
_DATA_INPUTS = {"Reshape": (0,), "Expand": (0,), "Unsqueeze": (0,), "Squeeze": (0,),
                "Slice": (0,), "Tile": (0,), "Pad": (0, 2), "ReduceSum": (0,),
                "ReduceMax": (0,), "ReduceMin": (0,), "ReduceMean": (0,), "ReduceProd": (0,),
                "CumSum": (0,), "Split": (0,), "Gather": (0, 1), "GatherElements": (0, 1),
                "GatherND": (0, 1), "Transpose": (0,), "Flatten": (0,), "Identity": (0,),
                "Cast": (0,), "Clip": (0, 1, 2), "Trilu": (0,)}
_SAME_OP = {"Reshape", "Expand", "Unsqueeze", "Squeeze", "Slice", "Tile", "ReduceSum",
            "ReduceMax", "ReduceMin", "CumSum", "Transpose", "Flatten", "Identity", "Concat",
            "Add", "Sub", "Mul", "Neg", "Abs", "Min", "Max", "Relu", "Clip", "Trilu", "Split"}


def _data_inputs(n: Any) -> list[str]:
    idx = _DATA_INPUTS.get(n.op_type)
    return [x for j, x in enumerate(n.input) if x and (idx is None or j in idx)]


@lowering_pass("logic-to-float")
def logic_to_float(g: Graph, ctx: Context) -> tuple[Any, str] | None:
    """Every bool/int tensor computed at run time gets a float twin holding the same values
    (0/1 for bools): Not -> 1-x, And -> x*y, Or -> max, Equal on integers -> relu(1-|a-b|),
    Less/Greater.. on integers -> clip(b-a, 0, 1), Where(c, x, y) -> c*x + (1-c)*y (huge or
    infinite constant branches become -1e4/1e4), casts become identities, shape ops run on the
    twin. An int input read only by such ops becomes a float input; one also read by an
    embedding Gather is read as float through a one-column identity embedding (an int->float
    cast the target can run). A Gather of a constant table at computed indices becomes a
    one-hot MatMul."""
    import onnx

    def runtime_intlike(x: str) -> bool:
        return bool(x) and x not in g.consts and (g.is_int(x) or g.is_bool(x))

    def embedding(n: Any) -> bool:
        return (n.op_type == "Gather" and n.input[0] in g.consts and n.input[1] in g.inputs
                and g.attr(n, "axis", 0) == 0)

    region = [n for n in g.nodes if not embedding(n) and (
        any(runtime_intlike(x) for x in _data_inputs(n))
        or any(runtime_intlike(o) for o in n.output if o))]
    if not region:
        return None
    twin: dict[str, str] = {}
    new: list[Any] = []
    notes: list[str] = []

    def emit(op: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        node, name = g.make(op, inputs, out, hint=op.lower(), **attrs)
        new.append(node)
        return name

    # graph inputs the region reads
    needed = {x for n in region for x in _data_inputs(n) if x in g.inputs and runtime_intlike(x)}
    for x in sorted(needed):
        others = [c for c in g.consumers(x) if c not in region]
        if not others:
            vi = next(i for i in g.g.input if i.name == x)
            vi.type.tensor_type.elem_type = FLOAT
            twin[x] = x
            notes.append(f"{x} made a float input")
            continue
        size = ctx.vocab.get(x) or max((int(g.consts[c.input[0]].shape[0]) for c in others
                                        if embedding(c)), default=0)
        shape = g.shape(x)
        if not size or shape is None:
            raise NotApplicable(f"{x} is read as integers and as data, with no known range")
        table = g.add_const(np.arange(size, dtype=np.float32)[:, None], "id_table")
        col = emit("Gather", [table, x])  # no explicit axis=0: see default-attributes
        twin[x] = emit("Reshape", [col, g.add_const(shape, "shape", np.int64)])
        notes.append(f"{x} read as float through a {size}x1 identity embedding")

    def t(x: str) -> str:
        if not x:
            return x
        if x in twin:
            return twin[x]
        if x in g.consts and (g.is_int(x) or g.is_bool(x)):
            twin[x] = g.add_const(g.consts[x].astype(np.float32), "f")
            return twin[x]
        if runtime_intlike(x):
            raise NotApplicable(f"no float form for {x}")
        return x

    def out_name(o: str) -> str:
        """Float outputs keep their name (readers unchanged); int/bool ones get a twin."""
        if not runtime_intlike(o):
            return o
        twin[o] = g.fresh("f")
        return twin[o]

    def safe(x: str) -> str:
        a = g.const(x)
        if a is None or a.dtype.kind != "f" or (np.isfinite(a).all() and np.abs(a).max(
                initial=0) <= 65504):
            return x
        return g.add_const(np.clip(np.nan_to_num(a, posinf=1e4, neginf=SAFE_NEG), SAFE_NEG, 1e4)
                           .astype(np.float32), "safe")

    one = g.add_const(1.0, "one")
    zero = g.add_const(0.0, "zero")
    in_region = set(map(id, region))
    for n in g.nodes:
        if id(n) not in in_region:
            new.append(n)
            continue
        op, ins = n.op_type, list(n.input)
        o = n.output[0]
        if op == "Cast":
            src_int = g.is_int(ins[0]) or g.is_bool(ins[0])
            # a float mask input holds 0/1, as integer mask inputs are taken to (_finite_ranges)
            float_mask = not src_int and ins[0] in g.inputs and "mask" in ins[0].lower()
            if float_mask:
                notes.append(f"{ins[0]} (a float mask input) cast as its 0/1 values")
            to = g.attr(n, "to")
            if to == BOOL and not g.is_bool(ins[0]):
                if not (src_int or float_mask):
                    raise NotApplicable("Cast of floats to bool")
                emit("Min", [emit("Abs", [t(ins[0])]), one], out_name(o))
            elif to in FLOAT_TYPES or src_int or float_mask:
                emit("Identity", [t(ins[0])], out_name(o))
            else:
                raise NotApplicable("Cast of floats to integers")
        elif op == "Not":
            emit("Sub", [one, t(ins[0])], out_name(o))
        elif op == "And":
            emit("Mul", [t(ins[0]), t(ins[1])], out_name(o))
        elif op == "Or":
            emit("Max", [t(ins[0]), t(ins[1])], out_name(o))
        elif op == "Xor":
            emit("Abs", [emit("Sub", [t(ins[0]), t(ins[1])])], out_name(o))
        elif op in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"):
            if not all(g.is_int(x) or g.is_bool(x) for x in ins):
                raise NotApplicable(f"{op} on floats (no exact arithmetic form)")
            a, b = t(ins[0]), t(ins[1])
            if op == "Equal":
                emit("Relu", [emit("Sub", [one, emit("Abs", [emit("Sub", [a, b])])])], out_name(o))
            else:
                d = emit("Sub", [b, a] if op in ("Less", "LessOrEqual") else [a, b])
                if op in ("LessOrEqual", "GreaterOrEqual"):
                    d = emit("Add", [d, one])
                emit("Clip", [d, zero, one], out_name(o))
        elif op == "Where":
            c, x, y = t(ins[0]), safe(t(ins[1])), safe(t(ins[2]))
            terms = []
            if not _is_zero(g, x):
                terms.append(emit("Mul", [c, x]))
            if not _is_zero(g, y):
                terms.append(emit("Mul", [emit("Sub", [one, c]), y]))
            if len(terms) == 2:
                emit("Add", terms, out_name(o))
            elif terms:
                emit("Identity", terms, out_name(o))
            else:
                emit("Mul", [c, zero], out_name(o))
        elif op == "Gather" and n.input[0] in g.consts and runtime_intlike(ins[1]):
            emit_onehot_gather(g, n, t(ins[1]), emit, out_name(o))
        elif op == "GatherElements" and n.input[0] in g.consts:
            data, axis = g.consts[n.input[0]], g.attr(n, "axis", 0)
            shape = g.shape(o)
            first = np.take(data, [0], axis=axis)
            if shape is None or not (data == first).all():
                raise NotApplicable("GatherElements of a non-uniform constant at run-time indices")
            value = np.broadcast_to(first, data.shape)[tuple(slice(0, s) for s in shape)]
            emit("Identity", [g.add_const(value.astype(np.float32), "gathered")], out_name(o))
            notes.append("GatherElements of a constant uniform along its axis folded")
        elif op in _SAME_OP or (op in ("Gather", "GatherND", "GatherElements")
                                and not runtime_intlike(ins[1])):
            # the same op on the float twin (a gather here has constant indices, kept as ints)
            idx = _DATA_INPUTS.get(op)
            inputs = [t(x) if (idx is None or j in idx) else x for j, x in enumerate(ins)]
            if op in ("Gather", "GatherND", "GatherElements"):
                inputs = [t(ins[0])] + ins[1:]
            node, _ = g.make(op, inputs, out_name(o))
            node.attribute.extend(n.attribute)
            for extra in n.output[1:]:
                node.output.append(out_name(extra))
            new.append(node)
        else:
            raise NotApplicable(f"{op} on integers/bools has no float form here")
    # graph outputs that were int/bool: cast the twin back
    for k, o in enumerate(g.outputs):
        if o in twin and twin[o] != o:
            vi = next(v for v in g.g.output if v.name == o)
            new.append(g.make("Cast", [twin[o]], o, to=vi.type.tensor_type.elem_type)[0])
    m = g.model(new)
    onnx.checker.check_model(m)
    detail = f"{_count(region)} -> float arithmetic on 0/1 values"
    return m, detail + (f" ({'; '.join(notes)})" if notes else "")


def _is_zero(g: Graph, x: str) -> bool:
    a = g.const(x)
    return a is not None and a.size > 0 and not a.any()


def emit_onehot_gather(g: Graph, n: Any, idx: str, emit: Callable[..., str], out: str) -> str:
    """Gather(table[V, ...], idx) at float indices -> relu(1 - |idx[..., None] - arange(V)|)
    @ table (exact: one 1 per row, the other terms are zeros)."""
    table = g.consts[n.input[0]]
    if g.attr(n, "axis", 0) != 0 or table.ndim < 1:
        raise NotApplicable("Gather at run-time indices on an axis other than 0")
    shape = g.shape(n.input[1])
    if shape is None:
        raise NotApplicable("Gather indices of unknown shape")
    v = table.shape[0]
    one = g.add_const(1.0, "one")
    col = emit("Reshape", [idx, g.add_const([*shape, 1], "shape", np.int64)])
    d = emit("Abs", [emit("Sub", [col, g.add_const(np.arange(v, dtype=np.float32), "arange")])])
    onehot = emit("Relu", [emit("Sub", [one, d])])
    flat = table.reshape(v, -1).astype(np.float32)
    prod = emit("MatMul", [onehot, g.add_const(flat, "table")])
    return emit("Reshape", [prod, g.add_const([*shape, *table.shape[1:]], "shape", np.int64)],
                out)


# --- 3. CumSum over a fixed axis -> MatMul with a triangular constant ----------------------

@lowering_pass("cumsum-matmul")
def cumsum_to_matmul(g: Graph, ctx: Context) -> tuple[Any, str] | None:
    """CumSum(x, axis) -> x @ U along that axis (U[i, j] = 1 where i <= j, shifted for
    exclusive, flipped for reverse); other axes moved out of the way by Transpose."""
    found = [n for n in g.nodes if n.op_type == "CumSum"]
    if not found:
        return None
    new = []
    for n in g.nodes:
        if n not in found:
            new.append(n)
            continue
        shape, axis = g.shape(n.input[0]), g.const(n.input[1])
        if shape is None or axis is None or g.elem(n.input[0]) != FLOAT:
            raise NotApplicable("CumSum of non-float data or at a run-time axis")
        rank, ax = len(shape), int(axis.reshape(-1)[0]) % len(shape)
        k = shape[ax]
        i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
        excl, rev = g.attr(n, "exclusive", 0), g.attr(n, "reverse", 0)
        u = (i >= j) if rev else (i <= j)
        if excl:
            u &= i != j
        tri = g.add_const(u.astype(np.float32), "tri")
        x = n.input[0]
        if ax != rank - 1:
            perm = [d for d in range(rank) if d != ax] + [ax]
            node, x = g.make("Transpose", [x], perm=perm)
            new.append(node)
            node, y = g.make("MatMul", [x, tri])
            new.append(node)
            inv = list(np.argsort(perm))
            new.append(g.make("Transpose", [y], n.output[0], perm=inv)[0])
        else:
            new.append(g.make("MatMul", [x, tri], n.output[0])[0])
    return g.model(new), f"CumSum x{len(found)} -> MatMul with a triangular constant"


# --- 4. Gather / GatherND / GatherElements at constant indices -> Slice / Reshape / MatMul --

@lowering_pass("gather-select")
def gather_at_constant_indices(g: Graph, ctx: Context) -> tuple[Any, str] | None:
    """A gather at constant indices is a fixed selection: GatherND -> Reshape + Gather on the
    flattened leading axes; Gather whose flat indices are an arithmetic run -> Slice (+Reshape);
    otherwise, on the last axis, a MatMul with a constant 0/1 selection matrix. A gather of a
    constant table at constant indices is folded."""
    found = [n for n in g.nodes if n.op_type in ("Gather", "GatherND", "GatherElements")
             and n.input[1] in g.consts and not (n.op_type == "Gather" and n.input[0] in
                                                 g.consts and n.input[1] in g.inputs)]
    if not found:
        return None
    new: list[Any] = []

    def emit(op: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        node, name = g.make(op, inputs, out, hint=op.lower(), **attrs)
        new.append(node)
        return name

    kinds = []
    for n in g.nodes:
        if n not in found:
            new.append(n)
            continue
        data, idx, o = n.input[0], g.consts[n.input[1]].astype(np.int64), n.output[0]
        shape, oshape = g.shape(data), g.shape(o)
        if shape is None or oshape is None:
            raise NotApplicable(f"{n.op_type} with unknown shapes")
        if data in g.consts:  # constant folding
            value = _eval_gather(n, g.consts[data], idx, g)
            emit("Identity", [g.add_const(value, "folded", value.dtype)], o)
            kinds.append(f"{n.op_type} folded")
            continue
        if n.op_type == "GatherND":
            if g.attr(n, "batch_dims", 0) != 0:
                raise NotApplicable("GatherND with batch_dims")
            k = idx.shape[-1]
            idx = np.where(idx < 0, idx + np.array(shape[:k]), idx)
            flat_idx = np.ravel_multi_index(tuple(np.moveaxis(idx, -1, 0)), shape[:k])
            x = emit("Reshape", [data, g.add_const([int(np.prod(shape[:k])), *shape[k:]],
                                                   "shape", np.int64)])
            _select(g, emit, x, [int(np.prod(shape[:k])), *shape[k:]], 0, flat_idx, o, oshape)
            kinds.append("GatherND")
        elif n.op_type == "Gather":
            axis = g.attr(n, "axis", 0) % len(shape)
            idx = np.where(idx < 0, idx + shape[axis], idx)
            _select(g, emit, data, shape, axis, idx, o, oshape)
            kinds.append("Gather")
        else:
            axis = g.attr(n, "axis", 0) % len(shape)
            # GatherElements at constant indices that pick the same position along every
            # other axis reduces to a Gather along axis
            moved = np.moveaxis(idx, axis, -1).reshape(-1, idx.shape[axis])
            if list(idx.shape) != oshape:
                raise NotApplicable("GatherElements with broadcast indices")
            if (moved == moved[:1]).all():
                sel = emit("Gather", [data, g.add_const(moved[0], "idx", np.int64)], axis=axis)
                emit("Identity", [sel], o)
                kinds.append("GatherElements")
                continue
            _row_select(g, emit, data, shape, axis, np.where(idx < 0, idx + shape[axis], idx),
                        o, oshape)
            kinds.append("GatherElements (per row)")
    return g.model(new), ", ".join(kinds) + " at constant indices -> Slice/Reshape/MatMul"


_ROW_SELECT_MAX = 1 << 22  # elements of the per-row selection tensor (16 MB in fp32)


def _row_select(g: Graph, emit: Callable[..., str], x: str, shape: list[int], axis: int,
                idx: np.ndarray, out: str, oshape: list[int]) -> None:
    """GatherElements on the last axis whose constant indices vary with the row (the axis
    before it) but not with the axes in front (DeBERTa's relative-position gathers:
    out[..., i, j] = x[..., i, idx[i, j]]): each row times its own 0/1 selection matrix, a
    batched MatMul [L, R, 1, K] x [R, K, J] -> [L, R, 1, J]."""
    rank = len(shape)
    if rank < 2 or axis != rank - 1:
        raise NotApplicable("GatherElements at constant per-row indices off the last axis")
    rows, k, j = shape[-2], shape[-1], oshape[-1]
    if oshape[:-1] != shape[:-1]:
        raise NotApplicable("GatherElements whose output and data differ in front of the axis")
    lead = idx.reshape(-1, rows, j)
    if not (lead == lead[:1]).all():
        raise NotApplicable("GatherElements at constant indices that vary in front of the rows")
    if rows * k * j > _ROW_SELECT_MAX:
        raise NotApplicable(f"GatherElements per-row selection too large ({rows}x{k}x{j})")
    sel = np.zeros((rows, k, j), np.float32)
    r_i, c_i = np.meshgrid(np.arange(rows), np.arange(j), indexing="ij")
    sel[r_i, lead[0], c_i] = 1
    shp = lambda s: g.add_const(s, "shape", np.int64)  # noqa: E731
    lead_n = int(np.prod(shape[:-2]))
    y = emit("Reshape", [x, shp([lead_n, rows, 1, k])])
    y = emit("MatMul", [y, g.add_const(sel, "row_select")])
    emit("Reshape", [y, shp(oshape)], out)


def _eval_gather(n: Any, data: np.ndarray, idx: np.ndarray, g: Graph) -> np.ndarray:
    axis = g.attr(n, "axis", 0)
    if n.op_type == "Gather":
        return np.take(data, idx, axis=axis)
    if n.op_type == "GatherElements":
        return np.take_along_axis(data, idx, axis=axis)
    return data[tuple(np.moveaxis(idx, -1, 0))]


def _select(g: Graph, emit: Callable[..., str], x: str, shape: list[int], axis: int,
            idx: np.ndarray, out: str, oshape: list[int]) -> None:
    flat = idx.reshape(-1)
    shp = lambda s: g.add_const(s, "shape", np.int64)  # noqa: E731
    if flat.size == 1 or (flat.size > 1 and len(set(np.diff(flat))) == 1 and np.diff(flat)[0] > 0):
        step = int(flat[1] - flat[0]) if flat.size > 1 else 1
        y = emit("Slice", [x, shp([int(flat[0])]), shp([int(flat[-1]) + 1]), shp([axis]),
                           shp([step])])
        emit("Reshape", [y, shp(oshape)], out)
        return
    if axis != len(shape) - 1:
        raise NotApplicable("gather at scattered constant indices on an axis other than the last")
    sel = np.zeros((shape[axis], flat.size), np.float32)
    sel[flat, np.arange(flat.size)] = 1
    y = emit("MatMul", [x, g.add_const(sel, "select")])
    emit("Reshape", [y, shp(oshape)], out)


# --- 5. Clip / Min / Max with constant bounds ----------------------------------------------

@lowering_pass("clip-bounds")
def constant_clip_bounds(g: Graph, ctx: Context) -> tuple[Any, str] | None:
    """Clip bounds become scalar float constants (the converter reads them as parameters;
    a missing bound is written as +/-finfo max); Min/Max with a uniform constant side become
    Clip."""
    new, k = [], 0
    big = float(np.finfo(np.float32).max)
    for n in g.nodes:
        if n.op_type == "Clip" and g.elem(n.input[0]) == FLOAT:
            bounds = [n.input[j] if len(n.input) > j else "" for j in (1, 2)]
            vals = [g.const(b) if b else np.array(d, np.float32)
                    for b, d in zip(bounds, (-big, big))]
            if any(v is None for v in vals):
                new.append(n)
                continue
            if all(b and g.const(b).ndim == 0 and g.const(b).dtype == np.float32 for b in bounds):
                new.append(n)
                continue
            new.append(g.make("Clip", [n.input[0], g.add_const(float(vals[0].reshape(-1)[0]), "lo"),
                                       g.add_const(float(vals[1].reshape(-1)[0]), "hi")],
                              n.output[0])[0])
            k += 1
            continue
        if n.op_type in ("Min", "Max") and len(n.input) == 2:
            c = [j for j in (0, 1) if n.input[j] in g.consts]
            other = 1 - c[0] if len(c) == 1 else None
            if other is not None and g.elem(n.input[other]) == FLOAT \
                    and g.shape(n.input[other]) == g.shape(n.output[0]):
                v = g.consts[n.input[c[0]]]
                if v.size and (v == v.reshape(-1)[0]).all():
                    lo, hi = (-big, float(v.reshape(-1)[0])) if n.op_type == "Min" else \
                        (float(v.reshape(-1)[0]), big)
                    new.append(g.make("Clip", [n.input[other], g.add_const(lo, "lo"),
                                               g.add_const(hi, "hi")], n.output[0])[0])
                    k += 1
                    continue
        new.append(n)
    if not k:
        return None
    return g.model(new), f"{k} Clip/Min/Max -> Clip with scalar constant bounds"


# --- Unsqueeze/Squeeze/Flatten -> Reshape with an explicit shape ---------------------------

@lowering_pass("explicit-reshape")
def explicit_reshape(g: Graph, ctx: Context) -> tuple[Any, str] | None:
    """Unsqueeze/Squeeze/Flatten with a known output shape -> Reshape to that shape (pnnx turns
    Unsqueeze into an ncnn ExpandDims that ignores ncnn's missing batch axis)."""
    new, k = [], 0
    for n in g.nodes:
        shape = g.shape(n.output[0]) if n.output else None
        if n.op_type in ("Unsqueeze", "Squeeze", "Flatten") and shape is not None:
            new.append(g.make("Reshape", [n.input[0], g.add_const(shape, "shape", np.int64)],
                              n.output[0])[0])
            k += 1
        else:
            new.append(n)
    if not k:
        return None
    return g.model(new), f"{k} Unsqueeze/Squeeze/Flatten -> Reshape with explicit shapes"


# --- 6. ranks above the target's maximum -> lower-rank Reshape/Transpose -------------------

@lowering_pass("rank-reduce")
def reduce_rank(g: Graph, ctx: Context) -> tuple[Any, str] | None:
    """A Transpose of a tensor above the target's rank: size-1 axes dropped and axes the
    permutation keeps adjacent and in order merged, so Reshape -> Transpose -> Reshape runs at
    the lowest rank that expresses it (Swin's window partition/reverse: 6-D -> 4-D). Reshapes
    producing a high-rank tensor read only by such Transposes are merged into them."""
    high = [n for n in g.nodes if n.op_type == "Transpose" and g.shape(n.input[0])
            and len(g.shape(n.input[0])) > ctx.max_rank]
    if not high:
        return None
    new, k = [], 0
    shp = lambda s: g.add_const(s, "shape", np.int64)  # noqa: E731
    for n in g.nodes:
        if n not in high:
            new.append(n)
            continue
        shape = g.shape(n.input[0])
        perm = list(g.attr(n, "perm"))
        keep = [a for a in range(len(shape)) if shape[a] != 1]
        perm_k = [a for a in perm if a in keep]
        groups: list[list[int]] = []  # runs of input axes adjacent in input and output
        for a in perm_k:
            if groups and keep.index(a) == keep.index(groups[-1][-1]) + 1:
                groups[-1].append(a)
            else:
                groups.append([a])
        order = sorted(groups, key=lambda grp: grp[0])
        merged = [int(np.prod([shape[a] for a in grp])) for grp in order]
        mperm = [order.index(grp) for grp in groups]
        if len(merged) > ctx.max_rank:
            raise NotApplicable(f"Transpose {perm} of {shape} needs rank {len(merged)}")
        x = n.input[0]
        node, x = g.make("Reshape", [x, shp(merged)])
        new.append(node)
        node, y = g.make("Transpose", [x], perm=mperm)
        new.append(node)
        new.append(g.make("Reshape", [y, shp(g.shape(n.output[0]))], n.output[0])[0])
        k += 1
    m = g.model(new)
    return m, f"{k} Transpose(s) above rank {ctx.max_rank} -> merged-axis Reshape/Transpose"


# --- 7. opset conversion -------------------------------------------------------------------

@lowering_pass("opset")
def convert_opset(g: Graph, ctx: Context) -> tuple[Any, str] | None:
    """A model newer than the tool's opset is converted down (onnx.version_converter)."""
    import onnx
    from onnx import version_converter

    m = g.model()
    have = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    if ctx.max_opset is None or have is None or have <= ctx.max_opset:
        return None
    out = version_converter.convert_version(m, ctx.max_opset)
    onnx.checker.check_model(out)
    return out, f"opset {have} -> {ctx.max_opset} (onnx.version_converter)"


# --- 1b. infinite / finfo-sized mask constants -> finite large values ----------------------

@lowering_pass("finite-masks")
def finite_mask_constants(g: Graph, ctx: Context) -> tuple[Any, str] | None:
    """Float constants holding -inf/+inf or finfo-sized values (|v| >= 1e30) that feed
    Where/Add/Sub/Min/Max (mask fills and additive biases) -> -1e4/1e4: exp still underflows
    to 0 in fp32, fp16 keeps it finite, and no Inf/NaN reaches the target (a fully masked
    softmax row then averages instead of giving NaN; the check inputs decide)."""
    readers = {"Where", "Add", "Sub", "Min", "Max"}
    hit = sorted({x for n in g.nodes if n.op_type in readers for x in n.input
                  if x in g.consts and g.consts[x].dtype.kind == "f"
                  and (~np.isfinite(g.consts[x]) | (np.abs(g.consts[x]) >= 1e30)).any()})
    if not hit:
        return None
    for x in hit:
        a = g.consts[x].astype(np.float64)
        huge = ~np.isfinite(a) | (np.abs(a) >= 1e30)
        fixed = np.where(huge, np.sign(np.nan_to_num(a)) * 1e4, a).astype(g.consts[x].dtype)
        for init in g.g.initializer:
            if init.name == x:
                init.CopyFrom(_init(fixed, x))
        g.consts[x] = fixed
    return g.model(), f"{len(hit)} infinite/finfo mask constant(s) -> +-1e4"


# --- canonical form: attributes equal to their schema default are dropped -----------------

@lowering_pass("default-attributes")
def drop_default_attributes(g: Graph, ctx: Context) -> tuple[Any, str] | None:
    """Attributes spelled out at their schema default are dropped (a no-op in ONNX, but
    converters match patterns on the canonical form: pnnx makes an embedding Gather an ncnn
    Embed only without the explicit ``axis=0`` the torch.export-based exporter writes)."""
    import onnx
    from onnx import defs, helper

    version = next((o.version for o in g._m.opset_import if o.domain in ("", "ai.onnx")), 21)
    k, ops = 0, set()
    for n in g.nodes:
        if n.domain not in ("", "ai.onnx"):
            continue
        try:
            schema = defs.get_schema(n.op_type, version, "")
        except Exception:
            continue
        keep = []
        for a in n.attribute:
            spec = schema.attributes.get(a.name)
            default = spec.default_value if spec is not None else None
            if default is not None and default.type == a.type and default.type != 0 and \
                    helper.get_attribute_value(default) == helper.get_attribute_value(a):
                k += 1
                ops.add(n.op_type)
                continue
            keep.append(a)
        if len(keep) != len(n.attribute):
            del n.attribute[:]
            n.attribute.extend(keep)
    if not k:
        return None
    return g.model(), f"{k} attribute(s) at their default dropped ({', '.join(sorted(ops))})"


# --- reductions over constant axes -> MatMul with a ones vector ----------------------------

@lowering_pass("reduce-matmul")
def reduce_to_matmul(g: Graph, ctx: Context) -> tuple[Any, str] | None:
    """ReduceSum/ReduceMean/ReduceL2 over constant axes given as an input (opset 13+/18+)
    -> MatMul with a ones (or 1/n) vector per axis, x*x and Sqrt around it for L2 (pnnx 20261020
    writes such reductions with an empty axes list: ncnn then reduces nothing)."""
    found = [n for n in g.nodes if n.op_type in ("ReduceSum", "ReduceMean", "ReduceL2")
             and len(n.input) > 1 and n.input[1] and n.input[1] in g.consts
             and g.elem(n.input[0]) == FLOAT]
    if not found:
        return None
    new: list[Any] = []

    def emit(op: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        node, name = g.make(op, inputs, out, hint=op.lower(), **attrs)
        new.append(node)
        return name

    for n in g.nodes:
        if n not in found:
            new.append(n)
            continue
        shape, oshape = g.shape(n.input[0]), g.shape(n.output[0])
        if shape is None or oshape is None:
            raise NotApplicable(f"{n.op_type} with unknown shapes")
        rank = len(shape)
        axes = sorted({int(a) % rank for a in g.consts[n.input[1]].reshape(-1)}) or \
            list(range(rank))
        x = n.input[0]
        if n.op_type == "ReduceL2":
            x = emit("Mul", [x, x])
        cur = list(shape)
        for a in axes:
            k = cur[a]
            w = (1.0 / k) if n.op_type == "ReduceMean" else 1.0
            if a == rank - 1:  # x @ ones[k, 1]
                vec = np.full([1] * (rank - 2) + [k, 1], w, np.float32) if rank >= 2 else \
                    np.full([k, 1], w, np.float32)
                x = emit("MatMul", [x, g.add_const(vec, "ones")])
            else:  # move the axis next to last: ones[1, k] @ x
                perm = [d for d in range(rank) if d not in (a, rank - 1)] + [a, rank - 1]
                if perm != list(range(rank)):
                    x = emit("Transpose", [x], perm=perm)
                vec = np.full([1] * (rank - 2) + [1, k], w, np.float32)
                x = emit("MatMul", [g.add_const(vec, "ones"), x])
                if perm != list(range(rank)):
                    x = emit("Transpose", [x], perm=list(np.argsort(perm)))
            cur[a] = 1
        if n.op_type == "ReduceL2":
            x = emit("Sqrt", [x])
        emit("Reshape", [x, g.add_const(oshape, "shape", np.int64)], n.output[0])
    return g.model(new), f"{_count(found)} over constant axes -> MatMul with a ones vector"


# --- additive attention masks expanded along the query axis --------------------------------

@lowering_pass("mask-broadcast")
def expand_softmax_bias(g: Graph, ctx: Context) -> tuple[Any, str] | None:
    """Add(scores, bias) read by Softmax, with the bias broadcast along the query axis (size 1
    at axis -2 where the scores have more) -> the bias Expanded along that axis first (pnnx
    fuses the pattern into ncnn's SDPA layer, which does not broadcast its mask over queries:
    seen as 0.3 off with a [1,1,1,S] padding mask, exact with [1,1,S,S])."""
    new, k = [], 0
    soft_in = {n.input[0] for n in g.nodes if n.op_type == "Softmax"}
    for n in g.nodes:
        if n.op_type == "Add" and n.output[0] in soft_in:
            out = g.shape(n.output[0])
            for j, x in enumerate(n.input):
                s = g.shape(x)
                if out and s and len(out) >= 2 and x not in g.consts and len(s) == len(out) \
                        and s[-2] == 1 and out[-2] > 1:
                    target = list(s)
                    target[-2] = out[-2]
                    node, y = g.make("Expand", [x, g.add_const(target, "shape", np.int64)])
                    new.append(node)
                    n.input[j] = y
                    k += 1
        new.append(n)
    if not k:
        return None
    return g.model(new), f"{k} Softmax bias(es) expanded along the query axis"


# --- strided slices -> Reshape + unit-step Slice -------------------------------------------

@lowering_pass("strided-slice")
def strided_slice(g: Graph, ctx: Context) -> tuple[Any, str] | None:
    """Slice with a step > 1 along an axis of size n (n % step == 0) -> Reshape to
    [1, before, n/step, step*after], a unit-step Slice of the phase and the run, Reshape back
    (ncnn's Crop has no step; Swin's patch merging x[:, 0::2, 1::2] is one)."""
    found = []
    for n in g.nodes:
        if n.op_type != "Slice" or len(n.input) < 5 or not all(x in g.consts for x in n.input[1:5]):
            continue
        if (g.consts[n.input[4]] != 1).any():
            found.append(n)
    if not found:
        return None
    new: list[Any] = []
    shp = lambda s: g.add_const(list(s), "shape", np.int64)  # noqa: E731

    def emit(op: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        node, name = g.make(op, inputs, out, hint=op.lower(), **attrs)
        new.append(node)
        return name

    for n in g.nodes:
        if n not in found:
            new.append(n)
            continue
        shape = g.shape(n.input[0])
        if shape is None:
            raise NotApplicable("Slice of unknown shape")
        starts, ends, axes, steps = (g.consts[x].reshape(-1).tolist() for x in n.input[1:5])
        cur, cur_shape = n.input[0], list(shape)
        for st, en, ax, sp in zip(starts, ends, axes, steps, strict=True):
            a = int(ax) % len(shape)
            size = cur_shape[a]
            if sp < 1:
                raise NotApplicable("Slice with a negative step")
            st, en = (max(0, min(size, v + size if v < 0 else v)) for v in (int(st), int(en)))
            count = len(range(st, en, int(sp)))
            if sp == 1:
                cur = emit("Slice", [cur, shp([st]), shp([en]), shp([a])])
            else:
                if size % sp:
                    raise NotApplicable(f"Slice step {sp} does not divide the axis ({size})")
                before = int(np.prod(cur_shape[:a]))
                after = int(np.prod(cur_shape[a + 1:]))
                r = emit("Reshape", [cur, shp([1, before, size // sp, sp * after])])
                phase, first = st % sp, st // sp
                cur = emit("Slice", [r, shp([first, phase * after]),
                                     shp([first + count, (phase + 1) * after]), shp([2, 3])])
            cur_shape[a] = count
            cur = emit("Reshape", [cur, shp(cur_shape)])
        emit("Identity", [cur], n.output[0])
    return g.model(new), f"{len(found)} strided Slice(s) -> Reshape + unit-step Slice"


# --- InstanceNormalization -> LayerNormalization over the spatial axes ---------------------

@lowering_pass("instance-norm")
def instance_norm_to_layer_norm(g: Graph, ctx: Context) -> tuple[Any, str] | None:
    """InstanceNormalization(x[N, C, *spatial], scale, bias) -> Reshape to [N, C, prod(spatial)]
    + LayerNormalization over the last axis (unit scale, zero bias, same epsilon; both use the
    biased variance) + Reshape back + the per-channel scale and bias as Mul/Add (skipped when
    1 and 0). pnnx turns a rank-3 InstanceNormalization into nn.InstanceNorm1d, a layer ncnn
    cannot create (wav2vec2's GroupNorm with groups == channels is one); LayerNorm it runs."""
    found = [n for n in g.nodes if n.op_type == "InstanceNormalization"]
    if not found:
        return None
    opset = next((o.version for o in g._m.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 17:
        raise NotApplicable(f"LayerNormalization needs opset 17 (the graph has {opset})")
    new: list[Any] = []
    shp = lambda s: g.add_const(list(s), "shape", np.int64)  # noqa: E731

    def emit(op: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        node, name = g.make(op, inputs, out, hint=op.lower(), **attrs)
        new.append(node)
        return name

    for n in g.nodes:
        if n not in found:
            new.append(n)
            continue
        shape = g.shape(n.input[0])
        if shape is None or len(shape) < 3:
            raise NotApplicable("InstanceNormalization of unknown shape")
        if g.elem(n.input[0]) != FLOAT:
            raise NotApplicable("InstanceNormalization on a non-fp32 tensor")
        scale, bias = g.const(n.input[1]), g.const(n.input[2])
        eps = float(g.attr(n, "epsilon", 1e-5))
        c, spatial = shape[1], int(np.prod(shape[2:]))
        flat = [shape[0], c, spatial]
        cur = n.input[0] if len(shape) == 3 else emit("Reshape", [n.input[0], shp(flat)])
        cur = emit("LayerNormalization", [cur, g.add_const(np.ones(spatial), "ln_scale"),
                                          g.add_const(np.zeros(spatial), "ln_bias")],
                   axis=-1, epsilon=eps)
        if len(shape) != 3:
            cur = emit("Reshape", [cur, shp(shape)])
        per_channel = [c] + [1] * (len(shape) - 2)
        if scale is None or not np.all(scale == 1):
            s = n.input[1] if scale is None else g.add_const(scale.reshape(per_channel), "in_scale")
            if scale is None:
                s = emit("Reshape", [s, shp(per_channel)])
            cur = emit("Mul", [cur, s])
        if bias is None or not np.all(bias == 0):
            b = n.input[2] if bias is None else g.add_const(bias.reshape(per_channel), "in_bias")
            if bias is None:
                b = emit("Reshape", [b, shp(per_channel)])
            cur = emit("Add", [cur, b])
        emit("Identity", [cur], n.output[0])
    return g.model(new), f"{len(found)} InstanceNormalization -> LayerNormalization"


# --- bias-free attention projections get an explicit (negligible) bias ---------------------

_TINY = float(np.finfo(np.float32).smallest_subnormal)  # x + 1.4e-45 == x for every normal x


def _through_layout(g: Graph, name: str) -> Any:
    """The producer of ``name`` skipping Reshape/Transpose."""
    n = g.producer(name)
    while n is not None and n.op_type in ("Reshape", "Transpose"):
        n = g.producer(n.input[0])
    return n


@lowering_pass("attention-bias")
def attention_projection_bias(g: Graph, ctx: Context) -> tuple[Any, str] | None:
    """Attention projections without a bias (MatMul by a constant weight, no Add after it) get
    an Add of the smallest fp32 subnormal (x + 1.4e-45 rounds back to x for any normal x; not
    zero, so neither onnxsim nor pnnx drops it). pnnx fuses such an attention into
    nn.MultiheadAttention(bias=False), and its ncnn writer then reads in_proj_bias and
    out_proj.bias unconditionally: pnnx aborts with map::at (BART/Marian dynamo exports, whose
    zero biases the exporter folded away). Projections: two or more bias-free MatMuls reading
    the same tensor (q/k/v), and a bias-free MatMul reading the softmax-weighted values."""
    def bias_free(n: Any) -> bool:
        if n.op_type != "MatMul":
            return False
        w = g.const(n.input[1])
        if w is None or w.ndim != 2 or g.elem(n.output[0]) != FLOAT:
            return False
        return not any(c.op_type == "Add" and any(g.const(i) is not None for i in c.input)
                       for c in g.consumers(n.output[0]))

    cands = [n for n in g.nodes if bias_free(n)]
    found = []
    for n in cands:
        siblings = [m for m in cands if m.input[0] == n.input[0]]
        src = _through_layout(g, n.input[0])
        weighted = src is not None and src.op_type == "MatMul" and any(
            (p := g.producer(i)) is not None and p.op_type == "Softmax" for i in src.input)
        if len(siblings) >= 2 or weighted:
            found.append(n)
    if not found:
        return None
    new: list[Any] = []
    for n in g.nodes:
        if n not in found:
            new.append(n)
            continue
        cols = int(g.const(n.input[1]).shape[1])
        node, mm = g.make("MatMul", list(n.input), hint="matmul")
        new.append(node)
        node, _ = g.make("Add", [mm, g.add_const(np.full(cols, _TINY, np.float32), "tiny_bias")],
                         n.output[0])
        new.append(node)
    return g.model(new), f"{len(found)} bias-free attention projection(s) + a 1.4e-45 bias"
