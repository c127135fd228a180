"""A pruned source's sparsity (issue 20): measured on the source's weights, structured or not,
and read back from each target's artifact (kept or lost)."""
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mtconvert import sparsity
from tests.models import quick_convert

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def _weights(kind: str, rng: np.random.Generator) -> np.ndarray:
    w = rng.standard_normal((64, 64)).astype(np.float32)
    if kind == "unstructured":
        w[rng.random(w.shape) < 0.5] = 0
    elif kind == "rows":
        w[::2] = 0
    return w


@pytest.mark.parametrize("kind,structured", [("unstructured", False), ("rows", True)])
def test_zero_share_and_structure(kind: str, structured: bool) -> None:
    rng = np.random.default_rng(0)
    w = _weights(kind, rng)
    s = sparsity.of_tensors([w, rng.standard_normal((64, 64)), np.zeros((4, 4))])
    assert s["pruned_tensors"] == 1 and s["weight_tensors"] == 2  # the 4x4 is no weight
    assert s["zero_share"] == pytest.approx((w == 0).sum() / (2 * w.size), abs=1e-6)
    assert s["structured"] is structured
    assert s["zero_rows"] == (32 if kind == "rows" else 0)


def test_a_dense_model_is_not_sparse() -> None:
    rng = np.random.default_rng(0)
    assert sparsity.of_tensors([rng.standard_normal((64, 64))]) is None
    assert sparsity.of_onnx(onnx.load(str(FIXTURES / "bert_encoder.onnx"))) is None


def test_the_pruned_fixture_is_half_zero_in_its_pruned_layers() -> None:
    s = sparsity.of_onnx(onnx.load(str(FIXTURES / "bert_pruned.onnx")))
    assert s["pruned_zero_share"] == pytest.approx(0.5, abs=0.01) and not s["structured"]
    assert 0 < s["zero_share"] < s["pruned_zero_share"]


def _tiny_pruned(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w1, w2 = _weights("unstructured", rng), _weights("rows", rng)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "pruned", [x], [y], [numpy_helper.from_array(w1, "w1"),
                                                         numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


@pytest.mark.slow
def test_each_target_reports_whether_it_kept_the_zeros(tmp_path: Path) -> None:
    model = _tiny_pruned(tmp_path / "pruned.onnx")
    report = quick_convert("onnx-mobile,tflite", model, tmp_path / "out")
    assert report.source.sparsity["pruned_tensors"] == 2
    tfl = report.targets["tflite"]
    assert tfl.status == "passed", tfl.reason
    assert tfl.sparsity["kept"] and tfl.sparsity["artifact_zero_share"] >= \
        report.source.sparsity["zero_share"] - sparsity.KEPT_SLACK
    assert report.targets["onnx-mobile"].sparsity["kept"]  # the .ort's initializers
    again = type(report).from_dict(report.to_dict())
    assert again.source.sparsity == report.source.sparsity
    assert again.targets["tflite"].sparsity == tfl.sparsity
