"""The reference the targets are compared with: ONNX Runtime CPU on the source ONNX (run in the
same isolated child process as the targets), or PyTorch eager for torch sources (in-process: the
module lives here). Same inputs, same thread count, same latency protocol as the targets."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mtconvert import deps
from mtconvert.backends.base import Artifact, Backend, PreparedSource, Session, TargetOptions
from mtconvert.errors import ModelLoadError, StepError
from mtconvert.validators.latency import measure

if TYPE_CHECKING:
    from mtconvert.options import ConvertOptions


@dataclass
class ReferenceRun:
    runtime: str
    version: str | None
    outputs: dict[str, np.ndarray]
    latency: dict[str, Any]


class OrtReference(Backend):
    """Not a target: lets the worker open the source ONNX with ONNX Runtime CPU."""

    name = "reference"

    def convert(self, source: PreparedSource, out_dir: Path, opts: TargetOptions) -> Artifact:
        raise NotImplementedError("the reference is never converted")

    def open(self, artifact: Artifact, threads: int) -> Session:
        from mtconvert.backends.onnx_mobile import OrtSession

        session = OrtSession(artifact.primary, threads)
        session.runtime = "onnxruntime-cpu"
        return session


def open_reference(source: PreparedSource, feeds: dict[str, np.ndarray],
                   opts: ConvertOptions) -> ReferenceRun:
    return checked(_torch(source, feeds, opts) if source.format == "torch"
                   else _ort(source, feeds, opts))


def checked(run: ReferenceRun) -> ReferenceRun:
    """The run, if its outputs are finite: a source that computes NaN/Inf cannot be a
    reference (ModelLoadError)."""
    for name, value in run.outputs.items():
        if not np.all(np.isfinite(np.asarray(value, dtype=np.float64))):
            raise ModelLoadError(f"the source model's output {name!r} has NaN/Inf on the "
                                 "validation inputs; nothing can be compared against it "
                                 "(check the model, or give --inputs)")
    return run


def _ort(source: PreparedSource, feeds: dict[str, np.ndarray],
         opts: ConvertOptions) -> ReferenceRun:
    from mtconvert.worker import run_session

    artifact = Artifact(target="reference", primary=source.onnx_path, files=(source.onnx_path,))
    try:
        result = run_session(name="reference", backend=f"{__name__}:OrtReference",
                             artifact=artifact.to_dict(),
                             feeds={s.name: feeds[s.name] for s in source.inputs},
                             threads=opts.threads, warmup=opts.warmup,
                             iterations=opts.iterations, timeout_s=opts.timeout_s)
    except StepError as exc:
        raise ModelLoadError(f"ONNX Runtime cannot run the source model: {exc.reason}") from None
    return ReferenceRun("onnxruntime-cpu", deps.dist_version("onnxruntime"), result.outputs,
                        result.latency)


def _torch(source: PreparedSource, feeds: dict[str, np.ndarray],
           opts: ConvertOptions) -> ReferenceRun:
    import torch

    from mtconvert import torch_source

    torch.set_num_threads(opts.threads)
    module = source.torch_module
    torch_source.eval_mode(module)
    outputs = torch_source.run(module, feeds)
    stats = measure(lambda: torch_source.run(module, feeds), warmup=opts.warmup,
                    iterations=opts.iterations)
    return ReferenceRun("pytorch-eager", deps.dist_version("torch"), outputs, stats.to_dict())
