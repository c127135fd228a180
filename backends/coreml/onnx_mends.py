"""onnx2torch converters for the op versions current exporters write (ONNX opsets 17 to 21).

onnx2torch 1.5.15 looks a node's converter up by the op's ``since_version`` at the model's
opset, and has none for most versions introduced after opset 16. The default PyTorch exporter
(``torch.onnx.export(..., dynamo=True)``, opset 20) therefore stopped at the first ``Cast``
(version 19). Each entry here is registered through onnx2torch's own registry, never by patching
its code, and is checked against ONNX Runtime in tests/backends/test_coreml_bridge.py.

Versions whose semantics are unchanged for the types a Transformer uses reuse the older
converter (``ALIASES``); a guard refuses the attribute values the older converter would ignore:

- ``Cast`` 19/21 add ``saturate``, which only affects float8 targets (the old converter refuses
  float8 types); ``Reshape`` 19/21, ``Shape`` 19/21, ``Identity`` 19/21, ``Constant`` 19/21,
  ``ConstantOfShape`` 20/21, ``Equal`` 19, ``IsInf``/``IsNaN`` 20, ``Transpose`` 21,
  ``Unsqueeze`` 21 only add types (float8, int4, string, bfloat16);
- ``Resize`` 18/19 add ``antialias``, ``axes``, ``keep_aspect_ratio_policy`` and the
  ``half_pixel_symmetric`` mode; ``AveragePool`` 19 adds ``dilations``; ``ScatterND`` 18 adds the
  max/min reductions: reused only when those keep their defaults (else NotImplementedError).

Opsets 22 and 23 only add types (bfloat16, float4) to the ops in ``TYPE_ONLY``, which reuse the
converter of their previous version.

New converters, where the semantics changed or onnx2torch has none:

- ``Reshape`` 14/19/21 with ``allowzero=1`` (the torch.export-based exporter writes it on every
  Reshape; onnx2torch refuses it): a 0 in the shape is then a literal 0, which is what
  ``torch.reshape`` does; ``allowzero=0`` keeps onnx2torch's converter (0 copies the input's
  dimension);
- ``Reciprocal``: onnx2torch writes ``torch.reciprocal``, which coremltools turns into MIL
  ``inverse``, whose ``epsilon`` defaults to 1e-4 (``1 / (x + 1e-4)``): the exported RMSNorm's
  ``Reciprocal(Sqrt(mean + eps))`` (Qwen2, Llama) came out 0.4 off. It is written as a division
  ``1 / x`` (MIL ``real_div``), which is exact;
- ``Gelu`` 20 (``approximate`` none/tanh): no converter at all;
- ``RMSNormalization`` 23 (what the exporter writes for Qwen2/Llama norms at opset 23): no
  converter; written as ``x / sqrt(mean(x^2) + eps) * scale`` in float32;
- ``Attention`` 23 (the exporter's scaled_dot_product_attention at opset 23): no converter;
  written out as matmul, scale, mask, softmax, matmul, for 3-D and 4-D inputs, a boolean or
  additive mask, ``is_causal``, ``softcap`` and grouped key/value heads; past key/value inputs
  and the extra outputs are refused;
- ``Reduce*`` 18 (and ``ReduceMax``/``ReduceMin`` 20) take ``axes`` as an optional input;
- ``Split`` 18 adds ``num_outputs``; ONNX's uneven split makes the last chunk the smaller one
  (onnx2torch's ``Split`` 13 floors the chunk size, which drops elements);
- ``Pad`` 18/19/21 add the ``axes`` input and the ``wrap`` mode;
- ``Clip`` 11-13: onnx2torch reads an omitted bound (empty input name, e.g. ``clamp(min=...)``
  from the TorchScript exporter) as a missing constant and fails with "Dynamic value of min/max";
  constant bounds become Python scalars of the tensor's type (coremltools needs constant
  bounds; a float bound on an integer tensor would promote it); bounds that really are
  computed become ``maximum``/``minimum``;
- ``Min``/``Max`` 8-13: a constant single-element operand is folded into ``clamp`` with a scalar
  (floating point) or ``minimum``/``maximum`` against the constant (integers); otherwise
  pairwise ``minimum``/``maximum`` instead of onnx2torch's stack + ``amax``.
"""
from __future__ import annotations

