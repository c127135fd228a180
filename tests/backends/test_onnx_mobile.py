"""onnx-mobile on every fixture, with the real onnxsim, quantizer and ORT-format tooling."""
import json

import pytest

from tests.models import quick_convert

ONNX_FIXTURES = ["bert_encoder", "gpt_decoder", "vit_encoder", "bert_pruned", "bert_distilled",
                 "bert_lowrank", "bert_int8_dynamic", "bert_int8_qdq"]


def _run(model, out, **kw):
    return quick_convert("onnx-mobile", model, out, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ONNX_FIXTURES)
def test_every_fixture_passes_fp32(fixture, fixtures_dir, tmp_path):
    report = _run(fixtures_dir / f"{fixture}.onnx", tmp_path)
    t = report.targets["onnx-mobile"]
    assert t.status == "passed", t.reason
    assert t.numerics.worst["max_abs"] < 1e-4
    assert any(s.startswith("onnxsim") for s in t.conversion.steps)
    ort_file = tmp_path / f"{fixture}.ort"
    assert ort_file.is_file() and ort_file.read_bytes()[4:8] == b"ORTM"
    cfg = (tmp_path / f"{fixture}.required_operators.config").read_text()
    assert "ai.onnx" in cfg
    int8 = {"int8-kernels"} if "int8" in fixture else set()
    assert {f["code"] for f in t.findings} == {"ep-nnapi", "ep-coreml-mlprogram"} | int8


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["bert_encoder", "gpt_decoder"])
def test_int8_dynamic_quantization(fixture, fixtures_dir, tmp_path):
    report = _run(fixtures_dir / f"{fixture}.onnx", tmp_path, precision="int8")
    t = report.targets["onnx-mobile"]
    assert t.status == "passed", t.reason
    assert t.numerics.outputs["logits"]["tolerance"]["min_cosine"] == 0.99
    assert any("quantize_dynamic" in s for s in t.conversion.steps)
    fp32_size = (fixtures_dir / f"{fixture}.onnx").stat().st_size
    assert (tmp_path / f"{fixture}.int8.ort").stat().st_size < fp32_size / 2


@pytest.mark.slow
def test_already_quantized_source_is_not_quantized_again(fixtures_dir, tmp_path):
    """A QDQ source is taken as it is, its activations re-encoded as uint8: every MatMul of the
    .ort is a QLinearMatMul with uint8 activations (MLAS's VNNI kernel on x86), none int8 x
    int8, none float; judged against the source by the int8-source profile."""
    from mtconvert.backends.onnx_mobile import matmul_kernels

    report = _run(fixtures_dir / "bert_int8_qdq.onnx", tmp_path, precision="int8")
    t = report.targets["onnx-mobile"]
    assert t.status == "passed", t.reason
    assert t.numerics.passed
    assert "tolerance profile int8-source (quantized qdq source)" in t.conversion.steps
    assert any("already quantized" in s for s in t.conversion.steps)
    assert any(s.startswith("qdq-uint8:") and "re-encoded as uint8" in s
               for s in t.conversion.steps)
    kernels = matmul_kernels(tmp_path / "bert_int8_qdq.int8.ort")
    assert set(kernels) <= {"QLinearMatMul uint8 x int8", "QLinearMatMul uint8 x uint8"}
    assert kernels.get("QLinearMatMul uint8 x int8", 0) > 0
    assert "int8-kernels" in {f["code"] for f in t.findings}


@pytest.mark.slow
def test_same_command_twice_identical_numerics(fixtures_dir, tmp_path):
    a, b = (_run(fixtures_dir / "gpt_decoder.onnx", tmp_path / n, cache=False) for n in "ab")
    assert a.targets["onnx-mobile"].numerics == b.targets["onnx-mobile"].numerics


@pytest.mark.slow
def test_pt2_source_uses_pytorch_reference(fixtures_dir, tmp_path):
    report = _run(fixtures_dir / "bert_encoder.pt2", tmp_path)
    assert report.reference.runtime == "pytorch-eager"
    assert report.targets["onnx-mobile"].status == "passed"
    assert report.source.input_values == {"input_ids": "example_inputs",
                                          "attention_mask": "example_inputs"}
    assert json.loads(report.to_json())["source"]["format"] == "torch"


def _int8_activation_qs(model):
    inits = {i.name: i for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "QuantizeLinear"
            and inits[n.input[2]].data_type == 3]


def test_qdq_activations_reencoded_as_uint8_bit_exact(fixtures_dir, tmp_path):
    """The QDQ fixture's int8 activations become uint8 (zero point + 128), the int8 weights
    stay as they are, and ONNX Runtime unoptimized gives the same outputs to the bit."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from mtconvert.backends.onnx_tools import qdq_uint8

    src = fixtures_dir / "bert_int8_qdq.onnx"
    before = onnx.load(str(src))
    result = qdq_uint8(str(src), str(tmp_path / "u8.onnx"))
    assert result == {"rewritten": len(_int8_activation_qs(before)), "kept": True,
                      "max_diff": 0.0}
    after = onnx.load(str(tmp_path / "u8.onnx"))
    assert result["rewritten"] > 0 and not _int8_activation_qs(after)
    inits = {i.name: i for i in after.graph.initializer}
    for q in (n for n in after.graph.node if n.op_type == "QuantizeLinear"):
        assert inits[q.input[2]].data_type == onnx.TensorProto.UINT8
    weights = {i.name: numpy_helper.to_array(i) for i in before.graph.initializer
               if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2}
    assert weights
    for name, w in weights.items():
        assert np.array_equal(numpy_helper.to_array(inits[name]), w)


def test_uint8_reencoding_skips_a_quantized_tensor_read_by_other_ops(tmp_path):
    """A QuantizeLinear read by two DequantizeLinears is re-encoded (ONNX Runtime's own s8->u8
    pass skips it); one whose int8 output is a graph output is left int8."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from mtconvert.backends.onnx_tools import qdq_uint8

    def init(name, value, dtype):
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)

    w = np.random.default_rng(0).integers(-127, 128, (8, 8))
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xa"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xb"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wf"]),
             helper.make_node("MatMul", ["xa", "wf"], ["m"]),
             helper.make_node("Add", ["m", "xb"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("yq", TensorProto.INT8, [2, 8])],
        [init("s", 0.05, np.float32), init("z", 3, np.int8), init("w", w, np.int8),
         init("ws", 0.01, np.float32), init("wz", 0, np.int8)])
    src = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), str(src))
    result = qdq_uint8(str(src), str(tmp_path / "u8.onnx"))
    assert result == {"rewritten": 1, "kept": True, "max_diff": 0.0}
    after = onnx.load(str(tmp_path / "u8.onnx"))
    types = {i.name: i.data_type for i in after.graph.initializer}
    zero_points = {n.output[0]: types[n.input[2]] for n in after.graph.node if len(n.input) > 2}
    assert zero_points == {"xq": TensorProto.UINT8, "xa": TensorProto.UINT8,
                           "xb": TensorProto.UINT8, "wf": TensorProto.INT8,
                           "yq": TensorProto.INT8}
