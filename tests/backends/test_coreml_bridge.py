"""The ONNX -> PyTorch bridge of the coreml target on the op versions current exporters write
(opsets 17 to 21): each converter of backends/coreml/onnx_mends.py on a minimal onnx.helper graph
against ONNX Runtime, then one real export per failure class end to end."""
from __future__ import annotations

import numpy as np
import pytest

from mtconvert.backends.coreml.onnx_bridge import import_onnx2torch  # noqa: E402

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")
try:
    import_onnx2torch()  # with a stand-in for torchvision, which it needs for NMS/RoiAlign only
except ImportError:
    pytest.skip("onnx2torch not installed", allow_module_level=True)

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

F, I64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, opset, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=10)
    return model


def _vi(name, elem, shape=None):
    return helper.make_tensor_value_info(name, elem, shape)


def _init(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def _ort(model, feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _bridge(model, feeds):
    from mtconvert.backends.coreml.onnx_bridge import to_torch

    module = to_torch(model)
    with torch.no_grad():
        out = module(*[torch.from_numpy(v) for v in feeds.values()])
    out = out if isinstance(out, (tuple, list)) else [out]
    return [o.numpy() for o in out]


def _check(model, feeds, exact=True):
    """The bridged module and ONNX Runtime agree on every output (values, shape, dtype)."""
    want = _ort(model, feeds)
    got = _bridge(model, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        if exact:
            np.testing.assert_array_equal(g, w)
        else:
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def _x(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# --- versions that only add types ---------------------------------------------------------------

@pytest.mark.parametrize("opset", [19, 20, 21])
@pytest.mark.parametrize("src, dst, value", [
    (F, I64, np.array([[-2.7, 0.4], [3.9, 1e3]], np.float32)),
    (I64, F, np.array([[1, -5], [7, 2 ** 40]], np.int64)),
    (I64, BOOL, np.array([[0, 3], [-1, 0]], np.int64)),
])
def test_cast_19_21(opset, src, dst, value):
    model = _model([helper.make_node("Cast", ["x"], ["y"], to=dst)], [_vi("x", src, [2, 2])],
                   [_vi("y", dst)], opset)
    _check(model, {"x": value})


def test_cast_19_refuses_float8_with_saturate():
    from mtconvert.backends.coreml.onnx_bridge import to_torch

    model = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT8E4M3FN,
                                     saturate=0)],
                   [_vi("x", F, [2])], [_vi("y", TensorProto.FLOAT8E4M3FN)], 19)
    with pytest.raises(NotImplementedError):
        to_torch(model)


@pytest.mark.parametrize("opset", [19, 21])
@pytest.mark.parametrize("allowzero, shape", [(0, [0, -1, 2]), (0, [4, 6]), (1, [2, -1, 4]),
                                              (1, [24])])
def test_reshape_19_21_allowzero(opset, allowzero, shape):
    """The torch.export-based exporter writes allowzero=1 on every Reshape."""
    model = _model([helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=allowzero)],
                   [_vi("x", F, [2, 3, 4])], [_vi("y", F)], opset, [_init("s", np.array(shape))])
    _check(model, {"x": _x(2, 3, 4)})


def test_reshape_allowzero_with_a_computed_shape():
    nodes = [helper.make_node("Shape", ["x"], ["s"], start=1),
             helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=1)]
    model = _model(nodes, [_vi("x", F, [1, 3, 4])], [_vi("y", F)], 15)
    _check(model, {"x": _x(1, 3, 4)})


@pytest.mark.parametrize("opset", [19, 21])
def test_shape_identity_transpose_unsqueeze_squeeze_flatten_21(opset):
    nodes = [helper.make_node("Identity", ["x"], ["i"]),
             helper.make_node("Transpose", ["i"], ["t"], perm=[2, 0, 1]),
             helper.make_node("Unsqueeze", ["t", "ax"], ["u"]),
             helper.make_node("Squeeze", ["u", "ax"], ["q"]),
             helper.make_node("Flatten", ["q"], ["f"], axis=2),
             helper.make_node("Shape", ["t"], ["s"], start=1),
             helper.make_node("ConstantOfShape", ["s"], ["c"],
                              value=helper.make_tensor("v", F, [1], [2.5])),
             helper.make_node("Constant", [], ["k"], value_float=0.5),
             helper.make_node("Mul", ["c", "k"], ["ck"])]
    model = _model(nodes, [_vi("x", F, [2, 3, 4])],
                   [_vi("f", F), _vi("s", I64), _vi("ck", F)], opset,
                   [_init("ax", np.array([1]))])
    _check(model, {"x": _x(2, 3, 4)})


