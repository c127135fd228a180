"""tflite routes: the opset-17 pre-pass (checked against ONNX Runtime) and the second onnx2tf
route with its layout judgement pinned, tried when the first route's artifact fails."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mtconvert.backends import tflite_routes as routes
from mtconvert.backends.tflite import TfliteBackend, tflite_ops


def _model(nodes, inputs, outputs, inits=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _reduce_l2(opset=18):
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    return _model([helper.make_node("ReduceL2", ["x", "axes"], ["n"], keepdims=1),
                   helper.make_node("Div", ["x", "n"], ["y"])],
                  [_vi("x", [2, 5])], [_vi("y", [2, 5])], [axes], opset)


def test_reduce_axes_input_goes_back_to_an_attribute():
    model = _reduce_l2()
    low, done = routes.downgrade_opset(_copy(model))
    assert routes.default_opset(low) == 17 and done[0].startswith("opset 18 -> 17")
    node = next(n for n in low.graph.node if n.op_type == "ReduceL2")
    assert list(node.input) == ["x"]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["axes"] == [1] and "noop_with_empty_axes" not in attrs
    assert routes.same_outputs(model, low) is None
    x = np.random.default_rng(1).standard_normal((2, 5)).astype(np.float32)
    np.testing.assert_allclose(_run(low, {"x": x})[0],
                               x / np.linalg.norm(x, axis=1, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceMax", "ReduceSum", "ReduceSumSquare"])
def test_other_reduce_ops_at_opsets_18_to_21(op):
    for opset in (18, 19, 20, 21):
        axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
        model = _model([helper.make_node(op, ["x", "axes"], ["y"], keepdims=0)],
                       [_vi("x", [2, 3, 4])], [_vi("y", [2, 3])], [axes], opset)
        low, _ = routes.downgrade_opset(_copy(model))
        assert routes.default_opset(low) == 17
        assert routes.same_outputs(model, low) is None, (op, opset)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_is_expanded_to_its_formula(approximate):
    model = _model([helper.make_node("Gelu", ["x"], ["y"], approximate=approximate)],
                   [_vi("x", [3, 7])], [_vi("y", [3, 7])], opset=20)
    low, done = routes.downgrade_opset(_copy(model))
    ops = {n.op_type for n in low.graph.node}
    assert "Gelu" not in ops and ("Erf" if approximate == "none" else "Tanh") in ops
    assert "Gelu expanded to its formula (1 nodes)" in done
    assert routes.same_outputs(model, low) is None


def _gelu_formula(order, scale="div", shared=False):
    """x·0.5·(1 + erf(x/√2)) after a MatMul, its three factors multiplied in ``order``;
    ``shared``: the erf output is also a graph output (the formula must then stay)."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((6, 6)).astype(
        np.float32), "w")
    consts = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
              (("sqrt2", 2 ** 0.5), ("inv_sqrt2", 2 ** -0.5), ("one", 1.0), ("half", 0.5))]
    first = (helper.make_node("Div", ["x", "sqrt2"], ["s"]) if scale == "div"
             else helper.make_node("Mul", ["inv_sqrt2", "x"], ["s"]))
    tails = {"x*p*0.5": [helper.make_node("Mul", ["x", "p"], ["xp"]),
                         helper.make_node("Mul", ["xp", "half"], ["y"])],
             "x*0.5*p": [helper.make_node("Mul", ["x", "half"], ["xh"]),
                         helper.make_node("Mul", ["xh", "p"], ["y"])],
             "x*(p*0.5)": [helper.make_node("Mul", ["p", "half"], ["ph"]),
                           helper.make_node("Mul", ["x", "ph"], ["y"])]}
    nodes = [helper.make_node("MatMul", ["a", "w"], ["x"]), first,
             helper.make_node("Erf", ["s"], ["e"]), helper.make_node("Add", ["e", "one"], ["p"]),
             *tails[order]]
    outputs = [_vi("y", [2, 6])] + ([_vi("e", [2, 6])] if shared else [])
    return _model(nodes, [_vi("a", [2, 6])], outputs, [w, *consts], opset=17)


