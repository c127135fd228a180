"""The fast Core ML check: the lint and the mil-reference session read the .mlpackage without
importing coremltools (its protobuf classes are loaded from its folder, the weight blob is read
with NumPy), and the planned interpreter gives bit for bit what running every op afresh gives.

coremltools is used here (in the test process) to build packages and as the reference for the
blob format; the code under test runs in child processes where that matters."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mtconvert.backends.coreml import ops, program
from mtconvert.backends.coreml.backend import CoremlBackend

pytestmark = pytest.mark.skipif(not CoremlBackend.availability().can_convert,
                                reason="coremltools not installed")


def _ct():
    from mtconvert.backends.coreml._ct import coremltools

    return coremltools()


def _package(tmp_path: Path, build, compute: str = "FLOAT32", name: str = "tiny") -> Path:
    ct = _ct()
    model = ct.convert(build(ct), convert_to="mlprogram", skip_model_load=True,
                       minimum_deployment_target=ct.target.iOS16,
                       compute_precision=getattr(ct.precision, compute))
    path = tmp_path / f"{name}.mlpackage"
    model.save(str(path))
    return path


def _encoder_block(ct):
    """Weights in the blob file (large constants), constant-only ops (folded), attention-like
    batched matmuls on transposed views, gelu, softmax, layer_norm."""
    from coremltools.converters.mil import Builder as mb

    rng = np.random.default_rng(7)
    w = rng.standard_normal((64, 64)).astype(np.float32) * 0.2
    w2 = rng.standard_normal((64, 256)).astype(np.float32) * 0.1
    gamma = rng.uniform(0.5, 1.5, 64).astype(np.float32)
    shift = rng.standard_normal(64).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 16, 64))], opset_version=ct.target.iOS16)
    def prog(x):
        scale = mb.mul(x=np.float32(0.5), y=np.float32(0.25))  # coremltools folds it
        q = mb.matmul(x=x, y=mb.transpose(x=w, perm=[1, 0]), name="q")
        heads = mb.transpose(x=mb.reshape(x=q, shape=[1, 16, 4, 16]), perm=[0, 2, 1, 3])
        keys = mb.transpose(x=mb.reshape(x=x, shape=[1, 16, 4, 16]), perm=[0, 2, 3, 1])
        scores = mb.mul(x=mb.matmul(x=heads, y=keys), y=scale, name="scores")
        attn = mb.softmax(x=scores, axis=-1)
        mixed = mb.matmul(x=attn, y=heads, transpose_y=False, name="mixed")
        merged = mb.reshape(x=mb.transpose(x=mixed, perm=[0, 2, 1, 3]), shape=[1, 16, 64])
        normed = mb.layer_norm(x=mb.add(x=merged, y=x), axes=[-1], gamma=gamma,
                               epsilon=1e-5, name="normed")
        # silu has no value inference: coremltools leaves it, the interpreter folds it
        normed = mb.add(x=normed, y=mb.silu(x=shift, name="folded_silu"))
        up = mb.gelu(x=mb.matmul(x=normed, y=w2), mode="EXACT", name="up")
        return mb.reduce_mean(x=up, axes=[-1], keep_dims=False, name="out")

    return prog


def _naive_run(prog: program.Program, feeds: dict[str, np.ndarray]):
    """The interpreter as it was: every op resolved, run and cast afresh, in program order."""
    env: dict = {}
    trace = []
    for var in prog.inputs:
        env[var.name] = np.asarray(feeds[var.name]).astype(var.dtype, copy=False)

    def cast(value, dtype):
        if not isinstance(value, np.ndarray) or not dtype or dtype.startswith("mil-"):
            return value
        return value if value.dtype == dtype else value.astype(dtype)

    for op in prog.ops:
        if op.type == "const":
            env[op.outputs[0].name] = cast(op.attributes["val"], op.outputs[0].dtype)
            continue
        args = {k: v for k, v in op.attributes.items() if k != "name"}
        for param, bindings in op.inputs.items():
            values = [env[v] if kind == "name" else v for kind, v in bindings]
            args[param] = values if param in {"values", "ref_tensors", "begins", "ends",
                                              "end_masks"} else values[0]
        results = ops.OPS[op.type](args)
        for var, value in zip(op.outputs, results, strict=True):
            env[var.name] = cast(value, var.dtype)
            if not op.type.startswith("constexpr_") and isinstance(env[var.name], np.ndarray) \
                    and env[var.name].dtype.kind == "f":
                trace.append((var.name, op.type, env[var.name]))
    return {n: env[n] for n in prog.outputs}, trace


# --- no coremltools in the lint and the session ----------------------------------------------

_CHILD = """
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
import numpy as np
from mtconvert.backends.base import Artifact
from mtconvert.backends.coreml.backend import CoremlBackend, MilSession
path = Path(sys.argv[1])
artifact = Artifact("coreml", path, (path,), meta={"inputs": ["x"], "outputs": ["out"]})
t1 = time.perf_counter()
findings = CoremlBackend().lint(artifact)
t2 = time.perf_counter()
after_lint = sorted(m for m in ("coremltools", "torch", "tensorflow") if m in sys.modules)
out = MilSession(artifact).run({"x": np.load(sys.argv[2])})["out"]
np.save(sys.argv[3], out)
print(json.dumps({"lint_s": t2 - t1, "after_lint": after_lint, "codes": [f.code for f in findings],
                  "message": findings[0].message,
                  "after_run": sorted(m for m in ("coremltools", "torch", "tensorflow")
                                      if m in sys.modules)}))
