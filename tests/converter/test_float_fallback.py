"""The int8 float fallback (mtconvert.run.fallback): the loop's logic with stub conversions,
the contract field in the cache key, onnx-mobile and tflite keeping named nodes in float for
real, the report field and its renderings."""
from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest

from mtconvert.backends.base import Artifact, PreparedSource, TargetOptions, TensorSpec
from mtconvert.cache import ConversionCache
from mtconvert.options import ConvertOptions
from mtconvert.render import float_fallback_line
from mtconvert.report import Conversion, Numerics, Report, SourceInfo, TargetMap, TargetReport
from mtconvert.run import fallback
from tests.fake_backend import FakeBackend

LAYERS = [f"layer{i}/MatMul" for i in range(8)]


# --- the loop, with stub conversions -----------------------------------------------------------

class _Keeps(FakeBackend):
    name = "keeps"
    keep_float_layers = True
    precisions = ("fp32", "int8")


def _report(passed: bool, ranking: list[str], cosine: float, weight_layers: int = 8
            ) -> TargetReport:
    worst = {"output": "y", "max_abs": 1.0 - cosine, "cosine": cosine}
    q = {"method": "stub", "weight_layers": weight_layers,
         "layers": [{"node": n, "op_type": "MatMul", "added": 0.1} for n in ranking]}
    return TargetReport("keeps", "passed" if passed else "failed",
                        None if passed else "numerics: y: cosine too low", precision="int8",
                        numerics=Numerics(passed, "stub", worst, {}),
                        conversion=Conversion(1.0, ("convert",)),
                        diagnostics=None if passed else {"quantization_error": q})


def _ctx(**opts) -> SimpleNamespace:
    return SimpleNamespace(opts=ConvertOptions(precision="int8", **opts), say=lambda _: None)


class _Stub:
    """Converts with the kept nodes recorded; passes once ``needed`` are all kept."""

    def __init__(self, needed: set[str], ranking: list[str], tmp_path):
        self.needed, self.ranking, self.calls, self.tmp = needed, ranking, [], tmp_path

    def convert(self, keep):
        self.calls.append(keep)
        art = Artifact("keeps", self.tmp / f"m{len(keep)}.bin", (), precision="int8")
        return art, Conversion(1.0, (f"kept {len(keep)}",)), self.tmp

    def check(self, artifact, conversion):
        kept = set(self.calls[-1])
        ok = self.needed <= kept
        return _report(ok, [n for n in self.ranking if n not in kept], 0.999 if ok else 0.9)


def _attempt(stub, first, **opts):
    return fallback.attempt(_ctx(**opts), _Keeps(), first, None, stub.convert, stub.check)


def test_fallback_grows_the_kept_set_until_numerics_pass(tmp_path):
    ranking = LAYERS[3:5] + LAYERS[:3]
    stub = _Stub({"layer3/MatMul", "layer4/MatMul"}, ranking, tmp_path)
    out = _attempt(stub, _report(False, ranking, 0.3))
    assert stub.calls == [("layer3/MatMul",), ("layer3/MatMul", "layer4/MatMul")]
    f = out.report.float_fallback
    assert out.report.status == "passed" and f["passed"] and f["kept"] == list(stub.calls[-1])
    assert [r["numerics_passed"] for r in f["rounds"]] == [False, True]
    assert f["first"]["cosine"] == 0.3 and f["weight_layers"] == 8
    assert out.chosen is not None and out.chosen[0].primary.name == "m2.bin"
    assert "float fallback round 2: 2 kept, passed" in out.report.conversion.steps
    assert out.chosen[1] == out.report.conversion  # committed with the rounds' steps


def test_fallback_that_never_passes_fails_with_the_kept_layers_named(tmp_path):
    """Bounded by a quarter of the weight layers (2 of 8): two rounds, then the target fails
    with the last artifact and its kept layers named."""
    stub = _Stub({"never"}, LAYERS, tmp_path)
    out = _attempt(stub, _report(False, LAYERS, 0.3))
    assert [len(k) for k in stub.calls] == [1, 2]
    assert out.report.status == "failed" and not out.report.float_fallback["passed"]
    assert "still failing with 2 of 8 weight layers kept in float: layer0/MatMul, " \
           "layer1/MatMul" in out.report.reason
    assert out.chosen[0].primary.name == "m2.bin"  # the last artifact, not the first


