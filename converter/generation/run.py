"""A generative model from a Hugging Face folder to every target, validated by what it
generates. The decode-step module is exported once and goes through the ordinary run skeleton
(every target's routes, lint, one-step numerics against the step module in PyTorch eager,
latency of a step at the full cache); then each target's artifact is stepped token by token
in a child process, teacher-forced and free-running, against the original model's greedy
decode. An encoder-decoder model has two graphs, each through its own skeleton: the encoder
(its input → the cross-attention K/V) and the decoder-with-past step (mtconvert.generation
.encdec, .seq2seq); a target's generation runs its encoder artifact first, then the step."""
from __future__ import annotations

import re
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert.cache import ConversionCache
from mtconvert.errors import MtConvertError, UsageError
from mtconvert.generation import encdec, folder as folder_mod, optimum, reference, seq2seq, step
from mtconvert.generation import stateful
from mtconvert.generation.target import EncoderInput, generated
from mtconvert.generation.loop import decode
from mtconvert.report import Report, TargetReport
from mtconvert.run.context import RunContext
from mtconvert.run.skeleton import Run

CACHE_ROUND = 16  # the default --max-cache: prompt + new tokens, rounded up to this


class Generation:
    """One generative run around the skeleton: entering loads the folder, decodes the reference
    and exports the decode-step graph (``ctx`` is then what every target reads); ``report``
    judges each target's generation. Leaving removes the step graph's work folder."""

    def __init__(self, skeleton: Run, model: Any):
        self.skeleton, self.model = skeleton, model
        self._tmp = tempfile.TemporaryDirectory(prefix="mtconvert-")
        self.enc_ctx: RunContext | None = None  # an encoder-decoder's encoder graph
        self.optimum: optimum.OptimumSet | None = None  # an Optimum ONNX set
        self.encoder: tuple[dict[str, np.ndarray], list[int] | None] | None = None

    @property
    def contexts(self) -> list[RunContext]:
        """The graphs every target converts: the decode step, then an encoder if any."""
        return [self.ctx] + ([self.enc_ctx] if self.enc_ctx is not None else [])

    def __enter__(self) -> Generation:
        try:
            return self._prepare()
        except BaseException:
            self._tmp.cleanup()
            raise

    def _prepare(self) -> Generation:
        sk, opts = self.skeleton, self.skeleton.opts
        self.optimum = (optimum.open_set(Path(self.model), opts.task)
                        if optimum.is_optimum_set(self.model) else None)
        self.folder = (self.optimum.folder if self.optimum is not None
                       else folder_mod.open_folder(Path(self.model), opts.task, opts.trust_pickle)
                       if folder_mod.is_hf_folder(self.model)
                       else folder_mod.from_model(self.model, opts.task))
        refuse_unsupported(opts, self.folder.task == "automatic-speech-recognition")
        if self.optimum is None:  # an ONNX set's graphs are read as they are, any family
            folder_mod.check_architecture(self.folder)
        config = self.folder.config  # every input checked before torch is imported
        if folder_mod.is_seq2seq(self.folder):
            feeds, shown, how = encdec.encoder_input(self.folder, opts)
            self.encoder, prompt = (feeds, shown), ()
            sk.opts = opts = replace(opts, inputs=None)  # read: each graph's feeds are its own
            max_cache = cache_length(config, 1, opts.max_new_tokens, opts.max_cache)
        else:
            prompt, how = reference.prompt_ids(self.folder, opts.prompt, opts.prompt_ids,
                                               int(config.get("vocab_size") or 0))
            max_cache = cache_length(config, len(prompt), opts.max_new_tokens, opts.max_cache)
        if self.optimum is not None:  # mtconvert.generation.optimum: the static step graph
            src, self.ref, self.geo = optimum.step_source(sk, self.optimum, prompt, how,
                                                          max_cache, Path(self._tmp.name))
        else:
            with folder_mod.quiet_transformers():
                src = self._step_graph(prompt, how, max_cache)
        self.point = sk.point()
        self.ctx = self._context(sk, src, self.point, "cache")
        if self.encoder is not None:
            self.enc_ctx = self._context(self.enc_sk, self.enc_src, self.enc_sk.point(),
                                         "encoder-cache")
        sk.clock.lap("reference_s")
        return self

    def _context(self, sk: Run, src: Any, point: Any, scratch: str) -> RunContext:
        return graph_context(sk, src, point, Path(self._tmp.name) / scratch)

    def _step_graph(self, prompt: tuple[int, ...], how: str, max_cache: int) -> Any:
        """Load the model, decode the reference, build the step module and export it (the
        run's source)."""
        sk, opts = self.skeleton, self.skeleton.opts
        sk.say(f"loading {self.folder.label} ({self.folder.task})")
        hf = folder_mod.load_model(self.folder)
        sk.clock.lap("load_source_s")
        sk.say(f"reference: greedy decode of {opts.max_new_tokens} tokens, PyTorch eager")
        if self.encoder is not None:
            return self._seq2seq_graphs(hf, how, max_cache)
        self.ref = reference.greedy(hf, prompt, opts.max_new_tokens)
        try:
            module, self.geo = step.build(hf, max_cache)
        except ValueError as exc:  # a variant of a known family without a builder
            raise UsageError(f"{self.folder.label}: {exc}") from None
        sk.settings["generation"] = {
            "task": self.folder.task, "prompt": how, "max_new_tokens": opts.max_new_tokens,
            "max_cache": max_cache, "reference": f"{self.ref.runtime} {self.ref.version}",
            "step_module_max_abs_error": reference.step_module_error(module, self.geo, self.ref)}
        src = sk.load(module, Path(self._tmp.name), example_feeds(module, self.geo, prompt))
        src.name = stem(self.folder.label.lower() if self.folder.path is None
                        else self.folder.path.name)
        # the same step keeping its cache in its own buffers: for a target whose runtime
        # holds state (Core ML iOS18+: mtconvert.generation.stateful)
        src.stateful_module = stateful.build(module, self.geo)
        return src

    def _seq2seq_graphs(self, hf: Any, how: str, max_cache: int) -> Any:
        """The encoder graph (loaded by a skeleton of its own) and the step graph (the run's
        source) of an encoder-decoder model."""
        sk, opts = self.skeleton, self.skeleton.opts
        feeds, _ = self.encoder
        self.ref = encdec.reference_decode(hf, self.folder, feeds, opts.max_new_tokens)
        try:
            enc, module, self.geo = seq2seq.build(hf, max_cache,
                                                  next(iter(feeds.values())).shape[-1]
                                                  if "input_ids" in feeds else 0)
        except ValueError as exc:
            raise UsageError(f"{self.folder.label}: {exc}") from None
        cross = encdec.cross_kv(enc, feeds)
        sk.settings["generation"] = {
            "task": self.folder.task, "prompt": how, "max_new_tokens": opts.max_new_tokens,
            "max_cache": max_cache, "reference": f"{self.ref.runtime} {self.ref.version}",
            "decoder_start_token_id": self.ref.prompt[0],
            "graphs": ["decoder_with_past", "encoder"],
            "step_module_max_abs_error": encdec.step_module_error(module, self.geo, self.ref,
                                                                  cross)}
        base = stem(self.folder.label.lower() if self.folder.path is None
                    else self.folder.path.name)[:-len("-step")]
        self.enc_sk = Run("convert", replace(opts, bundle=self._enc_bundles())
                          if opts.bundle is not None else opts, sk.registry, sk.say)
        import torch

        for sub in ("encoder", "step"):
            (Path(self._tmp.name) / sub).mkdir()
        self.enc_src = self.enc_sk.load(enc, Path(self._tmp.name) / "encoder",
                                        {k: torch.from_numpy(v) for k, v in feeds.items()})
        self.enc_src.name = f"{base}-encoder"
        src = sk.load(module, Path(self._tmp.name) / "step",
                      encdec.step_feeds(module, self.geo, self.ref, cross))
        src.name = f"{base}-step"
        return src

    def report(self, reports: list[TargetReport],
               encoder_reports: list[TargetReport] | None = None) -> Report:
        if encoder_reports is not None:
            judged = self.judged(reports, encoder_reports)
            self.enc_sk = None  # its reference children close (weakref.finalize)
        else:
            judged = [generate(self.ctx, r, self.ref, self.geo) for r in reports]
        if self.skeleton.opts.bundle is not None:
            self._bundle(judged)
        path = self.folder.path
        source = replace(self.skeleton.source_info(self.point),
                         path=str(path) if path else None, sha256=self.folder.sha256,
                         format="optimum-onnx" if self.optimum is not None
                         else "hf-folder" if path else "hf-model")
        return self.skeleton.report(judged, self.point, source)

    def _bundle(self, reports: list[TargetReport]) -> None:
        """The generation into each target's golden bundle (written by the pipeline)."""
        from mtconvert.generation import golden

        root = Path(self.skeleton.opts.bundle).resolve()
        for r in reports:
            if (root / r.name / "bundle.json").is_file() and r.generation \
                    and "steps" in r.generation:
                tol = r.generation["teacher_forced"]["tolerance"]
                enc = None
                if self.encoder is not None:  # the encoder graph's bundle, if it was made
                    if not (self._enc_bundles() / r.name / "bundle.json").is_file():
                        continue
                    enc = (self._enc_bundles() / r.name, *self.encoder)
                golden.add(root / r.name, self.ref, self.geo, golden.Tolerance(**tol), enc)

    def _enc_bundles(self) -> Path:
        """Where the encoder graph's run writes its bundles, each then copied into its
        target's step bundle (mtconvert.generation.golden)."""
        return Path(self._tmp.name) / "encoder-bundles"

    def judged(self, reports: list[TargetReport],
               encoder_reports: list[TargetReport]) -> list[TargetReport]:
        """An encoder-decoder's targets, each generated through its encoder artifact then its
        step artifact; the two graphs' checks listed under ``generation.graphs``. (Called
        again, it generates again: benchmarks/bench_generation.py repeats it.)"""
        by_name = {r.name: r for r in encoder_reports}
        out = []
        for r in reports:
            enc = by_name.get(r.name)
            done = generate(self.ctx, r, self.ref, self.geo, (self.enc_ctx, enc, *self.encoder))
            if done.generation is not None:
                done = replace(done, generation=done.generation | {"graphs": {
                    "encoder": encdec.graph_summary(enc),
                    "decoder_with_past": encdec.graph_summary(r)}})
            out.append(encdec.merged(done, enc))
        return out

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()


