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
    if job.get("states"):
        steps.append(STATE_PASS_NOTE)
    if job.get("fp32_twin"):  # the same program at fp32: the yardstick for the precision loss
        twin = _to_mlprogram(ct, program, target, ct.precision.FLOAT32, job.get("states"))
        _finish(ct, twin, job, Path(job["fp32_twin"]))
    compute = ct.precision.FLOAT32 if job["precision"] == "fp32" or \
        job.get("source_quantization") else ct.precision.FLOAT16
    with torch.no_grad():
        model = _to_mlprogram(ct, program, target, compute, job.get("states"))
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


# coremltools 9's canonicalize_inplace_pattern (which only moves each coreml_update_state next
# to the op making its value) raises KeyError at FLOAT16 on a program with several states: it
# anchors the move on the op after the value in a snapshot of the block, and that op may be an
# update it removed a moment before (seen on every tiny decoder: four states, FLOAT16)
STATE_PASS = "common::canonicalize_inplace_pattern"
STATE_PASS_NOTE = (f"coremltools pass {STATE_PASS} left out (a stateful program: it fails on "
                   "several states at FLOAT16; it only reorders the state writes)")


def _to_mlprogram(ct: Any, program: Any, target: Any, compute: Any,
                  states: bool = False) -> Any:
    pipeline = None  # coremltools' default
    if states:
        pipeline = ct.PassPipeline.DEFAULT  # a new pipeline at each access
        pipeline.remove_passes([STATE_PASS])
    return ct.convert(program, convert_to="mlprogram", minimum_deployment_target=target,
                      compute_precision=compute, skip_model_load=True, pass_pipeline=pipeline)


def _compress(ct: Any, model: Any, job: dict[str, Any], steps: list[str]) -> Any:
    from coremltools.optimize import coreml as cto

    model, joint = _sparse(model, job, steps) if job.get("sparse") else (model, False)
    t0 = time.perf_counter()
    if job["precision"] == "int8" and job.get("source_quantization"):
        model = _keep_source_weights(model, job["source_quantization"], steps)
    elif job["precision"] == "int8":
        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8"))
        model = cto.linear_quantize_weights(model, config=config, joint_compression=joint)
        steps.append(f"coremltools.optimize: int8 linear (symmetric, per-channel) weight "
                     f"quantization [{time.perf_counter() - t0:.1f} s]")
    if job.get("palettize"):
        bits = int(job["palettize"])
        config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(
            mode="kmeans", nbits=bits))
        model = cto.palettize_weights(model, config=config, joint_compression=joint)
        steps.append(f"coremltools.optimize: {bits}-bit k-means palettization of the weights "
                     f"[{time.perf_counter() - t0:.1f} s]")
    return model


SPARSE_MIN = 0.10  # a weight with this share of exact zeros is stored sparsely
SPARSE_MIN_SIZE = 256  # smaller constants (biases, scales) stay dense
JOINT_TARGETS = ("iOS18", "macOS15")  # sparse + int8 / palettized weights (joint compression)


def _sparse(model: Any, job: dict[str, Any], steps: list[str]) -> tuple[Any, bool]:
    """--sparse: each weight with at least SPARSE_MIN exact zeros stored as
    ``constexpr_sparse_to_dense`` (a bit mask and the nonzero values). Threshold 0: coremltools
    zeroes ``|w| <= threshold``, so only the source's own zeros, no new pruning. Returns the
    model and whether a later int8 / palettization step must compress jointly (keep the mask)."""
    from coremltools.optimize import coreml as cto

    compressed = job["precision"] == "int8" or job.get("palettize")
    if job.get("source_quantization"):
        steps.append("--sparse: a quantized source's own int8 weights are kept as they are, "
                     "not also stored sparsely: weights stored dense")
        return model, False
    if compressed and job["deployment_target"] not in JOINT_TARGETS:
        steps.append("--sparse: sparse int8 or palettized weights need --coreml-target iOS18 "
                     "or macOS15 (coremltools joint compression): weights stored dense")
        return model, False
    t0 = time.perf_counter()
    config = cto.OptimizationConfig(global_config=cto.OpThresholdPrunerConfig(
        threshold=0.0, minimum_sparsity_percentile=SPARSE_MIN, weight_threshold=SPARSE_MIN_SIZE))
    pruned = cto.prune_weights(model, config=config)
    count = _op_count(pruned, "constexpr_sparse_to_dense")
    if not count:
        steps.append(f"--sparse: no weight has {SPARSE_MIN:.0%} or more exact zeros: nothing "
                     "to store sparsely, weights stored dense")
        return model, False
    steps.append(f"coremltools.optimize: {count} weights with >= {SPARSE_MIN:.0%} exact zeros "
                 "stored sparsely (constexpr_sparse_to_dense: bit mask + nonzero values; "
                 f"threshold 0, no new pruning) [{time.perf_counter() - t0:.1f} s]")
    return pruned, bool(compressed)


