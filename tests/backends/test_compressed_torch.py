"""Quantized PyTorch sources (issue 20): a torchao weight-only-int8 module and a PT2E-quantized
(XNNPACK quantizer) module, built here tiny and seeded, as .pt2 files and in memory; exported as
quantized ONNX and taken the way a quantized ONNX source is."""
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchao")

from mtconvert import quantized, source  # noqa: E402
from mtconvert.errors import ModelLoadError  # noqa: E402
from tests.models import quick_convert  # noqa: E402


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 64), torch.nn.Linear(64, 16)

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.b(torch.relu(self.a(x)))


def _float() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Tiny().eval(), torch.randn(2, 32)


def torchao_int8() -> tuple[torch.nn.Module, torch.Tensor]:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    module, x = _float()
    quantize_(module, Int8WeightOnlyConfig())
    return module, x


def pt2e_int8() -> tuple[torch.nn.Module, torch.Tensor]:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    module, x = _float()
    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(module, (x,)).module(), quantizer)
    prepared(x)
    return convert_pt2e(prepared), x


MAKERS = {"torchao": torchao_int8, "pt2e": pt2e_int8}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("torch_q")
    paths = {}
    for name, make in MAKERS.items():
        module, x = make()
        paths[name] = folder / f"{name}.pt2"
        torch.export.save(torch.export.export(module, (x,)), str(paths[name]))
    return paths


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path))
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


