"""Is the source quantized, and how: the one place that recognises a compressed ONNX source.

A source is quantized when its graph holds ONNX's quantization ops: QuantizeLinear /
DequantizeLinear pairs (QDQ, e.g. onnxruntime's ``quantize_static``), MatMulInteger /
DynamicQuantizeLinear (``quantize_dynamic``) or QLinear* operators (QOperator format).
``describe`` says which scheme and what it holds; the run uses it to choose the tolerance
profile (``PROFILE``) and to hand the targets that cannot consume these ops a dequantized graph
(``backends.lowering.dequantize``) that they re-compress natively.

Heavy imports (onnx) happen inside functions.
"""
from __future__ import annotations

from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
DYNAMIC_OPS = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"})
PROFILE = "int8-source"  # validators.tolerances: a quantized source's yardstick
# targets whose runtime consumes quantized ONNX ops as they are (ORT fuses QDQ into integer
# kernels); every other target converts the dequantized graph and re-compresses its weights
NATIVE_TARGETS = frozenset({"onnx-mobile"})


def _is_qoperator(op: str) -> bool:
    return op.startswith("QLinear") or op in ("QGemm", "QAttention", "DynamicQuantizeMatMul")


def describe(model: Any) -> dict[str, Any] | None:
    """{scheme, ops, int8_weights, weight_granularity, activation_steps} of a quantized graph,
    None for a float one. ``scheme``: "qdq" (static QuantizeLinear on activations), "dynamic"
    (activations quantized at run time), "weight-only" (DequantizeLinear on constants only) or
    "qoperator"; ``activation_steps``: the distinct scales of the activations' QuantizeLinear
    nodes (the rounding unit of each quantized activation), smallest and largest."""
    from onnx import numpy_helper

    ops = Counter(n.op_type for n in model.graph.node)
    quant = {op: c for op, c in ops.items()
             if op in QDQ_OPS or op in DYNAMIC_OPS or _is_qoperator(op)}
    if not quant:
        return None
    inits = {i.name: i for i in model.graph.initializer}
    # an int8/uint8 embedding table read by Gather, then dequantized (quantize_dynamic)
    tables = {n.output[0]: n.input[0] for n in model.graph.node
              if n.op_type == "Gather" and n.input[0] in inits}
    weights, axes, steps = 0, set(), []
    for n in model.graph.node:
        const = n.input[0] if n.input[0] in inits else tables.get(n.input[0])
        if n.op_type == "DequantizeLinear" and const is not None:
            if inits[const].data_type in (2, 3):  # uint8, int8 (int32 = a bias)
                weights += 1
                scale = numpy_helper.to_array(inits[n.input[1]])
                axes.add("per-channel" if scale.size > 1 else "per-tensor")
        elif n.op_type == "MatMulInteger" and n.input[1] in inits:
            weights += 1
            zp = numpy_helper.to_array(inits[n.input[3]]) if len(n.input) > 3 and \
                n.input[3] in inits else None
            axes.add("per-channel" if zp is not None and zp.size > 1 else "per-tensor")
        elif n.op_type == "QuantizeLinear" and n.input[0] not in inits \
                and n.input[1] in inits:
            steps.append(float(numpy_helper.to_array(inits[n.input[1]]).max()))
    if any(_is_qoperator(op) for op in quant):
        scheme = "qoperator"
    elif "DynamicQuantizeLinear" in quant:
        scheme = "dynamic"
    elif steps:
        scheme = "qdq"
    else:
        scheme = "weight-only"
    return {"scheme": scheme, "ops": dict(sorted(quant.items())), "int8_weights": weights,
            "weight_granularity": "/".join(sorted(axes)) or None,
            "activation_steps": {"min": min(steps), "max": max(steps), "count": len(steps)}
            if steps else None}


def describe_path(path: Path | str) -> dict[str, Any] | None:
    """``describe`` of an ONNX file; None when it cannot be read as one (not this module's
    error to report: the loader reports it)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - the source loader names a broken file
        return None
    return describe(model)


def source_bytes(path: Path | str) -> int:
    """The source's bytes on disk (its external-data files included)."""
    try:
        import onnx

        return model_bytes(onnx.load(str(path), load_external_data=False), path)
    except Exception:  # noqa: BLE001 - the file itself is the size then
        return Path(path).stat().st_size


def model_bytes(model: Any, path: Path | str) -> int:
    """The bytes of a loaded ONNX model's file and its external-data files."""
    p = Path(path)
    files = {p.parent / e.value for t in model.graph.initializer for e in t.external_data
             if e.key == "location"}
    return p.stat().st_size + sum(f.stat().st_size for f in files if f.is_file())


# --- a quantized source at a target ------------------------------------------------------------

RATIO_LIMIT = 1.25  # a compressed source's artifact files at most this many times its bytes


