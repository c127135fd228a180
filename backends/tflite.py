"""TFLite (LiteRT) target: ONNX -> fixed shapes (onnxsim) -> onnx2tf Keras model -> TFLiteConverter
-> one ``<model>.tflite`` that runs in the stock LiteRT interpreter without the Flex delegate.

The artifact is validated through ``ai_edge_litert``'s Interpreter with its default XNNPACK
delegate. Flex (Select TF) and custom ops are named by the lint from the flatbuffer itself and
fail the target unless ``allow_flex`` is set.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtconvert import deps
from mtconvert.backends.base import (Artifact, Backend, Finding, OpTime, PreparedSource,
                                     Session, TargetOptions, TensorSpec, format_shapes)
from mtconvert.backends.options import Option
from mtconvert.backends import tflite_qparams
from mtconvert.backends.process import expect_files, run_job
from mtconvert.backends.onnx_tools import run_onnx_tool
from mtconvert.backends.tflite_routes import DEFAULT_ROUTE, LAYOUT_ROUTE, ambiguous_layout
from mtconvert.errors import ConversionError, RuntimeFailure, RuntimeUnavailable

if TYPE_CHECKING:
    import numpy as np

# ONNX ops that onnx2tf lowers to Flex unless replaced by its builtin "pseudo operators". Gelu
# is not one: onnx2tf writes tf.nn.gelu, which TFLiteConverter (TF 2.21) makes the builtin GELU
# (tflite_routes.fuse_gelu turns the Erf formula into Gelu for that reason).
PSEUDO_OPS = {"Erf": "erf", "MatMulInteger": "matmulinteger"}
TOOLS = ["onnx2tf", "tensorflow", "onnxsim", "ai-edge-litert"]


class TfliteBackend(Backend):
    name = "tflite"
    aliases = ("litert",)
    extra = "tflite"
    description = "TensorFlow Lite / LiteRT (.tflite) via onnx2tf"
    precisions = ("fp32", "fp16", "int8")
    fixed_shapes = True
    convert_requires = {"onnx2tf": "onnx2tf", "tensorflow": "tensorflow", "tf_keras": "tf-keras",
                        "onnxsim": "onnxsim", "onnx_graphsurgeon": "onnx-graphsurgeon",
                        "sng4onnx": "sng4onnx"}
    run_requires = {"ai_edge_litert": "ai-edge-litert"}
    artifact_suffixes = (".tflite",)
    addressable_intermediates = True
    sparse_weights = ("weights with >= 30 % exact zeros in TFLite's sparse tensor format (the "
                      "converter's EXPERIMENTAL_SPARSITY), densified once at load by DENSIFY ops")
    keep_float_layers = True  # full-integer only: see keeps_float
    options = (
        Option("allow_flex", "bool", False, "tflite: accept Select-TF (Flex) ops instead of "
               "failing the target.", modes=("convert", "validate")),
        Option("int8_scheme", "choice", None, "tflite int8: dynamic-range (default) or "
               "full-integer (calibrated).", choices=("dynamic", "full")),
    )

    def adopt(self, path: Path, source: PreparedSource, opts: TargetOptions) -> Artifact:
        """A .tflite built elsewhere: its I/O map and fixed input shapes from the flatbuffer."""
        shapes = {s.name: list(s.shape) for s in source.outputs
                  if all(isinstance(d, int) for d in s.shape)}
        io_map, steps = map_io(path, [s.name for s in source.inputs],
                               [s.name for s in source.outputs], shapes)
        ins, _ = _io(path)
        by_index = {t["index"]: t["shape"] for t in ins}
        fixed = {name: by_index[index] for index, name in io_map["inputs"]}
        return Artifact(target=self.name, primary=path, files=(path,), precision=opts.precision,
                        steps=("validated as built elsewhere", *steps),
                        tool_versions=deps.versions(["ai-edge-litert"]),
                        meta=io_map | {"allow_flex": bool(opts.extra.get("allow_flex"))},
                        input_shapes={k: tuple(v) for k, v in fixed.items()})

    def convert(self, source: PreparedSource, out_dir: Path, opts: TargetOptions) -> Artifact:
        log = out_dir / f"{source.name}.{self.name}.log"
        # a QDQ source's first route: full-integer with its activation scales (or rejected)
        own = tflite_qparams.job_settings(opts) if opts.route == tflite_qparams.ROUTE else {}
        work = source.work_dir / self.name
        work.mkdir(parents=True, exist_ok=True)
        kw = dict(log=log, timeout=opts.timeout_s, target=self.name)
        fixed = work / f"{source.name}.fixed.onnx"
        missing = [s.name for s in source.inputs if s.name not in source.input_shapes]
        if missing:
            raise ConversionError(f"no fixed shape for input(s) {', '.join(missing)}",
                                  target=self.name, step="fix-shapes")
        shapes = {k: list(v) for k, v in source.input_shapes.items()}
        info = run_onnx_tool("fix-shapes", source.onnx_path, fixed, shapes, step="fix-shapes", **kw)
        steps = [f"fix shapes: {format_shapes(shapes)}; onnxsim {info['nodes_before']} -> "
                 f"{info['nodes_after']} nodes; Constant nodes -> initializers "
                 f"[{info['seconds']:.1f} s]"]
        suffix = "" if opts.precision == "fp32" else f".{opts.precision}"
        out = out_dir / f"{source.name}{suffix}.tflite"
        job = self._job(source, fixed, out, opts) | own
        result = self._run_child(job, work, log, opts.timeout_s)
        expect_files([out], target=self.name, step="onnx2tf", log_path=log)
        steps += [f"route {job['route']}: {s} [{result['prepare_s']:.1f} s]"
                  for s in result["prepare_steps"]]
        steps += [f"onnx2tf pseudo-operator: {op} -> builtin ops ({n} nodes), instead of Flex"
                  for op, n in result["pseudo_ops"].items()]
        steps += [f"onnx2tf Keras model (SavedModel writing skipped) [{result['onnx2tf_s']:.1f} s]",
                  f"TFLiteConverter: {_precision_step(opts, job)} "
                  f"[{result['tflite_converter_s']:.1f} s]"]
        steps += [f"int8 full-integer: {op} kept in float (its int8 kernel failed on a "
                  "calibration sample)" for op in result.get("float_ops", [])]
        steps += sparse_steps(out) if opts.sparse else []
        if job.get("source_activations"):  # ROUTE: what carries the source's scales
            steps += tflite_qparams.steps(out, result, job["source_activations"])
        steps += calibration_steps(result.get("calibration") or {})
        steps += kept_float_steps(result.get("kept_float") or {}, opts.keep_float)
        io_map, io_steps = map_io(out, [s.name for s in source.inputs],
                                  [s.name for s in source.outputs], info["output_shapes"])
        meta = io_map | {"allow_flex": bool(opts.extra.get("allow_flex")),
                         "shape_collisions": shape_collisions(shapes, info["weight_dims"])}
        twin = None
        if job["fp32_twin"]:
            twin_path = Path(job["fp32_twin"])
            twin_map, _ = map_io(twin_path, [s.name for s in source.inputs],
                                 [s.name for s in source.outputs], info["output_shapes"])
            twin = Artifact(target=self.name, primary=twin_path, files=(twin_path,),
                            meta=meta | twin_map)
        return Artifact(target=self.name, primary=out, files=(out,), precision=opts.precision,
                        steps=tuple(steps + io_steps), tool_versions=deps.versions(TOOLS),
                        log_path=log, meta=meta, fp32_twin=twin)

    def keeps_float(self, opts: TargetOptions) -> bool:
        """Full-integer int8 only: TFLite's node denylist (QuantizationDebugger's
        denylisted_nodes) applies to the calibrated model's quantizer; the Python API has no
        node denylist for dynamic-range quantization."""
        return super().keeps_float(opts) and opts.extra.get("int8_scheme") == "full"

    def routes(self, source: PreparedSource) -> list[str]:
        """onnx2tf as it is; then, when axis sizes could mislead onnx2tf's layout guessing (an
        input axis equal to a weight dimension, or a constant with two equal axes), onnx2tf with
        its layout judgement pinned to differing shapes (tflite_routes). The pipeline converts
        the second only when the first one's artifact fails. Under --int8-scheme full a
        static-QDQ source is first tried full-integer with its own activation scales
        (tflite_qparams.ROUTE)."""
        first = [tflite_qparams.ROUTE] if tflite_qparams.applies(source) else []
        if ambiguous_layout(source):
            return [*first, DEFAULT_ROUTE, LAYOUT_ROUTE]
        return [*first, DEFAULT_ROUTE]

    def _job(self, source: PreparedSource, fixed: Path, out: Path,
             opts: TargetOptions) -> dict[str, Any]:
        keep_layout = [s.name for s in source.inputs
                       if 3 <= len(source.input_shapes.get(s.name, ())) <= 5]
        scheme = opts.extra.get("int8_scheme", "dynamic")
        if scheme not in ("dynamic", "full"):
            raise ConversionError(f"int8_scheme must be 'dynamic' or 'full', not {scheme!r}",
                                  target=self.name, step="options")
        if opts.precision == "int8" and scheme == "full" and opts.calibration is None:
            raise ConversionError("full-integer int8 needs calibration data",
                                  target=self.name, step="calibration")
        # the fp32 twin is a yardstick for the precision loss, not a shipped file: work dir only
        twin = source.work_dir / self.name / f"{out.stem}.fp32-twin.tflite"
        return {"onnx": str(fixed), "out": str(out), "precision": opts.precision,
                "fp32_twin": str(twin) if opts.precision != "fp32" else None,
                "int8_scheme": scheme, "keep_layout_inputs": keep_layout,
                "route": opts.route or DEFAULT_ROUTE, "pseudo_map": PSEUDO_OPS,
                "calibration": str(opts.calibration) if opts.calibration else None,
                "input_order": [s.name for s in source.inputs], "sparse": opts.sparse,
                "keep_float": list(opts.keep_float) if self.keeps_float(opts) else [],
                "source_onnx": str(source.onnx_path),  # keep_float names the source's nodes
                # a quantized source: per-tensor weights stay per-tensor (the source's scales)
                "per_tensor_weights": (opts.extra.get("source_quantization") or {}).get(
                    "granularity") == ["per-tensor"]}

    def _run_child(self, job: dict[str, Any], work: Path, log: Path,
                   timeout: float | None) -> dict[str, Any]:
        module = tflite_qparams.CHILD if job.get("source_activations") else \
            "mtconvert.backends.tflite_convert"
        return run_job(module, job, work / "tflite_job.json",
                       target=self.name, step="onnx2tf", log_path=log, timeout_s=timeout,
                       env={"TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "-1"})

    def lint(self, artifact: Artifact) -> list[Finding]:
        ops = tflite_ops(artifact.primary)
        special = sorted(op for op in ops if op.startswith(("FLEX:", "CUSTOM:")))
        findings = [Finding("info", "tflite-ops", f"{sum(ops.values())} operators: " + ", ".join(
            f"{op}x{n}" for op, n in ops.most_common()))]
        if artifact.meta.get("shape_collisions"):
            findings.append(Finding(
                "warning", "tflite-ambiguous-shape",
                f"input axis sizes {artifact.meta['shape_collisions']} equal weight dimensions of "
                "the model; onnx2tf infers layouts by matching sizes and can swap such axes "
                "silently (seen: sequence 32 with hidden size 32). If numerics fail, choose "
                "another --input-shape"))
        if special:
            sev = "warning" if artifact.meta.get("allow_flex") else "error"
            findings.append(Finding(
                sev, "tflite-flex-ops",
                f"ops the stock LiteRT runtime rejects (need the Select-TF/custom op library): "
                f"{', '.join(special)}" + ("" if sev == "warning" else
                                           "; pass --allow-flex to accept them")))
        return findings

    def open(self, artifact: Artifact, threads: int) -> Session:
        return TfliteSession(artifact, threads)

    def snippets(self, artifact: Artifact, inputs: list[TensorSpec],
                 outputs: list[TensorSpec]) -> dict[str, str]:
        """Names, dtypes, shapes and input/output positions from the flatbuffer itself."""
        from mtconvert.backends import snippets as sn

        sch = _schema()
        graph = sch.Model.GetRootAsModel(artifact.primary.read_bytes(), 0).Subgraphs(0)
        types = {v: k.lower() for k, v in vars(sch.TensorType).items() if not k.startswith("_")}

        def port(position: int, index: int, source: str, perm: Any = None) -> Any:
            t = graph.Tensors(index)
            shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
            note = f"channels-last: transpose by {list(perm)} to the source's layout" if perm else ""
            return sn.Port(_clean(t.Name().decode()), source, shape,
                           types.get(t.Type(), "float32"), position, note)

        at_in = {int(i): n for n, i in enumerate(graph.InputsAsNumpy())}
        at_out = {int(i): n for n, i in enumerate(graph.OutputsAsNumpy())}
        ins = [port(at_in[int(i)], int(i), name) for i, name in artifact.meta["inputs"]]
        outs = [port(at_out[int(i)], int(i), name, perm)
                for i, name, perm in artifact.meta["outputs"]]
        name = artifact.primary.name
        return {"kotlin": sn.kotlin_tflite(name, ins, outs),
                "python": sn.python_tflite(name, ins, outs)}


def calibration_steps(calibration: dict[str, Any]) -> list[str]:
    """Full-integer int8: the calibration ranges re-measured, and the additive ops kept in
    float because their int8 output would erase an input (tflite_convert._own_ranges,
    _crushing)."""
    steps = []
    if why := calibration.get("unmeasured"):
        steps.append(f"int8 calibration: ranges as logged, not re-measured ({why})")
    if ranges := calibration.get("ranges"):
        worst = ranges[0]
        steps.append(
            f"int8 calibration: {len(ranges)} tensor range(s) logged 256x their own values or "
            "wider (int8 would erase them) re-measured with every tensor kept (LiteRT's "
            "calibrator logs an input after an in-place op overwrote it, tensorflow#127842); "
            f"widest: {worst['tensor']} logged {_span(worst['logged'])}, "
            f"its own values {_span(worst['own'])}")
    steps += [f"int8 full-integer: {c['tensor']} ({c['op']}) kept in float with its readers "
              f"{', '.join(c['readers']) or '(none)'}: its int8 output {_span(c['output'])} "
              f"would hold an input {_span(c['input'])} in under one step"
              for c in calibration.get("crushed", ())]
    return steps


def _span(pair: list[float]) -> str:
    return f"[{pair[0]:.3g}, {pair[1]:.3g}]"


def kept_float_steps(kept: dict[str, Any], asked: tuple[str, ...]) -> list[str]:
    """TargetOptions.keep_float: each source node kept in float with its TFLite tensor; the
    ones not found, or not honoured (dynamic-range int8)."""
    if asked and not kept:
        return ["int8 float fallback: keep_float not honoured (only full-integer int8 has a "
                f"node denylist); not kept: {', '.join(asked)}"]
    still = set(kept.get("still_int8", ()))
    renamed = [f"int8 float fallback: {node} is {fixed} in the fixed-shape graph (same weight "
               "or same output values)" for node, fixed in kept.get("renamed", {}).items()]
    steps = [f"int8 float fallback: {node} kept in float (tflite {', '.join(names)})"
             + (" - but the quantizer left it int8" if still & set(names) else "")
             for node, names in kept.get("kept", {}).items()]
    steps = renamed + steps
    absent = set(kept.get("absent", ()))
    if unmatched := [n for n in kept.get("missing", ()) if n not in absent]:
        steps.append("int8 float fallback: no TFLite tensor matched, not kept: "
                     + ", ".join(unmatched))
    if absent:
        steps.append("int8 float fallback: not in the fixed-shape graph, not kept: "
                     + ", ".join(sorted(absent)))
    return steps


def sparse_steps(path: Path) -> list[str]:
    """--sparse: what TFLite's converter stored sparsely (each sparse weight feeds a DENSIFY op;
    its DenseToSparse pass keeps a weight under 30 % zeros dense)."""
    n = tflite_ops(path).get("DENSIFY", 0)
    if not n:
        return ["--sparse: no weight with the 30 % exact zeros TFLite's converter needs to "
                "encode it sparsely: nothing stored sparsely, weights stored dense"]
    return [f"--sparse: {n} weights stored in TFLite's sparse format (EXPERIMENTAL_SPARSITY), "
            "each densified once at load by a DENSIFY op; XNNPACK's sparse path takes NCHW "
            "convolutions only, so FULLY_CONNECTED / BATCH_MATMUL run the densified weights: "
            "a smaller file, not faster inference"]


def shape_collisions(shapes: dict[str, list[int]], weight_dims: list[int]) -> list[int]:
    """Input axis sizes (other than batch) that equal a weight dimension of the model."""
    sizes = {d for dims in shapes.values() for d in dims[1:] if d > 1}
    return sorted(sizes & set(weight_dims))


def _precision_step(opts: TargetOptions, job: dict[str, Any]) -> str:
    if opts.precision == "fp16":
        return "float16 weights (Optimize.DEFAULT, supported_types=float16)"
    if opts.precision == "int8" and job["int8_scheme"] == "full":
        return ("int8 full-integer (representative dataset from calibration data; float "
                "fallback for ops without int8 kernels)")
    if opts.precision == "int8":
        return "int8 dynamic-range (weights int8, activations float)"
    return "float32 (builtin ops preferred; Select-TF allowed only to name what needs it)"


# --- the flatbuffer ---------------------------------------------------------------------------

def _schema() -> Any:
    from ai_edge_litert import schema_py_generated as schema

    return schema


def tflite_ops(path: Path) -> Counter[str]:
    """Operator histogram read from the flatbuffer, without creating an interpreter.
    Select-TF ops are reported as ``FLEX:<name>``, other custom ops as ``CUSTOM:<name>``."""
    sch = _schema()
    names = {v: k for k, v in vars(sch.BuiltinOperator).items() if not k.startswith("_")}
    model = sch.Model.GetRootAsModel(path.read_bytes(), 0)
    ops: Counter[str] = Counter()
    for si in range(model.SubgraphsLength()):
        graph = model.Subgraphs(si)
        for oi in range(graph.OperatorsLength()):
            code = model.OperatorCodes(graph.Operators(oi).OpcodeIndex())
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            if builtin == sch.BuiltinOperator.CUSTOM:
                custom = code.CustomCode().decode()
                ops[f"FLEX:{custom[4:]}" if custom.startswith("Flex") else f"CUSTOM:{custom}"] += 1
            else:
                ops[names.get(builtin, f"BUILTIN_{builtin}")] += 1
    return ops


def _io(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    sch = _schema()
    model = sch.Model.GetRootAsModel(path.read_bytes(), 0)
    graph = model.Subgraphs(0)

    def describe(indices: Any) -> list[dict[str, Any]]:
        return [{"index": int(i), "name": graph.Tensors(i).Name().decode(),
                 "shape": graph.Tensors(i).ShapeAsNumpy().tolist()} for i in indices]

    return describe(graph.InputsAsNumpy()), describe(graph.OutputsAsNumpy())


def map_io(path: Path, onnx_inputs: list[str], onnx_outputs: list[str],
           onnx_output_shapes: dict[str, list[int | None]]) -> tuple[dict[str, Any], list[str]]:
    """Map the .tflite's tensors back to the source's names and layouts. Inputs keep their ONNX
    names (by name when all match, else by order); outputs come in ONNX order. A rank-3..5
    output whose shape is the channels-last form of the source's gets a transpose back."""
    ins, outs = _io(path)
    if len(ins) != len(onnx_inputs) or len(outs) != len(onnx_outputs):
        raise ConversionError(f"the .tflite has {len(ins)} inputs/{len(outs)} outputs, the "
                              f"source {len(onnx_inputs)}/{len(onnx_outputs)}", target="tflite",
                              step="io-map")
    by_name = {_clean(t["name"]): t["index"] for t in ins}
    steps = []
    if set(onnx_inputs) <= set(by_name):
        inputs = [[by_name[n], n] for n in onnx_inputs]
    else:
        inputs = [[t["index"], n] for t, n in zip(ins, onnx_inputs, strict=True)]
        steps.append("io-map: input names differ; mapped by position")
    outputs = []
    for t, name in zip(outs, onnx_outputs, strict=True):
        perm = _layout_perm(t["shape"], onnx_output_shapes.get(name))
        outputs.append([t["index"], name, perm])
        if perm:
            steps.append(f"io-map: output {name} is channels-last; transposed by {perm}")
    return {"inputs": inputs, "outputs": outputs}, steps


