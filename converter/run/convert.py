"""Convert mode: the source to every target, each artifact checked. Targets convert
concurrently (up to --jobs); a target's failure is in its report and never stops the others."""
from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from mtconvert import inputs as feeds_mod
from mtconvert.errors import UsageError
from mtconvert.options import ConvertOptions
from mtconvert.registry import Registry
from mtconvert.report import Report, TargetReport
from mtconvert.run.context import Progress, RunContext
from mtconvert.run.skeleton import Point, Run
from mtconvert.run.target import run_target
from mtconvert.shapes import dynamic_range, resolve_shapes, sweep_shapes


def run(model: Any, opts: ConvertOptions, *, example_inputs: Any = None,
        registry: Registry | None = None, progress: Progress | None = None) -> Report:
    from mtconvert.generation.folder import is_generative_source

    if is_generative_source(model, example_inputs, opts.task):
        return _generative(model, opts, registry, progress)
    skeleton = Run("convert", opts, registry, progress)
    names = resolve_targets(skeleton.registry, opts.targets)
    with tempfile.TemporaryDirectory(prefix="mtconvert-") as tmp:
        if example_inputs is None and opts.trust_pickle and opts.inputs is not None:
            example_inputs = feeds_mod.user_feeds(opts.inputs)  # a pickled module's examples
        src = skeleton.load(model, Path(tmp), example_inputs)
        skeleton.clock.lap("load_source_s")
        main, others = _points(skeleton)
        if _needs_calibration(src, opts):
            calib, how = feeds_mod.calibration_set(skeleton.loaded, opts, main.feeds,
                                                   Path(tmp) / "calib.npz")
            skeleton.opts = replace(skeleton.opts, calibration=calib)
            skeleton.settings["calibration"] = how
        ctx = skeleton.context(src, main, cache=True, sweep=others)
        skeleton.clock.lap("reference_s")
        reports = run_targets(ctx, names)
    return skeleton.report(reports, main)


def _needs_calibration(src: Any, opts: ConvertOptions) -> bool:
    """int8 asked for, or full-integer int8 of a quantized source (planned at int8 whatever
    --precision says): both need a representative dataset."""
    return opts.precision == "int8" or (opts.extra.get("int8_scheme") == "full"
                                        and bool(src.quantization))


def _generative(model: Any, opts: ConvertOptions, registry: Registry | None,
                progress: Progress | None) -> Report:
    """A Hugging Face model folder (or a PreTrainedModel given without example inputs): its
    decode-step graph to every target, each then judged by what it generates
    (mtconvert.generation)."""
    from mtconvert.generation import optimum_seq2seq
    from mtconvert.generation.run import Generation

    skeleton = Run("convert", opts, registry, progress)
    names = resolve_targets(skeleton.registry, opts.targets)
    if optimum_seq2seq.is_seq2seq_set(model):  # its three graphs as they are
        return optimum_seq2seq.run(skeleton, model, names, run_targets)
    with Generation(skeleton, model) as gen:  # an encoder-decoder: the step, then the encoder
        return gen.report(*(run_targets(ctx, names) for ctx in gen.contexts))


def _points(skeleton: Run) -> tuple[Point, list[Point]]:
    """The point the artifacts are made for and, with --seq-lens/--batch-sizes, every other
    shape of the sweep (its reference untimed)."""
    opts, loaded = skeleton.opts, skeleton.loaded
    if not (opts.seq_lens or opts.batch_sizes):
        return skeleton.point(), []
    if opts.inputs is not None or (loaded.example_feeds is not None and not loaded.dynamic_axes):
        raise UsageError("--seq-lens/--batch-sizes generate their inputs; they cannot be "
                         "combined with --inputs or a PyTorch source's example inputs")
    base, _ = resolve_shapes(loaded.prepared.inputs, dict(opts.input_shapes), loaded.weight_dims)
    combos = sweep_shapes(loaded.prepared.inputs, base, opts.seq_lens, opts.batch_sizes)
    if loaded.dynamic_axes:  # a .pt2 exported with Dims: generated inputs within its range
        skeleton.loaded = replace(loaded, example_feeds=None)
        skeleton.opts = replace(opts, extra=dict(opts.extra) | {
            "dynamic_range": dynamic_range(loaded.dynamic_axes, combos)})
    return skeleton.point(combos[0]), [skeleton.point(c, timed=False) for c in combos[1:]]


def run_targets(ctx: RunContext, names: list[str]) -> list[TargetReport]:
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
