"""PyTorch specifics: name example inputs, flatten outputs, export to ONNX, run eagerly.

Imported only for torch sources (torch is an optional dependency).
"""
from __future__ import annotations

import contextlib
import inspect
import io
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert.errors import ModelLoadError, UsageError, first_line


def normalize_inputs(module: Any, example_inputs: Any) -> dict[str, Any]:
    """Example inputs as an ordered dict name -> tensor, named after forward()'s parameters."""
    import torch

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        feeds = dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        names = _param_names(module, len(example_inputs))
        feeds = dict(zip(names, example_inputs, strict=True))
    else:
        raise UsageError("example_inputs must be a tensor, a tuple of tensors or a dict")
    for name, value in feeds.items():
        if not isinstance(value, torch.Tensor):
            raise UsageError(f"example input {name!r} is a {type(value).__name__}, not a tensor")
    return feeds


def _param_names(module: Any, count: int) -> list[str]:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    named = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(named) >= count:
        return named[:count]
    return [f"input_{i}" for i in range(count)]


def flatten_outputs(result: Any) -> dict[str, Any]:
    """A tensor -> {"output"}; a sequence -> output_0..; a dict/ModelOutput -> its tensor items."""
    import torch

    if isinstance(result, torch.Tensor):
        return {"output": result}
    if isinstance(result, dict) or hasattr(result, "to_tuple"):
        items = {k: v for k, v in dict(result).items() if isinstance(v, torch.Tensor)}
    elif isinstance(result, (tuple, list)):
        items = {f"output_{i}": v for i, v in enumerate(result) if isinstance(v, torch.Tensor)}
    else:
        raise ModelLoadError(f"the module returns a {type(result).__name__}; "
                             "expected a tensor, a tuple/list or a dict of tensors")
    if not items:
        raise ModelLoadError("the module returns no tensors")
    return items


def eval_mode(module: Any) -> bool:
    """Put a module in inference mode. False for programs loaded from .pt2, which are already
    in inference form and refuse eval()/train()."""
    try:
        module.eval()
    except (NotImplementedError, AttributeError):
        return False
    return True


def run(module: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    tensors = [torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()]
    with torch.inference_mode():
        out = flatten_outputs(module(*tensors))
    return {k: v.detach().cpu().numpy() for k, v in out.items()}


def export_onnx(module: Any, feeds: dict[str, Any], path: Path, opset: int,
                dynamic_axes: dict[str, dict[int, str]] | None = None) -> list[str]:
    """Export with the legacy TorchScript exporter (stable, no onnxscript needed), at the
    example inputs' shapes; ``dynamic_axes`` ({input: {axis: name}}, a .pt2's Dims) stay
    dynamic. Returns the output names."""
    import torch

    mode = torch.onnx.TrainingMode.EVAL if eval_mode(module) else torch.onnx.TrainingMode.PRESERVE
    args = tuple(feeds.values())
    with torch.inference_mode():
        names = list(flatten_outputs(module(*args)))
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            torch.onnx.export(module, args, str(path), input_names=list(feeds),
                              output_names=names, opset_version=opset, dynamo=False,
                              do_constant_folding=True, training=mode,
                              dynamic_axes=dynamic_axes)
    except Exception as exc:
        raise ModelLoadError(f"could not export the PyTorch model to ONNX: "
                             f"{first_line(exc)}") from None
    return names
