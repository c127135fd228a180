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
import threading
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
        if job.get("serve"):
            _serve(session, feeds, baseline, session.runtime or cls.name)
            return
        if job.get("profile"):
            _profile(session, feeds, job["profile"], Path(job["result"]))
            return
        if job.get("chunk"):  # a dataset: items in chunks of the artifact's batch
            outputs = _chunked(session, feeds, job["chunk"])
            np.savez(job["outputs"], **outputs)
            Path(job["result"]).write_text(json.dumps({
                "latency": {}, "latency_unavailable": "dataset run",
                "peak_rss_mb": _peak_rss_mb(), "baseline_rss_mb": baseline,
                "runtime": session.runtime or cls.name}))
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


def _chunked(session: Any, feeds: dict[str, np.ndarray], chunk: int) -> dict[str, np.ndarray]:
    """Run every item of ``feeds`` (stacked on axis 0) in chunks of ``chunk`` items, the last one
    padded with copies of its last item; the outputs stacked back, padding dropped."""
    n = next(iter(feeds.values())).shape[0]
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, chunk):
        take = {k: v[start:start + chunk] for k, v in feeds.items()}
        short = chunk - next(iter(take.values())).shape[0]
        if short:
            take = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)])
                    for k, v in take.items()}
        for name, value in session.run(take).items():
            parts.setdefault(name, []).append(value[:chunk - short])
    return {k: np.concatenate(v) for k, v in parts.items()}


def _profile(session: Any, feeds: dict[str, np.ndarray], runs: int, result: Path) -> None:
    """--profile: the session's per-operator times, or why it has none, as result JSON."""
    ops = session.profile(feeds, runs)
    result.write_text(json.dumps(
        {"unavailable": session.profile_unavailable} if ops is None else
        {"ops": [[o.name, o.op_type, o.ms] for o in ops], "runtime": session.runtime}))


def run_profile(*, name: str, backend: str, artifact: dict[str, Any],
                feeds: dict[str, np.ndarray], threads: int, runs: int,
                timeout_s: float | None) -> dict[str, Any]:
    """Profile the artifact in a child: {"ops": [[name, op_type, ms], ...]} or
    {"unavailable": reason}; RuntimeFailure on crash or time-out."""
    from mtconvert.backends.process import tail
    from mtconvert.errors import RuntimeFailure

    with tempfile.TemporaryDirectory(prefix="mtconvert-profile-") as tmp:
        t = Path(tmp)
        np.savez(t / "feeds.npz", **feeds)
        job = {"name": name, "backend": backend, "artifact": artifact, "threads": threads,
               "feeds": str(t / "feeds.npz"), "profile": runs, "result": str(t / "result.json")}
        proc = _spawn(t, job, name, "profile", timeout_s)
        if proc.returncode != 0 or not (t / "result.json").is_file():
            raise RuntimeFailure(_crash_reason(proc), target=name, step="profile",
                                 stderr_tail=tail(proc.stderr))
        return json.loads((t / "result.json").read_text())


READY, SAMPLES, SAVED = "MTCONVERT-READY", "MTCONVERT-SAMPLES ", "MTCONVERT-SAVED"
OUTPUTS = "outputs "  # a command: write the first run's outputs and result into a folder


def _serve(session: Any, feeds: dict[str, np.ndarray], baseline: float, runtime: str) -> None:
    """Keep the session warm for interleaved timing: each line ``N`` on stdin runs N timed
    inferences and answers one ``MTCONVERT-SAMPLES [ms, ...]`` line; ``outputs DIR`` writes
    the first run's outputs.npz and result.json (as a one-off run's) into DIR and answers
    ``MTCONVERT-SAVED``; anything else ends."""
    import time

    first = session.run(feeds)
    result = {"latency": {}, "latency_unavailable": session.latency_unavailable,
              "peak_rss_mb": _peak_rss_mb(), "baseline_rss_mb": baseline, "runtime": runtime}
    print(READY, flush=True)
    for line in sys.stdin:
        if line.startswith(OUTPUTS):
            folder = Path(line[len(OUTPUTS):].strip())
            np.savez(folder / "outputs.npz", **first)
            (folder / "result.json").write_text(json.dumps(result))
            print(SAVED, flush=True)
            continue
        if not line.strip().isdigit():
            break
        samples = []
        for _ in range(int(line)):
            t0 = time.perf_counter()
            session.run(feeds)
            samples.append((time.perf_counter() - t0) * 1000.0)
        print(SAMPLES + json.dumps(samples), flush=True)


