"""ONNX Runtime Mobile target: onnxsim simplification, optional int8 dynamic quantization, and
the ORT format via onnxruntime's own tooling (``.ort`` plus the required-operators config for a
reduced build). The session loads the ``.ort`` file itself.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtconvert import deps
from mtconvert.backends.base import (Artifact, Backend, Finding, OpTime, PreparedSource,
                                     Session, TargetOptions, TensorSpec)
from mtconvert.backends.process import expect_files, python_cmd, run_tool
from mtconvert.backends.onnx_tools import run_onnx_tool

if TYPE_CHECKING:
    import numpy as np

TARGET_PLATFORM = "arm"  # phones; the .ort still runs on x86 for validation


class OnnxMobileBackend(Backend):
    name = "onnx-mobile"
    aliases = ("ort", "onnxruntime-mobile")
    extra = "all"
    description = "ONNX Runtime Mobile (.ort)"
    precisions = ("fp32", "int8")
    keep_float_layers = True  # quantize_dynamic's nodes_to_exclude
    convert_requires = {"onnx": "onnx", "onnxsim": "onnxsim", "onnxruntime": "onnxruntime"}
    run_requires = {"onnxruntime": "onnxruntime"}
    sidecar_suffixes = (".config",)  # the operator list for a reduced ORT build
    artifact_suffixes = (".ort", ".onnx")
    no_sparse_weights = ("ONNX Runtime converts a model's sparse initializers to dense "
                         "tensors when it loads it, and the graph's MatMul/Gemm kernels are "
                         "dense: sparse storage is not offered")

    def adopt(self, path: Path, source: PreparedSource, opts: TargetOptions) -> Artifact:
        config = path.with_suffix(".required_operators.config")
        files = (path, config) if config.is_file() else (path,)
        meta = {"onnx": str(path)} if path.suffix == ".onnx" else {}
        return Artifact(target=self.name, primary=path, files=files, precision=opts.precision,
                        steps=("validated as built elsewhere",),
                        tool_versions=deps.versions(["onnxruntime"]), meta=meta)

    def convert(self, source: PreparedSource, out_dir: Path, opts: TargetOptions) -> Artifact:
        log = out_dir / f"{source.name}.{self.name}.log"
        work = source.work_dir / self.name
        work.mkdir(parents=True, exist_ok=True)
        stem = source.name if opts.precision == "fp32" else f"{source.name}.{opts.precision}"
        onnx_path, steps = self._prepare_onnx(source, work / f"{stem}.onnx", opts, log)
        ort_dir = work / "ort"
        t0 = time.perf_counter()
        run_tool(python_cmd("-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(onnx_path),
                            "--output_dir", str(ort_dir), "--optimization_style", "Fixed",
                            "--target_platform", TARGET_PLATFORM),
                 target=self.name, step="ort-format", log_path=log, timeout_s=opts.timeout_s)
        produced_ort = ort_dir / f"{stem}.ort"
        produced_cfg = ort_dir / f"{stem}.required_operators.config"
        expect_files([produced_ort, produced_cfg], target=self.name, step="ort-format", log_path=log)
        ort_file = out_dir / f"{stem}.ort"
        cfg_file = out_dir / f"{stem}.required_operators.config"
        shutil.move(produced_ort, ort_file)
        shutil.move(produced_cfg, cfg_file)
        steps.append(f"ort-format: onnxruntime.tools.convert_onnx_models_to_ort "
                     f"(optimization_style=Fixed, target_platform={TARGET_PLATFORM}) "
                     f"[{time.perf_counter() - t0:.1f} s]")
        return Artifact(target=self.name, primary=ort_file, files=(ort_file, cfg_file),
                        precision=opts.precision, steps=tuple(steps), log_path=log,
                        tool_versions=deps.versions(["onnx", "onnxsim", "onnxruntime"]),
                        meta={"onnx": str(onnx_path)})

    def _prepare_onnx(self, source: PreparedSource, dst: Path, opts: TargetOptions,
                      log: Path) -> tuple[Path, list[str]]:
        kw = dict(log=log, timeout=opts.timeout_s, target=self.name)
        simplified = dst.with_suffix(".sim.onnx")
        res = info = run_onnx_tool("simplify", source.onnx_path, simplified, step="onnxsim", **kw)
        steps = [f"onnxsim: {res['nodes_before']} -> {res['nodes_after']} nodes "
                 f"[{res['seconds']:.1f} s]" if res["simplified"]
                 else "onnxsim: simplified model failed its check; kept the original graph"]
        if "QuantizeLinear" in info["quantized_ops"]:
            steps.append(_uint8_activations(simplified, kw))
        if opts.precision != "int8":
            simplified.replace(dst)
            return dst, steps
        if info["quantized_ops"]:
            simplified.replace(dst)
            steps.append(f"int8: source is already quantized ({', '.join(info['quantized_ops'])});"
                         " not quantized again")
            return dst, steps
        q = run_onnx_tool("quantize-dynamic", simplified, dst, list(opts.keep_float),
                          step="quantize", **kw)
        steps.append("int8: onnxruntime.quantization.quantize_dynamic (weights QInt8, "
                     f"activations quantized at run time) [{q['seconds']:.1f} s]")
        steps += kept_float_steps(q["kept"], q["missing"])
        return dst, steps

    def lint(self, artifact: Artifact) -> list[Finding]:
        kernels = int8_kernels_finding(artifact.primary)
        onnx_path = Path(artifact.meta.get("onnx", ""))
        if not onnx_path.is_file():
            return [Finding("info", "ep-partitioning", "skipped: the converted ONNX graph is "
                            "not available to analyse"), *kernels]
        return ep_partitioning(onnx_path) + kernels

    def open(self, artifact: Artifact, threads: int) -> Session:
        return OrtSession(artifact.primary, threads)

    def snippets(self, artifact: Artifact, inputs: list[TensorSpec],
                 outputs: list[TensorSpec]) -> dict[str, str]:
        """ONNX Runtime takes the source's names and dtypes as they are."""
        from mtconvert.backends import snippets as sn

        name, ins, outs = artifact.primary.name, sn.ports(inputs), sn.ports(outputs)
        return {"kotlin": sn.kotlin_onnxruntime(name, ins, outs),
                "python": sn.python_onnxruntime(name, ins, outs)}


