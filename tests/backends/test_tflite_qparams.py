"""Fully-integer TFLite for a QDQ source with the source's own activation scales
(backends/tflite_qparams.py): the route is offered for static-QDQ sources only, says why when it
cannot apply, and on the QDQ fixture gives an artifact whose weight layers compute in int8 and
whose activations carry the source's scales where they were matched, judged against the source
with the int8-source profile."""
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

import mtconvert
from mtconvert import quantized
from mtconvert.backends import tflite_qparams
from mtconvert.backends.base import PreparedSource, TargetOptions, TensorSpec
from mtconvert.errors import ConversionError
from mtconvert.validators.compare import compare_output
from mtconvert.validators.tolerances import PROFILES

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
QDQ = FIXTURES / "bert_int8_qdq.onnx"
SHAPES = {"input_ids": (2, 16), "attention_mask": (2, 16)}  # the fixture's inputs.npz


def test_the_route_comes_first_for_a_static_qdq_source_only() -> None:
    from mtconvert.backends.tflite import TfliteBackend

    def routes(name: str) -> list[str]:
        path = FIXTURES / f"{name}.onnx"
        src = SimpleNamespace(quantization=quantized.describe_path(path) or {}, onnx_path=path,
                              inputs=(), input_shapes={})
        return TfliteBackend().routes(src)

    assert routes("bert_int8_qdq")[0] == tflite_qparams.ROUTE
    assert tflite_qparams.ROUTE not in routes("bert_int8_dynamic")  # no static scales
    assert tflite_qparams.ROUTE not in routes("bert_encoder")


def test_every_static_activation_scale_of_the_source_is_listed() -> None:
    model = onnx.load(str(QDQ))
    acts = quantized.activation_scales(model)
    statics = [n for n in model.graph.node if n.op_type == "QuantizeLinear"
               and n.input[0] not in {i.name for i in model.graph.initializer}]
    assert len(acts) == len(statics) > 0
    assert all(a["dtype"] == "int8" and a["scale"] > 0 for a in acts.values())


def test_the_sources_grid_gives_back_its_scale_and_zero_point() -> None:
    for q in ({"scale": 0.02, "zero_point": 37, "dtype": "uint8"},
              {"scale": 0.5, "zero_point": -5, "dtype": "int8"}):
        lo, hi = tflite_qparams.grid(q)
        scale, zero = tflite_qparams.expected(q)
        assert np.isclose((hi - lo) / 255, scale, rtol=1e-9)
        assert round(-128 - lo / scale) == zero  # TFLite's zero point from the range
    assert tflite_qparams.expected({"scale": 1.0, "zero_point": 200, "dtype": "uint8"})[1] == 72


FULL = {"int8_scheme": "full"}


@pytest.mark.parametrize("opts,why", [
    (TargetOptions(precision="int8", extra=FULL), "calibration data"),
    (TargetOptions(precision="fp16", calibration=Path("c.npz"), extra=FULL), "int8 only"),
    (TargetOptions(precision="int8", calibration=Path("c.npz")), "--int8-scheme full asks"),
    (TargetOptions(precision="int8", calibration=Path("c.npz"),
                   extra={"int8_scheme": "dynamic"}), "dynamic-range int8 is the default"),
])
def test_the_route_is_rejected_with_its_reason(opts: TargetOptions, why: str) -> None:
    acts = quantized.activation_scales(onnx.load(str(QDQ)))
    opts = replace(opts, extra={**opts.extra, "source_quantization": {"activations": acts}})
    with pytest.raises(ConversionError, match=why):
        tflite_qparams.job_settings(opts)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):
    """The QDQ fixture through the route, as the run hands it over (dequantized), with 8
    generated calibration samples."""
    from mtconvert.backends.tflite import TfliteBackend

    tmp = tmp_path_factory.mktemp("qparams")
    rng = np.random.default_rng(1)
    mask = np.ones((8, *SHAPES["attention_mask"]), np.int64)
    for i in range(8):
        mask[i, :, 16 - 2 * i:] = 0
    calib = tmp / "calib.npz"
    np.savez(calib, input_ids=rng.integers(0, 1000, (8, *SHAPES["input_ids"])),
             attention_mask=mask)
    (tmp / "work").mkdir()
    src = PreparedSource("onnx", QDQ.stem, QDQ, tuple(TensorSpec(n, s, "int64")
                                                      for n, s in SHAPES.items()),
                         (TensorSpec("logits", (2, 3), "float32"),), SHAPES, tmp / "work",
                         path=QDQ, quantization=quantized.describe_path(QDQ))
    plan = quantized.plan_for(src, "tflite", ("fp32", "fp16", "int8"), "int8")
    topts = TargetOptions(precision="int8", calibration=calib, route=tflite_qparams.ROUTE,
                          extra=FULL)
    lowered, topts = quantized.lowered(src, "tflite", topts, plan)
    backend = TfliteBackend()
    artifact = backend.convert(lowered, tmp, topts)
    return backend, artifact, topts.extra["source_quantization"]["activations"]


