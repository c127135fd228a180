"""Core ML target: an ML Program ``<model>.mlpackage`` from PyTorch or ONNX sources.

Routes: ``torch.export`` (PyTorch sources: the module is exported here at the validation
shapes) and ``onnx2torch`` (ONNX sources, or PyTorch sources whose export fails). coremltools
converts in a child process. Core ML itself runs only on Apple platforms: elsewhere the saved
program is executed by mtconvert's NumPy MIL interpreter (runtime ``mil-reference``); on macOS
``MLModel.predict`` is used and the interpreter's agreement with it is reported beside.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtconvert import deps
from mtconvert.backends import torch_inputs
from mtconvert.backends.base import (Artifact, Backend, Finding, PreparedSource, Session,
                                     TargetOptions, TensorSpec, format_shapes, match_names)
from mtconvert.backends.options import Option
from mtconvert.backends.process import expect_files, run_job
from mtconvert.errors import ConversionError, RuntimeUnavailable

if TYPE_CHECKING:
    import numpy as np

TOOLS = ["coremltools", "torch", "onnx2torch", "onnxsim"]
DEPLOYMENT_TARGETS = ("iOS15", "iOS16", "iOS17", "iOS18", "macOS12", "macOS13", "macOS14",
                      "macOS15")
DEFAULT_TARGET = "iOS16"
STATE_TARGETS = ("iOS18", "macOS15")  # Core ML state (read_state / coreml_update_state)
PALETTE_BITS = (1, 2, 3, 4, 6, 8)
NO_LATENCY = ("Core ML runs only on Apple platforms; the mil-reference interpreter's time says "
              "nothing about a device")


class CoremlBackend(Backend):
    name = "coreml"
    aliases = ("mlpackage", "core-ml")
    extra = "coreml"
    description = "Core ML ML Program (.mlpackage) via torch.export + coremltools"
    precisions = ("fp32", "fp16", "int8")
    fixed_shapes = True
    convert_requires = {"coremltools": "coremltools", "torch": "torch"}
    # the session and the lint use coremltools' generated protobuf classes, loaded from its
    # folder by the protobuf runtime: coremltools itself (and torch) is never imported there
    run_requires = {"coremltools": "coremltools", "google.protobuf": "protobuf"}
    artifact_suffixes = (".mlpackage",)
    addressable_intermediates = True  # through the mil-reference interpreter
    sparse_weights = ("weights with >= 10 % exact zeros as constexpr_sparse_to_dense (bit mask "
                      "+ nonzero values); with int8 or palettization on iOS18/macOS15 only")
    options = (
        Option("coreml_target", "choice", None, "coreml: minimum deployment target (default "
               f"{DEFAULT_TARGET}).", choices=DEPLOYMENT_TARGETS),
        Option("palettize", "choice", None, "coreml: palettize the weights to 2^BITS k-means "
               "clusters.", choices=PALETTE_BITS, metavar="BITS"),
    )

    def routes(self, source: PreparedSource) -> list[str]:
        if source.torch_module is not None:
            bridge = ["onnx2torch"] if torch_inputs.has_onnx2torch() else []
            return ["torch.export", *bridge]
        return ["onnx2torch"]

    def convert(self, source: PreparedSource, out_dir: Path, opts: TargetOptions) -> Artifact:
        settings = _settings(opts)
        log = out_dir / f"{source.name}.{self.name}.log"
        work = source.work_dir / self.name / (opts.route or "default")
        work.mkdir(parents=True, exist_ok=True)
        shapes = {s.name: list(source.input_shapes[s.name]) for s in source.inputs}
        steps: list[str] = []
        states = _states(source, settings, opts.route, steps)
        inputs = [s for s in source.inputs if s.name not in states]
        if opts.route == "torch.export":
            module = source if not states else replace(
                source, torch_module=source.stateful_module, inputs=tuple(inputs))
            shapes = {s.name: shapes[s.name] for s in inputs}
            kind, model = "pt2", torch_inputs.export_module(module, shapes,
                                                            work / "program.pt2", self.name)
            steps.append(f"torch.export of the PyTorch module at {format_shapes(shapes)}")
        else:
            kind, model = "onnx", torch_inputs.fixed_onnx(source, shapes, work, log,
                                                          opts.timeout_s, steps, self.name)
        suffix = "" if opts.precision == "fp32" else f".{opts.precision}"
        suffix += f".palettized{settings['palettize']}" if settings["palettize"] else ""
        suffix += ".sparse" if opts.sparse else ""
        out = out_dir / f"{source.name}{suffix}.mlpackage"
        twin = work / f"{source.name}.fp32-twin.mlpackage"
        compressed = opts.precision != "fp32" or settings["palettize"]
        job = {"kind": kind, "model": str(model), "out": str(out),
               "input_order": [s.name for s in inputs],
               "input_shapes": [shapes[s.name] for s in inputs],
               "input_dtypes": [s.dtype for s in inputs],
               "output_names": [s.name for s in source.outputs], "precision": opts.precision,
               "fp32_twin": str(twin) if compressed else None,
               # a quantized source: its int8 weights stored as they are (own ints and scales)
               "source_quantization": opts.extra.get("source_quantization"),
               "sparse": opts.sparse, "states": bool(states)} | settings
        result = self._run_child(job, work, log, opts.timeout_s)
        expect_files([out / "Manifest.json"], target=self.name, step="coremltools", log_path=log)
        steps += result["steps"]
        meta: dict[str, Any] = {"inputs": result["inputs"], "outputs": result["outputs"],
                                "deployment_target": settings["deployment_target"]}
        profile = None
        if states:
            meta["states"] = list(states)
        if settings["palettize"]:  # lossy weights: judged like int8 weights
            profile = "int8"
            steps.append("tolerance profile int8 (palettized weights), compute "
                         f"{opts.precision}")
        elif states and opts.precision == "fp32":  # the cache is stored in float16
            profile = "fp16"
            steps.append("tolerance profile fp16: the KV cache is Core ML state, which holds "
                         "float16 only (compute float32, cast at each read and write)")
        fixed = {k: tuple(v) for k, v in shapes.items()}
        fixed |= {k: tuple(source.input_shapes[k]) for k in states}  # fed states: the shape
        fp32 = Artifact(target=self.name, primary=twin, files=(twin,), meta=dict(meta),
                        input_shapes=fixed) if compressed else None
        return Artifact(target=self.name, primary=out, files=(out,), precision=opts.precision,
                        steps=tuple(steps), tool_versions=deps.versions(TOOLS), log_path=log,
                        meta=meta, fp32_twin=fp32, tolerance_profile=profile, input_shapes=fixed)

    def _run_child(self, job: dict[str, Any], work: Path, log: Path,
                   timeout: float | None) -> dict[str, Any]:
        return run_job("mtconvert.backends.coreml.convert", job, work / "coreml_job.json",
                       target=self.name, step="coremltools", log_path=log, timeout_s=timeout,
                       env={"TQDM_DISABLE": "1"})

    def adopt(self, path: Path, source: PreparedSource, opts: TargetOptions) -> Artifact:
        """An .mlpackage built elsewhere: features mapped by name, else by position."""
        from mtconvert.backends.coreml.program import load

        program = load(path)
        ins = match_names([v.name for v in program.inputs], [s.name for s in source.inputs],
                          "input", ".mlpackage")
        outs = match_names(program.outputs, [s.name for s in source.outputs], "output",
                           ".mlpackage")
        shapes = {src: list(v.shape) for v, src in zip(program.inputs, ins, strict=True)}
        return Artifact(target=self.name, primary=path, files=(path,), precision=opts.precision,
                        steps=("validated as built elsewhere",),
                        tool_versions=deps.versions(["coremltools"]),
                        meta={"inputs": [v.name for v in program.inputs],
                              "outputs": program.outputs, "source_inputs": ins,
                              "source_outputs": outs},
                        input_shapes={k: tuple(v) for k, v in shapes.items()})

    def lint(self, artifact: Artifact) -> list[Finding]:
        """The op histogram from the package's protobuf alone (no weights, no coremltools)."""
        from mtconvert.backends.coreml import ops as kernels
        from mtconvert.backends.coreml.program import op_counts

        opset, counts = op_counts(artifact.primary)
        findings = [Finding("info", "coreml-ops", f"{sum(counts.values())} MIL operations "
                            f"(opset {opset}): " + ", ".join(
                                f"{op}x{n}" for op, n in counts.most_common()))]
        missing = kernels.missing(list(counts))
        if missing:
            findings.append(Finding("warning", "coreml-uninterpretable",
                                    "the mil-reference interpreter lacks MIL ops "
                                    f"{', '.join(missing)}: numerics cannot be checked off macOS"))
        return findings

    def open(self, artifact: Artifact, threads: int) -> Session:
        if sys.platform == "darwin" and _has_coreml_runtime():
            return CoremlRuntimeSession(artifact, threads)
        return MilSession(artifact)

    def snippets(self, artifact: Artifact, inputs: list[TensorSpec],
                 outputs: list[TensorSpec]) -> dict[str, str]:
        """Feature names, dtypes and shapes from the package's model description (what an app
        sees: int64 inputs become int32 features)."""
        from mtconvert.backends import snippets as sn
        from mtconvert.backends.coreml.program import load_spec

        description = load_spec(artifact.primary).description
        features = _Features(artifact)
        source = {ml: src for src, ml in features.inputs.items()} | features.outputs

        validated = {s.name: tuple(s.shape) for s in [*inputs, *outputs]}

        def ports(described: Any) -> list[Any]:  # outputs often declare no shape
            return [sn.Port(f.name, source.get(f.name, f.name),
                            tuple(int(d) for d in f.type.multiArrayType.shape)
                            or validated.get(source.get(f.name, f.name), ()),
                            _feature_dtype(f), i) for i, f in enumerate(described)]

        name, minimum = artifact.primary.name, artifact.meta.get("deployment_target", "")
        ins, outs = ports(description.input), ports(description.output)
        states = [f.name for f in description.state]
        return {"swift": sn.swift_coreml(name, ins, outs, minimum, states),
                "python": sn.python_coreml(name, ins, outs, states)}


