"""LiteRT's own operator profiler, reached through LiteRT's C API. ai-edge-litert's Python
``Interpreter`` has no profiler hook, but the wheel ships ``libLiteRt.so``, whose compiled-model
C API has one (``LiteRtCompiledModelGetProfiler``, ``LiteRtGetProfilerEvents``): a second load of
the .tflite as a compiled model on the CPU accelerator (XNNPACK, the session's thread count), with
the runtime option ``enable_profiling = true``, called with ctypes.

Each inference records one event per builtin kernel (``OPERATOR_INVOKE_EVENT``: the TFLite op,
node index in metadata) and, inside the XNNPACK delegate, one per XNNPACK operator
(``DELEGATE_PROFILED_OPERATOR_INVOKE_EVENT``: "Fully Connected (NC, F32) GEMM", ...); together
they partition the invoke (the delegate nodes themselves log no event of their own). XNNPACK
counts whole microseconds, so a sub-microsecond operator reads 0. Builtin kernels are named
``<OP> (builtin kernel) node <n>``: what runs outside XNNPACK; XNNPACK's operators
``<operator> #<k>`` in the order they run. The first inference (warm-up) is not profiled; each
entry's figure is its median over the runs.

The C structs and option strings below are LiteRT 2.x's (litert/c/litert_profiler_event.h,
litert_runtime_options.cc: identifier ``runtime_options_string``; litert_cpu_options.cc:
``xnnpack``); a library without these symbols raises ``ProfilerUnavailable``."""
from __future__ import annotations

import ctypes as C
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from mtconvert.backends.base import OpTime

OPERATOR = 1 << 1            # a builtin kernel: metadata1 = its node index
DELEGATE_OPERATOR = 1 << 2   # a delegate's own operator
DELEGATE_PROFILED = 1 << 3   # a delegate's operator, in the operator-wise section
WRITE = 1                    # kLiteRtTensorBufferLockModeWrite
CPU = 1                      # kLiteRtHwAcceleratorCpu
_P = C.c_void_p


class ProfilerUnavailable(RuntimeError):
    """LiteRT's C API is not there, or not in the form this module was written for."""


class _Mem(C.Structure):
    _fields_ = [("total", C.c_size_t), ("in_use", C.c_size_t), ("private", C.c_size_t)]


class _Event(C.Structure):  # ProfiledEventData
    _fields_ = [("tag", C.c_char_p), ("event_type", C.c_int), ("start_us", C.c_uint64),
                ("elapsed_us", C.c_uint64), ("begin_mem", _Mem), ("end_mem", _Mem),
                ("metadata1", C.c_uint64), ("metadata2", C.c_uint64), ("source", C.c_int)]


def profile(path: Path, threads: int, feeds: dict[int, Any], runs: int) -> list[OpTime]:
    """``feeds``: the input arrays by subgraph tensor index, in the model's dtypes."""
    api = _Api()
    with api.compiled(path, threads) as model:
        model.write_inputs(feeds)
        model.run()  # warm-up, not profiled
        per_run = [events_ms(model.profiled_run()) for _ in range(runs)]
    found: dict[tuple[str, str], list[float]] = defaultdict(list)
    for entries in per_run:
        for key, ms in entries.items():
            found[key].append(ms)
    return [OpTime(name, kind, statistics.median(ms)) for (name, kind), ms in found.items()]


def events_ms(events: list[tuple[str, int, int, int]]) -> dict[tuple[str, str], float]:
    """One inference's events (tag, type, elapsed µs, metadata1) as {(name, op_type): ms}."""
    out: dict[tuple[str, str], float] = {}
    seen: dict[str, int] = defaultdict(int)
    for tag, kind, elapsed_us, node in events:
        if kind == OPERATOR:
            key = (f"{tag} (builtin kernel) node {node}", tag)
        elif kind in (DELEGATE_OPERATOR, DELEGATE_PROFILED):
            seen[tag] += 1
            key = (f"{tag} #{seen[tag]}", tag)
        else:  # the invoke itself, buffer registration, runtime instrumentation
            continue
        out[key] = out.get(key, 0.0) + elapsed_us / 1000.0
    return out


