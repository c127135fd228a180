"""ncnn speed rewrites (ncnn_speed): attention fused into ncnn's SDPA layer, Gemms with constant
weights made InnerProducts, with real pnnx and ncnn; each rewrite is kept only when ncnn still
agrees with ONNX Runtime."""
import shutil

import numpy as np
import pytest

from mtconvert.backends.ncnn import NcnnBackend, param_layer_types, pnnx_binary
from mtconvert.backends.ncnn_speed import (blob_shapes, dense_to_innerproduct, fuse,
                                           fuse_attention, gemm_to_innerproduct,
                                           match_attentions, read_param, run_ncnn,
                                           worst_vs_ort, write_param)
from mtconvert.backends.process import run_tool
from tests.models import quick_convert

pytestmark = pytest.mark.skipif(not NcnnBackend.availability().can_convert,
                                reason="pnnx/ncnn not installed")
SHAPES = {"input_ids": [1, 32], "attention_mask": [1, 32]}
INPUTS = [["in0", "input_ids", "int64"], ["in1", "attention_mask", "float32"]]
OUTPUTS = [["out0", "logits"]]

# the attention as pnnx writes an SDPA-exported model (torch >= 2: q and kᵀ each scaled by
# s**0.5 before the product), on 2 heads x 8 positions x 4 wide, mask [1, 1, 8]
PRESCALED = """7767517
11 11
Input q 0 1 q
Input kr 0 1 kr
Input v 0 1 v
Input m 0 1 m
Permute kt 1 1 kr kt 0=3
BinaryOp mq 1 1 q qs 0=2 1=1 2=0.707106769
BinaryOp mk 1 1 kt ks 0=2 1=1 2=0.707106769
MatMul qk 2 1 qs ks sc
BinaryOp add 2 1 sc m sm
Softmax soft 1 1 sm p 0=2 1=1
MatMul av 2 1 p v out
"""


@pytest.fixture(scope="module")
def converted(fixtures_dir, tmp_path_factory):
    """The 2-layer BERT fixture through mtconvert (fused), its intermediate files kept."""
    out = tmp_path_factory.mktemp("fused")
    report = quick_convert("ncnn", fixtures_dir / "bert_encoder.onnx", out, cache=False,
                           extra={"keep_intermediate": True})
    return report.targets["ncnn"], out


@pytest.fixture(scope="module")
def unfused(converted, tmp_path_factory):
    """pnnx's own .param of the same prepared graph, before the fusion."""
    work = tmp_path_factory.mktemp("pnnx")
    shutil.copy(converted[1] / "bert_encoder.ncnn-intermediate" / "model.onnx", work)
    run_tool([str(pnnx_binary()), "model.onnx", "inputshape=[1,32]i64,[1,32]f32", "fp16=0"],
             target="ncnn", step="pnnx", log_path=work / "pnnx.log", cwd=work)
    return work / "model.ncnn.param"


@pytest.mark.slow
def test_attention_becomes_sdpa_and_stays_exact(converted, fixtures_dir):
    t, out = converted
    assert t.status == "passed", t.reason
    types = param_layer_types(out / "bert_encoder.ncnn.param")
    assert types.count("SDPA") == 2 and "MatMul" not in types and "Softmax" not in types
    assert any(s.startswith("sdpa: 2 attention(s)") for s in t.conversion.steps)
    assert t.numerics.worst["max_abs"] < 1e-4
    # padded masks too (no, a quarter, half of the positions)
    worst, = worst_vs_ort(fixtures_dir / "bert_encoder.onnx", [out / "bert_encoder.ncnn.param"],
                          INPUTS, OUTPUTS, SHAPES)
    assert worst < 1e-4


