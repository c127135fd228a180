"""First-divergence localization from intermediate tensors, where the target's are addressable
(TFLite with all tensors preserved, ncnn blob extraction, the MIL interpreter).

The target's tensors carry the runtime's own names (``model_19/tf.math.add/Add``, ``var_123``,
ncnn blob ``42``), not the source's, so they are matched to the source's by value: ONNX Runtime
computes every float tensor of the source graph on the same inputs, and a source tensor is
*matched* when some target tensor of the same size agrees with it under the run's tolerance,
taken as is, flattened, or with its axes permuted (TFLite keeps images channels-last). A source
tensor with no same-size target tensor is unobservable (fused away, or another shape).

An unmatched source tensor with no matched tensor within FUSION_HOPS consumers below it is
*broken*: what the target computes from there on differs. The first broken observable tensor in
topological order is the first divergence; fused intermediates that feed a matched tensor, and
side branches such as a mask rewritten to -1e4 that softmax absorbs, are not broken. One run of each side, no
re-conversion: seconds instead of bisection's minutes, and it works in validate mode too.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mtconvert.validators import compare

MAX_PERMUTED_RANK = 5
# An unmatched tensor with a matched one at most this many consumers below is taken as fused
# away (a decomposed GELU is 5 ops, of which a target keeps the last); not further, because a
# real divergence can also be absorbed far downstream (near-uniform attention hides a small
# change in a later layer's softmax) while the residual path carries it to the output.
FUSION_HOPS = 6


@dataclass
class Tensor:
    name: str  # tensor name (source: the ONNX tensor; target: the runtime's)
    op: str  # producing node or layer
    op_type: str
    value: np.ndarray
    parents: list[int] = field(default_factory=list)  # source only: indices of input tensors


def source_tensors(onnx_path: Path, feeds: dict[str, np.ndarray],
                   threads: int = 1) -> list[Tensor]:
    """Every float tensor a node of the source graph computes (ONNX Runtime, CPU), in
    topological order, with each one's parents among them."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    typed = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    known = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for out in node.output:
            if out and out not in known:
                model.graph.output.append(typed.get(out) or onnx.helper.ValueInfoProto(name=out))
                known.add(out)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    values = dict(zip(names, sess.run(None, {k: v for k, v in feeds.items() if k in wanted}),
                      strict=True))
    found: list[Tensor] = []
    index: dict[str, int] = {}
    for node in model.graph.node:
        parents = [index[i] for i in node.input if i in index]
        for out in node.output:
            value = values.get(out)
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                index[out] = len(found)
                found.append(Tensor(out, node.name or out, node.op_type, value, parents))
    return found


def first_nonfinite(target: list[Tensor]) -> dict[str, Any] | None:
    """The first target tensor, in execution order, holding NaN or Inf."""
    for t in target:
        finite = np.isfinite(t.value)
        if not finite.all():
            return {"op": t.name, "op_type": t.op_type, "dtype": str(t.value.dtype),
                    "inf": bool(np.isinf(t.value).any()), "nan": bool(np.isnan(t.value).any())}
    return None


def _views(src: np.ndarray, tgt: np.ndarray) -> list[np.ndarray]:
    """``tgt`` laid out as ``src``: flattened in order, and through every permutation of its
    non-1 axes that gives the source's non-1 shape."""
    views = [tgt.reshape(src.shape)]
    s, t = [d for d in src.shape if d != 1], [d for d in tgt.shape if d != 1]
    if sorted(s) == sorted(t) and len(t) <= MAX_PERMUTED_RANK:
        squeezed = tgt.reshape(t)
        views += [np.transpose(squeezed, p).reshape(src.shape)
                  for p in itertools.permutations(range(len(t)))
                  if [t[i] for i in p] == s and list(p) != sorted(p)]
    return views


def _best(src: Tensor, candidates: list[tuple[float, Tensor]], tol: compare.Tolerance,
          exhaustive: bool = False) -> tuple[bool, dict]:
    """Whether a candidate matches ``src`` and, with ``exhaustive``, the closest one's name and
    error. Candidates come with their norms, nearest first; unless exhaustive, none is compared
    whose norm is further off than atol/rtol allow (‖o - r‖ ≥ |‖o‖ - ‖r‖|)."""
    best: dict[str, Any] = {}
    ref = _saturated(src.value)
    norm = _norm(ref)
    bound = (tol.atol or 0.0) * math.sqrt(ref.size) + (tol.rtol or 0.0) * norm \
        if tol.atol is not None or tol.rtol is not None else math.inf
    for cand_norm, cand in sorted(candidates, key=lambda c: abs(c[0] - norm)):
        if not exhaustive and abs(cand_norm - norm) > bound:
            break
        for view in _views(src.value, cand.value):
            res = compare.compare_output(src.name, ref, _saturated(view), tol)
            max_abs = res.metrics.get("max_abs")
            found = {"target": cand.name, "target_op_type": cand.op_type, "max_abs": max_abs,
                     "cosine": res.metrics.get("cosine")}
            if res.passed:
                return True, found
            if max_abs is not None and max_abs < best.get("max_abs", float("inf")):
                best = found
    return False, best


def _norm(value: np.ndarray) -> float:
    finite = value[np.isfinite(value)]
    return float(np.linalg.norm(finite.astype(np.float64)))


SATURATED = -1e3


def _saturated(value: np.ndarray) -> np.ndarray:
    """Attention-mask values: finfo.min in one graph is -1e4 in another (ncnn's legalization,
    fp16 models); both are "minus infinity" to softmax (exp underflows below -104), so values
    below SATURATED compare as SATURATED."""
    return np.maximum(value, SATURATED) if value.size and np.nanmin(value) < SATURATED else value


