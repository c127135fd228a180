"""Quantized ONNX sources (issue 20): detection, the dequantize lowering, and both quantized
fixtures through the four targets with the real converters, staying compressed."""
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from mtconvert import quantized
from mtconvert.backends.lowering import check
from mtconvert.backends.lowering.dequantize import dequantize
from mtconvert.backends.lowering.graph import NotApplicable
from mtconvert.validators.tolerances import PROFILES
from tests.models import quick_convert

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
QUANTIZED = {"bert_int8_qdq": "qdq", "bert_int8_dynamic": "dynamic"}
TARGETS = ("onnx-mobile", "tflite", "coreml", "ncnn")
SHAPES = {"input_ids": [2, 16], "attention_mask": [2, 16]}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("name,scheme", sorted(QUANTIZED.items()))
def test_detects_the_scheme(name: str, scheme: str) -> None:
    info = quantized.describe_path(FIXTURES / f"{name}.onnx")
    assert info["scheme"] == scheme
    assert info["int8_weights"] > 0 and info["weight_granularity"] == "per-tensor"
    assert (info["activation_steps"] is not None) == (scheme == "qdq")


def test_a_float_source_is_not_quantized() -> None:
    assert quantized.describe_path(FIXTURES / "bert_encoder.onnx") is None


@pytest.mark.parametrize("name", sorted(QUANTIZED))
def test_dequantize_leaves_a_float_graph_and_records_every_int8_weight(name: str) -> None:
    model = onnx.load(str(FIXTURES / f"{name}.onnx"))
    out = dequantize(model)
    onnx.checker.check_model(out.model)
    ops = {n.op_type for n in out.model.graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear", "MatMulInteger",
                      "DynamicQuantizeLinear"}
    inits = {i.name: numpy_helper.to_array(i) for i in out.model.graph.initializer}
    assert len(out.weights) >= quantized.describe(model)["int8_weights"]
    for fname, r in out.weights.items():  # each float weight is exactly (ints - zp) * scale
        ints = np.asarray(r["ints"], np.float32).reshape(r["shape"])
        zero = np.float32(r["zero_point"][0]) if r["zero_point"] else np.float32(0)
        assert np.array_equal(inits[fname], (ints - zero) * np.float32(r["scale"][0]))
    # without the source's activation rounding the outputs stay within the int8-source profile
    feeds = check.make_feeds(model, SHAPES, check.embedding_sizes(model))
    ref, got = check.run(model, feeds), check.run(out.model, feeds)
    for r, g in zip(ref, got):
        for key in r:
            assert _cosine(r[key], g[key]) >= PROFILES["int8-source"].min_cosine


def test_qoperator_graphs_are_named_not_rewritten() -> None:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.UINT8, [1, 4])
    consts = [numpy_helper.from_array(np.array(v, dtype=d), n) for n, v, d in [
        ("s", 0.1, np.float32), ("z", 0, np.uint8), ("w", np.eye(4), np.uint8)]]
    node = helper.make_node("QLinearMatMul", ["x", "s", "z", "w", "s", "z", "s", "z"], ["y"])
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], consts))
    with pytest.raises(NotApplicable, match="QLinearMatMul"):
        dequantize(model)


def test_the_fp32_profile_is_not_the_quantized_sources() -> None:
    assert PROFILES["fp32"].min_cosine == 0.99999 and PROFILES["fp32"].atol == 1e-4
    assert PROFILES["int8-source"].min_cosine > PROFILES["int8"].min_cosine


@pytest.fixture(scope="module", params=sorted(QUANTIZED))
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    name = request.param
    report = quick_convert(",".join(TARGETS), FIXTURES / f"{name}.onnx",
                           tmp_path_factory.mktemp(name), input_shapes={"input_ids": "1x16"})
    return name, report


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_quantized_source_converts_and_stays_compressed(converted, target: str) -> None:
    name, report = converted
    t = report.targets[target]
    assert t.status == "passed", t.reason
    c = t.compressed
    assert c["source"]["scheme"] == QUANTIZED[name]
    assert c["source_bytes"] == (FIXTURES / f"{name}.onnx").stat().st_size
    assert c["bytes"] == sum(a.bytes for a in t.artifacts)
    assert c["fallback"] is None and c["size_ratio"] <= quantized.RATIO_LIMIT
    kept = c["kept"]
    if target == "coreml":  # constexpr int8 weights, each holding a source weight's ints+scales
        assert kept["int8_tensors"] == kept["same_ints_and_scales"] > 0
        assert kept["not_from_source"] == 0
    if target == "tflite":  # weight-only/dynamic-range int8 holding the source's ints, no Flex
        assert kept["same_ints_and_scales"] > 0
        assert not any("FLEX" in f["message"] for f in t.findings)
    if target == "ncnn":  # int8 layers holding the source's ints and scales (ncnn_int8)
        assert t.precision == "int8" and kept["int8_tensors"] == kept["same_ints_and_scales"] > 0
    if target == "onnx-mobile":
        assert t.precision == "fp32" and c["kept"] is None


