"""A pruned source's sparsity, and whether each target's artifact kept it.

``of_tensors`` measures the weights (tensors of rank >= 2): a tensor with at least
``PRUNED_MIN`` of its values exactly zero counts as pruned; the source is sparse when one is.
Its zeros are *structured* when most of them (``STRUCTURED_MIN``) lie in whole zero rows or
whole zero columns (a pruned neuron, channel or head), else *unstructured*. ``of_onnx`` reads a
source ONNX's initializers; ``of_artifact`` reads a built artifact's constant tensors where the
artifact can be read here (.tflite, Core ML program, ORT format through onnxruntime's own
flatbuffer schema), an int8 tensor's zero being its int 0, a sparsely stored weight's zeros
those of its mask; ``judged`` puts both in ``TargetReport.sparsity``, with ``kept`` when the
artifact holds at least the source's zeros (``KEPT_SLACK`` below them), and ``storage``: how
the artifact stores them ("sparse": ``sparse_tensors`` weights in a sparse format, else
"dense" with ``storage_note`` saying why: the backend's ``--sparse`` step, or its
``Backend.no_sparse_weights``). Never raises for an unreadable artifact: the entry says why.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

PRUNED_MIN = 0.10  # share of exact zeros that makes a weight tensor a pruned one
STRUCTURED_MIN = 0.9  # share of the zeros in whole zero rows/columns that makes it structured
KEPT_SLACK = 0.01  # an artifact may hold this share fewer zeros and still have kept them
MIN_SIZE = 256  # smaller constants (shapes, scales, biases) are not weights


def of_tensors(tensors: Iterable[np.ndarray]) -> dict[str, Any] | None:
    """The weights' sparsity, or None when no weight tensor is pruned."""
    weights = total = zeros = pruned = pruned_size = pruned_zeros = in_lines = rows = cols = 0
    for t in tensors:
        a = np.asarray(t)
        if a.ndim < 2 or a.size < MIN_SIZE:
            continue
        m = a.reshape(a.shape[0], -1) == 0
        z = int(m.sum())
        weights, total, zeros = weights + 1, total + a.size, zeros + z
        if z < PRUNED_MIN * a.size:
            continue
        pruned, pruned_size, pruned_zeros = pruned + 1, pruned_size + a.size, pruned_zeros + z
        zr, zc = m.all(axis=1), m.all(axis=0)
        rows, cols = rows + int(zr.sum()), cols + int(zc.sum())
        in_lines += int((m & (zr[:, None] | zc[None, :])).sum())
    if not pruned:
        return None
    return {"weight_tensors": weights, "pruned_tensors": pruned,
            "zero_share": round(zeros / total, 6),
            "pruned_zero_share": round(pruned_zeros / pruned_size, 6),
            "structured": in_lines >= STRUCTURED_MIN * pruned_zeros,
            "zero_rows": rows, "zero_columns": cols}


def of_onnx(model: Any) -> dict[str, Any] | None:
    """A source ONNX's sparsity (its initializers and Constant nodes)."""
    from onnx import numpy_helper

    tensors = [numpy_helper.to_array(i) for i in model.graph.initializer if len(i.dims) >= 2]
    tensors += [numpy_helper.to_array(a.t) for n in model.graph.node if n.op_type == "Constant"
                for a in n.attribute if a.name == "value" and len(a.t.dims) >= 2]
    return of_tensors(tensors)


def of_artifact(target: str, primary: Path) -> dict[str, Any]:
    """The artifact's sparsity (``{}`` when none of its weights is pruned), or ``{"error"}``
    / ``{"unread"}`` saying why it was not measured."""
    readers = {"tflite": _tflite, "coreml": _coreml, "onnx-mobile": _ort}
    if target not in readers:
        return {"unread": f"the {target} artifact's weights are not read here"}
    try:
        tensors, stored_sparse = readers[target](primary)
    except Exception as exc:  # noqa: BLE001 - a fact we could not read, said so
        return {"error": f"{type(exc).__name__}: {exc}"}
    return (of_tensors(tensors) or {}) | ({"sparse_tensors": stored_sparse} if stored_sparse
                                          else {})


def judged(report: Any, source: dict[str, Any] | None) -> Any:
    """The target report with its ``sparsity`` (the source's, the artifact's, kept or not)."""
    if not source:
        return report
    primary = next((a.path for a in report.artifacts if a.role == "artifact"), None)
    if primary is None:
        return report
    got = of_artifact(report.name.split(":")[0], Path(primary))
    entry: dict[str, Any] = {"source_zero_share": source["zero_share"], "artifact": got}
    if "error" not in got and "unread" not in got:
        share = got.get("zero_share", 0.0)
        entry |= {"artifact_zero_share": share,
                  "kept": share >= source["zero_share"] - KEPT_SLACK}
    return replace(report, sparsity=entry | storage(report, got))


def unpruned(report: Any) -> Any:
    """--sparse on a source without pruned weights: the target report says there was nothing
    to store sparsely (not a failure)."""
    if report.sparsity is not None or not report.artifacts:
        return report
    return replace(report, sparsity={
        "source_zero_share": 0.0, "storage": "dense",
        "storage_note": f"nothing to store sparsely: no weight has {PRUNED_MIN:.0%} or more "
                        "exact zeros"})


