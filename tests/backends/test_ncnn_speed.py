"""ncnn speed rewrites (ncnn_speed): attention fused into ncnn's SDPA layer, with real pnnx and
ncnn; the fusion is kept only when ncnn still agrees with ONNX Runtime."""
import shutil

import numpy as np
import pytest

from mtconvert.backends.ncnn import NcnnBackend, param_layer_types, pnnx_binary
from mtconvert.backends.ncnn_speed import (blob_shapes, fuse, fuse_attention, match_attentions,
                                           read_param, run_ncnn, worst_vs_ort, write_param)
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
    assert step.startswith("sdpa: not applied: the fused .param differs from ONNX Runtime")
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
