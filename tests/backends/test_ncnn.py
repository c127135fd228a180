"""ncnn with the real pnnx and ncnn: legalization, routes, exact and phone-fp16 modes."""
import re
import shutil

import numpy as np
import onnxruntime as ort
import pytest

import mtconvert
from mtconvert.errors import UsageError
from tests.models import quick_convert, perturb
from mtconvert.backends.ncnn import (NcnnBackend, declare_input_shapes, param_io,
                                     param_layer_types, patch_tanh_gelu, pow_layers)
from mtconvert.backends.ncnn_rewrite import prepare

pytestmark = pytest.mark.skipif(not NcnnBackend.availability().can_convert,
                                reason="pnnx/ncnn not installed")
PASSING = ["bert_encoder", "gpt_decoder", "vit_encoder", "bert_pruned", "bert_distilled",
           "bert_lowrank"]


def _tiny_bert(random_biases: bool = False):
    """A 1-layer BERT encoder module (input_ids, attention_mask) -> last_hidden_state."""
    import torch
    import transformers

    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, attn_implementation="eager")).eval()
    if random_biases:  # HF initialises biases to 0; trained models have others
        with torch.no_grad():
            for name, param in bert.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0.0, 0.05)

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return Encoder().eval()


def _run(model, out, **kw):
    return quick_convert("ncnn", model, out, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("fixture", PASSING)
def test_fixture_passes_exact_fp32(fixture, fixtures_dir, tmp_path):
    t = _run(fixtures_dir / f"{fixture}.onnx", tmp_path).targets["ncnn"]
    assert t.status == "passed", t.reason
    assert t.numerics.worst["max_abs"] < 1e-4 and t.numerics.runtime == "ncnn (exact fp32)"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{fixture}.ncnn.bin", f"{fixture}.ncnn.log", f"{fixture}.ncnn.param"]


@pytest.mark.slow
def test_keep_intermediate(fixtures_dir, tmp_path):
    t = _run(fixtures_dir / "bert_distilled.onnx", tmp_path,
             extra={"keep_intermediate": True}).targets["ncnn"]
    kept = tmp_path / "bert_distilled.ncnn-intermediate"
    assert t.status == "passed" and (kept / "model.pnnx.param").is_file()
    assert str(kept) in [a.path for a in t.artifacts]


@pytest.mark.slow
def test_steps_name_rewrites_and_routes(fixtures_dir, tmp_path):
    bert = _run(fixtures_dir / "bert_encoder.onnx", tmp_path / "b").targets["ncnn"]
    assert any(s.startswith("legalize: attention_mask -> float additive mask")
               for s in bert.conversion.steps)
    vit = _run(fixtures_dir / "vit_encoder.onnx", tmp_path / "v").targets["ncnn"]
    steps = " | ".join(vit.conversion.steps)
    # the lowering keeps MatMul+Add unfused, so pnnx no longer breaks ViT's fixed-shape Reshapes
    assert "route onnx-fixed: chosen (passed)" in steps
    gpt = _run(fixtures_dir / "gpt_decoder.onnx", tmp_path / "g").targets["ncnn"]
    assert any(s.startswith("GELU: 2 layer(s) set to the tanh form") for s in gpt.conversion.steps)


@pytest.mark.slow
def test_phone_fp16_mode_reports_change_against_exact(fixtures_dir, tmp_path):
    t = _run(fixtures_dir / "bert_encoder.onnx", tmp_path, precision="fp16").targets["ncnn"]
    assert t.status == "passed", t.reason
    assert t.numerics.runtime == "ncnn (fp16 storage+arithmetic)"
    assert t.numerics.fp32_worst["max_abs"] < 1e-4
    assert 0 < t.numerics.vs_fp32["logits"]["max_abs"] < 1e-2
    assert (tmp_path / "bert_encoder.fp16.ncnn.param").is_file()


@pytest.mark.slow
def test_torch_sources(fixtures_dir, tmp_path):
    import torch

    fixed_batch_2 = _run(fixtures_dir / "bert_encoder.pt2", tmp_path / "p").targets["ncnn"]
    assert fixed_batch_2.status == "error" and "fixes batch 2" in fixed_batch_2.reason
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    report = _run(mlp, tmp_path / "m", example_inputs=(torch.randn(1, 8),))
    assert report.reference.runtime == "pytorch-eager"
    t = report.targets["ncnn"]
    assert t.status == "passed", t.reason
    assert "route torchscript: chosen (passed)" in t.conversion.steps  # the first route


@pytest.mark.slow
def test_torch_bert_falls_back_from_torchscript_to_onnx(tmp_path):
    """A BERT module's TorchScript keeps HF's mask logic (layers ncnn lacks): rejected with
    the layers named; the legalized ONNX route wins."""
    import torch

    ids = torch.randint(0, 100, (1, 12))
    mask = torch.ones(1, 12, dtype=torch.long)
    mask[0, 9:] = 0
    t = _run(_tiny_bert(), tmp_path, example_inputs=(ids, mask)).targets["ncnn"]
    assert t.status == "passed", t.reason
    steps = " | ".join(t.conversion.steps)
    assert "route torchscript rejected: failed: layers the installed ncnn cannot create" in steps
    assert "route onnx-fixed: chosen (passed)" in steps


@pytest.mark.slow
def test_dynamic_batch_runs_item_by_item(fixtures_dir, tmp_path):
    t = _run(fixtures_dir / "bert_encoder.onnx", tmp_path,
             input_shapes={"input_ids": "3x16"}).targets["ncnn"]
    assert t.status == "passed", t.reason
    assert any(s.startswith("batch: converted at batch 1; the 3 items") for s in t.conversion.steps)


def test_unloadable_layers_are_caught(tmp_path):
    """pnnx exits 0 with layers ncnn has no implementation of (seen with pnnx at its defaults:
    `torch.where`, `torch.logical_and` from attention masks, `DequantizeLinear` from QDQ
    graphs); the lint names them as an error before anything loads the .param."""
    from mtconvert.backends.base import Artifact

    param = tmp_path / "m.ncnn.param"
    param.write_text("7767517\n3 3\nInput in0 0 1 in0\ntorch.where where_0 1 1 in0 a\n"
                     "DequantizeLinear dq_1 1 1 a out0\n")
    param.with_suffix(".bin").write_bytes(b"")
    found = {f.code: f for f in NcnnBackend().lint(Artifact(target="ncnn", primary=param,
                                                               files=(param,)))}
    bad = found["ncnn-unknown-layers"]
    assert bad.severity == "error"
    assert bad.message == "layers the installed ncnn cannot create: DequantizeLinear, torch.where"


@pytest.mark.slow
def test_padded_mask_is_honoured_with_nonzero_biases(tmp_path):
    """Regression: the additive mask once reached ncnn broadcast along the query axis (pnnx's
    Unsqueeze -> ExpandDims ignores ncnn's missing batch axis), so padding had no effect. Zero
    biases hid it; with trained-like biases it was 9e-3 off."""
    import torch

    ids = torch.randint(0, 100, (1, 12))
    axes = {0: "batch", 1: "sequence"}
    path = tmp_path / "biased_bert.onnx"
    torch.onnx.export(_tiny_bert(random_biases=True), (ids, torch.ones_like(ids)), str(path),
                      dynamo=False,
                      input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                      dynamic_axes={"input_ids": axes, "attention_mask": axes}, opset_version=17)
    pad = np.ones((1, 12), np.int64)
    pad[0, 8:] = 0
    sess = ort.InferenceSession(str(path))
    padded = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": pad})[0]
    full = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones_like(pad)})[0]
    assert np.abs(padded - full).max() > 1e-3  # padding matters for this model
    np.savez(tmp_path / "in.npz", input_ids=ids.numpy(), attention_mask=pad)
    t = _run(path, tmp_path / "out", inputs=tmp_path / "in.npz").targets["ncnn"]
    assert t.status == "passed", t.reason


