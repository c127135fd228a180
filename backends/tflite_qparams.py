"""Fully-integer TFLite for a QDQ source, carrying the source's own activation scales.

A static-QDQ source is fully integer: every quantized activation has the scale and zero point
its QuantizeLinear gives it. tflite converts the dequantized graph (``lowering.dequantize``);
this route (``ROUTE``, tried first under ``--int8-scheme full``; dynamic-range is the default)
makes that graph full-integer with TFLite's own quantizer, but with the source's ranges instead
of calibrated ones wherever the source quantized a tensor:

1. TFLiteConverter calibrates the float model on the run's calibration data (min/max per tensor);
2. each source activation (the float input of a static QuantizeLinear, named the same in the
   dequantized graph) is evaluated by ONNX Runtime on the first calibration sample and matched
   **by value** to the calibrated model's tensors (``tflite_convert._match``: every tensor that
   holds the same values, reshaped or transposed);
3. those tensors' min/max become the source's grid, ``[(qmin - zp) * s, (qmax - zp) * s]``, from
   which the quantizer derives exactly scale ``s`` and zero point ``zp`` (uint8 ``zp - 128``:
   the same grid in int8);
4. TFLite's quantizer then writes the int8 model: it re-quantizes the int32 biases at
   input scale x weight scale, keeps the fixed output parameters of Softmax/Logistic/Tanh, and
   gives ops that need equal input/output parameters (Reshape, Transpose, Concat) one set, so
   the model is consistent. LiteRT's int8 kernels compute their requantization multipliers in
   Prepare from the tensors' scales (kernel_util.cc ``GetQuantizedConvolutionMultipler``,
   fully_connected.cc), so the parameters written are the ones used.

Int8 where the source is int8, as its QDQ graph says: the weight layers (``WEIGHT_OPS``: the
source's integer MatMul/Gemm) compute in int8, reading and writing the source's grids, and so
do layout ops (``LAYOUT_OPS``) moving a source-quantized tensor; every other op (LayerNorm,
GELU, the residual Add, Softmax: float between a DequantizeLinear and the next QuantizeLinear
in the source) stays float (TFLite's node denylist), TFLite's QUANTIZE/DEQUANTIZE standing
where the source's QuantizeLinear/DequantizeLinear stood. Quantizing those ops too with
TFLite's calibrated ranges made the result depend on the calibration set: on the QDQ fixture
with the run's 8 generated samples the logits' SNR against the source fell to 18.6-18.9 dB (the
int8-source profile asks 20). An additive attention mask (a -3.4e38 constant) also stays float
(``_mask_path``): in int8 it is lost.

The calibrated model is reached by wrapping ``TFLiteConverterBase._quantize`` inside this
module's own child process (``python -m mtconvert.backends.tflite_qparams JOB``, which then runs
``tflite_convert.convert`` unchanged): calibration as TensorFlow does it, the source's ranges
written, then TensorFlow's own MLIR quantizer with the same arguments it would have used
(``mlir_quantize`` is wrapped too, so whichever caller quantizes the calibrated model —
the converter, ``tflite_convert``'s own quantize step or the QuantizationDebugger — keeps the
ops the source keeps float in float).

Which activation tensors of the artifact carry the source's parameters is read back from the
artifact (``carried``) and said in the steps; the rest are named.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mtconvert.errors import ConversionError

ROUTE = "onnx2tf-int8-source-scales"
CHILD = "mtconvert.backends.tflite_qparams"
SCALE_RTOL = 1e-6
QRANGE = {"int8": (-128, 127), "uint8": (0, 255)}


def applies(source: Any) -> bool:
    """A static-QDQ source (activations quantized with fixed scales)."""
    return bool(source.quantization) and source.quantization.get("scheme") == "qdq"


def job_settings(opts: Any) -> dict[str, Any]:
    """The child's job for ``ROUTE``: full-integer with the source's activations; a
    ConversionError (the route rejected, the next one taken) when it cannot apply. Asked for
    with ``--int8-scheme full``: on the 6-layer BERT this artifact ran at 0.89-0.91x tflite
    fp32's p50, the dynamic-range one at 0.28-0.29x (its int8 BATCH_MATMULs and the
    QUANTIZE/DEQUANTIZE around the float ops cost more than they save here)."""
    quant = opts.extra.get("source_quantization") or {}
    activations = quant.get("activations")
    why = ("the source has no static activation scales" if not activations
           else "dynamic-range int8 is the default (faster: benchmarks/bench_tflite_int8.py); "
           "--int8-scheme full asks for this route" if opts.extra.get("int8_scheme") != "full"
           else f"int8 only (precision {opts.precision})" if opts.precision != "int8"
           else "full-integer int8 needs calibration data (--calibration FILE; convert mode "
           "generates it under --precision int8 or --int8-scheme full)"
           if opts.calibration is None else "")
    if why:
        raise ConversionError(why, target="tflite", step="options")  # the run names the route
    return {"int8_scheme": "full", "source_activations": activations}


# --- the child ---------------------------------------------------------------------------------

def convert(job: dict[str, Any]) -> dict[str, Any]:
    """``tflite_convert.convert`` with TFLiteConverter's quantization given the source's ranges."""
    from tensorflow.lite.python import convert as tf_convert
    from tensorflow.lite.python import lite

    from mtconvert.backends import tflite_convert as tc

    original, quantizer = lite.TFLiteConverterBase._quantize, tf_convert.mlir_quantize
    found: dict[str, Any] = {}

    def mlir_quantize(calibrated: Any, *args: Any, denylisted_nodes: Any = None,
                      **kw: Any) -> Any:
        """TFLite's quantizer, whoever calls it, with what the source keeps float kept float
        too, and the source's integer layers int8 whatever another caller asked: they read
        the source's own quantized activations (QUANTIZE to its grid where a float op feeds
        them)."""
        int8 = set(found.get("int8", ()))
        nodes = sorted({*(n for n in denylisted_nodes or () if n not in int8),
                        *found.get("float", ())})
        return quantizer(calibrated, *args, denylisted_nodes=nodes or None, **kw)

    def _quantize(self: Any, result: Any, input_type: Any, output_type: Any,
                  activations_type: Any, bias_type: Any, allow_float: Any,
                  enable_variable_quantization: Any, debug_options: Any) -> Any:
        if not self.experimental_new_quantizer:
            raise RuntimeError("the source's ranges need TFLite's MLIR quantizer")
        only = self._experimental_calibrate_only
        self._experimental_calibrate_only = True
        try:
            calibrated = original(self, result, input_type, output_type, activations_type,
                                  bias_type, allow_float, enable_variable_quantization,
                                  debug_options)
        finally:
            self._experimental_calibrate_only = only
        if not found:  # the same float model every time (retries with ops denylisted)
            found.update(_matched(calibrated, job, tc))
        calibrated = _with_ranges(calibrated, found["tensors"], job["source_activations"],
                                  found["ranges"])
        if only:  # QuantizationDebugger: it quantizes the calibrated model itself
            return calibrated
        return mlir_quantize(
            calibrated, self._experimental_disable_per_channel, input_data_type=input_type,
            output_data_type=output_type,
            enable_variable_quantization=enable_variable_quantization,
            disable_per_channel_for_dense_layers=(
                self._experimental_disable_per_channel_quantization_for_dense_layers),
            debug_options_str=debug_options.SerializeToString())

    lite.TFLiteConverterBase._quantize = _quantize
    tf_convert.mlir_quantize = mlir_quantize  # read at call time by tflite_convert / debugger
    result = tc.convert(job)
    return result | {"source_scales": found}


def _matched(calibrated: bytes, job: dict[str, Any], tc: Any) -> dict[str, Any]:
    """What the quantizer is told, from the calibrated model and the first calibration sample:
    {"tensors": {source tensor: [tflite tensors holding its values]}, "float": op outputs kept
    float (the ops the source computes in float, the mask path), "int8": the weight layers'
    outputs (int8 whatever), "ranges": the mask path's, "absent": source tensors not in the
    fixed-shape graph (folded by onnxsim)}."""
    import numpy as np
    import onnx

    with np.load(job["calibration"]) as data:
        sample = [data[n][0] for n in job["input_order"]]
    graph = onnx.load(job["onnx"], load_external_data=False).graph
    producer = {n.output[0]: n.name for n in graph.node if n.output}
    wanted = [t for t in job["source_activations"] if t in producer]
    values = tc._onnx_outputs(job["onnx"], [producer[t] for t in wanted],
                              dict(zip(job["input_order"], sample, strict=True)))
    tensors = tc._tflite_tensors(calibrated, sample)
    taken: set[str] = set()
    matched: dict[str, list[str]] = {}
    for t in wanted:
        if (value := values.get(producer[t])) is None or value.dtype.kind != "f":
            continue
        while (name := tc._match(value, tensors, taken)) is not None:
            taken.add(name)
            matched.setdefault(t, []).append(name)
    held = {n for names in matched.values() for n in names}
    mask = _mask_path(calibrated, held)
    outputs = _op_outputs(calibrated)
    unquantized = [n for n, op, table in outputs if op not in WEIGHT_OPS and not table
                   and not (op in LAYOUT_OPS and n in held)]
    return {"tensors": matched, "float": sorted({*mask["float"], *unquantized}),
            "int8": [n for n, op, _ in outputs if op in WEIGHT_OPS], "ranges": mask["ranges"],
            "absent": [t for t in job["source_activations"] if t not in producer]}


HUGE = 1e30
# the source's integer ops (MatMul/Gemm/Conv between DequantizeLinear and QuantizeLinear)
WEIGHT_OPS = frozenset({"FULLY_CONNECTED", "BATCH_MATMUL", "CONV_2D", "DEPTHWISE_CONV_2D"})
# ops that move int8 values without arithmetic: int8 when their output is a source activation
LAYOUT_OPS = frozenset({"RESHAPE", "TRANSPOSE", "SQUEEZE", "EXPAND_DIMS", "GATHER"})


def _op_outputs(blob: bytes) -> list[tuple[str, str, bool]]:
    """(tensor, op type, reads a constant table) of every float op output of a calibrated
    model. A Gather from a constant table stays int8 (the table stored int8, as dynamic-range
    stores it: a float32 word-embedding table made the 6-layer BERT's artifact 65 MiB against
    the dynamic-range one's 22 MiB)."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(blob), 0)
    graph = model.subgraphs[0]
    codes = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    out = []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        kind = codes.get(max(code.builtinCode, code.deprecatedBuiltinCode), "")
        first = op.inputs[0] if op.inputs is not None and len(op.inputs) else -1
        data = model.buffers[graph.tensors[first].buffer].data if first >= 0 else None
        table = kind == "GATHER" and data is not None and len(data) > 0
        out += [(graph.tensors[o].name.decode(), kind, table) for o in op.outputs
                if o >= 0 and graph.tensors[o].type == schema.TensorType.FLOAT32]
    return out


def _mask_path(blob: bytes, held: set[str]) -> dict[str, Any]:
    """An additive attention mask (a float-max constant, |x| >= HUGE: -3.4e38) kept exact:
    {"float": op outputs kept in float, "ranges": {tensor: [lo, hi]}}. Every op that reads the
    constant or a tensor computed from it (or whose calibrated range holds such a value) stays
    float; a Softmax (or another op with a bounded output) reading it stays float too and ends
    the path. Ops TFLite's quantizer quantizes all the same (a Select of two constants) get a
    range that holds the constant, so the mask survives as its own int8 level. In int8 with a
    calibrated range the mask is lost either way: without padding in the calibration data it
    saturates to the range's end (seen: cosine 0.96 on padded inputs), with padding the
    range's step is ~1e36 and every score it meets becomes 0 (seen: the scores' Mul shared the
    mask Add's scale 1.3e36 and the Softmax came out uniform). The source computes its mask in
    float too. Found from the graph, not only the ranges, because calibration data without
    padding never shows the mask. A calibrated range of a tensor in ``held`` does not count:
    it is replaced by the source's grid (LiteRT's calibrator logs an input after an in-place op
    overwrote it, tensorflow#127842: the 6-layer BERT's attention scores, a source activation,
    were logged with the mask Add's -3.4e38, which left their BATCH_MATMUL float)."""
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(blob), 0)
    graph = model.subgraphs[0]
    extreme: dict[int, tuple[float, float]] = {}
    for i, t in enumerate(graph.tensors):
        data = model.buffers[t.buffer].data if t.buffer < len(model.buffers) else None
        q = t.quantization
        if data is not None and len(data) and t.type == schema.TensorType.FLOAT32:
            v = np.frombuffer(bytes(bytearray(data)), np.float32)
            if np.abs(v).max() >= HUGE:
                extreme[i] = (float(v.min()), float(v.max()))
        elif t.name.decode() not in held and q is not None and q.min is not None and \
                len(q.min) and max(abs(float(q.min[0])), abs(float(q.max[0]))) >= HUGE:
            extreme[i] = (float(q.min[0]), float(q.max[0]))
    codes = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    kept, ranges = [], {}
    for op in graph.operators:  # in execution order: producers first
        reach = [extreme[i] for i in (*op.inputs, *op.outputs) if i in extreme]
        if not reach:
            continue
        code = model.operatorCodes[op.opcodeIndex]
        bounded = codes.get(max(code.builtinCode, code.deprecatedBuiltinCode)) in BOUNDED
        for o in (o for o in op.outputs if o >= 0):
            kept.append(graph.tensors[o].name.decode())
            if not bounded:
                extreme[o] = (min(r[0] for r in reach), max(r[1] for r in reach))
                ranges[kept[-1]] = list(extreme[o])
    return {"float": kept, "ranges": ranges}


