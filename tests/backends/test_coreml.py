"""coreml with the real coremltools converter, onnx2torch bridge and the NumPy MIL interpreter
(Core ML's own runtime exists only on macOS)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mtconvert.backends.coreml.backend import CoremlBackend
from mtconvert.source import sha256_of
from tests.models import quick_convert

pytestmark = pytest.mark.skipif(not CoremlBackend.availability().can_convert,
                                reason="coremltools not installed")

MTCONVERT = str(Path(sys.executable).parent / "mtconvert")
# one fixture per architecture in `make test`; the compressed BERT variants (pruned, distilled,
# low-rank: the same graph with other weights or shapes) are the sweep (`make test-all`)
IN_SUITE = {"bert_encoder", "gpt_decoder", "vit_encoder"}
PASSING = [f if f in IN_SUITE else pytest.param(f, marks=pytest.mark.sweep)
           for f in ("bert_encoder", "gpt_decoder", "vit_encoder", "bert_pruned",
                     "bert_distilled", "bert_lowrank")]


def _run(model, out, **kw):
    return quick_convert("coreml", model, out, **kw).targets["coreml"]


def _program(path):
    from mtconvert.backends.coreml.program import load

    return load(path)


@pytest.mark.slow
@pytest.mark.parametrize("fixture", PASSING)
def test_onnx_fixture_passes_on_the_interpreter(fixture, fixtures_dir, tmp_path):
    t = _run(fixtures_dir / f"{fixture}.onnx", tmp_path)
    assert t.status == "passed", t.reason
    assert t.numerics.runtime == "mil-reference"
    assert t.numerics.worst["max_abs"] < 1e-4
    assert t.latency is None and "Apple" in t.latency_unavailable
    assert t.artifacts[0].path == str(tmp_path / f"{fixture}.mlpackage")
    assert any(s.startswith("onnx2torch: ONNX -> torch.fx") for s in t.conversion.steps)


@pytest.mark.slow
def test_torch_program_takes_the_torch_export_route(fixtures_dir, tmp_path):
    t = _run(fixtures_dir / "bert_encoder.pt2", tmp_path)
    assert t.status == "passed", t.reason
    assert "route torch.export: chosen (passed)" in t.conversion.steps
    assert t.numerics.worst["max_abs"] < 1e-4
    # features carry the source's names, not coremltools' (addmm_13...)
    program = _program(tmp_path / "bert_encoder.mlpackage")
    assert [v.name for v in program.inputs] == ["input_ids", "attention_mask"]
    assert program.outputs == ["output"]


@pytest.mark.slow
def test_fp16_program_is_interpreted_in_float16(fixtures_dir, tmp_path):
    t = _run(fixtures_dir / "bert_encoder.onnx", tmp_path, precision="fp16")
    assert t.status == "passed", t.reason
    program = _program(tmp_path / "bert_encoder.fp16.mlpackage")
    typed = {v.dtype for op in program.ops if op.type in ("matmul", "linear", "layer_norm")
             for v in op.outputs}
    assert typed == {"float16"}
    change = t.numerics.vs_fp32["logits"]
    assert change["max_abs"] > 0  # fp16 rounding is modelled, so it differs from fp32
    assert t.numerics.fp32_worst["max_abs"] < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("precision, palettize, op_type", [
    ("int8", None, "constexpr_affine_dequantize"),
    ("fp16", 8, "constexpr_lut_to_dense"),
])
def test_compressed_weights_are_decoded_from_the_package(precision, palettize, op_type,
                                                          fixtures_dir, tmp_path):
    extra = {"palettize": palettize} if palettize else {}
    t = _run(fixtures_dir / "bert_encoder.onnx", tmp_path, precision=precision, extra=extra)
    assert t.status == "passed", t.reason
    package = tmp_path / t.artifacts[0].path.split("/")[-1]
    assert op_type in _program(package).op_types
    fp32_twin_size = sum(f.stat().st_size for f in (fixtures_dir / "bert_encoder.onnx",))
    assert t.artifacts[0].bytes < fp32_twin_size * 0.5
    assert t.numerics.vs_fp32["logits"]["cosine"] > 0.99


@pytest.mark.slow
def test_interpreter_reads_the_saved_weights(fixtures_dir, tmp_path):
    """Corrupt one constant inside the saved package: the interpreter must see it."""
    from mtconvert.backends.coreml.program import load_spec, model_path

    import mtconvert

    good = _run(fixtures_dir / "bert_encoder.onnx", tmp_path / "a")
    assert good.status == "passed", good.reason
    package = tmp_path / "a" / "bert_encoder.mlpackage"
    untouched = mtconvert.validate(fixtures_dir / "bert_encoder.onnx", [package], iterations=1,
                                   warmup=0)
    assert untouched.targets["coreml"].status == "passed", untouched.targets["coreml"].reason
    spec = load_spec(package)
    block = spec.mlProgram.functions["main"].block_specializations["CoreML6"]
    const = next(op for op in block.operations if op.type == "const" and
                 op.attributes["val"].type.tensorType.dataType == 11 and
                 op.attributes["val"].WhichOneof("value") == "immediateValue" and
                 len(op.attributes["val"].immediateValue.tensor.floats.values) == 1 and
                 op.attributes["val"].immediateValue.tensor.floats.values[0] not in (0.0, 1.0))
    values = const.attributes["val"].immediateValue.tensor.floats.values
    values[0] *= 2.0
    model_path(package).write_bytes(spec.SerializeToString())
    report = mtconvert.validate(fixtures_dir / "bert_encoder.onnx", [package], iterations=1,
                                warmup=0)
    t = next(iter(report.targets.values()))
    assert t.status == "failed", (const.outputs[0].name, t.reason)
    assert t.numerics.runtime == "mil-reference"
    # localized from the interpreter's tensors: the op reading the changed constant
    assert t.diagnostics["first_divergence"]["target"] is not None


def _tiny_package(tmp_path, build, compute="FLOAT32"):
    from mtconvert.backends.coreml._ct import coremltools

    ct = coremltools()
    model = ct.convert(build(ct), convert_to="mlprogram", skip_model_load=True,
                       minimum_deployment_target=ct.target.iOS16,
                       compute_precision=getattr(ct.precision, compute))
    path = tmp_path / "tiny.mlpackage"
    model.save(str(path))
    return path


def _scale_program(ct):
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 8))],
                opset_version=ct.target.iOS16)
    def prog(x):
        y = mb.mul(x=x, y=np.float32(1000.0), name="times_1000")
        z = mb.mul(x=y, y=np.float32(1000.0), name="times_1000_again")
        return mb.add(x=z, y=np.float32(1e-4), name="out")

    return prog


def test_fp16_rounding_and_first_inf_op(tmp_path):
    from mtconvert import trace
    from mtconvert.backends.base import Artifact
    from mtconvert.backends.coreml.backend import MilSession
    from mtconvert.backends.coreml.interp import MilInterpreter

    path = _tiny_package(tmp_path, _scale_program, compute="FLOAT16")
    interp = MilInterpreter.open(path)
    x = np.array([[0.001, 0.0123, 0.05, 0.07, -0.02, 0.031, 0.0, 0.065]] * 2, np.float32)
    out = interp.run({"x": x})["out"]
    expected = (np.float16(x) * np.float16(1000)).astype(np.float16)
    expected = (expected * np.float16(1000)).astype(np.float16) + np.float16(1e-4)
    np.testing.assert_array_equal(out.astype(np.float32), expected.astype(np.float32))
    assert np.isinf(out).any()  # 70 * 1000 * 1000 overflows float16
    session = MilSession(Artifact("coreml", path, (path,),
                                  meta={"inputs": ["x"], "outputs": ["out"]}))
    first = trace.first_nonfinite([trace.Tensor(n, n, t, v)
                                   for n, t, v in session.intermediates({"x": x})])
    assert first["op"].startswith("times_1000_again")


def test_missing_op_makes_numerics_unavailable_naming_it(tmp_path):
    from coremltools.converters.mil import Builder as mb

    from mtconvert.backends.base import Artifact
    from mtconvert.backends.coreml.backend import MilSession
    from mtconvert.backends.coreml.ops import OPS
    from mtconvert.errors import RuntimeUnavailable

    assert "resize_bilinear" not in OPS

    def build(ct):
        @mb.program(input_specs=[mb.TensorSpec(shape=(1, 1, 4, 4))],
                    opset_version=ct.target.iOS16)
        def prog(x):
            return mb.resize_bilinear(x=x, target_size_height=8, target_size_width=8)
        return prog

    path = _tiny_package(tmp_path, build)
    artifact = Artifact("coreml", path, (path,), meta={"inputs": ["x"], "outputs": ["y"]})
    with pytest.raises(RuntimeUnavailable, match="lacks MIL ops resize_bilinear"):
        MilSession(artifact)
    lint = {f.code: f for f in CoremlBackend().lint(artifact)}
    assert "resize_bilinear" in lint["coreml-uninterpretable"].message


@pytest.mark.slow
def test_golden_bundle_verifies_and_catches_a_changed_reference(fixtures_dir, tmp_path):
    gold = tmp_path / "gold"
    t = _run(fixtures_dir / "bert_encoder.onnx", tmp_path / "out",
             extra={"bundle": str(gold)})
    assert t.status == "passed", t.reason
    manifest = json.loads((gold / "coreml" / "bundle.json").read_text())
    assert manifest["tolerances"]["logits"] == {"atol": 1e-4, "rtol": 1e-4, "min_cosine": 0.99999,
                                                "min_snr_db": 100.0}
    assert manifest["tool_versions"]["coremltools"]
    cmd = [MTCONVERT, "verify", str(gold), "--iterations", "1",
           "--report-json", str(tmp_path / "v.json")]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    verified = json.loads((tmp_path / "v.json").read_text())
    assert verified["targets"][0]["numerics"]["runtime"] == "mil-reference"
    with np.load(gold / "coreml" / "reference.npz") as data:
        ref = {k: data[k] for k in data.files}
    ref["logits"] = ref["logits"] * 1.01
    np.savez(gold / "coreml" / "reference.npz", **ref)
    tampered = subprocess.run(cmd, capture_output=True, text=True)  # not what was bundled
    assert tampered.returncode == 2 and "reference.npz does not match" in tampered.stderr
    manifest = json.loads((gold / "coreml" / "bundle.json").read_text())
    manifest["files_sha256"]["reference.npz"] = sha256_of(gold / "coreml" / "reference.npz")
    (gold / "coreml" / "bundle.json").write_text(json.dumps(manifest))
    bad = subprocess.run(cmd, capture_output=True, text=True)  # a re-made, wrong reference
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "numerics" in bad.stdout


def test_verify_refuses_a_folder_without_bundles(tmp_path):
    proc = subprocess.run([MTCONVERT, "verify", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not a bundle" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- the ONNX -> PyTorch bridge's mends, each checked against ONNX Runtime ----------------------

def _ort(model, feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _one_node_model(node, inputs, output):
    from onnx import helper

    graph = helper.make_graph([node], "g", inputs, [output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_bridge_flatten_matches_onnx_runtime(axis):
    import torch
    from onnx import TensorProto, helper

    from mtconvert.backends.coreml.onnx_bridge import to_torch

    model = _one_node_model(helper.make_node("Flatten", ["x"], ["y"], axis=axis),
                            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                            helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    got = to_torch(model)(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, _ort(model, {"x": x}))


def test_bridge_greater_or_equal_of_opset_16():
    import torch
    from onnx import TensorProto, helper

    from mtconvert.backends.coreml.onnx_bridge import to_torch

    model = _one_node_model(helper.make_node("GreaterOrEqual", ["a", "b"], ["y"]),
                            [helper.make_tensor_value_info(n, TensorProto.INT64, [4])
                             for n in "ab"],
                            helper.make_tensor_value_info("y", TensorProto.BOOL, None))
    a, b = np.array([1, 2, 3, 4]), np.array([2, 2, 2, 5])
    got = to_torch(model)(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_array_equal(got, _ort(model, {"a": a, "b": b}))


@pytest.mark.parametrize("attrs", [{}, {"reverse": 1}, {"exclusive": 1},
                                   {"exclusive": 1, "reverse": 1}])
def test_bridge_cumsum_follows_the_onnx_defaults(attrs):
    """onnx2torch defaults reverse to 1; ONNX to 0 (RoBERTa's position ids)."""
    import torch
    from onnx import TensorProto, helper

    from mtconvert.backends.coreml.onnx_bridge import to_torch

    model = _one_node_model(helper.make_node("CumSum", ["x", "axis"], ["y"], **attrs),
                            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5]),
                             helper.make_tensor_value_info("axis", TensorProto.INT64, [])],
                            helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    x, axis = np.arange(10, dtype=np.float32).reshape(2, 5), np.array(1)
    got = to_torch(model)(torch.from_numpy(x), torch.from_numpy(axis)).numpy()
    np.testing.assert_array_equal(got, _ort(model, {"x": x, "axis": axis}))


def test_bridge_export_folds_shape_scalars_and_keeps_numbers(fixtures_dir, tmp_path):
    """onnx2torch's Reshape reads its shape with .item(); the export folds those values."""
    import onnx
    import torch

    from mtconvert.backends.coreml.onnx_bridge import export, to_torch
    from mtconvert.backends.onnx_tools import fix_shapes

    fixed = tmp_path / "fixed.onnx"
    fix_shapes(str(fixtures_dir / "bert_encoder.onnx"), str(fixed),
               {"input_ids": [1, 8], "attention_mask": [1, 8]})
    module = to_torch(onnx.load(fixed))
    args = (torch.zeros(1, 8, dtype=torch.int64), torch.ones(1, 8, dtype=torch.int64))
    program = export(module, args)
    assert not [n for n in program.graph.nodes if "local_scalar_dense" in str(n.target)]
    ids = torch.tensor([[5, 17, 3, 9, 11, 2, 7, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        np.testing.assert_allclose(program.module()(ids, mask).numpy(),
                                   module(ids, mask).numpy(), rtol=0, atol=1e-6)
