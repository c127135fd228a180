"""A target's generation judged against the reference: teacher-forced logits under the
precision's tolerances, the free-running greedy tokens compared step by step (a near-tie in the
reference is a tie, not a failure), latency of prefill and decode, the KV-cache memory. Pure
numpy; returns the report's ``targets[].generation`` section and the reasons it failed."""
from __future__ import annotations

from typing import Any

import numpy as np

from mtconvert.validators import gates
from mtconvert.validators.tolerances import Tolerance


def near_tie(row: np.ndarray, tol: Tolerance, err: float) -> bool:
    """Are the reference's top-2 logits closer than the error the tolerance allows on both
    (atol + rtol·|logit| each)? Without an absolute bound (int8), closer than twice the
    target's own error at this step."""
    top2 = np.sort(row)[-2:]
    gap = float(top2[1] - top2[0])
    if tol.atol is None and tol.rtol is None:
        return gap <= 2.0 * err
    allowed = (tol.atol or 0.0) + (tol.rtol or 0.0) * float(np.max(np.abs(top2)))
    return gap <= 2.0 * allowed


def judge(ref: Any, forced_logits: np.ndarray, free_tokens: list[int], step_ms: list[float],
          tol: Tolerance, cache_bytes: int, max_cache: int,
          latency_unavailable: str | None) -> tuple[dict[str, Any], list[str]]:
    p, n = len(ref.prompt), len(ref.tokens)
    forced = gates.judge({"logits": ref.logits}, {"logits": forced_logits}, lambda _n: tol)
    m = forced.outputs["logits"]
    errors = np.abs(np.asarray(forced_logits, np.float64) - ref.logits).max(axis=1)
    step_err = [float(e) for e in errors[p - 1:]]  # nan where the target's logits are not finite
    agree = [a == b for a, b in zip(ref.tokens, free_tokens, strict=True)]
    first = next((i for i, ok in enumerate(agree) if not ok), None)
    tie = first is not None and near_tie(ref.logits[p - 1 + first], tol, step_err[first])
    reasons = []
    if not forced.passed:
        reasons.append(f"teacher-forced logits: {m['reason']}")
    if first is not None and not tie:
        reasons.append(f"greedy decode: step {first} gave token {free_tokens[first]}, the "
                       f"reference {ref.tokens[first]}")
    section = {
        "steps": n, "tokens_agree": sum(agree) / n, "first_mismatch_step": first,
        "ties": int(tie), "first_mismatch_is_tie": tie if first is not None else None,
        "prompt_tokens": list(ref.prompt), "reference_tokens": list(ref.tokens),
        "target_tokens": list(free_tokens), "step_max_abs_error": [_finite(e) for e in step_err],
        "prefill_max_abs_error": _finite(float(errors[:p - 1].max())) if p > 1 else None,
        "teacher_forced": {"passed": forced.passed, "reason": m.get("reason"),
                           "max_abs": m.get("max_abs"), "cosine": m.get("cosine"),
                           "top1_agreement": m.get("top1_agreement"),
                           "tolerance": tol.to_dict()},
        "passed": not reasons, "max_cache": max_cache, "kv_cache_bytes": cache_bytes,
    } | _latency(step_ms, p, latency_unavailable)
    return section, reasons


def _finite(x: float) -> float | None:
    """An error for the JSON report: None where it is not finite (NaN/Inf logits; the
    teacher-forced check names them)."""
    return x if np.isfinite(x) else None


def _latency(step_ms: list[float], prompt_len: int, unavailable: str | None) -> dict[str, Any]:
    """Time to first token: the prompt's steps (prefill, one token per step). Per-token
    decode: every later step. Each step is the session's run and the host's cache update."""
    if unavailable:
        return {"latency_unavailable": unavailable}
    decode = step_ms[prompt_len:]
    out: dict[str, Any] = {"time_to_first_token_ms": round(sum(step_ms[:prompt_len]), 4)}
    if decode:
        out |= {"decode_ms_p50": round(float(np.percentile(decode, 50)), 4),
                "decode_ms_p90": round(float(np.percentile(decode, 90)), 4),
                "decode_samples": len(decode)}
    return out