def test_fallback_reranks_after_each_round(tmp_path):
    """The second round adds the best-ranked layer of the latest failing artifact."""
    stub = _Stub({"never"}, ["layer5/MatMul", "layer1/MatMul"], tmp_path)
    _attempt(stub, _report(False, ["layer0/MatMul", "layer1/MatMul"], 0.3, weight_layers=16))
    assert stub.calls[:2] == [("layer0/MatMul",), ("layer0/MatMul", "layer5/MatMul")]


@pytest.mark.parametrize("why, kw", [
    ("--no-float-fallback", dict(opts={"float_fallback": False})),
    ("source is quantized", dict(plan={"lower": True})),
    ("no per-layer quantization error (tensors unavailable)", dict(unranked=True)),
])
def test_fallback_not_run_says_why_and_converts_nothing(why, kw, tmp_path):
    stub = _Stub(set(), LAYERS, tmp_path)
    first = _report(False, LAYERS, 0.3)
    if kw.get("unranked"):
        first = TargetReport(**{**first.__dict__, "diagnostics": {
            "quantization_error": {"unavailable": "tensors unavailable"}}})
    out = fallback.attempt(_ctx(**kw.get("opts", {})), _Keeps(), first, kw.get("plan"),
                           stub.convert, stub.check)
    assert stub.calls == [] and out.chosen is None and out.report.status == "failed"
    assert out.report.float_fallback["applied"] is False
    assert why in out.report.float_fallback["reason"]


def test_backend_that_cannot_keep_layers_is_named(tmp_path):
    stub = _Stub(set(), LAYERS, tmp_path)
    out = fallback.attempt(_ctx(), FakeBackend(), _report(False, LAYERS, 0.3), None,
                           stub.convert, stub.check)
    assert stub.calls == [] and "fake cannot keep layers in float" in \
        out.report.float_fallback["reason"]


def test_passing_or_float_reports_are_untouched(tmp_path):
    stub = _Stub(set(), LAYERS, tmp_path)
    passed = _report(True, [], 0.999)
    assert _attempt(stub, passed).report is passed
    fp32 = TargetReport("keeps", "failed", "bad", precision="fp32")
    assert _attempt(stub, fp32).report is fp32 and stub.calls == []


def test_tflite_keeps_float_only_for_full_integer():
    from mtconvert.backends.onnx_mobile import OnnxMobileBackend
    from mtconvert.backends.tflite import TfliteBackend

    full = TargetOptions(precision="int8", extra={"int8_scheme": "full"})
    assert TfliteBackend().keeps_float(full)
    assert not TfliteBackend().keeps_float(TargetOptions(precision="int8"))
    assert OnnxMobileBackend().keeps_float(TargetOptions(precision="int8"))
    assert not OnnxMobileBackend().keeps_float(TargetOptions(precision="fp32"))


# --- the contract field in the cache key --------------------------------------------------------

def test_keep_float_enters_the_conversion_cache_key(tmp_path):
    path = _outlier_mlp(tmp_path / "m.onnx", layers=2)
    src = PreparedSource("onnx", "m", path, (TensorSpec("x", (1, 16, 32), "float32"),),
                         (TensorSpec("h1", (1, 16, 32), "float32"),), {"x": (1, 16, 32)},
                         tmp_path)
    cache = ConversionCache(tmp_path / "cache")
    keys = {cache.key(FakeBackend, src, TargetOptions(precision="int8", keep_float=k))
            for k in ((), ("layer0/MatMul",), ("layer1/MatMul",), ("layer0/MatMul",
                                                                   "layer1/MatMul"))}
    assert len(keys) == 4


# --- the report field ---------------------------------------------------------------------------

