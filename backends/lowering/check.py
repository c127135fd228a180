"""Equivalence in ONNX Runtime: the reference outputs of the source graph on several inputs,
and the largest difference of a rewritten graph from them."""
from __future__ import annotations

from typing import Any

import numpy as np

ATOL = 1e-5  # max abs on fp32 outputs; other outputs must be equal


def embedding_sizes(model: Any) -> dict[str, int]:
    """Int graph inputs used as Gather indices into a constant table: the table's size."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in model.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    sizes: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] in {
                i.name for i in model.graph.input}:
            t = inits.get(n.input[0]) or consts.get(n.input[0])
            if t is not None and len(t.dims) >= 1:
                size = int(numpy_helper.to_array(t).shape[0]) if not t.dims else int(t.dims[0])
                sizes[n.input[1]] = min(sizes.get(n.input[1], size), size)
    return sizes


def make_feeds(model: Any, shapes: dict[str, list[int]], vocab: dict[str, int],
               seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Logical inputs: token ids inside the vocabulary, attention masks with no, one and half
    padding (in the input's own dtype: int64, int32, bool or float), counting position ids,
    0/1 token types, random floats elsewhere. Ids under padding cycle 0, 1, 2 (common pad ids)."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    feeds = []
    for case, keep in enumerate((1.0, "one", 0.5)):
        f: dict[str, np.ndarray] = {}
        pad: np.ndarray | None = None
        for i in inputs:
            dt = np.dtype(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
            shape = shapes.get(i.name) or [d.dim_value or 1 for d in i.type.tensor_type.shape.dim]
            name = i.name.lower()
            if "mask" in name and len(shape) >= 1:
                s = shape[-1]
                n_keep = s if keep == 1.0 else s - 1 if keep == "one" else max(1, s // 2)
                m = np.broadcast_to((np.arange(s) < n_keep), shape)
                pad = ~m
                f[i.name] = m.astype(dt)
            elif dt.kind in "iu":
                if i.name in vocab:
                    v = rng.integers(0, vocab[i.name], shape)
                elif "position" in name:
                    v = np.broadcast_to(np.arange(shape[-1]), shape)
                else:
                    v = rng.integers(0, 2, shape)
                f[i.name] = np.asarray(v).astype(dt)
            elif dt == bool:
                f[i.name] = rng.integers(0, 2, shape).astype(bool)
            else:
                f[i.name] = rng.standard_normal(shape).astype(dt)
        if pad is not None:
            for i in inputs:
                if i.name in vocab and f[i.name].shape == pad.shape:
                    ids = f[i.name].copy()
                    ids[pad] = (np.arange(pad.sum()) % min(3, vocab[i.name])).astype(ids.dtype)
                    f[i.name] = ids
        feeds.append(f)
    return feeds


def session(model: Any) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model: Any, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Outputs per feed; each input is cast to the dtype the graph declares (a rewrite may
    have turned an int mask into a float input: same values)."""
    s = session(model)
    types = {i.name: i.type for i in s.get_inputs()}
    names = [o.name for o in s.get_outputs()]
    out = []
    for f in feeds:
        cast = {}
        for k, v in f.items():
            t = types[k]
            dt = {"tensor(float)": np.float32, "tensor(int64)": np.int64,
                  "tensor(int32)": np.int32, "tensor(bool)": bool,
                  "tensor(float16)": np.float16, "tensor(double)": np.float64}.get(t, v.dtype)
            cast[k] = v.astype(dt)
        out.append(dict(zip(names, s.run(None, cast), strict=True)))
    return out


def max_diff(reference: list[dict[str, np.ndarray]], got: list[dict[str, np.ndarray]]) -> float:
    """Largest |difference| over every output and feed; inf when an output is missing, has
    another shape, or a non-float output differs."""
    worst = 0.0
    for r, g in zip(reference, got, strict=True):
        for name, a in r.items():
            b = g.get(name)
            if b is None or np.shape(a) != np.shape(b):
                return float("inf")
            a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
            if np.asarray(a).dtype.kind != "f":
                if not np.array_equal(a64, b64):
                    return float("inf")
                continue
            if np.isnan(b64).any() and not np.isnan(a64).any():
                return float("inf")
            d = np.abs(a64 - b64)
            worst = max(worst, float(np.nanmax(d)) if d.size else 0.0)
    return worst