@pytest.mark.parametrize("order,scale", [("x*p*0.5", "div"), ("x*0.5*p", "mul"),
                                         ("x*(p*0.5)", "div")])
def test_gelu_formula_is_fused_into_one_node(order, scale):
    model = _gelu_formula(order, scale)
    fused = _copy(model)
    assert routes.fuse_gelu(fused) == 1
    assert [(n.op_type, n.domain) for n in fused.graph.node] == [
        ("MatMul", ""), ("Gelu", routes.GELU_DOMAIN)]
    assert {i.name for i in fused.graph.initializer} == {"w"}  # the formula's constants went
    assert routes.same_outputs(model, fused, atol=1e-6, rtol=1e-6) is None


def test_gelu_formula_with_a_shared_intermediate_stays():
    model = _gelu_formula("x*p*0.5", shared=True)
    assert routes.fuse_gelu(_copy(model)) == 0


def test_prepare_fuses_the_onnx_gelu_and_says_so(tmp_path):
    model = _model([helper.make_node("Gelu", ["x"], ["y"])], [_vi("x", [3, 7])],
                   [_vi("y", [3, 7])], opset=20)
    onnx.save(model, str(tmp_path / "g.onnx"))
    result = routes.prepare(str(tmp_path / "g.onnx"), str(tmp_path / "p.onnx"))
    assert result["op_counts"] == {"Gelu": 1}
    assert result["steps"][1].startswith("GELU formula fused into one Gelu node (1 nodes")
    assert result["steps"][1].endswith("ONNX Runtime outputs unchanged")
    written = onnx.load(str(tmp_path / "p.onnx"))
    assert routes.default_opset(written) == 17
    assert [n.domain for n in written.graph.node] == [routes.GELU_DOMAIN]
    assert all(n.name for n in written.graph.node)  # onnx2tf runs without sng4onnx naming them
    # the schema is registered in the onnx2tf child only: here it would break onnx.reference
    assert not onnx.defs.has("Gelu", 1, routes.GELU_DOMAIN)


def test_split_num_outputs_and_pad_axes():
    split = _model([helper.make_node("Split", ["x"], ["a", "b"], axis=1, num_outputs=2)],
                   [_vi("x", [2, 6])], [_vi("a", [2, 3]), _vi("b", [2, 3])])
    low, _ = routes.downgrade_opset(_copy(split))
    assert routes.same_outputs(split, low) is None
    pads = numpy_helper.from_array(np.array([1, 2], np.int64), "pads")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    pad = _model([helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"])],
                 [_vi("x", [2, 6])], [_vi("y", [2, 9])], [pads, axes])
    low, done = routes.downgrade_opset(_copy(pad))
    assert done[0].startswith("opset 18 -> 17 (by hand")  # the converter has no Pad adapter
    assert routes.same_outputs(pad, low) is None
    assert len(next(n for n in low.graph.node if n.op_type == "Pad").input) <= 3


def test_prepare_writes_opset_17_and_says_so(tmp_path):
    src, dst = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(_reduce_l2(20), str(src))
    result = routes.prepare(str(src), str(dst))
    assert result["steps"] == ["opset 20 -> 17 (onnx.version_converter); "
                               "ONNX Runtime outputs unchanged"]
    assert routes.default_opset(onnx.load(str(dst))) == 17
    assert result["op_counts"] == {"ReduceL2": 1, "Div": 1}


def test_prepare_leaves_opset_17_alone_and_keeps_what_cannot_go_down(tmp_path):
    old = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [2])], [_vi("y", [2])],
                 opset=17)
    onnx.save(old, str(tmp_path / "old.onnx"))
    assert routes.prepare(str(tmp_path / "old.onnx"), str(tmp_path / "o.onnx"))["steps"] == []
    # BitwiseAnd is new in opset 18: no way down, the graph goes on unchanged
    new = _model([helper.make_node("BitwiseAnd", ["a", "b"], ["y"])],
                 [_vi("a", [3], TensorProto.INT32), _vi("b", [3], TensorProto.INT32)],
                 [_vi("y", [3], TensorProto.INT32)])
    onnx.save(new, str(tmp_path / "new.onnx"))
    result = routes.prepare(str(tmp_path / "new.onnx"), str(tmp_path / "n.onnx"))
    assert result["steps"][0].startswith("opset 18 kept: no way down to 17")
    assert routes.default_opset(onnx.load(str(tmp_path / "n.onnx"))) == 18