def _settings(opts: TargetOptions) -> dict[str, Any]:
    target = opts.extra.get("coreml_target") or DEFAULT_TARGET
    if target not in DEPLOYMENT_TARGETS:
        raise ConversionError(f"minimum deployment target must be one of "
                              f"{', '.join(DEPLOYMENT_TARGETS)}, not {target!r}",
                              target="coreml", step="options")
    bits = opts.extra.get("palettize")
    if bits is not None and int(bits) not in PALETTE_BITS:
        raise ConversionError(f"--palettize takes {', '.join(map(str, PALETTE_BITS))} bits, "
                              f"not {bits}", target="coreml", step="options")
    if bits and opts.precision == "int8":
        raise ConversionError("choose int8 linear quantization or palettization, not both",
                              target="coreml", step="options")
    return {"deployment_target": target, "palettize": int(bits) if bits else None}


def _states(source: PreparedSource, settings: dict[str, Any], route: str,
            steps: list[str]) -> dict[str, Any]:
    """The cache inputs a decode step keeps as Core ML state (its stateful module's buffers),
    by name: only on the torch.export route and a deployment target with state (iOS18,
    macOS15); otherwise none, and the step says why for a source that offers state."""
    module = source.stateful_module
    if module is None:
        return {}
    if settings["deployment_target"] not in STATE_TARGETS:
        steps.append("KV cache as explicit inputs/outputs: Core ML state needs "
                     f"--coreml-target {' or '.join(STATE_TARGETS)} (this is "
                     f"{settings['deployment_target']})")
        return {}
    if route != "torch.export":
        steps.append(f"KV cache as explicit inputs/outputs: the {route} route converts the "
                     "ONNX graph, which has no state")
        return {}
    states = {name: buf for name, buf in module.named_buffers() if "." not in name}
    size = sum(b.numel() * b.element_size() for b in states.values())
    steps.append(f"KV cache as Core ML state: {len(states)} float16 states "
                 f"{list(next(iter(states.values())).shape)} ({size} bytes), read and written "
                 "in the model (read_state, write_state); the host feeds the token only")
    return states


