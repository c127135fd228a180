"""The reference the targets are compared with: ONNX Runtime CPU on the source ONNX, or
PyTorch eager for torch sources. Same inputs, same thread count as the targets."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mtconvert import deps
from mtconvert.backends.base import PreparedSource
from mtconvert.errors import ModelLoadError


@dataclass
class Reference:
    runtime: str
    version: str | None
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def open_reference(source: PreparedSource, threads: int) -> Reference:
    if source.format == "torch":
        return _torch_reference(source, threads)
    return _ort_reference(source, threads)


def ort_session(path: str, threads: int):  # noqa: ANN201 - onnxruntime type
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])


def _ort_reference(source: PreparedSource, threads: int) -> Reference:
    try:
        sess = ort_session(str(source.onnx_path), threads)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelLoadError(f"ONNX Runtime cannot load the source model: {first}") from None
    names = [o.name for o in sess.get_outputs()]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, sess.run(names, feeds), strict=True))

    return Reference("onnxruntime-cpu", deps.dist_version("onnxruntime"), run)


def _torch_reference(source: PreparedSource, threads: int) -> Reference:
    import torch

    from mtconvert import torch_source

    torch.set_num_threads(threads)
    module = source.torch_module
    torch_source.eval_mode(module)
    return Reference("pytorch-eager", deps.dist_version("torch"),
                     lambda feeds: torch_source.run(module, feeds))