def test_a_rewrite_that_changes_outputs_is_refused():
    model = _reduce_l2()
    changed = _copy(model)
    changed.graph.node[1].op_type = "Mul"
    assert "max abs difference" in routes.same_outputs(model, changed)
    kept, steps = routes._checked(model, changed, "rewrite", [])
    assert kept is model and steps[0].startswith("not applied (rewrite): ONNX Runtime outputs")


def test_second_route_only_when_sizes_are_ambiguous(tmp_path):
    w = numpy_helper.from_array(np.zeros((32, 48), np.float32), "w")
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x", [1, "s", 32])],
                   [_vi("y", [1, "s", 48])], [w])
    onnx.save(model, str(tmp_path / "m.onnx"))

    def source(shape):
        return SimpleNamespace(onnx_path=tmp_path / "m.onnx", input_shapes={"x": shape},
                               quantization={})  # a float source

    assert TfliteBackend().routes(source((1, 32, 32))) == ["onnx2tf", "onnx2tf-pinned-layout"]
    assert TfliteBackend().routes(source((1, 20, 32))) == ["onnx2tf", "onnx2tf-pinned-layout"]
    assert not routes.ambiguous_layout(source((1, 20, 7)))
    assert TfliteBackend().routes(source((1, 20, 7))) == ["onnx2tf"]