"""


def test_lint_and_session_run_without_importing_coremltools(tmp_path):
    from mtconvert.backends.coreml.interp import MilInterpreter

    path = _package(tmp_path, _encoder_block)
    x = np.random.default_rng(0).standard_normal((1, 16, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(tmp_path / "x.npy"),
                           str(tmp_path / "out.npy")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["after_lint"] == [] and result["after_run"] == []
    assert result["codes"] == ["coreml-ops"] and "(opset CoreML6)" in result["message"]
    assert "gelu" in result["message"] and "layer_norm" in result["message"]
    # the same numbers as this process, where coremltools is loaded
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"),
                                  MilInterpreter.open(path).run({"x": x})["out"])


def test_proto_classes_are_coremltools_own_whichever_loads_first():
    code = """
import sys
from mtconvert.backends.coreml._ct import coremltools, proto
mine = proto("Model_pb2")
assert "coremltools" not in sys.modules
ct = coremltools()
from coremltools.proto import Model_pb2, MIL_pb2
assert Model_pb2.Model is mine.Model and MIL_pb2.Program is proto("MIL_pb2").Program
spec = Model_pb2.Model(); spec.specificationVersion = 7
assert mine.Model.FromString(spec.SerializeToString()).specificationVersion == 7
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# --- the weight blob, read with NumPy ------------------------------------------------------------

_WRITERS = {10: "fp16", 11: "float", 31: "uint8", 21: "int8", 22: "int16", 32: "uint16",
            23: "int32", 33: "uint32", 25: "int4", 37: "uint1", 36: "uint2", 35: "uint4",
            39: "uint3", 38: "uint6"}


class _Blob:
    def __init__(self, offset: int):
        self.fileName = "@model_path/weights/weight.bin"
        self.offset = offset


def test_blob_reader_matches_coremltools_reader(tmp_path):
    _ct()
    from coremltools.libmilstoragepython import _BlobStorageReader, _BlobStorageWriter

    rng = np.random.default_rng(0)
    path = tmp_path / "weight.bin"
    writer = _BlobStorageWriter(str(path))
    written = []
    for mil_type, kind in _WRITERS.items():
        dtype = np.dtype(program.DTYPES[mil_type])
        for n in (1, 7, 13, 64, 1001):
            if mil_type in program.SUB_BYTE_BITS:
                bits = program.SUB_BYTE_BITS[mil_type]
                low, high = (-(1 << bits - 1), 1 << bits - 1) \
                    if mil_type in program.SIGNED_SUB_BYTE else (0, 1 << bits)
                values = rng.integers(low, high, n).astype(dtype)
            elif dtype.kind == "f":
                values = rng.standard_normal(n).astype(dtype)
            else:
                info = np.iinfo(dtype)
                values = rng.integers(info.min, info.max, n, endpoint=True).astype(dtype)
            data = values.view(np.uint16) if dtype == np.float16 else values
            offset = getattr(writer, f"write_{kind}_data")(np.ascontiguousarray(data))
            written.append((mil_type, kind, offset, values))
    del writer  # flushes
    reader = _BlobStorageReader(str(path))
    weights = program._Weights(tmp_path)
    for mil_type, kind, offset, values in written:
        theirs = np.asarray(getattr(reader, f"read_{kind}_data")(offset))
        theirs = theirs.view(np.float16) if mil_type == 10 else theirs
        mine = weights.read(_Blob(offset), mil_type)
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, kind
        np.testing.assert_array_equal(mine, theirs)
        np.testing.assert_array_equal(mine, values)
    with pytest.raises(Exception, match="data type"):
        weights.read(_Blob(written[0][2]), 11)  # an fp16 blob read as fp32


