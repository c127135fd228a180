"""A NumPy reference interpreter for ML Programs read from a saved ``.mlpackage``.

Runs the program's MIL operations in order with the NumPy kernels of ``ops.py``. After every
operation the result is cast to the type the program declares for it: where the program
computes in float16 (``compute_precision=FLOAT16``), every intermediate is rounded to float16,
as Core ML stores it. Accumulation inside one kernel is float32; real hardware may differ there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mtconvert.backends.coreml import ops as kernels
from mtconvert.backends.coreml.program import Op, Program, load

# tuple-typed MIL parameters (concat/stack values; reshape_like's)
LIST_PARAMS = {"values", "ref_tensors", "begins", "ends", "end_masks"}


class UnsupportedOps(Exception):
    def __init__(self, op_types: list[str]):
        super().__init__(", ".join(op_types))
        self.op_types = op_types


class MilInterpreter:
    """``run(feeds)`` -> the program's outputs by name. Constants (``const`` and the weight
    decompression ``constexpr_*`` ops) are evaluated once, when the program is opened."""

    def __init__(self, program: Program):
        missing = kernels.missing(program.op_types)
        missing += sorted({op.type for op in program.ops if op.has_blocks} - set(missing))
        if missing:
            raise UnsupportedOps(missing)
        self.program = program
        self.consts: dict[str, Any] = {}
        self._steps: list[Op] = []
        for op in program.ops:
            if op.type == "const":
                self.consts[op.outputs[0].name] = _cast(op.attributes["val"], op.outputs[0].dtype)
            elif op.type.startswith("constexpr_"):
                self._execute(op, self.consts)
            else:
                self._steps.append(op)

    @classmethod
    def open(cls, package: Path) -> MilInterpreter:
        return cls(load(package))

    @property
    def operation_count(self) -> int:
        return len(self._steps)

    def run(self, feeds: dict[str, np.ndarray], *,
            trace: list[tuple[str, str, np.ndarray]] | None = None) -> dict[str, np.ndarray]:
        """Outputs by the program's output names; a ``trace`` list gets every op's
        floating-point results as (variable, op type, value), in program order."""
        env: dict[str, Any] = dict(self.consts)
        for var in self.program.inputs:
            env[var.name] = np.asarray(feeds[var.name]).astype(var.dtype, copy=False)
        for op in self._steps:
            self._execute(op, env)
            if trace is not None:
                trace.extend((v.name, op.type, env[v.name]) for v in op.outputs
                             if isinstance(env[v.name], np.ndarray)
                             and env[v.name].dtype.kind == "f")
        return {name: env[name] for name in self.program.outputs}

    def _execute(self, op: Op, env: dict[str, Any]) -> None:
        # iOS16 constexpr_* ops keep their parameters as attributes, the others as inputs
        args = {k: v for k, v in op.attributes.items() if k != "name"}
        for param, bindings in op.inputs.items():
            values = [env[v] if kind == "name" else v for kind, v in bindings]
            args[param] = values if param in LIST_PARAMS else values[0]
        try:
            results = kernels.OPS[op.type](args)
        except Exception as exc:
            raise RuntimeError(f"MIL op {op.type} ({op.outputs[0].name}): {exc}") from exc
        if len(results) != len(op.outputs):
            raise RuntimeError(f"MIL op {op.type} gave {len(results)} results for "
                               f"{len(op.outputs)} outputs")
        for var, value in zip(op.outputs, results, strict=True):
            env[var.name] = _cast(value, var.dtype)



def _cast(value: Any, dtype: str) -> Any:
    """The declared type wins: float16 outputs are rounded to float16 here."""
    if not isinstance(value, np.ndarray) or not dtype or dtype.startswith("mil-"):
        return value
    if dtype in ("tensorType", "listType", "tupleType", "dictionaryType", "stateType"):
        return value
    return value if value.dtype == dtype else value.astype(dtype)
