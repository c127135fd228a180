"""Input shapes: parse ``NAME=1x128`` specs and fix dynamic axes to concrete sizes."""
from __future__ import annotations

import re

from mtconvert.backends.base import TensorSpec
from mtconvert.errors import UsageError

DEFAULT_BATCH = 1
DEFAULT_AXIS = 32  # every other dynamic axis (sequence length, usually)

_SPEC = re.compile(r"^(?P<name>[^=\s]+)=(?P<dims>\d+(?:[x,]\d+)*)$")


def parse_shape_spec(text: str) -> tuple[str, tuple[int, ...]]:
    """``input_ids=1x128`` -> ("input_ids", (1, 128))."""
    m = _SPEC.match(text.strip())
    if not m:
        raise UsageError(f"malformed --input-shape {text!r}: expected NAME=DIMxDIM..., "
                         "e.g. input_ids=1x128")
    dims = tuple(int(d) for d in re.split(r"[x,]", m["dims"]))
    if any(d <= 0 for d in dims):
        raise UsageError(f"malformed --input-shape {text!r}: dimensions must be positive")
    return m["name"], dims


def resolve_shapes(inputs: tuple[TensorSpec, ...],
                   user: dict[str, tuple[int, ...]]) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Concrete shapes for every input, and notes on the defaults applied.

    A size the user gives for a named axis applies to every input sharing that axis name.
    Unnamed or unbound dynamic axes get DEFAULT_BATCH on axis 0 and DEFAULT_AXIS elsewhere.
    """
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
                size = DEFAULT_BATCH if axis == 0 else DEFAULT_AXIS
                dims.append(size)
                notes.append(f"{spec.name} axis {axis} ({d or 'unnamed'}) = {size} (default)")
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
