"""Numeric comparison of a target's outputs against the reference's.

Per output: max abs, max relative, mean abs, RMSE, cosine similarity, SNR in dB. An output
passes when every element is within ``atol + rtol * |reference|`` (numpy.allclose semantics)
and the cosine similarity is at least ``min_cosine``; a bound that is None is not checked.
Non-finite values in the target where the reference is finite always fail. Each comparison
also carries a log-binned histogram of the absolute errors (``abs_error_histogram``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtconvert.validators.tolerances import (  # noqa: F401 - the comparison's tolerances
    KEYS, PROFILES, Tolerance, ToleranceOverrides)


@dataclass(frozen=True)
class OutputComparison:
    name: str
    passed: bool
    reason: str | None
    metrics: dict[str, Any]  # floats (None: undefined), and abs_error_histogram (a dict)
    tolerance: Tolerance

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason, **self.metrics,
                "tolerance": self.tolerance.to_dict()}


def metrics(ref: np.ndarray, out: np.ndarray) -> dict[str, float | None]:
    """Error metrics of ``out`` against ``ref`` (same shape), as plain floats."""
    r = np.asarray(ref, dtype=np.float64).ravel()
    o = np.asarray(out, dtype=np.float64).ravel()
    if r.size == 0:
        return {k: 0.0 for k in ("max_abs", "max_rel", "mean_abs", "rmse")} | {
            "cosine": 1.0, "snr_db": None}
    err = np.abs(o - r)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rel = err / np.maximum(np.abs(r), np.finfo(np.float64).tiny)
    signal_power = float(np.sum(r * r))
    noise_power = float(np.sum(err * err))
    ratio = signal_power / noise_power if noise_power > 0 else 0.0
    snr = 10.0 * math.log10(ratio) if 0.0 < ratio < math.inf else None
    # None: exact match, a zero reference, or a non-finite error: no finite SNR
    return {"max_abs": _f(err.max()), "max_rel": _f(rel.max()), "mean_abs": _f(err.mean()),
            "rmse": _f(math.sqrt(noise_power / r.size)), "cosine": _cosine(r, o),
            "snr_db": snr}


def _f(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _cosine(r: np.ndarray, o: np.ndarray) -> float | None:
    nr, no = float(np.linalg.norm(r)), float(np.linalg.norm(o))
    if not (math.isfinite(nr) and math.isfinite(no)):
        return None
    if nr == 0.0 and no == 0.0:
        return 1.0
    if nr == 0.0 or no == 0.0:
        return 0.0
    return float(np.dot(r, o) / (nr * no))


def is_logits(name: str, shape: tuple[int, ...]) -> bool:
    """Outputs whose last axis is a class or vocabulary axis: named like logits/scores."""
    lname = name.lower()
    return len(shape) >= 1 and shape[-1] >= 2 and ("logit" in lname or "score" in lname)


def topk_agreement(ref: np.ndarray, out: np.ndarray, k: int) -> float:
    """Mean over positions (all axes but the last) of |top-k(ref) & top-k(out)| / k;
    for k=1, the fraction of positions whose arg-max agrees."""
    k = min(k, ref.shape[-1])
    r = np.argsort(-ref.reshape(-1, ref.shape[-1]), axis=1, kind="stable")[:, :k]
    o = np.argsort(-out.reshape(-1, out.shape[-1]), axis=1, kind="stable")[:, :k]
    hits = [len(set(a) & set(b)) / k for a, b in zip(r.tolist(), o.tolist(), strict=True)]
    return float(np.mean(hits))


def compare_output(name: str, ref: np.ndarray, out: np.ndarray | None,
                   tol: Tolerance) -> OutputComparison:
    if out is None:
        return OutputComparison(name, False, "target did not produce this output", {}, tol)
    out = np.asarray(out)
    if tuple(out.shape) != tuple(ref.shape):
        return OutputComparison(name, False,
                                f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}", {}, tol)
    m: dict[str, Any] = metrics(ref, out)
    if is_logits(name, tuple(ref.shape)) and np.all(np.isfinite(out)):
        m = m | {"top1_agreement": topk_agreement(ref, out, 1),
                 "top5_agreement": topk_agreement(ref, out, 5)}
    verdict = _verdict(ref, out, m, tol)
    m["abs_error_histogram"] = error_histogram(ref, out)
    return OutputComparison(name, *verdict, m, tol)


def error_histogram(ref: np.ndarray, out: np.ndarray, bins_per_decade: int = 4,
                    max_decades: int = 12) -> dict[str, Any]:
    """The distribution of ``|out - ref|``, compact and JSON-able: ``counts`` of the nonzero
    finite errors in log-spaced bins whose ``edges`` (one more than the counts, rounded to 4
    significant digits) are powers of 10 in steps of 1/``bins_per_decade`` decade, spanning the
    errors seen (at most ``max_decades`` decades below the largest; smaller errors count in the
    first bin), plus the errors a log axis cannot show: ``zero`` (exact matches) and
    ``nonfinite`` (NaN/Inf)."""
    err = np.abs(np.asarray(out, dtype=np.float64).ravel()
                 - np.asarray(ref, dtype=np.float64).ravel())
    with np.errstate(invalid="ignore"):
        finite = err[np.isfinite(err)]
    positive = finite[finite > 0]
    hist: dict[str, Any] = {"edges": [], "counts": [], "zero": int(finite.size - positive.size),
                            "nonfinite": int(err.size - finite.size)}
    if positive.size:
        steps = np.floor(np.log10(positive) * bins_per_decade).astype(np.int64)
        hi = int(steps.max()) + 1
        lo = max(int(steps.min()), hi - max_decades * bins_per_decade)
        counts = np.bincount(np.clip(steps, lo, hi - 1) - lo, minlength=hi - lo)
        hist["edges"] = [float(f"{10.0 ** (k / bins_per_decade):.4g}") for k in range(lo, hi + 1)]
        hist["counts"] = [int(c) for c in counts]
    return hist


def _verdict(ref: np.ndarray, out: np.ndarray, m: dict[str, float | None],
             tol: Tolerance) -> tuple[bool, str | None]:
    r = np.asarray(ref, dtype=np.float64)
    o = np.asarray(out, dtype=np.float64)
    bad = ~np.isfinite(o) & np.isfinite(r)
    if bad.any():
        return False, f"{int(bad.sum())} non-finite values (NaN/Inf) where the reference is finite"
    if tol.atol is not None or tol.rtol is not None:
        atol, rtol = tol.atol or 0.0, tol.rtol or 0.0
        finite = np.isfinite(r)
        excess = np.abs(o - r)[finite] - (atol + rtol * np.abs(r[finite]))
        if excess.size and excess.max() > 0:
            n = int((excess > 0).sum())
            return False, (f"{n} of {r.size} values outside atol={atol:g} rtol={rtol:g} "
                           f"(max abs error {m['max_abs']:.3g})")
    if tol.min_cosine is not None:
        cos = m.get("cosine")
        if cos is None or cos < tol.min_cosine:
            shown = "undefined" if cos is None else f"{cos:.6f}"
            return False, f"cosine similarity {shown} < {tol.min_cosine:g}"
    snr = m.get("snr_db")
    if tol.min_snr_db is not None and snr is not None and snr < tol.min_snr_db:
        return False, (f"SNR {snr:.1f} dB < {tol.min_snr_db:g} dB (relative L2 error "
                       f"{10 ** (-snr / 20):.2g}: an error spread over many values)")
    return True, None


def worst(results: list[OutputComparison]) -> OutputComparison | None:
    """The failing output if any, else the one with the largest max abs error."""
    if not results:
        return None
    failing = [r for r in results if not r.passed]
    pool = failing or results
    return max(pool, key=lambda r: (r.metrics.get("max_abs") or 0.0))
