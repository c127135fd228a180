"""Task accuracy on labelled data, and for embedding models without labels, the agreement of
nearest-neighbour rankings between the reference and a target. Pure numpy."""
from __future__ import annotations

from typing import Any

import numpy as np

IGNORE = -100  # per-token labels: positions that do not count (Hugging Face's convention)


def classification(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of items (labels [N]) or tokens (labels [N, S]) whose argmax is the label."""
    pred = np.asarray(logits).argmax(axis=-1)
    labels = np.asarray(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"labels of shape {labels.shape} do not fit predictions of shape "
                         f"{pred.shape} (logits {np.asarray(logits).shape})")
    keep = labels != IGNORE
    if not keep.any():
        raise ValueError("every label is ignored (-100)")
    return float((pred[keep] == labels[keep]).mean())


def embeddings(out: np.ndarray) -> np.ndarray:
    """[N, D] unit vectors: [N, D] as is, [N, S, D] mean-pooled over S."""
    e = np.asarray(out, np.float64)
    if e.ndim == 3:
        e = e.mean(axis=1)
    if e.ndim != 2:
        raise ValueError(f"embeddings must be [N, D] or [N, S, D], not {e.shape}")
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def retrieval_overlap(ref: np.ndarray, tgt: np.ndarray, k: int = 5) -> tuple[float, int]:
    """Mean share of each item's k nearest neighbours (cosine, itself excluded) that the target
    finds as the reference does; and the k used (at most N - 1)."""
    a, b = embeddings(ref), embeddings(tgt)
    k = min(k, len(a) - 1)
    if k < 1:
        raise ValueError("retrieval overlap needs at least 2 items")
    sa, sb = a @ a.T, b @ b.T
    np.fill_diagonal(sa, -np.inf)
    np.fill_diagonal(sb, -np.inf)
    na, nb = np.argsort(-sa, axis=1)[:, :k], np.argsort(-sb, axis=1)[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(na, nb)])), k


def judge(metric: str, reference: float, target: float, max_drop_points: float,
          items: int) -> dict[str, Any]:
    """The gate: the target's metric may fall below the reference's by ``max_drop_points``
    percentage points at most."""
    drop = round((reference - target) * 100, 4)
    return {"metric": metric, "reference": round(reference, 6), "target": round(target, 6),
            "drop_points": drop, "max_drop_points": max_drop_points, "items": items,
            "passed": bool(drop <= max_drop_points + 1e-9)}
