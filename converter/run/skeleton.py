"""The run skeleton every mode shares: source → feeds (built once per input shape) → reference
→ per-target reports → Report. A mode (convert, validate, verify, a matrix cell) loads or
describes its source, asks for the feeds and reference at the shapes it needs, checks its
targets with ``context(...)``, and hands the reports to ``report``."""
from __future__ import annotations

import datetime as _dt
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert.version import __version__
from mtconvert import baseline, deps, inputs as feeds_mod, source as source_mod
from mtconvert.backends.base import PreparedSource
from mtconvert.cache import ConversionCache, SourceCache, default_root
from mtconvert.options import ConvertOptions
from mtconvert.errors import ModelLoadError, StepError
from mtconvert.reference import ReferenceRun, checked, open_reference
from mtconvert.registry import Registry, default_registry
from mtconvert.report import ReferenceInfo, Report, SourceInfo, TargetMap, TargetReport
from mtconvert.run.check import latency_of
from mtconvert.run.context import Progress, RunContext
from mtconvert.run.timing import SharedReference
from mtconvert.timing import Clock
from mtconvert.validators.latency import summarize


@dataclass(frozen=True)
class Point:
    """The feeds at one set of input shapes, how they were made, and the reference's outputs."""

    feeds: dict[str, np.ndarray]
    values: dict[str, str]
    reference: ReferenceRun

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.feeds.items()}


