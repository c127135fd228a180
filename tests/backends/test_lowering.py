"""Lowering passes (mtconvert.backends.lowering): each pass on a minimal onnx.helper graph,
checked against ONNX Runtime (fast, no pnnx); the driver's rejection of a rewrite that changes
outputs; and real transformers models end to end on ncnn, one per failure class (slow)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mtconvert.backends.lowering import (NCNN, Capability, lower, simplify, unsupported_ops)
from mtconvert.backends.lowering.passes import PASSES, lowering_pass

F, I64, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
FMIN = float(np.finfo(np.float32).min)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                          [helper.make_tensor_value_info(*o) for o in outputs],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8 if opset <= 17 else 10
    onnx.checker.check_model(m)
    return m


def _shapes(m):
    return {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input
            if i.name not in {x.name for x in m.graph.initializer}}


def _only(*names, **kw):
    return Capability(name="test", passes=tuple(names), **kw)


def _ops(m):
    return {n.op_type for n in m.graph.node}


def _run(m, feeds):
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in s.get_inputs()}
    cast = {k: v.astype(np.float32) if types[k] == "tensor(float)" else v for k, v in feeds.items()}
    return s.run(None, cast)


def _assert_same(a, b, feeds_list):
    for feeds in feeds_list:
        for x, y in zip(_run(a, feeds), _run(b, feeds), strict=True):
            assert np.abs(np.asarray(x, np.float64) - y).max() <= 1e-5


def _masks(s=8, dtype=np.int64):
    out = []
    for keep in (s, s - 1, s // 2):
        out.append((np.arange(s) < keep).astype(dtype)[None])
    return out


def _attention_mask_graph(mask_type=I64, fill=FMIN):
    """HF-style: mask -> bool -> And(causal) -> Where(0, fill) -> + scores -> Softmax."""
    causal = np.tril(np.ones((8, 8), bool))[None, None]
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["mb"], to=B) if mask_type != B
        else helper.make_node("Identity", ["attention_mask"], ["mb"]),
        helper.make_node("Reshape", ["mb", "s4"], ["m4"]),
        helper.make_node("And", ["causal", "m4"], ["allowed"]),
        helper.make_node("Not", ["allowed"], ["blocked"]),
        helper.make_node("Where", ["blocked", "fill", "zero"], ["bias"]),
        helper.make_node("Add", ["scores", "bias"], ["z"]),
        helper.make_node("Softmax", ["z"], ["probs"], axis=-1),
    ]
    return _model(nodes, [("attention_mask", mask_type, [1, 8]), ("scores", F, [1, 2, 8, 8])],
                  [("probs", F, [1, 2, 8, 8])],
                  {"causal": causal, "s4": np.array([1, 1, 1, 8]),
                   "fill": np.array(fill, np.float32), "zero": np.array(0.0, np.float32)})


# --- 1. bool / compare / logical / Where -> float arithmetic -------------------------------

def test_a_float_mask_input_cast_to_integers_is_read_as_its_0_1_values():
    """An ONNX graph made static from an Optimum export reads a float mask and casts it to the
    int64 mask its attention logic expects."""
    m = _attention_mask_graph(I64)
    cast = m.graph.node[0]
    m.graph.node.insert(0, helper.make_node("Cast", ["attention_mask_f"], ["attention_mask"],
                                            to=I64))
    del m.graph.input[0]
    m.graph.input.insert(0, helper.make_tensor_value_info("attention_mask_f", F, [1, 8]))
    assert cast.input[0] == "attention_mask"
    done = lower(m, _shapes(m), NCNN)
    assert "logic-to-float" in done.applied, done.steps
    assert not _ops(done.model) & {"And", "Not", "Where", "Cast"}
    assert any("attention_mask_f (a float mask input) cast as its 0/1 values" in s
               for s in done.steps)
    rng = np.random.default_rng(0)
    _assert_same(m, done.model, [{"attention_mask_f": mk, "scores": rng.standard_normal(
        (1, 2, 8, 8)).astype(np.float32)} for mk in _masks(dtype=np.float32)])


@pytest.mark.parametrize("mask_type", [I64, B, F])
def test_logic_to_float_on_int_and_bool_masks(mask_type):
    m = _attention_mask_graph(mask_type)
    done = lower(m, _shapes(m), NCNN)
    assert "logic-to-float" in done.applied, done.steps
    assert not _ops(done.model) & {"And", "Not", "Where", "Cast", "Equal"}
    assert not [i for i in done.model.graph.input if i.type.tensor_type.elem_type == B]
    assert "-inf" not in " ".join(done.steps)
    bounds = {x for n in done.model.graph.node if n.op_type == "Clip" for x in n.input[1:]}
    consts = [numpy_helper.to_array(i) for i in done.model.graph.initializer]
    assert all(np.isfinite(c).all() for c in consts if c.dtype.kind == "f")
    assert all(np.abs(numpy_helper.to_array(i)).max(initial=0) <= 1e4
               for i in done.model.graph.initializer if i.name not in bounds)
    rng = np.random.default_rng(0)
    dt = {B: bool, F: np.float32}.get(mask_type, np.int64)
    _assert_same(m, done.model, [{"attention_mask": mk, "scores": rng.standard_normal(
        (1, 2, 8, 8)).astype(np.float32)} for mk in _masks(dtype=dt)])
    assert any(s.startswith("lower logic-to-float: ") and "ORT max abs" in s for s in done.steps)


def test_compare_ops_on_token_ids_become_arithmetic():
    """Equal/Less/GreaterOrEqual on ids (RoBERTa's padding test): ids also read by an
    embedding are read as float through a one-column identity embedding."""
    table = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
             helper.make_node("Equal", ["input_ids", "pad"], ["is_pad"]),
             helper.make_node("Less", ["input_ids", "five"], ["small"]),
             helper.make_node("GreaterOrEqual", ["input_ids", "five"], ["big"]),
             helper.make_node("Or", ["is_pad", "small"], ["either"]),
             helper.make_node("Xor", ["either", "big"], ["x"]),
             helper.make_node("Cast", ["x"], ["xf"], to=F),
             helper.make_node("Unsqueeze", ["xf", "ax"], ["x3"]),
             helper.make_node("Mul", ["emb", "x3"], ["out"])]
    m = _model(nodes, [("input_ids", I64, [1, 8])], [("out", F, [1, 8, 4])],
               {"table": table, "pad": np.array(1), "five": np.array(5), "ax": np.array([2])})
    done = lower(m, _shapes(m), NCNN)
    assert "logic-to-float" in done.applied, done.steps
    assert unsupported_ops(done.model, NCNN) == []
    assert "identity embedding" in " ".join(done.steps)
    ids = [np.array([[0, 1, 2, 5, 6, 19, 1, 4]]), np.arange(8)[None] * 2]
    _assert_same(m, done.model, [{"input_ids": i} for i in ids])


# --- 2. IsNaN / IsInf on values that cannot be NaN / Inf -----------------------------------

def test_nan_checks_on_finite_values_are_removed_and_others_kept():
    nodes = [helper.make_node("Cast", ["attention_mask"], ["mf"], to=F),
             helper.make_node("Mul", ["mf", "fill"], ["bias"]),
             helper.make_node("Add", ["scores", "bias"], ["z"]),
             helper.make_node("Softmax", ["z"], ["p"]),
             helper.make_node("IsNaN", ["p"], ["nan"]),          # softmax of finite: never NaN
             helper.make_node("Where", ["nan", "zero", "p"], ["p2"]),
             helper.make_node("Log", ["scores"], ["lg"]),         # log of floats: may be NaN
             helper.make_node("IsNaN", ["lg"], ["nan2"]),
             helper.make_node("Where", ["nan2", "zero", "lg"], ["l2"]),
             helper.make_node("Add", ["p2", "l2"], ["out"])]
    m = _model(nodes, [("attention_mask", I64, [1, 8]), ("scores", F, [1, 8])],
               [("out", F, [1, 8])], {"fill": np.array(FMIN, np.float32),
                                      "zero": np.array(0.0, np.float32)})
    done = lower(m, _shapes(m), _only("nan-checks"))
    assert done.applied == ["nan-checks"]
    assert [n.op_type for n in done.model.graph.node].count("IsNaN") == 1  # the Log one stays
    assert "1 left (value may be non-finite)" in done.steps[0]
    feeds = [{"attention_mask": mk, "scores": np.abs(np.random.default_rng(1).standard_normal(
        (1, 8))).astype(np.float32)} for mk in _masks()]
    _assert_same(m, done.model, feeds)


def test_nan_check_on_possibly_nan_value_is_not_applied():
    nodes = [helper.make_node("Log", ["x"], ["lg"]), helper.make_node("IsNaN", ["lg"], ["n"]),
             helper.make_node("Where", ["n", "zero", "lg"], ["out"])]
    m = _model(nodes, [("x", F, [1, 4])], [("out", F, [1, 4])],
               {"zero": np.array(0.0, np.float32)})
    done = lower(m, _shapes(m), _only("nan-checks"))
    assert done.applied == [] and "not applied (IsNaN on values that may be NaN/Inf)" in done.steps[0]


# --- 3. CumSum -> MatMul with a triangular constant ----------------------------------------

@pytest.mark.parametrize("axis,exclusive,reverse", [(1, 0, 0), (-1, 1, 0), (0, 0, 1), (1, 1, 1)])
def test_cumsum_becomes_triangular_matmul(axis, exclusive, reverse):
    nodes = [helper.make_node("CumSum", ["x", "axis"], ["out"], exclusive=exclusive,
                              reverse=reverse)]
    m = _model(nodes, [("x", F, [3, 6])], [("out", F, [3, 6])], {"axis": np.array(axis)})
    done = lower(m, _shapes(m), _only("cumsum-matmul"))
    assert done.applied == ["cumsum-matmul"] and "CumSum" not in _ops(done.model)
    rng = np.random.default_rng(2)
    _assert_same(m, done.model, [{"x": rng.standard_normal((3, 6)).astype(np.float32)}])


# --- 4. gathers at constant indices / of constant tables -----------------------------------

def test_gathernd_and_gather_at_constant_indices():
    idx_nd = np.stack(np.meshgrid([0], np.arange(8), indexing="ij"), -1).reshape(1, 1, 8, 2)
    nodes = [helper.make_node("GatherND", ["x", "idx_nd"], ["a"]),          # -> Slice/Reshape
             helper.make_node("Gather", ["x", "idx_sc"], ["b"], axis=1),     # scattered -> MatMul
             helper.make_node("Gather", ["x", "idx_run"], ["c"], axis=1),    # run -> Slice
             helper.make_node("ReduceSum", ["a", "ax"], ["a2"], keepdims=0),
             helper.make_node("ReduceSum", ["b", "ax"], ["b2"], keepdims=0),
             helper.make_node("ReduceSum", ["c", "ax"], ["c2"], keepdims=0),
             helper.make_node("Concat", ["a2", "b2", "c2"], ["out"], axis=0)]
    m = _model(nodes, [("x", F, [1, 8])], [("out", F, [3, 1])],
               {"idx_nd": idx_nd, "idx_sc": np.array([[3, 0, 7, 7]]), "idx_run": np.array([[2, 4, 6]]),
                "ax": np.array([-1])})
    m = simplify(m, _shapes(m))
    done = lower(m, _shapes(m), _only("gather-select"))
    assert done.applied == ["gather-select"]
    assert not _ops(done.model) & {"Gather", "GatherND"}
    rng = np.random.default_rng(3)
    _assert_same(m, done.model, [{"x": rng.standard_normal((1, 8)).astype(np.float32)}])


def test_position_ids_from_input_ids():
    """RoBERTa: positions = cumsum(ids != pad) * (ids != pad) + pad; a token-type buffer
    gathered at them (GatherElements of a uniform constant, folded) and the position table
    read at them (one-hot MatMul)."""
    rng = np.random.default_rng(4)
    words, pos, types = (rng.standard_normal(s).astype(np.float32) for s in
                         ((30, 4), (12, 4), (1, 4)))
    nodes = [helper.make_node("Gather", ["words", "input_ids"], ["we"]),
             helper.make_node("Equal", ["input_ids", "pad"], ["eq"]),
             helper.make_node("Not", ["eq"], ["ne"]),
             helper.make_node("Cast", ["ne"], ["m"], to=TensorProto.INT32),
             helper.make_node("CumSum", ["m", "one"], ["cs"]),
             helper.make_node("Mul", ["cs", "m"], ["inc"]),
             helper.make_node("Cast", ["inc"], ["inc64"], to=I64),
             helper.make_node("Add", ["inc64", "pad"], ["pos_ids"]),
             helper.make_node("GatherElements", ["tt_buf", "pos_ids"], ["tt"], axis=1),
             helper.make_node("Gather", ["types", "tt"], ["te"]),
             helper.make_node("Gather", ["pos", "pos_ids"], ["pe"]),
             helper.make_node("Add", ["we", "pe"], ["s"]),
             helper.make_node("Add", ["s", "te"], ["out"])]
    m = _model(nodes, [("input_ids", I64, [1, 8])], [("out", F, [1, 8, 4])],
               {"words": words, "pos": pos, "types": types, "pad": np.array(1),
                "one": np.array(1), "tt_buf": np.zeros((1, 12), np.int64)})
    done = lower(m, _shapes(m), NCNN)
    assert {"logic-to-float", "cumsum-matmul"} <= set(done.applied), done.steps
    assert unsupported_ops(done.model, NCNN) == [], done.steps
    ids = [np.array([[0, 5, 7, 9, 2, 1, 1, 1]]), rng.integers(2, 30, (1, 8))]
    _assert_same(m, done.model, [{"input_ids": i} for i in ids])


# --- 5. Clip / Min / Max with constant bounds ----------------------------------------------

def test_clip_min_max_constant_bounds():
    nodes = [helper.make_node("Clip", ["x", "lo"], ["a"]),
             helper.make_node("Min", ["a", "cap"], ["b"]),
             helper.make_node("Max", ["floor", "b"], ["out"])]
    m = _model(nodes, [("x", F, [2, 3])], [("out", F, [2, 3])],
               {"lo": np.array(1e-9, np.float32), "cap": np.full((2, 3), 0.5, np.float32),
                "floor": np.full((1, 3), -0.25, np.float32)})
    done = lower(m, _shapes(m), _only("clip-bounds"))
    assert done.applied == ["clip-bounds"] and _ops(done.model) == {"Clip"}
    for n in done.model.graph.node:
        assert len(n.input) == 3 and all(n.input[1:])  # both bounds, as constants
    x = np.random.default_rng(5).standard_normal((2, 3)).astype(np.float32)
    _assert_same(m, done.model, [{"x": x}])


# --- 6. ranks above the target's maximum ---------------------------------------------------

def test_swin_window_partition_and_reverse_fit_rank_4():
    """[1, H, W, C] -> [1, H/w, w, W/w, w, C] -> Transpose(0,1,3,2,4,5) -> windows, and back."""
    nodes = [helper.make_node("Reshape", ["x", "s6"], ["x6"]),
             helper.make_node("Transpose", ["x6"], ["t6"], perm=[0, 1, 3, 2, 4, 5]),
             helper.make_node("Reshape", ["t6", "win"], ["windows"]),
             helper.make_node("Relu", ["windows"], ["w2"]),
             helper.make_node("Reshape", ["w2", "s6b"], ["y6"]),
             helper.make_node("Transpose", ["y6"], ["u6"], perm=[0, 1, 3, 2, 4, 5]),
             helper.make_node("Reshape", ["u6", "back"], ["out"])]
    m = _model(nodes, [("x", F, [1, 8, 8, 3])], [("out", F, [1, 8, 8, 3])],
               {"s6": np.array([1, 2, 4, 2, 4, 3]), "win": np.array([4, 16, 3]),
                "s6b": np.array([1, 2, 2, 4, 4, 3]), "back": np.array([1, 8, 8, 3])})
    done = lower(m, _shapes(m), _only("rank-reduce", max_rank=4))
    assert done.applied == ["rank-reduce"]
    inferred = onnx.shape_inference.infer_shapes(done.model)
    ranks = [len(v.type.tensor_type.shape.dim) for v in inferred.graph.value_info]
    assert ranks and max(ranks) <= 4
    x = np.random.default_rng(6).standard_normal((1, 8, 8, 3)).astype(np.float32)
    _assert_same(m, done.model, [{"x": x}])


def test_strided_slice_becomes_unit_step():
    nodes = [helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["out"])]
    m = _model(nodes, [("x", F, [1, 8, 8, 4])], [("out", F, [1, 4, 4, 4])],
               {"st": np.array([1, 0]), "en": np.array([2 ** 62, 2 ** 62]),
                "ax": np.array([1, 2]), "sp": np.array([2, 2])})
    done = lower(m, _shapes(m), _only("strided-slice"))
    assert done.applied == ["strided-slice"]
    for n in done.model.graph.node:
        if n.op_type == "Slice" and len(n.input) > 4:
            assert (numpy_helper.to_array(next(i for i in done.model.graph.initializer
                                               if i.name == n.input[4])) == 1).all()
    x = np.random.default_rng(7).standard_normal((1, 8, 8, 4)).astype(np.float32)
    _assert_same(m, done.model, [{"x": x}])


# --- other ncnn passes ---------------------------------------------------------------------

def test_reductions_with_axes_inputs_become_matmuls():
    nodes = [helper.make_node("ReduceSum", ["x", "a1"], ["s"], keepdims=0),
             helper.make_node("ReduceMean", ["x", "a2"], ["mn"], keepdims=1),
             helper.make_node("ReduceL2", ["x", "a2"], ["l2"], keepdims=1)]
    m = _model(nodes, [("x", F, [1, 6, 5])], [("s", F, [1, 5]), ("mn", F, [1, 6, 1]),
                                               ("l2", F, [1, 6, 1])],
               {"a1": np.array([1]), "a2": np.array([-1])}, opset=18)
    done = lower(m, _shapes(m), _only("reduce-matmul"))
    assert done.applied == ["reduce-matmul"]
    assert not _ops(done.model) & {"ReduceSum", "ReduceMean", "ReduceL2"}
    x = np.random.default_rng(8).standard_normal((1, 6, 5)).astype(np.float32)
    _assert_same(m, done.model, [{"x": x}])


def test_softmax_bias_expanded_and_default_attributes_dropped():
    nodes = [helper.make_node("Add", ["scores", "bias"], ["z"]),
             helper.make_node("Softmax", ["z"], ["p"], axis=-1),
             helper.make_node("Gather", ["table", "ids"], ["e"], axis=0),
             helper.make_node("MatMul", ["p", "e"], ["out"])]
    m = _model(nodes, [("scores", F, [1, 2, 4, 4]), ("bias", F, [1, 1, 1, 4]),
                       ("ids", I64, [4])], [("out", F, [1, 2, 4, 3])],
               {"table": np.ones((10, 3), np.float32)})
    done = lower(m, _shapes(m), _only("default-attributes", "mask-broadcast"))
    assert done.applied == ["default-attributes", "mask-broadcast"]
    gather = next(n for n in done.model.graph.node if n.op_type == "Gather")
    assert not gather.attribute  # axis=0 is the default
    rng = np.random.default_rng(9)
    _assert_same(m, done.model, [{"scores": rng.standard_normal((1, 2, 4, 4)).astype(np.float32),
                                  "bias": rng.standard_normal((1, 1, 1, 4)).astype(np.float32),
                                  "ids": np.array([0, 3, 9, 2])}])


@pytest.mark.parametrize("shape", [[1, 4, 10], [2, 3, 4, 5]])
@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_becomes_layer_norm(shape, affine):
    """GroupNorm with groups == channels (wav2vec2's feature encoder) exports as
    InstanceNormalization; pnnx writes it as nn.InstanceNorm1d, a layer ncnn cannot create."""
    rng = np.random.default_rng(11)
    c = shape[1]
    scale = rng.standard_normal(c).astype(np.float32) if affine else np.ones(c, np.float32)
    bias = rng.standard_normal(c).astype(np.float32) if affine else np.zeros(c, np.float32)
    m = _model([helper.make_node("InstanceNormalization", ["x", "scale", "bias"], ["out"],
                                 epsilon=1e-3)],
               [("x", F, shape)], [("out", F, shape)], {"scale": scale, "bias": bias})
    done = lower(m, _shapes(m), _only("instance-norm"))
    assert done.applied == ["instance-norm"], done.steps
    assert "InstanceNormalization" not in _ops(done.model)
    assert "LayerNormalization" in _ops(done.model)
    _assert_same(m, done.model, [{"x": rng.standard_normal(shape).astype(np.float32) * 3 + 1}
                                 for _ in range(2)])


def test_batched_matmul_bias_is_not_fused_into_gemm_for_ncnn():
    """onnxsim fuses MatMul [1, S, K] + bias into Reshape [S, K] -> Gemm -> Reshape; pnnx writes
    that batch-dropping Reshape with ncnn batch axes (12=0 13=0), which ncnn runs as S items of
    [K] (an attention after it then fails): ncnn's simplifications keep MatMul + Add."""
    rng = np.random.default_rng(12)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("Add", ["y", "b"], ["z"]),
             helper.make_node("Relu", ["z"], ["out"])]
    m = _model(nodes, [("x", F, [1, 6, 8])], [("out", F, [1, 6, 4])],
               {"w": rng.standard_normal((8, 4)).astype(np.float32),
                "b": rng.standard_normal(4).astype(np.float32)})
    assert "Gemm" in _ops(simplify(m, _shapes(m)))  # onnxsim's default
    assert _ops(simplify(m, _shapes(m), NCNN.skipped_optimizers)) == {"MatMul", "Add", "Relu"}
    done = lower(m, _shapes(m), NCNN)
    assert "Gemm" not in _ops(done.model) and "Reshape" not in _ops(done.model)
    _assert_same(m, done.model, [{"x": rng.standard_normal((1, 6, 8)).astype(np.float32)}])


def test_gather_elements_at_per_row_constant_indices():
    """DeBERTa's relative-position gather: out[h, i, j] = c2p[h, i, clip(i - j + k)], indices
    that vary with the row i but not with the heads -> a per-row selection MatMul."""
    s, k = 6, 4
    rel = np.clip(np.arange(s)[:, None] - np.arange(s)[None, :] + k, 0, 2 * k - 1)
    idx = np.broadcast_to(rel, (1, 2, s, s)).astype(np.int64).copy()
    m = _model([helper.make_node("GatherElements", ["x", "idx"], ["g"], axis=-1),
                helper.make_node("Relu", ["g"], ["out"])],
               [("x", F, [1, 2, s, 2 * k])], [("out", F, [1, 2, s, s])], {"idx": idx})
    done = lower(m, _shapes(m), _only("gather-select"))
    assert done.applied == ["gather-select"], done.steps
    assert "GatherElements" not in _ops(done.model)
    rng = np.random.default_rng(13)
    _assert_same(m, done.model, [{"x": rng.standard_normal((1, 2, s, 2 * k)).astype(np.float32)}
                                 for _ in range(2)])


def test_bias_free_attention_projections_get_a_negligible_bias():
    """pnnx's ncnn writer for nn.MultiheadAttention(bias=False) aborts (map::at): the q/k/v
    projections (bias-free MatMuls sharing an input) and the output projection (after the
    softmax-weighted values) get an Add of the smallest subnormal, which onnxsim keeps."""
    rng = np.random.default_rng(14)
    w = {k: rng.standard_normal((8, 8)).astype(np.float32) for k in ("wq", "wk", "wv", "wo")}
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]),
             helper.make_node("MatMul", ["x", "wk"], ["k"]),
             helper.make_node("MatMul", ["x", "wv"], ["v"]),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["a"]),
             helper.make_node("MatMul", ["a", "wo"], ["out"])]
    m = _model(nodes, [("x", F, [1, 5, 8])], [("out", F, [1, 5, 8])], w)
    done = lower(m, _shapes(m), _only("attention-bias",
                                      skipped_optimizers=NCNN.skipped_optimizers))
    assert done.applied == ["attention-bias"], done.steps
    assert "4 bias-free attention projection(s)" in done.steps[0]
    assert [n.op_type for n in done.model.graph.node].count("Add") == 4
    _assert_same(m, done.model, [{"x": rng.standard_normal((1, 5, 8)).astype(np.float32)}])