BOUNDED = frozenset({"SOFTMAX", "LOG_SOFTMAX", "LOGISTIC", "TANH"})


def grid(q: dict[str, Any]) -> tuple[float, float]:
    """The real range a source activation's (scale, zero point, dtype) can hold."""
    lo, hi = QRANGE[q["dtype"]]
    return (lo - q["zero_point"]) * q["scale"], (hi - q["zero_point"]) * q["scale"]


def expected(q: dict[str, Any]) -> tuple[float, int]:
    """The int8 (scale, zero point) of a source activation: uint8's zero point minus 128."""
    return q["scale"], q["zero_point"] - (128 if q["dtype"] == "uint8" else 0)


def _with_ranges(blob: bytes, matched: dict[str, list[str]],
                 activations: dict[str, dict[str, Any]],
                 mask: dict[str, list[float]]) -> bytes:
    """The calibrated model with each matched tensor's min/max set to its source's grid, and
    each mask-path tensor's (``_mask_path``) to a range that holds the mask constant."""
    import flatbuffers
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(blob), 0)
    by_name = {t.name.decode() if isinstance(t.name, bytes) else t.name: t
               for g in model.subgraphs for t in g.tensors}
    todo = [(name, grid(activations[source]), False) for source, names in matched.items()
            for name in names] + [(n, r, True) for n, r in mask.items()]
    for name, (lo, hi), union in todo:
        if name in by_name:
            t = by_name[name]
            t.quantization = t.quantization or schema.QuantizationParametersT()
            if union:  # the mask path: the calibrated range, the mask constant and 0
                q = t.quantization
                seen = [float(q.min[0]), float(q.max[0])] if q.min is not None and \
                    len(q.min) else []
                lo, hi = min(lo, 0.0, *seen), max(hi, 0.0, *seen)
            t.quantization.min = np.array([lo], np.float32)
            t.quantization.max = np.array([hi], np.float32)
    builder = flatbuffers.Builder(len(blob) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


# --- read back from the artifact ---------------------------------------------------------------

def carried(path: Path, found: dict[str, Any],
            activations: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Which source activations the .tflite holds with exactly the source's scale and zero point
    (any of its matched tensors, int8): {"source": n, "matched": n, "carried": [..],
    "other_params": [..], "unmatched": [..], "absent": [..]}."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    details = {t["name"]: t for t in interp.get_tensor_details()}
    # a tensor kept in float (the mask path's Softmax) is quantized by the QUANTIZE reading it
    names_of = {t["index"]: t["name"] for t in interp.get_tensor_details()}
    quantized_as = {names_of[op["inputs"][0]]: names_of[op["outputs"][0]]
                    for op in interp._get_ops_details() if op["op_name"] == "QUANTIZE"}
    matched = found.get("tensors", {})
    carried_, other = [], []
    for source, names in matched.items():
        scale, zero = expected(activations[source])
        ok = any(_has(details.get(quantized_as.get(n, n)), scale, zero) or
                 _has(details.get(n), scale, zero) for n in names)
        (carried_ if ok else other).append(source)
    absent = set(found.get("absent", ()))
    return {"source": len(activations), "matched": len(matched), "carried": carried_,
            "other_params": other, "absent": sorted(absent),
            "unmatched": [t for t in activations if t not in matched and t not in absent]}


def _has(detail: dict[str, Any] | None, scale: float, zero: int) -> bool:
    import numpy as np

    if detail is None or detail["dtype"] != np.int8:
        return False
    q = detail["quantization_parameters"]
    return q["scales"].size == 1 and abs(float(q["scales"][0]) - scale) <= SCALE_RTOL * scale \
        and int(q["zero_points"][0]) == zero


def float_ops(path: Path) -> list[str]:
    """The ops of a .tflite that compute in float (a float32 input or output that is not a
    constant), QUANTIZE/DEQUANTIZE at the model's edges left out."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    kinds = {t["index"]: t["dtype"].__name__ for t in interp.get_tensor_details()}
    out = []
    for op in interp._get_ops_details():
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE"):
            continue
        if any(kinds.get(i) == "float32" for i in (*op["inputs"], *op["outputs"]) if i >= 0):
            out.append(op["op_name"])
    return out


def steps(path: Path, result: dict[str, Any], activations: dict[str, dict[str, Any]]
          ) -> list[str]:
    """What the route did, read back from the artifact."""
    from collections import Counter

    c = carried(path, result.get("source_scales") or {}, activations)
    lines = [f"int8 source scales: {len(c['carried'])} of {c['source']} source-quantized "
             f"activations carry the source's scale and zero point ({c['matched']} matched by "
             "value to TFLite tensors)"]
    for key, what in (("other_params", "matched, but TFLite's quantizer gave other parameters "
                       "(an op with fixed output parameters, or one set shared with a "
                       "neighbour)"), ("unmatched", "no TFLite tensor with its values"),
                      ("absent", "not in the fixed-shape graph")):
        if c[key]:
            lines.append(f"int8 source scales, {what}: {', '.join(c[key])}")
    floats = Counter(float_ops(path))
    lines.append("int8 full-integer: every op computes in int8" if not floats else
                 "int8 full-integer: ops computing in float: "
                 + ", ".join(f"{op}x{n}" for op, n in floats.most_common()))
    return lines


if __name__ == "__main__":
    from mtconvert.backends.process import child_main

    child_main(convert)