def test_torchao_pt2_is_refused_naming_its_tensor_subclasses(saved, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        source.load(saved["torchao"], tmp_path)
    text = str(err.value)
    assert "torchao" in text and "tensor subclasses" in text and "--trust-pickle" in text
    assert "export it with torch.export.save" not in text  # it already was


@pytest.mark.parametrize("kind,scheme", [("torchao", "weight-only"), ("pt2e", "qdq")])
def test_pt2_is_described_and_exported_as_quantized_onnx(saved, tmp_path: Path, kind: str,
                                                         scheme: str) -> None:
    loaded = source.load(saved[kind], tmp_path, trust_pickle=(kind == "torchao"))
    q = loaded.prepared.quantization
    assert q["origin"] == kind and q["bits"] == 8 and q["scheme"] == scheme
    assert q["int8_weights"] == 2 and q["weight_granularity"] == "per-channel"
    if kind == "torchao":
        assert [layer["weight"] for layer in q["torch_layers"]] == ["a.weight", "b.weight"]
    # the exported quantized ONNX computes what the PyTorch source computes
    from mtconvert import torch_source

    want = torch_source.run(loaded.prepared.torch_module, loaded.example_feeds)
    got = _ort(loaded.prepared.onnx_path, loaded.example_feeds)
    for key, value in want.items():
        assert np.abs(got[key] - value).max() <= 1e-5 * max(1.0, np.abs(value).max())


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_in_memory_quantized_module_is_described(kind: str, tmp_path: Path) -> None:
    module, x = MAKERS[kind]()
    prepared = source.load(module, tmp_path, example_inputs=(x,)).prepared
    assert prepared.quantization["origin"] == kind
    assert prepared.quantization["int8_weights"] == 2
    plan = quantized.plan_for(prepared, "tflite", ("fp32", "int8"), "fp32")
    assert plan["lower"] and plan["precision"] == "int8"


def test_a_float_module_is_not_quantized(tmp_path: Path) -> None:
    module, x = _float()
    assert source.load(module, tmp_path, example_inputs=(x,)).prepared.quantization == {}


@pytest.fixture(scope="module")
def converted(saved, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {kind: quick_convert("onnx-mobile,tflite,coreml", saved[kind],
                                tmp_path_factory.mktemp(f"conv_{kind}"),
                                trust_pickle=(kind == "torchao"))
            for kind in MAKERS}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(MAKERS))
@pytest.mark.parametrize("target", ["onnx-mobile", "tflite", "coreml"])
def test_quantized_pt2_converts_and_stays_compressed(converted, kind: str, target: str) -> None:
    t = converted[kind].targets[target]
    assert t.status == "passed", t.reason
    assert any("int8-source" in step for step in t.conversion.steps)
    c = t.compressed
    assert c["source"]["origin"] == kind and c["fallback"] is None
    assert c["size_ratio"] <= quantized.RATIO_LIMIT
    if target == "tflite":
        assert t.precision == "int8" and c["kept"]["int8_tensors"] == 2
    if target == "coreml":  # every int8 tensor holds a source weight's ints and scales as they are
        kept = c["kept"]
        assert kept["int8_tensors"] == kept["same_ints_and_scales"] == 2
        assert kept["not_from_source"] == 0


@pytest.mark.slow
def test_core_ml_holds_torchao_own_ints_and_scales(converted) -> None:
    """torchao's scale is max |w| / 127.5 with ints down to -128, not the max |w| / 127 a
    symmetric re-quantizer would compute: Core ML's constexpr weights are torchao's own qdata
    and scales (read from the torchao module here, not from mtconvert's record)."""
    from mtconvert.compressed_check import _coreml

    module, _ = torchao_int8()
    t = converted["torchao"].targets["coreml"]
    assert t.status == "passed", t.reason
    tensors = _coreml(Path(next(a.path for a in t.artifacts if a.role == "artifact")))
    for layer in (module.a, module.b):
        qdata, scale = layer.weight.qdata.numpy(), layer.weight.scale.numpy().ravel()
        assert qdata.min() == -128  # the case at stake: an int the /127 scale never yields
        assert any(ints.shape == qdata.shape and np.array_equal(ints, qdata)
                   and np.allclose(np.ravel(s), scale, rtol=1e-6, atol=0)
                   for ints, s in tensors)


# --- --float-model: the float original as a second yardstick ----------------------------------

@pytest.fixture(scope="module")
def float_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    module, x = _float()
    path = tmp_path_factory.mktemp("float") / "float.pt2"
    torch.export.save(torch.export.export(module, (x,)), str(path))
    return path


class Other(torch.nn.Module):
    def forward(self, y):  # noqa: ANN001, ANN201
        return y * 2


@pytest.mark.parametrize("case", ["missing", "other inputs"])
def test_a_bad_float_model_is_a_usage_error(saved, tmp_path: Path, case: str) -> None:
    import mtconvert
    from mtconvert.errors import UsageError

    path = tmp_path / "nothere.pt2"
    if case == "other inputs":
        torch.export.save(torch.export.export(Other(), (torch.randn(2, 32),)), str(path))
    with pytest.raises(UsageError, match="--float-model") as err:
        mtconvert.convert(saved["pt2e"], targets=["onnx-mobile"], out_dir=tmp_path / "out",
                          float_model=path)
    assert err.value.exit_code == 2 and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_each_target_is_compared_with_the_float_model(saved, float_pt2: Path,
                                                      tmp_path: Path) -> None:
    module, _ = _float()
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():  # labels: the float model's own classes
        labels = module(x).argmax(-1).numpy()
    np.savez(tmp_path / "eval.npz", x=x.numpy(), labels=labels)
    report = quick_convert("onnx-mobile", saved["pt2e"], tmp_path, float_model=float_pt2,
                           eval_data=tmp_path / "eval.npz")
    t = report.targets["onnx-mobile"]
    assert t.status == "passed", t.reason
    v = t.compressed["vs_float"]
    acc = v["accuracy"]  # the float model is right on every item by construction
    assert acc["float"] == 1.0 and acc["target"] == t.accuracy["target"]
    assert acc["drop_points"] == pytest.approx((1.0 - acc["target"]) * 100)
    assert v["profile"] == "int8" and v["float_model"] == str(float_pt2)
    assert v["worst"]["max_abs"] > 0  # the int8 source is not the float model
    assert v["passed"] and v["source"]["passed"]
    # the compressed source's own distance from the float model, measured independently
    from mtconvert import source as source_mod, torch_source

    compressed = source_mod.load(saved["pt2e"], tmp_path)
    floated = source_mod.load(float_pt2, tmp_path)
    want = torch_source.run(compressed.prepared.torch_module, compressed.example_feeds)
    ref = torch_source.run(floated.prepared.torch_module, compressed.example_feeds)
    diff = max(float(np.abs(want[k] - ref[k]).max()) for k in ref)
    assert v["source"]["worst"]["max_abs"] == pytest.approx(diff, rel=1e-5)
    assert report.to_dict()["targets"][0]["compressed"]["vs_float"]["passed"] is True
