"""Latency a gate can trust: the target and the reference timed in alternating rounds, each in
its own warm session, so that a change of machine load or CPU state lands on both sides; warmed
up until two rounds agree. The statistics are validators.latency.interleaved."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from mtconvert.backends.base import Artifact, Backend, PreparedSource, import_path
from mtconvert.options import ConvertOptions
from mtconvert.validators import latency
from mtconvert.worker import SessionResult, WarmSession

Timer = Callable[[int], list[float]]  # n -> milliseconds of n inferences
MAX_WARMUP_ROUNDS = 6
MAX_ROUNDS = 30  # a noisy machine gets up to this many rounds before the ratio is reported noisy
ROUND_MS = 25.0  # a round lasts at least this long per side: sub-millisecond models get more
MAX_PER_ROUND = 200  # inferences per round, so their timer resolution and jitter average out


def rounds_for(opts: ConvertOptions) -> tuple[int, int]:
    """(rounds, inferences per round per side) for ``iterations`` timed runs per side."""
    rounds = max(2, min(opts.iterations, 10))
    return rounds, max(1, -(-opts.iterations // rounds))


def interleave(ref: Timer, tgt: Timer, opts: ConvertOptions) -> tuple[list, list, int]:
    """Warm both sides up (``warmup`` runs, then rounds until two agree), then time them in
    alternating rounds, the order swapped every round (ABBA) so neither always goes first. A
    round runs each side at least ``iterations / rounds`` times and at least ROUND_MS long;
    while the ratio's interval is too wide to tell a 10 % change, rounds are added (up to
    MAX_ROUNDS)."""
    rounds, per = rounds_for(opts)
    if opts.warmup:
        ref(opts.warmup), tgt(opts.warmup)
    seen: dict[str, list[float]] = {"ref": [], "tgt": []}
    for _ in range(MAX_WARMUP_ROUNDS):
        seen["ref"].append(float(np.median(ref(per))))
        seen["tgt"].append(float(np.median(tgt(per))))
        if latency.stable(seen["ref"]) and latency.stable(seen["tgt"]):
            break
    slowest = max(seen["ref"][-1], seen["tgt"][-1], 1e-3)
    per = min(MAX_PER_ROUND, max(per, int(np.ceil(ROUND_MS / slowest))))
    ref_rounds: list[list[float]] = []
    tgt_rounds: list[list[float]] = []
    while len(ref_rounds) < rounds or (len(ref_rounds) < MAX_ROUNDS and latency.interleaved(
            ref_rounds, tgt_rounds)["noisy"]):  # more rounds until the ratio is clear
        first, second = (tgt, ref) if len(ref_rounds) % 2 else (ref, tgt)
        a, b = first(per), second(per)
        ref_rounds.append(a if first is ref else b)
        tgt_rounds.append(b if first is ref else a)
    return ref_rounds, tgt_rounds, len(seen["ref"])


@contextlib.contextmanager
def reference_timer(src: PreparedSource, feeds: dict[str, np.ndarray],
                    opts: ConvertOptions) -> Iterator[Timer]:
    """The source's reference, warm: ONNX Runtime in its own child, or the PyTorch module in
    this process (it lives here)."""
    if src.format == "torch" and src.torch_module is not None:
        yield _torch_timer(src, feeds, opts.threads)
        return
    with _ort_reference(src, feeds, opts) as warm:
        yield warm.time


def _ort_reference(src: PreparedSource, feeds: dict[str, np.ndarray],
                   opts: ConvertOptions) -> WarmSession:
    artifact = Artifact(target="reference", primary=src.onnx_path, files=(src.onnx_path,))
    return WarmSession(name="reference", backend="mtconvert.reference:OrtReference",
                       artifact=artifact.to_dict(), feeds=feeds, threads=opts.threads,
                       timeout_s=opts.timeout_s)


def _torch_timer(src: PreparedSource, feeds: dict[str, np.ndarray], threads: int) -> Timer:
    import torch

    from mtconvert import torch_source

    torch.set_num_threads(threads)
    torch_source.eval_mode(src.torch_module)

    def timer(n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            torch_source.run(src.torch_module, feeds)
            out.append((time.perf_counter() - t0) * 1000.0)
        return out
    return timer


class SharedReference:
    """The reference's warm timer, opened at first use and kept for every target of a run
    (targets are timed one after another, under the validation lock): one reference child per
    run instead of one per target. ``close()`` ends it."""

    def __init__(self, src: PreparedSource, feeds: dict[str, np.ndarray], opts: ConvertOptions):
        self._args = (src, feeds, opts)
        self._stack = contextlib.ExitStack()
        self._timer: Timer | None = None
        self._warm: WarmSession | None = None

    @contextlib.contextmanager
    def timer(self) -> Iterator[Timer]:
        """The shared timer; if timing with it fails, it is closed (the next use reopens it)."""
        try:
            yield self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> Timer:
        src, feeds, opts = self._args
        if self._timer is None and src.format == "torch" and src.torch_module is not None:
            self._timer = _torch_timer(src, feeds, opts.threads)
        elif self._timer is None:
            self._warm = self._stack.enter_context(_ort_reference(src, feeds, opts))
            self._timer = self._warm.time
        return self._timer

    def ort_run(self, warmup: int, iterations: int) -> tuple[SessionResult, list[float]]:
        """An ONNX source's reference run from the shared child: the outputs of its first run
        and ``iterations`` timed runs after ``warmup`` untimed ones (the reference's own
        latency; its child then serves the targets' timings)."""
        assert self._args[0].format == "onnx", "the ORT reference of an ONNX source only"
        try:
            self._open()
            result = self._warm.result()
            if warmup:
                self._warm.time(warmup)
            return result, self._warm.time(iterations)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._timer = self._warm = None
        self._stack.close()


def target_session(backend: Backend, artifact: Artifact, feeds: dict[str, np.ndarray],
                   opts: ConvertOptions) -> WarmSession:
    """The artifact opened warm in its own child (``.result()``: its outputs, for validation;
    ``.time(n)``: for timing)."""
    return WarmSession(name=backend.name, backend=import_path(type(backend)),
                       artifact=artifact.to_dict(), feeds=feeds, threads=opts.threads,
                       timeout_s=opts.timeout_s)


def versus_reference(src: PreparedSource, backend: Backend, artifact: Artifact,
                     feeds: dict[str, np.ndarray], opts: ConvertOptions, *,
                     reference: SharedReference | None = None,
                     target: WarmSession | None = None) -> dict[str, Any]:
    """The target's latency against the reference's, timed interleaved: the statistics of
    validators.latency.interleaved plus the target's samples and the warm-up rounds it took.
    ``reference``: a run's shared reference (else one is opened for this target alone);
    ``target``: the artifact's session, already open (else one is opened and closed here)."""
    with contextlib.ExitStack() as stack:
        ref = stack.enter_context(reference.timer() if reference is not None
                                  else reference_timer(src, feeds, opts))
        tgt = target or stack.enter_context(target_session(backend, artifact, feeds, opts))
        ref_rounds, tgt_rounds, warm = interleave(ref, tgt.time, opts)
    stats = latency.interleaved(ref_rounds, tgt_rounds)
    return stats | {"warmup_rounds": warm,
                    "target_samples_ms": [round(x, 4) for r in tgt_rounds for x in r]}