def test_mask_rewrite_is_equivalent_in_onnxruntime(fixtures_dir, tmp_path):
    shapes = {"input_ids": [1, 16], "attention_mask": [1, 16]}
    info = prepare(str(fixtures_dir / "bert_encoder.onnx"), str(tmp_path / "r.onnx"), shapes)
    assert info["masks_rewritten"] == ["attention_mask"]
    assert info["input_dtypes"]["attention_mask"] == "float32"
    a = ort.InferenceSession(str(fixtures_dir / "bert_encoder.onnx"))
    b = ort.InferenceSession(str(tmp_path / "r.onnx"))
    rng = np.random.default_rng(123)
    for _ in range(8):
        ids = rng.integers(0, 1000, (1, 16))
        mask = (np.arange(16) < rng.integers(1, 17)).astype(np.int64)[None]
        ref = a.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        got = b.run(None, {"input_ids": ids, "attention_mask": mask.astype(np.float32)})[0]
        assert np.abs(ref - got).max() <= 1e-5


def test_param_helpers(tmp_path):
    param = tmp_path / "m.param"
    param.write_text("7767517\n4 4\nInput in0 0 1 in0\nGELU gelu_0 1 1 in0 a\n"
                     "BinaryOp pow_1 1 1 a b 0=6 1=1 2=3.0\nGELU gelu_2 1 1 b out0 0=1\n")
    assert param_layer_types(param) == ["Input", "GELU", "BinaryOp", "GELU"]
    assert pow_layers(param) == 1
    assert patch_tanh_gelu(param) == 1
    assert "GELU gelu_0 1 1 in0 a 0=1" in param.read_text()


