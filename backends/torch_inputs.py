"""What the targets that convert through PyTorch (coreml, executorch) share: the source as a
saved torch.export program, or as a fixed-shape ONNX for the onnx2torch bridge."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mtconvert import deps
from mtconvert.backends.base import PreparedSource, format_shapes
from mtconvert.errors import ConversionError


def has_onnx2torch() -> bool:
    return not deps.missing_modules({"onnx2torch": "onnx2torch"})


def export_module(source: PreparedSource, shapes: dict[str, list[int]], path: Path,
                  target: str, dynamic_shapes: Any = None, what: str = "torch.export") -> Path:
    """torch.export of the in-memory module (it lives in this process), saved for the child;
    ``dynamic_shapes`` as torch.export takes them (None: static), ``what`` names the export in
    its error. A copy is exported: non-strict export swaps the module's parameters for fake tensors while
    it traces, and other threads of the run (the reference timed in this process, another
    target exporting with ``--jobs`` > 1) use the same module meanwhile ("storage on device
    meta", ".numpy() is not supported for tensor subclasses")."""
    import torch

    args = tuple((torch.ones if "mask" in s.name.lower() else torch.zeros)(
        shapes[s.name], dtype=getattr(torch, s.dtype)) for s in source.inputs)
    try:
        with torch.no_grad():
            program = torch.export.export(private_copy(source.torch_module), args,
                                          strict=False, dynamic_shapes=dynamic_shapes)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"{what} failed: {first}", target=target,
                              step="torch.export") from None
    torch.export.save(program, str(path))
    return path


def private_copy(module):  # noqa: ANN001, ANN202 - a torch.nn.Module
    """A deep copy of ``module`` for this export alone; the module itself when it cannot be
    copied (then concurrent use of it stays unsafe, as it always was)."""
    import copy

    try:
        return copy.deepcopy(module)
    except Exception:  # noqa: BLE001 - a module holding something deepcopy refuses
        return module


def fixed_onnx(source: PreparedSource, shapes: dict[str, list[int]], work: Path, log: Path,
               timeout: float | None, steps: list[str], target: str) -> Path:
    """The source ONNX with its shapes fixed (onnxsim in a child), for the onnx2torch bridge."""
    from mtconvert.backends.onnx_tools import run_onnx_tool

    if not has_onnx2torch():
        raise ConversionError("ONNX sources need onnx2torch: pip install --no-deps "
                              "onnx2torch (it needs torchvision only for NMS/RoiAlign)",
                              target=target, step="onnx2torch")
    fixed = work / f"{source.name}.fixed.onnx"
    info = run_onnx_tool("fix-shapes", source.onnx_path, fixed, shapes, step="fix-shapes",
                         log=log, timeout=timeout, target=target)
    steps.append(f"fix shapes: {format_shapes(shapes)}; onnxsim {info['nodes_before']} -> "
                 f"{info['nodes_after']} nodes [{info['seconds']:.1f} s]")
    return fixed