@pytest.mark.slow
def test_weight_layers_compute_in_int8(converted) -> None:
    _, artifact, _ = converted
    floats = tflite_qparams.float_ops(artifact.primary)
    assert not {"FULLY_CONNECTED", "BATCH_MATMUL"} & set(floats)
    assert any(s.startswith("int8 full-integer:") for s in artifact.steps)


@pytest.mark.slow
def test_activations_carry_the_sources_scales_and_the_rest_are_named(converted) -> None:
    _, artifact, acts = converted
    result = {"source_scales": _found(artifact)}
    c = tflite_qparams.carried(artifact.primary, result["source_scales"], acts)
    assert len(c["carried"]) > 0
    named = c["carried"] + c["other_params"] + c["unmatched"] + c["absent"]
    assert sorted(named) == sorted(acts)
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(str(artifact.primary))
    details = {t["name"]: t for t in interp.get_tensor_details()}
    name = {t["index"]: t["name"] for t in interp.get_tensor_details()}
    # a tensor the source computes in float is quantized where the source did: a QUANTIZE op
    quantize = {name[op["inputs"][0]]: name[op["outputs"][0]]
                for op in interp._get_ops_details() if op["op_name"] == "QUANTIZE"}
    for source in c["carried"]:  # read back: the tensor holds exactly the source's grid
        scale, zero = tflite_qparams.expected(acts[source])
        held = [details[m]["quantization"] for n in result["source_scales"]["tensors"][source]
                for m in (n, quantize.get(n)) if m in details]
        assert any(np.isclose(s, scale, rtol=1e-6) and z == zero for s, z in held)


@pytest.mark.slow
def test_numerics_pass_the_int8_source_profile(converted) -> None:
    import onnxruntime as ort

    backend, artifact, _ = converted
    feeds = dict(np.load(FIXTURES / "bert_int8_qdq.inputs.npz"))
    ref = ort.InferenceSession(str(QDQ), providers=["CPUExecutionProvider"]).run(
        ["logits"], feeds)[0]
    with backend.open(artifact, 2) as session:
        out = session.run(feeds)["logits"]
    result = compare_output("logits", ref, out, PROFILES["int8-source"])
    assert result.passed, result.reason


def _found(artifact) -> dict:
    """The child's match (source tensor -> TFLite tensors), from the conversion log."""
    import json

    lines = [line for line in artifact.log_path.read_text().splitlines()
             if line.startswith("MTCONVERT-RESULT ") and "source_scales" in line]
    return json.loads(lines[-1].split(" ", 1)[1])["source_scales"]


@pytest.mark.slow
def test_the_compressed_check_reads_the_source_scales_back(converted, tmp_path: Path) -> None:
    from mtconvert import compressed_check

    _, artifact, _ = converted
    record = next((artifact.primary.parent / "work").rglob("*.weights.json"))
    kept = compressed_check.kept("tflite", artifact.primary, str(record))
    assert kept["source_activations"] == len(json_of(compressed_check.activations_path(record)))
    assert 0 < kept["activation_tensors_with_source_scale"] <= kept["int8_activation_tensors"]
    assert kept["same_ints_and_scales"] > 0


def json_of(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


@pytest.mark.slow
def test_int8_scheme_full_alone_takes_the_route_for_a_qdq_source(tmp_path: Path) -> None:
    """A QDQ source is planned at int8 whatever --precision says, so --int8-scheme full alone
    gets calibration data and the source-scales route (it was rejected for want of data)."""
    report = mtconvert.convert(FIXTURES / "bert_int8_qdq.onnx", targets=["tflite"],
                               out_dir=tmp_path, int8_scheme="full", iterations=1)
    t = report.targets["tflite"]
    assert t.status == "passed", t.reason
    assert f"route {tflite_qparams.ROUTE}: chosen (passed)" in t.conversion.steps
    assert report.settings["calibration"]
    assert t.compressed["kept"]["activation_tensors_with_source_scale"] > 0
