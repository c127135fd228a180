"""TFLite conversion, run in a child process: ``python -m mtconvert.backends.tflite_convert JOB``.

onnx2tf calls sys.exit, prints a great deal and sets process-wide environment variables, so it
never runs inside mtconvert. It builds the Keras model only (``disable_model_save``: writing
the SavedModel was 60-75% of onnx2tf's time), and TFLiteConverter writes the one .tflite we
need. Prints one ``MTCONVERT-RESULT {json}`` line: input/output tensor map and timings.

Before onnx2tf, ``tflite_routes.prepare`` takes the graph to opset 17 and fuses the exact GELU
formula into one Gelu node (both checked with ONNX Runtime), and on the ``onnx2tf-pinned-layout`` route ``pin_layout_judgement`` stops onnx2tf
from taking tensors whose axes have equal sizes for channels-last ones.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any


def convert(job: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import onnx2tf
    import tensorflow as tf

    from mtconvert.backends.tflite_routes import (LAYOUT_ROUTE, register_gelu_schema,
                                                  pin_layout_judgement, prepare)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mtconvert-onnx2tf-") as tmp:
        work = Path(tmp) / "model.onnx"  # onnx2tf rewrites its input file in place
        prepared = prepare(job["onnx"], str(work))  # opset 17, checked with ONNX Runtime
        pseudo = {job["pseudo_map"][op]: n for op, n in prepared["op_counts"].items()
                  if op in job["pseudo_map"]}
        if job.get("route") == LAYOUT_ROUTE:
            pin_layout_judgement()
            prepared["steps"].append(
                "onnx2tf layout judgement pinned: an op output counts as channels-last only "
                "when its shape differs from the ONNX shape, never because its axes have equal "
                "sizes")
        fused = bool(prepared["op_counts"].get("Gelu"))
        if fused:  # see register_gelu_schema; prepare named every node, sng4onnx is not needed
            register_gelu_schema()
        t_pre = time.perf_counter()
        model = onnx2tf.convert(
            input_onnx_file_path=str(work), output_folder_path=tmp,
            replace_to_pseudo_operators=list(pseudo), not_use_onnxsim=True,
            disable_model_save=True, non_verbose=True, not_use_opname_auto_generate=fused,
            keep_ncw_or_nchw_or_ncdhw_input_names=job["keep_layout_inputs"] or None)
    t1 = time.perf_counter()
    if model is None:
        raise RuntimeError("onnx2tf returned no model")
    specs = [tf.TensorSpec(t.shape, t.dtype, name=t.name.split(":")[0]) for t in model.inputs]
    fn = tf.function(lambda *inputs: model(list(inputs)), input_signature=specs)
    dtypes = [s.dtype.as_numpy_dtype for s in specs]

    def make_converter(settings: dict[str, Any] = job) -> Any:
        conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()])
        _configure(conv, tf, settings, dtypes)
        return conv

    if job.get("fp32_twin"):  # the same Keras model at fp32: the yardstick for the precision loss
        Path(job["fp32_twin"]).write_bytes(make_converter(job | {"precision": "fp32"}).convert())

    kept: dict[str, Any] = {}
    if job["precision"] == "int8" and job.get("int8_scheme") == "full":
        blob, float_ops, kept = _full_integer(make_converter, tf, job, dtypes)
    else:
        blob, float_ops = make_converter().convert(), []
    Path(job["out"]).write_bytes(blob)
    return {"keras_inputs": [s.name for s in specs], "onnx2tf_s": round(t1 - t_pre, 2),
            "prepare_s": round(t_pre - t0, 2), "prepare_steps": prepared["steps"],
            "pseudo_ops": pseudo,
            "tflite_converter_s": round(time.perf_counter() - t1, 2), "bytes": len(blob),
            "float_ops": float_ops, "kept_float": kept}


MAX_FLOAT_OPS = 4


def _full_integer(make_converter: Any, tf: Any, job: dict[str, Any], dtypes: list[Any]
                  ) -> tuple[bytes, list[str], dict[str, Any]]:
    """Full-integer conversion, smoke-run on one calibration sample. When an op's int8 kernel
    fails (e.g. DIV whose divisor quantizes to its zero point), convert again with that op type
    kept in float (TFLite's QuantizationDebugger denylist), up to MAX_FLOAT_OPS op types.
    The source nodes in ``job["keep_float"]`` stay float (the debugger's node denylist, by
    their TFLite tensors: ``_float_tensors``); returns what was kept (``kept_float``)."""
    denied: list[str] = []
    kept = _float_tensors(make_converter, job, dtypes) if job.get("keep_float") else {}
    nodes = sorted({n for names in kept.get("kept", {}).values() for n in names})
    blob = _quantized(tf, make_converter, job, dtypes, denied, nodes) if nodes \
        else make_converter().convert()
    while (failing := _failing_op(blob, job, dtypes)) is not None:
        if failing in denied or len(denied) >= MAX_FLOAT_OPS:
            raise RuntimeError(f"int8 kernel of {failing} fails even with {denied} in float")
        denied.append(failing)
        blob = _quantized(tf, make_converter, job, dtypes, denied, nodes)
    if nodes:
        kept["still_int8"] = _int8_outputs(blob, nodes)
    return blob, denied, kept


def _quantized(tf: Any, make_converter: Any, job: dict[str, Any], dtypes: list[Any],
               ops: list[str], nodes: list[str]) -> bytes:
    """Full-integer with op types (``ops``) and op output tensors (``nodes``) kept in float."""
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=make_converter(),
        debug_dataset=_representative(job["calibration"], job["input_order"], dtypes),
        debug_options=tf.lite.experimental.QuantizationDebugOptions(
            denylisted_ops=ops or None, denylisted_nodes=nodes or None))
    return debugger.get_nondebug_quantized_model()


def _float_tensors(make_converter: Any, job: dict[str, Any], dtypes: list[Any]
                   ) -> dict[str, Any]:
    """The TFLite tensors of the ONNX nodes in ``job["keep_float"]``: onnx2tf names TF ops
    ``tf.linalg.matmul_3``, not after the ONNX node, so each node's output (ONNX Runtime on the
    fixed graph) is matched by value to the calibrated float model's tensors (LiteRT, builtin
    kernels, first calibration sample): the first op whose output equals it (relative error
    < MATCH_RTOL, any axis order). ``{"kept": {node: [tensor]}, "missing": [node]}``."""
    converter = make_converter()
    converter._experimental_calibrate_only = True  # float model + ranges: the quantizer's input
    calibrated = converter.convert()
    sample = next(_representative(job["calibration"], job["input_order"], dtypes)())
    chains = _with_activations(job["onnx"], job["keep_float"])
    onnx_out = _onnx_outputs(job["onnx"], sorted({n for c in chains.values() for n in c}),
                             dict(zip(job["input_order"], sample)))
    tensors = _tflite_tensors(calibrated, sample)
    kept: dict[str, list[str]] = {}
    taken: set[str] = set()
    for node, chain in chains.items():
        for n in (n for n in chain if n in onnx_out):
            if (name := _match(onnx_out[n], tensors, taken)) is not None:
                taken.add(name)
                kept.setdefault(node, []).append(name)
    return {"kept": kept, "missing": [n for n in job["keep_float"] if n not in kept],
            "absent": [n for n in job["keep_float"] if n not in chains]}


# what a layer's float output goes through before the next layer, kept in float with it (its
# int8 kernel would quantize the layer's float output again); as mtconvert.quant_error.FUSED
ACTIVATIONS = frozenset({"Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "Add",
                         "Gelu"})


def _with_activations(path: str, nodes: list[str]) -> dict[str, list[str]]:
    """Each named node with the chain of activations (ACTIVATIONS) its output alone feeds."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    readers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    by_name = {n.name: n for n in graph.node}
    chains = {}
    for name in nodes:
        node, chain = by_name.get(name), []
        while node is not None:
            chain.append(node.name)
            after = readers.get(node.output[0], [])
            node = after[0] if len(after) == 1 and after[0].op_type in ACTIVATIONS else None
        if chain:
            chains[name] = chain
    return chains