class Run:
    """One run's shared state. ``mode`` is recorded in the report's settings (but for convert,
    whose settings have always been the options alone)."""

    def __init__(self, mode: str, opts: ConvertOptions, registry: Registry | None = None,
                 progress: Progress | None = None):
        self.mode, self.opts = mode, opts
        self.registry = registry or default_registry()
        self.say: Progress = progress or (lambda _msg: None)
        self.clock = Clock()
        self.loaded: source_mod.LoadedSource | None = None
        self.float_model: Any = None  # float_compare.FloatModel with --float-model
        self.settings: dict[str, Any] = opts.settings() | ({} if mode == "convert"
                                                           else {"mode": mode})
        self._points: dict[tuple, Point] = {}
        self._evals_by_shape: dict[tuple, Any] = {}
        self.baseline = baseline.load(opts.baseline) if opts.baseline else None
        # the reference's warm child per point, shared by the targets' timings; closed by
        # report() (or when this Run goes)
        self._references: dict[tuple, SharedReference] = {}
        weakref.finalize(self, _close_all, self._references)

    # --- source, feeds, reference -------------------------------------------------------------
    def load(self, model: Any, work_dir: Path, example_inputs: Any = None) -> PreparedSource:
        self.say("loading source")
        self.loaded = source_mod.load(model, work_dir, example_inputs,
                                      trust_pickle=self.opts.trust_pickle,
                                      max_bytes=self.opts.max_model_bytes,
                                      cache=SourceCache(default_root() if self.opts.cache
                                                        else None))
        from mtconvert import float_compare

        self.float_model = float_compare.load(self.opts, self.loaded, work_dir)
        return self.loaded.prepared

    def point(self, input_shapes: dict[str, tuple[int, ...]] | None = None, *,
              timed: bool = True) -> Point:
        """Feeds and reference outputs at ``input_shapes`` (None: the options' shapes), built
        once per shapes; ``timed`` runs the reference with the options' latency protocol."""
        opts = self.opts if input_shapes is None else replace(self.opts,
                                                              input_shapes=dict(input_shapes))
        key = (tuple(sorted(opts.input_shapes.items())), timed)
        if key not in self._points:
            assert self.loaded is not None, "load() the source first"
            feeds, values = feeds_mod.prepare(self.loaded, opts)
            src = replace(self.loaded.prepared, input_shapes=_shapes(feeds))
            self.say(f"reference: running the {src.format} source")
            if timed and src.format == "onnx":  # in the child the targets' timings share
                shared = SharedReference(src, {s.name: feeds[s.name] for s in src.inputs},
                                         opts)
                point = Point(feeds, values, _ort_reference(shared, opts))
                self._references[(id(point), opts.threads, opts.timeout_s)] = shared
            else:
                ref_opts = opts if timed else replace(opts, warmup=0, iterations=1)
                point = Point(feeds, values, open_reference(src, feeds, ref_opts))
            self._points[key] = point
        return self._points[key]

    def given(self, feeds: dict[str, np.ndarray], ref_out: dict[str, np.ndarray],
              runtime: str, version: str | None) -> Point:
        """A point whose feeds and reference outputs were stored (a golden bundle)."""
        point = Point(feeds, {k: "from the bundle" for k in feeds},
                      ReferenceRun(runtime, version, ref_out, {}))
        self._points.setdefault((tuple(sorted(point.shapes.items())), "given"), point)
        return point

    # --- targets ------------------------------------------------------------------------------
    def context(self, src: PreparedSource, point: Point, *, cache: bool = False,
                sweep: list[Point] = (), report_name: str | None = None,
                opts: ConvertOptions | None = None) -> RunContext:
        """What a target's check reads. ``src.input_shapes`` is set to the point's shapes (the
        shapes fixed-shape backends convert at)."""
        src.input_shapes = _shapes({s.name: point.feeds[s.name] for s in src.inputs})
        evals = self._evals(src, point) if self.opts.eval_data else None
        ctx_opts = opts or self.opts
        reference = self._references.setdefault(
            (id(point), ctx_opts.threads, ctx_opts.timeout_s),
            SharedReference(src, {s.name: point.feeds[s.name] for s in src.inputs}, ctx_opts))
        return RunContext(
            self.registry, src, point.feeds, point.reference.outputs, opts or self.opts,
            self.say, ConversionCache(default_root() if cache and self.opts.cache else None),
            report_name=report_name, sweep=[(p.feeds, p.reference.outputs) for p in sweep],
            reference_info={"runtime": point.reference.runtime,
                            "version": point.reference.version}, evals=evals,
            reference=reference, float_model=self.float_model)

    def _evals(self, src: PreparedSource, point: Point) -> Any:
        """The --eval-data set at the point's shapes, the reference run on it once."""
        from mtconvert.run import accuracy

        key = ("eval", tuple(sorted(point.shapes.items())))
        if key not in self._evals_by_shape:
            self.say("reference: running the evaluation data")
            self._evals_by_shape[key] = accuracy.load(self.opts.eval_data, src, point.feeds,
                                                      self.opts)
        return self._evals_by_shape[key]

    # --- the report ---------------------------------------------------------------------------
    def report(self, targets: list[TargetReport], point: Point,
               source: SourceInfo | None = None) -> Report:
        """The Report: the source as loaded (or ``source``), the reference at ``point``."""
        _close_all(self._references)  # every target is checked: no more timing
        ref = point.reference
        source = source or self.source_info(point)
        if source.sparsity:
            from mtconvert import sparsity

            targets = [sparsity.judged(t, source.sparsity) for t in targets]
        elif self.opts.sparse:  # --sparse with no pruned weight: each target says so
            from mtconvert import sparsity

            targets = [sparsity.unpruned(t) for t in targets]
        if self.baseline is not None:
            targets = baseline.apply(targets, self.baseline, source.sha256, {
                "max_latency_regression": self.opts.max_latency_regression,
                "max_size_growth": self.opts.max_size_growth}, self.opts.baseline)
        report = Report(source=source,
                      reference=ReferenceInfo(ref.runtime, ref.version,
                                              latency_of(ref.latency, self.opts.threads),
                                              self._reference_profile(point)),
                      targets=TargetMap(targets), settings=self.settings,
                      timings=self.clock.laps, mtconvert_version=__version__,
                      created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        if self.opts.save_baseline:
            baseline.save(report, self.opts.save_baseline)
        return report

    def _reference_profile(self, point: Point) -> dict[str, Any] | None:
        """--profile: ONNX Runtime's operator times on the source ONNX, at the point's feeds."""
        if not self.opts.profile:
            return None
        src = self.loaded.prepared if self.loaded else None
        if src is None or src.format != "onnx" or not Path(src.onnx_path).is_file():
            return {"unavailable": "only an ONNX source's ONNX Runtime reference is profiled"}
        from mtconvert.backends.base import Artifact
        from mtconvert.run import profile

        self.say("reference: profiling operators")
        artifact = Artifact(target="reference", primary=src.onnx_path, files=(src.onnx_path,))
        return profile.measure("reference", "mtconvert.reference:OrtReference",
                               artifact.to_dict(),
                               {s.name: point.feeds[s.name] for s in src.inputs},
                               self.opts.threads, self.opts.iterations, self.opts.timeout_s)

    def source_info(self, point: Point) -> SourceInfo:
        assert self.loaded is not None
        src = self.loaded.prepared
        return SourceInfo(path=str(src.path) if src.path else None, format=src.format,
                          sha256=self.loaded.sha256,
                          inputs=tuple(s.to_dict() for s in src.inputs),
                          outputs=tuple(s.to_dict() for s in src.outputs),
                          input_shapes={k: list(v) for k, v in point.shapes.items()},
                          input_values=point.values, sparsity=self.loaded.sparsity)


def _ort_reference(shared: SharedReference, opts: ConvertOptions) -> ReferenceRun:
    """An ONNX source's reference run (outputs, latency with the options' warm-up and
    iterations) from the shared reference child, as reference.open_reference gives it."""
    try:
        result, samples = shared.ort_run(opts.warmup, opts.iterations)
    except StepError as exc:
        raise ModelLoadError(f"ONNX Runtime cannot run the source model: {exc.reason}") from None
    return checked(ReferenceRun("onnxruntime-cpu", deps.dist_version("onnxruntime"),
                                result.outputs, summarize(samples, opts.warmup).to_dict()))


def _close_all(references: dict[tuple, SharedReference]) -> None:
    for shared in references.values():
        shared.close()
    references.clear()


def _shapes(feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in feeds.items()}
