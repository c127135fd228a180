"""Matrix mode: every model x target x precision cell of a matrix file (converter/matrix_spec.py),
each a convert run of its own (``convert.run``), gathered into one MatrixReport.

Each cell runs in a child process of its own process group (``run_isolated``): a cell whose
worker is killed (the out-of-memory killer), crashes or outlives ``cell_timeout`` is that cell's
``error``, its processes (the converters' and runtimes' children included) are killed with it,
and the other cells finish. Executors:

- ``local`` (default): up to ``jobs`` cells at once on this machine;
- ``ray``: each cell a Ray task with its own resources (``num_cpus``, ``memory``) on the
  cluster at ``ray_address``, or on a local instance with a small budget; the task runs the
  same isolated child, so a time-out or a cancel kills the cell's whole process group.

Results are gathered as cells finish and written at once, atomically, one file per cell under
``OUT/cells/``; ``resume`` keeps the cells whose file is there for the same cell (same model
file, target, precision, options). Ctrl-C stops every running cell's processes and re-raises.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mtconvert.errors import MtConvertError, UsageError
from mtconvert.matrix_report import Cell, MatrixReport
from mtconvert.matrix_spec import CellSpec, MatrixSpec, build_options
from mtconvert.registry import Registry
from mtconvert.version import __version__

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class Event:
    """Progress: a cell started (``cell`` None) or finished; ``done`` of ``total`` finished."""

    kind: str  # "start" | "done" | "resumed"
    id: str
    done: int
    total: int
    cell: Cell | None = None


MatrixProgress = Callable[[Event], None]


@dataclass(frozen=True)
class MatrixOptions:
    out_dir: Path = Path("build/matrix")
    executor: str = "local"
    jobs: int | None = None  # cells at once (default: cores, at most 4; Ray: its CPUs / cpus)
    resume: bool = False
    cell_timeout: float | None = None  # seconds; None: 4 x the cell's --timeout + 120
    ray_address: str | None = None
    cpus_per_cell: float = 1.0
    memory_per_cell: int | None = None  # bytes (Ray's ``memory`` resource)

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise UsageError(f"unknown executor {self.executor!r}; choose one of "
                             f"{', '.join(EXECUTORS)}")
        if self.jobs is not None and self.jobs < 1:
            raise UsageError("--jobs must be at least 1")
        if self.cell_timeout is not None and self.cell_timeout <= 0:
            raise UsageError("--cell-timeout must be positive")
        if self.cpus_per_cell <= 0:
            raise UsageError("--cpus-per-cell must be positive")


def run(spec: MatrixSpec, mopts: MatrixOptions, *, registry: Registry | None = None,
        progress: MatrixProgress | None = None) -> MatrixReport:
    say = progress or (lambda _e: None)
    t0 = time.monotonic()
    cells_dir = Path(mopts.out_dir) / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    if not mopts.resume:
        for old in cells_dir.glob("*.json"):
            old.unlink()
    results: dict[str, Cell] = {}
    todo: list[CellSpec] = []
    for c in spec.cells:
        kept = _finished(c, cells_dir) if mopts.resume else None
        if kept is not None:
            results[c.id] = kept
        else:
            todo.append(c)
    total = len(spec.cells)
    for c in spec.cells:
        if c.id in results:
            say(Event("resumed", c.id, len(results), total, results[c.id]))

    def finished(c: CellSpec, record: dict[str, Any]) -> None:
        _write_atomic(cells_dir / c.file_name, json.dumps(record, allow_nan=False))
        cell = Cell.from_dict(record["cell"])
        results[c.id] = cell
        say(Event("done", c.id, len(results), total, cell))

    def started(c: CellSpec) -> None:
        say(Event("start", c.id, len(results), total))

    if todo:
        if mopts.executor == "ray":
            _run_ray(todo, mopts, registry, started, finished)
        else:
            _run_local(todo, mopts, registry, started, finished)
    settings = {"matrix": str(spec.file), "executor": mopts.executor,
                "jobs": mopts.jobs, "out_dir": str(mopts.out_dir), "resume": mopts.resume,
                "cell_timeout": mopts.cell_timeout, "resumed_cells": total - len(todo),
                "raw": any(c.raw for c in spec.cells)}
    if mopts.executor == "ray":
        settings |= {"ray_address": mopts.ray_address, "cpus_per_cell": mopts.cpus_per_cell,
                     "memory_per_cell": mopts.memory_per_cell}
    report = MatrixReport(tuple(results[c.id] for c in spec.cells), settings,
                          round(time.monotonic() - t0, 2), __version__,
                          _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    _write_atomic(Path(mopts.out_dir) / "matrix.json", report.to_json())
    return report


# --- one cell ------------------------------------------------------------------------------
def run_cell(cell: CellSpec, registry: Registry | None = None) -> dict[str, Any]:
    """The cell in this process: its record ({key, cell, report}); never raises for a cell's
    own trouble (an unreadable model is the cell's error). A raw cell runs in converter/raw.py."""
    from mtconvert.run import convert

    if cell.raw:
        from mtconvert import raw

        return raw.run_cell(cell, registry)
    t0 = time.monotonic()
    try:
        opts = build_options(cell, registry)
        report = convert.run(Path(cell.path), opts, registry=registry)
    except MtConvertError as exc:
        return _error_record(cell, str(exc), time.monotonic() - t0)
    except Exception as exc:  # a bug: the cell's error, with what it was
        return _error_record(cell, f"internal error: {type(exc).__name__}: {exc}",
                             time.monotonic() - t0)
    target = next(iter(report.targets.values()))
    ref = report.reference
    out = Cell(cell.model, cell.target, cell.precision, target.status, target.reason, target,
               None, cell.path, cell.task, round(time.monotonic() - t0, 2),
               ref.latency.p50_ms if ref and ref.latency else None)
    return {"key": cell.key(), "cell": out.to_dict(), "report": report.to_dict()}


def run_isolated(cell: CellSpec, registry: Registry | None, timeout: float | None,
                 stop: threading.Event | None = None) -> dict[str, Any] | None:
    """The cell in a child process of its own process group. A dead child or a time-out is
    the cell's error record; ``stop`` set (or KeyboardInterrupt) kills the group and returns
    None (or re-raises)."""
    import multiprocessing as mp

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mtconvert-cell-") as tmp:
        result = Path(tmp) / "record.json"
        proc = mp.get_context("spawn").Process(target=_child, args=(cell, registry, result),
                                               name=f"mtconvert-cell {cell.id}", daemon=True)
        proc.start()
        try:
            while True:
                proc.join(0.2)
                if proc.exitcode is not None:
                    break
                if stop is not None and stop.is_set():
                    _kill_group(proc)
                    return None
                if timeout is not None and time.monotonic() - t0 > timeout:
                    _kill_group(proc)
                    return _error_record(cell, f"the cell timed out after {timeout:g} s (its "
                                         "processes were killed)", time.monotonic() - t0)
        except BaseException:
            _kill_group(proc)
            raise
        _kill_group(proc)  # a runtime child left behind by a killed cell process
        if result.is_file():
            return json.loads(result.read_text())
        return _error_record(cell, _death(proc.exitcode), time.monotonic() - t0)


def _child(cell: CellSpec, registry: Registry | None, result: Path) -> None:
    os.setpgrp()  # the cell's group: killed whole on time-out, Ctrl-C or a dead cell
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    record = run_cell(cell, registry)
    _write_atomic(result, json.dumps(record, allow_nan=False))


def _kill_group(proc: Any) -> None:
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group outlives a dead leader
    except (ProcessLookupError, PermissionError):
        pass
    for p in family:  # not yet in the group (the child had not called setpgrp)
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.join(5)


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        sig = signal.Signals(-exitcode).name
        why = " (the out-of-memory killer sends it)" if sig == "SIGKILL" else ""
        return f"the cell's worker died of {sig}{why}"
    return f"the cell's worker exited with code {exitcode} without a result"


def _error_record(cell: CellSpec, error: str, seconds: float) -> dict[str, Any]:
    line = error.strip().splitlines()[0] if error.strip() else "unknown error"
    out = Cell(cell.model, cell.target, cell.precision, "error", line, None, line, cell.path,
               cell.task, round(seconds, 2), raw=cell.raw)
    return {"key": cell.key(), "cell": out.to_dict(), "report": None}


def _finished(cell: CellSpec, cells_dir: Path) -> Cell | None:
    """The cell as an earlier run left it, if that run ran the same cell."""
    path = cells_dir / cell.file_name
    try:
        record = json.loads(path.read_text())
        if record.get("key") != cell.key():
            return None
        return replace(Cell.from_dict(record["cell"]), resumed=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _timeout(cell: CellSpec, mopts: MatrixOptions) -> float | None:
    if mopts.cell_timeout is not None:
        return mopts.cell_timeout
    step = cell.values.get("timeout", 900.0)
    return None if step is None else 4 * float(step) + 120


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


# --- executors -----------------------------------------------------------------------------
def _local_jobs(mopts: MatrixOptions) -> int:
    return mopts.jobs or max(1, min(4, os.cpu_count() or 1))


def _run_local(todo: list[CellSpec], mopts: MatrixOptions, registry: Registry | None,
               started: Callable[[CellSpec], None],
               finished: Callable[[CellSpec, dict[str, Any]], None]) -> None:
    stop = threading.Event()
    jobs = min(_local_jobs(mopts), len(todo))
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="mtconvert-cell")

    def one(c: CellSpec) -> dict[str, Any] | None:
        if stop.is_set():
            return None
        started(c)
        return run_isolated(c, registry, _timeout(c, mopts), stop)

    try:
        futures = {pool.submit(one, c): c for c in todo}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for f in done:
                record = f.result()
                if record is not None:
                    finished(futures[f], record)
    except BaseException:  # Ctrl-C: every running cell's group is killed, none starts
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)


