"""Input shapes: parse ``NAME=1x128`` specs and fix dynamic axes to concrete sizes."""
from __future__ import annotations

from mtconvert.backends.base import TensorSpec
from mtconvert.backends.options import parse_shape_spec  # noqa: F401 - re-exported
from mtconvert.errors import UsageError

DEFAULT_BATCH = 1
DEFAULT_AXIS = 32  # every other dynamic axis (sequence length, usually)
# When the model has a weight dimension of DEFAULT_AXIS (hidden size 32, say), the first of these
# it lacks is used instead: converters that infer layouts by matching shapes (onnx2tf) silently
# swap axes of equal size; an unambiguous default keeps that trap out of the default run.
AXIS_ALTERNATIVES = (48, 40, 24, 56, 20, 28)


def default_axis(avoid: set[int]) -> int:
    for size in (DEFAULT_AXIS, *AXIS_ALTERNATIVES):
        if size not in avoid:
            return size
    return DEFAULT_AXIS


def resolve_shapes(inputs: tuple[TensorSpec, ...], user: dict[str, tuple[int, ...]],
                   avoid: set[int] | None = None) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Concrete shapes for every input, and notes on the defaults applied.

    A size the user gives for a named axis applies to every input sharing that axis name.
    Unnamed or unbound dynamic axes get DEFAULT_BATCH on axis 0, elsewhere DEFAULT_AXIS or,
    when the model has a weight dimension of that size (``avoid``), an alternative it lacks.
    """
    axis_default = default_axis(avoid or set())
    known = {s.name for s in inputs}
    unknown = sorted(set(user) - known)
    if unknown:
        raise UsageError(f"--input-shape names unknown input {', '.join(unknown)}; "
                         f"inputs are {', '.join(sorted(known))}")
    bound = _bind_axis_names(inputs, user)
    shapes, notes = {}, []
    for spec in inputs:
        if spec.name in user:
            shapes[spec.name] = user[spec.name]
            continue
        dims = []
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif isinstance(d, str) and d in bound:
                dims.append(bound[d])
            else:
                size = DEFAULT_BATCH if axis == 0 else axis_default
                dims.append(size)
                why = "" if size in (DEFAULT_BATCH, DEFAULT_AXIS) else \
                    f", not {DEFAULT_AXIS}: a weight dimension of the model is {DEFAULT_AXIS}"
                notes.append(f"{spec.name} axis {axis} ({d or 'unnamed'}) = {size} (default{why})")
                if isinstance(d, str):
                    bound[d] = size
        shapes[spec.name] = tuple(dims)
    return shapes, notes


def _bind_axis_names(inputs: tuple[TensorSpec, ...],
                     user: dict[str, tuple[int, ...]]) -> dict[str, int]:
    bound: dict[str, int] = {}
    for spec in inputs:
        if spec.name not in user:
            continue
        given = user[spec.name]
        if len(given) != len(spec.shape):
            raise UsageError(f"--input-shape {spec.name}: rank {len(given)} but the model's "
                             f"input has rank {len(spec.shape)} {_fmt(spec.shape)}")
        for d, g in zip(spec.shape, given, strict=True):
            if isinstance(d, int) and d > 0 and d != g:
                raise UsageError(f"--input-shape {spec.name}={_fmt(given)} conflicts with the "
                                 f"model's fixed shape {_fmt(spec.shape)}")
            if isinstance(d, str):
                bound[d] = g
    return bound


def _fmt(shape: tuple) -> str:
    return "x".join(str(d) if d not in (None, "") else "?" for d in shape)


def sweep_shapes(inputs: tuple[TensorSpec, ...], primary: dict[str, tuple[int, ...]],
                 seq_lens: tuple[int, ...], batch_sizes: tuple[int, ...]) -> list[dict]:
    """The primary shapes with dynamic axis 0 set to each batch size and dynamic axis 1 to each
    sequence length; the first combination comes first, duplicates dropped."""
    def dynamic(spec: TensorSpec, axis: int) -> bool:
        return len(spec.shape) > axis and not isinstance(spec.shape[axis], int)

    if seq_lens and not any(dynamic(s, 1) for s in inputs):
        raise UsageError("--seq-lens: no input has a dynamic axis 1 (sequence)")
    if batch_sizes and not any(dynamic(s, 0) for s in inputs):
        raise UsageError("--batch-sizes: no input has a dynamic axis 0 (batch)")
    combos: list[dict] = []
    for batch in batch_sizes or (None,):
        for seq in seq_lens or (None,):
            combo = {}
            for spec in inputs:
                dims = list(primary[spec.name])
                if batch is not None and dynamic(spec, 0):
                    dims[0] = batch
                if seq is not None and dynamic(spec, 1):
                    dims[1] = seq
                combo[spec.name] = tuple(dims)
            if combo not in combos:
                combos.append(combo)
    return combos


def dynamic_range(declared: dict[str, dict[int, tuple[str, int, int | None]]],
                  combos: list[dict]) -> dict[str, dict[int, list[int]]]:
    """The smallest and largest size of the sweep on every axis the source declares dynamic
    ({input: {axis: [lo, hi]}}: the range a program exported with Dims is made and validated
    for, both ends being sweep points). ``declared`` is a .pt2's own Dims ({input: {axis:
    (symbol, min, max)}}); a sweep size outside them is a UsageError."""
    out: dict[str, dict[int, list[int]]] = {}
    for name, axes in declared.items():
        for axis, (symbol, lo, hi) in axes.items():
            sizes = [combo[name][axis] for combo in combos if name in combo]
            bad = [n for n in sizes if n < lo or (hi is not None and n > hi)]
            if bad:
                raise UsageError(f"{name} axis {axis} = {bad[0]} is outside the range the "
                                 f"source was exported for: {lo}..{hi if hi else 'unbounded'} "
                                 f"(torch.export Dim {symbol})")
            if sizes:
                out.setdefault(name, {})[axis] = [min(sizes), max(sizes)]
    return out
