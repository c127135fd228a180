"""Lowering passes: ONNX -> ONNX rewrites of op classes a target cannot run into ops it can.

A target describes what it runs with a ``Capability`` (supported/unsupported ops, maximum rank,
bool support, opset) and the passes it needs; ``lower`` applies them in order, simplifies after
each (onnxsim with the fixed shapes), and keeps a rewrite only when ONNX Runtime gives the same
outputs as the source graph (max abs <= 1e-5 on fp32 outputs, equality elsewhere) on several
inputs (ids inside the vocabulary; masks with none, one and half padded; random floats). Every
applied or rejected pass is a human-readable step.

Heavy imports (onnx, onnxruntime, onnxsim) happen inside functions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mtconvert.backends.lowering.check import ATOL


@dataclass(frozen=True)
class Capability:
    """What a target runs. ``unsupported`` ops are what its converter cannot lower;
    ``supported`` (when given) is the whole list; ``max_rank`` counts the batch axis;
    ``bool_tensors``: whether bool/int arithmetic can stay as it is."""
    name: str
    passes: tuple[str, ...]
    unsupported: frozenset[str] = frozenset()
    supported: frozenset[str] | None = None
    max_rank: int = 6
    bool_tensors: bool = True
    max_opset: int | None = None
    # onnxsim optimizers the simplifications between passes skip (and ncnn's prepare)
    skipped_optimizers: tuple[str, ...] = ()

    def runs(self, op: str) -> bool:
        if op in self.unsupported:
            return False
        return self.supported is None or op in self.supported


GEMM_FUSIONS = ("fuse_matmul_add_bias_into_gemm", "fuse_matmul_add_bias_into_gemm_batched")

_LOGIC = frozenset({"Not", "And", "Or", "Xor", "Equal", "Less", "Greater", "LessOrEqual",
                    "GreaterOrEqual", "Where", "IsNaN", "IsInf", "Cast", "CumSum",
                    "GatherND", "GatherElements"})

# pnnx 20261020 -> ncnn: ops seen reaching the .param as layers ncnn cannot create
NCNN = Capability(
    name="ncnn",
    passes=("opset", "default-attributes", "instance-norm", "finite-masks", "nan-checks",
            "gather-select", "logic-to-float", "cumsum-matmul", "gather-select", "clip-bounds",
            "reduce-matmul", "explicit-reshape", "mask-broadcast", "strided-slice", "rank-reduce",
            "attention-bias"),
    unsupported=_LOGIC | {"Gather"},  # Gather only as an embedding (constant table, input ids)
    max_rank=4, bool_tensors=False, max_opset=None,
    # onnxsim turns MatMul [1, S, K] x W + b into Reshape [S, K] -> Gemm -> Reshape; pnnx
    # writes the Reshape dropping the size-1 batch as an ncnn Reshape with batch axes
    # (12=0 13=0) that ncnn runs as S batch items of [K]: the MultiHeadAttention pnnx fuses
    # after it then reads the wrong shape (extract returns -1 or a crash)
    skipped_optimizers=GEMM_FUSIONS)

COREML = Capability(name="coreml", passes=("opset", "nan-checks", "clip-bounds", "rank-reduce"),
                    max_rank=5, bool_tensors=True)


@dataclass
class Lowered:
    model: Any
    steps: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    max_abs: float = 0.0


def lower(model: Any, shapes: dict[str, list[int]], capability: Capability,
          reference_model: Any | None = None) -> Lowered:
    """Apply ``capability.passes`` to ``model`` (shapes fixed), each kept only when ONNX Runtime
    agrees with ``reference_model`` (default: ``model``) on the check inputs."""
    import onnx

    from mtconvert.backends.lowering import check
    from mtconvert.backends.lowering.graph import Graph, NotApplicable
    from mtconvert.backends.lowering.passes import PASSES, Context

    ref_model = reference_model if reference_model is not None else model
    vocab = check.embedding_sizes(ref_model)
    feeds = check.make_feeds(ref_model, shapes, vocab)
    reference = check.run(ref_model, feeds)
    ctx = Context(shapes=shapes, vocab=vocab, max_rank=capability.max_rank,
                  max_opset=capability.max_opset)
    result = Lowered(model=model)
    for name in capability.passes:
        try:
            out = PASSES[name](Graph(result.model), ctx)
        except NotApplicable as exc:
            result.steps.append(f"lower {name}: not applied ({exc})")
            result.rejected.append(name)
            continue
        except Exception as exc:  # a pass bug must not stop the conversion; it is reported
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            result.steps.append(f"lower {name}: not applied (failed: {first})")
            result.rejected.append(name)
            continue
        if out is None:
            continue
        candidate, detail = out
        try:
            candidate = simplify(candidate, shapes, capability.skipped_optimizers)
            onnx.checker.check_model(candidate)
            diff = check.max_diff(reference, check.run(candidate, feeds))
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            result.steps.append(f"lower {name}: {detail}; rejected (invalid graph: {first})")
            result.rejected.append(name)
            continue
        if diff <= ATOL:
            result.model = candidate
            result.max_abs = max(result.max_abs, diff)
            result.applied.append(name)
            result.steps.append(f"lower {name}: {detail}; ORT max abs {diff:.1g}")
        else:
            result.rejected.append(name)
            result.steps.append(f"lower {name}: {detail}; rejected: changed outputs by "
                                f"{diff:.3g} in ONNX Runtime")
    return result


def simplify(model: Any, shapes: dict[str, list[int]],
             skipped_optimizers: tuple[str, ...] = ()) -> Any:
    """onnxsim with the fixed shapes (folds what became constant), the model as it is when
    onnxsim cannot; Constant nodes kept as initializers; ``skipped_optimizers`` not run."""
    import onnxsim

    try:
        out, ok = onnxsim.simplify(model, overwrite_input_shapes=_current(model, shapes),
                                   skipped_optimizers=list(skipped_optimizers) or None)
    except Exception:
        return model
    return out if ok else model


def _current(model: Any, shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    inits = {i.name for i in model.graph.initializer}
    return {k: v for k, v in shapes.items()
            if k in {i.name for i in model.graph.input if i.name not in inits}}


def unsupported_ops(model: Any, capability: Capability) -> list[str]:
    """Op types in ``model`` the target does not run (an embedding Gather counts as run)."""
    inputs = {i.name for i in model.graph.input}
    inits = {i.name for i in model.graph.initializer}
    bad = set()
    for n in model.graph.node:
        if n.op_type == "Gather" and n.input[0] in inits and n.input[1] in inputs:
            continue
        if not capability.runs(n.op_type):
            bad.add(n.op_type)
    return sorted(bad)


__all__ = ["Capability", "GEMM_FUSIONS", "NCNN", "COREML", "Lowered", "lower", "simplify",
           "unsupported_ops", "ATOL"]