@pytest.mark.parametrize("shapes", [[[1, 12], [1, 12]], [[1, 3, 32, 32], [1, 7]],
                                    [[1, 2, 3, 4, 5], [1, 1, 9]]])
def test_declared_input_shapes_round_trip(tmp_path, shapes):
    param = tmp_path / "m.param"
    param.write_text("7767517\n5 5\nInput in0 0 1 in0\nInput in1 0 1 in1\n"
                     "Embed embed_0 1 1 in0 a 0=4 1=10 2=0 3=40\n"
                     "BinaryOp add_1 2 1 a in1 b 0=0\nSplit split_2 1 2 b out0 out1\n")
    assert [i["shape"] for i in param_io(param)[0]] == [None, None]
    declare_input_shapes(param, shapes)
    ins, outs = param_io(param)
    assert [i["shape"] for i in ins] == shapes
    assert [i["int"] for i in ins] == [True, False] and outs == ["out0", "out1"]


def test_pnnx_named_outputs_keep_the_models_order(tmp_path):
    """pnnx names outputs out0, out1… in the model's order, but a .param lists layers
    topologically: out1 made first must still be the model's second output (a KV-cache step
    graph's logits and presents came back swapped in `validate`)."""
    param = tmp_path / "m.param"
    param.write_text("7767517\n4 4\nInput in0 0 1 in0\n"
                     "UnaryOp neg_0 1 1 in0 out1 0=1\nSplit split_1 1 2 in0 a b\n"
                     "BinaryOp add_2 2 1 a b out0 0=0\n")
    assert param_io(param)[1] == ["out0", "out1"]
    other = tmp_path / "n.param"  # not pnnx's names: the file's order
    other.write_text("7767517\n3 3\nInput x 0 1 x\nUnaryOp neg_0 1 1 x zeta 0=1\n"
                     "UnaryOp abs_1 1 1 x alpha 0=0\n")
    assert param_io(other)[1] == ["zeta", "alpha"]


@pytest.fixture(scope="module")
def built_ncnn(fixtures_dir, tmp_path_factory):
    """The distilled BERT fixture as .param/.bin at 1x12 (mtconvert validate's input)."""
    out = tmp_path_factory.mktemp("ncnn-built")
    src = fixtures_dir / "bert_distilled.onnx"
    assert _run(src, out, input_shapes={"input_ids": "1x12"}).ok
    return src, out


