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
    assert {f["code"] for f in t.findings} == {"ep-nnapi", "ep-coreml-mlprogram"}


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
    report = _run(fixtures_dir / "bert_int8_qdq.onnx", tmp_path, precision="int8")
    t = report.targets["onnx-mobile"]
    assert t.status == "passed"
    assert any("already quantized" in s for s in t.conversion.steps)


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