def test_equal_19_and_isnan_isinf_20():
    nodes = [helper.make_node("Equal", ["a", "b"], ["e"]),
             helper.make_node("IsNaN", ["x"], ["n"]),
             helper.make_node("IsInf", ["x"], ["i"])]
    model = _model(nodes, [_vi("a", I64, [4]), _vi("b", I64, [4]), _vi("x", F, [4])],
                   [_vi("e", BOOL), _vi("n", BOOL), _vi("i", BOOL)], 20)
    _check(model, {"a": np.array([1, 2, 3, 4]), "b": np.array([1, 0, 3, 0]),
                   "x": np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)})


def test_type_only_versions_of_opsets_22_23_keep_the_previous_signature():
    from onnx import defs

    from mtconvert.backends.coreml.onnx_mends import TYPE_ONLY, _previous_version

    def signature(schema):
        return ([i.name for i in schema.inputs], [o.name for o in schema.outputs],
                sorted((name, str(a.default_value)) for name, a in schema.attributes.items()))

    for version, ops in TYPE_ONLY.items():
        for op in ops:
            schema = defs.get_schema(op, max_inclusive_version=version, domain="")
            assert schema.since_version == version, op
            previous = defs.get_schema(op, _previous_version(op, version), "")
            assert signature(schema) == signature(previous), op


def test_conv_22_and_cast_reshape_transpose_23():
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["t", "s"], ["r"], allowzero=1),
             helper.make_node("Cast", ["r"], ["y"], to=I64)]
    inits = [_init("w", _x(3, 2, 3, 3)), _init("b", _x(3)), _init("s", np.array([1, -1, 3]))]
    for opset in (22, 23):
        model = _model(nodes, [_vi("x", F, [1, 2, 5, 5])], [_vi("r", F), _vi("y", I64)], opset,
                       inits)
        x = _x(1, 2, 5, 5) * 4
        want = _ort(model, {"x": x})
        got = _bridge(model, {"x": x})
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
        assert got[1].dtype == want[1].dtype and got[1].shape == want[1].shape


@pytest.mark.parametrize("axis", [-1, 1])
def test_rms_normalization_23(axis):
    scale = _x(8) if axis == -1 else _x(5, 8)
    model = _model([helper.make_node("RMSNormalization", ["x", "g"], ["y"], axis=axis,
                                     epsilon=1e-6)],
                   [_vi("x", F, [2, 5, 8])], [_vi("y", F)], 23, [_init("g", scale)])
    _check(model, {"x": _x(2, 5, 8) * 0.01}, exact=False)


@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("causal, kv_heads, scale, softcap", [
    (0, 4, None, 0.0), (1, 4, 0.3, 0.0), (0, 2, None, 0.0), (1, 2, None, 5.0)])
def test_attention_23_four_d(mask, causal, kv_heads, scale, softcap):
    b, heads, s, h = 2, 4, 5, 8
    feeds = {"q": _x(b, heads, s, h), "k": _x(b, kv_heads, s, h), "v": _x(b, kv_heads, s, h)}
    ins = ["q", "k", "v"]
    vis = [_vi("q", F, [b, heads, s, h]), _vi("k", F, [b, kv_heads, s, h]),
           _vi("v", F, [b, kv_heads, s, h])]
    if mask == "bool":
        m = np.ones((b, 1, s, s), bool)
        m[0, :, :, -2:] = False
        feeds["m"], ins, vis = m, ins + ["m"], vis + [_vi("m", BOOL, [b, 1, s, s])]
    elif mask == "float":
        feeds["m"], ins, vis = _x(1, 1, s, s), ins + ["m"], vis + [_vi("m", F, [1, 1, s, s])]
    attrs = {"is_causal": causal, "softcap": softcap}
    if scale is not None:
        attrs["scale"] = scale
    model = _model([helper.make_node("Attention", ins, ["y"], **attrs)], vis, [_vi("y", F)], 23)
    _check(model, feeds, exact=False)


def test_attention_23_three_d():
    feeds = {"q": _x(2, 5, 32), "k": _x(2, 5, 16), "v": _x(2, 5, 16)}
    model = _model([helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=4,
                                     kv_num_heads=2)],
                   [_vi("q", F, [2, 5, 32]), _vi("k", F, [2, 5, 16]), _vi("v", F, [2, 5, 16])],
                   [_vi("y", F)], 23)
    _check(model, feeds, exact=False)