def ray_cell(cell: dict[str, Any], registry: Registry | None,
             timeout: float | None) -> dict[str, Any]:
    """A Ray task: the cell in its isolated child. ``ray.cancel`` raises KeyboardInterrupt
    here, which kills the cell's process group."""
    spec = CellSpec(**cell)
    record = run_isolated(spec, registry, timeout)
    assert record is not None
    return record


def _run_ray(todo: list[CellSpec], mopts: MatrixOptions, registry: Registry | None,
             started: Callable[[CellSpec], None],
             finished: Callable[[CellSpec, dict[str, Any]], None]) -> None:
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray needs Ray: pip install 'mtconvert[ray]'") from None
    ours = not ray.is_initialized()
    if ours:
        quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
        if mopts.ray_address:
            ray.init(address=mopts.ray_address, **quiet)
        else:  # a small local instance: the cells' CPUs, no dashboard
            ray.init(num_cpus=max(1, int(_local_jobs(mopts) * mopts.cpus_per_cell + 0.999)),
                     include_dashboard=False, object_store_memory=100 * 2**20, **quiet)
    try:
        cluster_cpus = float(ray.cluster_resources().get("CPU", 1))
        jobs = mopts.jobs or max(1, int(cluster_cpus // mopts.cpus_per_cell))
        task = ray.remote(max_retries=0)(ray_cell)
        resources: dict[str, Any] = {"num_cpus": mopts.cpus_per_cell}
        if mopts.memory_per_cell:
            resources["memory"] = mopts.memory_per_cell
        queue, running = list(todo), {}
        try:
            while queue or running:
                while queue and len(running) < jobs:
                    c = queue.pop(0)
                    started(c)
                    ref = task.options(name=f"mtconvert-cell {c.id}", **resources).remote(
                        c.to_dict(), registry, _timeout(c, mopts))
                    running[ref] = (c, time.monotonic())
                done, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
                for ref in done:
                    c, t0 = running.pop(ref)
                    finished(c, _ray_result(ray, ref, c, time.monotonic() - t0))
        except BaseException:  # Ctrl-C: each task kills its cell's group, then force
            for ref in running:
                ray.cancel(ref)
            ray.wait(list(running), num_returns=len(running), timeout=10)
            for ref in running:
                ray.cancel(ref, force=True)
            raise
    finally:
        if ours:
            ray.shutdown()


def _ray_result(ray: Any, ref: Any, cell: CellSpec, seconds: float) -> dict[str, Any]:
    try:
        return ray.get(ref)
    except ray.exceptions.OutOfMemoryError:
        return _error_record(cell, "Ray killed the cell's worker: out of memory", seconds)
    except ray.exceptions.WorkerCrashedError:
        return _error_record(cell, "the cell's Ray worker died (killed, out of memory or "
                             "crashed)", seconds)
    except ray.exceptions.RayError as exc:
        text = " ".join(str(exc).split())
        return _error_record(cell, f"Ray: {type(exc).__name__}: {text[:300]}", seconds)


# --- progress --------------------------------------------------------------------------------
def line_progress(stream: Any) -> MatrixProgress:
    """One line per finished cell (logs, pipes)."""
    def show(e: Event) -> None:
        if e.kind == "start" or e.cell is None:
            return
        c = e.cell
        how = "kept from the earlier run" if e.kind == "resumed" else f"{c.seconds:.1f} s"
        why = f": {c.reason}" if c.reason and c.status != "passed" else ""
        print(f"[{e.done}/{e.total}] {c.id} {c.status} ({how}){why}"[:300], file=stream,
              flush=True)
    return show


class RichProgress:
    """A rich progress bar on a terminal (stderr), with the cells running and each result."""

    def __init__(self, total: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self.console = Console(stderr=True, highlight=False)
        self.bar = Progress("[progress.description]{task.description}", BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(), console=self.console,
                            transient=True)
        self.task = self.bar.add_task("matrix", total=total)
        self.running: list[str] = []
        self._lock = threading.Lock()  # cells start from the pool's threads

    def __enter__(self) -> RichProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, e: Event) -> None:
        with self._lock:
            self._show(e)

    def _show(self, e: Event) -> None:
        from rich.markup import escape

        if e.kind == "start":
            self.running.append(e.id)
        else:
            if e.id in self.running:
                self.running.remove(e.id)
            c = e.cell
            style = {"passed": "green", "failed": "red", "error": "magenta"}.get(c.status,
                                                                                  "yellow")
            self.bar.console.print(f"[{style}]{c.status:7}[/] {escape(c.id)} "
                                   f"[dim]{'(kept)' if e.kind == 'resumed' else f'{c.seconds:.1f} s'}[/]")
            self.bar.update(self.task, completed=e.done)
        self.bar.update(self.task, description="running " + ", ".join(self.running[:3])
                        + (" ..." if len(self.running) > 3 else "") if self.running
                        else "matrix")
