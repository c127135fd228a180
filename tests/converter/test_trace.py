"""Localization by intermediate tensors matched by value (mtconvert.trace)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from mtconvert import trace
from mtconvert.validators.compare import PROFILES

FP32 = PROFILES["fp32"]
RNG = np.random.default_rng(0)


def _t(name, value, parents=(), op_type="Op"):
    return trace.Tensor(name, f"node_{name}", op_type, np.asarray(value, np.float32),
                        list(parents))


def _chain():
    """a -> b -> c -> out, with a side branch m (a mask) that only b reads."""
    a = RNG.standard_normal((1, 6, 4))
    m = np.where(RNG.random((1, 6, 4)) > 0.5, 0.0, -3.4e38)
    b = np.tanh(a) + np.maximum(m, -1e4) * 0
    c = b * 2 + 1
    out = c.sum(-1)
    return [_t("a", a), _t("m", m), _t("b", b, [0, 1]), _t("c", c, [2]), _t("out", out, [3])]


def test_first_broken_tensor_is_named_with_its_target_counterpart():
    src = _chain()
    tgt = [_t("ta", src[0].value.reshape(6, 4), op_type="T1"),  # batch axis dropped
           _t("tb", np.transpose(src[2].value[0]), op_type="T2"),  # another layout
           _t("tc", src[3].value + 0.01, op_type="T3"), _t("tout", src[4].value + 0.04)]
    r = trace.match(src, tgt, lambda _: FP32)
    first = r["first_divergence"]
    assert (first["output"], first["target"], first["target_op_type"]) == ("c", "tc", "T3")
    assert first["max_abs"] == pytest.approx(0.01, rel=1e-3)
    assert r["exact"] and r["last_match"] == "node_b" and r["unresolved_between"] == 0


def test_a_fused_tensor_or_a_rewritten_mask_is_not_a_divergence():
    src = _chain()
    # the target never computes b (fused) and holds the mask as -1e4, not -3.4e38
    tgt = [_t("ta", src[0].value), _t("tm", np.maximum(src[1].value, -1e4)),
           _t("tc", src[3].value), _t("tout", src[4].value)]
    r = trace.match(src, tgt, lambda _: FP32)
    assert "first_divergence" not in r and r["result"].startswith("no divergence")
    assert r["matched"] == 4 and r["observable"] == 5  # the mask matches once saturated


def test_a_divergence_behind_a_fused_tensor_is_marked_inexact():
    src = _chain()
    tgt = [_t("ta", src[0].value), _t("tm", np.maximum(src[1].value, -1e4)),
           _t("tc", src[3].value * 1.1), _t("tout", src[4].value * 1.1)]
    r = trace.match(src, tgt, lambda _: FP32)
    # b has same-size candidates, so it counts as observable: the report names it, after m
    assert r["first_divergence"]["output"] == "b" and r["last_match"] == "node_m"


def test_a_divergence_absorbed_far_downstream_is_still_found():
    """Near-uniform attention can hide a change many ops later (that softmax matches), while
    the residual path carries it to the output: only nearby matches mean "fused"."""
    a = RNG.standard_normal(8)
    src, tgt = [_t("a", a)], [_t("ta", a)]
    for k in range(1, 9):  # b1 (diverged here) ... b8: a side chain whose end absorbs it
        value = a * (k + 1)
        src.append(_t(f"b{k}", value, [k - 1]))
        tgt.append(_t(f"tb{k}", value if k == 8 else value + 0.1))
    src.append(_t("out", a * 100, [1]))
    tgt.append(_t("tout", a * 100 + 0.1))
    r = trace.match(src, tgt, lambda _: FP32)
    assert r["first_divergence"]["output"] == "b1" and r["exact"]


def test_item_zero_of_a_batch_and_constant_tensors():
    big = RNG.standard_normal((3, 5)).astype(np.float32)
    src = [_t("x", big), _t("ones", np.ones((3, 5)), [0]), _t("y", big * 3, [0, 1])]
    tgt = [_t("tx", big[0]), _t("tones", np.ones(5)), _t("ty", big[0] * 3 + 1)]
    r = trace.match(src, tgt, lambda _: FP32, batch=3)
    assert r["first_divergence"]["output"] == "y" and r["exact"]
    assert r["observable"] == 2  # a tensor of ones would match any other


def test_first_nonfinite_in_execution_order():
    tgt = [_t("a", [1.0, 2.0]), _t("b", [np.inf, 1.0], op_type="MUL"), _t("c", [np.nan, 0.0])]
    assert trace.first_nonfinite(tgt) == {"op": "b", "op_type": "MUL", "dtype": "float32",
                                          "inf": True, "nan": False}
    assert trace.first_nonfinite(tgt[:1]) is None


def test_source_tensors_come_from_every_node_of_the_onnx_graph(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "x"], ["s"], name="add"),
             helper.make_node("Neg", ["s"], ["y"], name="neg")]
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 17)], ir_version=9),
              str(path))
    feed = RNG.standard_normal((2, 3)).astype(np.float32)
    found = trace.source_tensors(path, {"x": feed})
    assert [(t.name, t.op, t.op_type, t.parents) for t in found] == [
        ("r", "relu", "Relu", []), ("s", "add", "Add", [0]), ("y", "neg", "Neg", [1])]
    np.testing.assert_allclose(found[2].value, -(np.maximum(feed, 0) + feed))
