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
    calibration: dict[str, Any] = {}
    if job["precision"] == "int8" and job.get("int8_scheme") == "full":
        blob, float_ops, kept, calibration = _full_integer(make_converter, job, dtypes)
    else:
        blob, float_ops = make_converter().convert(), []
    Path(job["out"]).write_bytes(blob)
    return {"keras_inputs": [s.name for s in specs], "onnx2tf_s": round(t1 - t_pre, 2),
            "prepare_s": round(t_pre - t0, 2), "prepare_steps": prepared["steps"],
            "pseudo_ops": pseudo,
            "tflite_converter_s": round(time.perf_counter() - t1, 2), "bytes": len(blob),
            "float_ops": float_ops, "kept_float": kept, "calibration": calibration}


MAX_FLOAT_OPS = 4
CRUSH = 256.0  # a tensor spanning under 1/CRUSH of the range it is quantized with: < 1 int8 step


def _full_integer(make_converter: Any, job: dict[str, Any], dtypes: list[Any]
                  ) -> tuple[bytes, list[str], dict[str, Any], dict[str, Any]]:
    """Full-integer conversion: TFLite's calibration (min/max per tensor), its logged ranges
    re-measured (``_own_ranges``), then TFLite's MLIR quantizer with some op outputs kept in
    float (its node denylist): the source nodes in ``job["keep_float"]`` (``_float_tensors``)
    and the additive ops whose int8 output would erase an input (``_crushing``). Smoke-run on
    one calibration sample: when an op's int8 kernel fails (e.g. DIV whose divisor quantizes
    to its zero point), quantize again with that op type kept in float, up to MAX_FLOAT_OPS
    op types. Returns the model, those op types, the kept source nodes (``kept_float``) and
    the calibration's corrections (``{"ranges", "crushed"}``)."""
    conv = make_converter()
    conv._experimental_calibrate_only = True  # float model + ranges: the quantizer's input
    calibrated, ranges, unmeasured = conv.convert(), [], None
    if not job.get("source_activations"):  # that route writes the source's own ranges
        try:
            calibrated, ranges = _own_ranges(calibrated, job, dtypes)
        except (RuntimeError, ValueError) as exc:  # e.g. a Flex op the builtin kernels lack
            unmeasured = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    kept = _float_tensors(calibrated, job, dtypes) if job.get("keep_float") else {}
    crushed = _crushing(calibrated)
    nodes = sorted({n for names in kept.get("kept", {}).values() for n in names}
                   | {n for c in crushed for n in (c["tensor"], *c["readers"])})
    denied: list[str] = []
    blob = _quantize(calibrated, job, denied, nodes)
    while (failing := _failing_op(blob, job, dtypes)) is not None:
        if failing in denied or len(denied) >= MAX_FLOAT_OPS:
            raise RuntimeError(f"int8 kernel of {failing} fails even with {denied} in float")
        denied.append(failing)
        blob = _quantize(calibrated, job, denied, nodes)
    if kept:
        kept["still_int8"] = _int8_outputs(blob, nodes)
    return blob, denied, kept, {"ranges": ranges, "crushed": crushed, "unmeasured": unmeasured}


def _quantize(calibrated: bytes, job: dict[str, Any], ops: list[str], nodes: list[str]
              ) -> bytes:
    """TFLite's MLIR quantizer on the calibrated model, as TFLiteConverter calls it (float
    input and output, per-channel weights unless ``per_tensor_weights``), with op types
    (``ops``) and op output tensors (``nodes``) kept in float; then, as the converter does,
    sparse weights (``--sparse``) and shared read-only buffers."""
    from tensorflow.lite.python import lite
    from tensorflow.lite.python.convert import mlir_quantize

    blob = mlir_quantize(calibrated, disable_per_channel=bool(job.get("per_tensor_weights")),
                         denylisted_ops=ops or None, denylisted_nodes=nodes or None)
    if job.get("sparse"):
        blob = lite._mlir_sparsify(blob)
    return lite._deduplicate_readonly_buffers(blob)


def _own_ranges(calibrated: bytes, job: dict[str, Any], dtypes: list[Any]
                ) -> tuple[bytes, list[dict[str, Any]]]:
    """The calibrated model with the float tensors whose logged range is CRUSH times their own
    or more (int8 would erase them) given their own min/max, re-measured on the same
    calibration samples with every tensor kept (``experimental_preserve_all_tensors``); and
    those tensors. LiteRT's calibrator logs an op's inputs again after the op ran; when the
    memory planner let the op write its output over an input (an ADD in place), the input is
    logged with the output's values (tensorflow/tensorflow#127842). Seen: the BERT fixture's
    scaled attention scores logged as [-3.4e38, 12.2] (the mask Add's output over them), their
    own values [-11.9, 12.2]: int8 scale 1.3e36, every score 0. Milder differences (a residual
    Add's wider range logged on its input) are left as logged: the wider range is headroom
    for inputs beyond the calibration set (re-measuring them all moved the ViT fixture's int8
    cosine from 0.9908 to 0.9897, under its 0.99 gate)."""
    import numpy as np

    model = _schema().ModelT.InitFromPackedBuf(bytearray(calibrated), 0)
    tensors = model.subgraphs[0].tensors
    changed = []
    for index, (lo, hi) in _measured(calibrated, job, dtypes).items():
        q = tensors[index].quantization
        if q is None or q.min is None or len(q.min) != 1 or hi <= lo:
            continue
        logged = (float(q.min[0]), float(q.max[0]))
        if logged[1] - logged[0] >= CRUSH * (hi - lo):
            q.min, q.max = np.array([lo], np.float32), np.array([hi], np.float32)
            changed.append({"tensor": tensors[index].name.decode(), "logged": list(logged),
                            "own": [lo, hi]})
    if not changed:
        return calibrated, []
    changed.sort(key=lambda c: -(c["logged"][1] - c["logged"][0]) / (c["own"][1] - c["own"][0]))
    return _packed(model, len(calibrated)), changed


