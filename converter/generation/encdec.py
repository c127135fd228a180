"""An encoder-decoder model's run (T5, BART, Marian, Whisper): the encoder input (prompt ids,
or log-mel features from --inputs or generated), the reference greedy decode, the two graphs
(mtconvert.generation.seq2seq) exported, each through its own run skeleton, and each
target's encoder report folded into its decoder-step report (the encoder's file, its
numerics per graph). Called by mtconvert.generation.run."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mtconvert.errors import UsageError
from mtconvert.generation import reference
from mtconvert.generation.folder import HFFolder
from mtconvert.report import ArtifactFile, TargetReport

ENCODER_ROLE = "encoder"  # the encoder graph's file in a target's artifacts


def encoder_input(folder: HFFolder, opts: Any) -> tuple[dict[str, np.ndarray], list[int] | None,
                                                        str]:
    """(the encoder graph's feeds, the prompt ids the report shows or None, how chosen)."""
    cfg = folder.config
    if folder.task == "automatic-speech-recognition":
        if opts.prompt is not None or opts.prompt_ids:
            raise UsageError("--prompt/--prompt-ids: a speech model's encoder input is log-mel "
                             "features (--inputs FILE.npz with input_features)")
        return _features(cfg, opts)
    prompt, how = reference.prompt_ids(folder, opts.prompt, opts.prompt_ids,
                                       int(cfg.get("vocab_size") or 0))
    limit = cfg.get("max_position_embeddings")
    if limit and len(prompt) > limit:
        raise UsageError(f"the prompt ({len(prompt)} tokens) is longer than the encoder's "
                         f"{limit} positions")
    return {"input_ids": np.asarray([prompt], np.int64)}, list(prompt), how


def _features(cfg: dict[str, Any], opts: Any) -> tuple[dict[str, np.ndarray], None, str]:
    mel, frames = int(cfg.get("num_mel_bins") or 0), 2 * int(cfg.get("max_source_positions")
                                                            or 0)
    want = (1, mel, frames)
    if opts.inputs is None:
        rng = np.random.default_rng(opts.seed)
        feats = rng.standard_normal(want).astype(np.float32)
        return ({"input_features": feats}, None,
                f"generated log-mel features: standard normal, seed {opts.seed}, shape "
                f"{list(want)} (num_mel_bins x 2*max_source_positions); no --inputs given")
    from mtconvert import inputs as feeds_mod

    given = feeds_mod.user_feeds(opts.inputs)
    feats = given.get("input_features")
    if feats is None and len(given) == 1:
        feats = next(iter(given.values()))
    if feats is None:
        raise UsageError(f"--inputs {opts.inputs}: no array named input_features")
    if tuple(np.shape(feats)) != want:
        raise UsageError(f"--inputs input_features has shape {list(np.shape(feats))}; the "
                         f"model takes {list(want)}")
    return ({"input_features": np.asarray(feats, np.float32)}, None,
            f"--inputs {Path(str(opts.inputs)).name} (input_features {list(want)})")


def reference_decode(hf: Any, folder: HFFolder, feeds: dict[str, np.ndarray],
                     new_tokens: int) -> reference.Reference:
    start = reference.decoder_start(folder.config, folder.label)
    return reference.greedy_seq2seq(hf, feeds, start, new_tokens)


def cross_kv(encoder: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The encoder module in PyTorch eager: every decoder layer's cross K/V."""
    import torch

    with torch.inference_mode():
        out = encoder(*(torch.from_numpy(v) for v in feeds.values()))
    return {k: v.numpy() for k, v in out.items()}


def step_module_error(step: Any, geo: Any, ref: reference.Reference,
                      cross: dict[str, np.ndarray]) -> float:
    """Worst |logits| difference of the two modules (PyTorch eager, teacher forced) from the
    reference: what the rewrite costs before any target."""
    from mtconvert.generation.loop import decode

    got = decode(_runner(step), geo, ref.prompt, len(ref.tokens), forced=ref.tokens,
                 extra=cross)
    return float(np.max(np.abs(got.logits - ref.logits)))


def step_feeds(step: Any, geo: Any, ref: reference.Reference,
               cross: dict[str, np.ndarray]) -> dict[str, Any]:
    """The step graph's example inputs: its first step (the decoder start token), with the
    encoder's cross K/V."""
    import torch

    from mtconvert.generation.loop import decode

    seen: list[dict[str, np.ndarray]] = []
    run = _runner(step)
    decode(lambda f: (seen.append(f), run(f))[1], geo, ref.prompt, 1, extra=cross)
    return {k: torch.from_numpy(np.array(v)) for k, v in seen[-1].items()}


def _runner(module: Any) -> Any:
    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            out = module(*(torch.from_numpy(v) for v in feeds.values()))
        return {k: v.numpy() for k, v in out.items()}

    return run


def merged(step: TargetReport, enc: TargetReport | None,
           role: str = ENCODER_ROLE) -> TargetReport:
    """The target's step report with its encoder graph: the encoder's file (role "encoder",
    or ``role``: another graph of the target's, as an Optimum set's first-step decoder), the
    per-graph numerics under ``generation.graphs`` (added by ``graphs``), and the encoder's
    failure or error as the target's when the step graph passed."""
    if enc is None:
        return step
    files = tuple(ArtifactFile(a.path, a.bytes, role) for a in enc.artifacts
                  if a.role == "artifact")
    files += tuple(a for a in enc.artifacts if a.role == "sidecar")
    report = replace(step, artifacts=step.artifacts + files)
    if enc.status == "passed" or step.status in ("error", "skipped"):
        return report
    worse = "error" if "error" in (enc.status, step.status) else enc.status
    reason = "; ".join(r for r in (step.reason, f"{role} graph: {enc.reason}") if r)
    return replace(report, status=worse, reason=reason)


def graph_summary(r: TargetReport | None) -> dict[str, Any] | None:
    """One graph's check as the generation section lists it."""
    if r is None:
        return None
    n = r.numerics
    return {"status": r.status, "reason": r.reason,
            "artifact": next((a.path for a in r.artifacts if a.role == "artifact"), None),
            "numerics_passed": n.passed if n else None, "worst": n.worst if n else None,
            "latency_p50_ms": r.latency.p50_ms if r.latency else None}