# --- 7. opsets 17..21, version conversion, external data ------------------------------------

@pytest.mark.parametrize("opset", [17, 18, 19, 20, 21])
def test_every_current_opset_is_accepted_and_converted_down(opset):
    m = _attention_mask_graph()
    m.opset_import[0].version = opset
    m.ir_version = 8 if opset <= 17 else 10
    done = lower(m, _shapes(m), _only("opset", "logic-to-float", max_opset=17))
    assert "logic-to-float" in done.applied, done.steps
    assert done.model.opset_import[0].version == min(opset, 17)
    if opset > 17:
        assert done.steps[0].startswith(f"lower opset: opset {opset} -> 17 (onnx.version_converter)")
    _assert_same(m, done.model, [{"attention_mask": mk, "scores": np.zeros((1, 2, 8, 8),
                                                                           np.float32)}
                                 for mk in _masks()])


def test_prepare_reads_external_data(tmp_path):
    from mtconvert.backends.ncnn_rewrite import prepare

    m = _attention_mask_graph()
    big = np.random.default_rng(10).standard_normal((1, 2, 8, 8)).astype(np.float32)
    m.graph.initializer.append(numpy_helper.from_array(big, "offset"))
    m.graph.node.insert(5, helper.make_node("Add", ["scores", "offset"], ["scores2"]))
    m.graph.node[6].input[0] = "scores2"
    onnx.save(m, str(tmp_path / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    assert (tmp_path / "model.onnx.data").stat().st_size > big.nbytes
    info = prepare(str(tmp_path / "model.onnx"), str(tmp_path / "out.onnx"),
                   {"attention_mask": [1, 8], "scores": [1, 2, 8, 8]})
    assert info["input_dtypes"]["attention_mask"] == "float32"
    assert isinstance(info["steps"], list)
    out = onnx.load(str(tmp_path / "out.onnx"))
    _assert_same(onnx.load(str(tmp_path / "model.onnx")), out,
                 [{"attention_mask": mk, "scores": big} for mk in _masks()])


# --- the driver keeps only what ONNX Runtime agrees with -----------------------------------

def test_rewrite_that_changes_outputs_is_rejected():
    """A mask fill read directly by the output: -1e30 -> -1e4 changes it, so finite-masks is
    rejected; a deliberately wrong pass likewise. The graph stays as it was."""
    nodes = [helper.make_node("Cast", ["attention_mask"], ["mb"], to=B),
             helper.make_node("Where", ["mb", "x", "fill"], ["out"])]
    m = _model(nodes, [("attention_mask", I64, [1, 8]), ("x", F, [1, 8])], [("out", F, [1, 8])],
               {"fill": np.array(-1e30, np.float32)})
    done = lower(m, _shapes(m), _only("finite-masks"))
    assert done.applied == [] and done.rejected == ["finite-masks"]
    assert "rejected: changed outputs by" in done.steps[0]
    assert [n.op_type for n in done.model.graph.node] == ["Cast", "Where"]

    @lowering_pass("test-relu-to-identity")
    def wrong(g, ctx):  # noqa: ANN001, ANN202
        for n in g.nodes:
            if n.op_type == "Relu":
                n.op_type = "Identity"
        return g.model(), "Relu -> Identity (wrong on purpose)"

    try:
        r = _model([helper.make_node("Relu", ["x"], ["out"])], [("x", F, [1, 8])],
                   [("out", F, [1, 8])])
        done = lower(r, _shapes(r), _only("test-relu-to-identity"))
        assert done.rejected == ["test-relu-to-identity"] and _ops(done.model) == {"Relu"}
        assert done.steps == [done.steps[0]] and "rejected: changed outputs by" in done.steps[0]
    finally:
        PASSES.pop("test-relu-to-identity")


def test_mask_bias_from_finfo_min_becomes_finite():
    m = _attention_mask_graph(fill=float("-inf"))
    done = lower(m, _shapes(m), NCNN)
    assert "finite-masks" in done.applied
    for i in done.model.graph.initializer:
        a = numpy_helper.to_array(i)
        assert a.dtype.kind != "f" or np.isfinite(a).all()


# --- end to end: real transformers models on ncnn (pnnx + ncnn), one per failure class -------

def _ncnn_ready():
    from mtconvert.backends.ncnn import NcnnBackend

    return NcnnBackend.availability().can_convert


def slow_ncnn(fn):  # noqa: ANN001, ANN201
    return pytest.mark.slow(pytest.mark.skipif(not _ncnn_ready(),
                                               reason="pnnx/ncnn not installed")(fn))


def _export(module, args, names, path, dynamo=False):
    import torch

    with torch.no_grad():
        if dynamo:
            torch.onnx.export(module, args, str(path), dynamo=True, input_names=names,
                              output_names=["out"], external_data=True)
        else:
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=names,
                              output_names=["out"], opset_version=17)
    return path


def _text_module(kind, attn="eager"):
    import torch
    import transformers as T

    torch.manual_seed(0)
    if kind == "st":  # sentence-transformers: BertModel + mean pooling (clamp 1e-9) + normalize
        cfg = T.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=32, attn_implementation=attn)
        bert = T.BertModel(cfg, add_pooling_layer=False)

        def fn(ids, mask):
            h = bert(input_ids=ids, attention_mask=mask).last_hidden_state
            me = mask.unsqueeze(-1).expand(h.size()).float()
            emb = torch.sum(h * me, 1) / torch.clamp(me.sum(1), min=1e-9)
            return torch.nn.functional.normalize(emb, p=2, dim=1)
        inner = bert
    else:  # RoBERTa: position ids from input_ids (CumSum, GatherElements, Equal, Not)
        cfg = T.RobertaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1,
                              num_attention_heads=2, intermediate_size=64,
                              max_position_embeddings=40, pad_token_id=1, attn_implementation=attn)
        inner = T.RobertaModel(cfg, add_pooling_layer=False)

        def fn(ids, mask):
            return inner(input_ids=ids, attention_mask=mask).last_hidden_state
    with torch.no_grad():
        for name, p in inner.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.05)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, ids, mask):
            return fn(ids, mask)

    ids = torch.randint(2, 60, (1, 12))
    mask = torch.ones(1, 12, dtype=torch.long)
    mask[0, 9:] = 0
    return M().eval(), (ids, mask)


