"""Pipeline behaviour with the fake backend: statuses, isolation, atomic outputs, report."""
import json

import numpy as np
import pytest

import mtconvert
from mtconvert.errors import InputGenerationError, UsageError


def _convert(model, out, registry, targets=("fake",), **kw):
    kw.setdefault("iterations", 3)
    kw.setdefault("warmup", 1)
    return mtconvert.convert(model, targets=list(targets), out_dir=out, registry=registry, **kw)


def _entries(folder):
    return sorted(p.name for p in folder.iterdir())


def test_passing_target_report(tiny_onnx, tmp_path, fake_registry):
    report = _convert(tiny_onnx, tmp_path / "out", fake_registry)
    assert report.ok and report.exit_code == 0
    t = report.targets["fake"]
    assert t.status == "passed" and t.reason is None
    assert t.numerics.passed and t.numerics.worst["output"] == "logits"
    assert t.numerics.outputs["logits"]["max_abs"] == 0.0
    assert t.numerics.outputs["logits"]["tolerance"]["atol"] == 1e-4
    assert t.latency.iterations >= 3 and t.latency.threads == report.settings["threads"]
    assert t.latency_vs_reference["rounds"] >= 2  # timed interleaved with the reference
    assert t.memory.peak_rss_mb >= t.memory.baseline_rss_mb > 0
    assert t.conversion.steps == ("copy source",)
    assert [a.bytes for a in t.artifacts] == [tiny_onnx.stat().st_size]
    assert _entries(tmp_path / "out") == ["tiny.fake", "tiny.fake.log"]
    assert report.source.sha256 and report.source.input_shapes == {
        "input_ids": [1, 32], "attention_mask": [1, 32]}
    assert report.reference.runtime == "onnxruntime-cpu"


def test_backends_see_the_validation_shapes(tiny_onnx, tmp_path, fake_registry, monkeypatch):
    from tests.fake_backend import FakeBackend

    seen, original = {}, FakeBackend.convert

    def spy(self, source, out_dir, opts):
        seen.update(source.input_shapes)
        return original(self, source, out_dir, opts)

    monkeypatch.setattr(FakeBackend, "convert", spy)
    _convert(tiny_onnx, tmp_path, fake_registry, input_shapes={"input_ids": "2x8"})
    assert seen == {"input_ids": (2, 8), "attention_mask": (2, 8)}


def test_numeric_mismatch_is_a_failed_result(tiny_onnx, tmp_path, fake_registry):
    report = _convert(tiny_onnx, tmp_path, fake_registry, extra={"fake": {"noise": 0.05}})
    t = report.targets["fake"]
    assert t.status == "failed" and "logits" in t.reason and report.exit_code == 1
    assert t.numerics.outputs["logits"]["max_abs"] == pytest.approx(0.05, rel=1e-3)


def test_crash_is_one_targets_error_and_others_finish(tiny_onnx, tmp_path, fake_registry):
    report = _convert(tiny_onnx, tmp_path, fake_registry, targets=("fake", "fake2"),
                      extra={"fake": {"crash": True}})
    assert report.targets["fake"].status == "error"
    assert "SIGSEGV" in report.targets["fake"].reason
    assert report.targets["fake2"].status == "passed"
    assert report.exit_code == 3


@pytest.mark.parametrize("knob,needle", [("kill", "SIGKILL"), ("hang", "timed out after 8 s")])
def test_kill_and_timeout_are_one_targets_error(knob, needle, tiny_onnx, tmp_path,
                                                fake_registry):
    report = _convert(tiny_onnx, tmp_path, fake_registry, targets=("fake", "fake2"),
                      extra={"fake": {knob: True}}, timeout=8)
    assert report.targets["fake"].status == "error" and needle in report.targets["fake"].reason
    assert report.targets["fake2"].status == "passed" and report.exit_code == 3


def test_conversion_error_leaves_only_the_log(tiny_onnx, tmp_path, fake_registry):
    out = tmp_path / "out"
    report = _convert(tiny_onnx, out, fake_registry, extra={"fake": {"convert_error": True}})
    t = report.targets["fake"]
    assert t.status == "error" and "fake tool failed" in t.reason and report.exit_code == 3
    assert _entries(out) == ["tiny.fake.log"]  # no half-written artifact, no staging folder
    assert t.log and t.log.endswith("tiny.fake.log")