@pytest.mark.slow
def test_fusion_is_dropped_when_its_check_fails(unfused, fixtures_dir, tmp_path):
    assert "MatMul" in param_layer_types(unfused)
    rejected = tmp_path / "r.ncnn.param"
    shutil.copy(unfused, rejected)
    shutil.copy(unfused.with_suffix(".bin"), rejected.with_suffix(".bin"))
    step = fuse_attention(rejected, fixtures_dir / "bert_encoder.onnx", SHAPES, INPUTS, OUTPUTS,
                          log=tmp_path / "log", timeout=300, test_offset=1.0)  # forced mismatch
    assert step.startswith("sdpa: not applied: the rewritten .param differs from ONNX Runtime")
    assert rejected.read_bytes() == unfused.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # no candidate left behind
        "log", "r.ncnn.bin", "r.ncnn.param", "r.ncnn.sdpa.job.json"]
    applied = fuse_attention(rejected, fixtures_dir / "bert_encoder.onnx", SHAPES, INPUTS,
                             OUTPUTS, log=tmp_path / "log", timeout=300)
    assert applied.startswith("sdpa: 2 attention(s)")
    assert param_layer_types(rejected).count("SDPA") == 2


def test_prescaled_attention_fuses_exactly(tmp_path):
    """q·s½ and kᵀ·s½ become SDPA's scale s; the Kᵀ Permute becomes the K one; the [1,1,S]
    mask is tiled to [S,S]. ncnn runs both .params: same numbers, and the same as numpy."""
    param = tmp_path / "a.param"
    param.write_text(PRESCALED)
    param.with_suffix(".bin").write_bytes(b"")
    rng = np.random.default_rng(0)
    q, kr, v = (rng.standard_normal(s).astype(np.float32) for s in [(2, 8, 4), (8, 2, 4),
                                                                  (2, 8, 4)])
    mask = np.where(np.arange(8) < 6, 0.0, -1e4).astype(np.float32).reshape(1, 1, 8)
    feeds = [("q", q), ("kr", kr), ("v", v), ("m", mask)]
    layers = read_param(param)
    found = match_attentions(layers)
    assert len(found) == 1 and found[0].scale == pytest.approx(0.5)
    fused, notes = fuse(layers, found, blob_shapes(param, feeds))
    assert notes == []
    assert [x.kind for x in fused] == ["Input"] * 4 + ["Permute", "Tile", "SDPA"]
    assert fused[4].param("0") == "2" and float(fused[-1].param("6")) == pytest.approx(0.5)
    out = tmp_path / "b.param"
    write_param(out, fused)
    out.with_suffix(".bin").write_bytes(b"")
    want, = run_ncnn(param, feeds, ["out"])
    got, = run_ncnn(out, feeds, ["out"])
    k = kr.transpose(1, 0, 2)  # [heads, seq, dim]
    s = q @ k.transpose(0, 2, 1) * 0.5 + mask
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ v
    assert np.abs(got - ref.ravel()).max() < 1e-5 and np.abs(got - want).max() < 1e-5


def test_shared_scores_are_not_fused(tmp_path):
    """A blob the attention would remove but another layer reads: no match."""
    text = PRESCALED.replace("11 11", "12 12") + "BinaryOp keep 1 1 sc kept 0=2 1=1 2=2.0\n"
    # sc now has two readers (add and keep): the scores must stay
    param = tmp_path / "s.param"
    param.write_text(text)
    assert match_attentions(read_param(param)) == []


@pytest.mark.slow
def test_dense_gemms_become_innerproducts_and_stay_exact(converted, unfused, fixtures_dir):
    t, out = converted
    assert t.status == "passed", t.reason
    gemms = param_layer_types(unfused).count("Gemm")  # pnnx's: 2 layers x 6 dense
    types = param_layer_types(out / "bert_encoder.ncnn.param")
    assert gemms == 12 and "Gemm" not in types
    assert types.count("InnerProduct") == gemms + param_layer_types(unfused).count("InnerProduct")
    assert any(s.startswith(f"innerproduct: {gemms} Gemm(s)") for s in t.conversion.steps)
    worst, = worst_vs_ort(fixtures_dir / "bert_encoder.onnx", [out / "bert_encoder.ncnn.param"],
                          INPUTS, OUTPUTS, SHAPES)
    assert worst < 1e-4