import functools
from typing import Any

# (op, new version) -> (old registered version, attributes that must keep their defaults)
ALIASES: dict[tuple[str, int], tuple[int, dict[str, Any]]] = {
    ("Cast", 19): (13, {}), ("Cast", 21): (13, {}),
    ("Shape", 19): (15, {}), ("Shape", 21): (15, {}),
    ("Identity", 19): (16, {}), ("Identity", 21): (16, {}),
    ("Constant", 19): (13, {}), ("Constant", 21): (13, {}),
    ("ConstantOfShape", 20): (9, {}), ("ConstantOfShape", 21): (9, {}),
    ("Equal", 19): (13, {}),
    ("IsInf", 20): (10, {}), ("IsNaN", 20): (13, {}),
    ("Transpose", 21): (13, {}),
    ("Unsqueeze", 21): (13, {}),
    ("Resize", 18): (13, {"antialias": 0, "axes": None, "keep_aspect_ratio_policy": "stretch"}),
    ("Resize", 19): (13, {"antialias": 0, "axes": None, "keep_aspect_ratio_policy": "stretch",
                          "coordinate_transformation_mode!": "half_pixel_symmetric"}),
    ("AveragePool", 19): (11, {"dilations": "ones"}),
    ("ScatterND", 18): (16, {}),
}

# Opsets 22 and 23 (beyond what the exporters write by default; torch.onnx.export accepts
# opset_version=22/23) only add types to these: 22 bfloat16, 23 float4e2m1. Each reuses the
# converter of its previous version; the test checks each schema's inputs, outputs and
# attributes are those of the previous version.
TYPE_ONLY = {
    22: ("Acos", "Asin", "Atan", "AveragePool", "Conv", "ConvTranspose", "Cos", "Dropout", "Elu",
         "EyeLike", "GlobalAveragePool", "HardSigmoid", "HardSwish", "InstanceNormalization",
         "MaxPool", "Round", "Selu", "Sin", "Softplus", "Softsign", "Tan"),
    23: ("Cast", "Constant", "ConstantOfShape", "Flatten", "Identity", "Pad", "Reshape", "Shape",
         "Squeeze", "Transpose", "Unsqueeze"),
}

REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
              "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSumSquare")


def register(table: dict[Any, Any]) -> None:
    """Add the converters to onnx2torch's registry (``registry._CONVERTER_REGISTRY``)."""
    from onnx2torch.node_converters.registry import OperationDescription as Op

    for (op, new), (old, defaults) in ALIASES.items():
        base = table.get(Op("", op, old))
        if base is not None and Op("", op, new) not in table:
            table[Op("", op, new)] = _guarded(base, op, new, defaults)
    reshape = table[Op("", "Reshape", 14)]
    for version in (14, 19, 21):
        table[Op("", "Reshape", version)] = _reshape(reshape)
    table[Op("", "Gelu", 20)] = _gelu
    table[Op("", "RMSNormalization", 23)] = _rms_norm
    table[Op("", "Attention", 23)] = _attention
    for version in (1, 6, 13):
        table[Op("", "Reciprocal", version)] = _reciprocal
    for op in REDUCE_OPS:
        for version in (18, 20):
            table[Op("", op, version)] = _reduce
    table[Op("", "Split", 18)] = _split
    for version in (18, 19, 21):
        table[Op("", "Pad", version)] = _pad
    for version in (11, 12, 13):
        table[Op("", "Clip", version)] = _clip
    for op in ("Min", "Max"):
        for version in (8, 12, 13):
            table[Op("", op, version)] = _min_max
    for version, ops in sorted(TYPE_ONLY.items()):
        for op in ops:
            previous = _previous_version(op, version)
            if Op("", op, previous) in table and Op("", op, version) not in table:
                table[Op("", op, version)] = table[Op("", op, previous)]


