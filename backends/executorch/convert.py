"""ExecuTorch conversion, run in a child process: ``python -m mtconvert.backends.executorch.convert
JOB``.

A PyTorch program (a .pt2 the parent exported at the validation shapes) or an ONNX source
(bridged to PyTorch with onnx2torch, shape scalars folded, see coreml's onnx_bridge) becomes a
``torch.export`` program; int8 quantizes it with the XNNPACK quantizer (PT2E: prepare, calibrate,
convert, export again); fp16 casts the module's floating-point weights and activations to
float16 (inputs and outputs stay as the source declares them). Then
``to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])`` and
``.to_executorch()`` write the ``.pte``. What was delegated to XNNPACK (and what was not) is
read with ``get_delegation_info`` on the lowered graph, and the written file is described
(``pte.describe``: its kernel calls checked against the runtime's registry). Prints one
``MTCONVERT-RESULT {json}``.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from mtconvert.backends.executorch.pte import describe


def convert(job: dict[str, Any]) -> dict[str, Any]:
    clock = time.perf_counter()
    steps: list[str] = []
    program, args = _exported(job, steps)
    result: dict[str, Any] = {"steps": steps}
    store = _stored_fp32(job)
    if job.get("fp32_twin"):  # the same program at fp32: the yardstick for the precision loss
        _fp32_twin(program, Path(job["fp32_twin"]), store, steps)
    if job["precision"] == "int8":
        program = _quantized(program, args, job, steps)
    elif job["precision"] == "fp16":
        program = _half(program, args, steps, dim_spec(job["input_order"], job.get("dims")))
    result["delegation"] = _lower(program, Path(job["out"]), steps)
    if job["precision"] == "fp32":
        _keep(Path(job["out"]), store)
    result["program"] = describe(Path(job["out"]))
    result["seconds"] = round(time.perf_counter() - clock, 2)
    return result


def _stored_fp32(job: dict[str, Any]) -> Path | None:
    """Where the fp32 .pte lowered from this job's program is kept (``job["lowered_store"]``,
    the conversion cache's folder): named by the program file's bytes, the shapes, dtypes and
    Dims, this package's conversion code and the tools' versions, so an int8 or fp16 run's fp32
    twin is the .pte an fp32 run of the same source already lowered. None: not kept."""
    import hashlib
    import json

    from mtconvert import deps

    if not job.get("lowered_store"):
        return None
    h = hashlib.sha256()
    with open(job["model"], "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    here = Path(__file__).resolve().parent
    for code in (here / "convert.py", here.parent / "coreml" / "onnx_bridge.py"):
        h.update(code.read_bytes())
    h.update(json.dumps([job["kind"], job["input_order"], job["input_shapes"],
                         job["input_dtypes"], job.get("dims"),
                         deps.versions(["executorch", "torch", "torchao", "onnx2torch"])],
                        sort_keys=True).encode())
    return Path(job["lowered_store"]) / f"{h.hexdigest()}.pte"


def _fp32_twin(program: Any, twin: Path, store: Path | None, steps: list[str]) -> None:
    if store is not None and store.is_file():
        shutil.copyfile(store, twin)
        steps.append("fp32 twin: the .pte an fp32 run lowered from the same program (kept in "
                     "the cache), not lowered again")
        return
    _lower(program, twin, [])
    _keep(twin, store)


def _keep(pte: Path, store: Path | None) -> None:
    """Copy ``pte`` to ``store`` whole (a temporary name, then an atomic rename)."""
    if store is None or store.is_file():
        return
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.with_name(f".{store.name}.{os.getpid()}.tmp")
    shutil.copyfile(pte, tmp)
    os.replace(tmp, store)


def _example_args(job: dict[str, Any]) -> tuple[Any, ...]:
    return example_args(job["input_order"], job["input_shapes"], job["input_dtypes"])


def example_args(names: list[str], shapes: list[list[int]], dtypes: list[str]
                 ) -> tuple[Any, ...]:
    """Example inputs to trace with: ones for masks, zeros otherwise."""
    import torch

    return tuple((torch.ones if "mask" in name.lower() else torch.zeros)(
        shape, dtype=getattr(torch, dtype)) for name, shape, dtype in
        zip(names, shapes, dtypes, strict=True))


def dim_spec(names: list[str], dims: dict[str, dict[str, list[Any]]] | None
             ) -> tuple[dict[int, Any], ...] | None:
    """``torch.export``'s ``dynamic_shapes`` for inputs ``names`` from ``dims`` ({input:
    {axis: [symbol, lo, hi]}}): one ``Dim(min=lo, max=hi)`` per symbol, shared by the axes
    that carry it (XNNPACK needs the upper bound). None for a static program."""
    import re

    import torch

    if not dims:
        return None
    made: dict[str, Any] = {}
    for axes in dims.values():
        for symbol, lo, hi in axes.values():
            if symbol not in made:
                ident = re.sub(r"\W", "_", symbol)
                made[symbol] = torch.export.Dim(ident if ident.isidentifier() else f"d_{ident}",
                                                min=lo, max=hi)
    return tuple({int(axis): made[d[0]] for axis, d in (dims.get(name) or {}).items()}
                 for name in names)


def _exported(job: dict[str, Any], steps: list[str]) -> tuple[Any, tuple[Any, ...]]:
    import torch

    args = _example_args(job)
    if job["kind"] == "pt2":
        return torch.export.load(job["model"]), args
    import onnx

    from mtconvert.backends.coreml.onnx_bridge import export, to_torch

    t0 = time.perf_counter()
    module = to_torch(onnx.load(job["model"]))
    program = export(module, args)
    steps.append(f"onnx2torch: ONNX -> torch.fx module; traced (make_fx, shape scalars "
                 f"folded) and torch.export at the fixed shapes [{time.perf_counter() - t0:.1f} s]")
    linears = _linears(program)
    if linears:
        steps.append(f"{linears} addmm/mm of a transposed weight written as aten.linear "
                     "(XNNPACK delegates linear; the traced form stayed on portable kernels)")
    return program, args


def _linears(program: Any) -> int:
    """``addmm(b, x, t(W))`` and ``mm(x, t(W))`` with W a parameter or constant, as
    ``linear(x, W, b)``: what ``nn.Linear`` is before make_fx decomposed it (onnx2torch's Gemm).
    XNNPACK's partitioner takes ``linear`` with a static weight; the decomposed form, without
    its source-module metadata, was left to the portable ``addmm`` kernel. Same arithmetic."""
    import torch

    aten = torch.ops.aten
    graph = program.graph_module.graph
    static = {spec.arg.name for spec in program.graph_signature.input_specs
              if spec.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR")}

    def weight(node: Any) -> Any:
        if not isinstance(node, torch.fx.Node):
            return None
        if node.target is aten.t.default or (node.target is aten.permute.default
                                             and list(node.args[1]) == [1, 0]):
            w = node.args[0]
            if isinstance(w, torch.fx.Node) and w.op == "placeholder" and w.name in static:
                return w
        return None

    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.kwargs:
            continue
        if node.target is aten.addmm.default and len(node.args) == 3:
            bias, x, wt = node.args
            ok = isinstance(bias, torch.fx.Node) and bias.meta["val"].dim() == 1
            args = (x, weight(wt), bias) if ok else None
        elif node.target is aten.mm.default and len(node.args) == 2:
            x, wt = node.args
            args = (x, weight(wt))
        else:
            continue
        if args is None or args[1] is None:
            continue
        _replace_by_linear(graph, node, lambda a=args: a)
        count += 1
    if count:
        graph.eliminate_dead_code()
        program.graph_module.recompile()
    return count


def _calibration(job: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The calibration samples (an .npz of arrays stacked on a first axis), as argument tuples."""
    import numpy as np
    import torch

    if not job.get("calibration"):
        return [_example_args(job)]
    with np.load(job["calibration"]) as data:
        arrays = [data[name] for name in job["input_order"]]
    return [tuple(torch.from_numpy(np.ascontiguousarray(a[i])).to(getattr(torch, d))
                  for a, d in zip(arrays, job["input_dtypes"], strict=True))
            for i in range(arrays[0].shape[0])]


def _quantized(program: Any, args: tuple[Any, ...], job: dict[str, Any],
               steps: list[str]) -> Any:
    """PT2E int8 with the XNNPACK quantizer, per-channel int8 weights. ``dynamic`` (default):
    activations quantized at run time per tensor, linear layers only, the rest float; ``full``:
    static int8 activations everywhere, calibrated on the run's samples."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    t0 = time.perf_counter()
    dynamic = job.get("int8_scheme", "dynamic") == "dynamic"
    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic))
    samples = [args] if dynamic else _calibration(job)
    module = program.module()
    matmuls = _weight_matmuls(module)
    if matmuls:
        steps.append(f"{matmuls} mm/matmul/addmm of an untransposed [in, out] weight as "
                     "aten.linear with the weight stored transposed (the XNNPACK quantizer "
                     "quantizes linear layers; ONNX MatMul weights would have stayed float)")
    retyped = _integer_scalars(module)
    if retyped:
        steps.append(f"{retyped} integer add/mul with a Python scalar written as add.Scalar/"
                     "mul.Scalar (the XNNPACK quantizer would make the scalar a float32 tensor "
                     "and the integer index arithmetic float)")
    with torch.no_grad():
        prepared = prepare_pt2e(module, quantizer)
        for sample in samples:
            prepared(*sample)
        converted = convert_pt2e(prepared)
        tables = _embeddings_byte(converted)
        program = torch.export.export(converted, args, strict=False,
                                      dynamic_shapes=dim_spec(job.get("input_order"),
                                                              job.get("dims")))
    what = ("int8 per-channel weights, activations quantized dynamically (per tensor, at run "
            "time)" if dynamic else "int8 per-channel weights, static int8 activations "
            f"calibrated on {len(samples)} sample(s)")
    steps.append(f"XNNPACK quantizer (PT2E): {what} [{time.perf_counter() - t0:.1f} s]")
    if tables:
        steps.append(f"{tables} embedding table(s) as int8 with per-row scales "
                     "(quantized_decomposed.embedding_byte, ExecuTorch's quantized kernels; "
                     "the XNNPACK quantizer leaves embeddings float)")
    return program


def _embeddings_byte(module: Any) -> int:
    """Every lookup in a 2-D float constant table, ``aten.embedding(W, ids)`` (nn.Embedding)
    or ``aten.index.Tensor(W, [ids])`` (an ONNX Gather on axis 0 as onnx2torch and make_fx
    leave it), as ``quantized_decomposed.embedding_byte(Wq, scales, None, -128, 127, ids)``:
    ``Wq`` int8, one symmetric scale per row (max |row| / 127), what ExecuTorch's Llama export
    does with ``--embedding-quantize 8,0``. XNNPACK delegates no embedding and its quantizer
    annotates none, so without this the word-embedding table, most of a small encoder's
    bytes, stayed float32 in an int8 .pte."""
    import torch
    # defines quantized_decomposed.embedding_byte
    from executorch.exir.passes import _quant_patterns_and_replacements  # noqa: F401

    aten = torch.ops.aten
    graph = module.graph
    done: dict[str, tuple[str, str]] = {}
    count = 0
    for node in list(graph.nodes):
        table, ids = _lookup(node, aten)
        if table is None:
            continue
        value = _attr(module, table.target)
        if not (isinstance(value, torch.Tensor) and value.dim() == 2
                and value.dtype == torch.float32):
            continue
        if table.target not in done:
            scales = (value.detach().abs().amax(dim=1) / 127.0).clamp_min(1e-12)
            q = torch.round(value.detach() / scales[:, None]).clamp(-128, 127).to(torch.int8)
            names = (f"_mtconvert_table_{len(done)}", f"_mtconvert_table_{len(done)}_scales")
            module.register_buffer(names[0], q)
            module.register_buffer(names[1], scales.contiguous())
            done[table.target] = names
        names = done[table.target]
        _replace(graph, node, torch.ops.quantized_decomposed.embedding_byte.default,
                 lambda ids=ids, n=names: (graph.get_attr(n[0]), graph.get_attr(n[1]), None,
                                           -128, 127, ids))
        count += 1
    if count:
        _drop_unused(module, graph, done)
    return count


def _lookup(node: Any, aten: Any) -> tuple[Any, Any]:
    """(table, indices) of a row lookup in a constant table, else (None, None)."""
    import torch

    if node.op != "call_function" or node.kwargs:
        return None, None
    if node.target is aten.embedding.default and len(node.args) == 2:
        table, ids = node.args
    elif node.target is aten.index.Tensor and len(node.args) == 2 \
            and len(node.args[1]) == 1 and isinstance(node.args[1][0], torch.fx.Node):
        table, ids = node.args[0], node.args[1][0]
    else:
        return None, None
    val = ids.meta.get("val") if isinstance(ids, torch.fx.Node) else None
    if not (isinstance(table, torch.fx.Node) and table.op == "get_attr"
            and isinstance(val, torch.Tensor) and val.dtype in (torch.int64, torch.int32)):
        return None, None
    return table, ids


def _weight_matmuls(module: Any) -> int:
    """``mm(x, W)``, ``matmul(x, W)`` and ``addmm(b, x, W)`` with W a 2-D float constant of the
    (unlifted) module, as ``linear(x, W.T, b)`` with ``W.T`` stored as a new constant: an ONNX
    ``MatMul`` by an initializer as onnx2torch and make_fx leave it, or a module's ``x @ W``.
    XNNPACK's quantizer annotates ``linear`` (and convolutions) only, so without this every
    encoder projection of an ONNX source stayed float32 in an "int8" .pte. Same products; the
    accumulation order may differ by an ulp."""
    import torch

    aten = torch.ops.aten
    graph = module.graph
    done: dict[str, str] = {}
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.kwargs:
            continue
        if node.target in (aten.mm.default, aten.matmul.default) and len(node.args) == 2:
            (x, w), bias = node.args, None
        elif node.target is aten.addmm.default and len(node.args) == 3:
            bias, x, w = node.args
        else:
            continue
        if not (isinstance(w, torch.fx.Node) and w.op == "get_attr"):
            continue
        value = _attr(module, w.target)
        if not (isinstance(value, torch.Tensor) and value.dim() == 2
                and value.is_floating_point()):
            continue
        if bias is not None and not (isinstance(bias, torch.fx.Node)
                                     and bias.meta.get("val") is not None
                                     and bias.meta["val"].dim() == 1):
            continue
        if w.target not in done:
            name = f"_mtconvert_linear_weight_{len(done)}"
            module.register_buffer(name, value.detach().t().contiguous())
            done[w.target] = name
        _replace_by_linear(graph, node, lambda x=x, t=done[w.target], b=bias: (
            x, graph.get_attr(t)) + (() if b is None else (b,)))
        count += 1
    if count:
        _drop_unused(module, graph, done)
    return count


def _replace_by_linear(graph: Any, node: Any, args: Any) -> None:
    import torch

    _replace(graph, node, torch.ops.aten.linear.default, args)


def _replace(graph: Any, node: Any, target: Any, args: Any) -> None:
    """``node`` replaced by ``target(*args())`` (``args`` is called at the insertion point, so
    any node it makes comes before the new one), with the node's metadata."""
    with graph.inserting_before(node):
        new = graph.call_function(target, args())
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _drop_unused(module: Any, graph: Any, done: dict[str, Any]) -> None:
    """After rewrites that replaced the constants named by ``done``'s keys: dead nodes removed
    and every original constant no node reads any more deleted (it would still be exported)."""
    graph.eliminate_dead_code()
    used = {n.target for n in graph.nodes if n.op == "get_attr"}
    for target in set(done) - used:
        owner, _, attr = target.rpartition(".")
        delattr(module.get_submodule(owner) if owner else module, attr)
    module.recompile()


def _attr(module: Any, target: str) -> Any:
    owner, _, attr = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr)