def test_lint_error_fails_target(tiny_onnx, tmp_path, fake_registry):
    report = _convert(tiny_onnx, tmp_path, fake_registry, extra={"fake": {"lint_error": True}})
    t = report.targets["fake"]
    assert t.status == "failed" and "FakeOp" in t.reason
    assert t.findings[0]["severity"] == "error"


def test_unsupported_precision_is_skipped_not_passed(tiny_onnx, tmp_path, fake_registry):
    report = _convert(tiny_onnx, tmp_path, fake_registry, precision="int8")
    assert report.targets["fake"].status == "skipped" and report.exit_code == 1
    assert "supports precision fp32, fp16" in report.targets["fake"].reason


def test_user_inputs_file_is_used(tiny_onnx, tmp_path, fake_registry):
    npz = tmp_path / "in.npz"
    np.savez(npz, input_ids=np.array([[1, 2, 3]]), attention_mask=np.array([[1, 1, 0]]))
    report = _convert(tiny_onnx, tmp_path / "o", fake_registry, inputs=npz)
    assert report.ok and report.source.input_shapes["input_ids"] == [1, 3]
    assert report.source.input_values["input_ids"] == "from in.npz"
    np.savez(npz, input_ids=np.array([[1, 2, 3]]))
    with pytest.raises(InputGenerationError, match="lacks attention_mask"):
        _convert(tiny_onnx, tmp_path / "o", fake_registry, inputs=npz)


def test_same_command_twice_gives_identical_numerics(tiny_onnx, tmp_path, fake_registry):
    a, b = (_convert(tiny_onnx, tmp_path / n, fake_registry, extra={"fake": {"noise": 1e-3}})
            for n in ("a", "b"))
    assert a.targets["fake"].numerics == b.targets["fake"].numerics


def test_rerun_replaces_artifacts(tiny_onnx, tmp_path, fake_registry):
    out = tmp_path / "out"
    _convert(tiny_onnx, out, fake_registry)
    (out / "tiny.fake").write_bytes(b"stale")
    _convert(tiny_onnx, out, fake_registry)
    assert (out / "tiny.fake").read_bytes() == tiny_onnx.read_bytes()
    assert _entries(out) == ["tiny.fake", "tiny.fake.log"]


def test_bad_options_raise_usage_errors(tiny_onnx, tmp_path, fake_registry):
    with pytest.raises(UsageError, match="precision"):
        _convert(tiny_onnx, tmp_path, fake_registry, precision="fp8")
    with pytest.raises(UsageError, match="unknown target"):
        _convert(tiny_onnx, tmp_path, fake_registry, targets=("nope",))
    with pytest.raises(TypeError, match="unexpected option"):
        _convert(tiny_onnx, tmp_path, fake_registry, atoll=1)
    with pytest.raises(UsageError, match="atol"):
        _convert(tiny_onnx, tmp_path, fake_registry, atol="x")


def test_per_output_tolerance_override(tiny_onnx, tmp_path, fake_registry):
    report = _convert(tiny_onnx, tmp_path, fake_registry, extra={"fake": {"noise": 0.05}},
                      atol={"logits": 0.1})
    assert not report.ok  # the fp32 cosine bound still applies to logits
    assert "cosine" in report.targets["fake"].reason
    report = _convert(tiny_onnx, tmp_path, fake_registry, extra={"fake": {"noise": 0.05}},
                      atol={"logits": 0.1}, min_cosine={"logits": 0.9})
    assert not report.ok and "SNR" in report.targets["fake"].reason  # and the SNR bound
    report = _convert(tiny_onnx, tmp_path, fake_registry, extra={"fake": {"noise": 0.05}},
                      atol={"logits": 0.1}, min_cosine={"logits": 0.9}, min_snr_db={"logits": 0})
    assert report.ok
    assert report.targets["fake"].numerics.outputs["logits"]["tolerance"]["atol"] == 0.1


def test_report_json_is_valid_json(tiny_onnx, tmp_path, fake_registry):
    report = _convert(tiny_onnx, tmp_path, fake_registry)
    assert json.loads(report.to_json())["targets"][0]["status"] == "passed"


def test_shape_sweep_passes_fails_and_skips(tiny_onnx, tmp_path, fake_registry):
    report = _convert(tiny_onnx, tmp_path, fake_registry, targets=("fake", "fake-fixed"),
                      seq_lens=(8, 24), batch_sizes=(1, 2))
    t = report.targets["fake"]
    assert t.status == "passed" and t.input_shapes["input_ids"] == [1, 8]
    assert [e["input_shapes"]["input_ids"] for e in t.sweep] == [[1, 24], [2, 8], [2, 24]]
    assert all(e["status"] == "passed" for e in t.sweep)
    fixed = report.targets["fake-fixed"]
    assert fixed.status == "passed"  # made for 1x8, and says so for the other shapes
    assert {e["status"] for e in fixed.sweep} == {"skipped"}
    assert "fixed to input_ids=1x8" in fixed.sweep[0]["reason"]


