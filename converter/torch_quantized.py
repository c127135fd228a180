"""Quantized PyTorch sources exported as quantized ONNX (QDQ), so they take the same path as a
quantized ONNX source (``mtconvert.quantized``: description, per-target plan, int8-source
profile, the compressed size gate).

Two kinds are recognised, in a module or in a ``.pt2`` program:
- PT2E (``prepare_pt2e``/``convert_pt2e``, e.g. with the XNNPACK quantizer): the graph calls
  ``quantized_decomposed.{quantize,dequantize}_per_{tensor,channel}``; each becomes ONNX
  ``QuantizeLinear``/``DequantizeLinear`` (symbolics for the TorchScript exporter below).
- torchao weight-only int8 (``quantize_(model, Int8WeightOnlyConfig())``): the weights are
  tensor subclasses (``qdata`` int8, ``scale``, ``zero_point``, ``block_size``); torch.export
  reads their parts with ``export.access_subclass_inner_tensor``, which ONNX cannot export. The
  program is re-written so each such weight is ``dequantize_per_channel(qdata, scale, zp)``
  (its ``scale`` part then multiplies by one), and the re-written module is checked against
  the original on the example inputs before it is used.

``exportable(module, feeds)`` -> (module to export, what the source holds or None);
``finish(path)`` makes the exported file's Constant nodes initializers (the quantized-ONNX
description and the dequantize lowering read scales from initializers). Heavy imports
(torch, onnx) happen inside functions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mtconvert.errors import ModelLoadError, first_line

_ACCESS = "access_subclass_inner_tensor"
_QD = "quantized_decomposed"


def register_ops() -> None:
    """Register torch's ``quantized_decomposed`` operators (a PT2E program's Q/DQ ops), which
    ``torch.export.load`` must resolve by name."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers the library


