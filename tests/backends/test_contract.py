"""Every registered backend honours the plugin contract: a new backend is tested the moment it
registers. Runs the real converter and runtime on the BERT fixture (a model every target
supports: the contract, not model coverage, is under test here)."""
import numpy as np
import pytest

from mtconvert.backends.base import Availability, Backend, PreparedSource, TargetOptions
from mtconvert.registry import default_registry
from mtconvert.source import load
from mtconvert.validators.compare import PROFILES, compare_output

REGISTRY = default_registry()
NAMES = REGISTRY.names()


def _usable(name):
    av = REGISTRY.get(name).availability()
    if not (av.can_convert and av.can_run):
        pytest.skip(f"{name} cannot convert and run here: {av.reason}")


@pytest.mark.parametrize("name", NAMES)
def test_class_attributes(name):
    cls = REGISTRY.get(name)
    assert issubclass(cls, Backend) and cls.name == name
    assert set(cls.precisions) <= {"fp32", "fp16", "int8"} and "fp32" in cls.precisions
    assert isinstance(cls.availability(), Availability)


@pytest.mark.parametrize("name", NAMES)
def test_convert_open_run(name, fixtures_dir, tmp_path):
    _usable(name)
    model = fixtures_dir / "bert_encoder.onnx"
    loaded = load(model, tmp_path / "work")
    src: PreparedSource = loaded.prepared
    (tmp_path / "work").mkdir(exist_ok=True)
    feeds = {"input_ids": np.array([[3, 7, 9, 1]], np.int64),
             "attention_mask": np.array([[1, 1, 1, 0]], np.int64)}
    src.input_shapes = {k: v.shape for k, v in feeds.items()}  # the pipeline's validation shapes
    out = tmp_path / "out"
    out.mkdir()
    backend = REGISTRY.get(name)()
    art = backend.convert(src, out, TargetOptions(precision="fp32", threads=1, timeout_s=600))
    assert art.target == name and art.primary in art.files
    assert all(p.exists() and out in p.parents for p in art.files)
    assert all(isinstance(s, str) and s for s in art.steps)
    import onnxruntime as ort

    ref = ort.InferenceSession(str(model)).run(["logits"], feeds)[0]
    with backend.open(art, threads=1) as session:
        outputs = session.run(feeds)
    assert set(outputs) == {"logits"}  # keyed by the SOURCE's output names
    assert compare_output("logits", ref, outputs["logits"], PROFILES["fp32"]).passed
    for finding in backend.lint(art):
        assert finding.severity in ("error", "warning", "info") and finding.message
    _optional_hooks(backend, art, src, feeds, ref)


def _optional_hooks(backend, art, src, feeds, ref):
    """adopt (validate mode) and intermediates (localization), where a backend offers them."""
    cls = type(backend)
    if cls.artifact_suffixes:
        assert art.primary.suffix in cls.artifact_suffixes
        adopted = backend.adopt(art.primary, src, TargetOptions(precision="fp32"))
        with backend.open(adopted, threads=1) as session:
            again = session.run(feeds)["logits"]
        assert compare_output("logits", ref, again, PROFILES["fp32"]).passed
    if cls.addressable_intermediates:
        with backend.open(art, threads=1) as session:
            found = session.intermediates(feeds)
        assert found and all(isinstance(n, str) and isinstance(t, str) and v.dtype.kind == "f"
                             for n, t, v in found)
        # the logits are among them (in the runtime's layout: compared flattened)
        assert any(v.size == ref.size and np.allclose(v.ravel(), ref.ravel(), atol=1e-4)
                   for _, _, v in found)
