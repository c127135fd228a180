"""ExecuTorch target: ``<model>[.precision].pte`` lowered to XNNPACK, run by ExecuTorch's runtime.

Routes: ``torch.export`` (PyTorch sources: the module is exported here at the validation shapes)
and ``onnx2torch`` (ONNX sources, or PyTorch sources whose export fails; the bridge of
``mtconvert.backends.coreml.onnx_bridge``). The conversion child lowers the program with
``to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])`` and writes
``.to_executorch()``'s buffer. int8 is the XNNPACK quantizer through PT2E: dynamic activations
by default, static ones calibrated on the run's samples with ``--int8-scheme full``; fp16 casts
weights and activations to float16 (XNNPACK's fp16 kernels).

The session runs the ``.pte`` with ``executorch.runtime`` (the pip package's runtime: portable
kernels plus the XNNPACK delegate) in the worker child, with its thread pool set to the run's
thread count. That runtime exposes no intermediate tensors of a delegated graph (it is built
with the event tracer, whose ETDump ``--profile`` reads for timings; whether its debug buffer
holds delegated intermediates was not checked), so localization is by bisection.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtconvert import deps
from mtconvert.backends import torch_inputs
from mtconvert.backends.base import (Artifact, Backend, Finding, OpTime, PreparedSource,
                                     Session, TargetOptions, TensorSpec, format_shapes,
                                     match_names)
from mtconvert.backends.options import Option
from mtconvert.backends.process import expect_files, run_job
from mtconvert.errors import ConversionError, ModelLoadError, RuntimeFailure

if TYPE_CHECKING:
    import numpy as np

TOOLS = ["executorch", "torch", "torchao", "onnx2torch", "onnxsim"]
NAME = "executorch"


class ExecutorchBackend(Backend):
    name = NAME
    aliases = ("pte", "pytorch-mobile")
    extra = "executorch"
    description = "ExecuTorch program (.pte) via torch.export, lowered to XNNPACK"
    precisions = ("fp32", "fp16", "int8")
    fixed_shapes = True
    convert_requires = {"executorch": "executorch", "torch": "torch"}
    run_requires = {"executorch": "executorch", "torch": "torch"}
    artifact_suffixes = (".pte",)
    no_sparse_weights = ("the XNNPACK delegate's graph schema in a .pte has no sparse tensor "
                         "format, and XNNPACK's sparse path takes NCHW convolutions only")
    addressable_intermediates = False  # a delegated graph's tensors are not exposed: bisection
    # the same flag as tflite's (the first declaration of a name wins: the help names both)
    options = (
        Option("int8_scheme", "choice", None, "tflite and executorch int8: dynamic-range "
               "(default) or full-integer (calibrated).", choices=("dynamic", "full")),
    )

    def routes(self, source: PreparedSource) -> list[str]:
        if source.torch_module is not None:
            bridge = ["onnx2torch"] if torch_inputs.has_onnx2torch() else []
            return ["torch.export", *bridge]
        return ["onnx2torch"]

    def convert(self, source: PreparedSource, out_dir: Path, opts: TargetOptions) -> Artifact:
        log = out_dir / f"{source.name}.{self.name}.log"
        work = source.work_dir / self.name / (opts.route or "default")
        work.mkdir(parents=True, exist_ok=True)
        shapes = {s.name: list(source.input_shapes[s.name]) for s in source.inputs}
        steps: list[str] = []
        dims = _dims(source, opts) if opts.route == "torch.export" else {}
        if dims:
            kind, model = "pt2", _export_with_dims(source, shapes, dims, work / "program.pt2")
            steps.append(f"torch.export of the PyTorch module with Dims {_format_dims(dims)} "
                         f"(the validated range), example at {format_shapes(shapes)}")
        elif opts.route == "torch.export":
            kind, model = "pt2", torch_inputs.export_module(source, shapes,
                                                            work / "program.pt2", self.name)
            steps.append(f"torch.export of the PyTorch module at {format_shapes(shapes)}")
        else:
            kind, model = "onnx", torch_inputs.fixed_onnx(source, shapes, work, log,
                                                          opts.timeout_s, steps, self.name)
        fixed_note = None if dims else _fixed_dynamic_axes(source, shapes, opts.route)
        if fixed_note:
            steps.append(fixed_note)
        suffix = "" if opts.precision == "fp32" else f".{opts.precision}"
        out = out_dir / f"{source.name}{suffix}.pte"
        twin = work / f"{source.name}.fp32-twin.pte" if opts.precision != "fp32" else None
        job = {"kind": kind, "model": str(model), "out": str(out),
               "input_order": [s.name for s in source.inputs],
               "input_shapes": [shapes[s.name] for s in source.inputs],
               "input_dtypes": [s.dtype for s in source.inputs],
               "precision": opts.precision,
               "int8_scheme": opts.extra.get("int8_scheme") or "dynamic",
               "calibration": str(opts.calibration) if opts.calibration else None,
               "fp32_twin": str(twin) if twin else None, "dims": dims,
               "lowered_store": (str(opts.cache_dir / "executorch-lowered")
                                 if opts.cache_dir else None)}
        result = run_job("mtconvert.backends.executorch.convert", job, work / "executorch_job.json",
                         target=self.name, step="executorch", log_path=log,
                         timeout_s=opts.timeout_s, env={"TQDM_DISABLE": "1"})
        expect_files([out] + ([twin] if twin else []), target=self.name, step="executorch",
                     log_path=log)
        steps += result["steps"]
        meta = {"inputs": [s.name for s in source.inputs],
                "outputs": [s.name for s in source.outputs],
                "delegation": result["delegation"], "program": result["program"],
                "fixed_dynamic_axes": fixed_note, "dims": dims}
        fixed = {k: tuple(v) for k, v in shapes.items()}
        fp32 = Artifact(target=self.name, primary=twin, files=(twin,), input_shapes=fixed,
                        meta={"inputs": meta["inputs"], "outputs": meta["outputs"],
                              "dims": dims}) \
            if twin else None
        return Artifact(target=self.name, primary=out, files=(out,), precision=opts.precision,
                        steps=tuple(steps), tool_versions=deps.versions(TOOLS), log_path=log,
                        meta=meta, fp32_twin=fp32, input_shapes=fixed)

    def adopt(self, path: Path, source: PreparedSource, opts: TargetOptions) -> Artifact:
        """A .pte built elsewhere: inputs and outputs mapped to the source's in order (a .pte
        keeps no tensor names), its fixed input shapes read from the program."""
        program = _describe(path, None, opts.timeout_s)
        ins = match_names([f"input {i}" for i in range(len(program["inputs"]))],
                          [s.name for s in source.inputs], "input", ".pte")
        outs = match_names([f"output {i}" for i in range(len(program["outputs"]))],
                           [s.name for s in source.outputs], "output", ".pte")
        shapes = {name: tuple(t["shape"]) for name, t in zip(ins, program["inputs"], strict=True)}
        return Artifact(target=self.name, primary=path, files=(path,), precision=opts.precision,
                        steps=(f"validated as built elsewhere: inputs {', '.join(ins)} and "
                               f"outputs {', '.join(outs)} in the program's order",),
                        tool_versions=deps.versions(["executorch"]),
                        meta={"inputs": ins, "outputs": outs, "program": program},
                        input_shapes=shapes)

    def lint(self, artifact: Artifact) -> list[Finding]:
        program = artifact.meta.get("program") or _describe(artifact.primary, artifact.log_path,
                                                            None)
        out = findings(program, artifact.meta.get("delegation"))
        if artifact.meta.get("fixed_dynamic_axes"):
            out.append(Finding("warning", "executorch-fixed-shapes",
                               artifact.meta["fixed_dynamic_axes"]))
        if artifact.meta.get("dims"):
            out.append(Finding("info", "executorch-dynamic-shapes",
                               f"torch.export Dims {_format_dims(artifact.meta['dims'])}: the "
                               ".pte runs at any size in these ranges (validated at both ends); "
                               "other sizes are refused"))
        return out

    def runs_other_shapes(self, artifact: Artifact) -> bool:
        return bool(artifact.meta.get("dims"))

    def open(self, artifact: Artifact, threads: int) -> Session:
        return PteSession(artifact, threads)

    def snippets(self, artifact: Artifact, inputs: list[TensorSpec],
                 outputs: list[TensorSpec]) -> dict[str, str]:
        """Positions, dtypes and shapes from the program itself (a .pte names no tensors)."""
        from mtconvert.backends import snippets as sn
        from mtconvert.backends.executorch import snippets as et

        program = artifact.meta.get("program") or _describe(artifact.primary, None, None)
        names_in, names_out = artifact.meta["inputs"], artifact.meta["outputs"]
        ins = [sn.Port(n, n, tuple(t["shape"]), t["dtype"], i)
               for i, (n, t) in enumerate(zip(names_in, program["inputs"], strict=True))]
        outs = [sn.Port(n, n, tuple(t["shape"]), t["dtype"], i)
                for i, (n, t) in enumerate(zip(names_out, program["outputs"], strict=True))]
        name = artifact.primary.name
        return {"kotlin": et.kotlin(name, ins, outs), "python": et.python(name, ins, outs)}


def _fixed_dynamic_axes(source: PreparedSource, shapes: dict[str, list[int]],
                        route: str) -> str | None:
    """Why the source's dynamic axes are not ``torch.export`` Dims in the .pte (None if it has
    none). A .pt2 exported with Dims gets them over the validated range when the run sweeps
    shapes (--seq-lens/--batch-sizes); without a sweep there is no validated range. ONNX
    sources reach torch through onnx2torch, whose Shape, Slice and Reshape modules read shape
    tensors with ``.numpy()``/``.item()``: ``torch.export`` with Dims stops at ".numpy() is not
    supported for tensor subclasses", so the bridge traces at fixed shapes (coreml's
    onnx_bridge.export) and the program is static."""
    axes = [f"{s.name} axis " + ", ".join(f"{i} ({d or 'unnamed'})" for i, d in
                                          enumerate(s.shape) if not isinstance(d, int))
            for s in source.inputs if s.is_dynamic]
    if not axes:
        return None
    why = ("no range was validated: give --seq-lens/--batch-sizes to export them as Dims over "
           "the swept sizes" if route == "torch.export" else
           "the onnx2torch bridge reads shape tensors with .numpy()/.item(), which torch.export "
           "refuses at symbolic sizes); other shapes need another conversion (--input-shape")
    return (f"static .pte: the source's dynamic axes {'; '.join(axes)} are fixed at "
            f"{format_shapes(shapes)}, not exported as torch.export Dims ({why})")


def _dims(source: PreparedSource, opts: TargetOptions) -> dict[str, dict[str, list[Any]]]:
    """The source's dynamic axes that the run validates over more than one size, as
    {input: {axis: [symbol, lo, hi]}} (the symbol ties axes sharing one Dim); {} if none."""
    ranges = opts.extra.get("dynamic_range") or {}
    out: dict[str, dict[str, list[Any]]] = {}
    for spec in source.inputs:
        for axis, (lo, hi) in (ranges.get(spec.name) or {}).items():
            symbol = spec.shape[int(axis)]
            if lo < hi and not isinstance(symbol, int):
                out.setdefault(spec.name, {})[str(axis)] = [str(symbol), lo, hi]
    return out


def _format_dims(dims: dict[str, dict[str, list[Any]]]) -> str:
    return "; ".join(f"{name} axis {axis} in {lo}..{hi}" for name, axes in dims.items()
                     for axis, (_, lo, hi) in axes.items())


def _export_with_dims(source: PreparedSource, shapes: dict[str, list[int]],
                      dims: dict[str, dict[str, list[Any]]], path: Path) -> Path:
    """torch.export of the in-memory module with its dynamic axes as Dims over ``dims``."""
    from mtconvert.backends.executorch.convert import dim_spec

    return torch_inputs.export_module(
        source, shapes, path, NAME, dynamic_shapes=dim_spec([s.name for s in source.inputs], dims),
        what=f"torch.export with Dims {_format_dims(dims)}")


def findings(program: dict[str, Any], delegation: dict[str, Any] | None) -> list[Finding]:
    """Delegated and non-delegated operators (names and counts); an operator without a kernel,
    or a delegate without a backend, in the runtime fails the target."""
    out: list[Finding] = []
    if delegation:
        by_op = delegation["by_operator"]
        done = [f"{op}x{c['delegated']}" for op, c in by_op.items() if c["delegated"]]
        kept = [f"{op}x{c['non_delegated']}" for op, c in by_op.items() if c["non_delegated"]]
        out.append(Finding("info", "executorch-delegation",
                           f"{delegation['delegated']} operator(s) delegated to XNNPACK in "
                           f"{delegation['subgraphs']} subgraph(s): {', '.join(done) or 'none'}; "
                           f"{delegation['non_delegated']} not delegated: "
                           f"{', '.join(kept) or 'none'}"))
    calls = program["delegates"]
    kernels = program["operators"]
    out.append(Finding("info", "executorch-program",
                       f"{sum(calls.values())} delegate call(s) "
                       f"({', '.join(f'{b}x{n}' for b, n in calls.items()) or 'none'}), "
                       f"{sum(kernels.values())} kernel call(s) outside any delegate "
                       f"({', '.join(f'{op}x{n}' for op, n in kernels.items()) or 'none'})"))
    if kernels:
        out.append(Finding("warning", "executorch-not-delegated",
                           "operators running on ExecuTorch's portable CPU kernels, not XNNPACK "
                           f"(a phone build must link them): {', '.join(kernels)}"))
    if program.get("missing_kernels"):
        out.append(Finding("error", "executorch-missing-kernel",
                           "the ExecuTorch runtime has no kernel for "
                           f"{', '.join(program['missing_kernels'])}"))
    if program.get("missing_backends"):
        out.append(Finding("error", "executorch-missing-backend",
                           "the ExecuTorch runtime links no backend "
                           f"{', '.join(program['missing_backends'])}"))
    return out


def _describe(path: Path, log: Path | None, timeout: float | None) -> dict[str, Any]:
    """The program's description, read in a child (a damaged file must not crash mtconvert)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mtconvert-pte-") as tmp:
        result = run_job("mtconvert.backends.executorch.pte", {"path": str(path)},
                         Path(tmp) / "job.json", target=NAME, step="read .pte",
                         log_path=log or Path(tmp) / "pte.log", timeout_s=timeout or 300)
    if "error" in result:
        raise ModelLoadError(result["error"])
    return result["program"]