def _source_view(t: Tensor, batch: int) -> Tensor:
    """Batch item 0 of a source tensor, for targets that run one item at a time."""
    value = t.value[:1] if batch > 1 and t.value.ndim and t.value.shape[0] == batch else t.value
    return Tensor(t.name, t.op, t.op_type, value, t.parents)


def match(source: list[Tensor], target: list[Tensor],
          tol_for: Callable[[str], compare.Tolerance], batch: int = 1) -> dict[str, Any]:
    """Localize the first divergence (see the module docstring); ``batch``: the feeds' batch
    size, when the target's intermediates may hold item 0 only."""
    by_size: dict[int, list[tuple[float, Tensor]]] = {}
    for t in target:
        by_size.setdefault(t.value.size, []).append((_norm(_saturated(t.value)), t))
    matched, observable, informative, probes = [], [], [], []
    for s in source:
        view = s if s.value.size in by_size else _source_view(s, batch)
        informative.append(_informative(view.value))
        cands = by_size.get(view.value.size, []) if informative[-1] else []
        probes.append((view, cands, tol_for(s.name)))
        matched.append(bool(cands) and _best(*probes[-1])[0])
        observable.append(bool(cands))
    cache: dict[int, dict] = {}

    def closest(i: int) -> dict:
        """The target tensor closest to source tensor i (every candidate compared), cached."""
        if i not in cache:
            cache[i] = _best(*probes[i], exhaustive=True)[1] if probes[i][1] else {}
        return cache[i]

    return _verdict(source, matched, observable, informative, closest)


def _informative(value: np.ndarray) -> bool:
    """A tensor of one repeated value (a mask of ones, a zero bias) matches anything its size."""
    return value.size > 1 and bool(np.ptp(value[np.isfinite(value)]) > 0) \
        if np.isfinite(value).any() else False


def _verdict(source: list[Tensor], matched: list[bool], observable: list[bool],
             informative: list[bool], closest: Callable[[int], dict]) -> dict[str, Any]:
    children: list[list[int]] = [[] for _ in source]
    for i, s in enumerate(source):
        for p in s.parents:
            children[p].append(i)
    broken = [i for i in range(len(source))
              if not matched[i] and not _match_within(i, children, matched, FUSION_HOPS)]
    summary = {"matched": sum(matched), "observable": sum(observable),
               "source_tensors": len(source)}
    first = next((i for i in broken if observable[i]), None)
    if first is None:
        return summary | {"result": f"no divergence among the {sum(observable)} observable "
                                    "source tensors (the others are fused or reshaped away in "
                                    "the target)"}
    group = _fused_group(source, first, children, broken, closest)
    ancestors = _ancestors(source, first)
    last = max((a for a in ancestors if matched[a]), default=None)
    unresolved = [a for a in ancestors if not matched[a] and informative[a]
                  and (last is None or a > last)]
    s, best = source[first], closest(first)
    return summary | {
        "first_divergence": {"node": s.op, "op_type": s.op_type, "output": s.name} | {
            k: best.get(k) for k in ("max_abs", "cosine", "target", "target_op_type")},
        "fused_with": [source[g].op for g in group[1:]],
        "last_match": source[last].op if last is not None else None,
        "unresolved_between": len(unresolved),
        "exact": not unresolved and len(group) == 1}


def _fused_group(source: list[Tensor], first: int, children: list[list[int]],
                 broken: list[int], closest: Callable[[int], dict]) -> list[int]:
    """``first`` and the broken tensors after it whose closest target tensor is the same one:
    the target may compute them in one fused op (MatMul+Add as one Gemm), so the divergence is
    somewhere in that group; the report names its first member and lists the others."""
    group, dead = [first], set(broken)
    while True:
        here = closest(group[-1]).get("target")
        same = [c for c in children[group[-1]] if c in dead and here
                and closest(c).get("target") == here]
        if len(same) != 1 or _moves_only(source[group[-1]].value, source[same[0]].value):
            return group
        group.append(same[0])


def _moves_only(parent: np.ndarray, child: np.ndarray) -> bool:
    """The child holds the parent's values rearranged (Reshape, Transpose): nothing computed."""
    return parent.size == child.size and np.array_equal(np.sort(parent, axis=None),
                                                        np.sort(child, axis=None))


def _match_within(i: int, children: list[list[int]], matched: list[bool], hops: int) -> bool:
    """Whether a tensor at most ``hops`` consumers below ``i`` is matched."""
    frontier, seen = list(children[i]), set()
    for _ in range(hops):
        if any(matched[c] for c in frontier):
            return True
        seen.update(frontier)
        frontier = [g for c in frontier for g in children[c] if g not in seen]
    return False


def _ancestors(source: list[Tensor], i: int) -> set[int]:
    seen, todo = set(), list(source[i].parents)
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(source[p].parents)
    return seen


def localize(onnx_path: Path, feeds: dict[str, np.ndarray], target: list[Tensor],
             tol_for: Callable[[str], compare.Tolerance], threads: int = 1) -> dict[str, Any]:
    t0 = time.perf_counter()
    source = source_tensors(onnx_path, feeds, threads)
    batch = max((v.shape[0] for v in feeds.values() if v.ndim), default=1)
    result = match(source, target, tol_for, batch)
    return result | {"method": "intermediate tensors matched by value",
                     "target_tensors": len(target),
                     "seconds": round(time.perf_counter() - t0, 1)}