def test_validate_param_uses_its_declared_shapes(built_ncnn):
    src, out = built_ncnn
    report = mtconvert.validate(src, [out / "bert_distilled.ncnn.param"], iterations=1)
    t = report.targets["ncnn"]
    assert t.status == "passed", t.reason
    assert t.input_shapes == {"input_ids": [1, 12], "attention_mask": [1, 12]}
    assert t.numerics.runtime == "ncnn (exact fp32)"
    with pytest.raises(UsageError, match="fixed to"):
        mtconvert.validate(src, [out / "bert_distilled.ncnn.param"],
                           input_shapes={"input_ids": "1x5"})


def test_validate_param_without_shapes_is_flagged(built_ncnn, tmp_path):
    """A pnnx-built .param does not record its shapes: run at the requested ones, warned; at a
    shape other than its own the numbers are wrong (ncnn baked the old one into Reshapes)."""
    src, out = built_ncnn
    param = tmp_path / "bare.param"
    param.write_text(re.sub(r"(Input\s+\S+\s+0 1 \S+)( \d+=\d+)+", r"\1",
                            (out / "bert_distilled.ncnn.param").read_text()))
    shutil.copy(out / "bert_distilled.ncnn.bin", tmp_path / "bare.bin")
    same = mtconvert.validate(src, [param], iterations=1, input_shapes={"input_ids": "1x12"})
    t = same.targets["ncnn"]
    assert t.status == "passed", t.reason
    assert "ncnn-shapes-undeclared" in [f["code"] for f in t.findings]
    other = mtconvert.validate(src, [param], iterations=1, input_shapes={"input_ids": "1x5"})
    assert other.targets["ncnn"].status in ("failed", "error") and other.exit_code != 0


def test_validate_localizes_by_ncnn_blobs(built_ncnn, tmp_path):
    """Source and artifact differ in one bias: the blobs name that Add, without converting."""
    src, out = built_ncnn
    node = perturb(src, tmp_path / "shifted.onnx")
    t = mtconvert.validate(tmp_path / "shifted.onnx", [out / "bert_distilled.ncnn.param"],
                           iterations=1).targets["ncnn"]
    d = t.diagnostics
    assert t.status == "failed" and d["method"] == "intermediate tensors matched by value"
    # ncnn's Gemm holds MatMul+Add (with the residual Add): the group starts at the MatMul,
    # holds the changed Add, and is not called exact
    first = d["first_divergence"]["node"]
    assert first.endswith("/MatMul") and node in d["fused_with"] and not d["exact"]


def test_a_one_row_gemm_input_is_made_2d(tmp_path):
    from mtconvert.backends.ncnn import gemm_row_inputs, param_layers

    param = tmp_path / "m.param"
    param.write_text("\n".join([
        "7767517", "13 13",
        "Input in0 0 1 in0 0=64", "Input in1 0 1 in1 0=64", "Input in2 0 1 in2 0=64",
        "Reshape row 1 1 in0 a 0=64",  # only a Gemm's A: made [1, 64]
        "Reshape shared 1 1 in1 x 0=64",  # also read by a BinaryOp: left alone
        "Reshape trans 1 1 in2 y 0=64",  # a transA Gemm's input: not one row
        "MemoryData w1 0 1 b1 0=192 1=64", "MemoryData w2 0 1 b2 0=192 1=64",
        "MemoryData w3 0 1 b3 0=192 1=64",
        "Gemm mm1 2 1 a b1 c1", "Gemm mm2 2 1 x b2 c2", "BinaryOp add 2 1 x x g 0=0",
        "Gemm mm3 2 1 y b3 c3 2=1",
    ]) + "\n")
    assert gemm_row_inputs(param) == 1
    params = {name: p for _, name, _, _, p in param_layers(param)}
    assert params["row"] == ["0=64", "1=1"]
    assert params["shared"] == ["0=64"] and params["trans"] == ["0=64"]
