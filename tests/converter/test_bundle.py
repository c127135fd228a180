"""Golden bundles keep their integrity: every file's SHA-256 in bundle.json, checked by verify
(one line, exit 2, the file named), arrays loaded without unpickling."""
import json

import numpy as np
import pytest

import mtconvert
from mtconvert.errors import ModelLoadError


@pytest.fixture
def gold(tiny_onnx, tmp_path, fake_registry):
    gold = tmp_path / "gold"
    report = mtconvert.convert(tiny_onnx, targets=["fake"], out_dir=tmp_path / "o", bundle=gold,
                               registry=fake_registry, iterations=2, warmup=0)
    assert report.ok
    return gold / "fake"


def _verify(gold, fake_registry):
    return mtconvert.verify(gold, registry=fake_registry, iterations=2, warmup=0)


def test_bundle_lists_every_file_and_verifies(gold, fake_registry):
    listed = json.loads((gold / "bundle.json").read_text())["files_sha256"]
    assert {"inputs.npz", "reference.npz", "tiny.fake"} <= set(listed)
    assert _verify(gold, fake_registry).ok


def test_a_changed_file_is_refused_and_named(gold, fake_registry):
    (gold / "tiny.fake").write_bytes((gold / "tiny.fake").read_bytes() + b"\0")
    with pytest.raises(ModelLoadError, match="tiny.fake does not match the SHA-256"):
        _verify(gold, fake_registry)


def test_pickled_arrays_are_never_loaded(gold, fake_registry):
    np.savez(gold / "inputs.npz", input_ids=np.array([{"a": 1}], dtype=object))
    manifest = json.loads((gold / "bundle.json").read_text())
    del manifest["files_sha256"]  # even a bundle whose hashes were rewritten
    (gold / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="without pickles"):
        _verify(gold, fake_registry)
