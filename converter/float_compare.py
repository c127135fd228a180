"""``--float-model PATH``: the float original of a compressed source, the second yardstick.

A compressed source's targets are judged against the compressed source (the run's reference:
was the conversion exact?). Given the float original, each target is also compared with it by
the int8 profile (what did compression cost?), next to the compressed source's own distance
from it. ``load`` checks the float model once, at load time (a missing file, or inputs unlike
the compressed source's, is a usage error: exit 2); ``judge`` compares one target's outputs,
the float model run once per set of feeds. The result is ``targets[].compressed.vs_float``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert.errors import MtConvertError, UsageError

PROFILE = "int8"  # what compression may cost: the int8 profile's bounds


@dataclass
class FloatModel:
    path: Path
    loaded: Any  # source.LoadedSource of the float model
    _outputs: dict[tuple, dict[str, np.ndarray]] = field(default_factory=dict)


def load(opts: Any, compressed: Any, work_dir: Path) -> FloatModel | None:
    """The float model named by ``opts.float_model`` (None without), its inputs checked
    against the compressed source's; any problem is one line, exit 2."""
    path = getattr(opts, "float_model", None)
    if path is None:
        return None
    from mtconvert import source

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--float-model: file not found: {path}")
    folder = Path(work_dir) / "float-model"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        loaded = source.load(path, folder,
                             trust_pickle=opts.trust_pickle, max_bytes=opts.max_model_bytes)
    except MtConvertError as exc:
        raise UsageError(f"--float-model: {exc}") from None
    mine = {s.name: s.dtype for s in compressed.prepared.inputs}
    theirs = {s.name: s.dtype for s in loaded.prepared.inputs}
    if mine != theirs:
        raise UsageError(f"--float-model {path.name}: its inputs {_fmt(theirs)} are not the "
                         f"compressed model's {_fmt(mine)}")
    outs = {s.name for s in compressed.prepared.outputs} - {s.name for s in
                                                           loaded.prepared.outputs}
    if outs:
        raise UsageError(f"--float-model {path.name}: it has no output named "
                         f"{', '.join(sorted(outs))} (the compressed model's)")
    return FloatModel(path, loaded)


def _fmt(specs: dict[str, str]) -> str:
    return ", ".join(f"{k}:{v}" for k, v in specs.items()) or "(none)"


def outputs(fm: FloatModel, feeds: dict[str, np.ndarray], opts: Any) -> dict[str, np.ndarray]:
    """The float model's outputs on ``feeds`` (run once per set of input shapes)."""
    from mtconvert.reference import open_reference

    key = tuple(sorted((k, v.shape) for k, v in feeds.items()))
    if key not in fm._outputs:
        src = fm.loaded.prepared
        src = replace(src, input_shapes={s.name: tuple(feeds[s.name].shape)
                                         for s in src.inputs})
        run = open_reference(src, feeds, replace(opts, warmup=0, iterations=1))
        fm._outputs[key] = run.outputs
    return fm._outputs[key]


def judge(ctx: Any, target_out: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """The target's and the compressed source's distance from the float model (int8
    profile), or None without --float-model."""
    fm = getattr(ctx, "float_model", None)
    if fm is None:
        return None
    from mtconvert.validators import gates

    try:
        ref = outputs(fm, ctx.target_feeds, ctx.opts)
    except MtConvertError as exc:
        return {"error": f"the float model could not be run: {exc}"}
    ref = {k: v for k, v in ref.items() if k in ctx.ref_out}
    tol = lambda name: ctx.opts.tolerances.resolve(PROFILE, name)  # noqa: E731
    target, source = gates.judge(ref, target_out, tol), gates.judge(ref, ctx.ref_out, tol)
    return {"float_model": str(fm.path), "profile": PROFILE, "passed": target.passed,
            "worst": target.worst, "outputs": target.outputs,
            "source": {"passed": source.passed, "worst": source.worst}, "accuracy": None}


def with_accuracy(ctx: Any, vs_float: dict[str, Any] | None,
                  acc: dict[str, Any] | None) -> dict[str, Any] | None:
    """``vs_float`` with the task-accuracy drop against the float model (--eval-data with
    labels): the float model's metric on the dataset against the target's. Without labels
    (embedding agreement is measured against the compressed source's outputs) it says so."""
    if not vs_float or "error" in vs_float or not acc or "target" not in acc:
        return vs_float
    evals, fm = ctx.evals, ctx.float_model
    if evals.labels is None:
        return vs_float | {"accuracy": {"unavailable": "the dataset has no labels: neighbour "
                                                       "agreement is not compared with the "
                                                       "float model"}}
    from mtconvert.run import accuracy
    from mtconvert.validators import accuracy as metrics

    try:
        out = accuracy._reference(fm.loaded.prepared, evals.feeds, ctx.opts,
                                  evals.chunk)[evals.output]
    except (MtConvertError, KeyError) as exc:
        return vs_float | {"accuracy": {"error": f"the float model on the dataset: {exc}"}}
    floated = metrics.classification(out, evals.labels)
    return vs_float | {"accuracy": {"metric": acc["metric"], "float": round(floated, 6),
                                    "target": acc["target"],
                                    "drop_points": round((floated - acc["target"]) * 100, 4),
                                    "items": acc["items"]}}
