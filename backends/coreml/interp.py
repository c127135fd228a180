"""A NumPy reference interpreter for ML Programs read from a saved ``.mlpackage``.

Runs the program's MIL operations in order with the NumPy kernels of ``ops.py``. After every
operation the result is cast to the type the program declares for it: where the program
computes in float16 (``compute_precision=FLOAT16``), every intermediate is rounded to float16,
as Core ML stores it. Accumulation inside one kernel is float32; real hardware may differ there.

Everything that does not depend on the feeds is done once, when the program is opened: the
constants (``const``, and the weight decompression ``constexpr_*`` ops) are decoded, cast to
their declared type and frozen (read-only, so no kernel can change them for the next run);
operations whose inputs are all constants are evaluated then too; and every remaining
operation gets a plan: its kernel, its parameters already bound to constants, the variables
it reads, the declared dtypes of its outputs, and the variables no later operation reads
(dropped from memory as soon as they are dead). A run is then one loop over the plans.

BLAS runs single-threaded during a run (``blas_threads``; through threadpoolctl, which the
coreml extra's scikit-learn brings, else left alone). The interpreter is a reference, no
latency is reported from it, and where the cores are shared a multi-threaded BLAS keeps
waiting for its threads: OpenBLAS with 2 threads took 30 ms for a [128, 384] x [384, 384]
matmul on the loaded 2-core CI machine, 1 ms with one. OpenBLAS splits a product over
threads by output blocks, so the thread count does not change the results (the 6-layer
BERT's outputs are bit-identical either way).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mtconvert.backends.coreml import ops as kernels
from mtconvert.backends.coreml.program import Op, Program, load

# tuple-typed MIL parameters (concat/stack values; reshape_like's)
LIST_PARAMS = {"values", "ref_tensors", "begins", "ends", "end_masks"}
# declared types that are no numpy dtype: results keep the kernel's type
_NOT_NUMPY = ("tensorType", "listType", "tupleType", "dictionaryType", "stateType")


class UnsupportedOps(Exception):
    def __init__(self, op_types: list[str]):
        super().__init__(", ".join(op_types))
        self.op_types = op_types


@dataclass
class _Plan:
    """One operation, ready to run: ``fixed`` holds its attributes and constant parameters;
    ``reads`` the (parameter, variable) pairs to fetch; ``lists`` the tuple parameters with
    their bindings, each (True, variable) or (False, constant)."""

    op: Op
    kernel: Callable[[dict[str, Any]], tuple[Any, ...]]
    fixed: dict[str, Any]
    reads: list[tuple[str, str]]
    lists: list[tuple[str, list[tuple[bool, Any]]]]
    outputs: list[tuple[str, np.dtype | None]]
    dead: tuple[str, ...] = ()
    folded: bool = False

    def args(self, env: dict[str, Any]) -> dict[str, Any]:
        args = dict(self.fixed)
        for param, name in self.reads:
            args[param] = env[name]
        for param, bindings in self.lists:
            args[param] = [env[v] if named else v for named, v in bindings]
        return args

    def call(self, env: dict[str, Any]) -> tuple[Any, ...]:
        try:
            results = self.kernel(self.args(env))
        except Exception as exc:
            raise RuntimeError(f"MIL op {self.op.type} ({self.op.outputs[0].name}): "
                               f"{exc}") from exc
        if len(results) != len(self.outputs):
            raise RuntimeError(f"MIL op {self.op.type} gave {len(results)} results for "
                               f"{len(self.outputs)} outputs")
        return results


class MilInterpreter:
    """``run(feeds)`` -> the program's outputs by name. Constants (``const`` and the weight
    decompression ``constexpr_*`` ops, and operations of constants alone) are evaluated once,
    when the program is opened."""

    def __init__(self, program: Program, blas_threads: int | None = 1):
        self.blas_threads = blas_threads  # None: BLAS as configured
        missing = kernels.missing(program.op_types)
        missing += sorted({op.type for op in program.ops if op.has_blocks} - set(missing))
        if missing:
            raise UnsupportedOps(missing)
        self.program = program
        # the program's states (iOS18+), held from run to run as the Core ML runtime does
        self.states = {v.name: kernels.State(v.dtype, v.shape) for v in program.states}
        self.consts: dict[str, Any] = {}
        self._plans: list[_Plan] = []
        with np.errstate(all="ignore"):
            for op in program.ops:
                if op.type == "const":
                    var = op.outputs[0]
                    self.consts[var.name] = _freeze(_cast(op.attributes["val"],
                                                          _numpy_dtype(var.dtype)))
                    continue
                plan = self._plan(op)
                if op.type.startswith("constexpr_"):
                    self._store(plan, plan.call(self.consts), self.consts, freeze=True)
                elif not plan.reads and not any(named for _, b in plan.lists for named, _ in b):
                    try:  # all inputs constant: evaluated now, once
                        self._store(plan, plan.call(self.consts), self.consts, freeze=True)
                        plan.folded = True
                    except RuntimeError:
                        pass  # left to the run, which raises the same error there
                    self._plans.append(plan)
                else:
                    self._plans.append(plan)
        self._live = [p for p in self._plans if not p.folded]
        self._mark_dead()

    @classmethod
    def open(cls, package: Path, blas_threads: int | None = 1) -> MilInterpreter:
        return cls(load(package), blas_threads)

    def reset_states(self) -> None:
        """Every state back to zeros (a new sequence)."""
        for state in self.states.values():
            state.value[...] = 0

    @property
    def operation_count(self) -> int:
        return len(self._plans)

    def run(self, feeds: dict[str, np.ndarray], *,
            trace: list[tuple[str, str, np.ndarray]] | None = None) -> dict[str, np.ndarray]:
        """Outputs by the program's output names; a ``trace`` list gets every op's
        floating-point results as (variable, op type, value), in program order."""
        env: dict[str, Any] = dict(self.states)
        for var in self.program.inputs:
            env[var.name] = np.asarray(feeds[var.name]).astype(var.dtype, copy=False)
        for name in feeds.keys() & self.states.keys():  # a fed state overwrites the held one
            self.states[name].write(feeds[name])
        # as on device: inf / NaN without warnings
        with np.errstate(all="ignore"), _blas_limited(self.blas_threads):
            if trace is None:
                for plan in self._live:
                    self._store(plan, plan.call(env), env)
                    for name in plan.dead:
                        del env[name]
            else:
                for plan in self._plans:
                    store = self.consts if plan.folded else env
                    if not plan.folded:
                        self._store(plan, plan.call(env), env)
                    trace.extend((name, plan.op.type, store[name]) for name, _ in plan.outputs
                                 if isinstance(store[name], np.ndarray)
                                 and store[name].dtype.kind == "f")
        outputs = {name: env[name] if name in env else self.consts[name]
                   for name in self.program.outputs}
        return {name: v if not isinstance(v, np.ndarray) or v.flags.writeable else v.copy()
                for name, v in outputs.items()}  # constants stay frozen

    # --- set-up -------------------------------------------------------------------------------

    def _plan(self, op: Op) -> _Plan:
        kernel = kernels.OPS[op.type]
        # iOS16 constexpr_* ops keep their parameters as attributes, the others as inputs
        fixed = {k: v for k, v in op.attributes.items() if k != "name"}
        reads: list[tuple[str, str]] = []
        lists: list[tuple[str, list[tuple[bool, Any]]]] = []
        for param, bindings in op.inputs.items():
            bound = [(False, self.consts[v]) if kind == "name" and v in self.consts
                     else (True, v) if kind == "name" else (False, _freeze(v))
                     for kind, v in bindings]
            if param in LIST_PARAMS:
                if any(named for named, _ in bound):
                    lists.append((param, bound))
                else:
                    fixed[param] = [v for _, v in bound]
            elif bound[0][0]:
                reads.append((param, bound[0][1]))
            else:
                fixed[param] = bound[0][1]
        for param in kernels.WIDENED_PARAMS.get(op.type, ()):  # float16 weights: widened once
            value = fixed.get(param)
            if isinstance(value, np.ndarray) and value.dtype == np.float16:
                fixed[param] = _freeze(value.astype(np.float32))
        # the kernels' own error state is set once per run instead of once per op
        return _Plan(op, getattr(kernel, "__wrapped__", kernel), fixed, reads, lists,
                     [(v.name, _numpy_dtype(v.dtype)) for v in op.outputs])

    @staticmethod
    def _store(plan: _Plan, results: tuple[Any, ...], env: dict[str, Any],
               freeze: bool = False) -> None:
        for (name, dtype), value in zip(plan.outputs, results):
            # the declared type wins: float16 outputs are rounded to float16 here
            if dtype is not None and isinstance(value, np.ndarray) and value.dtype != dtype:
                value = value.astype(dtype)
            env[name] = _freeze(value) if freeze else value

    def _mark_dead(self) -> None:
        """Each variable is dropped after the last operation that reads it (outputs and
        constants are kept)."""
        keep = set(self.program.outputs) | set(self.consts)
        seen: set[str] = set()
        for plan in reversed(self._live):
            reads = [name for _, name in plan.reads]
            reads += [v for _, bindings in plan.lists for named, v in bindings if named]
            dead = [n for n in dict.fromkeys(reads) if n not in seen and n not in keep]
            seen.update(reads)
            plan.dead = tuple(dead)
        # outputs of an operation that nothing reads: dropped at once
        for plan in self._live:
            unread = tuple(n for n, _ in plan.outputs if n not in seen and n not in keep)
            plan.dead += unread


@functools.cache
def _blas_controller() -> Any:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


def _blas_limited(threads: int | None) -> Any:
    controller = _blas_controller() if threads is not None else None
    if controller is None:
        return contextlib.nullcontext()
    return controller.limit(limits=threads, user_api="blas")


def _numpy_dtype(dtype: str) -> np.dtype | None:
    if not dtype or dtype.startswith("mil-") or dtype in _NOT_NUMPY:
        return None
    return np.dtype(dtype)


def _cast(value: Any, dtype: np.dtype | None) -> Any:
    """The declared type wins: float16 outputs are rounded to float16 here."""
    if dtype is None or not isinstance(value, np.ndarray):
        return value
    return value if value.dtype == dtype else value.astype(dtype)


def _freeze(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        value.flags.writeable = False
    return value
