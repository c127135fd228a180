"""The host loop: a decode-step session stepped token by token, its KV cache kept here in
numpy (each step's present K/V written at the token's slot). Run inside a child process per
target (``python -m mtconvert.generation.loop JOB.json``), so a runtime crash is that target's
error. Pure numpy but for opening the backend's session."""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Run = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class Decoded:
    tokens: list[int]  # argmax of each step from the last prompt token on
    logits: np.ndarray  # [steps, vocab], every position (prompt included)
    step_ms: list[float]  # each step, session run and cache update


def decode(run: Run, geometry: Any, prompt: tuple[int, ...], new_tokens: int,
           forced: tuple[int, ...] | None = None,
           extra: dict[str, np.ndarray] | None = None, host_cache: bool = True) -> Decoded:
    """Step through the prompt, then ``new_tokens`` - 1 more tokens: the model's own argmax
    (free running) or ``forced`` (teacher forcing). len(prompt) + new_tokens - 1 steps.
    ``extra``: inputs fed unchanged at every step, after the cache (an encoder-decoder's
    cross-attention K/V). ``host_cache`` False: the runtime keeps the cache (Core ML state,
    mtconvert.generation.stateful), so no cache is fed or written here."""
    g = geometry
    cache = {f"past_{kv}_{i}": np.zeros(g.cache_shape(), np.float32)
             for i in range(g.layers) for kv in ("key", "value")} if host_cache else {}
    mask = np.zeros((1, g.max_cache + 1), np.float32)
    mask[0, -1] = 1.0
    seq, tokens, logits, times = list(prompt), [], [], []
    for pos in range(len(prompt) + new_tokens - 1):
        feeds = {"input_ids": np.array([[seq[pos]]], np.int64),
                 "position_ids": np.array([[pos]], np.int64), "attention_mask": mask.copy(),
                 **cache, **(extra or {})}
        t0 = time.perf_counter()
        out = run(feeds)
        for name in cache:
            cache[name][:, :, pos] = out[name.replace("past_", "present_")][:, :, 0]
        mask[0, pos] = 1.0
        times.append((time.perf_counter() - t0) * 1000.0)
        row = np.asarray(out["logits"], np.float32).reshape(-1)
        logits.append(row)
        if pos >= len(prompt) - 1:
            tokens.append(int(np.argmax(row)))
            if pos + 1 == len(seq):
                seq.append(forced[len(tokens) - 1] if forced else tokens[-1])
    return Decoded(tokens, np.stack(logits), times)


def decode_growing(runs: dict[str, Run], takes: dict[str, dict[str, Any]],
                   encoder_feeds: dict[str, np.ndarray], prompt: tuple[int, ...],
                   new_tokens: int, forced: tuple[int, ...] | None = None
                   ) -> tuple[Decoded, float]:
    """An encoder-decoder set laid out as Optimum exports it, stepped with its own growing
    cache (mtconvert.generation.optimum_seq2seq): ``runs["encoder"]`` on ``encoder_feeds``,
    ``runs["decoder"]`` on the decoder prompt (its start token: one step) with the encoder's
    output, then ``runs["with_past"]`` a token at a time, each step's present.* fed back as
    past_key_values.* (the cross K/V: the first pass's; a merged graph's with-past branch
    outputs empty ones). ``takes``: each graph's inputs, name -> shape (feeds are filtered by
    them; a merged graph's use_cache_branch is set, and its no-past branch gets empty pasts).
    Returns (the decode, the encoder's run in ms); the static layout (``decode``) is
    untouched."""
    if len(prompt) != 1:
        raise ValueError("the decoder prompt of an encoder-decoder set is its start token")
    t0 = time.perf_counter()
    hidden = np.asarray(runs["encoder"](encoder_feeds)["last_hidden_state"], np.float32)
    enc_ms = (time.perf_counter() - t0) * 1000.0
    common = {"encoder_hidden_states": hidden, "encoder_attention_mask": np.asarray(
        encoder_feeds.get("attention_mask", np.ones(hidden.shape[:2], np.int64)), np.int64)}
    seq, past, tokens, logits, times = list(prompt), {}, [], [], []
    for pos in range(new_tokens):
        role = "with_past" if pos else "decoder"
        feeds = {"input_ids": np.array([[seq[pos]]], np.int64), **common, **past,
                 "use_cache_branch": np.array([bool(pos)])}
        if not pos:  # a merged graph's no-past branch: empty pasts (batch 1, past length 0)
            feeds |= {n: np.zeros(_empty(shape), np.float32) for n, shape in takes[role].items()
                      if n.startswith("past_key_values.")}
        t0 = time.perf_counter()
        out = runs[role]({k: v for k, v in feeds.items() if k in takes[role]})
        times.append((time.perf_counter() - t0) * 1000.0)
        past |= {k.replace("present.", "past_key_values.", 1): np.asarray(v, np.float32)
                 for k, v in out.items() if k.startswith("present.")
                 and (not pos or ".encoder." not in k)}
        row = np.asarray(out["logits"], np.float32).reshape(-1, np.shape(out["logits"])[-1])[-1]
        logits.append(row)
        tokens.append(int(np.argmax(row)))
        seq.append(forced[pos] if forced else tokens[-1])
    return Decoded(tokens, np.stack(logits), times), enc_ms