def _integer_scalars(module: Any) -> int:
    """``aten.add.Tensor(x, 0)`` / ``aten.mul.Tensor(x, 2)`` on an integer ``x`` as
    ``add.Scalar`` / ``mul.Scalar``: same arithmetic, same dtype. Why: the XNNPACK quantizer's
    ``transform_for_annotation`` (``_convert_scalars_to_attrs`` in
    executorch/backends/xnnpack/quantizer/xnnpack_quantizer_utils.py) replaces every Python
    scalar argument of ``add.Tensor``/``mul.Tensor`` by a buffer ``torch.tensor(float(x))``,
    whatever the other operand's dtype. In a HF BERT program the 4-D attention mask is built
    from ``arange(seq) + 0`` (int64) and read with ``aten.index``; with a float32 addend the
    indices become float32 and calibration stops with "IndexError: tensors used as indices
    must be long, int, byte or bool tensors". ``.Scalar`` overloads are not in its list."""
    import torch

    aten = torch.ops.aten
    scalar_form = {aten.add.Tensor: aten.add.Scalar, aten.mul.Tensor: aten.mul.Scalar}
    count = 0
    for node in module.graph.nodes:
        if node.op != "call_function" or node.target not in scalar_form or node.kwargs \
                or len(node.args) != 2:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dtype.is_floating_point \
                or val.dtype.is_complex:
            continue
        a, b = node.args
        if isinstance(a, (int, bool)) and isinstance(b, torch.fx.Node):
            a, b = b, a  # add and mul commute
        if isinstance(a, torch.fx.Node) and isinstance(b, (int, bool)):
            node.target, node.args = scalar_form[node.target], (a, b)
            count += 1
    if count:
        module.recompile()
    return count


