"""Latency a gate can trust (target and reference timed interleaved, each warm in its own
child) and baselines (--save-baseline / --baseline): statistics, gates, and real runs through
the fake backend (ONNX Runtime underneath)."""
import json

import numpy as np
import pytest

import mtconvert
from mtconvert.validators import gates, latency


def _rounds(rng, median, n_rounds, per, noise):
    return [list(median * (1 + noise * rng.standard_normal(per))) for _ in range(n_rounds)]


def test_interleaved_ratio_and_its_interval():
    rng = np.random.default_rng(1)
    drift = np.linspace(1.0, 2.0, 10)  # the machine slows down during the run: both sides see it
    ref = [list(10 * d * (1 + 0.01 * rng.standard_normal(4))) for d in drift]
    tgt = [list(8 * d * (1 + 0.01 * rng.standard_normal(4))) for d in drift]
    stats = latency.interleaved(ref, tgt)
    assert abs(stats["ratio_p50"] - 0.8) < 0.01 and not stats["noisy"]
    assert stats["ci95"][0] <= 0.8 <= stats["ci95"][1]
    assert stats["reference_spread"] > 0.5  # the drift is visible per side, not in the ratio
    noisy = latency.interleaved(_rounds(rng, 10, 4, 3, 0.5), _rounds(rng, 10, 4, 3, 0.5))
    assert noisy["noisy"]


def test_regression_verdicts():
    assert gates.regression(1.3, 1.2, 1.4, 0.10) == "failed"
    assert gates.regression(1.0, 0.95, 1.05, 0.10) == "passed"
    assert gates.regression(1.1, 0.9, 1.3, 0.10) == "inconclusive"
    change, lo, hi = gates.median_ratio([2.0] * 50 + [2.1] * 50, [1.0] * 50 + [1.05] * 50)
    assert abs(change - 2.0) < 0.05 and lo <= change <= hi
    tol = {"atol": 1e-4, "min_cosine": 0.99999}
    assert gates.worsened({"max_abs": 5e-4, "cosine": 1.0}, {"max_abs": 1e-6, "cosine": 1.0}, tol)
    assert gates.worsened({"max_abs": 2e-5, "cosine": 1.0}, {"max_abs": 1e-6, "cosine": 1.0},
                          tol) is None


def _run(tiny_onnx, out, registry, **kw):
    return mtconvert.convert(tiny_onnx, targets=["fake"], out_dir=out, registry=registry,
                             iterations=6, warmup=1, **kw)


def test_target_is_timed_interleaved_with_the_reference(tiny_onnx, tmp_path, fake_registry):
    t = _run(tiny_onnx, tmp_path / "a", fake_registry, extra={"fake": {"delay_ms": 3}})
    vs = t.targets["fake"].latency_vs_reference
    assert vs["rounds"] >= 6 and vs["target_p50_ms"] > 3 > vs["reference_p50_ms"]
    assert vs["ratio_p50"] > 2 and vs["ci95"][0] <= vs["ratio_p50"] <= vs["ci95"][1]
    assert t.targets["fake"].latency.p50_ms == pytest.approx(vs["target_p50_ms"], rel=0.05)
    assert len(t.targets["fake"].latency.samples_ms) >= vs["rounds"] * vs["per_round"]


def test_baseline_passes_itself_and_fails_a_slower_or_larger_target(tiny_onnx, tmp_path,
                                                                    fake_registry):
    base = tmp_path / "base.json"
    first = _run(tiny_onnx, tmp_path / "a", fake_registry, save_baseline=base)
    assert first.ok and json.loads(base.read_text())["targets"]["fake"]["size_bytes"] > 0
    again = _run(tiny_onnx, tmp_path / "b", fake_registry, baseline=base)
    checks = {c["check"]: c for c in again.targets["fake"].baseline["checks"]}
    assert checks["size"]["status"] == "passed" and checks["latency"]["status"] != "failed"
    assert again.targets["fake"].baseline["same_source"]
    slow = _run(tiny_onnx, tmp_path / "c", fake_registry, baseline=base,
                extra={"fake": {"delay_ms": 5}})
    assert slow.targets["fake"].status == "failed" and slow.exit_code == 1
    assert "baseline: latency +" in slow.targets["fake"].reason
    data = json.loads(base.read_text())
    data["targets"]["fake"]["size_bytes"] //= 2
    base.write_text(json.dumps(data))
    larger = _run(tiny_onnx, tmp_path / "d", fake_registry, baseline=base,
                  max_size_growth=0.5)
    assert larger.targets["fake"].status == "failed" and "baseline: size" in larger.targets[
        "fake"].reason


def test_a_bad_baseline_file_is_a_usage_error(tiny_onnx, tmp_path, fake_registry):
    (tmp_path / "b.json").write_text("{}")
    with pytest.raises(mtconvert.MtConvertError, match="not a mtconvert baseline"):
        _run(tiny_onnx, tmp_path / "o", fake_registry, baseline=tmp_path / "b.json")
    assert not (tmp_path / "o").exists()


def test_baseline_checks_are_junit_testcases(tiny_onnx, tmp_path, fake_registry):
    from junitparser import Failure, JUnitXml

    from mtconvert import render

    base = tmp_path / "base.json"
    _run(tiny_onnx, tmp_path / "a", fake_registry, save_baseline=base)
    slow = _run(tiny_onnx, tmp_path / "b", fake_registry, baseline=base,
                extra={"fake": {"delay_ms": 5}})
    render.write_files(slow, {"report_junit": tmp_path / "j.xml"})
    cases = {c.name: c for suite in JUnitXml.fromfile(str(tmp_path / "j.xml")) for c in suite}
    assert isinstance(cases["baseline: latency"].result[0], Failure)
    assert not cases["baseline: size"].result  # passed