def plan_for(src: Any, target: str, precisions: tuple[str, ...],
             precision: str) -> dict[str, Any] | None:
    """How a target takes the source: None for a float source. A target that runs the quantized
    graph itself takes it as it is; the others take the dequantized graph (``lowered``) at
    their int8 precision, re-compressing the weights from the source's record, or at fp32 with
    dequantized weights where they have no int8 here (the stated fallback)."""
    info = src.quantization if src.quantization is not None else \
        _describe_cached(str(src.onnx_path), Path(src.onnx_path).stat().st_mtime_ns)
    if not info:
        return None
    size = info.get("source_bytes") or source_bytes(src.path or src.onnx_path)
    info = {k: v for k, v in info.items() if k != "source_bytes"}
    plan: dict[str, Any] = {"source": info, "source_bytes": size,
                            "record": str(_work(src, target) / f"{src.name}.weights.json")}
    if target in NATIVE_TARGETS:
        return plan | {"lower": False, "record": None,
                       "route": "the quantized graph as it is (the runtime's integer kernels)"}
    if "int8" in precisions and precision in ("fp32", "int8"):
        return plan | {"lower": True, "precision": "int8",
                       "route": "dequantized graph, weights re-compressed to the target's int8"}
    why = (f"--precision {precision} asked" if "int8" in precisions
           else f"{target} has no int8 form here")
    return plan | {"lower": True, "precision": precision, "route": "dequantized graph",
                   "fallback": f"{why}: {precision} with the source's weights dequantized"}


@lru_cache(maxsize=8)
def _describe_cached(path: str, mtime_ns: int) -> dict[str, Any] | None:
    return describe_path(path)


def _work(src: Any, target: str) -> Path:
    return Path(src.work_dir) / target / "dequantized"


def lowered(src: Any, target: str, topts: Any, plan: dict[str, Any] | None) -> tuple[Any, Any]:
    """(source, target options) the target converts: the dequantized graph and its weights'
    record (under the source's work folder), at the plan's precision, the source's
    quantization in ``extra["source_quantization"]``. Unchanged when the plan says so."""
    if not plan or not plan["lower"]:
        return src, topts
    import json
    from dataclasses import replace

    import onnx

    from mtconvert import compressed_check
    from mtconvert.backends.lowering.dequantize import dequantize
    from mtconvert.backends.lowering.graph import NotApplicable
    from mtconvert.errors import ConversionError

    work = _work(src, target)
    work.mkdir(parents=True, exist_ok=True)
    source = onnx.load(str(src.onnx_path))
    try:
        result = dequantize(source)
    except NotApplicable as exc:
        raise ConversionError(f"quantized source: {exc}", target=target,
                              step="dequantize") from None
    path = work / f"{src.name}.onnx"
    onnx.save(result.model, str(path))
    Path(plan["record"]).write_text(json.dumps(result.weights))
    activations = activation_scales(source)
    compressed_check.activations_path(plan["record"]).write_text(json.dumps(activations))
    plan["steps"] = result.steps
    granularity = sorted({"per-channel" if len(r["scale"]) > 1 else "per-tensor"
                          for r in result.weights.values()})
    extra = {**topts.extra, "source_quantization": {
        "record": plan["record"], "scheme": plan["source"]["scheme"],
        "granularity": granularity, "activations": activations}}
    return (replace(src, onnx_path=path, torch_module=None, quantization={}),
            replace(topts, precision=plan["precision"], extra=extra))


def activation_scales(model: Any) -> dict[str, dict[str, Any]]:
    """{tensor: {scale, zero_point, dtype}} of every activation a static per-tensor
    QuantizeLinear quantizes; ``dequantize`` keeps the tensor's name (the QuantizeLinear's input),
    so targets with static int8 activations can give it the source's scale."""
    from onnx import numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        scale = consts.get(n.input[1]) if n.op_type == "QuantizeLinear" else None
        if scale is None or scale.size != 1 or n.input[0] in consts:
            continue
        zero = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        out[n.input[0]] = {"scale": float(scale.ravel()[0]),
                           "zero_point": 0 if zero is None else int(zero.ravel()[0]),
                           "dtype": "uint8" if zero is None else str(zero.dtype)}
    return out


def judged(artifact: Any, plan: dict[str, Any] | None) -> Any:
    """The artifact of a quantized source, judged by the int8-source profile, with the
    dequantization's steps first."""
    from dataclasses import replace

    if plan is None:
        return artifact
    return replace(artifact, tolerance_profile=PROFILE,
                   steps=(*plan.get("steps", ()), f"tolerance profile {PROFILE} (quantized "
                          f"{plan['source']['scheme']} source)", *artifact.steps))


def summary(report: Any, target: str, plan: dict[str, Any] | None) -> Any:
    """The target report with its ``compressed`` field: the source's scheme, the route, the
    size against the source's and what stayed compressed (``kept``); a size over RATIO_LIMIT
    without a stated fallback fails the target."""
    from dataclasses import replace

    if plan is None:
        return report
    size = sum(a.bytes for a in report.artifacts)
    ratio = size / plan["source_bytes"] if plan["source_bytes"] and size else None
    fallback = plan.get("fallback")
    if not fallback and plan.get("precision") == "int8" and report.precision == "fp32":
        fallback = "the target kept fp32 with the source's weights dequantized (its steps say why)"
    primary = next((a.path for a in report.artifacts if a.role == "artifact"), None)
    kept = None
    if primary and plan.get("record"):
        from mtconvert import compressed_check

        kept = compressed_check.kept(target, Path(primary), plan["record"])
    field = {**(report.compressed or {}), "source": plan["source"], "route": plan["route"], "fallback": fallback,
             "bytes": size or None, "source_bytes": plan["source_bytes"],
             "size_ratio": round(ratio, 4) if ratio is not None else None,
             "size_limit": None if fallback else RATIO_LIMIT, "kept": kept}
    report = replace(report, compressed=field)
    if ratio is not None and not fallback and ratio > RATIO_LIMIT and report.status == "passed":
        report = replace(report, status="failed",
                         reason=f"size: {ratio:.2f}x the quantized source's bytes (limit "
                                f"{RATIO_LIMIT}x): the artifact did not stay compressed")
    return report
