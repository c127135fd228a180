"""tflite --profile: LiteRT's own op profiler through its C API (backends/profiling/tflite.py),
on a tiny .tflite made here with TensorFlow's converter: XNNPACK's operators and the builtin
kernels it leaves out, each named, their times per inference."""
from __future__ import annotations

import numpy as np
import pytest

from mtconvert.backends.base import Artifact
from mtconvert.backends.profiling import tflite as tflite_profiling
from mtconvert.backends.tflite import TfliteBackend, map_io, tflite_ops
from mtconvert.run.profile import summarize


@pytest.fixture(scope="module")
def tiny_tflite(tmp_path_factory):
    """x [1, 64, 128] float -> Dense(512) -> GELU -> Dense(128), times (ids != 0): XNNPACK
    runs the float ops, NOT_EQUAL on int64 stays a builtin kernel. Large enough that each
    projection takes well over XNNPACK's 1 µs resolution."""
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    w1, w2 = (tf.constant(rng.standard_normal(s).astype(np.float32) / 16)
              for s in ((128, 512), (512, 128)))

    @tf.function(input_signature=[tf.TensorSpec([1, 64, 128], tf.float32, name="x"),
                                  tf.TensorSpec([1, 64], tf.int64, name="ids")])
    def f(x, ids):
        h = tf.nn.gelu(tf.matmul(x, w1))
        keep = tf.cast(tf.not_equal(ids, 0), tf.float32)[..., None]
        return {"y": tf.matmul(h, w2) * keep}

    conv = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
    path = tmp_path_factory.mktemp("tfl") / "tiny.tflite"
    path.write_bytes(conv.convert())
    return path


def _session(path, threads=1):
    io_map, _ = map_io(path, ["x", "ids"], ["y"], {"y": [1, 64, 128]})
    art = Artifact(target="tflite", primary=path, files=(path,), meta=io_map)
    return TfliteBackend().open(art, threads)


def _feeds():
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((1, 64, 128)).astype(np.float32),
            "ids": rng.integers(0, 3, (1, 64)).astype(np.int64)}


def test_session_profile_names_xnnpack_operators_and_builtin_kernels(tiny_tflite):
    assert "NOT_EQUAL" in tflite_ops(tiny_tflite)
    with _session(tiny_tflite) as session:
        ops = session.profile(_feeds(), runs=3)
    assert ops is not None, session.profile_unavailable
    names = [o.name for o in ops]
    assert len(names) == len(set(names))
    kinds = {o.op_type for o in ops}
    assert "NOT_EQUAL" in kinds                                  # builtin kernel, by node
    assert any("NOT_EQUAL (builtin kernel) node" in n for n in names)
    assert any("Fully Connected" in k or "Batch Matrix Multiply" in k for k in kinds), kinds
    assert all(o.ms >= 0 for o in ops)
    assert sum(o.ms for o in ops if "Fully Connected" in o.op_type
               or "Batch Matrix Multiply" in o.op_type) > 0
    s = summarize([(o.name, o.op_type, o.ms) for o in ops], runs=3)
    assert s["operators"] == len(ops) and s["total_ms"] > 0


def test_the_profiled_model_computes_what_the_session_does(tiny_tflite):
    """The compiled model fed through the C API's buffers gives the Interpreter's outputs:
    the profile is of this model at these inputs, not of zeros."""
    feeds = _feeds()
    with _session(tiny_tflite) as session:
        want = session.run(feeds)["y"]
        arrays = {i: feeds[n] for i, n in session._inputs}
    api = tflite_profiling._Api()
    with api.compiled(tiny_tflite, 1) as model:
        model.write_inputs(arrays)
        model.run()
        (index, buffer, size), = model.outputs
        got = np.empty(want.shape, np.float32)
        assert got.nbytes == size
        host = tflite_profiling._P()
        api.call("LiteRtLockTensorBuffer", buffer, tflite_profiling.C.byref(host), 0)
        tflite_profiling.C.memmove(got.ctypes.data, host, size)
        api.call("LiteRtUnlockTensorBuffer", buffer)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_builtin_kernels_profiled_are_the_ops_the_session_leaves_out_of_xnnpack(tiny_tflite):
    """The compiled model partitions the graph as the session's Interpreter does: the ops its
    profile lists as builtin kernels are the ones the Interpreter's XNNPACK leaves out."""
    with _session(tiny_tflite) as session:
        left_out = _left_out_of_xnnpack(session._interp)
        ops = session.profile(_feeds(), runs=1)
    assert left_out and sorted(o.op_type for o in ops if "(builtin kernel)" in o.name) == left_out


def _left_out_of_xnnpack(interp):
    """The ops an Interpreter runs outside its delegate nodes: walking back from the delegate
    nodes' inputs and the graph outputs to producers outside any partition."""
    ops = interp._get_ops_details()
    delegated = {t for o in ops if o["op_name"] == "DELEGATE" for t in o["outputs"]}
    producer = {t: o for o in ops if o["op_name"] != "DELEGATE" for t in o["outputs"]}
    need = [t for o in ops if o["op_name"] == "DELEGATE" for t in o["inputs"]]
    need += [d["index"] for d in interp.get_output_details()]
    found = {}
    while need:
        t = need.pop()
        if t in producer and t not in delegated and producer[t]["index"] not in found:
            found[producer[t]["index"]] = producer[t]["op_name"]
            need += list(producer[t]["inputs"])
    return sorted(found.values())


def test_wrong_input_size_is_refused_before_running(tiny_tflite):
    with _session(tiny_tflite) as session:
        indices = [i for i, _ in session._inputs]
    bad = {indices[0]: np.zeros((1, 4, 128), np.float32),
           indices[1]: np.zeros((1, 64), np.int64)}
    with pytest.raises(ValueError, match="bytes given"):
        tflite_profiling.profile(tiny_tflite, 1, bad, runs=1)


def test_events_are_partitioned_per_inference():
    events = [("Invoke", 1, 900, 0),                          # the invoke itself: not an op
              ("NOT_EQUAL", tflite_profiling.OPERATOR, 5, 3),
              ("Fully Connected (NC, F32) GEMM", tflite_profiling.DELEGATE_PROFILED, 400, 0),
              ("Fully Connected (NC, F32) GEMM", tflite_profiling.DELEGATE_PROFILED, 300, 1),
              ("GELU (NC)", tflite_profiling.DELEGATE_PROFILED, 0, 2)]
    got = tflite_profiling.events_ms(events)
    assert got == {("NOT_EQUAL (builtin kernel) node 3", "NOT_EQUAL"): 0.005,
                   ("Fully Connected (NC, F32) GEMM #1", "Fully Connected (NC, F32) GEMM"): 0.4,
                   ("Fully Connected (NC, F32) GEMM #2", "Fully Connected (NC, F32) GEMM"): 0.3,
                   ("GELU (NC) #1", "GELU (NC)"): 0.0}
