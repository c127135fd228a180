import dataclasses
import math

import numpy as np
import pytest

from mtconvert.validators.compare import (PROFILES, Tolerance, ToleranceOverrides,
                                          compare_output, metrics, worst)


def test_metrics_match_hand_computation():
    ref = np.array([1.0, -2.0, 3.0, 4.0], dtype=np.float32)
    out = ref + np.array([0.1, 0.0, -0.2, 0.0], dtype=np.float32)
    m = metrics(ref, out)
    assert m["max_abs"] == pytest.approx(0.2, rel=1e-6)
    assert m["mean_abs"] == pytest.approx(0.075, rel=1e-6)
    assert m["rmse"] == pytest.approx(math.sqrt((0.01 + 0.04) / 4), rel=1e-6)
    assert m["max_rel"] == pytest.approx(0.1, rel=1e-5)
    r64, o64 = ref.astype(np.float64), out.astype(np.float64)
    cos = float(np.dot(r64, o64) / (np.linalg.norm(r64) * np.linalg.norm(o64)))
    assert m["cosine"] == pytest.approx(cos, rel=1e-9)
    assert m["snr_db"] == pytest.approx(10 * math.log10(30.0 / 0.05), rel=1e-5)


def test_exact_match_has_no_finite_snr_and_passes():
    ref = np.arange(6, dtype=np.float32).reshape(2, 3)
    res = compare_output("y", ref, ref.copy(), PROFILES["fp32"])
    assert res.passed and res.metrics["max_abs"] == 0 and res.metrics["snr_db"] is None


def test_fp32_profile_sees_one_percent_change():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 10)).astype(np.float32)
    assert compare_output("y", ref, ref + 1e-6, PROFILES["fp32"]).passed
    res = compare_output("y", ref, ref * 1.01, PROFILES["fp32"])
    assert not res.passed and "outside" in res.reason


def test_cosine_bound_alone():
    ref = np.ones(8, dtype=np.float32)
    out = ref.copy()
    out[0] = -1
    res = compare_output("y", ref, out, Tolerance(None, None, 0.99))
    assert not res.passed and "cosine" in res.reason


def test_nan_in_target_fails_with_count():
    ref = np.ones((2, 2), np.float32)
    out = ref.copy()
    out[0, 1] = np.nan
    res = compare_output("y", ref, out, Tolerance(None, None, None))
    assert not res.passed and "1 non-finite" in res.reason


@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_inf_in_target_fails_with_count_and_no_snr(bad):
    ref = np.ones((2, 2), np.float32)
    out = ref.copy()
    out[1, 0] = bad
    res = compare_output("y", ref, out, PROFILES["fp32"])
    assert not res.passed and "1 non-finite" in res.reason
    assert res.metrics["snr_db"] is None and res.metrics["max_abs"] is None


def test_fp32_snr_bound_sees_a_spread_error_under_atol():
    """A relative error of 5e-5 on every value stays under atol/rtol 1e-4 with cosine ~1, but
    is SNR 86 dB, below the fp32 bound of 100 dB; a correct conversion's 1e-6 is 120 dB."""
    ref = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float64)
    sign = np.sign(np.random.default_rng(1).standard_normal(ref.shape))
    spread = compare_output("y", ref, ref * (1 + 5e-5 * sign), PROFILES["fp32"])
    assert not spread.passed and "SNR" in spread.reason
    without = dataclasses.replace(PROFILES["fp32"], min_snr_db=None)
    assert compare_output("y", ref, ref * (1 + 5e-5 * sign), without).passed
    assert compare_output("y", ref, ref * (1 + 1e-6 * sign), PROFILES["fp32"]).passed


def test_shape_mismatch_and_missing_output_fail():
    ref = np.ones((2, 3), np.float32)
    assert "shape" in compare_output("y", ref, np.ones((3, 2)), PROFILES["fp32"]).reason
    assert not compare_output("y", ref, None, PROFILES["fp32"]).passed


def test_overrides_global_then_per_output():
    ov = ToleranceOverrides(atol=1e-2, per_output={"logits": {"atol": 0.5, "min_cosine": 0.9}})
    assert ov.resolve("fp32", "other").atol == 1e-2
    assert ov.resolve("fp32", "other").rtol == PROFILES["fp32"].rtol
    t = ov.resolve("fp32", "logits")
    assert (t.atol, t.min_cosine) == (0.5, 0.9)
    with pytest.raises(ValueError):
        ov.resolve("fp8", "x")


def test_worst_prefers_failing_output():
    ref = np.zeros(4, np.float32)
    a = compare_output("a", ref, ref + 0.5, Tolerance(1.0, None, None))  # passes, larger error
    b = compare_output("b", ref, ref + 0.1, Tolerance(0.01, None, None))  # fails
    assert worst([a, b]).name == "b"
    assert worst([a]).name == "a" and worst([]) is None


def test_topk_agreement_on_logits_only():
    from mtconvert.validators.compare import is_logits, topk_agreement

    ref = np.array([[0.1, 0.9, 0.3, 0.2, 0.0, 0.5], [0.8, 0.1, 0.2, 0.3, 0.4, 0.0]])
    out = ref.copy()
    out[1] = [0.1, 0.8, 0.2, 0.3, 0.4, 0.0]  # row 1's arg-max moves from 0 to 1
    assert topk_agreement(ref, out, 1) == 0.5
    assert topk_agreement(ref, ref, 5) == 1.0
    assert is_logits("logits", (2, 6)) and not is_logits("last_hidden_state", (2, 6))
    res = compare_output("logits", ref.astype(np.float32), out.astype(np.float32),
                         Tolerance(None, None, None))
    assert res.metrics["top1_agreement"] == 0.5 and "top5_agreement" in res.metrics
    assert "top1_agreement" not in compare_output("hidden", ref, ref, PROFILES["fp32"]).metrics
