"""Run a target's session in a child process: ``python -m mtconvert.worker JOB.json``.

Third-party runtimes can segfault or hang; in a child that becomes the target's error, never a
dead mtconvert. The child also gives an honest peak resident memory for the runtime.
The job names the backend by import path, so any registered backend works here.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class SessionResult:
    outputs: dict[str, np.ndarray]
    latency: dict[str, Any]
    peak_rss_mb: float
    baseline_rss_mb: float
    runtime: str
    latency_unavailable: str | None = None  # why latency was not measured (latency is {})


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _child(job_path: Path) -> None:
    from mtconvert.backends.base import Artifact
    from mtconvert.errors import RuntimeUnavailable
    from mtconvert.registry import BackendEntry
    from mtconvert.validators.latency import measure

    job = json.loads(job_path.read_text())
    cls = BackendEntry(job["name"], job["backend"]).load()
    artifact = Artifact.from_dict(job["artifact"])
    with np.load(job["feeds"]) as data:
        feeds = {k: data[k] for k in data.files}
    baseline = _rss_mb()
    try:
        session_cm = cls().open(artifact, job["threads"])
    except RuntimeUnavailable as exc:
        Path(job["result"]).write_text(json.dumps({"unavailable": exc.reason}))
        return
    with session_cm as session:
        if job.get("intermediates"):
            _dump_intermediates(session, feeds, Path(job["intermediates"]))
            return
        outputs = session.run(feeds)
        no_latency = session.latency_unavailable
        stats = None if no_latency else measure(lambda: session.run(feeds),
                                                warmup=job["warmup"], iterations=job["iterations"])
        runtime = session.runtime or cls.name
    np.savez(job["outputs"], **outputs)
    Path(job["result"]).write_text(json.dumps({
        "latency": stats.to_dict() if stats else {}, "latency_unavailable": no_latency,
        "peak_rss_mb": _peak_rss_mb(), "baseline_rss_mb": baseline,
        "runtime": runtime}))


MAX_DUMP_BYTES = 2 * 2**30  # intermediate tensors kept for localization, at most


def _dump_intermediates(session: Any, feeds: dict[str, np.ndarray], folder: Path) -> None:
    """The session's intermediate tensors as folder/tensors.npz (t0, t1, ...) and their
    (name, op type) in folder/index.json, up to MAX_DUMP_BYTES."""
    try:
        found = session.intermediates(feeds)
    except NotImplementedError as exc:
        (folder / "index.json").write_text(json.dumps({"unavailable": str(exc)}))
        return
    kept, total = [], 0
    for name, op_type, value in found:
        total += value.nbytes
        if total > MAX_DUMP_BYTES:
            break
        kept.append((name, op_type, value))
    np.savez(folder / "tensors.npz", **{f"t{i}": v for i, (_, _, v) in enumerate(kept)})
    (folder / "index.json").write_text(json.dumps({
        "tensors": [[n, t] for n, t, _ in kept], "truncated": len(kept) < len(found)}))


def run_session(*, name: str, backend: str, artifact: dict[str, Any],
                feeds: dict[str, np.ndarray], threads: int, warmup: int, iterations: int,
                timeout_s: float | None, intermediates: Path | None = None) -> SessionResult:
    """Open the artifact and run it in a child; raise RuntimeFailure on crash or time-out.
    With ``intermediates`` (a folder), the child only writes the session's intermediate
    tensors there (see _dump_intermediates) and the result has no outputs."""
    from mtconvert.backends.process import tail
    from mtconvert.errors import RuntimeFailure, RuntimeUnavailable

    with tempfile.TemporaryDirectory(prefix="mtconvert-worker-") as tmp:
        t = Path(tmp)
        np.savez(t / "feeds.npz", **feeds)
        job = {"name": name, "backend": backend, "artifact": artifact,
               "feeds": str(t / "feeds.npz"), "threads": threads, "warmup": warmup,
               "iterations": iterations, "outputs": str(t / "outputs.npz"),
               "result": str(t / "result.json"),
               "intermediates": str(intermediates) if intermediates else None}
        (t / "job.json").write_text(json.dumps(job))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            proc = subprocess.run([sys.executable, "-m", "mtconvert.worker", str(t / "job.json")],
                                  env=env, capture_output=True, text=True, timeout=timeout_s,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise RuntimeFailure(f"timed out after {timeout_s:g} s", target=name,
                                 step="run") from None
        if intermediates and proc.returncode == 0 and (intermediates / "index.json").is_file():
            return SessionResult({}, {}, 0.0, 0.0, name)
        if proc.returncode != 0 or not (t / "result.json").is_file():
            raise RuntimeFailure(_crash_reason(proc), target=name, step="run",
                                 stderr_tail=tail(proc.stderr))
        result = json.loads((t / "result.json").read_text())
        if "unavailable" in result:
            raise RuntimeUnavailable(result["unavailable"], target=name)
        with np.load(t / "outputs.npz") as data:
            outputs = {k: data[k] for k in data.files}
    return SessionResult(outputs, result["latency"], result["peak_rss_mb"],
                         result["baseline_rss_mb"], result["runtime"],
                         result.get("latency_unavailable"))


def _crash_reason(proc: subprocess.CompletedProcess) -> str:
    import signal

    if proc.returncode < 0:
        try:
            sig = signal.Signals(-proc.returncode).name
        except ValueError:
            sig = f"signal {-proc.returncode}"
        return f"the runtime crashed ({sig})"
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else f"the runtime exited with code {proc.returncode}"


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