def _uint8_activations(onnx_path: Path, kw: dict[str, Any]) -> str:
    """A QDQ graph's int8 activations re-encoded as uint8 in place (onnx_tools.qdq_uint8), when
    ONNX Runtime says it is exact; the step says what happened."""
    rewritten = onnx_path.with_suffix(".uint8.onnx")
    r = run_onnx_tool("qdq-uint8", onnx_path, rewritten, step="qdq-uint8", **kw)
    if not r["rewritten"]:
        return "qdq-uint8: no int8 activation QuantizeLinear to re-encode; graph unchanged"
    if not r["kept"]:
        why = (f"ONNX Runtime refused it ({r['error']})" if "error" in r else
               f"it changed ONNX Runtime's outputs (max abs {r['max_diff']:.3g})")
        return (f"qdq-uint8: re-encoding {r['rewritten']} int8 activation QuantizeLinear as "
                f"uint8 not kept: {why}; the int8 x int8 QLinearMatMul stay (MLAS's generic "
                "kernel on x86)")
    rewritten.replace(onnx_path)
    return (f"qdq-uint8: {r['rewritten']} int8 activation QuantizeLinear (and their "
            "DequantizeLinear) re-encoded as uint8, zero point + 128: the same values, bit-equal "
            "in ONNX Runtime unoptimized; weights stay int8, so the QLinearMatMul are uint8 x "
            f"int8 (MLAS's VNNI / udot kernels) [{r['seconds']:.1f} s]")


INTEGER_MATMULS = {"QLinearMatMul": (0, 3), "MatMulInteger": (0, 1),
                   "MatMulIntegerToFloat": (0, 1), "DynamicQuantizeMatMul": (None, 1)}
FLOAT_MATMULS = ("MatMul", "FusedMatMul", "Gemm")
_ELEM = {1: "float", 2: "uint8", 3: "int8", 10: "float16"}


