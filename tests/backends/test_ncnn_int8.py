"""ncnn int8 layers holding a quantized source's own ints and scales (backends/ncnn_int8.py),
with the real pnnx and ncnn: a hand-made InnerProduct run by ncnn's int8 kernel, the QDQ
fixture (per-tensor, asymmetric activations), a per-channel QDQ source (int8 Gemm x channel scales)
and the dynamic fixture (no activation scales)."""
from pathlib import Path

import numpy as np
import pytest

from mtconvert import quantized
from mtconvert.backends import ncnn_int8
from mtconvert.backends.lowering.dequantize import record, values
from mtconvert.backends.ncnn import NcnnBackend, param_layer_types, param_layers
from mtconvert.backends.ncnn_int8 import params
from tests.models import quick_convert

pytestmark = pytest.mark.skipif(not NcnnBackend.availability().can_convert,
                                reason="pnnx/ncnn not installed")
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
SHAPES = {"input_ids": "1x16"}
K, N, ROWS = 8, 3, 4


def _tiny_fc(tmp_path: Path, rec: dict, bias: np.ndarray) -> tuple[Path, Path]:
    """A float .param/.bin: one InnerProduct [ROWS, K] -> [ROWS, N] whose weight is the
    record's dequantized values (ncnn holds it [N, K]), as pnnx writes it."""
    param, binf = tmp_path / "fc.param", tmp_path / "fc.bin"
    param.write_text(f"7767517\n2 2\nInput in0 0 1 in0 0={K} 1={ROWS}\n"
                     f"InnerProduct fc 1 1 in0 out0 0={N} 1=1 2={N * K}\n")
    binf.write_bytes(b"\0\0\0\0" + values(rec).T.astype(np.float32).tobytes()
                     + bias.astype(np.float32).tobytes())
    return param, binf


def _run(param: Path, x: np.ndarray) -> np.ndarray:
    import ncnn

    net = ncnn.Net()
    net.opt.use_fp16_storage = net.opt.use_fp16_arithmetic = False
    net.opt.use_fp16_packed = net.opt.use_bf16_storage = False
    net.opt.use_int8_inference = True
    assert net.load_param(str(param)) == 0 and net.load_model(str(param.with_suffix(".bin"))) == 0
    ex = net.create_extractor()
    ex.input("in0", ncnn.Mat(np.ascontiguousarray(x, np.float32)).clone())
    ret, out = ex.extract("out0")
    assert ret == 0
    return np.array(out.numpy()).copy()


@pytest.fixture(scope="module")
def fc_case():
    rng = np.random.default_rng(0)
    ints = rng.integers(-127, 128, (K, N)).astype(np.int8)  # ONNX MatMul layout [K, N]
    rec = record(ints, np.float32(0.02), np.zeros((), np.int8), None)
    rec["input"] = {"scale": 0.05, "zero_point": 0, "dtype": "int8"}
    return rec, rng.normal(0, 0.1, N).astype(np.float32), rng.uniform(-3, 3, (ROWS, K))


def test_an_inner_product_runs_ncnns_int8_kernel_with_the_sources_ints(fc_case, tmp_path):
    rec, bias, x = fc_case
    param, binf = _tiny_fc(tmp_path, rec, bias)
    float_out = _run(param, x)
    res = ncnn_int8.rewrite(param, binf, param_layers(param), {"w": rec})
    assert res.int8 == ["fc (InnerProduct)"] and not res.kept_float
    # the .bin read back: the int8 tag, the source's ints (as [N, K]) and ONNX's scale
    (ints, scales), = ncnn_int8.int8_tensors(param, param_layers(param))
    assert np.array_equal(ints, np.asarray(rec["ints"]).reshape(K, N).T)
    assert np.allclose(scales, 0.02, rtol=1e-6, atol=0)
    # what ncnn's int8 kernel computes: x quantized with the source's scale (ncnn's
    # round-half-away, clamp to +-127), an integer product, one descale, the bias
    xq = np.clip(np.trunc(x / 0.05 + np.copysign(0.5, x)), -127, 127)
    want = (xq @ np.asarray(rec["ints"]).reshape(K, N)) * np.float32(0.05 * 0.02) + bias
    got = _run(param, x)
    assert np.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, float_out, rtol=0, atol=1e-4)  # not the float product