class WarmSession:
    """A session opened once in its own child process and kept warm; ``time(n)`` runs it n times
    and returns the milliseconds. For timing two sessions in alternating rounds, so that a
    change of machine load or CPU state lands on both sides."""

    def __init__(self, *, name: str, backend: str, artifact: dict[str, Any],
                 feeds: dict[str, np.ndarray], threads: int, timeout_s: float | None):
        self._tmp = tempfile.TemporaryDirectory(prefix="mtconvert-warm-")
        t = Path(self._tmp.name)
        np.savez(t / "feeds.npz", **feeds)
        job = {"name": name, "backend": backend, "artifact": artifact,
               "feeds": str(t / "feeds.npz"), "threads": threads, "serve": True,
               "result": str(t / "result.json")}
        (t / "job.json").write_text(json.dumps(job))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.name, self.timeout_s = name, timeout_s
        self._stderr = (t / "stderr.txt").open("w")
        self._proc = subprocess.Popen([sys.executable, "-m", "mtconvert.worker",
                                       str(t / "job.json")], env=env, text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr)
        self._ready = False  # before READY a failure is the run's, after it the timing's
        self._expect(READY)
        self._ready = True

    def time(self, n: int) -> list[float]:
        self._proc.stdin.write(f"{n}\n")
        self._proc.stdin.flush()
        return json.loads(self._expect(SAMPLES))

    def result(self) -> SessionResult:
        """The outputs of the session's first run and its memory, as run_session's: one child
        both validates and is timed."""
        folder = Path(self._tmp.name)
        self._proc.stdin.write(f"{OUTPUTS}{folder}\n")
        self._proc.stdin.flush()
        self._expect(SAVED)
        result = json.loads((folder / "result.json").read_text())
        with np.load(folder / "outputs.npz") as data:
            outputs = {k: data[k] for k in data.files}
        return SessionResult(outputs, {}, result["peak_rss_mb"], result["baseline_rss_mb"],
                             result["runtime"], result.get("latency_unavailable"))

    def _expect(self, prefix: str) -> str:
        """The rest of the next stdout line starting with ``prefix`` (runtimes may print)."""
        import selectors

        from mtconvert.errors import RuntimeFailure

        sel = selectors.DefaultSelector()
        sel.register(self._proc.stdout, selectors.EVENT_READ)
        while True:
            if not sel.select(self.timeout_s):
                self.close()
                raise RuntimeFailure(f"timed out after {self.timeout_s:g} s", target=self.name,
                                     step="latency" if self._ready else "run")
            line = self._proc.stdout.readline()
            if not line:
                self._raise_exited()
            if line.startswith(prefix):
                return line[len(prefix):].strip()

    def _raise_exited(self) -> None:
        """The child ended: RuntimeUnavailable if the runtime cannot run here (the child said
        so), else RuntimeFailure with the reason from its stderr."""
        from mtconvert.errors import RuntimeFailure, RuntimeUnavailable

        said = Path(self._tmp.name) / "result.json"
        unavailable = json.loads(said.read_text()).get("unavailable") if said.is_file() else None
        self._proc.wait()
        self._stderr.flush()
        err = (Path(self._tmp.name) / "stderr.txt").read_text(errors="replace")
        code = self._proc.returncode
        self.close()
        if unavailable:
            raise RuntimeUnavailable(unavailable, target=self.name)
        proc = subprocess.CompletedProcess([], code, "", err)
        raise RuntimeFailure("the runtime exited while being timed" if code == 0
                             else _crash_reason(proc), target=self.name,
                             step="latency" if self._ready else "run")

    def close(self) -> None:
        """Tell the child to quit and go on: it is reaped in the background (its interpreter
        takes 0.1-0.2 s to wind down; killed if it has not after 10 s)."""
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write("quit\n")
                self._proc.stdin.close()
            except OSError:
                pass
            threading.Thread(target=_reap, args=(self._proc,), daemon=True).start()
        self._stderr.close()
        self._tmp.cleanup()

    def __enter__(self) -> WarmSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


def _reap(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_session(*, name: str, backend: str, artifact: dict[str, Any],
                feeds: dict[str, np.ndarray], threads: int, warmup: int, iterations: int,
                timeout_s: float | None, intermediates: Path | None = None,
                chunk: int | None = None) -> SessionResult:
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
               "intermediates": str(intermediates) if intermediates else None,
               "chunk": chunk}
        proc = _spawn(t, job, name, "run", timeout_s)
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


def _spawn(folder: Path, job: dict[str, Any], name: str, step: str,
           timeout_s: float | None) -> subprocess.CompletedProcess:
    """One job in a worker child (``folder/job.json``), to its end; RuntimeFailure on a
    time-out. The caller reads the result files and the exit code."""
    from mtconvert.errors import RuntimeFailure

    (folder / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        return subprocess.run([sys.executable, "-m", "mtconvert.worker", str(folder / "job.json")],
                              env=env, capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RuntimeFailure(f"timed out after {timeout_s:g} s", target=name,
                             step=step) from None


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
