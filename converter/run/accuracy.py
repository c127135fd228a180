"""Task accuracy (``--eval-data FILE.npz``): the reference and each target run over a dataset
(the inputs by name, items stacked on axis 0, in chunks of the validated batch), and their task
metric compared: accuracy against ``labels`` (class ids per item, or per token with -100 for
positions that do not count), or, for embedding models without labels, the agreement of each
item's nearest neighbours (validators.accuracy). A target whose metric falls below the
reference's by more than ``--max-accuracy-drop`` points fails.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert.backends.base import Artifact, Backend, PreparedSource, import_path
from mtconvert.errors import UsageError
from mtconvert.options import ConvertOptions
from mtconvert.validators import accuracy
from mtconvert.worker import run_session

# default --max-accuracy-drop in points, by tolerance profile: exact conversions keep every
# prediction; reduced precisions may flip a borderline one
DEFAULT_MAX_DROP = {"fp32": 0.0, "fp16": 0.5, "int8": 0.5}


@dataclass(frozen=True)
class EvalSet:
    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None
    output: str  # the output the metric reads
    chunk: int  # items per run: the validated batch
    reference: np.ndarray  # the reference's values of ``output`` on every item

    @property
    def items(self) -> int:
        return len(next(iter(self.feeds.values())))


def load(path: Path, src: PreparedSource, point_feeds: dict[str, np.ndarray],
         opts: ConvertOptions) -> EvalSet:
    """Read and check the dataset against the validated shapes, and run the reference on it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise UsageError(f"--eval-data {path}: not a readable .npz of arrays ({exc})") from None
    missing = [s.name for s in src.inputs if s.name not in arrays]
    if missing:
        raise UsageError(f"--eval-data {Path(path).name} lacks input(s) {', '.join(missing)}")
    feeds = {s.name: arrays[s.name] for s in src.inputs}
    for name, value in feeds.items():
        want = tuple(point_feeds[name].shape[1:])
        if tuple(value.shape[1:]) != want or value.shape[0] != len(feeds[src.inputs[0].name]):
            raise UsageError(f"--eval-data {name}: items of shape {tuple(value.shape[1:])} "
                             f"(x{value.shape[0]}); the run validates {want}: give "
                             f"--input-shape {name}=1x{'x'.join(map(str, want)) or '1'} data, "
                             "or the matching --input-shape")
        feeds[name] = value.astype(point_feeds[name].dtype, copy=False)
    output = next((s.name for s in src.outputs if "logit" in s.name.lower()),
                  src.outputs[0].name)
    chunk = next(iter(point_feeds.values())).shape[0]
    ref = _reference(src, feeds, opts, chunk)[output]
    return EvalSet(feeds, arrays.get("labels"), output, chunk, ref)


def _reference(src: PreparedSource, feeds: dict[str, np.ndarray], opts: ConvertOptions,
               chunk: int) -> dict[str, np.ndarray]:
    if src.format == "torch" and src.torch_module is not None:
        from mtconvert import torch_source

        n = len(next(iter(feeds.values())))
        parts = [torch_source.run(src.torch_module, {k: v[i:i + chunk] for k, v in feeds.items()})
                 for i in range(0, n, chunk)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    artifact = Artifact(target="reference", primary=src.onnx_path, files=(src.onnx_path,))
    return run_session(name="reference", backend="mtconvert.reference:OrtReference",
                       artifact=artifact.to_dict(), feeds=feeds, threads=opts.threads,
                       warmup=0, iterations=1, timeout_s=opts.timeout_s, chunk=chunk).outputs


def measure(evals: EvalSet, backend: Backend, artifact: Artifact,
            opts: ConvertOptions) -> dict[str, Any]:
    """The target's metric against the reference's on the dataset, judged."""
    out = run_session(name=backend.name, backend=import_path(type(backend)),
                      artifact=artifact.to_dict(), feeds=evals.feeds, threads=opts.threads,
                      warmup=0, iterations=1, timeout_s=opts.timeout_s,
                      chunk=evals.chunk).outputs[evals.output]
    limit = (opts.max_accuracy_drop if opts.max_accuracy_drop is not None
             else DEFAULT_MAX_DROP.get(artifact.profile, 0.5))
    if evals.labels is not None:
        ref = accuracy.classification(evals.reference, evals.labels)
        tgt = accuracy.classification(out, evals.labels)
        return accuracy.judge("accuracy", ref, tgt, limit, evals.items) | {"output": evals.output}
    overlap, k = accuracy.retrieval_overlap(evals.reference, out)
    return accuracy.judge(f"top-{k} neighbour agreement", 1.0, overlap, limit,
                          evals.items) | {"output": evals.output}