@pytest.mark.parametrize("trans_b", [1, 0])
def test_a_per_channel_gemm_stays_an_int8_gemm_then_multiplies_by_the_channel_scales(
        fc_case, tmp_path, trans_b):
    """Gemm holds one weight scale: a per-channel Gemm keeps ncnn's int8 Gemm kernel on the
    source's ints under the B scale 1, then a BinaryOp multiplies column j by the source's s_j
    (a MemoryData) and another adds the bias (the C blob, moved). ncnn computes A quantized per
    row (absmax, at run time) times the ints, exactly descaled, times s_j, plus the bias."""
    _, bias, x = fc_case
    rng = np.random.default_rng(1)
    ints = rng.integers(-127, 128, (K, N)).astype(np.int8)
    scales = np.array([0.01, 0.02, 0.04], np.float32)
    rec = record(ints, scales, np.zeros(N, np.int8), 1)  # no activation scale: not needed
    param, binf = tmp_path / "g.param", tmp_path / "g.bin"
    param.write_text(f"7767517\n2 2\nInput in0 0 1 in0 0={K} 1={ROWS}\nGemm g 1 1 in0 out0 "
                     f"2=0 3={trans_b} 4=0 5=1 6=1 7={ROWS} 8={N} 9={K} 10=4\n")
    w = values(rec).T if trans_b else values(rec)  # the layer's layout: [N, K] with transB
    binf.write_bytes(b"\0\0\0\0" + w.astype(np.float32).tobytes() + b"\0\0\0\0" + bias.tobytes())
    float_out = _run(param, x)
    res = ncnn_int8.rewrite(param, binf, param_layers(param), {"w": rec})
    assert res.int8 == ["g (Gemm x channel scales)"] and not res.kept_float
    assert param_layer_types(param) == ["Input", "Gemm", "MemoryData", "BinaryOp",
                                        "MemoryData", "BinaryOp"]
    assert ncnn_int8.is_int8(*[(k, raw) for k, _, _, _, raw in param_layers(param)][1])
    (got_ints, got_scales), = ncnn_int8.int8_tensors(param, param_layers(param))
    assert np.array_equal(got_ints, ints.T if trans_b else ints)
    assert np.array_equal(got_scales, scales)  # the source's scales, stored as they are
    absmax = np.abs(x).max(axis=1, keepdims=True)
    xq = np.clip(np.trunc(x * (127 / absmax) + np.copysign(0.5, x)), -127, 127)
    want = (xq @ ints.astype(np.float64)) * (absmax / 127) * scales + bias
    got = _run(param, x)
    assert np.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, float_out, rtol=0, atol=1e-4)  # not the float product
    assert np.allclose(got, float_out, atol=0.05 * np.abs(float_out).max())  # the same product


def test_a_per_channel_gemm_that_is_not_a_plain_product_stays_fp32(fc_case, tmp_path):
    _, bias, _ = fc_case
    ints = np.random.default_rng(2).integers(-127, 128, (K, N)).astype(np.int8)
    rec = record(ints, np.array([0.01, 0.02, 0.04], np.float32), np.zeros(N, np.int8), 1)
    param, binf = tmp_path / "g.param", tmp_path / "g.bin"
    param.write_text(f"7767517\n2 2\nInput in0 0 1 in0 0={K} 1={ROWS}\nGemm g 1 1 in0 out0 "
                     f"0=0.5 2=0 3=1 4=0 5=1 6=1 7={ROWS} 8={N} 9={K} 10=4\n")  # alpha 0.5
    binf.write_bytes(b"\0\0\0\0" + values(rec).T.astype(np.float32).tobytes() + b"\0\0\0\0"
                     + bias.tobytes())
    res = ncnn_int8.rewrite(param, binf, param_layers(param), {"w": rec})
    assert not res.int8
    assert res.kept_float == ["g (Gemm): per-channel scales (Gemm holds one weight scale; not a "
                              "plain A·B + bias)"]


def test_without_an_activation_scale_the_layer_stays_fp32_and_says_why(fc_case, tmp_path):
    rec, bias, _ = fc_case
    dynamic = {k: v for k, v in rec.items() if k != "input"}
    param, binf = _tiny_fc(tmp_path, dynamic, bias)
    before = binf.read_bytes()
    res = ncnn_int8.rewrite(param, binf, param_layers(param), {"w": dynamic})
    assert not res.int8 and binf.read_bytes() == before
    assert res.kept_float == ["fc (InnerProduct): no activation scale in the source (dynamic "
                              "quantization) for its input"]


def test_calibration_gives_a_dynamic_sources_layer_its_input_scale(fc_case, tmp_path):
    """ncnn2table's absmax: the fp32 model run on the calibration items (the child's handler,
    called here in-process), the input scale 127 / absmax."""
    rec, bias, x = fc_case
    dynamic = {k: v for k, v in rec.items() if k != "input"}
    param, binf = _tiny_fc(tmp_path, dynamic, bias)
    items = np.stack([x, 0.5 * x])  # two calibration items of the [ROWS, K] input (batch 1)
    np.savez(tmp_path / "calib.npz", x=items)
    out = ncnn_int8.calibrate({"param": str(param), "bin": str(binf),
                               "calibration": str(tmp_path / "calib.npz"),
                               "inputs": [["in0", "x", "float32"]], "shapes": {"x": [1, ROWS, K]},
                               "blobs": ["in0"]})
    assert out["samples"] == 2
    assert out["absmax"]["in0"] == pytest.approx(float(np.abs(x).max()), rel=1e-6)
    res = ncnn_int8.rewrite(param, binf, param_layers(param), {"w": dynamic}, out["absmax"])
    assert res.int8 == ["fc (InnerProduct)"]
    data = binf.read_bytes()  # the layer's last float: its input scale
    assert np.frombuffer(data[-4:], np.float32)[0] == pytest.approx(127 / np.abs(x).max())