@pytest.mark.slow
def test_innerproduct_is_dropped_when_its_check_fails(unfused, fixtures_dir, tmp_path):
    param = tmp_path / "d.ncnn.param"
    shutil.copy(unfused, param)
    shutil.copy(unfused.with_suffix(".bin"), param.with_suffix(".bin"))
    gemms = param_layer_types(param).count("Gemm")
    assert gemms == 12
    args = (fixtures_dir / "bert_encoder.onnx", SHAPES, INPUTS, OUTPUTS)
    step = dense_to_innerproduct(param, *args, log=tmp_path / "log", timeout=300,
                                 test_offset=1.0)  # a forced mismatch
    assert step.startswith("innerproduct: not applied: the rewritten .param differs")
    assert param.read_bytes() == unfused.read_bytes()
    assert param.with_suffix(".bin").read_bytes() == unfused.with_suffix(".bin").read_bytes()
    assert not list(tmp_path.glob("*.innerproduct.param"))  # no candidate left behind
    step = dense_to_innerproduct(param, *args, log=tmp_path / "log", timeout=300)
    assert step.startswith(f"innerproduct: {gemms} Gemm(s)")
    assert "Gemm" not in param_layer_types(param)


def _gemm_model(tmp_path, extra: str, bias: bool):
    """Input [4, 6] -> Gemm (constant B [3, 6], C [3] when ``bias``) as pnnx writes a Linear."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    w = rng.standard_normal((3, 6)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    c = "6=1 10=4" if bias else "6=0"
    param = tmp_path / "g.param"
    param.write_text(f"7767517\n2 2\nInput in0 0 1 in0\n"
                     f"Gemm gemm_0 1 1 in0 out0 2=0 3=1 4=0 5=1 {c} 7=4 8=3 9=6 {extra}\n")
    flag = b"\0\0\0\0"
    param.with_suffix(".bin").write_bytes(flag + w.tobytes() + (flag + b.tobytes() if bias
                                                                else b""))
    return param, x, x @ w.T + (b if bias else 0)


@pytest.mark.parametrize("bias", [True, False])
def test_gemm_to_innerproduct_computes_the_same(tmp_path, bias):
    """The .param line and the .bin (the bias loses Gemm's 4-byte type flag) rewritten; ncnn
    runs both: the same numbers as numpy."""
    param, x, want = _gemm_model(tmp_path, "", bias)
    layers = read_param(param)
    new_layers, data, n = gemm_to_innerproduct(layers, param.with_suffix(".bin").read_bytes(),
                                               blob_shapes(param, [("in0", x)]))
    assert n == 1 and new_layers[1].kind == "InnerProduct"
    assert new_layers[1].params == ["0=3", f"1={int(bias)}", "2=18"]
    out = tmp_path / "ip.param"
    write_param(out, new_layers)
    out.with_suffix(".bin").write_bytes(data)
    got, = run_ncnn(out, [("in0", x)], ["out0"])
    before, = run_ncnn(param, [("in0", x)], ["out0"])
    assert np.abs(got - want.ravel()).max() < 1e-5 and np.abs(got - before).max() < 1e-5


@pytest.mark.parametrize("extra", ["0=0.5", "11=1", "18=2"])
def test_gemm_innerproduct_cannot_express_stays(tmp_path, extra):
    """alpha != 1, an output option, an int8 Gemm: not what InnerProduct computes, left as is."""
    param, x, _ = _gemm_model(tmp_path, extra, True)
    data = param.with_suffix(".bin").read_bytes()
    layers = read_param(param)
    shapes = {"in0": (4, 6)}
    done = gemm_to_innerproduct(layers, data, shapes)
    assert not isinstance(done, str)
    assert done[2] == 0 and done[1] == data and [x.kind for x in done[0]] == ["Input", "Gemm"]
