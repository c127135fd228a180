"""--sparse (issue 20): a pruned source's zeros stored sparsely where the target can (Core ML
constexpr_sparse_to_dense, TFLite sparse tensors), validated like any artifact; a target that
cannot says why; a source without zeros says there is nothing to store sparsely."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mtconvert.backends.base import PreparedSource, TargetOptions, TensorSpec
from mtconvert.backends.coreml.backend import CoremlBackend
from mtconvert.cache import ConversionCache
from tests.models import quick_convert

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
needs_coreml = pytest.mark.skipif(not CoremlBackend.availability().can_convert,
                                  reason="coremltools not installed")


def _dense_mlp(path: Path) -> Path:
    """Two 64x64 MatMuls without a zero weight."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), n)
             for n in ("w1", "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "dense", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sparse")
    return quick_convert("coreml,tflite,onnx-mobile", FIXTURES / "bert_pruned.onnx", out,
                         sparse=True)


@needs_coreml
@pytest.mark.slow
def test_coreml_stores_the_zeros_sparsely_and_passes_at_fp32(sparse_run):
    from mtconvert.backends.coreml.program import load

    t = sparse_run.targets["coreml"]
    assert t.status == "passed", t.reason
    assert t.numerics.runtime == "mil-reference" and t.numerics.worst["max_abs"] < 1e-4
    program = load(Path(t.artifacts[0].path))
    pruned = sparse_run.source.sparsity["pruned_tensors"]
    assert sum(op.type == "constexpr_sparse_to_dense" for op in program.ops) >= pruned
    assert t.sparsity["storage"] == "sparse" and t.sparsity["kept"]
    assert t.sparsity["sparse_tensors"] >= pruned
    # each sparse weight holds fewer bytes than its dense float32 form (package sizes dense vs
    # sparse: benchmarks/bench_sparse.py)
    for op in (o for o in program.ops if o.type == "constexpr_sparse_to_dense"):
        a = op.attributes
        assert a["nonzero_data"].nbytes + a["mask"].nbytes < 4 * int(np.prod(a["shape"]))


@pytest.mark.slow
def test_tflite_stores_sparse_tensors_and_says_they_are_densified_at_load(sparse_run):
    t = sparse_run.targets["tflite"]
    assert t.status == "passed", t.reason
    assert t.sparsity["storage"] == "sparse" and t.sparsity["kept"]
    assert t.sparsity["sparse_tensors"] == sparse_run.source.sparsity["pruned_tensors"]
    assert "densified once at load" in t.sparsity["storage_note"]
    # the CSR tensors read back exactly as the source weights they came from, zeros included
    from mtconvert import sparsity
    from mtconvert.compressed_check import tflite_constants

    source = [numpy_helper.to_array(i) for i in onnx.load(str(FIXTURES / "bert_pruned.onnx"))
              .graph.initializer if len(i.dims) == 2]
    sparse = [sparsity._csr_dense(v, list(d["shape"]), d["sparsity_parameters"])
              for d, v in tflite_constants(Path(t.artifacts[0].path))
              if d.get("sparsity_parameters")]
    assert len(sparse) == t.sparsity["sparse_tensors"]
    assert all(any(np.array_equal(s, w) or np.array_equal(s, w.T) for w in source)
               for s in sparse)


@pytest.mark.slow
def test_a_target_without_sparse_storage_says_why(sparse_run):
    t = sparse_run.targets["onnx-mobile"]
    assert t.status == "passed", t.reason
    assert t.sparsity["storage"] == "dense"
    assert "ONNX Runtime converts" in t.sparsity["storage_note"]


@needs_coreml
@pytest.mark.slow
def test_a_source_without_zeros_has_nothing_to_store_sparsely(tmp_path):
    t = quick_convert("coreml", _dense_mlp(tmp_path / "dense.onnx"), tmp_path / "out",
                      sparse=True).targets["coreml"]
    assert t.status == "passed", t.reason
    assert any(s.startswith("--sparse: ") and "nothing to store sparsely" in s
               for s in t.conversion.steps)


def test_a_dense_artifact_of_a_target_that_could_store_sparsely_says_so():
    from mtconvert import sparsity
    from mtconvert.report import Conversion, TargetReport

    for steps, note in [((), "--sparse would store them sparsely"),
                        (("--sparse: no weight has 10% or more exact zeros",), "no weight has")]:
        t = TargetReport("coreml", "passed", conversion=Conversion(1.0, steps))
        got = sparsity.storage(t, {"zero_share": 0.0})
        assert got["storage"] == "dense" and got["storage_note"].startswith(note)
    t = TargetReport("ncnn", "passed", conversion=Conversion(1.0, ()))
    assert sparsity.storage(t, {})["storage_note"] == \
        sparsity._backend_sparse("ncnn")[1]


def test_sparse_enters_the_conversion_cache_key(tmp_path):
    path = _dense_mlp(tmp_path / "m.onnx")
    spec = TensorSpec("x", (1, 64), "float32")
    src = PreparedSource("onnx", "m", path, (spec,), (TensorSpec("y", (1, 64), "float32"),),
                         {"x": (1, 64)}, tmp_path)
    cache = ConversionCache(tmp_path / "cache")
    dense, sparse = (cache.key(CoremlBackend, src, TargetOptions(sparse=s)) for s in (False, True))
    assert dense != sparse


@needs_coreml
@pytest.mark.slow
@pytest.mark.sweep  # the coreml sparse check again at int8 (joint compression): make test-all
def test_coreml_int8_sparse_on_ios18_is_joint_compressed(tmp_path):
    from mtconvert.backends.coreml.program import load

    run = quick_convert("coreml", FIXTURES / "bert_pruned.onnx", tmp_path, sparse=True,
                        precision="int8", coreml_target="iOS18")
    t = run.targets["coreml"]
    assert t.status == "passed", t.reason
    types = [op.type for op in load(Path(t.artifacts[0].path)).ops]
    assert types.count("constexpr_sparse_blockwise_shift_scale") == \
        run.source.sparsity["pruned_tensors"]
    # each weight counted once (its mask sits on the int8 op feeding constexpr_sparse_to_dense)
    assert t.sparsity["storage"] == "sparse" and t.sparsity["kept"]
    assert t.sparsity["sparse_tensors"] == types.count("constexpr_sparse_to_dense")


def test_an_unpruned_source_has_nothing_to_store_sparsely_in_the_report():
    from mtconvert import sparsity
    from mtconvert.render import target_sparsity_line
    from mtconvert.report import ArtifactFile, TargetReport

    t = sparsity.unpruned(TargetReport("ncnn", "passed", artifacts=(ArtifactFile("m", 1),)))
    assert t.sparsity["storage"] == "dense"
    assert target_sparsity_line(t.sparsity).startswith("sparsity: stored dense: nothing to store")
    assert TargetReport.from_dict(t.to_dict()).sparsity == t.sparsity


def test_every_target_says_how_it_stores_zeros_or_why_it_cannot():
    from mtconvert.backends.base import Backend
    from mtconvert.registry import default_registry

    reg = default_registry()
    for name in reg.names():
        cls = reg.get(name)
        assert cls.sparse_weights or cls.no_sparse_weights != Backend.no_sparse_weights, name