def exportable(module: Any, feeds: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
    """The module the ONNX exporter can take, and the source's quantization (origin, bits,
    layers), or (module, None) for a float module."""
    import copy

    import torch

    register_ops()
    gm = copy.deepcopy(module) if isinstance(module, torch.fx.GraphModule) else None
    if gm is None and _has_subclass_weights(module):
        gm = _exported(module, feeds)
    if gm is None:
        return module, None
    access = [n for n in gm.graph.nodes if n.op == "call_function" and _ACCESS in str(n.target)]
    qdq = [n for n in gm.graph.nodes if n.op == "call_function" and _QD in str(n.target)]
    if not access and not qdq:
        return module, None
    _register_symbolics()
    if not access:
        return gm, {"origin": "pt2e", "bits": 8,
                    "torch_qdq_ops": sum(1 for n in qdq if "dequantize" in str(n.target))}
    layers = _unwrap_subclasses(gm, access)
    _check_same(module, gm, feeds)
    return gm, {"origin": "torchao", "bits": 8, "torch_layers": layers}


def _has_subclass_weights(module: Any) -> bool:
    import torch

    return any(type(p) not in (torch.Tensor, torch.nn.Parameter) and hasattr(p, "qdata")
               for p in module.parameters())


def _exported(module: Any, feeds: dict[str, Any]) -> Any:
    import torch

    try:
        return torch.export.export(module, tuple(feeds.values())).module()
    except Exception as exc:  # noqa: BLE001 - named in one line
        raise ModelLoadError(f"could not torch.export the quantized module: "
                             f"{first_line(exc)}") from None


def _unwrap_subclasses(gm: Any, access: list[Any]) -> list[dict[str, Any]]:
    """Each quantized weight read as ``dequantize_per_channel`` of its int8 part (the program's
    multiplication by its scale part then multiplies by one). Returns each weight's facts."""
    import torch

    layers, ops = {}, torch.ops.quantized_decomposed
    for node in access:
        base, part = node.args
        w = gm.get_parameter(base.target) if base.op == "get_attr" else None
        if w is None or part not in ("qdata", "scale", "zero_point"):
            raise ModelLoadError(f"quantized weight {base.name}: part {part!r} of a "
                                 f"{type(w).__name__} cannot be exported to ONNX")
        info = layers.get(base.target) or _weight_facts(base.target, w)
        layers[base.target] = info
        name = f"_mtq_{base.target.replace('.', '_')}"
        with gm.graph.inserting_before(node):
            if part == "qdata":
                for suffix, value in (("q", w.qdata), ("s", info.pop("_scale")),
                                      ("z", info.pop("_zero"))):
                    gm.register_buffer(f"{name}_{suffix}", value)
                args = [gm.graph.get_attr(f"{name}_{s}") for s in "qsz"]
                new = gm.graph.call_function(ops.dequantize_per_channel.default, (
                    *args, info["axis"], -128, 127, torch.int8))
            else:  # the program multiplies by the scale (adds the zero point) itself: undone
                gm.register_buffer(f"{name}_{part}", torch.ones_like(getattr(w, part))
                                   if part == "scale" else torch.zeros_like(getattr(w, part)))
                new = gm.graph.get_attr(f"{name}_{part}")
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    for node in list(gm.graph.nodes):  # dtype assertions on the parts that changed dtype
        if node.op == "call_function" and "_assert_tensor_metadata" in str(node.target):
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return [{k: v for k, v in d.items() if not k.startswith("_")} for d in layers.values()]


def _weight_facts(name: str, w: Any) -> dict[str, Any]:
    """A subclass weight's int8 layout: per-tensor or per-channel along one axis; anything
    else (group-wise blocks, 4-bit) is named and refused."""
    import torch

    q, scale = w.qdata, w.scale.to(torch.float32)
    zero = getattr(w, "zero_point", None)
    if q.dtype != torch.int8 or q.ndim != 2:
        raise ModelLoadError(f"quantized weight {name}: a {type(w).__name__} holding "
                             f"{q.dtype} {tuple(q.shape)} is not supported (int8 2-D only)")
    axes = [d for d in range(2) if scale.numel() == q.shape[d] > 1]
    if scale.numel() != 1 and (not axes or scale.squeeze().ndim != 1):
        raise ModelLoadError(f"quantized weight {name}: scales of shape {tuple(scale.shape)} "
                             f"for {tuple(q.shape)} (group-wise) are not supported")
    axis = axes[0] if axes else 0
    flat = scale.reshape(-1).expand(q.shape[axis]).contiguous()
    zp = (zero.reshape(-1).to(torch.int64) if zero is not None
          else torch.zeros(1, dtype=torch.int64)).expand(q.shape[axis]).contiguous()
    return {"weight": name, "shape": list(q.shape), "axis": axis,
            "granularity": "per-tensor" if scale.numel() == 1 else "per-channel",
            "_scale": flat, "_zero": zp}


def _check_same(original: Any, gm: Any, feeds: dict[str, Any]) -> None:
    """The re-written program computes what the original computes (float rounding only)."""
    import torch

    from mtconvert import torch_source

    with torch.inference_mode():
        want = torch_source.flatten_outputs(original(*feeds.values()))
        got = torch_source.flatten_outputs(gm(*feeds.values()))
    for key, ref in want.items():
        diff = float((got[key].float() - ref.float()).abs().max())
        bound = 1e-4 * max(1.0, float(ref.float().abs().max()))
        if diff > bound:
            raise ModelLoadError(f"the quantized weights could not be exported faithfully: "
                                 f"output {key!r} moved by {diff:.3g} (bound {bound:.3g})")


# --- ONNX symbolics for quantized_decomposed (TorchScript exporter) ---------------------------

def _register_symbolics() -> None:
    from torch.onnx import register_custom_op_symbolic

    for name, fn in (("quantize_per_tensor", _q_tensor), ("dequantize_per_tensor", _dq_tensor),
                     ("quantize_per_channel", _q_channel),
                     ("dequantize_per_channel", _dq_channel)):
        register_custom_op_symbolic(f"{_QD}::{name}", fn, 17)


def _const(g: Any, value: Any, dtype: Any) -> Any:
    import torch

    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def _int_type(qmin: int) -> tuple[Any, int]:
    import torch

    return (torch.int8, 3) if qmin < 0 else (torch.uint8, 2)  # ONNX INT8 = 3, UINT8 = 2


def _per_tensor(op: str) -> Any:
    def symbolic(g: Any, x: Any, scale: Any, zero: Any, qmin: Any, qmax: Any, *rest: Any) -> Any:
        import torch
        from torch.onnx import symbolic_helper as sh

        s, z = sh._get_const(scale, "f", "scale"), sh._get_const(zero, "i", "zero_point")
        lo, hi = sh._get_const(qmin, "i", "quant_min"), sh._get_const(qmax, "i", "quant_max")
        dtype = _int_type(lo)[0]
        out = g.op(op, x, _const(g, s, torch.float32), _const(g, z, dtype))
        full = (-128, 127) if lo < 0 else (0, 255)
        if op == "QuantizeLinear" and (lo, hi) != full:  # a narrower range clips the ints
            out = g.op("Clip", out, _const(g, lo, dtype), _const(g, hi, dtype))
        return out
    return symbolic


def _per_channel(op: str) -> Any:
    def symbolic(g: Any, x: Any, scales: Any, zeros: Any, axis: Any, qmin: Any, qmax: Any,
                 *rest: Any) -> Any:
        from torch.onnx import symbolic_helper as sh

        ax = sh._get_const(axis, "i", "axis")
        lo, hi = sh._get_const(qmin, "i", "quant_min"), sh._get_const(qmax, "i", "quant_max")
        dtype, onnx_type = _int_type(lo)
        out = g.op(op, x, g.op("Cast", scales, to_i=1), g.op("Cast", zeros, to_i=onnx_type),
                   axis_i=ax)
        full = (-128, 127) if lo < 0 else (0, 255)
        if op == "QuantizeLinear" and (lo, hi) != full:
            out = g.op("Clip", out, _const(g, lo, dtype), _const(g, hi, dtype))
        return out
    return symbolic


_q_tensor, _dq_tensor = _per_tensor("QuantizeLinear"), _per_tensor("DequantizeLinear")
_q_channel, _dq_channel = _per_channel("QuantizeLinear"), _per_channel("DequantizeLinear")


def finish(path: Path) -> None:
    """The exported file with its Constant nodes as initializers (what the quantized-ONNX
    description and the dequantize lowering read scales and zero points from)."""
    import onnx

    model = onnx.load(str(path))
    keep = []
    for node in model.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) \
            if node.op_type == "Constant" else None
        if value is None:
            keep.append(node)
            continue
        value.name = node.output[0]
        model.graph.initializer.append(value)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    onnx.save(model, str(path))
