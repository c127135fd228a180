"""Core ML conversion, run in a child process: ``python -m mtconvert.backends.coreml.convert JOB``.

PyTorch programs (a .pt2 the parent exported at the validation shapes) and ONNX sources
(bridged to PyTorch with onnx2torch) both go through torch.export, ``run_decompositions()``
(coremltools' torch.export front end needs the ATEN dialect) and ``coremltools.convert`` to an
ML Program. Weight compression uses coremltools.optimize. Prints one ``MTCONVERT-RESULT {json}``.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from mtconvert.backends.coreml._ct import coremltools


def convert(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    ct = coremltools()
    clock = time.perf_counter()
    steps: list[str] = []
    program = _exported(job, steps)
    t_export = time.perf_counter()
    program = program.run_decompositions()
    steps.append(f"torch.export program decomposed to the ATEN dialect "
                 f"[{time.perf_counter() - t_export:.1f} s]")
    t_convert = time.perf_counter()
    target = getattr(ct.target, job["deployment_target"])
    result: dict[str, Any] = {"steps": steps}
    if job.get("fp32_twin"):  # the same program at fp32: the yardstick for the precision loss
        twin = _to_mlprogram(ct, program, target, ct.precision.FLOAT32)
        _finish(ct, twin, job, Path(job["fp32_twin"]))
    compute = ct.precision.FLOAT32 if job["precision"] == "fp32" or \
        job.get("source_quantization") else ct.precision.FLOAT16
    with torch.no_grad():
        model = _to_mlprogram(ct, program, target, compute)
    steps.append(f"coremltools.convert: ML Program, minimum deployment target "
                 f"{job['deployment_target']}, compute precision {compute.name} "
                 f"[{time.perf_counter() - t_convert:.1f} s]")
    model = _compress(ct, model, job, steps)
    names = _finish(ct, model, job, Path(job["out"]))
    result |= names | {"seconds": round(time.perf_counter() - clock, 2)}
    return result


def _exported(job: dict[str, Any], steps: list[str]) -> Any:
    import torch

    if job["kind"] == "pt2":
        return torch.export.load(job["model"])
    import onnx

    from mtconvert.backends.coreml.onnx_bridge import export, to_torch

    t0 = time.perf_counter()
    module = to_torch(onnx.load(job["model"]))
    args = tuple(_example(shape, dtype) for shape, dtype in
                 zip(job["input_shapes"], job["input_dtypes"], strict=True))
    program = export(module, args)
    steps.append(f"onnx2torch: ONNX -> torch.fx module; traced (make_fx, shape scalars "
                 f"folded) and torch.export at the fixed shapes [{time.perf_counter() - t0:.1f} s]")
    return program


def _example(shape: list[int], dtype: str) -> Any:
    import torch

    return torch.zeros(shape, dtype=getattr(torch, dtype))


def _to_mlprogram(ct: Any, program: Any, target: Any, compute: Any) -> Any:
    return ct.convert(program, convert_to="mlprogram", minimum_deployment_target=target,
                      compute_precision=compute, skip_model_load=True)


def _compress(ct: Any, model: Any, job: dict[str, Any], steps: list[str]) -> Any:
    from coremltools.optimize import coreml as cto

    t0 = time.perf_counter()
    if job["precision"] == "int8" and job.get("source_quantization"):
        model = _requantize_source(cto, model, job["source_quantization"], steps)
    elif job["precision"] == "int8":
        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8"))
        model = cto.linear_quantize_weights(model, config=config)
        steps.append(f"coremltools.optimize: int8 linear (symmetric, per-channel) weight "
                     f"quantization [{time.perf_counter() - t0:.1f} s]")
    if job.get("palettize"):
        bits = int(job["palettize"])
        config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(
            mode="kmeans", nbits=bits))
        model = cto.palettize_weights(model, config=config)
        steps.append(f"coremltools.optimize: {bits}-bit k-means palettization of the weights "
                     f"[{time.perf_counter() - t0:.1f} s]")
    return model


def _requantize_source(cto: Any, model: Any, quant: dict[str, Any], steps: list[str]) -> Any:
    """A quantized source's int8 weights, and only those, back to int8 with the source's
    granularity: a per-tensor symmetric source weight's largest |int| is 127, so coremltools'
    symmetric scale (max |w| / 127) is the source's scale and its ints the source's ints. The
    weights are found by value (the dequantized source weight, or its transpose)."""
    import json

    import numpy as np

    t0 = time.perf_counter()
    records = json.loads(Path(quant["record"]).read_text())
    floats = {}
    for r in records.values():
        ints = np.asarray(r["ints"], np.float32).reshape(r["shape"])
        scale = np.asarray(r["scale"], np.float32)
        zero = np.asarray(r["zero_point"] or [0], np.float32)
        if scale.size > 1:
            axis = r["axis"] if r["axis"] is not None else 1
            shape = [1] * ints.ndim
            shape[axis] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        w = (ints - zero) * scale
        floats.setdefault(w.size, []).append(
            (w, "per_channel" if scale.size > 1 else "per_tensor", r["dtype"]))

    def granularity_of(op: Any) -> tuple[str, str] | None:
        val = getattr(op, "val", None)
        v = getattr(val, "val", None)
        if not isinstance(v, np.ndarray) or v.dtype != np.float32:
            return None
        for w, gran, dtype in floats.get(v.size, ()):
            for cand in (w, w.T) if w.ndim == 2 else (w,):
                if cand.shape == v.shape and np.array_equal(cand, v):
                    return gran, dtype
        return None

    names: dict[str, Any] = {}
    for fn in model._mil_program.functions.values():
        for op in fn.find_ops(op_type="const"):
            found = granularity_of(op)
            if found:  # uint8 weights (onnxruntime's asymmetric tables) stay asymmetric uint8
                gran, dtype = found
                names[op.name] = cto.OpLinearQuantizerConfig(
                    mode="linear" if dtype == "uint8" else "linear_symmetric",
                    dtype="uint8" if dtype == "uint8" else "int8", granularity=gran,
                    weight_threshold=1)
    if len(names) != len(records):
        steps.append(f"coremltools.optimize: {len(records) - len(names)} of the source's int8 "
                     "weights not in the program by value (folded by onnxsim at the fixed "
                     "shapes, or changed by the conversion): not re-quantized")
    model = cto.linear_quantize_weights(model, config=cto.OptimizationConfig(
        op_name_configs=names))
    steps.append(f"coremltools.optimize: {len(names)} of the source's {len(records)} int8 "
                 f"weights re-quantized (int8 linear symmetric, uint8 linear for uint8 ones; "
                 f"the source's granularity: "
                 f"{', '.join(quant.get('granularity') or [])}), compute precision FLOAT32 "
                 f"[{time.perf_counter() - t0:.1f} s]")
    return model


def _finish(ct: Any, model: Any, job: dict[str, Any], out: Path) -> dict[str, Any]:
    """Name the features like the source, save, and describe what was written."""
    spec = model.get_spec()
    renames = []
    for feature, source_name in zip(spec.description.input, job["input_order"], strict=True):
        if feature.name != source_name:
            renames.append((feature.name, source_name))
    for feature, source_name in zip(spec.description.output, job["output_names"], strict=True):
        if feature.name != source_name:
            renames.append((feature.name, source_name))
    for old, new in renames:
        ct.utils.rename_feature(spec, old, new)
    if renames:
        model = ct.models.MLModel(spec, weights_dir=model.weights_dir, skip_model_load=True)
    model.save(str(out))
    spec = model.get_spec()
    ops = Counter(op.type for fn in spec.mlProgram.functions.values()
                  for block in fn.block_specializations.values() for op in block.operations)
    return {"renamed": renames, "op_counts": dict(ops),
            "inputs": [f.name for f in spec.description.input],
            "outputs": [f.name for f in spec.description.output]}


if __name__ == "__main__":
    from mtconvert.backends.process import child_main

    child_main(convert)