MATCH_RTOL = 1e-3


def _onnx_outputs(path: str, nodes: list[str], feeds: dict[str, Any]) -> dict[str, Any]:
    """Each named node's first output on ``feeds`` (ONNX Runtime, graph as written)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(path)
    outs = {n.name: n.output[0] for n in model.graph.node if n.name in set(nodes)}
    known = {o.name for o in model.graph.output}
    for out in outs.values():
        if out not in known:
            model.graph.output.append(onnx.ValueInfoProto(name=out))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in sess.get_inputs()}
    fed = {k: v.astype("int64" if "int64" in types[k] else v.dtype) for k, v in feeds.items()
           if k in types}
    if not outs:  # none of them in this graph (an empty list would fetch every output)
        return {}
    values = dict(zip(list(outs.values()), sess.run(list(outs.values()), fed), strict=True))
    return {n: values[o] for n, o in outs.items()}


def _tflite_tensors(blob: bytes, sample: list[Any]) -> list[tuple[str, Any]]:
    """(name, value) of every float op output of a float .tflite, in op order."""
    import warnings

    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interp = Interpreter(model_content=blob, experimental_preserve_all_tensors=True,
                             experimental_op_resolver_type=(
                                 OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
    interp.allocate_tensors()
    for detail, value in zip(interp.get_input_details(), sample, strict=False):
        interp.set_tensor(detail["index"], value.astype(detail["dtype"]))
    interp.invoke()
    names = {t["index"]: t["name"] for t in interp.get_tensor_details()}
    found = []
    for op in interp._get_ops_details():
        for index in op["outputs"]:
            value = interp.get_tensor(index) if index >= 0 else None
            if value is not None and value.dtype.kind == "f":
                found.append((names[index], value.copy()))
    return found


def _match(value: Any, tensors: list[tuple[str, Any]], taken: set[str]) -> str | None:
    """The tensor closest to ``value`` (same size, any axis order, relative error below
    MATCH_RTOL; the first of equals), not already ``taken``, or None. Both sides are clipped to
    +-CLIP first: an attention mask's -3.4e38 would otherwise make every masked tensor "equal"
    (seen: layer 1's mask Add matched to layer 0's)."""
    import itertools

    import numpy as np

    ref = np.clip(value.astype(np.float64), -CLIP, CLIP)
    norm = float(np.linalg.norm(ref)) or 1.0
    best: tuple[float, str | None] = (MATCH_RTOL, None)
    for name, cand in tensors:
        if cand.size != ref.size or name in taken:
            continue
        c = np.clip(cand.astype(np.float64), -CLIP, CLIP).reshape(
            [d for d in cand.shape if d != 1] or [1])
        r = ref.reshape([d for d in ref.shape if d != 1] or [1])
        views = [np.transpose(r, p) for p in itertools.permutations(range(r.ndim))
                 if tuple(r.shape[i] for i in p) == c.shape] if r.ndim <= 5 else []
        views.append(r.reshape(c.shape))  # a fused reshape (heads split off the hidden axis)
        err = min((float(np.linalg.norm(v - c)) / norm for v in views), default=np.inf)
        if err < best[0]:
            best = (err, name)
    return best[1]


CLIP = 1e4


def _int8_outputs(blob: bytes, names: list[str]) -> list[str]:
    """Which of the tensors ``names`` the quantized model still computes in int8."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=blob)
    wanted = set(names)
    return sorted(t["name"] for t in interp.get_tensor_details()
                  if t["name"] in wanted and t["dtype"].__name__ == "int8")


