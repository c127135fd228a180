"""A generative model from a Hugging Face folder to every target, validated by what it
generates. The decode-step module is exported once and goes through the ordinary run skeleton
(every target's routes, lint, one-step numerics against the step module in PyTorch eager,
latency of a step at the full cache); then each target's artifact is stepped token by token
in a child process, teacher-forced and free-running, against the original model's greedy
decode. Encoder-decoder models are not handled here yet."""
from __future__ import annotations

import re
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert.cache import ConversionCache
from mtconvert.errors import MtConvertError, UsageError
from mtconvert.generation import folder as folder_mod, reference, step
from mtconvert.generation.target import generated
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

    def __enter__(self) -> Generation:
        try:
            return self._prepare()
        except BaseException:
            self._tmp.cleanup()
            raise

    def _prepare(self) -> Generation:
        sk, opts = self.skeleton, self.skeleton.opts
        refuse_unsupported(opts)
        self.folder = (folder_mod.open_folder(Path(self.model), opts.task, opts.trust_pickle)
                       if folder_mod.is_hf_folder(self.model)
                       else folder_mod.from_model(self.model, opts.task))
        folder_mod.check_architecture(self.folder)
        config = self.folder.config  # every input checked before torch is imported
        prompt, how = reference.prompt_ids(self.folder, opts.prompt, opts.prompt_ids,
                                           int(config.get("vocab_size") or 0))
        max_cache = cache_length(config, len(prompt), opts.max_new_tokens, opts.max_cache)
        with folder_mod.quiet_transformers():
            src = self._step_graph(prompt, how, max_cache)
        self.point = sk.point()
        self.ctx = sk.context(src, self.point, cache=True)
        if self.ctx.cache.root is None:  # --no-cache: a cache of this run only, so that each
            # target's Artifact, with its I/O maps, is at hand for the generation (converted)
            self.ctx = replace(self.ctx, cache=ConversionCache(Path(self._tmp.name) / "cache"))
        sk.clock.lap("reference_s")
        return self

    def _step_graph(self, prompt: tuple[int, ...], how: str, max_cache: int) -> Any:
        """Load the model, decode the reference, build the step module and export it (the
        run's source)."""
        sk, opts = self.skeleton, self.skeleton.opts
        sk.say(f"loading {self.folder.label} ({self.folder.task})")
        hf = folder_mod.load_model(self.folder)
        sk.clock.lap("load_source_s")
        sk.say(f"reference: greedy decode of {opts.max_new_tokens} tokens, PyTorch eager")
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
        return src

    def report(self, reports: list[TargetReport]) -> Report:
        judged = [generate(self.ctx, r, self.ref, self.geo) for r in reports]
        if self.skeleton.opts.bundle is not None:
            self._bundle(judged)
        path = self.folder.path
        source = replace(self.skeleton.source_info(self.point),
                         path=str(path) if path else None, sha256=self.folder.sha256,
                         format="hf-folder" if path else "hf-model")
        return self.skeleton.report(judged, self.point, source)

    def _bundle(self, reports: list[TargetReport]) -> None:
        """The generation into each target's golden bundle (written by the pipeline)."""
        from mtconvert.generation import golden

        root = Path(self.skeleton.opts.bundle).resolve()
        for r in reports:
            if (root / r.name / "bundle.json").is_file() and r.generation \
                    and "steps" in r.generation:
                tol = r.generation["teacher_forced"]["tolerance"]
                golden.add(root / r.name, self.ref, self.geo, golden.Tolerance(**tol))

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()


def refuse_unsupported(opts: Any) -> None:
    """Options of single-pass models that mean nothing here yet: refused, not ignored."""
    given = [flag for flag, value in (("--inputs", opts.inputs), ("--seq-lens", opts.seq_lens),
                                      ("--batch-sizes", opts.batch_sizes),
                                      ("--eval-data", opts.eval_data)) if value]
    if given:
        raise UsageError(f"{', '.join(given)}: not available for a model folder's generation "
                         "(the prompt is --prompt or --prompt-ids)")
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
    limit = config.get("max_position_embeddings") or config.get("n_positions")
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


def generate(ctx: RunContext, report: TargetReport, ref: reference.Reference,
             geo: step.Geometry) -> TargetReport:
    """The target's artifact stepped through the prompt and the new tokens; its report gains
    ``generation`` and fails on a generation the reference does not make."""
    art = next((a for a in report.artifacts if a.role == "artifact"), None)
    if art is None or report.status in ("error", "skipped"):
        return report
    backend = ctx.registry.get(report.name)()
    ctx.say(f"{report.name}: generating {len(ref.tokens)} tokens with its own KV cache")
    try:
        with tempfile.TemporaryDirectory(prefix="mtconvert-gen-art-") as tmp:
            artifact = converted(ctx, backend, report, Path(art.path), Path(tmp))
            return generated(ctx.opts, backend, artifact, report, ref, geo)
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