def _src(name: str, tmp_path: Path):
    from types import SimpleNamespace

    path = FIXTURES / f"{name}.onnx"
    return SimpleNamespace(onnx_path=path, path=path, work_dir=tmp_path, name=name,
                           quantization=None)  # not described at load: plan_for reads it


def test_each_target_gets_its_plan(tmp_path: Path) -> None:
    assert quantized.plan_for(_src("bert_encoder", tmp_path), "tflite", ("fp32", "int8"),
                              "fp32") is None
    src = _src("bert_int8_qdq", tmp_path)
    native = quantized.plan_for(src, "onnx-mobile", ("fp32", "int8"), "fp32")
    assert native["lower"] is False and native["source"]["scheme"] == "qdq"
    tfl = quantized.plan_for(src, "tflite", ("fp32", "fp16", "int8"), "fp32")
    assert tfl["lower"] and tfl["precision"] == "int8" and not tfl.get("fallback")
    ncnn = quantized.plan_for(src, "ncnn", ("fp32", "fp16", "int8"), "fp32")
    assert ncnn["lower"] and ncnn["precision"] == "int8" and not ncnn.get("fallback")
    none = quantized.plan_for(src, "tflite", ("fp32", "fp16"), "fp32")  # a target without int8
    assert none["precision"] == "fp32" and "fp32" in none["fallback"]


def test_the_description_made_at_load_is_used_not_the_graph_again(tmp_path: Path) -> None:
    """A source loaded (or found in the source cache) carries its quantization description,
    so a warm run does not parse the ONNX again to plan the targets."""
    from mtconvert import source

    loaded = source.load(FIXTURES / "bert_int8_qdq.onnx", tmp_path).prepared
    assert loaded.quantization["scheme"] == "qdq"
    assert source.load(FIXTURES / "bert_encoder.onnx", tmp_path).prepared.quantization == {}
    described_float = _src("bert_int8_qdq", tmp_path)
    described_float.quantization = {}
    assert quantized.plan_for(described_float, "tflite", ("fp32", "int8"), "fp32") is None


def test_a_target_larger_than_the_limit_fails_unless_a_fallback_is_stated(
        tmp_path: Path) -> None:
    from mtconvert.report import ArtifactFile, TargetReport

    src = _src("bert_int8_qdq", tmp_path)
    source = (FIXTURES / "bert_int8_qdq.onnx").stat().st_size
    big = TargetReport("tflite", "passed", precision="int8", artifacts=(
        ArtifactFile(str(tmp_path / "m.bin"), int(source * 1.5)),))
    plan = quantized.plan_for(src, "tflite", ("fp32", "int8"), "fp32") | {"record": None}
    failed = quantized.summary(big, "tflite", plan)
    assert failed.status == "failed" and "1.50x" in failed.reason
    assert failed.compressed["size_ratio"] == pytest.approx(1.5, abs=1e-3)
    stated = quantized.plan_for(src, "tflite", ("fp32",), "fp32") | {"record": None}
    kept = quantized.summary(big, "tflite", stated)
    assert kept.status == "passed" and kept.compressed["fallback"]
    # planned int8, but the target kept fp32 (ncnn when no layer could be made int8): stated
    from dataclasses import replace

    kept_fp32 = quantized.summary(replace(big, precision="fp32"), "tflite", plan)
    assert kept_fp32.status == "passed" and "kept fp32" in kept_fp32.compressed["fallback"]