def _fallback_target() -> TargetReport:
    field = {"applied": True, "passed": True, "kept": ["layer3/MatMul", "layer4/MatMul"],
             "weight_layers": 8, "first": {"cosine": 0.31},
             "rounds": [{"kept": ["layer3/MatMul"], "status": "failed", "numerics_passed": False,
                         "worst": {"cosine": 0.33}},
                        {"kept": ["layer3/MatMul", "layer4/MatMul"], "status": "passed",
                         "numerics_passed": True, "worst": {"cosine": 0.999181}}]}
    return _report(True, [], 0.999181).__class__(
        **{**_report(True, [], 0.999181).__dict__, "float_fallback": field})


def test_report_field_round_trips_and_renders(tmp_path):
    from mtconvert.render import console, html, markdown

    t = _fallback_target()
    assert TargetReport.from_dict(t.to_dict()).float_fallback == t.float_fallback
    line = float_fallback_line(t.float_fallback)
    assert line == ("int8 with 2 of 8 weight layers kept in float passes (cosine 0.999181, "
                    "2 round(s)): layer3/MatMul, layer4/MatMul")
    assert float_fallback_line({"applied": False, "reason": "--no-float-fallback"}) == \
        "int8 float fallback: not run (--no-float-fallback)"
    src = SourceInfo("/m.onnx", "onnx", "ab" * 32, ({"name": "x"},), ({"name": "y"},))
    report = Report(src, None, TargetMap([t]))
    for module in (console, markdown, html):
        out = io.StringIO()
        module.render(report, out)
        text = " ".join(out.getvalue().split())
        assert "2 of 8 weight layers kept in float passes" in text, module.__name__
    from mtconvert.render import junit

    props = {p.name: p.value for suite in junit.build(report) for p in suite.properties()}
    assert props["float_fallback"] == line


# --- real backends ------------------------------------------------------------------------------