def _previous_version(op: str, version: int) -> int:
    from onnx import defs

    return defs.get_schema(op, max_inclusive_version=version - 1, domain="").since_version


def _guarded(base: Any, op: str, version: int, defaults: dict[str, Any]) -> Any:
    def convert(node: Any, graph: Any) -> Any:
        attrs = node.attributes
        for name, default in defaults.items():
            if name.endswith("!"):  # this value is not allowed
                if attrs.get(name[:-1]) == default:
                    raise NotImplementedError(f"{op}-{version} with {name[:-1]}={default!r} is "
                                              "not implemented")
                continue
            value = attrs.get(name, default)
            if default == "ones":
                ok = value in (None, "ones") or all(v == 1 for v in value)
            else:
                ok = value == default
            if not ok:
                raise NotImplementedError(f"{op}-{version} with {name}={value!r} is not "
                                          "implemented")
        return base(node, graph)

    convert.__name__ = f"{op}_{version}"
    return convert


def _result(module: Any, node: Any, inputs: tuple[str, ...] | None = None) -> Any:
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    return OperationConverterResult(
        torch_module=module,
        onnx_mapping=OnnxMapping(inputs=tuple(node.input_values if inputs is None else inputs),
                                 outputs=node.output_values))


def _const(name: str | None, graph: Any) -> Any:
    """The constant tensor behind an input (initializer or Constant node), None if the input is
    omitted; KeyError if it is computed."""
    from onnx2torch.utils.common import get_const_value

    if not name:
        return None
    return get_const_value(name, graph)


def _input(node: Any, index: int) -> str | None:
    values = node.input_values
    return values[index] if len(values) > index and values[index] else None


# --- Reshape-14/19/21 with allowzero=1 --------------------------------------------------------