def test_sub_byte_immediates_match_coremltools_unpacking():
    _ct()
    from coremltools.optimize import _utils as ct_opt

    rng = np.random.default_rng(1)
    for mil_type, bits in program.SUB_BYTE_BITS.items():
        signed = mil_type in program.SIGNED_SUB_BYTE
        for n in (1, 5, 17, 333):
            values = (rng.integers(-(1 << bits - 1), 1 << bits - 1, n).astype(np.int8) if signed
                      else rng.integers(0, 1 << bits, n).astype(np.uint8))
            packed = ct_opt.pack_elements_into_bits(values, bits)
            theirs = ct_opt.restore_elements_from_packed_bits(packed, bits, n, signed)
            mine = program._unpack_bits(packed.tobytes(), mil_type, n)
            assert mine.dtype == theirs.dtype
            np.testing.assert_array_equal(mine, theirs)


# --- the planned interpreter: the same bits as running every op afresh ---------------------------

@pytest.mark.parametrize("compute", ["FLOAT32", "FLOAT16"])
def test_planned_interpreter_is_bit_identical_to_a_naive_run(compute, tmp_path):
    from mtconvert.backends.coreml.interp import MilInterpreter

    path = _package(tmp_path, _encoder_block, compute)
    interp = MilInterpreter.open(path)
    x = np.random.default_rng(3).standard_normal((1, 16, 64)).astype(np.float32)
    expected, expected_trace = _naive_run(interp.program, {"x": x})
    for _ in range(2):  # a second run sees the same constants
        trace: list = []
        got = interp.run({"x": x}, trace=trace)
        assert got.keys() == expected.keys()
        for name in expected:
            assert got[name].dtype == expected[name].dtype
            np.testing.assert_array_equal(got[name], expected[name])
        assert [(n, t) for n, t, _ in trace] == [(n, t) for n, t, _ in expected_trace]
        for (_, _, a), (_, _, b) in zip(trace, expected_trace, strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(interp.run({"x": x})["out"], expected["out"])
    if compute == "FLOAT16":
        assert {t.dtype for _, _, t in trace[:-1]} == {np.dtype(np.float16)}  # then "out"
        assert trace[-1][1] == "cast" and trace[-1][2].dtype == np.float32
    # constants are frozen; constant-only ops were evaluated at open
    assert all(not v.flags.writeable for v in interp.consts.values()
               if isinstance(v, np.ndarray))
    folded = [p.op.outputs[0].name for p in interp._plans if p.folded]
    assert len(folded) == 1 and folded[0].startswith("folded_silu")
    assert folded[0] in interp.consts and folded[0] in [n for n, _, _ in trace]
    assert interp.operation_count == len([op for op in interp.program.ops
                                          if op.type != "const"
                                          and not op.type.startswith("constexpr_")])


def test_outputs_are_writable_even_when_constant(tmp_path):
    from coremltools.converters.mil import Builder as mb

    from mtconvert.backends.coreml.interp import MilInterpreter

    def build(ct):
        @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))], opset_version=ct.target.iOS16)
        def prog(x):
            return mb.add(x=x, y=np.float32(1.0), name="out")
        return prog

    interp = MilInterpreter.open(_package(tmp_path, build))
    out = interp.run({"x": np.zeros((2, 3), np.float32)})["out"]
    assert out.flags.writeable
    np.testing.assert_array_equal(out, np.ones((2, 3), np.float32))


# --- kernels: the fast forms give the bits of the plain ones -------------------------------------

def test_blockwise_erf_and_gelu_are_bit_identical_to_chebval():
    rng = np.random.default_rng(5)
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-300, 6.0, -6.0, 5.99999, 1e300])
    for shape in [(), (1,), (7,), (128, 1536), (3, ops._BLOCK + 1), (2 * ops._BLOCK,)]:
        x = rng.standard_normal(shape) * 4
        x = np.concatenate([x.reshape(-1), special]) if x.ndim == 1 else x
        plain = np.sign(x) * ops._ERF_POLY(np.minimum(np.abs(x), 6.0))
        np.testing.assert_array_equal(ops._erf64(x), plain)
        with np.errstate(over="ignore"):  # 1e300 -> inf
            x32 = np.asarray(x, np.float32)
        x64 = x32.astype(np.float64)
        u = x64 / math.sqrt(2)
        gelu = (0.5 * x64 * (1 + np.sign(u) * ops._ERF_POLY(np.minimum(np.abs(u), 6.0))))
        np.testing.assert_array_equal(ops.OPS["gelu"]({"x": x32})[0], gelu.astype(np.float32))