def test_shape_dependent_bug_fails_that_shape(tiny_onnx, tmp_path, fake_registry):
    report = _convert(tiny_onnx, tmp_path, fake_registry, batch_sizes=(1, 3),
                      extra={"fake": {"batch_noise": True}})
    t = report.targets["fake"]
    assert t.status == "failed" and report.exit_code == 1
    assert t.numerics.passed  # the primary shape is right...
    assert t.sweep[0]["status"] == "failed"  # ...batch 3 is not
    assert "shape input_ids=3x32" in t.reason


def test_sweep_needs_dynamic_axes_and_generated_inputs(tiny_onnx, tmp_path, fake_registry):
    import numpy as np

    np.savez(tmp_path / "in.npz", input_ids=np.ones((1, 4), np.int64),
             attention_mask=np.ones((1, 4), np.int64))
    with pytest.raises(UsageError, match="cannot be combined with --inputs"):
        _convert(tiny_onnx, tmp_path, fake_registry, seq_lens=(8,), inputs=tmp_path / "in.npz")
    from tests.converter.hostile_corpus import relu

    with pytest.raises(UsageError, match="no input has a dynamic axis 1"):
        _convert(relu(tmp_path / "s.onnx"), tmp_path, fake_registry, seq_lens=(8,))


def test_localization_names_the_first_broken_operator(tiny_onnx, tmp_path, fake_registry):
    report = _convert(tiny_onnx, tmp_path, fake_registry, extra={"fake": {"noise_if_op": "Div"}})
    t = report.targets["fake"]
    assert t.status == "failed"
    first = t.diagnostics["first_divergence"]
    assert first["op_type"] == "Div" and t.diagnostics["exact"]
    assert first["max_abs"] == pytest.approx(0.5, rel=1e-3)
    assert t.diagnostics["last_match"] is not None and t.diagnostics["probes"] <= 12


def test_localization_by_intermediate_tensors(tiny_onnx, tmp_path, fake_registry):
    """A target whose intermediates are addressable: one traced run, no re-conversion."""
    report = _convert(tiny_onnx, tmp_path, fake_registry, targets=("fake-traced",),
                      extra={"fake-traced": {"noise_if_op": "Div"}})
    t = report.targets["fake-traced"]
    assert t.status == "failed"
    d = t.diagnostics
    assert d["method"] == "intermediate tensors matched by value" and "probes" not in d
    first = d["first_divergence"]
    assert first["op_type"] == "Div" and d["exact"] and first["target"].startswith("fake/")
    assert first["max_abs"] == pytest.approx(0.5, rel=1e-3)


def test_first_nonfinite_op_of_a_traced_target(tiny_onnx, tmp_path, fake_registry):
    report = _convert(tiny_onnx, tmp_path, fake_registry, targets=("fake-traced",),
                      extra={"fake-traced": {"inf_if_op": "Div"}})
    t = report.targets["fake-traced"]
    assert t.status == "failed" and "non-finite" in t.reason
    op = t.diagnostics["first_nonfinite_op"]
    assert op["op_type"] == "Div" and op["inf"] and op["op"].startswith("fake/")


def test_localize_on_a_passing_run(tiny_onnx, tmp_path, fake_registry):
    t = _convert(tiny_onnx, tmp_path, fake_registry, localize=True).targets["fake"]
    assert t.status == "passed" and "every conclusive probe matches" in t.diagnostics["result"]
    assert all(h["verdict"] == "matches" for h in t.diagnostics["history"])


def test_sparse_on_a_source_without_pruned_weights_says_there_is_nothing_to_store(
        tiny_onnx, tmp_path, fake_registry):
    plain = _convert(tiny_onnx, tmp_path / "plain", fake_registry).targets["fake"]
    assert plain.sparsity is None  # not asked, nothing said
    t = _convert(tiny_onnx, tmp_path / "out", fake_registry, sparse=True).targets["fake"]
    assert t.status == "passed"  # not a failure
    assert t.sparsity["storage"] == "dense"
    assert t.sparsity["storage_note"].startswith("nothing to store sparsely")