def _has_coreml_runtime() -> bool:
    """coremltools ships its Core ML bindings (libcoremlpython) on macOS only."""
    import importlib.util

    return importlib.util.find_spec("coremltools.libcoremlpython") is not None


# --- sessions -------------------------------------------------------------------------------

class _Features:
    """Source names <-> the package's feature names, and the dtypes the package takes."""

    def __init__(self, artifact: Artifact):
        meta = artifact.meta
        self.inputs = dict(zip(meta.get("source_inputs", meta["inputs"]), meta["inputs"],
                               strict=True))
        self.outputs = dict(zip(meta["outputs"], meta.get("source_outputs", meta["outputs"]),
                                strict=True))

    def feeds(self, feeds: dict[str, np.ndarray], dtypes: dict[str, str]) -> dict[str, Any]:
        return {ml: feeds[src].astype(dtypes[ml], copy=False) for src, ml in self.inputs.items()}

    def results(self, out: dict[str, Any]) -> dict[str, np.ndarray]:
        import numpy as np

        return {src: np.asarray(out[ml]) for ml, src in self.outputs.items()}


class MilSession(Session):
    runtime = "mil-reference"
    latency_unavailable = NO_LATENCY
    profile_unavailable = (
        "off macOS the .mlpackage runs in mtconvert's NumPy mil-reference interpreter, whose "
        "per-operation times say nothing about a device; Core ML has no per-operation timer "
        "(coremltools 9's MLComputePlan, macOS only, estimates each operation's share of the "
        "work and its device, not its time)")

    def __init__(self, artifact: Artifact):
        from mtconvert.backends.coreml.interp import MilInterpreter, UnsupportedOps

        try:
            self._interp = MilInterpreter.open(artifact.primary)
        except UnsupportedOps as exc:
            raise RuntimeUnavailable(f"the mil-reference interpreter lacks MIL ops "
                                     f"{', '.join(exc.op_types)}; Core ML itself runs only on "
                                     "macOS", target="coreml", step="open") from None
        self._features = _Features(artifact)
        program = self._interp.program
        self._dtypes = {v.name: v.dtype for v in program.inputs}
        self.inputs = [TensorSpec(src, tuple(v.shape), v.dtype) for src, v in
                       zip(self._features.inputs, program.inputs, strict=True)]
        self.outputs = [TensorSpec(src, (), "") for src in self._features.outputs.values()]
        self.states = tuple(TensorSpec(v.name, tuple(v.shape), v.dtype) for v in program.states)

    def reset_states(self) -> None:
        self._interp.reset_states()

    def _feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        """The program's inputs, and any state fed by name (it overwrites the held one)."""
        return self._features.feeds(feeds, self._dtypes) | {
            s.name: feeds[s.name] for s in self.states if s.name in feeds}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._features.results(self._interp.run(self._feeds(feeds)))

    def intermediates(self, feeds: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
        trace: list[tuple[str, str, np.ndarray]] = []
        self._interp.run(self._feeds(feeds), trace=trace)
        return trace


class CoremlRuntimeSession(Session):
    """macOS: Core ML's own runtime (``MLModel.predict``); the interpreter runs beside it once
    so the report shows how far the two agree. Not exercised on the Linux CI machines."""

    runtime = "coreml"

    def __init__(self, artifact: Artifact, threads: int):
        from mtconvert.backends.coreml._ct import coremltools

        ct = coremltools()
        self._model = ct.models.MLModel(str(artifact.primary))
        self._features = _Features(artifact)
        spec = self._model.get_spec()
        self._dtypes = {f.name: _feature_dtype(f) for f in spec.description.input}
        self._artifact = artifact
        self.inputs = []
        self.outputs = []
        self._beside: dict[str, Any] | None = None
        # iOS18+ state (the KV cache in the model): MLModel.make_state, written by name
        self.states = tuple(TensorSpec(f.name, tuple(f.type.stateType.arrayType.shape),
                                       "float16") for f in spec.description.state)
        self._state = self._model.make_state() if self.states else None

    def reset_states(self) -> None:
        if self.states:
            self._state = self._model.make_state()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np

        for s in self.states:  # a fed state overwrites the held one
            if s.name in feeds:
                self._state.write_state(s.name, np.asarray(feeds[s.name], np.float16))
        ins = self._features.feeds(feeds, self._dtypes)
        out = self._features.results(self._model.predict(ins, state=self._state)
                                     if self._state is not None else self._model.predict(ins))
        if self._beside is None and self.states:  # the interpreter beside would need the
            self._beside = {"summary": "not run (stateful program)"}  # same state history
        if self._beside is None:
            self._beside = _interpreter_beside(self._artifact, feeds, out)
            self.runtime = f"coreml (mil-reference beside: {self._beside['summary']})"
        return out


def _feature_dtype(feature: Any) -> str:
    codes = {65568: "float32", 65552: "float16", 131104: "int32", 65600: "float64"}
    return codes.get(feature.type.multiArrayType.dataType, "float32")


def _interpreter_beside(artifact: Artifact, feeds: dict[str, np.ndarray],
                        coreml_out: dict[str, np.ndarray]) -> dict[str, Any]:
    import numpy as np

    try:
        mine = MilSession(artifact).run(feeds)
    except RuntimeUnavailable as exc:
        return {"summary": exc.reason}
    worst = max(float(np.max(np.abs(mine[k].astype(np.float64) - coreml_out[k])))
                for k in coreml_out)
    return {"summary": f"max abs difference {worst:.3g}", "max_abs": worst}