def test_a_layer_of_unknown_layout_leaves_the_model_fp32(fc_case, tmp_path):
    rec, bias, _ = fc_case
    param, binf = _tiny_fc(tmp_path, rec, bias)
    param.write_text(param.read_text().replace("InnerProduct fc", "Convolution3D fc"))
    res = ncnn_int8.rewrite(param, binf, param_layers(param), {"w": rec})
    assert not res.int8
    assert res.steps == ["int8: layer type Convolution3D (fc): its .bin layout is not known to "
                         "mtconvert: the model stays fp32"]


def test_asymmetric_activations_get_the_symmetric_cover_of_their_range():
    assert ncnn_int8.input_scale({"scale": 0.05, "zero_point": 0, "dtype": "int8"}) == 20.0
    # int8, zero point -121: the source reaches (-128+121)*s .. (127+121)*s
    scale = ncnn_int8.input_scale({"scale": 0.01, "zero_point": -121, "dtype": "int8"})
    assert scale == pytest.approx(127 / (248 * 0.01))
    # uint8 without a zero point (ONNX's default): 0 .. 255*s
    assert ncnn_int8.input_scale({"scale": 0.01, "zero_point": 0, "dtype": "uint8"}) == \
        pytest.approx(127 / 2.55)


@pytest.fixture(scope="module")
def qdq(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("qdq")
    return quick_convert("ncnn", FIXTURES / "bert_int8_qdq.onnx", out,
                         input_shapes=SHAPES).targets["ncnn"]


def _records(t) -> dict:
    """The weights' record the conversion wrote (under the run's work folder, gone after the
    run): rebuilt from the source, as the conversion made it."""
    import onnx

    from mtconvert.backends.lowering.dequantize import dequantize

    return dequantize(onnx.load(str(FIXTURES / f"{t}.onnx"))).weights


@pytest.mark.slow
def test_qdq_fixture_becomes_int8_layers_holding_the_sources_ints(qdq):
    assert qdq.status == "passed", qdq.reason
    assert qdq.precision == "int8" and qdq.numerics.runtime.startswith("ncnn (int8")
    from mtconvert.validators.tolerances import PROFILES

    assert qdq.numerics.outputs["logits"]["tolerance"]["min_cosine"] == \
        PROFILES[quantized.PROFILE].min_cosine  # judged by the int8-source profile
    assert qdq.numerics.vs_fp32  # and its change against the float layers (the fp32 twin)
    c = qdq.compressed
    assert c["fallback"] is None and c["size_ratio"] <= quantized.RATIO_LIMIT
    param = Path(next(a.path for a in qdq.artifacts if a.role == "artifact"))
    tensors = ncnn_int8.int8_tensors(param, param_layers(param))
    recs = [np.asarray(r["ints"]).reshape(r["shape"]) for r in _records("bert_int8_qdq").values()]
    # every int8 layer's ints are a source weight's, exactly (ncnn holds [out, in])
    assert len(tensors) == len(recs) == c["kept"]["same_ints_and_scales"]
    for ints, _ in tensors:
        assert any(np.array_equal(ints, r.T) or np.array_equal(ints, r) for r in recs)
    types = param_layer_types(param)
    assert types.count("Gemm") + types.count("InnerProduct") == len(tensors)


@pytest.mark.slow
def test_qdq_steps_name_int8_and_float_layers(qdq):
    steps = "\n".join(qdq.conversion.steps)
    assert "int8: 14 layer(s) hold the source's int8 weights" in steps
    assert "(Embed): its float weights are no source int8 weight" in steps  # float in source
    assert "quantized asymmetrically in the source" in steps  # the pooler's, classifier's input


@pytest.fixture(scope="module")
def per_channel(tmp_path_factory: pytest.TempPathFactory):
    """bert_encoder through ORT's quantize_static, QDQ, per-channel weights (int8, asymmetric
    activations), as benchmarks/bench_compressed.py quantizes."""
    import sys

    import onnx

    from mtconvert.backends.lowering import check

    sys.path.insert(0, str(FIXTURES.parent / "benchmarks"))
    from bench_compressed import _quantize

    out = tmp_path_factory.mktemp("per_channel")
    src = FIXTURES / "bert_encoder.onnx"
    model = onnx.load(str(src))
    feeds = check.make_feeds(model, {"input_ids": [2, 16], "attention_mask": [2, 16]},
                             check.embedding_sizes(model))
    _quantize(src, out / "bert_qdq_pc.onnx", "qdq-per-channel", feeds)
    return quick_convert("ncnn", out / "bert_qdq_pc.onnx", out / "ncnn",
                         input_shapes=SHAPES).targets["ncnn"]


@pytest.mark.slow
def test_per_channel_weights_keep_int8_gemms_and_the_sources_scales(per_channel):
    """End to end: every per-channel Gemm stays an int8 Gemm (ncnn's fast kernel) followed by
    its channel scales; judged against the source by the int8-source profile; the source's
    ints and scales all read back from the files."""
    from mtconvert.validators.tolerances import PROFILES

    t = per_channel
    assert t.status == "passed", t.reason
    assert t.numerics.outputs["logits"]["tolerance"]["min_cosine"] == \
        PROFILES[quantized.PROFILE].min_cosine
    assert t.precision == "int8" and t.compressed["fallback"] is None
    assert t.compressed["size_ratio"] <= quantized.RATIO_LIMIT
    kept = t.compressed["kept"]
    assert kept["int8_tensors"] == kept["same_ints_and_scales"] == kept["source_int8_weights"]
    param = Path(next(a.path for a in t.artifacts if a.role == "artifact"))
    layers = param_layers(param)
    gemms = [n for k, n, _, _, raw in layers if k == "Gemm" and ncnn_int8.is_int8(k, raw)]
    scaled = [n for k, n, *_ in layers if k == "BinaryOp" and n.endswith("_mul")]
    assert gemms and sorted(scaled) == sorted(f"{n}_mul" for n in gemms)
    assert not [k for k, _, _, _, raw in layers if k == "Gemm" and not ncnn_int8.is_int8(k, raw)
                and params(raw).get("5") == "1"]  # no constant-B Gemm left fp32
    assert f"int8: {kept['int8_tensors']} layer(s) hold the source's int8 weights" in \
        "\n".join(t.conversion.steps)


@pytest.mark.slow
@pytest.mark.sweep  # an end-to-end repeat of the calibration test above
def test_dynamic_fixture_with_calibration_makes_every_weight_layer_int8(tmp_path):
    t = quick_convert("ncnn", FIXTURES / "bert_int8_dynamic.onnx", tmp_path,
                      input_shapes=SHAPES,
                      calibration=FIXTURES / "bert_int8_dynamic.inputs.npz").targets["ncnn"]
    assert t.status == "passed", t.reason
    steps = "\n".join(t.conversion.steps)
    assert "127 / absmax over 2 calibration item(s)" in steps
    assert "no activation scale" not in steps
    assert t.compressed["kept"]["same_ints_and_scales"] == 15  # 12 Gemm, Embed, 2 InnerProduct


@pytest.mark.slow
@pytest.mark.sweep  # test_compressed converts this fixture in make test; this names its layers
def test_dynamic_fixture_int8_where_ncnn_needs_no_activation_scale(tmp_path):
    t = quick_convert("ncnn", FIXTURES / "bert_int8_dynamic.onnx", tmp_path,
                      input_shapes=SHAPES).targets["ncnn"]
    assert t.status == "passed", t.reason
    assert t.precision == "int8" and t.compressed["size_ratio"] <= quantized.RATIO_LIMIT
    steps = "\n".join(t.conversion.steps)
    assert "embed_17 (Embed)" in steps.split("stayed fp32")[0]  # uint8 table, shifted
    assert steps.count("no activation scale in the source (dynamic quantization)") == 2  # IPs
    kept = t.compressed["kept"]
    assert kept["int8_tensors"] == kept["same_ints_and_scales"] > 0


@pytest.mark.slow
def test_a_float_source_at_int8_is_quantized_from_its_own_weights_and_calibration(tmp_path):
    """--precision int8 of a float model: weights by absmax (ncnn2int8's way), InnerProduct
    input scales from the calibration set convert mode builds (generated when not given)."""
    from tests.models import tiny_encoder

    src = tiny_encoder(tmp_path / "tiny.onnx", hidden=32, classes=16)
    t = quick_convert("ncnn", src, tmp_path / "out", precision="int8").targets["ncnn"]
    assert t.status == "passed", t.reason
    assert t.precision == "int8" and t.compressed is None
    steps = "\n".join(t.conversion.steps)
    assert "quantized from the model's float weights" in steps
    assert "127 / absmax over" in steps and "stayed fp32" not in steps
    param = Path(next(a.path for a in t.artifacts if a.role == "artifact"))
    layers = param_layers(param)
    assert sum(ncnn_int8.is_int8(k, raw) for k, _, _, _, raw in layers) == 3  # Embed, 2 FC
    assert t.numerics.vs_fp32  # its change against the same model's fp32 layers