def storage(report: Any, got: dict[str, Any]) -> dict[str, Any]:
    """How the artifact stores the zeros: sparse (how many weights), or dense and why."""
    steps = report.conversion.steps if report.conversion else ()
    note = next((s.removeprefix("--sparse: ") for s in steps if s.startswith("--sparse: ")),
                None)
    if got.get("sparse_tensors"):
        return {"storage": "sparse", "sparse_tensors": got["sparse_tensors"]} | (
            {"storage_note": note} if note else {})
    if note is None:
        how, why = _backend_sparse(report.name.split(":")[0])
        note = f"--sparse would store them sparsely ({how})" if how else why
    return {"storage": "dense", "storage_note": note}


def _backend_sparse(target: str) -> tuple[str, str]:
    """(Backend.sparse_weights, Backend.no_sparse_weights) of a registered target."""
    from mtconvert.registry import default_registry

    try:
        cls = default_registry().get(target)
    except Exception:  # noqa: BLE001 - a plugin that does not load: say so, do not fail
        return "", f"the {target} backend did not load"
    return cls.sparse_weights, cls.no_sparse_weights


_ORT_TYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 10: np.float16}  # ONNX TensorProto types


def _ort(path: Path) -> tuple[list[np.ndarray], int]:
    """An ORT-format model's initializers, through onnxruntime's own flatbuffer schema."""
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.InferenceSession import (
        InferenceSession)

    graph = InferenceSession.GetRootAs(path.read_bytes(), 0).Model().Graph()
    out = []
    for j in range(graph.InitializersLength()):
        t = graph.Initializers(j)
        dtype = _ORT_TYPES.get(t.DataType())
        if dtype is None or t.RawDataIsNone():
            continue
        out.append(np.frombuffer(t.RawDataAsNumpy().tobytes(), dtype).reshape(
            [int(d) for d in t.DimsAsNumpy()]))
    return out, 0  # sparse initializers are not written by the ORT-format tool


def _tflite(path: Path) -> tuple[list[np.ndarray], int]:
    """The constants; a sparse one (--sparse: sparsity parameters) densified from its CSR."""
    from mtconvert.compressed_check import tflite_constants

    out, stored_sparse = [], 0
    for details, value in tflite_constants(path):
        params = details.get("sparsity_parameters")
        if params:
            stored_sparse += 1
            value = _csr_dense(value, list(details["shape"]), params)
        out.append(value)
    return out, stored_sparse


def _csr_dense(values: np.ndarray, shape: list[int], params: dict[str, Any]) -> np.ndarray:
    """A 2-D TFLite sparse tensor in row order without blocks (dense rows, sparse columns: what
    the converter writes for unstructured zeros); other layouts are not read here."""
    meta = params["dim_metadata"]
    if len(shape) != 2 or len(params["block_map"]) or list(params["traversal_order"]) != [0, 1] \
            or [m["format"] for m in meta] != [0, 1]:
        raise ValueError(f"sparse tensor layout {params['traversal_order']} / block map "
                         f"{params['block_map']} is not read here")
    segments, indices = (np.asarray(meta[1][k]) for k in ("array_segments", "array_indices"))
    dense = np.zeros(shape, values.dtype)
    rows = np.repeat(np.arange(shape[0]), np.diff(segments))
    dense[rows, indices] = values
    return dense


# Core ML's sparse weight ops and the input holding the weight's zero pattern
_COREML_MASKS = {"constexpr_sparse_to_dense": "mask",
                 "constexpr_sparse_blockwise_shift_scale": "data_mask",
                 "constexpr_lut_to_sparse": "indices_mask"}


def _coreml(package: Path) -> tuple[list[np.ndarray], int]:
    """The program's constants; a sparse weight as its mask (its zeros are the weight's zeros;
    with joint compression the mask is on the int8 / palette op feeding the sparse one)."""
    from mtconvert.backends.coreml import program

    out, stored_sparse = [], 0
    for op in program.load(package).ops:
        values = {k: v for k, binds in op.inputs.items() for kind, v in binds if kind == "value"}
        values |= op.attributes  # iOS16's constexpr ops hold their data as attributes
        mask = values.pop(_COREML_MASKS.get(op.type, ""), None)
        if mask is not None and op.type == "constexpr_sparse_to_dense" and \
                "nonzero_data" not in values:
            continue  # joint compression: the mask is counted on the op feeding this one
        if mask is not None:
            stored_sparse += 1
            out.append(_mask(np.asarray(mask), values.pop("shape", None)))
            continue
        out += [np.asarray(v) for v in values.values() if isinstance(v, np.ndarray)]
    return out, stored_sparse


def _mask(mask: np.ndarray, shape: Any) -> np.ndarray:
    """iOS16's mask is a flat bit field over ``shape``; iOS18's has the weight's shape."""
    if shape is None:
        return mask
    dims = [int(d) for d in np.asarray(shape).ravel()]
    return np.unpackbits(mask.astype(np.uint8).ravel(), bitorder="little",
                         count=int(np.prod(dims))).reshape(dims)