def _clean(name: str) -> str:
    name = name.split(":")[0]
    return name.removeprefix("serving_default_")


def _layout_perm(tfl: list[int], onnx: list[int | None] | None) -> list[int] | None:
    if not onnx or None in onnx or list(tfl) == list(onnx) or not 3 <= len(tfl) <= 5:
        return None
    perm = [0, len(tfl) - 1, *range(1, len(tfl) - 1)]  # N...C -> NC...
    return perm if [tfl[p] for p in perm] == list(onnx) else None


# --- the session --------------------------------------------------------------------------

class TfliteSession(Session):
    """LiteRT's Interpreter with its default XNNPACK delegate; tensors addressed by index."""

    profile_unavailable = "LiteRT's C API (libLiteRt.so in ai-edge-litert) is not usable here"

    def __init__(self, artifact: Artifact, threads: int):
        special = [op for op in tflite_ops(artifact.primary) if ":" in op]
        if any(op.startswith("CUSTOM:") for op in special):
            raise RuntimeFailure(f"no runtime here implements the custom ops {special}",
                                 target="tflite", step="open")
        if special:  # neither LiteRT nor TensorFlow 2.21's Python interpreter links Select-TF ops
            raise RuntimeUnavailable(f"no interpreter here runs Flex ops ({', '.join(special)}); "
                                     "the app must link the Select-TF ops library",
                                     target="tflite", step="open")
        from ai_edge_litert.interpreter import Interpreter

        self._path, self._threads = str(artifact.primary), threads
        self._int8 = artifact.precision == "int8"
        self._interp = Interpreter(model_path=self._path, num_threads=threads)
        self._interp.allocate_tensors()
        delegated = any(d.get("op_name") == "DELEGATE" for d in self._interp._get_ops_details())
        self.runtime = f"ai-edge-litert{'+xnnpack' if delegated else ''}"
        self._inputs = [(int(i), n) for i, n in artifact.meta["inputs"]]
        self._outputs = [(int(i), n, p) for i, n, p in artifact.meta["outputs"]]
        details = {d["index"]: d for d in self._interp.get_input_details()}
        self.inputs = [TensorSpec(n, tuple(int(x) for x in details[i]["shape"]),
                                  details[i]["dtype"].__name__) for i, n in self._inputs]
        self.outputs = [TensorSpec(n, (), "") for _, n, _ in self._outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np

        self._invoke(self._interp, feeds)
        out = {}
        for index, name, perm in self._outputs:
            value = self._interp.get_tensor(index)
            out[name] = np.transpose(value, perm) if perm else value
        return out

    def _invoke(self, interp: Any, feeds: dict[str, np.ndarray]) -> None:
        import numpy as np

        for (index, name), spec in zip(self._inputs, self.inputs, strict=True):
            interp.set_tensor(index, np.ascontiguousarray(feeds[name], dtype=spec.dtype))
        interp.invoke()

    def profile(self, feeds: dict[str, np.ndarray], runs: int) -> list[OpTime] | None:
        """LiteRT's own op profiler, through its C API on a second load of the .tflite
        (mtconvert.backends.profiling.tflite): builtin kernels and XNNPACK's operators."""
        import numpy as np

        from mtconvert.backends.profiling import tflite as tflite_profiling

        arrays = {index: np.ascontiguousarray(feeds[name], dtype=spec.dtype)
                  for (index, name), spec in zip(self._inputs, self.inputs, strict=True)}
        try:
            return tflite_profiling.profile(Path(self._path), self._threads, arrays, runs)
        except tflite_profiling.ProfilerUnavailable as exc:
            self.profile_unavailable = str(exc)
            return None

    def intermediates(self, feeds: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
        """Every op's float outputs, from a second interpreter that keeps all tensors and runs
        the builtin kernels (XNNPACK would hide the tensors inside its partitions)."""
        import warnings

        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        if self._int8:  # builtin int8 kernels can abort (below); XNNPACK, every tensor an output
            interp = Interpreter(model_content=_all_outputs(Path(self._path).read_bytes()),
                                 num_threads=self._threads)
        else:
            with warnings.catch_warnings():  # "intended for debugging purposes only": it is
                warnings.simplefilter("ignore")
                interp = Interpreter(model_path=self._path, num_threads=self._threads,
                                     experimental_preserve_all_tensors=True,
                                     experimental_op_resolver_type=(
                                         OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
        interp.allocate_tensors()
        self._invoke(interp, feeds)
        details = {t["index"]: t for t in interp.get_tensor_details()}
        found = []
        for op in interp._get_ops_details():
            for index in op["outputs"]:
                value = interp.get_tensor(index) if index >= 0 else None
                if value is not None and value.dtype.kind != "f":  # int8: its real values
                    value = _dequantized(value, details[index]["quantization"])
                if value is not None and value.dtype.kind == "f":
                    found.append((details[index]["name"], op["op_name"], value.copy()))
        return found


def _all_outputs(blob: bytes) -> bytes:
    """The .tflite with every op output also a subgraph output, so the delegate that runs it
    (XNNPACK) hands out every tensor. The builtin kernels cannot stand in for int8: LiteRT's
    builtin int8 ADD aborts the process in Prepare when its rescale multiplier is >= 1 (seen:
    the BERT fixture's attention-mask Add, quantized with scale 1.3e36), which XNNPACK runs."""
    import flatbuffers

    model = _schema().ModelT.InitFromPackedBuf(bytearray(blob), 0)
    graph = model.subgraphs[0]
    outs = list(graph.outputs)
    outs += [o for op in graph.operators for o in op.outputs if o >= 0 and o not in set(outs)]
    graph.outputs = outs
    builder = flatbuffers.Builder(len(blob) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _dequantized(value: np.ndarray, quantization: tuple[float, int]) -> np.ndarray | None:
    """A quantized tensor's real values, (q - zero point) x scale; None for an integer
    tensor that holds no quantized reals (ids, shapes: scale 0)."""
    import numpy as np

    scale, zero_point = quantization
    if not scale or value.dtype.kind not in "iu":
        return None
    return ((value.astype(np.float32) - zero_point) * scale).astype(np.float32)