def _outlier_mlp(path, layers=8, width=32, outlier=300.0, at=3):
    """A Tanh MLP whose layer ``at`` has one output channel ``outlier`` times larger (the next
    layer's matching input row as much smaller): per-tensor int8 activations crush every other
    channel of that layer's output, so full-integer int8 fails unless that layer and the next
    stay float."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        if i == at:
            w[:, 0] *= outlier
        if i == at + 1:
            w[0, :] /= outlier
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"layer{i}/MatMul"))
        x = f"h{i}"
        if i < layers - 1:
            nodes.append(helper.make_node("Tanh", [x], [f"a{i}"], name=f"layer{i}/Tanh"))
            x = f"a{i}"
    vi = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, width]),
          helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 16, width])]
    graph = helper.make_graph(nodes, "outlier_mlp", vi[:1], vi[1:], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), str(path))
    return path


@pytest.mark.slow
def test_onnx_mobile_keeps_the_named_node_float(tmp_path):
    """quantize_dynamic's nodes_to_exclude: the named MatMul keeps its float weight in the graph
    the .ort is made from, the others are quantized; a name the graph lacks is said."""
    import onnx

    from mtconvert.backends.onnx_mobile import OnnxMobileBackend

    path = _outlier_mlp(tmp_path / "m.onnx", layers=3)
    src = PreparedSource("onnx", "m", path, (TensorSpec("x", (1, 16, 32), "float32"),),
                         (TensorSpec("h2", (1, 16, 32), "float32"),), {"x": (1, 16, 32)},
                         tmp_path / "work")
    out = tmp_path / "out"
    out.mkdir()
    art = OnnxMobileBackend().convert(src, out, TargetOptions(
        precision="int8", keep_float=("layer1/MatMul", "no/such/node")))
    nodes = {n.name: n.op_type for n in onnx.load(art.meta["onnx"]).graph.node}
    assert nodes["layer1/MatMul"] == "MatMul"
    assert "layer0/MatMul" not in nodes or nodes["layer0/MatMul"] != "MatMul"
    assert any(t in nodes.values() for t in ("MatMulInteger", "DynamicQuantizeMatMul"))
    assert "int8 float fallback: layer1/MatMul kept in float" in art.steps
    assert "not in the converted graph, not kept: no/such/node" in " ".join(art.steps)
    assert art.primary.suffix == ".ort" and art.primary.is_file()


def _tflite_int8(model, out, **kw):
    from tests.models import quick_convert

    return quick_convert("tflite", model, out, precision="int8",
                         extra={"int8_scheme": "full"}, **kw).targets["tflite"]


def _outlier_tmp(tmp_path_factory):
    from mtconvert.backends.tflite import TfliteBackend

    if not TfliteBackend.availability().can_convert:
        pytest.skip("tflite toolchain not installed")
    tmp = tmp_path_factory.mktemp("outlier")
    return _outlier_mlp(tmp / "mlp.onnx"), tmp


@pytest.mark.slow
@pytest.mark.sweep
def test_tflite_full_integer_fails_without_the_fallback(tmp_path_factory):
    model, tmp = _outlier_tmp(tmp_path_factory)
    plain = _tflite_int8(model, tmp / "plain", float_fallback=False)
    assert plain.status == "failed" and not plain.numerics.passed
    assert plain.float_fallback == {"applied": False, "reason": "--no-float-fallback"}
    assert plain.diagnostics["quantization_error"]["layers"]  # int8 tensors are read now


@pytest.mark.slow
def test_tflite_full_integer_passes_with_the_kept_layers_named(tmp_path_factory):
    """The first artifact fails (its numerics in ``float_fallback.first``); the fallback's
    passes with the kept layers named."""
    model, tmp = _outlier_tmp(tmp_path_factory)
    fb = _tflite_int8(model, tmp / "fallback")
    f = fb.float_fallback
    assert f["first"]["cosine"] < 0.99  # the int8 artifact without the fallback fails
    assert fb.status == "passed" and f["passed"], fb.reason
    assert 1 <= len(f["kept"]) <= f["weight_layers"] // 4
    assert fb.numerics.worst["cosine"] > f["first"]["cosine"]
    steps = " | ".join(fb.conversion.steps)
    for node in f["kept"]:
        assert f"int8 float fallback: {node} kept in float (tflite " in steps
    assert "but the quantizer left it int8" not in steps
    assert "float fallback round 1: 1 kept, failed" in steps
    # the target's one artifact is the passing one, in place of the failing first
    assert [a.path for a in fb.artifacts] == [str(tmp / "fallback" / "mlp.int8.tflite")]
    assert sorted(p.name for p in (tmp / "fallback").iterdir()) == ["mlp.int8.tflite",
                                                                    "mlp.tflite.log"]


# --- source node names on the fixed-shape graph ------------------------------------------------

def _renamed_pair(tmp_path):
    """A source graph (MatMul + bias Add, Tanh) and the same graph as a fixed-shape rewrite
    names it: the MatMul and Add fused into a Gemm ``Gemm_3``, the Tanh renamed ``Tanh_7``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")]
    vi = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16]),
          helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])]
    mk = helper.make_node
    graphs = {"src": [mk("MatMul", ["x", "w"], ["h"], name="enc/query/MatMul"),
                      mk("Add", ["h", "b"], ["hb"], name="enc/query/Add"),
                      mk("Tanh", ["hb"], ["y"], name="enc/act/Tanh")],
              "fixed": [mk("Gemm", ["x", "w", "b"], ["hb"], name="Gemm_3"),
                        mk("Tanh", ["hb"], ["y"], name="Tanh_7")]}
    for name, nodes in graphs.items():
        onnx.save(helper.make_model(helper.make_graph(nodes, name, vi[:1], vi[1:], inits),
                                    opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                  str(tmp_path / f"{name}.onnx"))
    return tmp_path / "src.onnx", tmp_path / "fixed.onnx"


def test_source_nodes_are_found_on_the_fixed_graph_by_weight_then_by_value(tmp_path):
    from mtconvert.backends.tflite_convert import _on_fixed

    src, fixed = _renamed_pair(tmp_path)
    job = {"onnx": str(fixed), "source_onnx": str(src),
           "keep_float": ["enc/query/MatMul", "enc/act/Tanh", "no/such/node"]}
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)}
    assert _on_fixed(job, feeds) == {"enc/query/MatMul": "Gemm_3", "enc/act/Tanh": "Tanh_7"}