def test_average_pool_19_and_its_guard():
    from mtconvert.backends.coreml.onnx_bridge import to_torch

    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])
    model = _model([node], [_vi("x", F, [1, 2, 4, 4])], [_vi("y", F)], 19)
    _check(model, {"x": _x(1, 2, 4, 4)}, exact=False)
    dilated = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2],
                               dilations=[2, 2])
    with pytest.raises(NotImplementedError, match="dilations"):
        to_torch(_model([dilated], [_vi("x", F, [1, 2, 4, 4])], [_vi("y", F)], 19))


# --- new semantics ------------------------------------------------------------------------------

@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_20(approximate):
    model = _model([helper.make_node("Gelu", ["x"], ["y"], approximate=approximate)],
                   [_vi("x", F, [3, 8])], [_vi("y", F)], 20)
    _check(model, {"x": _x(3, 8) * 3}, exact=False)


@pytest.mark.parametrize("bias", [True, False])
def test_layer_normalization_17_at_opset_20(bias):
    inits = [_init("g", _x(8)), _init("b", _x(8))]
    ins = ["x", "g", "b"] if bias else ["x", "g"]
    model = _model([helper.make_node("LayerNormalization", ins, ["y"], axis=-1, epsilon=1e-5)],
                   [_vi("x", F, [2, 5, 8])], [_vi("y", F)], 20, inits[:len(ins) - 1])
    _check(model, {"x": _x(2, 5, 8)}, exact=False)


@pytest.mark.parametrize("opset", [18, 20])
@pytest.mark.parametrize("op", ["ReduceMean", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1",
                                "ReduceProd", "ReduceSumSquare", "ReduceLogSumExp"])
@pytest.mark.parametrize("axes, keepdims", [([1], 1), ([-1, 0], 0), (None, 1), (None, 0)])
def test_reduce_18_axes_as_input(opset, op, axes, keepdims):
    ins = ["x", "axes"] if axes is not None else ["x"]
    inits = [_init("axes", np.array(axes))] if axes is not None else []
    model = _model([helper.make_node(op, ins, ["y"], keepdims=keepdims)],
                   [_vi("x", F, [2, 3, 4])], [_vi("y", F)], opset, inits)
    _check(model, {"x": np.abs(_x(2, 3, 4)) + 0.5}, exact=False)


def test_reduce_18_noop_with_empty_axes():
    model = _model([helper.make_node("ReduceMean", ["x"], ["y"], noop_with_empty_axes=1)],
                   [_vi("x", F, [2, 3])], [_vi("y", F)], 18)
    _check(model, {"x": _x(2, 3)})


@pytest.mark.parametrize("length, parts", [(6, 3), (7, 3), (5, 2), (4, 1)])
def test_split_18_num_outputs(length, parts):
    """ONNX's uneven split: chunks of ceil(n / parts), the last one smaller."""
    outs = [f"y{i}" for i in range(parts)]
    model = _model([helper.make_node("Split", ["x"], outs, axis=1, num_outputs=parts)],
                   [_vi("x", F, [2, length])], [_vi(o, F) for o in outs], 18)
    _check(model, {"x": _x(2, length)})


def test_split_18_with_sizes():
    model = _model([helper.make_node("Split", ["x", "s"], ["a", "b"], axis=-1)],
                   [_vi("x", F, [2, 7])], [_vi("a", F), _vi("b", F)], 18,
                   [_init("s", np.array([2, 5]))])
    _check(model, {"x": _x(2, 7)})


@pytest.mark.parametrize("opset", [18, 19, 21])
@pytest.mark.parametrize("mode, pads, axes, value", [
    ("constant", [0, 1, 2, 0, 3, 1], None, 1.5),
    ("constant", [1, 2], [-1], None),
    ("constant", [0, -1, 0, 1], [0, 2], 0.0),
    ("reflect", [1, 2], [2], None),
    ("edge", [1, 0, 2, 1], [1, 2], None),
    ("wrap", [1, 2], [2], None),
])
def test_pad_18_axes_and_modes(opset, mode, pads, axes, value):
    if mode == "wrap" and opset < 19:
        pytest.skip("wrap is new in Pad-19")
    ins = ["x", "pads", "v" if value is not None else "", "axes" if axes is not None else ""]
    while ins[-1] == "":
        ins.pop()
    inits = [_init("pads", np.array(pads))]
    if value is not None:
        inits.append(_init("v", np.array(value, np.float32)))
    if axes is not None:
        inits.append(_init("axes", np.array(axes)))
    model = _model([helper.make_node("Pad", ins, ["y"], mode=mode)], [_vi("x", F, [2, 3, 4])],
                   [_vi("y", F)], opset, inits)
    _check(model, {"x": _x(2, 3, 4)})


