"""ONNX -> PyTorch with onnx2torch, for coremltools, which has no ONNX front end.

onnx2torch 1.5.15 needs four mends for the Transformer graphs torch.onnx.export writes; each is
registered through onnx2torch's own converter registry (no patching of its code):

- ``GreaterOrEqual``/``LessOrEqual`` of opset 16 have no converter (only opset 12's, whose
  semantics are the same; 16 added bfloat16);
- ``Flatten`` with ``axis`` equal to the rank (BERT's mask path after onnxsim) fails in its
  converter, which flattens twice; ONNX defines it as a reshape to
  ``(prod(shape[:axis]), prod(shape[axis:]))``;
- ``CumSum`` without a ``reverse`` attribute is converted as a reverse cumsum (its converter
  defaults ``reverse`` to 1; ONNX's default is 0): RoBERTa's position ids came out reversed;
- torchvision is imported for the NMS and RoiAlign converters only (see ``shim_torchvision``).

The op versions of opsets 17 to 23 (the TorchScript exporter writes 17, the default
torch.export-based one 18 to 23, 20 unless told), the Clip/Min/Max constant folding and an exact
Reciprocal are in ``onnx_mends``. A node that still
has no converter stops the bridge with one error naming every such op, not only the first.
"""
from __future__ import annotations

import sys
import types
from typing import Any

def shim_torchvision() -> bool:
    """onnx2torch imports torchvision for its NMS and RoiAlign converters only. No CPU build of
    torchvision exists for torch 2.13 here (the registry's wheels need CUDA torch, and a broken
    torchvision breaks transformers' imports), so when it is absent those two converters get a
    stand-in that fails with a clear message if a graph uses them. True if the shim was put in."""
    try:
        import torchvision  # noqa: F401
        return False
    except ImportError:
        pass

    def unavailable(*_: Any, **__: Any) -> Any:
        raise RuntimeError("this ONNX op (NMS/RoiAlign) needs torchvision, which is not installed")

    tv = types.ModuleType("torchvision")
    tv_ops = types.ModuleType("torchvision.ops")
    tv_ops.nms = tv_ops.roi_align = tv_ops.box_convert = unavailable  # type: ignore[attr-defined]
    tv.ops = tv_ops  # type: ignore[attr-defined]
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, tv_ops
    return True


def import_onnx2torch() -> Any:
    """onnx2torch, imported with the torchvision stand-in only while it imports: left in
    ``sys.modules`` the stand-in would tell transformers and torch.onnx's exporter that
    torchvision is installed (the exporter then logs a failure for each torchvision op)."""
    if "onnx2torch" in sys.modules:
        return sys.modules["onnx2torch"]
    shimmed = shim_torchvision()
    try:
        import onnx2torch
    finally:
        if shimmed:
            for name in ("torchvision.ops", "torchvision"):
                sys.modules.pop(name, None)
    return onnx2torch


def to_torch(onnx_model: Any) -> Any:
    """The ONNX model as a torch.fx GraphModule in eval mode."""
    onnx2torch = import_onnx2torch()

    _register_mends()
    from mtconvert.backends.coreml.onnx_mends import missing_converters

    missing = missing_converters(onnx_model)
    if missing:
        raise NotImplementedError("onnx2torch has no converter for " + ", ".join(missing))
    return onnx2torch.convert(onnx_model).eval()


def _flatten_module(axis: int) -> Any:
    import torch

    class Flatten(torch.nn.Module):
        def __init__(self, axis: int):
            super().__init__()
            self.axis = axis

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            axis = self.axis if self.axis >= 0 else self.axis + x.dim()
            outer = 1
            for d in x.shape[:axis]:
                outer *= d
            inner = 1
            for d in x.shape[axis:]:
                inner *= d
            return x.reshape(outer, inner)

    return Flatten(axis)


_registered = False


def _register_mends() -> None:
    global _registered
    if _registered:
        return
    from onnx2torch.node_converters import registry
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    table = registry._CONVERTER_REGISTRY
    for op in ("GreaterOrEqual", "LessOrEqual"):
        old = registry.OperationDescription("", op, 12)
        new = registry.OperationDescription("", op, 16)
        if old in table and new not in table:
            table[new] = table[old]

    def flatten(node: Any, graph: Any) -> Any:
        return OperationConverterResult(
            torch_module=_flatten_module(node.attributes.get("axis", 1)),
            onnx_mapping=onnx_mapping_from_node(node=node))

    for version in (1, 9, 11, 13, 21, 23):
        table[registry.OperationDescription("", "Flatten", version)] = flatten

    def cumsum(node: Any, graph: Any) -> Any:
        from onnx2torch.node_converters.cumsum import OnnxCumSum

        return OperationConverterResult(
            torch_module=OnnxCumSum(bool(node.attributes.get("exclusive", 0)),
                                    bool(node.attributes.get("reverse", 0))),
            onnx_mapping=onnx_mapping_from_node(node=node))

    for version in (11, 14):
        table[registry.OperationDescription("", "CumSum", version)] = cumsum
    from mtconvert.backends.coreml.onnx_mends import register

    register(table)
    _registered = True


def export(module: Any, args: tuple[Any, ...]) -> Any:
    """torch.export of an onnx2torch module at fixed shapes.

    onnx2torch's modules read shape tensors with ``.item()`` and branch on them (Reshape,
    Slice...), which torch.export refuses as data-dependent. So the module is first traced
    in real mode with ``make_fx`` (each ``.item()`` is evaluated on the trace's example values),
    those scalars are folded into the graph as constants, and the resulting ATen graph is
    exported. At fixed shapes these values come from constant initializers; one that came
    from input data would be baked in, which the validation (with other data) would catch.
    """
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch.no_grad():
        graph_module = make_fx(module, tracing_mode="real",
                               _error_on_data_dependent_ops=False)(*args)
        _fold_scalars(graph_module, args)
        return torch.export.export(graph_module, args, strict=False)


def _fold_scalars(graph_module: Any, args: tuple[Any, ...]) -> int:
    """Replace every ``aten._local_scalar_dense`` (``.item()``) by the value it had."""
    import torch
    from torch.fx.node import map_arg

    item = torch.ops.aten._local_scalar_dense.default
    values: dict[Any, Any] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node: Any) -> Any:
            value = super().run_node(node)
            if node.op == "call_function" and node.target is item:
                values[node] = value
            return value

    Recorder(graph_module).run(*args)
    for node, value in values.items():
        for user in list(node.users):
            user.args = map_arg(user.args, lambda n, node=node, value=value:
                                value if n is node else n)
            user.kwargs = map_arg(user.kwargs, lambda n, node=node, value=value:
                                  value if n is node else n)
        graph_module.graph.erase_node(node)
    graph_module.graph.eliminate_dead_code()
    graph_module.recompile()
    return len(values)