def test_batched_matmul_on_strided_views_gives_the_contiguous_result():
    rng = np.random.default_rng(6)
    q = rng.standard_normal((1, 16, 12, 32)).astype(np.float32).transpose(0, 2, 1, 3)
    k = rng.standard_normal((1, 16, 12, 32)).astype(np.float32).transpose(0, 2, 3, 1)
    out = ops.OPS["matmul"]({"x": q, "y": k})[0]
    np.testing.assert_array_equal(out, np.matmul(np.ascontiguousarray(q),
                                                 np.ascontiguousarray(k)))
    out_t = ops.OPS["matmul"]({"x": q, "y": k.swapaxes(-1, -2), "transpose_y": np.array(True)})[0]
    np.testing.assert_array_equal(out_t, out)


_WIDENING_CASES = {  # op: (float16 parameters, the others)
    "matmul": ({"x": (3, 4), "y": (4, 5)}, {}),
    "linear": ({"x": (3, 4), "weight": (5, 4), "bias": (5,)}, {}),
    "layer_norm": ({"x": (2, 3, 8), "gamma": (8,), "beta": (8,)},
                   {"axes": np.array([-1], np.int32)}),
    "batch_norm": ({"x": (2, 3, 4, 4), "mean": (3,), "variance": (3,), "gamma": (3,),
                    "beta": (3,)}, {}),
    "instance_norm": ({"x": (2, 3, 4, 4), "gamma": (3,), "beta": (3,)}, {}),
    "conv": ({"x": (1, 2, 6, 6), "weight": (3, 2, 3, 3), "bias": (3,)}, {}),
    "select": ({"a": (3, 4), "b": (3, 4)}, {"cond": np.eye(3, 4, dtype=bool)}),
    "scaled_dot_product_attention": ({"query": (1, 2, 4, 8), "key": (1, 2, 4, 8),
                                      "value": (1, 2, 4, 8), "attn_mask": (4, 4)}, {}),
}


@pytest.mark.parametrize("op", sorted(ops.WIDENED_PARAMS))
def test_widened_float16_parameters_give_the_same_bits(op):
    """WIDENED_PARAMS lets the interpreter widen float16 weights once: the kernel must give
    the same result whichever form it gets, parameter by parameter."""
    rng = np.random.default_rng(8)
    shapes, others = _WIDENING_CASES.get(op, ({"x": (3, 4), "y": (4,)}, {}))
    assert set(shapes) == ops.WIDENED_PARAMS[op]
    half = {k: (np.abs(rng.standard_normal(s)) + 0.5 if k == "variance"
                else rng.standard_normal(s)).astype(np.float16) for k, s in shapes.items()}
    if op.startswith("logical_"):
        half = {k: v > 0 for k, v in half.items()}  # no float16 reaches them, bools do
    base = ops.OPS[op]({**others, **half})
    for param in shapes:
        widened = {**half, param: np.asarray(half[param]).astype(
            np.float32 if half[param].dtype == np.float16 else half[param].dtype)}
        got = ops.OPS[op]({**others, **widened})
        for a, b in zip(got, base, strict=True):
            assert a.dtype == b.dtype, (op, param)
            np.testing.assert_array_equal(a, b)


def test_single_threaded_blas_run_gives_the_same_bits_and_restores_the_setting(tmp_path):
    from mtconvert.backends.coreml.interp import MilInterpreter, _blas_controller

    path = _package(tmp_path, _encoder_block)
    x = np.random.default_rng(4).standard_normal((1, 16, 64)).astype(np.float32)
    controller = _blas_controller()
    before = [lib.num_threads for lib in controller.lib_controllers] if controller else []
    single = MilInterpreter.open(path).run({"x": x})["out"]
    assert ([lib.num_threads for lib in _blas_controller().lib_controllers]
            if controller else []) == before
    free = MilInterpreter.open(path, blas_threads=None).run({"x": x})["out"]
    np.testing.assert_array_equal(single, free)
