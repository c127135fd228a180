"""ExecuTorch's event tracer (ETDump). A second load of the .pte with ``enable_etdump=True``
records, per ``Method::execute``, one profiling event per instruction: ``OPERATOR_CALL`` for a
kernel call (with an inner ``native_call_<op>`` event naming the kernel) and ``DELEGATE_CALL``
for a delegate blob. The pip wheel's XNNPACK delegate also logs its own operators inside the
call ("Fully Connected (NC, F32) GEMM #1", ...): XNNPACK's per-operator timings, which it
counts in whole microseconds (a sub-microsecond operator reads 0), laid end to end from the
call's start.

What is reported partitions each instruction's time, so the entries add up to the instructions'
total and never double-count: a kernel call is the kernel (``native_layer_norm.out #1``); a
delegate call is its XNNPACK operators, named ``XNNPACK delegate call #k: <operator>``, plus
the rest of the call outside them (``XNNPACK delegate call #k: outside its operators``:
argument copies, XNNPACK's reshape and setup, the microsecond rounding); a delegate call with
no inner events is the call itself (``<backend> delegate call #k``), never an operator.
ETDump's timestamps are the runtime's PAL ticks, nanoseconds on Linux/macOS (std::chrono). The
first run (warm-up) is left out; each entry's figure is its median over the runs."""
from __future__ import annotations

import re
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtconvert.backends.base import OpTime

NS_PER_MS = 1e6
OUTSIDE = "outside its operators"
_COUNT = re.compile(r" #\d+$")  # XNNPACK's "<operator> #<n>" numbering


def profile(path: Path, args: Sequence[Any], runs: int, backends: Sequence[str]) -> list[OpTime]:
    """Run ``forward`` ``runs`` + 1 times under ETDump (the first one a warm-up);
    ``backends``: the program's delegate backend ids (its description's)."""
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(path, enable_etdump=True)
    method = program.load_method("forward")
    for _ in range(runs + 1):
        method.execute(args)
    with tempfile.TemporaryDirectory(prefix="mtconvert-etdump-") as tmp:
        dump = Path(tmp) / "run.etdp"
        program.write_etdump_result_to_file(str(dump), str(Path(tmp) / "debug.bin"))
        executes = read_etdump(dump.read_bytes())
    return aggregate(executes[1:], backends)


def read_etdump(data: bytes) -> list[list[dict[str, Any]]]:
    """The profiling events of each ``Method::execute``, in order, as plain dicts
    {name, instruction: (chain, index), delegate_op, start, end}."""
    from executorch.devtools.etdump.serialize import deserialize_from_etdump_flatcc

    out = []
    for block in deserialize_from_etdump_flatcc(data).run_data:
        events = [e.profile_event for e in block.events or [] if e.profile_event]
        if not any(p.name == "Method::execute" for p in events):
            continue  # the load-time block (Program::load_method, Method::init)
        out.append([{"name": p.name, "instruction": (p.chain_index, p.instruction_id),
                     "delegate_op": p.delegate_debug_id_str, "start": p.start_time,
                     "end": p.end_time} for p in events if p.name != "Method::execute"])
    return out


def aggregate(runs: list[list[dict[str, Any]]], backends: Sequence[str]) -> list[OpTime]:
    """Median milliseconds per entry over ``runs`` (each a list of one execute's events)."""
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    for events in runs:
        for key, ms in _entries(events, backends).items():
            times[key].append(ms)
    return [OpTime(name, kind, statistics.median(ms)) for (name, kind), ms in times.items()]


def _entries(events: list[dict[str, Any]],
             backends: Sequence[str]) -> dict[tuple[str, str], float]:
    """One execute's events as {(name, op_type): ms}, partitioning each instruction's time."""
    inner: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e["name"] not in ("OPERATOR_CALL", "DELEGATE_CALL"):
            inner[e["instruction"]].append(e)
    out: dict[tuple[str, str], float] = {}
    kernels: dict[str, int] = defaultdict(int)
    calls = 0
    for e in sorted(events, key=lambda e: e["start"]):
        if e["name"] == "OPERATOR_CALL":
            kernel = _kernel_name(inner[e["instruction"]])
            kernels[kernel] += 1
            out[(f"{kernel} #{kernels[kernel]}", kernel)] = _ms(e)
        elif e["name"] == "DELEGATE_CALL":
            calls += 1
            backend = backends[0] if len(backends) == 1 else "backend"  # one id: all its calls
            out |= _delegate_call(e, inner[e["instruction"]], backend, calls)
    return out


def _delegate_call(call: dict[str, Any], ops: list[dict[str, Any]], backend: str,
                   k: int) -> dict[tuple[str, str], float]:
    kind = f"{_short(backend)} delegate call"
    ops = [o for o in ops if o["delegate_op"]]
    if not ops:
        return {(f"{kind} #{k}", kind): _ms(call)}
    out = {(f"{kind} #{k}: {o['delegate_op']}", _COUNT.sub("", o["delegate_op"])): _ms(o)
           for o in ops}
    out[(f"{kind} #{k}: {OUTSIDE}", f"{kind}, {OUTSIDE}")] = max(
        0.0, _ms(call) - sum(out.values()))
    return out


def _kernel_name(events: list[dict[str, Any]]) -> str:
    names = [e["name"] for e in events if (e["name"] or "").startswith("native_call_")]
    return names[0][len("native_call_"):] if names else "kernel call"


def _short(backend: str) -> str:
    return {"XnnpackBackend": "XNNPACK"}.get(backend, backend)


def _ms(event: dict[str, Any]) -> float:
    return (event["end"] - event["start"]) / NS_PER_MS

