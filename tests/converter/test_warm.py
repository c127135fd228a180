"""Warm re-runs: the source cache (an ONNX description, a .pt2's ONNX export, kept by file
hash) and the fewer child processes per target (one child validates and is timed; one
reference child per run serves every target's timing). Numerics of a warm run are the cold
run's."""
from __future__ import annotations

import shutil

import pytest

import mtconvert
from mtconvert import source, torch_source, worker
from mtconvert.cache import SourceCache
from mtconvert.run import check


def _fields(loaded: source.LoadedSource) -> tuple:
    p = loaded.prepared
    return (p.format, p.name, p.inputs, p.outputs, loaded.sha256, loaded.int_highs,
            loaded.weight_dims)


def _never(*_a, **_k):
    raise AssertionError("not called on a warm load")


def test_an_onnx_source_is_described_once(fixtures_dir, tmp_path, monkeypatch):
    cache = SourceCache(tmp_path / "cache")
    model = fixtures_dir / "bert_encoder.onnx"
    cold = source.load(model, tmp_path / "w1", cache=cache)
    monkeypatch.setattr(source, "read_onnx", _never)
    warm = source.load(model, tmp_path / "w2", cache=cache)
    assert _fields(warm) == _fields(cold) and cold.int_highs and cold.weight_dims
    other = tmp_path / "other.onnx"  # other bytes: another entry, parsed again
    shutil.copyfile(fixtures_dir / "bert_distilled.onnx", other)
    with pytest.raises(AssertionError, match="not called"):
        source.load(other, tmp_path / "w3", cache=cache)
    with pytest.raises(AssertionError, match="not called"):  # no cache: always parsed
        source.load(model, tmp_path / "w4", cache=SourceCache(None))


def test_a_pt2_source_is_exported_once(fixtures_dir, tmp_path, monkeypatch):
    cache = SourceCache(tmp_path / "cache")
    (tmp_path / "w1").mkdir(), (tmp_path / "w2").mkdir()
    program = fixtures_dir / "bert_encoder.pt2"
    cold = source.load(program, tmp_path / "w1", cache=cache)
    monkeypatch.setattr(torch_source, "export_onnx", _never)
    monkeypatch.setattr(source, "read_onnx", _never)
    warm = source.load(program, tmp_path / "w2", cache=cache)
    assert _fields(warm) == _fields(cold)
    assert warm.prepared.onnx_path.read_bytes() == cold.prepared.onnx_path.read_bytes()
    assert warm.prepared.torch_module is not None and warm.example_feeds.keys() == \
        cold.example_feeds.keys()


def test_warm_run_numerics_are_the_cold_runs_with_fewer_children(tiny_onnx, tmp_path,
                                                                 fake_registry, monkeypatch):
    started: list[str] = []
    opened, ran = worker.WarmSession.__init__, worker.run_session

    def count_warm(self, **kw):
        started.append(f"warm:{kw['name']}")
        opened(self, **kw)

    def count_run(**kw):
        started.append(f"run:{kw['name']}")
        return ran(**kw)

    monkeypatch.setattr(worker.WarmSession, "__init__", count_warm)
    monkeypatch.setattr(worker, "run_session", count_run)
    monkeypatch.setattr(check, "run_session", count_run)
    kw = dict(targets=["fake", "fake2"], registry=fake_registry, iterations=2, warmup=0)
    cold = mtconvert.convert(tiny_onnx, out_dir=tmp_path / "a", **kw)
    started.clear()
    warm = mtconvert.convert(tiny_onnx, out_dir=tmp_path / "b", **kw)
    assert cold.ok and warm.ok
    for name in ("fake", "fake2"):
        c, w = cold.targets[name], warm.targets[name]
        assert w.conversion.cached and not c.conversion.cached
        assert w.numerics == c.numerics and w.latency_vs_reference["rounds"] >= 2
    # one reference child for its own run and both timings, one child per target
    assert sorted(started) == ["warm:fake", "warm:fake2", "warm:reference"]


@pytest.mark.slow
def test_real_warm_run_has_the_cold_numerics(fixtures_dir, tmp_path):
    kw = dict(targets=["onnx-mobile", "ncnn"], iterations=3, warmup=1, threads=1)
    cold = mtconvert.convert(fixtures_dir / "bert_encoder.onnx", out_dir=tmp_path / "a", **kw)
    warm = mtconvert.convert(fixtures_dir / "bert_encoder.onnx", out_dir=tmp_path / "b", **kw)
    for name in ("onnx-mobile", "ncnn"):
        c, w = cold.targets[name], warm.targets[name]
        assert c.status == w.status == "passed" and w.conversion.cached
        assert w.numerics == c.numerics and w.memory.peak_rss_mb > 0
        assert w.latency is not None and "ratio_p50" in w.latency_vs_reference


def test_a_source_computing_nan_is_still_refused(tmp_path, fake_registry):
    """The reference's own run comes from the shared reference child now: a NaN there is
    still the source's error (exit 2), named in one line."""
    import onnx
    from onnx import TensorProto, helper

    from mtconvert.errors import ModelLoadError

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["n"]),
             helper.make_node("Sqrt", ["n"], ["y"])]  # sqrt(-|x|): NaN for x != 0
    model = helper.make_model(helper.make_graph(nodes, "nan", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "nan.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelLoadError, match="NaN/Inf"):
        mtconvert.convert(path, targets=["fake"], out_dir=tmp_path / "o",
                          registry=fake_registry, iterations=2, warmup=0)
