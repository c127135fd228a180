"""Source loading: ONNX description, vocabulary detection, torch modules and .pt2 files."""
import pytest
import torch

import mtconvert
from mtconvert.errors import ModelLoadError, UsageError
from mtconvert.source import embedding_table_sizes, load, read_onnx


def test_onnx_description_and_vocab(fixtures_dir, tmp_path):
    loaded = load(fixtures_dir / "bert_encoder.onnx", tmp_path)
    src = loaded.prepared
    assert [s.name for s in src.inputs] == ["input_ids", "attention_mask"]
    assert src.inputs[0].shape == ("batch", "sequence") and src.inputs[0].dtype == "int64"
    assert [s.name for s in src.outputs] == ["logits"]
    assert loaded.int_highs == {"input_ids": 1000}
    assert len(loaded.sha256) == 64


def test_vocab_found_through_quantized_graph(fixtures_dir):
    assert embedding_table_sizes(read_onnx(fixtures_dir / "bert_int8_dynamic.onnx")) == {
        "input_ids": 1000}


def test_generated_ids_stay_in_vocab(fixtures_dir, tmp_path):
    from mtconvert.inputs import prepare
    from mtconvert.options import ConvertOptions

    loaded = load(fixtures_dir / "gpt_decoder.onnx", tmp_path)
    feeds, values = prepare(loaded, ConvertOptions(input_shapes={"input_ids": (2, 48)}))
    assert feeds["input_ids"].shape == (2, 48) and feeds["input_ids"].max() < 1000
    assert "[0, 1000)" in values["input_ids"]


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(20, 8)
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, input_ids, scale):
        h = self.lin(self.emb(input_ids)) * scale
        return {"hidden": h, "pooled": h.mean(dim=1)}


def test_nn_module_source_through_api(tmp_path):
    ids = torch.tensor([[1, 5, 7]])
    scale = torch.tensor([2.0])
    report = mtconvert.convert(Tiny(), targets=["ort"], out_dir=tmp_path,
                               example_inputs=(ids, scale), iterations=2, warmup=0)
    assert report.reference.runtime == "pytorch-eager"
    assert [o["name"] for o in report.source.outputs] == ["hidden", "pooled"]
    assert [i["name"] for i in report.source.inputs] == ["input_ids", "scale"]
    assert report.ok, report.targets["onnx-mobile"].reason
    assert (tmp_path / "tiny.ort").is_file()


def test_nn_module_needs_example_inputs(tmp_path):
    with pytest.raises(UsageError, match="example_inputs"):
        mtconvert.convert(Tiny(), targets=["ort"], out_dir=tmp_path)
    with pytest.raises(UsageError, match="not a tensor"):
        mtconvert.convert(Tiny(), targets=["ort"], out_dir=tmp_path,
                          example_inputs={"input_ids": [1, 2], "scale": torch.ones(1)})


def test_not_a_model_object(tmp_path):
    with pytest.raises(UsageError, match="cannot use a int"):
        mtconvert.convert(3, targets=["ort"], out_dir=tmp_path)


def test_corrupt_pt2_is_a_load_error(tmp_path):
    bad = tmp_path / "m.pt2"
    bad.write_bytes(b"PK\x03\x04 definitely not a program")
    with pytest.raises(ModelLoadError, match="not a readable torch.export program"):
        mtconvert.convert(bad, targets=["ort"], out_dir=tmp_path / "o")


def test_onnx_with_dangling_input_is_invalid(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["missing"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        read_onnx(path)