FP16_MAX = 65504.0


def _half(program: Any, args: tuple[Any, ...], steps: list[str], dims: Any = None) -> Any:
    """Weights and activations in float16; floating-point inputs and outputs keep their type
    (cast at the edges), so the .pte takes what the source takes. The traced graph names
    float32 in its casts and factories (``mask.float()``, ``full(..., dtype=float32)``): those
    become float16, and finite literals beyond float16's range (an attention mask's
    ``finfo(float32).min``) are clamped to +-65504, since in float16 they would be infinite and
    ``0 * -inf`` is NaN."""
    import torch
    from torch.fx.node import map_aggregate

    t0 = time.perf_counter()
    module = program.module()
    changed = {"dtypes": 0, "literals": 0}

    def fix(value: Any) -> Any:
        if value is torch.float32:
            changed["dtypes"] += 1
            return torch.float16
        if isinstance(value, float) and abs(value) > FP16_MAX and value == value \
                and abs(value) != float("inf"):
            changed["literals"] += 1
            return FP16_MAX if value > 0 else -FP16_MAX
        return value

    for node in module.graph.nodes:
        if node.op == "call_function":
            node.args = map_aggregate(node.args, fix)
            node.kwargs = map_aggregate(node.kwargs, fix)
        elif node.op == "get_attr":  # constants that are neither parameters nor buffers
            owner, _, attr = node.target.rpartition(".")
            holder = module.get_submodule(owner) if owner else module
            value = getattr(holder, attr)
            if (isinstance(value, torch.Tensor) and value.dtype == torch.float32
                    and not isinstance(value, torch.nn.Parameter)
                    and attr not in holder._buffers):  # .half() below takes those
                setattr(holder, attr, value.half())
    module.recompile()

    class Half(torch.nn.Module):
        def __init__(self, inner: Any):
            super().__init__()
            self.inner = inner.half()

        def forward(self, *xs: Any) -> Any:
            xs = tuple(x.half() if x.is_floating_point() else x for x in xs)
            out = self.inner(*xs)
            return torch.utils._pytree.tree_map(
                lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point()
                else t, out)

    with torch.no_grad():
        program = torch.export.export(Half(module), args, strict=False,
                                      dynamic_shapes=None if dims is None else (dims,))
    steps.append(f"fp16: weights and activations cast to float16 ({changed['dtypes']} float32 "
                 f"casts/factories retyped, {changed['literals']} literal(s) clamped to "
                 f"+-{FP16_MAX:g}), inputs/outputs keep their type "
                 f"[{time.perf_counter() - t0:.1f} s]")
    return program