class _Api:
    """The few LiteRT C functions used, with their argument types."""

    SIGNATURES = {
        "LiteRtCreateEnvironment": [C.c_int, _P, C.POINTER(_P)],
        "LiteRtCreateModelFromFile": [_P, C.c_char_p, C.POINTER(_P)],
        "LiteRtCreateOptions": [C.POINTER(_P)],
        "LiteRtSetOptionsHardwareAccelerators": [_P, C.c_int],
        "LiteRtCreateOpaqueOptions": [C.c_char_p, _P, _P, C.POINTER(_P)],
        "LiteRtAddOpaqueOptions": [_P, _P],
        "LiteRtCreateCompiledModel": [_P, _P, _P, C.POINTER(_P)],
        "LiteRtGetModelSignature": [_P, C.c_size_t, C.POINTER(_P)],
        "LiteRtGetNumSignatureInputs": [_P, C.POINTER(C.c_size_t)],
        "LiteRtGetNumSignatureOutputs": [_P, C.POINTER(C.c_size_t)],
        "LiteRtGetSignatureInputTensorByIndex": [_P, C.c_size_t, C.POINTER(_P)],
        "LiteRtGetSignatureOutputTensorByIndex": [_P, C.c_size_t, C.POINTER(_P)],
        "LiteRtGetTensorIndex": [_P, C.POINTER(C.c_uint32)],
        "LiteRtGetRankedTensorType": [_P, _P],
        "LiteRtGetCompiledModelInputBufferRequirements": [_P, C.c_size_t, C.c_size_t,
                                                          C.POINTER(_P)],
        "LiteRtGetCompiledModelOutputBufferRequirements": [_P, C.c_size_t, C.c_size_t,
                                                           C.POINTER(_P)],
        "LiteRtCreateManagedTensorBufferFromRequirements": [_P, _P, _P, C.POINTER(_P)],
        "LiteRtGetTensorBufferPackedSize": [_P, C.POINTER(C.c_size_t)],
        "LiteRtLockTensorBuffer": [_P, C.POINTER(_P), C.c_int],
        "LiteRtUnlockTensorBuffer": [_P],
        "LiteRtRunCompiledModel": [_P, C.c_size_t, C.c_size_t, _P, C.c_size_t, _P],
        "LiteRtCompiledModelGetProfiler": [_P, C.POINTER(_P)],
        "LiteRtStartProfiler": [_P],
        "LiteRtStopProfiler": [_P],
        "LiteRtResetProfiler": [_P],
        "LiteRtGetNumProfilerEvents": [_P, C.POINTER(C.c_int)],
        "LiteRtGetProfilerEvents": [_P, C.c_int, _P],
        "LiteRtDestroyTensorBuffer": [_P],
        "LiteRtDestroyCompiledModel": [_P],
        "LiteRtDestroyOptions": [_P],
        "LiteRtDestroyModel": [_P],
        "LiteRtDestroyEnvironment": [_P],
    }

    def __init__(self) -> None:
        try:
            import ai_edge_litert

            lib = C.CDLL(str(Path(ai_edge_litert.__file__).parent / "libLiteRt.so"))
            for name, args in self.SIGNATURES.items():
                getattr(lib, name).argtypes = args
        except (ImportError, OSError, AttributeError) as exc:
            raise ProfilerUnavailable(f"LiteRT's C API (libLiteRt.so in ai-edge-litert) is "
                                      f"not usable here: {exc}") from exc
        libc = C.CDLL(None)
        libc.strdup.restype, libc.strdup.argtypes = _P, [C.c_char_p]
        self.lib, self.libc = lib, libc

    def call(self, name: str, *args: Any) -> None:
        status = getattr(self.lib, name)(*args)
        if status:
            raise RuntimeError(f"LiteRT {name} failed (status {status})")

    def compiled(self, path: Path, threads: int) -> _Compiled:
        return _Compiled(self, path, threads)