def _copy(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


# --- end to end, with the real onnx2tf, TFLiteConverter and LiteRT -----------------------------

needs_tflite = pytest.mark.skipif(not TfliteBackend.availability().can_convert,
                                  reason="tflite toolchain not installed")


def _sentence_encoder_dynamo(folder: Path) -> Path:
    """A tiny sentence encoder (embedding, LayerNorm, GELU MLP, mean pooling, L2 normalize)
    exported the default way: torch.export-based, opset 18+, weights in model.onnx.data."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 24)
            self.norm = torch.nn.LayerNorm(24)
            self.fc = torch.nn.Linear(24, 40)
            self.out = torch.nn.Linear(40, 24)

        def forward(self, input_ids, attention_mask):
            h = self.out(torch.nn.functional.gelu(self.fc(self.norm(self.emb(input_ids)))))
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    torch.manual_seed(0)
    args = (torch.randint(0, 50, (1, 12)), torch.ones(1, 12, dtype=torch.long))
    path = folder / "encoder.onnx"
    torch.onnx.export(Encoder().eval(), args, str(path), input_names=["input_ids",
                      "attention_mask"], output_names=["sentence_embedding"], dynamo=True,
                      external_data=True)
    return path


@pytest.mark.slow
@needs_tflite
def test_default_exporter_sentence_encoder_converts(tmp_path):
    import mtconvert

    (tmp_path / "src").mkdir()
    path = _sentence_encoder_dynamo(tmp_path / "src")
    assert (path.parent / "encoder.onnx.data").is_file()  # external data, as the exporter writes
    opset = routes.default_opset(onnx.load(str(path), load_external_data=False))
    assert opset >= 18 and {"ReduceL2"} <= {n.op_type for n in onnx.load(str(path)).graph.node}
    report = mtconvert.convert(path, targets=["tflite"], out_dir=tmp_path / "out", iterations=2,
                               warmup=1)
    t = report.targets["tflite"]
    assert t.status == "passed", t.reason
    assert t.numerics.worst["max_abs"] < 1e-4
    steps = " | ".join(t.conversion.steps)
    assert f"opset {opset} -> 17 (onnx.version_converter)" in steps
    assert "ONNX Runtime outputs unchanged" in steps
    assert "GELU formula fused into one Gelu node (1 nodes" in steps  # the expanded Gelu
    assert "onnx2tf pseudo-operator" not in steps
    assert tflite_ops(tmp_path / "out" / "encoder.tflite")["GELU"] == 1


@pytest.mark.slow
@needs_tflite
def test_equal_sizes_are_repaired_by_the_pinned_route(fixtures_dir, tmp_path):
    """Sequence 32 == hidden 32: the first route's artifact computes wrong logits (caught by the
    numerics, listed as rejected); the pinned-layout route passes."""
    import mtconvert

    report = mtconvert.convert(fixtures_dir / "bert_distilled.onnx", targets=["tflite"],
                               out_dir=tmp_path, input_shapes={"input_ids": "1x32"},
                               iterations=2, warmup=1)
    t = report.targets["tflite"]
    assert t.status == "passed", t.reason
    assert t.numerics.worst["max_abs"] < 1e-4
    assert "tflite-ambiguous-shape" in {f["code"] for f in t.findings}
    steps = t.conversion.steps
    assert steps[0].startswith("route onnx2tf rejected: failed: numerics: logits")
    assert "route onnx2tf-pinned-layout: chosen (passed)" in steps
    assert (tmp_path / "bert_distilled.tflite").is_file()


def _gather_elements(axis, transpose_after):
    rng = np.random.default_rng(0)
    idx = rng.integers(-5, 5, size=(2, 4, 5)).astype(np.int64)  # negative ones too
    nodes = [helper.make_node("Mul", ["x", "x"], ["sq"]),
             helper.make_node("GatherElements", ["sq", "idx"], ["g"], axis=axis)]
    out_shape = [2, 4, 5]
    if transpose_after:
        nodes.append(helper.make_node("Transpose", ["g"], ["y"], perm=[0, 2, 1]))
        out_shape = [2, 5, 4]
    else:
        nodes.append(helper.make_node("Identity", ["g"], ["y"]))
    return _model(nodes, [_vi("x", [2, 4, 5])], [_vi("y", out_shape)],
                  [numpy_helper.from_array(idx if axis == 2 else idx % 4, "idx")], opset=17)


@pytest.mark.parametrize("axis,transpose_after", [(2, False), (1, False), (-1, True)])
def test_gather_elements_at_constant_indices_become_a_flat_gather(axis, transpose_after):
    model = _gather_elements(axis, transpose_after)
    x = np.random.default_rng(1).standard_normal((2, 4, 5)).astype(np.float32)
    before = _run(model, {"x": x})[0]
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert routes.gather_elements_to_gather(rewritten) == 1
    ops = [n.op_type for n in rewritten.graph.node]
    assert "GatherElements" not in ops and "Gather" in ops
    assert "Transpose" not in ops  # a Transpose after it goes into the indices
    gather = next(n for n in rewritten.graph.node if n.op_type == "Gather")
    indices = next(i for i in rewritten.graph.initializer if i.name == gather.input[1])
    assert len(indices.dims) == 1  # 1-D: no tensor of equal axes for onnx2tf's layout guess
    np.testing.assert_array_equal(_run(rewritten, {"x": x})[0], before)


def test_gather_elements_at_run_time_indices_stay():
    model = _model([helper.make_node("GatherElements", ["x", "i"], ["y"], axis=1)],
                   [_vi("x", [2, 3]), _vi("i", [2, 3], TensorProto.INT64)], [_vi("y", [2, 3])],
                   opset=17)
    assert routes.gather_elements_to_gather(model) == 0