def test_reciprocal_is_an_exact_division():
    """MIL ``inverse`` adds epsilon=1e-4; the bridge writes 1/x (``real_div``)."""
    from mtconvert.backends.coreml.onnx_bridge import export, to_torch

    model = _model([helper.make_node("Reciprocal", ["x"], ["y"])], [_vi("x", F, [6])],
                   [_vi("y", F)], 20)
    x = np.array([1e-3, 2e-3, 0.5, -4.0, 1e-5, 3.0], np.float32)
    _check(model, {"x": x})
    program = export(to_torch(model), (torch.from_numpy(x),))
    targets = {str(n.target) for n in program.run_decompositions().graph.nodes
               if n.op == "call_function"}
    assert not any("reciprocal" in t for t in targets), targets


# --- Clip, Min, Max: constant bounds are constants coremltools accepts ------------------------

@pytest.mark.parametrize("lo, hi", [(1e-9, None), (None, 0.5), (-0.5, 0.25), (None, None)])
def test_clip_with_tensor_bounds_and_omitted_ones(lo, hi):
    """clamp(min=1e-9) from the TorchScript exporter: Clip(x, min_tensor, '')."""
    ins = ["x", "lo" if lo is not None else "", "hi" if hi is not None else ""]
    while ins[-1] == "":
        ins.pop()
    inits = [_init(n, np.array(v, np.float32)) for n, v in (("lo", lo), ("hi", hi))
             if v is not None]
    model = _model([helper.make_node("Clip", ins, ["y"])], [_vi("x", F, [3, 4])], [_vi("y", F)],
                   17, inits)
    x = _x(3, 4)
    x[0, 0] = 0.0
    _check(model, {"x": x})


def test_clip_on_integers_keeps_the_type():
    model = _model([helper.make_node("Clip", ["x", "lo", "hi"], ["y"])], [_vi("x", I64, [5])],
                   [_vi("y", I64)], 13, [_init("lo", np.array(-2)), _init("hi", np.array(3))])
    _check(model, {"x": np.array([-9, -2, 0, 3, 40])})


def test_clip_with_computed_bounds():
    model = _model([helper.make_node("Clip", ["x", "lo", "hi"], ["y"])],
                   [_vi("x", F, [4]), _vi("lo", F, []), _vi("hi", F, [])], [_vi("y", F)], 13)
    _check(model, {"x": np.array([-3, -1, 1, 3], np.float32), "lo": np.array(-2, np.float32),
                   "hi": np.array(2, np.float32)})


def test_clip_bounds_are_folded_into_the_program():
    """No tensor bound reaches coremltools (its clamp needs constant scalars)."""
    from mtconvert.backends.coreml.onnx_bridge import export, to_torch

    model = _model([helper.make_node("Clip", ["x", "lo", ""], ["y"])], [_vi("x", F, [3, 4])],
                   [_vi("y", F)], 17, [_init("lo", np.array(1e-9, np.float32))])
    program = export(to_torch(model), (torch.zeros(3, 4),))
    clamps = [n for n in program.graph.nodes if "clamp" in str(n.target)]
    assert clamps and all(not isinstance(a, torch.fx.Node) for n in clamps for a in n.args[1:])


@pytest.mark.parametrize("op", ["Min", "Max"])
@pytest.mark.parametrize("const, elem", [
    (np.array(1e-9, np.float32), F),          # clamp(min=...) from the dynamo exporter
    (np.array([[0.25]], np.float32), F),      # one element, higher rank: broadcasts
    (np.array([0.1, -0.2, 0.3, 0.0], np.float32), F),
    (np.array(7), I64),                       # T5's relative position buckets
])
def test_min_max_with_a_constant(op, const, elem):
    x = (_x(3, 4) if elem == F else RNG.integers(-20, 20, (3, 4)))
    for order in (["x", "c"], ["c", "x"]):
        model = _model([helper.make_node(op, order, ["y"])], [_vi("x", elem, [3, 4])],
                       [_vi("y", elem)], 13, [_init("c", const)])
        _check(model, {"x": x})