@pytest.fixture(scope="module")
def per_channel_qdq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bert_encoder quantized like bert_int8_qdq but with per-channel weight scales (the
    fixtures are per-tensor): onnxruntime's quantize_static, calibrated on the lowering checks'
    seeded inputs."""
    import contextlib
    import tempfile
    import warnings

    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = FIXTURES / "bert_encoder.onnx"
    dst = tmp_path_factory.mktemp("per_channel") / "bert_int8_qdq_pc.onnx"
    model = onnx.load(str(src))
    feeds = check.make_feeds(model, SHAPES, check.embedding_sizes(model))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self):  # noqa: ANN202
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), auto_merge=True)
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return dst


def test_per_channel_weights_keep_their_axis(per_channel_qdq: Path) -> None:
    model = onnx.load(str(per_channel_qdq))
    assert quantized.describe(model)["weight_granularity"] == "per-channel"
    out = dequantize(model)
    inits = {i.name: numpy_helper.to_array(i) for i in out.model.graph.initializer}
    for fname, r in out.weights.items():
        ints = np.asarray(r["ints"], np.float32).reshape(r["shape"])
        shape = [1] * ints.ndim
        shape[r["axis"]] = len(r["scale"])
        assert len(r["scale"]) == ints.shape[r["axis"]] > 1
        assert np.array_equal(inits[fname],
                              ints * np.asarray(r["scale"], np.float32).reshape(shape))


@pytest.mark.slow
def test_per_channel_source_keeps_its_scales_in_core_ml(per_channel_qdq: Path,
                                                        tmp_path: Path) -> None:
    t = quick_convert("coreml", per_channel_qdq, tmp_path,
                      input_shapes={"input_ids": "1x16"}).targets["coreml"]
    assert t.status == "passed", t.reason
    kept = t.compressed["kept"]
    assert kept["int8_tensors"] == kept["same_ints_and_scales"] > 0
    assert t.compressed["size_ratio"] <= quantized.RATIO_LIMIT


@pytest.mark.slow
def test_validate_mode_judges_built_artifacts_as_a_conversion_does(converted) -> None:
    """`mtconvert validate QUANTIZED.onnx ARTIFACT`: the int8-source profile and the size
    against the source, as for mtconvert's own conversion (the artifacts of the test above)."""
    import mtconvert

    name, report = converted
    paths = [a.path for t in ("tflite", "ncnn") for a in report.targets[t].artifacts
             if a.role == "artifact"]
    checked = mtconvert.validate(FIXTURES / f"{name}.onnx", paths, iterations=3, warmup=1,
                                 input_shapes={"input_ids": "1x16"})
    for target in ("tflite", "ncnn"):
        t = checked.targets[target]
        assert t.status == "passed", t.reason
        assert any("int8-source" in f["message"] for f in t.findings)
        c = t.compressed
        assert c["route"] == "built elsewhere (validate)" and c["kept"] is None
        assert c["bytes"] == sum(a.bytes for a in report.targets[target].artifacts)
    for target in ("tflite", "ncnn"):  # ncnn: its int8 layers found in the .param
        assert checked.targets[target].compressed["size_ratio"] <= quantized.RATIO_LIMIT
    assert checked.targets["ncnn"].precision == "int8"


def test_chained_pairs_and_shared_zero_points_are_rewritten() -> None:
    """PT2E exports re-quantize a dequantized activation (Q -> DQ -> Q -> DQ) and torch's
    exporter shares one zero-point constant through Identity nodes: the float graph stays
    connected and every weight's record keeps its zero points."""
    T = onnx.TensorProto
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (8, 4)).astype(np.int8)
    consts = [numpy_helper.from_array(v, n) for n, v in [
        ("s", np.float32(0.05)), ("z", np.int8(0)), ("w", w),
        ("ws", np.full(4, 0.01, np.float32)), ("wz", np.zeros(4, np.int8))]]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q1"]),
             helper.make_node("DequantizeLinear", ["q1", "s", "z"], ["d1"]),
             helper.make_node("QuantizeLinear", ["d1", "s", "z"], ["q2"]),
             helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["d2"]),
             helper.make_node("Identity", ["wz"], ["wz2"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz2"], ["wf"], axis=1),
             helper.make_node("MatMul", ["d2", "wf"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [2, 4])], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    out = dequantize(model)
    onnx.checker.check_model(out.model, full_check=True)
    assert [n.op_type for n in out.model.graph.node] == ["MatMul"]
    assert out.model.graph.node[0].input[0] == "x"
    (r,) = out.weights.values()
    assert r["zero_point"] == [0, 0, 0, 0] and r["axis"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    "bert_int8_qdq", pytest.param("bert_int8_dynamic", marks=pytest.mark.sweep)])
def test_executorch_takes_a_quantized_source_through_its_xnnpack_quantizer(
        name: str, tmp_path: Path) -> None:
    """executorch re-quantizes the dequantized graph with its own XNNPACK quantizer (PT2E):
    int8, judged against the quantized source, within the size limit; its int8 tensors are
    not read back (kept: None), so nothing claims they hold the source's ints."""
    report = quick_convert("executorch", FIXTURES / f"{name}.onnx", tmp_path,
                           input_shapes={"input_ids": "1x16"})
    t = report.targets["executorch"]
    assert t.status == "passed", t.reason
    assert t.precision == "int8"
    assert any(s.startswith(f"tolerance profile {quantized.PROFILE}") for s in t.conversion.steps)
    c = t.compressed
    assert c["source"]["scheme"] == QUANTIZED[name] and c["kept"] is None
    assert c["fallback"] is None and c["size_ratio"] <= quantized.RATIO_LIMIT
