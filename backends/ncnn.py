"""ncnn target: ONNX -> fixed shapes + legalization (mask rewrite) -> pnnx -> .param/.bin.

pnnx exits 0 whether or not its output works, so nothing here trusts it: every layer type in the
.param must be one the installed ncnn can create (lint), and the artifact runs in a child
process against the reference. fp32 validates ncnn with its fp16 options off (exact); fp16
validates the phone default (fp16 storage and arithmetic on, fp16 weights) and reports its
change against the exact fp32 twin. int8 (a quantized source by default, or --precision int8
with calibration data) rewrites the weight layers into ncnn's int8 layers (``ncnn_int8``) and
runs them with int8 inference on and fp16 off, against the float files as the fp32 twin.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtconvert import deps
from mtconvert.backends.base import (Artifact, Backend, Finding, OpTime, PreparedSource,
                                     Session, TargetOptions, TensorSpec, format_shapes,
                                     match_names)
from mtconvert.backends.options import Option
from mtconvert.backends.process import expect_files, run_tool
from mtconvert.backends.onnx_tools import run_onnx_tool
from mtconvert.errors import ConversionError, ModelLoadError, RuntimeFailure

if TYPE_CHECKING:
    import numpy as np

TOOLS = ["pnnx", "ncnn", "onnxsim"]
_PNNX_TYPES = {"int64": "i64", "int32": "i32", "float32": "f32", "float16": "f16"}


def pnnx_binary() -> Path:
    spec = importlib.util.find_spec("pnnx")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError("the pnnx package is not installed", target="ncnn", step="pnnx")
    return Path(next(iter(spec.submodule_search_locations))) / "pnnx"


class NcnnBackend(Backend):
    name = "ncnn"
    aliases = ()
    extra = "ncnn"
    description = "Tencent ncnn (.param + .bin) via pnnx"
    precisions = ("fp32", "fp16", "int8")
    fixed_shapes = True
    convert_requires = {"pnnx": "pnnx", "ncnn": "ncnn", "onnxsim": "onnxsim"}
    run_requires = {"ncnn": "ncnn"}
    artifact_suffixes = (".param",)
    sidecar_suffixes = (".bin",)
    addressable_intermediates = True
    no_sparse_weights = ("ncnn's .bin stores every weight dense (raw fp32, fp16, int8, or a "
                         "256-entry table with uint8 indices); it has no sparse weight layout")
    options = (Option("keep_intermediate", "bool", False, "ncnn: also keep pnnx's intermediate "
                      "files (in <model>.ncnn-intermediate/)."),)

    def adopt(self, path: Path, source: PreparedSource, opts: TargetOptions) -> Artifact:
        """A .param (+ .bin beside it) built elsewhere. Inputs map by name, else in order; an
        input only Embed layers read is fed as int32, any other as float32 (a mask made float
        by a legalization like mtconvert's keeps its 0/1 values). Fixed shapes come from the
        Input layers' shape parameters, which mtconvert writes and pnnx does not."""
        binf = path.with_suffix(".bin")
        if not binf.is_file():
            raise ModelLoadError(f"{path.name} needs its weights {binf.name} beside it")
        try:
            ins, outs = param_io(path)
        except (ValueError, IndexError):
            raise ModelLoadError(f"{path.name} is not an ncnn .param file") from None
        names = match_names([i["blob"] for i in ins], [s.name for s in source.inputs], "input",
                            ".param")
        out_names = match_names(outs, [s.name for s in source.outputs], "output", ".param")
        ranks = {s.name: s.shape for s in source.outputs}
        steps = ["validated as built elsewhere"]
        if names != [i["blob"] for i in ins]:
            steps.append("inputs mapped by position: " + ", ".join(
                f"{i['blob']}={n}" for i, n in zip(ins, names, strict=True)))
        fixed = {n: i["shape"] for i, n in zip(ins, names, strict=True) if i["shape"]}
        undeclared = [n for n in names if n not in fixed]
        from mtconvert.backends import ncnn_int8  # numpy: not at import (the CLI's --help)

        int8 = sum(1 for kind, _, _, _, raw in _layers(path) if ncnn_int8.is_int8(kind, raw))
        if int8:
            steps.append(f"{int8} int8 layer(s): run with use_int8_inference on, fp16 off")
        return Artifact(target=self.name, primary=path, files=(path, binf),
                        precision="int8" if int8 else opts.precision, steps=tuple(steps),
                        tool_versions=deps.versions(["ncnn"]),
                        meta={"inputs": [[i["blob"], n, "int32" if i["int"] else "float32"]
                                         for i, n in zip(ins, names, strict=True)],
                              "outputs": [[b, n, [None] * len(ranks[n])]
                                          for b, n in zip(outs, out_names, strict=True)],
                              "undeclared_shapes": undeclared,
                              "mode": "int8" if int8 else "phone-fp16"
                              if opts.precision == "fp16" else "exact"},
                        input_shapes={k: tuple(v) for k, v in fixed.items()})

    def routes(self, source: PreparedSource) -> list[str]:
        """TorchScript first for PyTorch sources (pnnx's native input), then the lowered
        fixed-shape ONNX, then the ONNX as given (pnnx simplifies it itself): pnnx mis-converts
        some traced graphs (HF's mask logic survives tracing), and a graph the lowering cannot
        legalize may still convert as given."""
        onnx_routes = ["onnx-fixed", "onnx-as-given"]
        return ["torchscript", *onnx_routes] if source.torch_module is not None else onnx_routes

    def convert(self, source: PreparedSource, out_dir: Path, opts: TargetOptions) -> Artifact:
        log = out_dir / f"{source.name}.{self.name}.log"
        route = opts.route or "onnx-fixed"
        work = source.work_dir / self.name / route
        work.mkdir(parents=True, exist_ok=True)
        shapes, batch = _batch_one(source)
        prepared = work / "prepared.onnx"
        info = run_onnx_tool("ncnn-prepare", source.onnx_path, prepared, shapes, step="legalize",
                             log=log, timeout=opts.timeout_s, target=self.name)
        model, steps = self._route_input(route, source, prepared, info, work, shapes)
        if batch > 1:
            steps.append(f"batch: converted at batch 1; the {batch} items run one at a time "
                         "(ncnn models take one item)")
        fp16 = opts.precision == "fp16"
        param, binf, pnnx_steps = self._pnnx(model, source, info, work, log, opts, fp16=fp16)
        int8 = self._int8(param, binf, opts, pnnx_steps, self._io_meta(source, info)["inputs"],
                          _batch_one(source)[0], log) if opts.precision == "int8" else None
        suffix = ".fp16" if fp16 else ".int8" if int8 else ""
        out_param = out_dir / f"{source.name}{suffix}.ncnn.param"
        out_bin = out_dir / f"{source.name}{suffix}.ncnn.bin"
        shutil.move(param, out_param)
        shutil.move(binf, out_bin)
        meta = self._io_meta(source, info) | {
            "mode": "phone-fp16" if fp16 else "int8" if int8 else "exact"}
        twin = None
        if int8:  # the same float .param/.bin before the int8 rewrite
            twin = Artifact(target=self.name, primary=int8[0], files=int8,
                            meta=meta | {"mode": "exact"})
        if fp16:  # the exact fp32 twin of the same route: the yardstick for what fp16 costs
            tp, tb, _ = self._pnnx(model, source, info, work, log, opts, fp16=False)
            twin = Artifact(target=self.name, primary=tp, files=(tp, tb),
                            meta=meta | {"mode": "exact"})
        files = (out_param, out_bin)
        if opts.extra.get("keep_intermediate"):
            kept = out_dir / f"{source.name}{suffix}.ncnn-intermediate"
            shutil.copytree(work, kept)
            files += (kept,)
            pnnx_steps.append(f"kept the intermediate files in {kept.name}/")
        precision = "fp32" if opts.precision == "int8" and not int8 else opts.precision
        return Artifact(target=self.name, primary=out_param, files=files,
                        precision=precision, steps=tuple(steps + pnnx_steps), log_path=log,
                        tool_versions=deps.versions(TOOLS), meta=meta, fp32_twin=twin)

    def _route_input(self, route: str, source: PreparedSource, prepared: Path,
                     info: dict[str, Any], work: Path,
                     shapes: dict[str, list[int]]) -> tuple[Path, list[str]]:
        """The file pnnx converts on this route (named model.*: pnnx names outputs after it)."""
        fixed = f"fix shapes: {format_shapes(shapes)}"
        if route == "torchscript":
            info["input_dtypes"] = {s.name: s.dtype for s in source.inputs}
            return trace(source, shapes, work / "model.pt"), [f"{fixed}; torch.jit.trace"]
        if route == "onnx-as-given":
            if info["masks_rewritten"] or info["casts_removed"]:
                raise ConversionError("not applicable: the graph needs legalization",
                                      target=self.name, step="route")
            info["input_dtypes"] = {s.name: s.dtype for s in source.inputs}
            shutil.copy(source.onnx_path, work / "model.onnx")
            return work / "model.onnx", [f"{fixed} (by pnnx); graph as given"]
        shutil.copy(prepared, work / "model.onnx")
        steps = [f"{fixed} (onnxsim)"]
        steps += [f"legalize: {m} -> float additive mask (1 - {m}) * -1e4 [B,1,1,S]; "
                  f"ORT equivalence max abs {info['equivalence_max_abs']:.1g}"
                  for m in info["masks_rewritten"]]
        steps += [f"legalize: {m} is only cast to float; made a float input (ncnn has no "
                  "int->float Cast)" for m in info["casts_removed"]]
        if info["rewrite_note"] and not info["casts_removed"]:
            steps.append(f"legalize: {info['rewrite_note']}")
        steps += info.get("steps", [])  # the lowering passes, applied or rejected, one each
        return work / "model.onnx", steps

    def _pnnx(self, model: Path, source: PreparedSource, info: dict[str, Any], work: Path,
              log: Path, opts: TargetOptions, fp16: bool) -> tuple[Path, Path, list[str]]:
        shapes, _ = _batch_one(source)
        spec = ",".join(f"[{','.join(map(str, shapes[s.name]))}]"
                        f"{_PNNX_TYPES.get(info['input_dtypes'][s.name], 'f32')}"
                        for s in source.inputs)
        for old in work.glob("model.ncnn.*"):
            old.unlink()
        run_tool([str(pnnx_binary()), model.name, f"inputshape={spec}", f"fp16={int(fp16)}"],
                 target=self.name, step="pnnx", log_path=log, timeout_s=opts.timeout_s, cwd=work)
        param, binf = work / "model.ncnn.param", work / "model.ncnn.bin"
        expect_files([param, binf], target=self.name, step="pnnx", log_path=log)
        declare_input_shapes(param, [shapes[s.name] for s in source.inputs])
        steps = [f"pnnx inputshape={spec} fp16={int(fp16)} (its side files stay in a temp folder)"]
        if info["tanh_gelu"]:
            n = patch_tanh_gelu(param)
            steps.append(f"GELU: {n} layer(s) set to the tanh form (0=1): pnnx fuses the source's "
                         "tanh-GELU pattern into ncnn's erf GELU")
        if rows := gemm_row_inputs(param):
            steps.append(f"Gemm: {rows} one-row input(s) reshaped to [1, K] (pnnx wrote them "
                         "1-D, which ncnn's Gemm reads as packed rows)")
        from mtconvert.backends.ncnn_speed import dense_to_innerproduct, fuse_attention

        io = self._io_meta(source, info)
        sdpa = fuse_attention(param, source.onnx_path, shapes, io["inputs"], io["outputs"],
                              log=log, timeout=opts.timeout_s)
        steps += [sdpa] if sdpa else []
        # fp32 .bin only (fp16 weights have another layout); not before int8: ncnn's int8
        # Gemm on [seq, hidden] blobs is much faster than its int8 InnerProduct (ncnn_int8)
        if not fp16 and opts.precision != "int8":
            dense = dense_to_innerproduct(param, source.onnx_path, shapes, io["inputs"],
                                          io["outputs"], log=log, timeout=opts.timeout_s)
            steps += [dense] if dense else []
        return param, binf, steps

    def _int8(self, param: Path, binf: Path, opts: TargetOptions, steps: list[str],
              inputs: list[list[str]], shapes: dict[str, list[int]],
              log: Path) -> tuple[Path, Path] | None:
        """ncnn int8 layers from a quantized source's record (``ncnn_int8``); the float
        files are kept beside as the fp32 twin. None (the model stays fp32, said in the
        steps) when no layer could be made int8."""
        import json

        from mtconvert.backends import ncnn_int8

        quant = opts.extra.get("source_quantization")
        if not quant and opts.calibration is None:  # as tflite's full-integer int8
            raise ConversionError("int8 of a float model needs calibration data",
                                  target=self.name, step="calibration")
        twin = (param.with_name("twin.ncnn.param"), binf.with_name("twin.ncnn.bin"))
        shutil.copy(param, twin[0])
        shutil.copy(binf, twin[1])
        records = json.loads(Path(quant["record"]).read_text()) if quant else None
        absmax = self._calibrate(param, binf, opts, steps, inputs, shapes, log) \
            if records is None or any(not r.get("input") for r in records.values()) else None
        res = ncnn_int8.rewrite(param, binf, _layers(param), records, absmax)
        steps += res.steps
        what = "hold the source's int8 weights and scales" if quant else \
            "quantized from the model's float weights (symmetric absmax / 127: per output " \
            "channel in InnerProduct, per tensor in Gemm and Embed, ncnn2int8's way)"
        steps.append(f"int8: {len(res.int8)} layer(s) {what} ({', '.join(res.int8) or 'none'})")
        if res.kept_float:
            steps.append("int8: stayed fp32: " + "; ".join(res.kept_float))
        if not res.int8:
            steps.append("int8: no layer could be made int8: the model stays fp32 with the "
                         "source's weights dequantized")
            return None
        steps.append("int8: ncnn runs with use_int8_inference on and fp16 off: int8 Gemm "
                     "layers quantize their input per row at run time (absmax), int8 "
                     "InnerProduct layers with the source's (or calibrated) input scale; every "
                     "other layer (attention as SDPA or MatMul, Softmax, LayerNorm, GELU...) "
                     "computes in fp32")
        return twin

    def _calibrate(self, param: Path, binf: Path, opts: TargetOptions, steps: list[str],
                   inputs: list[list[str]], shapes: dict[str, list[int]],
                   log: Path) -> dict[str, float] | None:
        """With --calibration: each InnerProduct's input absmax, from the fp32 model run on
        the calibration items in a child; None (said) without it or when it fails."""
        from mtconvert.backends.process import run_job

        if opts.calibration is None:
            steps.append("int8: no --calibration: a layer the source gives no activation scale "
                         "(dynamic quantization) and ncnn needs one for stays fp32")
            return None
        blobs = sorted({b[0] for kind, _, b, _, _ in _layers(param)
                        if kind in ("InnerProduct", "Gemm") and b})
        job = {"param": str(param), "bin": str(binf), "calibration": str(opts.calibration),
               "inputs": inputs, "shapes": shapes, "blobs": blobs}
        try:
            out = run_job("mtconvert.backends.ncnn_int8", job, param.with_name("calib.json"),
                          target=self.name, step="int8-calibration", log_path=log,
                          timeout_s=opts.timeout_s)
        except ConversionError as exc:
            steps.append(f"int8: calibration failed ({exc}): layers without a source "
                         "activation scale stay fp32")
            return None
        steps.append(f"int8: input scales of the layers the source gives none: 127 / absmax "
                     f"over {out['samples']} calibration item(s) ({opts.calibration.name})")
        return out["absmax"]

    @staticmethod
    def _io_meta(source: PreparedSource, info: dict[str, Any]) -> dict[str, Any]:
        return {"inputs": [[f"in{i}", s.name, info["input_dtypes"][s.name]]
                           for i, s in enumerate(source.inputs)],
                "outputs": [[f"out{i}", s.name, info["output_shapes"][s.name]]
                            for i, s in enumerate(source.outputs)]}

    def lint(self, artifact: Artifact) -> list[Finding]:
        types = param_layer_types(artifact.primary)
        unknown = unknown_layers(artifact.primary)
        findings = [Finding("info", "ncnn-layers", f"{len(types)} layers: " + ", ".join(
            f"{t}x{types.count(t)}" for t in sorted(set(types), key=types.count, reverse=True)))]
        if unknown:
            findings.append(Finding("error", "ncnn-unknown-layers",
                                    f"layers the installed ncnn cannot create: {', '.join(unknown)}"))
        if artifact.meta.get("undeclared_shapes"):
            findings.append(Finding("warning", "ncnn-shapes-undeclared", (
                "the .param does not declare the input shapes it was converted at (pnnx bakes "
                "them into Reshape layers); it ran at the requested shapes, and at other shapes "
                "than its own it computes wrong numbers: give --input-shape")))
        if pow_layers(artifact.primary):
            findings.append(Finding("warning", "ncnn-pow",
                                    "BinaryOp pow layers: ncnn's pow returns garbage for negative "
                                    "bases (seen: (-0.136)^3 -> 2.4e38)"))
        return findings

    def open(self, artifact: Artifact, threads: int) -> Session:
        return NcnnSession(artifact, threads)

    def snippets(self, artifact: Artifact, inputs: list[TensorSpec],
                 outputs: list[TensorSpec]) -> dict[str, str]:
        """Blobs by name (in0, out0...), one item (batch 1); int inputs (Embed) as int32."""
        from mtconvert.backends import snippets as sn

        shapes = {s.name: tuple(s.shape) for s in [*inputs, *outputs]}

        def one(name: str, fallback: Any) -> tuple[Any, ...]:
            shape = shapes.get(name) or tuple(fallback or ())
            return (1, *shape[1:]) if shape else ()

        ins = [sn.Port(blob, name, one(name, None), "int32" if dtype.startswith("int")
                       else "float32", i)
               for i, (blob, name, dtype) in enumerate(artifact.meta["inputs"])]
        outs = [sn.Port(blob, name, one(name, shape), "float32", i)
                for i, (blob, name, shape) in enumerate(artifact.meta["outputs"])]
        param, binf = artifact.primary.name, artifact.primary.with_suffix(".bin").name
        exact = artifact.meta.get("mode", "exact") in ("exact", "int8")
        return {"cpp": sn.cpp_ncnn(param, binf, ins, outs, exact),
                "python": sn.python_ncnn(param, binf, ins, outs, exact)}


def trace(source: PreparedSource, shapes: dict[str, list[int]], path: Path) -> Path:
    """TorchScript of the source module at batch 1 (ones for masks, zeros elsewhere)."""
    import torch

    examples = tuple((torch.ones if "mask" in s.name.lower() else torch.zeros)(
        shapes[s.name], dtype=getattr(torch, s.dtype)) for s in source.inputs)
    try:
        with torch.no_grad():
            traced = torch.jit.trace(source.torch_module, examples, check_trace=False,
                                     strict=False)
    except Exception as exc:
        raise ConversionError(f"torch.jit.trace failed: {str(exc).splitlines()[0][:200]}",
                              target="ncnn", step="trace") from None
    traced.save(str(path))
    return path


def _batch_one(source: PreparedSource) -> tuple[dict[str, list[int]], int]:
    """The shapes ncnn is converted at (batch 1) and the validation batch. ncnn models take one
    item; a batch axis the source fixes above 1 cannot be converted."""
    batch = max((v[0] for v in source.input_shapes.values() if v), default=1)
    fixed = [s.name for s in source.inputs if s.shape and isinstance(s.shape[0], int)
             and s.shape[0] > 1]
    if fixed:
        raise ConversionError(f"the source fixes batch {batch} on {', '.join(fixed)}; ncnn "
                              "models take one item: give batch-1 inputs or a dynamic batch axis",
                              target="ncnn", step="batch")
    return {k: [1, *v[1:]] for k, v in source.input_shapes.items()}, batch


def param_layer_types(param: Path) -> list[str]:
    return [kind for kind, *_ in _layers(param)]


def unknown_layers(param: Path) -> list[str]:
    """Layer types in the .param that the installed ncnn cannot create (checked by name, which
    never crashes; loading such a .param fails)."""
    import ncnn

    return sorted({t for t in param_layer_types(param) if ncnn.layer_to_index(t) < 0})


def param_layers(param: Path) -> list[tuple[str, str, list[str], list[str], list[str]]]:
    """(type, name, bottoms, tops, params) per layer line of a .param (a ValueError for a file
    that is not one)."""
    return _layers(param)


def _layers(param: Path) -> list[tuple[str, str, list[str], list[str], list[str]]]:
    """(type, name, bottoms, tops, params) per layer line of a .param."""
    lines = param.read_text().splitlines()
    if lines[0].strip() != "7767517":
        raise ValueError("no ncnn magic number")
    out = []
    for ln in lines[2:2 + int(lines[1].split()[0])]:
        f = ln.split()
        nb, nt = int(f[2]), int(f[3])
        out.append((f[0], f[1], f[4:4 + nb], f[4 + nb:4 + nb + nt], f[4 + nb + nt:]))
    return out


_SHAPE_KEYS = ("2", "11", "1", "0")  # c, d, h, w: ncnn's Input parameters, outermost first


def param_io(param: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The Input layers in order ({blob, shape or None, int}) and the output blobs (made by a
    layer, read by none) in order. ``int``: every reader is an Embed layer."""
    layers = _layers(param)
    read = {b for _, _, bottoms, _, _ in layers for b in bottoms}
    ins = []
    for kind, _, _, tops, params in layers:
        if kind != "Input":
            continue
        readers = [k for k, _, bottoms, _, _ in layers if tops[0] in bottoms]
        kv = dict(p.split("=", 1) for p in params if "=" in p)
        dims = [int(kv[k]) for k in _SHAPE_KEYS if int(kv.get(k, 0)) > 0]
        ins.append({"blob": tops[0], "shape": [1, *dims] if dims else None,
                    "int": bool(readers) and all(k == "Embed" for k in readers)})
    outs = [t for kind, _, _, tops, _ in layers for t in tops
            if kind != "Input" and t not in read]
    return sorted(ins, key=lambda i: _pnnx_index(i["blob"], "in", ins.index(i))), \
        sorted(outs, key=lambda o: _pnnx_index(o, "out", outs.index(o)))


def _pnnx_index(blob: str, prefix: str, position: int) -> tuple[int, int]:
    """pnnx names the graph's inputs in0, in1… and outputs out0, out1… in the model's order,
    while the .param lists layers in topological order (a later output can be made first): a
    pnnx-named blob sorts by its number, anything else keeps its place."""
    tail = blob[len(prefix):] if blob.startswith(prefix) else ""
    return (0, int(tail)) if tail.isdigit() else (1, position)


def declare_input_shapes(param: Path, shapes: list[list[int]]) -> None:
    """Write each Input layer's batch-1 shape as its w/h/d/c parameters (ncnn reads and
    ignores them at run time): ``mtconvert validate`` then knows the shapes it was made for."""
    lines, k = param.read_text().splitlines(), 0
    for i, ln in enumerate(lines):
        if ln.startswith("Input ") and k < len(shapes) and "=" not in ln:
            dims = list(shapes[k][1:])
            keys = {1: ("0",), 2: ("1", "0"), 3: ("2", "1", "0")}.get(len(dims), _SHAPE_KEYS)
            lines[i] = ln + "".join(f" {key}={d}" for key, d in zip(keys, dims, strict=True))
            k += 1
    param.write_text("\n".join(lines) + "\n")


def pow_layers(param: Path) -> int:
    return sum(1 for ln in param.read_text().splitlines()
               if ln.startswith("BinaryOp") and re.search(r"(^|\s)0=6(\s|$)", ln))


def gemm_row_inputs(param: Path) -> int:
    """Make each 1-D Reshape read only as a Gemm's A input a 2-D one row matrix (``1=1``).
    pnnx drops the batch axis, so an ONNX [1, K] matrix (one token, batch 1: a decode step)
    becomes a 1-D blob, which ncnn's Gemm reads as packed rows ([16, N] of NaN seen for K=64):
    the product of one row is what the source computes. Returns the count patched."""
    layers = _layers(param)
    gemm_a = {bottoms[0] for kind, _, bottoms, _, params in layers
              if kind == "Gemm" and bottoms and "2=1" not in params}  # transA: not one row
    readers: dict[str, list[str]] = {}
    for kind, _, bottoms, _, _ in layers:
        for b in bottoms:
            readers.setdefault(b, []).append(kind)
    patch = {name for kind, name, _, tops, params in layers
             if kind == "Reshape" and len(tops) == 1 and tops[0] in gemm_a
             and readers.get(tops[0]) == ["Gemm"] and [q.split("=")[0] for q in params] == ["0"]}
    lines = param.read_text().splitlines()
    for i, ln in enumerate(lines[2:], start=2):
        f = ln.split()
        if len(f) > 1 and f[0] == "Reshape" and f[1] in patch:
            lines[i] = ln + " 1=1"
    param.write_text("\n".join(lines) + "\n")
    return len(patch)


def patch_tanh_gelu(param: Path) -> int:
    """pnnx writes GELU without parameters (erf form); the source computes the tanh form."""
    lines, n = param.read_text().splitlines(), 0
    for i, ln in enumerate(lines):
        if ln.startswith("GELU ") and " 0=" not in ln:
            lines[i], n = ln + " 0=1", n + 1
    param.write_text("\n".join(lines) + "\n")
    return n


class NcnnSession(Session):
    """ncnn.Net in this (child) process; inputs by blob name with the batch on numpy axis 0."""

    runtime = "ncnn"

    def __init__(self, artifact: Artifact, threads: int):
        import ncnn

        self._ncnn = ncnn
        net = ncnn.Net()
        net.opt.num_threads = threads
        mode = artifact.meta.get("mode", "exact")
        if mode in ("exact", "int8"):
            net.opt.use_fp16_storage = net.opt.use_fp16_arithmetic = False
            net.opt.use_fp16_packed = net.opt.use_bf16_storage = False
        net.opt.use_int8_inference = True  # ncnn's default, said: int8 layers run int8 kernels
        self.runtime = "ncnn (" + {"exact": "exact fp32", "int8": "int8 layers, fp32 elsewhere"
                                   }.get(mode, "fp16 storage+arithmetic") + ")"
        binf = artifact.primary.with_suffix(".bin")
        if net.load_param(str(artifact.primary)) != 0 or net.load_model(str(binf)) != 0:
            raise RuntimeFailure("ncnn could not load the model", target="ncnn", step="open")
        self._net, self._param = net, artifact.primary
        self._inputs = artifact.meta["inputs"]
        self._outputs = artifact.meta["outputs"]
        self.inputs = [TensorSpec(n, (), d) for _, n, d in self._inputs]
        self.outputs = [TensorSpec(n, tuple(s), "float32") for _, n, s in self._outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One item at a time (the model was converted at batch 1); outputs stacked back."""
        import numpy as np

        batch = next(iter(feeds.values())).shape[0] if feeds else 1
        items = [self._run_one({k: v[i:i + 1] for k, v in feeds.items()}) for i in range(batch)]
        return {name: np.concatenate([it[name] for it in items], axis=0)
                for _, name, _ in self._outputs}

    def _extractor(self, feeds: dict[str, np.ndarray]) -> Any:
        import numpy as np

        ex = self._net.create_extractor()
        for blob, name, dtype in self._inputs:
            value = np.ascontiguousarray(feeds[name], dtype=np.int32 if dtype.startswith("int")
                                         else np.float32)
            # clone(): a Mat built on a numpy array shares its memory (as pnnx's own runner does)
            ex.input(blob, self._ncnn.Mat(value, batch_index=0).clone())
        return ex

    def intermediates(self, feeds: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
        """Every layer's output blobs for batch item 0, in .param order (light mode off keeps
        them; ncnn hands them back as fp32 without packing, batch axis dropped)."""
        import numpy as np

        ex = self._extractor({k: v[:1] for k, v in feeds.items()})
        ex.set_light_mode(False)
        found = []
        for kind, name, _, tops, _ in _layers(self._param):
            for blob in tops if kind != "Input" else ():
                ret, mat = ex.extract(blob)
                if ret == 0:
                    found.append((f"{name}:{blob}", kind, np.array(mat.numpy()).copy()))
        return found

    def profile(self, feeds: dict[str, np.ndarray], runs: int) -> list[OpTime]:
        """Each layer timed through the extractor, batch item 0 (mtconvert.backends.profiling
        .ncnn says how)."""
        from mtconvert.backends.profiling import ncnn as ncnn_profiling

        item = {k: v[:1] for k, v in feeds.items()}
        layers = [(kind, name, tops) for kind, name, _, tops, _ in _layers(self._param)]
        return ncnn_profiling.profile(lambda: self._extractor(item), layers, runs)

    def _run_one(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np

        ex = self._extractor(feeds)
        out = {}
        for blob, name, shape in self._outputs:
            ret, mat = ex.extract(blob)
            if ret != 0:
                raise RuntimeFailure(f"ncnn extract({blob}) returned {ret}", target="ncnn",
                                     step="run")
            value = np.array(mat.numpy(batch_index=0))
            if None in shape:  # adopted: only the rank is known; pnnx may drop the batch axis
                out[name] = value.reshape((1,) * (len(shape) - value.ndim) + value.shape)
                continue
            if value.size != int(np.prod(shape)):
                raise RuntimeFailure(f"ncnn returned {value.size} values for {name}, the source "
                                     f"{int(np.prod(shape))} {tuple(shape)}: the converted graph "
                                     "computes another shape", target="ncnn", step="run")
            out[name] = value.reshape(shape)
        return out
