"""One target's artifact judged by what it generates: the host loop run in a child process on
it (teacher-forced, then free-running), the result judged against the reference, the target's
report amended. Shared by a conversion (mtconvert.generation.run) and `mtconvert verify` of a
bundle that carries a generation (mtconvert.generation.golden)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert.backends.base import Artifact, Backend, import_path
from mtconvert.errors import RuntimeFailure, StepError
from mtconvert.generation import judge
from mtconvert.generation.reference import Reference
from mtconvert.generation.step import Geometry
from mtconvert.report import TargetReport
from mtconvert.validators.tolerances import Tolerance


@dataclass(frozen=True)
class EncoderInput:
    """An encoder-decoder's encoder graph as the host loop runs it: the target's encoder
    artifact, its input, and the prompt the report shows (token ids; None for features)."""

    artifact: Artifact
    feeds: dict[str, np.ndarray]
    prompt: list[int] | None


def generated(opts: Any, backend: Backend, artifact: Artifact, report: TargetReport,
              ref: Reference, geo: Geometry, tol: Tolerance | None = None,
              encoder: EncoderInput | None = None,
              growing: dict[str, Artifact] | None = None) -> TargetReport:
    """``report`` with its ``generation`` section; failed when the generation is not the
    reference's, error when the runtime failed. ``tol``: the logits' tolerance (default: the
    artifact's profile under the run's overrides). ``encoder``: an encoder-decoder's encoder
    graph, run first in the same child; time to first token then includes it. ``growing``:
    an Optimum encoder-decoder set's decoder graphs by role (decoder, with_past), stepped
    with their own growing cache (loop.decode_growing; ``artifact`` is the with-past one)."""
    try:
        result = run_loop(opts, backend, artifact, ref, geo, encoder, growing)
    except StepError as exc:
        return replace(report, status="error", reason=f"generation: {exc.reason}")
    if "unavailable" in result:
        return replace(report, generation={"skipped": result["unavailable"]})
    got, want = np.shape(result["forced_logits"]), ref.logits.shape
    if got != want or len(result["free_tokens"]) != len(ref.tokens):
        why = f"generation: logits per step {got}, the reference's {want}"
        return replace(report, status="failed", reason=why, generation={"error": why})
    tol = tol or opts.tolerances.resolve(artifact.profile, "logits")
    states = result.get("states") or []  # the runtime keeps the cache (Core ML state)
    cache_bytes = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
                      for _, shape, dtype in states) if states else geo.cache_bytes()
    section, reasons = judge.judge(ref, result["forced_logits"], result["free_tokens"],
                                   result["step_ms"], tol, cache_bytes, geo.max_cache,
                                   result["latency_unavailable"])
    section["runtime"] = result["runtime"]
    if states:
        section["kv_cache"] = {"kept_in": "runtime state", "states": len(states),
                               "dtype": states[0][2]}
    if encoder is not None:
        _encoder_fields(section, encoder, ref, result.get("encoder_ms"))
    if not reasons:
        return replace(report, generation=section)
    reason = "; ".join([*([report.reason] if report.reason else []), *reasons])
    return replace(report, status="failed", reason=reason, generation=section)


def _encoder_fields(section: dict[str, Any], encoder: EncoderInput, ref: Reference,
                    encoder_ms: float | None) -> None:
    """An encoder-decoder's prompt is the encoder's input; the decoder starts from its
    decoder_start_token_id; time to first token is the encoder's run plus the first step."""
    section["decoder_start_tokens"] = list(ref.prompt)
    section["prompt_tokens"] = encoder.prompt
    if encoder_ms is not None and "time_to_first_token_ms" in section:
        section["encoder_ms"] = round(encoder_ms, 4)
        section["time_to_first_token_ms"] = round(section["time_to_first_token_ms"]
                                                  + encoder_ms, 4)


def run_loop(opts: Any, backend: Backend, artifact: Artifact, ref: Reference,
             geo: Geometry, encoder: EncoderInput | None = None,
             growing: dict[str, Artifact] | None = None) -> dict[str, Any]:
    """loop.decode in a child process (a runtime crash or hang is this target's error)."""
    from mtconvert.backends.process import tail

    with tempfile.TemporaryDirectory(prefix="mtconvert-gen-") as tmp:
        t = Path(tmp)
        job = {"name": backend.name, "backend": import_path(type(backend)),
               "artifact": artifact.to_dict(), "threads": opts.threads,
               "geometry": vars(geo), "prompt": list(ref.prompt),
               "reference_tokens": list(ref.tokens), "new_tokens": len(ref.tokens),
               "outputs": str(t / "outputs.npz"), "result": str(t / "result.json")}
        if encoder is not None:
            np.savez(t / "encoder_feeds.npz", **encoder.feeds)
            job["encoder"] = {"artifact": encoder.artifact.to_dict(),
                              "feeds": str(t / "encoder_feeds.npz")}
        if growing is not None:
            job["growing"] = {role: a.to_dict() for role, a in growing.items()}
        (t / "job.json").write_text(json.dumps(job))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            proc = subprocess.run([sys.executable, "-m", "mtconvert.generation.loop",
                                   str(t / "job.json")], env=env, capture_output=True,
                                  text=True, timeout=opts.timeout_s,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise RuntimeFailure(f"timed out after {opts.timeout_s:g} s",
                                 target=backend.name, step="generate") from None
        if proc.returncode != 0 or not (t / "result.json").is_file():
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            why = (f"the runtime crashed (signal {-proc.returncode})" if proc.returncode < 0
                   else lines[-1][:300] if lines else f"exit code {proc.returncode}")
            raise RuntimeFailure(why, target=backend.name, step="generate",
                                 stderr_tail=tail(proc.stderr))
        result = json.loads((t / "result.json").read_text())
        if "unavailable" not in result:
            with np.load(t / "outputs.npz") as data:
                result["forced_logits"] = data["forced_logits"]
    return result
