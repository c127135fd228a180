"""Conversion cache and parallel targets, with the fake backend."""
import os

import mtconvert


def _convert(model, out, registry, **kw):
    kw.setdefault("iterations", 2)
    kw.setdefault("warmup", 0)
    kw.setdefault("targets", ["fake"])
    return mtconvert.convert(model, out_dir=out, registry=registry, **kw)


def test_warm_run_reuses_conversion_and_revalidates(tiny_onnx, tmp_path, fake_registry):
    cold = _convert(tiny_onnx, tmp_path / "a", fake_registry)
    warm = _convert(tiny_onnx, tmp_path / "b", fake_registry)
    c, w = cold.targets["fake"], warm.targets["fake"]
    assert not c.conversion.cached and w.conversion.cached
    assert w.conversion.seconds == c.conversion.seconds  # the original conversion's time
    assert w.numerics == c.numerics and w.latency is not None  # validated again
    assert (tmp_path / "b" / "tiny.fake").read_bytes() == tiny_onnx.read_bytes()
    assert sorted(os.listdir(tmp_path / "b")) == ["tiny.fake", "tiny.fake.log"]


def test_cache_key_follows_options_and_can_be_bypassed(tiny_onnx, tmp_path, fake_registry):
    _convert(tiny_onnx, tmp_path / "a", fake_registry)
    other = _convert(tiny_onnx, tmp_path / "b", fake_registry, precision="fp16")
    assert not other.targets["fake"].conversion.cached
    shaped = _convert(tiny_onnx, tmp_path / "c", fake_registry, input_shapes={"input_ids": "1x8"})
    assert not shaped.targets["fake"].conversion.cached
    bypass = _convert(tiny_onnx, tmp_path / "d", fake_registry, cache=False)
    assert not bypass.targets["fake"].conversion.cached


def test_a_copy_under_another_name_gets_artifacts_named_after_it(tiny_onnx, tmp_path,
                                                                  fake_registry):
    """The same bytes under another name: its own artifacts, never the first source's name."""
    _convert(tiny_onnx, tmp_path / "a", fake_registry)
    copy = tmp_path / "renamed.onnx"
    copy.write_bytes(tiny_onnx.read_bytes())
    other = _convert(copy, tmp_path / "b", fake_registry)
    assert not other.targets["fake"].conversion.cached
    assert sorted(os.listdir(tmp_path / "b")) == ["renamed.fake", "renamed.fake.log"]


def test_failed_conversion_is_not_cached(tiny_onnx, tmp_path, fake_registry):
    bad = {"fake": {"convert_error": True}}
    for out in ("a", "b"):
        report = _convert(tiny_onnx, tmp_path / out, fake_registry, extra=bad)
        assert report.targets["fake"].status == "error"
    assert not report.targets["fake"].conversion


def test_cache_dir_from_environment(tiny_onnx, tmp_path, fake_registry, monkeypatch):
    monkeypatch.setenv("MTCONVERT_CACHE_DIR", str(tmp_path / "mycache"))
    _convert(tiny_onnx, tmp_path / "a", fake_registry)
    entries = [p for p in (tmp_path / "mycache").iterdir() if (p / "entry.json").is_file()]
    assert len(entries) == 1  # one conversion (beside it: the source cache, sources/)
    assert (tmp_path / "mycache" / "sources").is_dir()


def test_parallel_targets_keep_requested_order(tiny_onnx, tmp_path, fake_registry):
    report = _convert(tiny_onnx, tmp_path, fake_registry, targets=["fake2", "fake"], jobs=2,
                      extra={"fake": {"crash": True}})
    assert list(report.targets) == ["fake2", "fake"]
    assert report.targets["fake2"].status == "passed"
    assert report.targets["fake"].status == "error" and report.settings["jobs"] == 2