def test_min_max_of_three_inputs():
    for op in ("Min", "Max"):
        model = _model([helper.make_node(op, ["a", "b", "c"], ["y"])],
                       [_vi("a", F, [3, 1]), _vi("b", F, [4]), _vi("c", F, [1, 4])],
                       [_vi("y", F)], 13)
        _check(model, {"a": _x(3, 1), "b": _x(4), "c": _x(1, 4)})


def test_the_torchvision_stand_in_does_not_outlive_the_import():
    import importlib.util
    import sys

    assert "onnx2torch" in sys.modules
    assert "torchvision" not in sys.modules or importlib.util.find_spec("torchvision")


def test_missing_converters_are_named_together():
    from mtconvert.backends.coreml.onnx_bridge import to_torch

    nodes = [helper.make_node("Trilu", ["x"], ["t"]),
             helper.make_node("HardSwish", ["t"], ["h"]),
             helper.make_node("Col2Im", ["h", "s", "b"], ["y"])]
    model = _model(nodes, [_vi("x", F, [1, 4, 4])], [_vi("y", F)], 18,
                   [_init("s", np.array([2, 2])), _init("b", np.array([1, 1]))])
    with pytest.raises(NotImplementedError, match=r"Trilu\(opset 18\), Col2Im\(opset 18\)"):
        to_torch(model)


# --- end to end: real exports through mtconvert.convert -----------------------------------------

class _SentenceEncoder(torch.nn.Module):
    """A one-layer BERT with sentence-transformers' mean pooling and L2 normalisation, then an
    RMSNorm (the exporters write rsqrt as Reciprocal(Sqrt)); random weights."""

    def __init__(self):
        super().__init__()
        import transformers

        torch.manual_seed(0)
        config = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32,
                                         max_position_embeddings=32)
        self.bert = transformers.BertModel(config).eval()

    def forward(self, input_ids, attention_mask):
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).expand(tokens.size()).float()
        pooled = torch.sum(tokens * mask, 1) / torch.clamp(mask.sum(1), min=1e-9)
        pooled = pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + 1e-6)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


def _export(tmp_path, dynamo):
    pytest.importorskip("transformers")
    if dynamo:
        pytest.importorskip("onnxscript")
    module = _SentenceEncoder().eval()
    args = (torch.randint(0, 60, (1, 8)), torch.ones(1, 8, dtype=torch.int64))
    path = tmp_path / "model.onnx"
    kwargs = {"external_data": True} if dynamo else {"opset_version": 17}
    torch.onnx.export(module, args, str(path), dynamo=dynamo, input_names=["input_ids",
                      "attention_mask"], output_names=["output"], **kwargs)
    return path


def _convert(path, tmp_path):
    from mtconvert.backends.coreml.backend import CoremlBackend
    from tests.models import quick_convert

    if not CoremlBackend.availability().can_convert:
        pytest.skip("coremltools not installed")
    return quick_convert("coreml", path, tmp_path / "out").targets["coreml"]


@pytest.mark.slow
def test_default_exporter_model_with_external_data_converts(tmp_path):
    """torch.onnx.export(dynamo=True): opset 20, Cast-19, Reshape allowzero=1, Gelu-20,
    LayerNormalization, Reciprocal, weights in model.onnx.data."""
    path = _export(tmp_path, dynamo=True)
    model = onnx.load(str(path), load_external_data=False)
    assert model.opset_import[0].version >= 18
    assert (tmp_path / "model.onnx.data").stat().st_size > 0
    assert any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    ops = {n.op_type for n in model.graph.node}
    assert {"Cast", "Reshape", "Gelu", "LayerNormalization", "Reciprocal"} <= ops, ops
    t = _convert(path, tmp_path)
    assert t.status == "passed", t.reason
    assert t.numerics.worst["max_abs"] < 1e-4


@pytest.mark.slow
def test_torchscript_export_with_clip_tensor_bounds_converts(tmp_path):
    """torch.onnx.export(dynamo=False, opset 17): clamp(min=1e-9) is Clip(x, tensor, '')."""
    path = _export(tmp_path, dynamo=False)
    model = onnx.load(str(path))
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    assert clips and all(len(n.input) >= 2 and n.input[1] for n in clips)
    t = _convert(path, tmp_path)
    assert t.status == "passed", t.reason
    assert t.numerics.worst["max_abs"] < 1e-4