class PteSession(Session):
    """The .pte in ExecuTorch's runtime (``executorch.runtime``), in this (worker) process."""

    def __init__(self, artifact: Artifact, threads: int):
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        from mtconvert.backends.executorch.pte import DTYPES, load_quantized_kernels

        portable_lib._unsafe_reset_threadpool(max(1, int(threads)))
        load_quantized_kernels()  # an int8 .pte's embedding_byte
        try:
            self._program = Runtime.get().load_program(artifact.primary)
            self._method = self._program.load_method("forward")
        except Exception as exc:
            raise RuntimeFailure(f"ExecuTorch could not load {artifact.primary.name}: "
                                 f"{str(exc).strip()[:300] or type(exc).__name__}",
                                 target=NAME, step="load") from None
        meta = self._method.metadata
        self._dtypes = [DTYPES.get(int(meta.input_tensor_meta(i).dtype()), "float32")
                        for i in range(meta.num_inputs())]
        names_in, names_out = artifact.meta["inputs"], artifact.meta["outputs"]
        if len(names_in) != meta.num_inputs() or len(names_out) != meta.num_outputs():
            raise RuntimeFailure(f"{artifact.primary.name} takes {meta.num_inputs()} inputs and "
                                 f"gives {meta.num_outputs()} outputs; the source has "
                                 f"{len(names_in)} and {len(names_out)}", target=NAME,
                                 step="load")
        self.inputs = [TensorSpec(n, tuple(meta.input_tensor_meta(i).sizes()), self._dtypes[i])
                       for i, n in enumerate(names_in)]
        self.outputs = [TensorSpec(n, tuple(meta.output_tensor_meta(i).sizes()), "")
                        for i, n in enumerate(names_out)]
        self.runtime = f"executorch {deps.versions(['executorch']).get('executorch', '')}".strip()
        self._name, self._dims = artifact.primary.name, artifact.meta.get("dims") or {}
        self._path = artifact.primary
        self._backends = list((artifact.meta.get("program") or {}).get("delegates") or {})

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np
        import torch

        outs = self._method.execute(self._args(feeds))
        return {s.name: o.detach().numpy() if isinstance(o, torch.Tensor) else np.asarray(o)
                for s, o in zip(self.outputs, outs, strict=True)}

    def profile(self, feeds: dict[str, np.ndarray], runs: int) -> list[OpTime]:
        """ExecuTorch's event tracer (ETDump) on a second load of the .pte: kernel calls, and
        XNNPACK's operators inside each delegate call (mtconvert.backends.profiling.executorch)."""
        from mtconvert.backends.profiling import executorch as etdump

        return etdump.profile(self._path, self._args(feeds), runs, self._backends)

    def _args(self, feeds: dict[str, np.ndarray]) -> list[Any]:
        import numpy as np
        import torch

        self._check_dims(feeds)
        return [torch.from_numpy(np.ascontiguousarray(feeds[s.name], dtype=dtype))
                for s, dtype in zip(self.inputs, self._dtypes, strict=True)]

    def _check_dims(self, feeds: dict[str, np.ndarray]) -> None:
        """A size outside a Dim's range is refused by name (the runtime would only say
        "set_inputs() failed with error 0x10" above the bound, and run below it untested)."""
        for name, axes in self._dims.items():
            for axis, (_, lo, hi) in axes.items():
                size = feeds[name].shape[int(axis)]
                if not lo <= size <= hi:
                    raise RuntimeFailure(
                        f"{name} axis {axis} is {size}: {self._name} was exported for "
                        f"{lo}..{hi} on that axis (torch.export Dim); convert again with "
                        "--seq-lens/--batch-sizes covering it", target=NAME, step="run")
