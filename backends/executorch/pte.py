"""What a ``.pte`` holds, read from the file itself: ``python -m
mtconvert.backends.executorch.pte JOB`` (a child: reading a corrupted file must not take
mtconvert down), also called by the conversion child on the file it wrote.

The ``forward`` plan's inputs and outputs (shapes, dtypes), the operators it calls outside any
delegate (kernel calls, with their count) and its delegate calls by backend id, checked against
what the installed ExecuTorch runtime registers: a non-delegated operator without a kernel, or a
delegate whose backend is not linked, could not run there.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

DTYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16",
          6: "float32", 7: "float64", 11: "bool", 15: "bfloat16"}


def read(path: Path) -> dict[str, Any]:
    """Describe the program's ``forward`` method; raises ValueError if it is no .pte."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    data = path.read_bytes()
    if len(data) < 8 or data[4:6] != b"ET":
        raise ValueError(f"{path.name} is not an ExecuTorch program (no 'ET' file identifier)")
    try:
        program = deserialize_pte_binary(data).program
    except Exception as exc:  # flatc/parse failures of a damaged file
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ValueError(f"{path.name} is not a readable ExecuTorch program: "
                         f"{type(exc).__name__}: {first}") from None
    plans = {p.name: p for p in program.execution_plan}
    if "forward" not in plans:
        raise ValueError(f"{path.name} has no 'forward' method (methods: {sorted(plans)})")
    plan = plans["forward"]
    operators: Counter[str] = Counter()
    delegates: Counter[str] = Counter()
    for chain in plan.chains:
        for instruction in chain.instructions:
            args = instruction.instr_args
            kind = type(args).__name__
            if kind == "KernelCall":
                op = plan.operators[args.op_index]
                operators[f"{op.name}.{op.overload}" if op.overload else op.name] += 1
            elif kind == "DelegateCall":
                delegates[plan.delegates[args.delegate_index].id] += 1
    return {"inputs": [_tensor(plan.values[i].val) for i in plan.inputs],
            "outputs": [_tensor(plan.values[i].val) for i in plan.outputs],
            "operators": dict(operators.most_common()),
            "delegates": dict(delegates.most_common())}


def _tensor(value: Any) -> dict[str, Any]:
    if type(value).__name__ != "Tensor":
        return {"shape": [], "dtype": type(value).__name__}
    return {"shape": [int(d) for d in value.sizes],
            "dtype": DTYPES.get(int(value.scalar_type), f"scalar type {int(value.scalar_type)}")}


def load_quantized_kernels() -> None:
    """Register ExecuTorch's quantized kernels (``quantized_decomposed::embedding_byte.out``
    and the other ``quantized_decomposed`` ops) in this process's runtime: the pip package's
    pybindings link the portable and optimized kernels only; its
    ``lib/libexecutorch_kernels_quantized.so`` registers the rest into the same registry when
    loaded (a phone build links ``quantized_ops_lib`` the same way). Idempotent."""
    import ctypes

    import executorch

    for root in executorch.__path__:
        lib = Path(root) / "lib" / "libexecutorch_kernels_quantized.so"
        if lib.is_file():
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            return


def runtime_registry() -> dict[str, list[str]]:
    """The kernels and backends the installed ExecuTorch runtime registers (its quantized
    kernels loaded)."""
    from executorch.runtime import Runtime

    runtime = Runtime.get()
    load_quantized_kernels()
    return {"operators": sorted(runtime.operator_registry.operator_names),
            "backends": sorted(runtime.backend_registry.registered_backend_names)}


def unrunnable(described: dict[str, Any], registry: dict[str, list[str]]) -> dict[str, list[str]]:
    """The program's non-delegated operators without a kernel and its delegates without a
    backend in ``registry``."""
    ops, backends = set(registry["operators"]), set(registry["backends"])
    return {"missing_kernels": sorted(op for op in described["operators"] if op not in ops),
            "missing_backends": sorted(b for b in described["delegates"] if b not in backends)}


def describe(path: Path) -> dict[str, Any]:
    """``read`` and, against this machine's runtime, what of it could not run."""
    described = read(path)
    return described | unrunnable(described, runtime_registry())


def _job(job: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"program": describe(Path(job["path"]))}
    except (ValueError, OSError) as exc:
        return {"error": str(exc)}


if __name__ == "__main__":
    from mtconvert.backends.process import child_main

    child_main(_job)
