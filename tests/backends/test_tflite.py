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


def _gelu_and_erf(path):
    """A tiny model with an exact GELU as torch exports it, x·(1 + erf(x/√2))·0.5, on one
    output, and a lone Erf on the other."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32) * 0.2,
                                     "w2"),
             *(numpy_helper.from_array(np.array(v, np.float32), n)
               for n, v in (("sqrt2", 2 ** 0.5), ("one", 1.0), ("half", 0.5)))]
    mk = helper.make_node
    nodes = [mk("MatMul", ["x", "w1"], ["h"]), mk("Div", ["h", "sqrt2"], ["s"]),
             mk("Erf", ["s"], ["e"]), mk("Add", ["e", "one"], ["p"]), mk("Mul", ["h", "p"], ["hp"]),
             mk("Mul", ["hp", "half"], ["g"]), mk("MatMul", ["g", "w2"], ["y"]),
             mk("Erf", ["x"], ["z"])]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
          for n, s in (("x", [1, 8, 16]), ("y", [1, 8, 16]), ("z", [1, 8, 16]))]
    graph = helper.make_graph(nodes, "gelu", vi[:1], vi[1:], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), str(path))
    return path


@pytest.mark.slow
def test_gelu_is_the_builtin_op_and_a_lone_erf_is_emulated(tmp_path):
    """The GELU formula becomes LiteRT's builtin GELU (not onnx2tf's Erf emulation: only the
    lone Erf is emulated), numerics exact, no Flex op."""
    src = _gelu_and_erf(tmp_path / "gelu.onnx")
    t = _run(src, tmp_path / "out").targets["tflite"]
    assert t.status == "passed", t.reason
    assert t.numerics.worst["max_abs"] < 1e-5
    ops = tflite_ops(tmp_path / "out" / "gelu.tflite")
    assert ops["GELU"] == 1 and not [op for op in ops if ":" in op], ops
    steps = " | ".join(t.conversion.steps)
    assert "GELU formula fused into one Gelu node (1 nodes" in steps
    assert "onnx2tf pseudo-operator: erf -> builtin ops (1 nodes)" in steps  # the lone Erf only
    assert "fix shapes: x=1x8x16" in steps


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
def test_full_integer_keeps_failing_kernels_in_float(tmp_path):
    """The DIV of onnx2tf's Erf emulation fails its int8 kernel (its divisor quantizes to the
    zero point): kept in float. (The ViT fixture's exact GELUs are now the builtin GELU, whose
    int8 kernel runs.)"""
    report = _run(_gelu_and_erf(tmp_path / "gelu.onnx"), tmp_path / "out", precision="int8",
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
def test_flex_ops_are_named_and_never_passed_unchecked(tmp_path):
    """A .tflite with a Select-TF op (onnx2tf at its defaults lowers Erf to FlexErf; mtconvert's
    own route avoids it) fails validation with the op named; with --allow-flex it is `skipped`,
    as no interpreter here links Flex, never `passed`."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import mtconvert
    from mtconvert import raw

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(
        np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Erf", ["h"], ["y"])],
        "erf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w])
    src = tmp_path / "erf.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(src))
    built = raw.onnx2tf(src, tmp_path / "raw", 600, None, lambda _: None)
    assert "FLEX:Erf" in tflite_ops(built)
    failed = mtconvert.validate(src, [built], iterations=2, warmup=1).targets["tflite"]
    assert failed.status == "failed" and "FLEX:Erf" in failed.reason, failed.reason
    flex = mtconvert.validate(src, [built], iterations=2, warmup=1,
                              allow_flex=True).targets["tflite"]
    assert flex.status == "skipped" and "Flex" in flex.reason, flex.reason


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


# TensorFlow in a child, as the backend runs it: attention scores (x·W·xᵀ·0.25) plus an
# additive mask of finfo.min, softmax; calibrated by TFLiteConverter, then tflite_convert's
# corrections
_CALIBRATED = '''
import json, sys
import numpy as np, tensorflow as tf
from mtconvert.backends import tflite_convert as tc
rng = np.random.default_rng(0)
w = tf.constant(rng.standard_normal((16, 16)).astype(np.float32))
spec = [tf.TensorSpec([1, 8, 16], tf.float32), tf.TensorSpec([1, 8, 8], tf.float32)]
@tf.function(input_signature=spec)
def f(x, mask):
    scores = tf.matmul(tf.matmul(x, w), x, transpose_b=True) * 0.25
    return tf.nn.softmax(scores + (1.0 - mask) * np.finfo(np.float32).min)
samples = []
for i in range(4):
    m = np.ones((1, 8, 8), np.float32)
    m[..., 7 - i:] = 0
    samples.append([rng.standard_normal((1, 8, 16)).astype(np.float32), m])
c = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()])
c.optimizations = [tf.lite.Optimize.DEFAULT]
c.representative_dataset = lambda: iter(samples)
c._experimental_calibrate_only = True
calibrated = c.convert()
np.savez(sys.argv[1], x=np.stack([s[0] for s in samples]), mask=np.stack([s[1] for s in samples]))
job = {"calibration": sys.argv[1], "input_order": ["x", "mask"]}
fixed, ranges = tc._own_ranges(calibrated, job, [np.float32, np.float32])
print("RESULT " + json.dumps({"ranges": ranges, "crushed": tc._crushing(fixed),
                              "as_logged": tc._crushing(calibrated)}))
'''


@pytest.mark.slow
def test_full_integer_remeasures_ranges_the_calibrator_logged_wrong(tmp_path):
    """LiteRT's calibrator logs the scaled scores with the mask Add's output range (the Add
    ran in place over them: tensorflow#127842); re-measured with every tensor kept, they get
    their own range, and the mask Add (whose int8 output would erase them) is found, with the
    Softmax reading it. With the logged ranges that Add is not even visible as erasing."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _CALIBRATED, str(tmp_path / "calib.npz")],
                         capture_output=True, text=True, timeout=600)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, out.stderr[-2000:]
    result = json.loads(line[0][7:])
    scores = next(r for r in result["ranges"] if r["tensor"] == "mul")
    assert scores["logged"][0] < -1e38 < -100 < scores["own"][0]
    assert scores["logged"][1] == pytest.approx(scores["own"][1])
    [mask_add] = result["crushed"]
    assert mask_add["op"] == "ADD" and mask_add["output"][0] < -1e38
    assert mask_add["input"] == pytest.approx(scores["own"])
    assert mask_add["readers"] == ["Identity"]  # the Softmax, the graph's output
    assert mask_add["tensor"] not in [c["tensor"] for c in result["as_logged"]]