class _Compiled:
    """A compiled model on the CPU accelerator with profiling on, its buffers, its profiler;
    every handle destroyed on exit."""

    def __init__(self, api: _Api, path: Path, threads: int):
        self.api, self.path, self.threads = api, path, threads
        self.handles: list[tuple[str, _P]] = []

    def _new(self, create: str, destroy: str | None, *args: Any) -> _P:
        handle = _P()
        self.api.call(create, *args, C.byref(handle))
        if destroy:
            self.handles.append((destroy, handle))
        return handle

    def __enter__(self) -> _Compiled:
        api = self.api
        try:
            self.env = self._new("LiteRtCreateEnvironment", "LiteRtDestroyEnvironment", 0, None)
            self.model = self._new("LiteRtCreateModelFromFile", "LiteRtDestroyModel", self.env,
                                   str(self.path).encode())
            options = self._new("LiteRtCreateOptions", "LiteRtDestroyOptions")
            api.call("LiteRtSetOptionsHardwareAccelerators", options, CPU)
            for ident, toml in ((b"runtime_options_string", "enable_profiling = true\n"),
                                (b"xnnpack", f"num_threads = {int(self.threads)}\n")):
                free = C.cast(api.libc.free, _P)  # the options own the strdup'ed payload
                opaque = self._new("LiteRtCreateOpaqueOptions", None, ident,
                                   api.libc.strdup(toml.encode()), free)
                api.call("LiteRtAddOpaqueOptions", options, opaque)
            self.compiled = self._new("LiteRtCreateCompiledModel", "LiteRtDestroyCompiledModel",
                                      self.env, self.model, options)
            self.profiler = self._new("LiteRtCompiledModelGetProfiler", None, self.compiled)
            signature = self._new("LiteRtGetModelSignature", None, self.model, 0)
            self.inputs = self._buffers(signature, "Input")
            self.outputs = self._buffers(signature, "Output")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        # buffers first, then the compiled model, options, model, environment
        for destroy, handle in sorted(reversed(self.handles),
                                      key=lambda h: h[0] != "LiteRtDestroyTensorBuffer"):
            getattr(self.api.lib, destroy)(handle)
        self.handles = []

    def _buffers(self, signature: _P, kind: str) -> list[tuple[int, _P, int]]:
        """(tensor index, buffer, size in bytes) of each signature input or output."""
        api, count = self.api, C.c_size_t()
        api.call(f"LiteRtGetNumSignature{kind}s", signature, C.byref(count))
        found = []
        for i in range(count.value):
            tensor = self._new(f"LiteRtGetSignature{kind}TensorByIndex", None, signature, i)
            index, ranked = C.c_uint32(), C.create_string_buffer(256)  # LiteRtRankedTensorType
            api.call("LiteRtGetTensorIndex", tensor, C.byref(index))
            api.call("LiteRtGetRankedTensorType", tensor, ranked)
            needs = self._new(f"LiteRtGetCompiledModel{kind}BufferRequirements", None,
                              self.compiled, 0, i)
            buffer = self._new("LiteRtCreateManagedTensorBufferFromRequirements",
                               "LiteRtDestroyTensorBuffer", self.env, ranked, needs)
            size = C.c_size_t()
            api.call("LiteRtGetTensorBufferPackedSize", buffer, C.byref(size))
            found.append((int(index.value), buffer, int(size.value)))
        return found

    def write_inputs(self, feeds: dict[int, Any]) -> None:
        import numpy as np

        if sorted(feeds) != sorted(i for i, _, _ in self.inputs):
            raise ValueError(f"the compiled model's inputs are tensors "
                             f"{sorted(i for i, _, _ in self.inputs)}, not {sorted(feeds)}")
        for index, buffer, size in self.inputs:
            data = np.ascontiguousarray(feeds[index])
            if data.nbytes != size:
                raise ValueError(f"input tensor {index}: {data.nbytes} bytes given, the "
                                 f"compiled model's buffer holds {size}")
            host = _P()
            self.api.call("LiteRtLockTensorBuffer", buffer, C.byref(host), WRITE)
            try:
                C.memmove(host, data.ctypes.data, size)
            finally:
                self.api.call("LiteRtUnlockTensorBuffer", buffer)

    def run(self) -> None:
        ins = (_P * len(self.inputs))(*[b for _, b, _ in self.inputs])
        outs = (_P * len(self.outputs))(*[b for _, b, _ in self.outputs])
        self.api.call("LiteRtRunCompiledModel", self.compiled, 0, len(self.inputs), ins,
                      len(self.outputs), outs)

    def profiled_run(self) -> list[tuple[str, int, int, int]]:
        """One inference under the profiler: its events (tag, type, elapsed µs, metadata1)."""
        api = self.api
        api.call("LiteRtResetProfiler", self.profiler)
        api.call("LiteRtStartProfiler", self.profiler)
        try:
            self.run()
        finally:
            api.call("LiteRtStopProfiler", self.profiler)
        count = C.c_int()
        api.call("LiteRtGetNumProfilerEvents", self.profiler, C.byref(count))
        events = (_Event * count.value)()
        api.call("LiteRtGetProfilerEvents", self.profiler, count.value, events)
        return [((e.tag or b"").decode(errors="replace"), int(e.event_type), int(e.elapsed_us),
                 int(e.metadata1)) for e in events]