def graph_context(sk: Run, src: Any, point: Any, scratch: Path) -> RunContext:
    """One graph's run context, its conversions cached (``scratch``: the cache of this run
    only, under --no-cache, so that each target's Artifact, with its I/O maps, is at hand for
    the generation: ``converted``)."""
    ctx = sk.context(src, point, cache=True)
    if ctx.cache.root is None:
        ctx = replace(ctx, cache=ConversionCache(scratch))
    return ctx


def refuse_unsupported(opts: Any, features: bool = False) -> None:
    """Options of single-pass models that mean nothing here yet: refused, not ignored
    (``features``: a speech model, whose encoder input --inputs gives)."""
    given = [flag for flag, value in (("--inputs", opts.inputs and not features),
                                      ("--seq-lens", opts.seq_lens),
                                      ("--batch-sizes", opts.batch_sizes),
                                      ("--eval-data", opts.eval_data)) if value]
    if given:
        raise UsageError(f"{', '.join(given)}: not available for a model folder's generation "
                         "(the prompt is --prompt or --prompt-ids; --inputs: a speech model's "
                         "features)")
    if opts.precision == "int8":
        raise UsageError("--precision int8 is not available for generation yet (fp32, fp16)")


def cache_length(config: dict[str, Any], prompt_len: int, new_tokens: int, given: int | None) -> int:
    """The KV cache's slots: every position but the last generated token's."""
    if new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    need = prompt_len + new_tokens - 1
    size = given or -(-need // CACHE_ROUND) * CACHE_ROUND
    if prompt_len > size:
        raise UsageError(f"the prompt ({prompt_len} tokens) is longer than --max-cache {size}")
    if need > size:
        raise UsageError(f"--max-cache {size} cannot hold the prompt ({prompt_len} tokens) and "
                         f"{new_tokens} new tokens: give at least {need}")
    window = config.get("sliding_window") if (config.get("model_type") == "mistral"
                                              or config.get("use_sliding_window")) else None
    if window and size + 1 > window:
        raise UsageError(f"a cache of {size} slots exceeds the model's sliding window ({window}); "
                         "the step graph attends to every slot")
    limit = (config.get("max_position_embeddings") or config.get("n_positions")
             or config.get("max_target_positions"))
    if limit and size + 1 > limit:
        raise UsageError(f"a cache of {size} slots needs {size + 1} positions; the model has "
                         f"{limit}")
    return size


def stem(name: str) -> str:
    return (re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model") + "-step"


def example_feeds(module: Any, geo: step.Geometry, prompt: tuple[int, ...]) -> dict[str, Any]:
    """The step graph's example inputs: the last prompt token with the prompt's real cache
    (the one-step check and the conversion's shapes use them)."""
    import torch

    seen: list[dict[str, np.ndarray]] = []

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.append(feeds)
        with torch.inference_mode():
            out = module(*(torch.from_numpy(v) for v in feeds.values()))
        return {k: v.numpy() for k, v in out.items()}

    decode(run, geo, prompt, 1)
    return {k: torch.from_numpy(v.copy()) for k, v in seen[-1].items()}


def _artifact_file(report: TargetReport | None) -> Any:
    if report is None or report.status in ("error", "skipped"):
        return None
    return next((a for a in report.artifacts if a.role == "artifact"), None)


def generate(ctx: RunContext, report: TargetReport, ref: reference.Reference,
             geo: step.Geometry, encoder: tuple | None = None) -> TargetReport:
    """The target's artifact stepped through the prompt and the new tokens; its report gains
    ``generation`` and fails on a generation the reference does not make. ``encoder``: (its
    context, its report, its feeds, the prompt shown) of an encoder-decoder's encoder graph,
    whose artifact runs first (none made: no generation, the encoder's report says why)."""
    art = _artifact_file(report)
    enc_art = _artifact_file(encoder[1]) if encoder else None
    if art is None or (encoder and enc_art is None):
        return report
    backend = ctx.registry.get(report.name)()
    ctx.say(f"{report.name}: generating {len(ref.tokens)} tokens with its own KV cache")
    try:
        with tempfile.TemporaryDirectory(prefix="mtconvert-gen-art-") as tmp:
            artifact = converted(ctx, backend, report, Path(art.path), Path(tmp) / "step")
            enc_in = None
            if encoder:
                enc_ctx, enc_report, feeds, shown = encoder
                enc_in = EncoderInput(converted(enc_ctx, backend, enc_report,
                                                Path(enc_art.path), Path(tmp) / "encoder"),
                                      feeds, shown)
            return generated(ctx.opts, backend, artifact, report, ref, geo, encoder=enc_in)
    except MtConvertError as exc:  # the artifact could not be described again
        return replace(report, status="error", reason=f"generation: {exc}")


def converted(ctx: RunContext, backend: Any, report: TargetReport, path: Path,
              scratch: Path) -> Any:
    """The Artifact the target's conversion made, with the backend's own data for its session
    (I/O maps), from the conversion cache (copied into ``scratch``): the report keeps only
    file names (with --no-cache, the run's own cache). Failing that, the committed file
    described again by the backend's ``adopt``, as `mtconvert validate` does (which may map
    I/O by position)."""
    steps = report.conversion.steps if report.conversion else ()
    chosen = [s.split(":")[0][len("route "):] for s in steps if s.startswith("route ")
              and ": chosen" in s]
    route = chosen[0] if chosen else (backend.routes(ctx.src) or [""])[0]
    key = ctx.cache.key(type(backend), ctx.src, ctx.opts.target_options(route))
    hit = ctx.cache.load(key, scratch / "files", scratch / "work")
    if hit is not None:
        return hit[0]
    ctx.cache.release(key)
    return backend.adopt(path, ctx.src, ctx.opts.target_options())