def _steps(t):
    return " | ".join(t.conversion.steps)


@slow_ncnn
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_e2e_sentence_encoder_bool_where_isnan_gather(attn, tmp_path):
    from tests.models import quick_convert

    module, args = _text_module("st", attn)
    path = _export(module, args, ["input_ids", "attention_mask"], tmp_path / "st.onnx")
    t = quick_convert("ncnn", path, tmp_path / "out").targets["ncnn"]
    assert t.status == "passed", (t.reason, _steps(t))
    assert "lower logic-to-float:" in _steps(t) and "lower reduce-matmul:" in _steps(t)
    if attn == "sdpa":
        assert "lower nan-checks: IsNaN on provably finite values -> false" in _steps(t)


@slow_ncnn
def test_e2e_roberta_position_ids(tmp_path):
    from tests.models import quick_convert

    module, args = _text_module("roberta")
    path = _export(module, args, ["input_ids", "attention_mask"], tmp_path / "roberta.onnx")
    t = quick_convert("ncnn", path, tmp_path / "out").targets["ncnn"]
    assert t.status == "passed", (t.reason, _steps(t))
    assert "lower cumsum-matmul: CumSum x1" in _steps(t)
    assert "identity embedding" in _steps(t)


@slow_ncnn
def test_e2e_swin_rank6_windows(tmp_path):
    import torch
    import transformers as T

    from tests.models import quick_convert

    torch.manual_seed(0)
    swin = T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
                                    num_heads=[2, 2], window_size=4)).eval()
    with torch.no_grad():  # trained-like biases: with HF's zeros pnnx fuses the first window
        for name, p in swin.named_parameters():  # attention into an ncnn MultiHeadAttention
            if name.endswith("bias"):  # over a batch of 4 windows, which ncnn cannot run
                p.normal_(0.0, 0.05)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.swin = swin

        def forward(self, x):
            return self.swin(pixel_values=x).last_hidden_state

    path = _export(M().eval(), (torch.randn(1, 3, 32, 32),), ["pixel_values"], tmp_path / "s.onnx")
    t = quick_convert("ncnn", path, tmp_path / "out").targets["ncnn"]
    assert t.status == "passed", (t.reason, _steps(t))
    assert "lower rank-reduce:" in _steps(t) and "lower strided-slice:" in _steps(t)


