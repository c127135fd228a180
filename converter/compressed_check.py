"""What stayed compressed in a target's artifact of a quantized source: its int8 weight tensors
read from the artifact itself (the Core ML program's constexpr dequantize ops, the .tflite's
int8 tensors, ncnn's int8 layers' weights in the .bin) and how many hold exactly the source's
int values and scales (the record written by ``backends.lowering.dequantize``). Facts for the
report's ``compressed.kept``; never raises for an unreadable artifact (the entry says why
instead).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def kept(target: str, primary: Path, record_path: str | None) -> dict[str, Any] | None:
    try:
        records = json.loads(Path(record_path).read_text()) if record_path else {}
        if target == "coreml":
            tensors = _coreml(primary)
        elif target == "tflite":
            tensors = _tflite(primary)
        elif target == "ncnn":
            tensors = _ncnn(primary)
        else:
            return None
    except Exception as exc:  # noqa: BLE001 - a fact we could not read, said so
        return {"error": f"{type(exc).__name__}: {exc}"}
    same = sum(1 for ints, scale in tensors if _matches(ints, scale, records))
    ints_only = sum(1 for ints, _ in tensors if _matches(ints, None, records))
    extra = _tflite_activations(primary, record_path) if target == "tflite" else {}
    return extra | {"int8_tensors": len(tensors), "source_int8_weights": len(records),
            "same_ints_and_scales": same,
            # the source's ints with another scale (a converter folded a constant factor, e.g.
            # GELU's 0.5, into the weight's scale: the same values times that factor)
            "same_ints_other_scale": ints_only - same,
            # int8 tensors whose ints are no source weight's: re-rounded by the target's own
            # quantizer, or a weight the source kept in float
            "not_from_source": len(tensors) - ints_only}


def _matches(ints: np.ndarray, scale: np.ndarray | None, records: dict[str, Any]) -> bool:
    """The tensor (or its transpose) equals a source weight's ints, with its scales (1e-6
    relative) unless ``scale`` is None."""
    for r in records.values():
        src = np.asarray(r["ints"], np.int64).reshape(r["shape"])
        rs = np.asarray(r["scale"], np.float64)
        # a uint8 source weight stored as int8 by a symmetric target: the same ints minus 128
        shifted = (src, src - 128) if r["dtype"] == "uint8" else (src,)
        for cand in (ints, ints.T) if ints.ndim == 2 else (ints,):
            if cand.shape != src.shape or not any(np.array_equal(cand.astype(np.int64), s)
                                                   for s in shifted):
                continue
            if scale is None:
                return True
            scale = np.asarray(scale, np.float64).ravel()
            if scale.size == rs.size and np.allclose(scale, rs, rtol=1e-6, atol=0):
                return True
            if scale.size != rs.size and np.allclose(scale, rs.max(), rtol=1e-6, atol=0) \
                    and np.allclose(rs, rs.max(), rtol=1e-6, atol=0):
                return True
    return False


def _coreml(package: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    from mtconvert.backends.coreml import program

    out = []
    for op in program.load(package).ops:
        if op.type in ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale"):
            a = {**op.attributes, **{k: v[0][1] for k, v in op.inputs.items()
                                     if v and v[0][0] == "value"}}
            data = a.get("quantized_data", a.get("data"))
            if data is not None and np.asarray(data).dtype in (np.int8, np.uint8):
                out.append((np.asarray(data), np.asarray(a.get("scale"))))
    return out


def _ncnn(param: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    from mtconvert.backends import ncnn, ncnn_int8

    return ncnn_int8.int8_tensors(param, ncnn.param_layers(param))


def _tflite(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(value, np.asarray(t["quantization_parameters"]["scales"]))
            for t, value in tflite_constants(path) if t["dtype"] in (np.int8, np.uint8)]


def activations_path(record: str | Path) -> Path:
    """Where the run keeps a QDQ source's activation scales (``quantized.lowered``), beside its
    weights' record."""
    return Path(record).with_name(Path(record).name.replace(".weights.json", ".activations.json"))


def _tflite_activations(path: Path, record_path: str | None) -> dict[str, Any]:
    """The .tflite's int8 activation tensors (not constants) and how many hold a source
    activation's exact scale and zero point (a uint8 zero point minus 128: the same grid), from
    the activations file beside the record (``activations_path``)."""
    from mtconvert.backends.tflite_qparams import expected

    where = activations_path(record_path) if record_path else None
    if where is None or not where.is_file():
        return {}
    grids = [expected(q) for q in json.loads(where.read_text()).values()]
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    constant = {t["index"] for t, _ in tflite_constants(path)}
    acts = [t for t in interp.get_tensor_details() if t["index"] not in constant
            and t["dtype"] == np.int8 and t["quantization_parameters"]["scales"].size == 1]
    held = sum(1 for t in acts if any(
        np.isclose(t["quantization"][0], s, rtol=1e-6, atol=0) and t["quantization"][1] == z
        for s, z in grids))
    return {"int8_activation_tensors": len(acts), "source_activations": len(grids),
            "activation_tensors_with_source_scale": held}


def tflite_constants(path: Path) -> list[tuple[dict[str, Any], np.ndarray]]:
    """Every constant tensor of a .tflite: (the interpreter's tensor details, its value)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    out = []
    for t in interp.get_tensor_details():
        try:
            out.append((t, np.asarray(interp.get_tensor(t["index"]))))
        except ValueError:  # not a constant
            continue
    return out