def test_bert_source_layers_are_found_on_onnxsims_fixed_graph(fixtures_dir, tmp_path):
    """onnxsim fuses layer 1's query/key MatMul + Add into Gemm nodes; each is found by its
    weight (they were 'not in the fixed-shape graph, not kept' before)."""
    import onnx

    from mtconvert.backends.onnx_tools import fix_shapes
    from mtconvert.backends.tflite_convert import _on_fixed

    fixed = tmp_path / "fixed.onnx"
    fix_shapes(str(fixtures_dir / "bert_encoder.onnx"), str(fixed),
               {"input_ids": [1, 16], "attention_mask": [1, 16]})
    layer = "/model/bert/encoder/layer.1/attention/self"
    asked = [f"{layer}/query/MatMul", f"{layer}/key/MatMul", f"{layer}/MatMul"]
    nodes = {n.name: n for n in onnx.load(str(fixed)).graph.node}
    assert asked[0] not in nodes and asked[1] not in nodes and asked[2] in nodes
    found = _on_fixed({"onnx": str(fixed), "source_onnx": str(fixtures_dir / "bert_encoder.onnx"),
                       "keep_float": asked}, {"input_ids": np.ones((1, 16), np.int64),
                                              "attention_mask": np.ones((1, 16), np.int64)})
    assert found[asked[2]] == asked[2]
    assert {nodes[found[a]].op_type for a in asked[:2]} == {"Gemm"}
    assert found[asked[0]] != found[asked[1]]


@pytest.mark.slow
def test_bert_full_integer_passes_with_the_mask_add_in_float(fixtures_dir, tmp_path):
    """The issue's case: the BERT fixture's full-integer artifact passes the int8 profile
    as it is (no fallback round): the attention scores are quantized with their own range
    (LiteRT's calibrator had logged the mask Add's [-3.4e38, ...] on them), and each mask Add
    and the Softmax reading it stay float. (Before: cosine 0.970, every score int8 zero.)"""
    from ai_edge_litert.interpreter import Interpreter

    from mtconvert.backends.tflite import TfliteBackend

    if not TfliteBackend.availability().can_convert:
        pytest.skip("tflite toolchain not installed")
    t = _tflite_int8(fixtures_dir / "bert_encoder.onnx", tmp_path)
    assert t.status == "passed" and t.numerics.passed, t.reason
    assert t.float_fallback is None  # passed at once: no round
    steps = " | ".join(t.conversion.steps)
    assert "tensor range(s) logged 256x their own values or wider" in steps
    interp = Interpreter(model_path=str(tmp_path / "bert_encoder.int8.tflite"))
    tensors = {d["index"]: d for d in interp.get_tensor_details()}
    softmax = [op for op in interp._get_ops_details() if op["op_name"] == "SOFTMAX"]
    assert len(softmax) == 2 and all(tensors[op["inputs"][0]]["dtype"].__name__ == "float32"
                                     for op in softmax)
    for op in softmax:  # its float input: the mask Add's output
        assert f"{tensors[op['inputs'][0]]['name']} (ADD) kept in float" in steps
    fc = [op for op in interp._get_ops_details() if op["op_name"] == "FULLY_CONNECTED"]
    assert fc and all(tensors[op["outputs"][0]]["dtype"].__name__ == "int8" for op in fc)
    # LiteRT's builtin kernels (a phone without XNNPACK) run it: the int8 mask ADD they
    # aborted on in Prepare (rescale multiplier >= 1) is float now. In a child: an abort kills it
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _BUILTIN_RUN,
                          str(tmp_path / "bert_encoder.int8.tflite")], capture_output=True)
    assert run.returncode == 0, run.stderr[-500:]


_BUILTIN_RUN = """import sys, numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType
it = Interpreter(model_path=sys.argv[1], experimental_op_resolver_type=(
    OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
it.allocate_tensors()
for d in it.get_input_details():
    it.set_tensor(d["index"], np.ones(d["shape"], d["dtype"]))
it.invoke()
assert np.isfinite(it.get_tensor(it.get_output_details()[0]["index"])).all()
"""