def _empty(shape: Any) -> tuple[int, ...]:
    """A declared input shape with batch 1 and every other unnamed or named axis 0."""
    return tuple(d if isinstance(d, int) and d > 0 else (1 if i == 0 else 0)
                 for i, d in enumerate(shape))


def _child(job_path: Path) -> None:
    from mtconvert.backends.base import Artifact
    from mtconvert.errors import RuntimeUnavailable
    from mtconvert.generation.step import Geometry
    from mtconvert.registry import BackendEntry

    job = json.loads(job_path.read_text())
    cls = BackendEntry(job["name"], job["backend"]).load()
    if job.get("growing"):
        return _growing_child(cls, job)
    geo = Geometry(**job["geometry"])
    prompt, n = tuple(job["prompt"]), job["new_tokens"]
    encoded: dict[str, Any] = {}
    try:
        if job.get("encoder"):  # an encoder-decoder: the encoder graph first, its K/V kept
            encoded = _encode(cls, job["encoder"], job["threads"])
        session_cm = cls().open(Artifact.from_dict(job["artifact"]), job["threads"])
    except RuntimeUnavailable as exc:
        Path(job["result"]).write_text(json.dumps({"unavailable": exc.reason}))
        return
    with session_cm as session:
        extra, host = encoded.get("outputs"), not session.states
        session.reset_states()
        forced = decode(session.run, geo, prompt, n, forced=tuple(job["reference_tokens"]),
                        extra=extra, host_cache=host)
        session.reset_states()
        free = decode(session.run, geo, prompt, n, extra=extra,  # warm: forced ran first
                      host_cache=host)
        np.savez(job["outputs"], forced_logits=forced.logits, free_logits=free.logits)
        Path(job["result"]).write_text(json.dumps({
            "free_tokens": free.tokens, "step_ms": free.step_ms,
            "encoder_ms": encoded.get("ms"), "runtime": session.runtime or cls.name,
            "latency_unavailable": session.latency_unavailable,
            "states": [[s.name, list(s.shape), s.dtype] for s in session.states]}))


def _growing_child(cls: Any, job: dict[str, Any]) -> None:
    """An Optimum encoder-decoder set's artifacts (``job["growing"]``: role -> artifact, the
    encoder's in ``job["encoder"]``), stepped by decode_growing, forced then free."""
    from contextlib import ExitStack

    from mtconvert.backends.base import Artifact
    from mtconvert.errors import RuntimeUnavailable

    arts = {"encoder": job["encoder"]["artifact"], **job["growing"]}
    with np.load(job["encoder"]["feeds"]) as data:
        feeds = {k: data[k] for k in data.files}
    prompt, n = tuple(job["prompt"]), job["new_tokens"]
    with ExitStack() as stack:
        try:
            sessions = {role: stack.enter_context(cls().open(Artifact.from_dict(a),
                                                             job["threads"]))
                        for role, a in arts.items()}
        except RuntimeUnavailable as exc:
            Path(job["result"]).write_text(json.dumps({"unavailable": exc.reason}))
            return
        runs = {role: s.run for role, s in sessions.items()}
        takes = {role: {t.name: tuple(t.shape) for t in s.inputs}
                 for role, s in sessions.items()}
        forced, _ = decode_growing(runs, takes, feeds, prompt, n,
                                   forced=tuple(job["reference_tokens"]))
        free, enc_ms = decode_growing(runs, takes, feeds, prompt, n)  # warm: forced ran first
        session = sessions["with_past"]
        np.savez(job["outputs"], forced_logits=forced.logits, free_logits=free.logits)
        Path(job["result"]).write_text(json.dumps({
            "free_tokens": free.tokens, "step_ms": free.step_ms, "encoder_ms": enc_ms,
            "runtime": session.runtime or cls.name,
            "latency_unavailable": session.latency_unavailable}))


def _encode(cls: Any, job: dict[str, Any], threads: int) -> dict[str, Any]:
    """The encoder artifact run on the encoder input: its outputs (by name) and the time of
    a warm run (the second of two)."""
    from mtconvert.backends.base import Artifact

    with np.load(job["feeds"]) as data:
        feeds = {k: data[k] for k in data.files}
    with cls().open(Artifact.from_dict(job["artifact"]), threads) as session:
        session.run(feeds)
        t0 = time.perf_counter()
        out = session.run(feeds)
        ms = (time.perf_counter() - t0) * 1000.0
    return {"outputs": {k: np.asarray(v, np.float32) for k, v in out.items()}, "ms": ms}


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