def _failing_op(blob: bytes, job: dict[str, Any], dtypes: list[Any]) -> str | None:
    """The type of the op whose kernel fails on the first calibration sample, or None."""
    import re

    from ai_edge_litert.interpreter import Interpreter

    sample = next(_representative(job["calibration"], job["input_order"], dtypes)())
    interp = Interpreter(model_content=blob)
    interp.allocate_tensors()
    for detail, value in zip(interp.get_input_details(), sample, strict=False):
        interp.set_tensor(detail["index"], value.astype(detail["dtype"]))
    try:
        interp.invoke()
    except RuntimeError as exc:
        m = re.search(r"Node number \d+ \((\w+)\) failed", str(exc))
        if m is None:
            raise
        return m.group(1)
    return None


def _configure(converter: Any, tf: Any, job: dict[str, Any], dtypes: list[Any]) -> None:
    ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    precision, scheme = job["precision"], job.get("int8_scheme", "dynamic")
    if precision == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if job.get("per_tensor_weights"):  # max |w| / 127 per tensor: a source's own scale
            converter._experimental_disable_per_channel = True
        if scheme == "full":
            converter.representative_dataset = _representative(job["calibration"],
                                                               job["input_order"], dtypes)
            ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, *ops]
    converter.target_spec.supported_ops = ops
    if job.get("sparse"):  # --sparse: pruned weights in TFLite's sparse tensor format
        converter.optimizations = [*converter.optimizations,
                                   tf.lite.Optimize.EXPERIMENTAL_SPARSITY]


def _representative(npz: str, names: list[str], dtypes: list[Any]) -> Any:
    import numpy as np

    with np.load(npz) as data:
        arrays = [data[n] for n in names]
    count = arrays[0].shape[0]

    def gen():  # noqa: ANN202 - TFLite's generator protocol
        for i in range(count):
            yield [a[i].astype(d) for a, d in zip(arrays, dtypes, strict=True)]

    return gen


if __name__ == "__main__":
    from mtconvert.backends.process import child_main

    child_main(convert)
