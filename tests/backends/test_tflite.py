"""tflite with the real onnx2tf, TFLiteConverter and LiteRT interpreter."""
import pytest

from tests.models import quick_convert
from mtconvert.backends.process import error_summary
from mtconvert.backends.tflite import _layout_perm, shape_collisions, tflite_ops

from mtconvert.backends.tflite import TfliteBackend

pytestmark = pytest.mark.skipif(not TfliteBackend.availability().can_convert,
                                reason="tflite toolchain not installed")

PASSING = ["bert_encoder", "gpt_decoder", "vit_encoder", "bert_pruned", "bert_distilled",
           "bert_lowrank"]


def _run(model, out, **kw):
    return quick_convert("tflite", model, out, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("fixture", PASSING)
def test_fixture_passes_fp32_without_flex(fixture, fixtures_dir, tmp_path):
    t = _run(fixtures_dir / f"{fixture}.onnx", tmp_path).targets["tflite"]
    assert t.status == "passed", t.reason
    assert t.numerics.worst["max_abs"] < 1e-4
    assert t.numerics.runtime == "ai-edge-litert+xnnpack"
    ops = tflite_ops(tmp_path / f"{fixture}.tflite")
    assert not [op for op in ops if ":" in op], ops
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{fixture}.tflite",
                                                          f"{fixture}.tflite.log"]


@pytest.mark.slow
def test_erf_replacement_is_listed(fixtures_dir, tmp_path):
    t = _run(fixtures_dir / "bert_encoder.onnx", tmp_path).targets["tflite"]
    assert any(s.startswith("onnx2tf pseudo-operator: erf") for s in t.conversion.steps)
    assert any(s.startswith("fix shapes: input_ids=1x32") for s in t.conversion.steps)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precisions_pass_and_shrink(precision, fixtures_dir, tmp_path):
    t = _run(fixtures_dir / "bert_encoder.onnx", tmp_path, precision=precision).targets["tflite"]
    assert t.status == "passed", t.reason
    artifact = tmp_path / f"bert_encoder.{precision}.tflite"
    assert t.artifacts[0].path == str(artifact)
    fp32_bytes = (fixtures_dir / "bert_encoder.onnx").stat().st_size
    assert artifact.stat().st_size < fp32_bytes * (0.6 if precision == "fp16" else 0.4)
    # the change against the same model's fp32 artifact, which is not shipped
    assert t.numerics.fp32_worst["max_abs"] < 1e-4
    change = t.numerics.vs_fp32["logits"]
    assert 0 < change["max_abs"] and change["cosine"] > 0.99
    assert [a.path for a in t.artifacts] == [str(artifact)]


@pytest.mark.slow
def test_full_integer_keeps_failing_kernels_in_float(fixtures_dir, tmp_path):
    report = _run(fixtures_dir / "vit_encoder.onnx", tmp_path, precision="int8",
                  extra={"int8_scheme": "full"})
    t = report.targets["tflite"]
    assert t.status == "passed", t.reason
    assert "generated samples" in report.settings["calibration"]
    assert "int8 full-integer: DIV kept in float" in " ".join(t.conversion.steps)


@pytest.mark.slow
def test_pt2_source(fixtures_dir, tmp_path):
    report = _run(fixtures_dir / "gpt_decoder.pt2", tmp_path)
    assert report.reference.runtime == "pytorch-eager"
    assert report.targets["tflite"].status == "passed", report.targets["tflite"].reason


@pytest.mark.slow
def test_quantized_sources_fail_with_named_reasons(fixtures_dir, tmp_path):
    qdq = _run(fixtures_dir / "bert_int8_qdq.onnx", tmp_path / "qdq").targets["tflite"]
    assert qdq.status == "failed" and "FLEX:ClipByValue" in qdq.reason
    flex = _run(fixtures_dir / "bert_int8_qdq.onnx", tmp_path / "flex",
                extra={"allow_flex": True}).targets["tflite"]
    assert flex.status == "skipped" and "Flex" in flex.reason  # never "passed" unchecked
    dyn = _run(fixtures_dir / "bert_int8_dynamic.onnx", tmp_path / "dyn").targets["tflite"]
    assert dyn.status == "error" and dyn.reason.startswith("onnx2tf: exit code 1: ValueError")
    assert sorted(p.name for p in (tmp_path / "dyn").iterdir()) == ["bert_int8_dynamic.tflite.log"]


def test_layout_perm_and_collisions():
    assert _layout_perm([1, 8, 8, 3], [1, 3, 8, 8]) == [0, 3, 1, 2]
    assert _layout_perm([1, 16, 64], [1, 16, 64]) is None
    assert _layout_perm([1, 5, 7], [1, 6, 5]) is None
    assert shape_collisions({"ids": [1, 32], "m": [1, 32]}, [32, 64]) == [32]
    assert shape_collisions({"ids": [1, 48]}, [32, 64]) == []


def test_error_summary_picks_the_telling_line():
    out = ("noise\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
           "ValueError: Exception encountered when calling layer 'r' (type T).\n\n"
           "    Cannot reshape a tensor with 2048 elements\n  • name='x'\n")
    assert error_summary(out) == ("ValueError: Exception encountered when calling layer 'r' "
                                  "(type T). Cannot reshape a tensor with 2048 elements")
    assert error_summary("fine\nlast words\n") == "last words"