@slow_ncnn
def test_e2e_dynamo_exporter_external_data(tmp_path):
    """torch.onnx.export(dynamo=True): opset 18+, native Gelu/LayerNormalization, GatherND on
    the mask, weights in model.onnx.data."""
    from tests.models import quick_convert

    module, args = _text_module("st", "sdpa")
    path = _export(module, args, ["input_ids", "attention_mask"], tmp_path / "model.onnx",
                   dynamo=True)
    assert (tmp_path / "model.onnx.data").is_file()
    assert onnx.load(str(path), load_external_data=False).opset_import[0].version >= 18
    t = quick_convert("ncnn", path, tmp_path / "out").targets["ncnn"]
    assert t.status == "passed", (t.reason, _steps(t))
    assert "lower gather-select: GatherND" in _steps(t)
    assert "lower default-attributes:" in _steps(t)



@slow_ncnn
def test_e2e_reduction_with_axes_input_is_reduced(tiny_onnx, tmp_path):
    """The tiny masked mean-pool encoder (ReduceSum with axes as an input) used to come back
    from ncnn with its sequence axis unreduced (pnnx writes such reductions with no axes);
    reduce-matmul makes it a MatMul and the artifact passes."""
    from tests.models import quick_convert

    t = quick_convert("ncnn", tiny_onnx, tmp_path).targets["ncnn"]
    assert t.status == "passed", (t.reason, _steps(t))
    assert "lower reduce-matmul: ReduceSum x2 over constant axes" in _steps(t)
