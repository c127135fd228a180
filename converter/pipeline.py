"""The conversion pipeline: source -> reference -> every target (convert, lint, run, compare).

Data flows one way. Targets convert concurrently (up to --jobs); each target's failure is
recorded in its report and never stops the others.
"""
from __future__ import annotations

import datetime as _dt
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert import __version__, inputs as feeds_mod, source as source_mod
from mtconvert.cache import ConversionCache, default_root
from mtconvert.errors import UsageError
from mtconvert.options import ConvertOptions
from mtconvert.reference import open_reference
from mtconvert.registry import Registry, default_registry
from mtconvert.report import ReferenceInfo, Report, SourceInfo, TargetMap
from mtconvert.shapes import sweep_shapes
from mtconvert.target import Progress, RunContext, latency_of, run_target
from mtconvert.timing import Clock


def run(model: Any, opts: ConvertOptions, *, example_inputs: Any = None,
        registry: Registry | None = None, progress: Progress | None = None) -> Report:
    registry = registry or default_registry()
    say = progress or (lambda _msg: None)
    names = resolve_targets(registry, opts.targets)
    clock = Clock()
    with tempfile.TemporaryDirectory(prefix="mtconvert-") as tmp:
        say("loading source")
        if example_inputs is None and opts.trust_pickle and opts.inputs is not None:
            example_inputs = feeds_mod.user_feeds(opts.inputs)  # a pickled module's examples
        loaded = source_mod.load(model, Path(tmp), example_inputs, trust_pickle=opts.trust_pickle,
                                 max_bytes=opts.max_model_bytes)
        feeds, values = feeds_mod.prepare(loaded, opts)
        src = loaded.prepared
        feeds, values, sweep_feeds = _sweep_feeds(loaded, opts, feeds, values)
        src.input_shapes = {k: tuple(v.shape) for k, v in feeds.items()}
        settings = opts.settings()
        if opts.precision == "int8":
            calib, how = feeds_mod.calibration_set(loaded, opts, feeds, Path(tmp) / "calib.npz")
            opts = replace(opts, calibration=calib)
            settings["calibration"] = how
        clock.lap("load_source_s")
        say(f"reference: running the {src.format} source")
        reference = open_reference(src, feeds, opts)
        once = replace(opts, warmup=0, iterations=1)
        sweep = [(f, open_reference(src, f, once).outputs) for f in sweep_feeds]
        clock.lap("reference_s")
        ctx = RunContext(registry, src, feeds, reference.outputs, opts, say,
                         ConversionCache(default_root() if opts.cache else None), sweep=sweep,
                         reference_info={"runtime": reference.runtime,
                                         "version": reference.version})
        reports = run_targets(ctx, names)
    return Report(source=_source_info(loaded, feeds, values),
                  reference=ReferenceInfo(reference.runtime, reference.version,
                                          latency_of(reference.latency, opts.threads)),
                  targets=TargetMap(reports), settings=settings, timings=clock.laps,
                  mtconvert_version=__version__,
                  created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def _sweep_feeds(loaded: source_mod.LoadedSource, opts: ConvertOptions, feeds: dict,
                 values: dict) -> tuple[dict, dict, list[dict]]:
    """--seq-lens / --batch-sizes: feeds at the first combination (the one artifacts are made
    for) and at every other one."""
    if not (opts.seq_lens or opts.batch_sizes):
        return feeds, values, []
    if opts.inputs is not None or loaded.example_feeds is not None:
        raise UsageError("--seq-lens/--batch-sizes generate their inputs; they cannot be "
                         "combined with --inputs or a PyTorch source's example inputs")
    combos = sweep_shapes(loaded.prepared.inputs, {k: v.shape for k, v in feeds.items()},
                          opts.seq_lens, opts.batch_sizes)
    feeds, values = feeds_mod.prepare(loaded, replace(opts, input_shapes=combos[0]))
    others = [feeds_mod.prepare(loaded, replace(opts, input_shapes=c))[0] for c in combos[1:]]
    return feeds, values, others


def run_targets(ctx: RunContext, names: list[str]) -> list:
    """Every target, in the requested order, up to ``jobs`` at a time."""
    jobs = max(1, min(ctx.opts.jobs, len(names)))
    if jobs == 1:
        return [run_target(ctx, n) for n in names]
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="mtconvert-target")
    try:
        futures = [pool.submit(run_target, ctx, n) for n in names]
        return [f.result() for f in futures]
    except KeyboardInterrupt:  # targets not yet started never start; running ones clean up
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)


def resolve_targets(registry: Registry, targets: tuple[str, ...] | None) -> list[str]:
    if targets is None:
        names = registry.available()
        if not names:
            raise UsageError("no target can convert and run here; see `mtconvert backends`")
        return names
    names = []
    for token in targets:
        name = registry.resolve(token)
        if name not in names:
            names.append(name)
    if not names:
        raise UsageError("no target given")
    return names


def _source_info(loaded: source_mod.LoadedSource, feeds: dict[str, np.ndarray],
                 values: dict[str, str]) -> SourceInfo:
    src = loaded.prepared
    return SourceInfo(path=str(src.path) if src.path else None, format=src.format,
                      sha256=loaded.sha256, inputs=tuple(s.to_dict() for s in src.inputs),
                      outputs=tuple(s.to_dict() for s in src.outputs),
                      input_shapes={k: list(v.shape) for k, v in feeds.items()},
                      input_values=values)