def _all_tensors_interpreter(blob: bytes) -> Any:
    """LiteRT on ``blob`` with its builtin kernels only (no XNNPACK) and every tensor kept
    after a run (no tensor memory shared), tensors allocated."""
    import warnings

    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interp = Interpreter(model_content=blob, experimental_preserve_all_tensors=True,
                             experimental_op_resolver_type=(
                                 OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
    interp.allocate_tensors()
    return interp


def _measured(blob: bytes, job: dict[str, Any], dtypes: list[Any]
              ) -> dict[int, tuple[float, float]]:
    """min/max of every float op output and input of ``blob`` over the calibration samples
    (builtin kernels, no tensor memory shared)."""
    interp = _all_tensors_interpreter(blob)
    ops = interp._get_ops_details()
    indices = sorted({i for op in ops for i in op["outputs"] if i >= 0}
                     | {d["index"] for d in interp.get_input_details()})
    seen: dict[int, tuple[float, float]] = {}
    for sample in _representative(job["calibration"], job["input_order"], dtypes)():
        for detail, value in zip(interp.get_input_details(), sample, strict=False):
            interp.set_tensor(detail["index"], value.astype(detail["dtype"]))
        interp.invoke()
        for index in indices:
            value = interp.get_tensor(index)
            if value.dtype.kind != "f" or not value.size:
                continue
            lo, hi = seen.get(index, (float("inf"), float("-inf")))
            seen[index] = (min(lo, float(value.min())), max(hi, float(value.max())))
    return seen


ADDITIVE = ("ADD", "SUB")
PASS_THROUGH = ("RESHAPE", "TRANSPOSE", "EXPAND_DIMS", "SQUEEZE")


def _crushing(calibrated: bytes) -> list[dict[str, Any]]:
    """Additive ops whose output range is CRUSH times an input's or more: at int8, one step
    of the output spans that whole input, which is erased (the attention-mask Add: scores in
    [-12, 12] plus a mask of -3.4e38 or -1e4). Each is kept in float with the ops that read
    its output (through reshapes and transposes): an int8 reader would quantize that range
    again (the Softmax). ``[{"tensor", "op", "output", "input", "readers"}]``."""
    sch = _schema()
    model = sch.ModelT.InitFromPackedBuf(bytearray(calibrated), 0)
    graph = model.subgraphs[0]
    names = {v: k for k, v in vars(sch.BuiltinOperator).items() if not k.startswith("_")}

    def op_type(op: Any) -> str:
        code = model.operatorCodes[op.opcodeIndex]
        return names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "")

    def span(index: int) -> tuple[float, float] | None:
        q = graph.tensors[index].quantization
        if q is None or q.min is None or len(q.min) != 1:
            return None
        return float(q.min[0]), float(q.max[0])

    readers: dict[int, list[Any]] = {}
    for op in graph.operators:
        for i in op.inputs:
            readers.setdefault(int(i), []).append(op)
    constant = {i for i, t in enumerate(graph.tensors)
                if model.buffers[t.buffer].data is not None and len(model.buffers[t.buffer].data)}
    found = []
    for op in graph.operators:
        if op_type(op) not in ADDITIVE or (out := span(int(op.outputs[0]))) is None:
            continue
        for i in (int(i) for i in op.inputs if i >= 0 and int(i) not in constant):
            rng = span(i)
            if rng is None or rng[1] <= rng[0] or (out[1] - out[0]) < CRUSH * (rng[1] - rng[0]):
                continue
            found.append({"tensor": graph.tensors[op.outputs[0]].name.decode(),
                          "op": op_type(op), "output": list(out), "input": list(rng),
                          "readers": _readers(graph, readers, int(op.outputs[0]), op_type)})
            break
    return found


def _readers(graph: Any, readers: dict[int, list[Any]], index: int, op_type: Any) -> list[str]:
    """Output tensor names of the ops reading tensor ``index``, through PASS_THROUGH ops."""
    out, todo = [], [index]
    while todo:
        for op in readers.get(todo.pop(), ()):
            out.append(graph.tensors[op.outputs[0]].name.decode())
            if op_type(op) in PASS_THROUGH:
                todo.append(int(op.outputs[0]))
    return out


def _schema() -> Any:
    from ai_edge_litert import schema_py_generated as schema

    return schema


def _packed(model: Any, size: int) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(size + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _float_tensors(calibrated: bytes, job: dict[str, Any], dtypes: list[Any]
                   ) -> dict[str, Any]:
    """The TFLite tensors of the ONNX nodes in ``job["keep_float"]`` (source node names,
    found in the fixed-shape graph by ``_on_fixed``): onnx2tf names TF ops
    ``tf.linalg.matmul_3``, not after the ONNX node, so each node's output (ONNX Runtime on the
    fixed graph) is matched by value to the calibrated float model's tensors (LiteRT, builtin
    kernels, first calibration sample): the first op whose output equals it (relative error
    < MATCH_RTOL, any axis order). ``{"kept": {node: [tensor]}, "missing": [node],
    "absent": [node], "renamed": {node: fixed-graph node}}``."""
    sample = next(_representative(job["calibration"], job["input_order"], dtypes)())
    feeds = dict(zip(job["input_order"], sample))
    fixed = _on_fixed(job, feeds)
    chains = {node: chain for node, chain in _with_activations(
        job["onnx"], sorted(set(fixed.values()))).items()}
    onnx_out = _onnx_outputs(job["onnx"], sorted({n for c in chains.values() for n in c}), feeds)
    tensors = _tflite_tensors(calibrated, sample)
    kept: dict[str, list[str]] = {}
    taken: set[str] = set()
    for node in job["keep_float"]:
        for n in (n for n in chains.get(fixed.get(node), ()) if n in onnx_out):
            if (name := _match(onnx_out[n], tensors, taken)) is not None:
                taken.add(name)
                kept.setdefault(node, []).append(name)
    return {"kept": kept, "missing": [n for n in job["keep_float"] if n not in kept],
            "absent": [n for n in job["keep_float"] if fixed.get(n) not in chains],
            "renamed": {n: f for n, f in fixed.items() if n != f}}


def _on_fixed(job: dict[str, Any], feeds: dict[str, Any]) -> dict[str, str]:
    """Each source node of ``job["keep_float"]`` -> its node in the fixed-shape graph: by
    name where onnxsim kept it; else the node reading the same weight (an initializer with
    the same values, or their transpose: onnxsim fuses MatMul + Add into a Gemm named
    ``Gemm_3``); else the node whose output holds the same values (ONNX Runtime on both
    graphs, first calibration sample). Nodes found nowhere are left out."""
    import onnx

    fixed = onnx.load(job["onnx"])
    names = {n.name for n in fixed.graph.node}
    out = {n: n for n in job["keep_float"] if n in names}
    rest = [n for n in job["keep_float"] if n not in out]
    if not rest or not job.get("source_onnx"):
        return out
    source = onnx.load(job["source_onnx"])
    by_weight = _weight_owners(fixed)
    src_weights = {n.name: _weights(source, n) for n in source.graph.node if n.name in rest}
    for node, weights in src_weights.items():
        owner = next((by_weight[k] for k in weights if k in by_weight), None)
        if owner is not None and owner not in out.values():
            out[node] = owner
    if unmatched := [n for n in rest if n not in out]:
        out.update(_by_value(job, unmatched, feeds, set(out.values())))
    return out


def _weights(model: Any, node: Any) -> list[bytes]:
    """Keys of the float initializers (size > 1) ``node`` reads, and of their transposes."""
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    keys = []
    for x in (x for x in node.input if x in inits):
        a = numpy_helper.to_array(inits[x])
        if a.dtype.kind == "f" and a.size > 1:
            keys += [_key(a), *([_key(np.ascontiguousarray(a.T))] if a.ndim == 2 else [])]
    return keys


def _key(a: Any) -> bytes:
    return str(a.shape).encode() + a.astype("float32").tobytes()


def _weight_owners(model: Any) -> dict[bytes, str]:
    """Weight key -> the one node of ``model`` reading it (weights read by several nodes are
    left out: they name no single node)."""
    owners: dict[bytes, set[str]] = {}
    for n in model.graph.node:
        for k in _weights(model, n):
            owners.setdefault(k, set()).add(n.name)
    return {k: next(iter(v)) for k, v in owners.items() if len(v) == 1}


def _by_value(job: dict[str, Any], nodes: list[str], feeds: dict[str, Any], taken: set[str]
              ) -> dict[str, str]:
    """Source nodes -> the fixed-graph node whose output holds the same values."""
    import onnx

    src = _onnx_outputs(job["source_onnx"], nodes, feeds)
    fixed_nodes = [n.name for n in onnx.load(job["onnx"], load_external_data=False).graph.node
                   if n.name and n.name not in taken]
    values = _onnx_outputs(job["onnx"], fixed_nodes, feeds)
    tensors = [(name, v) for name, v in values.items() if getattr(v, "dtype", None) is not None
               and v.dtype.kind == "f"]
    out, used = {}, set(taken)
    for node, value in src.items():
        if (name := _match(value, tensors, used)) is not None:
            used.add(name)
            out[node] = name
    return out


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
    interp = _all_tensors_interpreter(blob)
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