def _reshape(base: Any) -> Any:
    def convert(node: Any, graph: Any) -> Any:
        import torch

        if int(node.attributes.get("allowzero", 0)) == 0:
            return base(node, graph)

        class Reshape(torch.nn.Module):
            def forward(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
                return torch.reshape(x, [int(d) for d in shape.tolist()])

        return _result(Reshape(), node)

    return convert


# --- Reciprocal -------------------------------------------------------------------------------

def _reciprocal(node: Any, graph: Any) -> Any:
    import torch

    class Reciprocal(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.div(torch.ones((), dtype=x.dtype), x)

    return _result(Reciprocal(), node)


# --- Gelu-20 -----------------------------------------------------------------------------------

def _gelu(node: Any, graph: Any) -> Any:
    import torch

    approximate = node.attributes.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise NotImplementedError(f"Gelu with approximate={approximate!r}")

    class Gelu(torch.nn.Module):
        def __init__(self, approximate: str):
            super().__init__()
            self.approximate = approximate

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.gelu(x, approximate=self.approximate)

    return _result(Gelu(approximate), node)


# --- RMSNormalization-23 -----------------------------------------------------------------------

def _rms_norm(node: Any, graph: Any) -> Any:
    import torch

    axis = int(node.attributes.get("axis", -1))
    epsilon = float(node.attributes.get("epsilon", 1e-5))

    class RMSNorm(torch.nn.Module):
        def __init__(self, axis: int, epsilon: float):
            super().__init__()
            self.axis, self.epsilon = axis, epsilon

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            dims = list(range(self.axis % x.dim(), x.dim()))
            x32 = x.to(torch.float32)
            mean = torch.mean(x32 * x32, dim=dims, keepdim=True)
            y = (x32 / torch.sqrt(mean + self.epsilon)).to(x.dtype)
            return y * scale

    return _result(RMSNorm(axis, epsilon), node)


# --- Attention-23 ------------------------------------------------------------------------------

def _attention(node: Any, graph: Any) -> Any:
    import torch

    attrs = node.attributes
    if len(node.input_values) > 4 and any(node.input_values[4:]):
        raise NotImplementedError("Attention with past key/value inputs")
    if len([o for o in node.output_values if o]) > 1:
        raise NotImplementedError("Attention with present key/value or qk outputs")
    q_heads, kv_heads = attrs.get("q_num_heads"), attrs.get("kv_num_heads")

    class Attention(torch.nn.Module):
        """ONNX Attention-23: softmax(Q K^T * scale + mask) V."""

        def __init__(self, scale: float | None, causal: bool, softcap: float):
            super().__init__()
            self.scale, self.causal, self.softcap = scale, causal, softcap

        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
            three_d = q.dim() == 3
            if three_d:  # (batch, seq, heads * size) -> (batch, heads, seq, size)
                b = q.shape[0]
                q = q.reshape(b, q.shape[1], q_heads, -1).transpose(1, 2)
                k = k.reshape(b, k.shape[1], kv_heads, -1).transpose(1, 2)
                v = v.reshape(b, v.shape[1], kv_heads, -1).transpose(1, 2)
            if k.shape[1] != q.shape[1]:  # grouped key/value heads
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
            scale = self.scale if self.scale is not None else 1.0 / (q.shape[-1] ** 0.5)
            scores = torch.matmul(q, k.transpose(-1, -2)) * scale
            if self.softcap > 0:
                scores = self.softcap * torch.tanh(scores / self.softcap)
            low = torch.finfo(scores.dtype).min
            if mask is not None:
                if mask.dtype == torch.bool:
                    scores = scores.masked_fill(~mask, low)
                else:
                    scores = scores + mask
            if self.causal:
                n_q, n_kv = scores.shape[-2], scores.shape[-1]
                keep = torch.ones(n_q, n_kv, dtype=torch.bool).tril()
                scores = scores.masked_fill(~keep, low)
            out = torch.matmul(torch.softmax(scores, dim=-1), v)
            if three_d:
                out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
            return out

    scale = attrs.get("scale")
    module = Attention(None if scale is None else float(scale), bool(attrs.get("is_causal", 0)),
                       float(attrs.get("softcap", 0.0)))
    inputs = tuple(node.input_values[:4])
    while inputs and not inputs[-1]:
        inputs = inputs[:-1]
    return _result(module, node, inputs)


# --- Reduce*-18/20: axes as an input ----------------------------------------------------------

def _reduce(node: Any, graph: Any) -> Any:
    import torch

    keepdims = bool(node.attributes.get("keepdims", 1))
    noop = int(node.attributes.get("noop_with_empty_axes", 0))
    try:
        axes = _const(_input(node, 1), graph)
    except KeyError:
        raise NotImplementedError(f"{node.operation_type} with computed axes") from None
    axes = None if axes is None else [int(a) for a in torch.as_tensor(axes).reshape(-1).tolist()]
    if not axes and noop:
        return _result(torch.nn.Identity(), node, (node.input_values[0],))
    return _result(_reduce_module()(node.operation_type, axes or None, keepdims), node,
                   (node.input_values[0],))


@functools.cache
def _reduce_module() -> Any:
    import torch

    class Reduce(torch.nn.Module):
        """ONNX Reduce* with static axes (negative ones counted from the end; none: all).
        onnx2torch's own module reduces Max/Min/Prod one axis at a time and shifts the axes
        after the first, which goes wrong for negative axes with keepdims=0."""

        def __init__(self, op: str, axes: list[int] | None, keepdims: bool):
            super().__init__()
            self.op, self.axes, self.keepdims = op, axes, keepdims

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rank = x.dim()
            dims = list(range(rank)) if self.axes is None else sorted(a % rank
                                                                      for a in self.axes)
            keep, op = self.keepdims, self.op
            if op == "ReduceMean":
                return torch.mean(x, dim=dims, keepdim=keep)
            if op == "ReduceMax":
                return torch.amax(x, dim=dims, keepdim=keep)
            if op == "ReduceMin":
                return torch.amin(x, dim=dims, keepdim=keep)
            if op == "ReduceProd":
                for d in reversed(dims):
                    x = torch.prod(x, dim=d, keepdim=keep)
                return x
            if op == "ReduceL1":
                return torch.sum(torch.abs(x), dim=dims, keepdim=keep)
            if op == "ReduceSumSquare":
                return torch.sum(x * x, dim=dims, keepdim=keep)
            if op == "ReduceL2":
                return torch.sqrt(torch.sum(x * x, dim=dims, keepdim=keep))
            if op == "ReduceLogSum":
                return torch.log(torch.sum(x, dim=dims, keepdim=keep))
            if op == "ReduceLogSumExp":
                return torch.logsumexp(x, dim=dims, keepdim=keep)
            raise NotImplementedError(op)

    return Reduce


# --- Split-18 ----------------------------------------------------------------------------------

def _split(node: Any, graph: Any) -> Any:
    import torch

    axis = int(node.attributes.get("axis", 0))
    outputs = len(node.output_values)
    try:
        split = _const(_input(node, 1), graph)
    except KeyError:
        raise NotImplementedError("Split with computed split sizes") from None
    sizes = None if split is None else [int(s) for s in torch.as_tensor(split).tolist()]
    parts = int(node.attributes.get("num_outputs", outputs))

    class Split(torch.nn.Module):
        def __init__(self, axis: int, sizes: list[int] | None, parts: int, outputs: int):
            super().__init__()
            self.axis, self.sizes, self.parts, self.outputs = axis, sizes, parts, outputs

        def forward(self, x: torch.Tensor) -> Any:
            if self.sizes is not None:
                chunks = torch.split(x, self.sizes, dim=self.axis)
            else:  # ONNX: chunks of ceil(n / parts), the last one smaller
                size = -(-x.shape[self.axis] // self.parts)
                chunks = torch.split(x, size, dim=self.axis)
            return chunks[0] if self.outputs == 1 else tuple(chunks)

    return _result(Split(axis, sizes, parts, outputs), node, (node.input_values[0],))


# --- Pad-18/19/21 ------------------------------------------------------------------------------

_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate",
              "wrap": "circular"}


def _pad(node: Any, graph: Any) -> Any:
    import torch

    mode = node.attributes.get("mode", "constant")
    if mode not in _PAD_MODES:
        raise NotImplementedError(f"Pad mode {mode!r}")
    try:
        pads = _const(_input(node, 1), graph)
        value = _const(_input(node, 2), graph)
        axes = _const(_input(node, 3), graph)
    except KeyError:
        raise NotImplementedError("Pad with computed pads, constant value or axes") from None
    pads = [int(p) for p in torch.as_tensor(pads).tolist()]
    axes = None if axes is None else [int(a) for a in torch.as_tensor(axes).tolist()]
    value = 0 if value is None else torch.as_tensor(value).reshape(-1)[0].item()

    class Pad(torch.nn.Module):
        def __init__(self, pads: list[int], axes: list[int] | None, mode: str, value: Any):
            super().__init__()
            self.pads, self.axes, self.mode, self.value = pads, axes, mode, value

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rank = x.dim()
            axes = list(range(rank)) if self.axes is None else [a % rank for a in self.axes]
            n = len(axes)
            begin, end = [0] * rank, [0] * rank
            for i, a in enumerate(axes):
                begin[a], end[a] = self.pads[i], self.pads[n + i]
            torch_pads: list[int] = []
            for a in range(rank - 1, -1, -1):  # torch lists the last axis first
                torch_pads += [begin[a], end[a]]
            if self.mode == "constant":
                return torch.nn.functional.pad(x, torch_pads, mode="constant", value=self.value)
            # torch pads only trailing axes in these modes: drop the untouched leading ones
            while torch_pads[-2:] == [0, 0]:
                torch_pads = torch_pads[:-2]
            return torch.nn.functional.pad(x, torch_pads, mode=self.mode) if torch_pads else x

    return _result(Pad(pads, axes, _PAD_MODES[mode], value), node, (node.input_values[0],))


# --- Clip, Min, Max with constant operands -----------------------------------------------------

def _scalar(tensor: Any) -> Any:
    """A single-element constant as a Python number of its own kind."""
    value = tensor.reshape(-1)[0].item()
    return float(value) if tensor.dtype.is_floating_point else int(value)


def _clip(node: Any, graph: Any) -> Any:
    import torch

    names = [_input(node, 1), _input(node, 2)]
    bounds: list[Any] = []
    computed: list[str] = []
    for name in names:
        try:
            value = _const(name, graph)
        except KeyError:
            value = "computed"
            computed.append(name)
        if isinstance(value, torch.Tensor):
            value = _scalar(value)
        bounds.append(value)

    class Clip(torch.nn.Module):
        """ONNX Clip: ``min(max(x, lo), hi)``; constant bounds are Python scalars."""

        def __init__(self, lo: Any, hi: Any):
            super().__init__()
            self.lo, self.hi = lo, hi

        def forward(self, x: torch.Tensor, *computed: torch.Tensor) -> torch.Tensor:
            it = iter(computed)
            lo = next(it) if self.lo == "computed" else self.lo
            hi = next(it) if self.hi == "computed" else self.hi
            if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor) \
                    or not x.dtype.is_floating_point:
                if lo is not None:
                    x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype))
                if hi is not None:
                    x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype))
                return x
            if lo is None and hi is None:
                return x
            return torch.clamp(x, lo, hi)

    return _result(Clip(*bounds), node, (node.input_values[0], *computed))