def matmul_kernels(ort_path: Path) -> dict[str, int]:
    """The matrix products of an ``.ort`` as saved (after its fixed optimizations): integer
    ones by op and operand types ("QLinearMatMul uint8 x int8"; x86's MLAS has a VNNI kernel
    for uint8 x int8, only a generic one for int8 x int8), float ones as "float MatMul"."""
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import (
        InferenceSession, TensorTypeAndShape)

    buf = bytearray(ort_path.read_bytes())
    graph = InferenceSession.InferenceSession.GetRootAsInferenceSession(buf, 0).Model().Graph()
    elem: dict[str, str] = {}
    for i in range(graph.NodeArgsLength()):
        arg = graph.NodeArgs(i)
        t = arg.Type()
        if t is not None and t.Value() is not None:
            tensor = TensorTypeAndShape.TensorTypeAndShape()
            tensor.Init(t.Value().Bytes, t.Value().Pos)
            elem[arg.Name().decode()] = _ELEM.get(tensor.ElemType(), str(tensor.ElemType()))
    counts: dict[str, int] = {}
    for i in range(graph.NodesLength()):
        node = graph.Nodes(i)
        op = node.OpType().decode()
        if op in INTEGER_MATMULS:
            a, b = (node.Inputs(j).decode() if j is not None else None
                    for j in INTEGER_MATMULS[op])
            key = f"{op} {elem.get(a, 'float') if a else 'float'} x {elem.get(b, '?')}"
        elif op in FLOAT_MATMULS:
            key = f"float {op}"
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return counts


def int8_kernels_finding(path: Path) -> list[Finding]:
    """For an ``.ort`` with integer matrix products: which kernels it asks for, and how many
    products stay float. Information; nothing for a float graph."""
    if path.suffix != ".ort" or not path.is_file():
        return []
    counts = matmul_kernels(path)
    if not any(k.split()[0] in INTEGER_MATMULS for k in counts):
        return []
    parts = ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return [Finding("info", "int8-kernels", f"matrix products in the .ort: {parts}")]


def kept_float_steps(kept: list[str], missing: list[str]) -> list[str]:
    """One step per node kept in float (TargetOptions.keep_float), and the names not found."""
    steps = [f"int8 float fallback: {n} kept in float" for n in kept]
    if missing:
        steps.append(f"int8 float fallback: not in the converted graph, not kept: "
                     f"{', '.join(missing)}")
    return steps


def ep_partitioning(onnx_path: Path) -> list[Finding]:
    """How much of the graph NNAPI (Android) and Core ML (iOS) execution providers could take,
    from onnxruntime's own mobile usability checker. Information, not a gate: the CPU EP runs
    every op."""
    import onnx
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    model = onnx.load(str(onnx_path))
    findings = []
    checks = {"nnapi": lambda: uc.check_nnapi_partitions(model, False),
              "coreml-mlprogram": lambda: uc.check_coreml_partitions(
                  model, False, "coreml_supported_mlprogram_ops.md")}
    for ep, check in checks.items():
        try:
            info = check()
        except Exception as exc:  # the checker is best-effort information
            findings.append(Finding("info", f"ep-{ep}", f"{ep}: analysis failed: {exc}"))
            continue
        pct = 100.0 * info.num_supported_nodes / max(1, info.num_nodes)
        unsupported = ", ".join(sorted(info.unsupported_ops)) or "none"
        findings.append(Finding(
            "info", f"ep-{ep}",
            f"{ep} EP could take {info.num_supported_nodes}/{info.num_nodes} nodes ({pct:.0f}%) "
            f"in {info.num_partitions} partition(s), suitability {info.suitability().name}; "
            f"unsupported ops: {unsupported}"))
    return findings


class OrtSession(Session):
    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self._sess = ort.InferenceSession(str(path), sess_options=so,
                                          providers=["CPUExecutionProvider"])
        self.inputs = [_spec(i) for i in self._sess.get_inputs()]
        self.outputs = [_spec(o) for o in self._sess.get_outputs()]
        self._names = [o.name for o in self.outputs]
        self._path, self._threads = Path(path), threads

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._names, self._sess.run(self._names, feeds), strict=True))

    def profile(self, feeds: dict[str, np.ndarray], runs: int) -> list[OpTime]:
        """ONNX Runtime's own profiler (mtconvert.backends.profiling.ort)."""
        from mtconvert.backends.profiling import ort as ort_profiling

        return ort_profiling.profile(self._path, self._threads, feeds, runs)


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(bool)": "bool", "tensor(double)": "float64",
              "tensor(int8)": "int8", "tensor(uint8)": "uint8"}


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else (d or None) for d in arg.shape)
    return TensorSpec(arg.name, shape, _ORT_TYPES.get(arg.type, arg.type))