def _lower(program: Any, out: Path, steps: list[str]) -> dict[str, Any]:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower

    t0 = time.perf_counter()
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    info = get_delegation_info(edge.exported_program().graph_module)
    t1 = time.perf_counter()
    executorch_program = edge.to_executorch()
    out.write_bytes(executorch_program.buffer)
    by_op = {op: {"delegated": b.delegated, "non_delegated": b.non_delegated}
             for op, b in sorted(info.delegation_by_operator.items())
             if op != "getitem"}  # tuple unpacking of a delegate's outputs, no operator
    delegated = sum(c["delegated"] for c in by_op.values())
    steps.append(f"to_edge_transform_and_lower with XnnpackPartitioner: {delegated} operators "
                 f"delegated in {info.num_delegated_subgraphs} subgraph(s), "
                 f"{sum(c['non_delegated'] for c in by_op.values())} not [{t1 - t0:.1f} s]")
    steps.append(f"to_executorch: {out.name} [{time.perf_counter() - t1:.1f} s]")
    return {"subgraphs": info.num_delegated_subgraphs,
            "delegated": sum(c["delegated"] for c in by_op.values()),
            "non_delegated": sum(c["non_delegated"] for c in by_op.values()),
            "by_operator": by_op}


if __name__ == "__main__":
    from mtconvert.backends.process import child_main

    child_main(convert)