def _min_max(node: Any, graph: Any) -> Any:
    import torch

    op = node.operation_type
    names = list(node.input_values)
    folded: Any = None
    if len(names) == 2:
        for i in (0, 1):
            try:
                value = _const(names[i], graph)
            except KeyError:
                continue
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                folded = (value.reshape(()), value.dim())
                names = [names[1 - i]]
                break

    class MinMax(torch.nn.Module):
        def __init__(self, op: str, folded: Any):
            super().__init__()
            self.op = op
            self.rank = 0
            if folded is not None:
                self.register_buffer("bound", folded[0].clone())
                self.scalar = _scalar(folded[0])
                self.rank = folded[1]
            else:
                self.bound = None

        def forward(self, *xs: torch.Tensor) -> torch.Tensor:
            pick = torch.maximum if self.op == "Max" else torch.minimum
            out = xs[0]
            for x in xs[1:]:
                out = pick(out, x)
            if self.bound is not None:
                if out.dtype.is_floating_point:
                    out = (torch.clamp(out, min=self.scalar) if self.op == "Max"
                           else torch.clamp(out, max=self.scalar))
                else:
                    out = pick(out, self.bound.to(out.dtype))
                while out.dim() < self.rank:  # the constant's rank broadcasts too
                    out = out.unsqueeze(0)
            return out

    return _result(MinMax(op, folded), node, tuple(names))


def missing_converters(model: Any) -> list[str]:
    """Every (op, version) of the main graph that onnx2torch has no converter for, after the
    mends: one error naming them all, not only the first."""
    from onnx2torch.node_converters.registry import get_converter

    opsets = {o.domain or "": o.version for o in model.opset_import}
    missing: dict[str, None] = {}
    for node in model.graph.node:
        domain = node.domain or ""
        try:
            get_converter(operation_type=node.op_type, version=opsets.get(domain, 1),
                          domain=domain)
        except NotImplementedError:
            missing[f"{domain + '.' if domain else ''}{node.op_type}"
                    f"(opset {opsets.get(domain, 1)})"] = None
    return list(missing)