def _op_count(model: Any, op_type: str) -> int:
    spec = model.get_spec()
    return sum(op.type == op_type for fn in spec.mlProgram.functions.values()
               for block in fn.block_specializations.values() for op in block.operations)


def _keep_source_weights(model: Any, quant: dict[str, Any], steps: list[str]) -> Any:
    """A quantized source's int8 weights, and only those, as constexpr dequantize ops holding
    the source's own ints, scales and zero points (the record ``backends.lowering.dequantize``
    wrote), so no weight is re-rounded: torchao's scale (max |w| / 127.5, ints down to -128) is
    kept as it is where coremltools' quantizer would recompute max |w| / 127. The weights are
    found by value (the dequantized source weight, or its transpose)."""
    import json

    from coremltools.models.utils import _apply_graph_pass

    t0 = time.perf_counter()
    records = json.loads(Path(quant["record"]).read_text())
    graph_pass = _source_weights_pass(records)
    model = _apply_graph_pass(model, graph_pass)
    found = graph_pass.replaced
    if found != len(records):
        steps.append(f"coremltools: {len(records) - found} of the source's int8 weights not in "
                     "the program by value (folded by onnxsim at the fixed shapes, or changed "
                     "by the conversion): left in float")
    steps.append(f"coremltools: {found} of the source's {len(records)} int8 weights stored as "
                 f"constexpr dequantize ops with the source's own ints, scales and zero points "
                 f"(granularity: {', '.join(quant.get('granularity') or [])}), compute "
                 f"precision FLOAT32 [{time.perf_counter() - t0:.1f} s]")
    return model


def _quant_params(record: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(dequantized float32 weight, coremltools QuantParams) for a recorded source weight and
    for its transpose."""
    import numpy as np
    from coremltools.optimize._utils import QuantParams

    dtype = np.uint8 if record["dtype"] == "uint8" else np.int8
    ints = np.asarray(record["ints"], np.int64).reshape(record["shape"])
    scale = np.asarray(record["scale"], np.float32)
    zero = np.asarray(record["zero_point"] or [0], np.int64)
    shape = [1] * ints.ndim
    if scale.size > 1:
        shape[record["axis"] if record["axis"] is not None else 1] = scale.size
    scale, zero = scale.reshape(shape), np.broadcast_to(zero.reshape(
        shape if zero.size > 1 else [1] * ints.ndim), shape)
    w = (ints.astype(np.float32) - zero.astype(np.float32)) * scale
    out = []
    for t in ((lambda a: a), np.transpose) if ints.ndim == 2 else ((lambda a: a),):
        offset = t(zero).astype(dtype) if zero.any() else None
        out.append((t(w), QuantParams(data=t(ints).astype(dtype), scale=t(scale),
                                      offset=offset, nbits=np.uint8(8))))
    return out


def _source_weights_pass(records: dict[str, Any]) -> Any:
    """A coremltools graph pass replacing each const equal to a recorded source weight by a
    constexpr dequantize op (affine for iOS16/17, blockwise shift-scale for iOS18+) of the
    record's values."""
    import numpy as np
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.helper import block_context_manager
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights

    by_size: dict[int, list[tuple[Any, Any]]] = {}
    for r in records.values():
        for w, params in _quant_params(r):
            by_size.setdefault(w.size, []).append((w, params))

    def params_of(op: Any) -> Any:
        v = getattr(getattr(op, "val", None), "val", None)
        if not isinstance(v, np.ndarray) or v.dtype != np.float32:
            return None
        return next((p for w, p in by_size.get(v.size, ()) if w.shape == v.shape
                     and np.array_equal(w, v)), None)

    class SourceWeights(AbstractGraphPass):
        replaced = 0

        def apply(self, prog: Any) -> None:
            for fn in prog.functions.values():
                self._block(fn)

        @block_context_manager
        def _block(self, block: Any) -> None:
            for op in list(block.operations):
                for inner in op.blocks:
                    self._block(inner)
                params = params_of(op) if op.op_type == "const" else None
                if params is None:
                    continue
                new = linear_quantize_weights._create_constexpr_var(op, params)
                block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0],
                                                   new_var=new, no_check_var_types=True)
                block.remove_ops([op])
                self.replaced += 1

    return SourceWeights()


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
