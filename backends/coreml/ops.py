"""NumPy kernels for MIL operations: what each op of a Core ML ML Program computes.

The MIL interpreter (``interp.py``) walks the operations of a saved ``.mlpackage`` and calls,
for each one, ``OPS[op_type](args)``:

* ``args`` holds the op's MIL input parameters by their MIL names, already resolved: tensors
  are numpy arrays, scalars 0-d arrays, string parameters ``str``, tuple parameters (``values``
  of concat / stack / einsum) lists of arrays. Optional parameters the program left out are
  absent and take the MIL default.
* The result is a tuple with one array per MIL output of the op.

Semantics follow the op definitions of coremltools 9.0 (``converters/mil/mil/ops/defs``,
opsets iOS15 to iOS18), including the parameters that later opsets added; where an op's
definition has a ``value_inference``, the kernel agrees with it. Floating-point math runs in
float32 (float16 inputs are widened): the interpreter casts every result to the dtype the
program declares, which is where float16 rounding happens. Integer and bool results keep
integer / bool dtypes.

Pure NumPy and vectorised: no Python loops over tensor elements, nothing heavy imported.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.polynomial import chebyshev as _chebyshev
from numpy.polynomial import polyutils as pu

Args = dict[str, Any]
Kernel = Callable[[Args], tuple[np.ndarray, ...]]

OPS: dict[str, Kernel] = {}


# Parameters a kernel widens to float32 (``_num`` / ``_f32``) before anything reads them: a
# float16 constant bound to one of them may be handed over widened already, with the same
# result (the interpreter widens such weights once per session instead of once per run).
# Filled in below, next to the kernels.
WIDENED_PARAMS: dict[str, frozenset[str]] = {}


def missing(op_types: Iterable[str]) -> list[str]:
    """The op types (sorted, unique) that have no kernel here; ``const`` is the
    interpreter's own business and never missing."""
    return sorted({t for t in op_types if t != "const" and t not in OPS})


def register(*names: str) -> Callable[[Kernel], Kernel]:
    """Register a kernel under one or more MIL op types. Floating-point exceptions stay
    silent, as on device: overflow gives inf and 0/0 NaN without a warning."""

    def wrap(fn: Kernel) -> Kernel:
        @functools.wraps(fn)
        def kernel(args: Args) -> tuple[np.ndarray, ...]:
            with np.errstate(all="ignore"):
                return fn(args)

        for name in names:
            if name in OPS:
                raise ValueError(f"MIL op {name} registered twice")
            OPS[name] = kernel
        return fn

    return wrap


# --------------------------------------------------------------------------------------------
# Parameter helpers
# --------------------------------------------------------------------------------------------

def _f32(value: Any) -> np.ndarray:
    """``value`` as float32, the type float math runs in."""
    a = np.asarray(value)
    return a if a.dtype == np.float32 else a.astype(np.float32)


def _num(value: Any) -> np.ndarray:
    """A numeric operand: floats widen to float32, integers and bools keep their type."""
    a = np.asarray(value)
    return a.astype(np.float32) if a.dtype.kind == "f" and a.dtype != np.float32 else a


def _int(args: Args, name: str, default: int | None = None) -> int:
    value = args.get(name)
    if value is None:
        if default is None:
            raise KeyError(f"missing parameter {name!r}")
        return default
    return int(np.asarray(value))


def _float(args: Args, name: str, default: float | None = None) -> np.float32:
    value = args.get(name)
    if value is None:
        if default is None:
            raise KeyError(f"missing parameter {name!r}")
        return np.float32(default)
    return np.float32(np.asarray(value))


def _bool(args: Args, name: str, default: bool) -> bool:
    value = args.get(name)
    return default if value is None else bool(np.asarray(value))


def _ints(args: Args, name: str) -> list[int] | None:
    value = args.get(name)
    return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]


def _bools(args: Args, name: str, n: int) -> list[bool]:
    value = args.get(name)
    return [False] * n if value is None else [bool(v) for v in np.asarray(value).reshape(-1)]


def _str(args: Args, name: str, default: str | None = None) -> str:
    value = args.get(name)
    if value is None:
        if default is None:
            raise KeyError(f"missing parameter {name!r}")
        return default
    return str(value.item() if isinstance(value, np.ndarray) else value)


def _epsilon(args: Args, x: np.ndarray, default: float) -> np.float32:
    """``epsilon``, or the default as the op definition makes it: in the type of ``x``
    (so log's 1e-45 is 0 for float16 inputs)."""
    if args.get("epsilon") is not None:
        return _float(args, "epsilon")
    dtype = x.dtype if x.dtype.kind == "f" else np.dtype(np.float32)
    return np.float32(dtype.type(default))


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _channel_param(param: Any, rank: int) -> np.ndarray:
    """A per-channel [C] vector shaped to broadcast along axis 1 of a rank-``rank`` tensor."""
    return _f32(param).reshape((1, -1) + (1,) * (rank - 2))


_DTYPES = {
    "bool": np.bool_, "int4": np.int8, "int8": np.int8, "int16": np.int16, "int32": np.int32,
    "int64": np.int64, "uint1": np.uint8, "uint2": np.uint8, "uint3": np.uint8,
    "uint4": np.uint8, "uint6": np.uint8, "uint8": np.uint8, "uint16": np.uint16,
    "uint32": np.uint32, "uint64": np.uint64, "fp16": np.float16, "fp32": np.float32,
    "fp64": np.float64,
}


def _dtype(name: str) -> type:
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown MIL dtype {name!r}") from None


# --------------------------------------------------------------------------------------------
# Elementwise binary (NumPy broadcasting)
# --------------------------------------------------------------------------------------------

def _real_div(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return _f32(x) / _f32(y)


def _pow(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if x.dtype.kind in "iu" and y.dtype.kind in "iu" and not np.any(y < 0):
        return np.power(x, y)
    return np.power(_f32(x), _f32(y))


_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": _real_div,
    "floor_div": np.floor_divide, "mod": np.mod, "pow": _pow,
    "maximum": np.maximum, "minimum": np.minimum,
    "equal": np.equal, "not_equal": np.not_equal, "less": np.less,
    "less_equal": np.less_equal, "greater": np.greater, "greater_equal": np.greater_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}


def _binary_kernel(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Kernel:
    def kernel(args: Args) -> tuple[np.ndarray, ...]:
        return (np.asarray(fn(_num(args["x"]), _num(args["y"]))),)

    return kernel


for _name, _fn in _BINARY.items():
    register(_name)(_binary_kernel(_fn))
    WIDENED_PARAMS[_name] = frozenset({"x", "y"})


# --------------------------------------------------------------------------------------------
# Elementwise unary and activations
# --------------------------------------------------------------------------------------------

def _erf_fit() -> Callable[[np.ndarray], np.ndarray]:
    """erf on [0, 6] as a degree-32 Chebyshev interpolant of ``math.erf`` (max error 1e-12,
    far below float32's 6e-8; erf(6) = 1 - 2e-17). Fitted once, at import, from 33 scalar
    evaluations (NumPy has no erf, and SciPy is not a dependency)."""
    return _chebyshev.Chebyshev.interpolate(np.vectorize(math.erf), 32, domain=[0.0, 6.0])


_ERF_POLY = _erf_fit()
# The interpolant's evaluation, spelled out: t = off + scl * min(|x|, 6) maps [0, 6] onto
# [-1, 1], then Clenshaw's recurrence over the coefficients, exactly as numpy's chebval
# (same operations in the same order, so the same float64 bits), but in place on blocks
# that stay in cache: the full-array temporaries of chebval cost ten times more.
_ERF_OFF, _ERF_SCL = (float(v) for v in pu.mapparms(_ERF_POLY.domain, _ERF_POLY.window))
_ERF_COEF = tuple(float(c) for c in _ERF_POLY.coef)
_BLOCK = 16384  # float64 elements per block (128 KiB)


def _erf64(x: np.ndarray) -> np.ndarray:
    """erf in float64 (see ``_erf_fit``); evaluated block by block."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty(x.shape, np.float64)
    flat, res = x.reshape(-1), out.reshape(-1)
    scratch = np.empty((5, min(flat.size, _BLOCK)), np.float64)
    for start in range(0, flat.size, _BLOCK):
        block = flat[start:start + _BLOCK]
        _erf64_block(block, res[start:start + _BLOCK], scratch[:, :block.size])
    return out


def _erf64_block(x: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    t, x2, c0, c1, tmp = scratch
    np.abs(x, out=t)
    np.minimum(t, 6.0, out=t)
    np.multiply(_ERF_SCL, t, out=t)
    np.add(_ERF_OFF, t, out=t)  # t = off + scl * min(|x|, 6)
    np.multiply(2, t, out=x2)
    c0.fill(_ERF_COEF[-2])
    c1.fill(_ERF_COEF[-1])
    for i in range(3, len(_ERF_COEF) + 1):  # (c0, c1) <- (c[-i] - c1, c0 + c1 * x2)
        np.multiply(c1, x2, out=tmp)
        np.subtract(_ERF_COEF[-i], c1, out=c1)
        np.add(c0, tmp, out=c0)
        c0, c1 = c1, c0
    np.multiply(c1, t, out=tmp)
    np.add(c0, tmp, out=tmp)  # c0 + c1 * t
    np.sign(x, out=out)
    np.multiply(out, tmp, out=out)


def _erf(x: np.ndarray) -> np.ndarray:
    return _erf64(x).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


_UNARY_FLOAT: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "exp": np.exp, "exp2": np.exp2, "sqrt": np.sqrt, "ceil": np.ceil, "floor": np.floor,
    "round": np.round,  # half to even, as numpy (the definition's value_inference)
    "sin": np.sin, "cos": np.cos, "tan": np.tan, "sinh": np.sinh, "cosh": np.cosh,
    "tanh": np.tanh, "asin": np.arcsin, "acos": np.arccos, "atan": np.arctan,
    "atanh": np.arctanh, "erf": _erf, "sigmoid": _sigmoid, "softplus": _softplus,
    "relu": lambda x: np.maximum(x, np.float32(0)),
    "relu6": lambda x: np.minimum(np.maximum(x, np.float32(0)), np.float32(6)),
    "silu": lambda x: x * _sigmoid(x),
    "softsign": lambda x: x / (1 + np.abs(x)),
}

_UNARY_NUMERIC: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "abs": np.abs, "sign": np.sign, "square": np.square,
}


def _unary_kernel(fn: Callable[[np.ndarray], np.ndarray], widen: Callable) -> Kernel:
    def kernel(args: Args) -> tuple[np.ndarray, ...]:
        return (np.asarray(fn(widen(args["x"]))),)

    return kernel


for _name, _fn in _UNARY_FLOAT.items():
    register(_name)(_unary_kernel(_fn, _f32))
for _name, _fn in _UNARY_NUMERIC.items():
    register(_name)(_unary_kernel(_fn, _num))


@register("identity")
def identity(args: Args) -> tuple[np.ndarray, ...]:
    return (args["x"],)


@register("logical_not")
def logical_not(args: Args) -> tuple[np.ndarray, ...]:
    return (np.logical_not(args["x"]),)


@register("log")
def log(args: Args) -> tuple[np.ndarray, ...]:
    x = np.asarray(args["x"])
    return (np.log(_f32(x) + _epsilon(args, x, 1e-45)),)


@register("rsqrt")
def rsqrt(args: Args) -> tuple[np.ndarray, ...]:
    x = np.asarray(args["x"])
    return (np.float32(1) / np.sqrt(_f32(x) + _epsilon(args, x, 1e-12)),)


@register("inverse")
def inverse(args: Args) -> tuple[np.ndarray, ...]:
    x = np.asarray(args["x"])
    return (np.float32(1) / (_f32(x) + _epsilon(args, x, 1e-4)),)


@register("clip")
def clip(args: Args) -> tuple[np.ndarray, ...]:
    x = _f32(args["x"])
    return (np.minimum(np.maximum(x, _float(args, "alpha")), _float(args, "beta")),)


@register("threshold")
def threshold(args: Args) -> tuple[np.ndarray, ...]:
    return (np.maximum(_num(args["x"]), _num(args["alpha"])),)


@register("cast")
def cast(args: Args) -> tuple[np.ndarray, ...]:
    # astype, as the definition's value_inference: float -> int truncates toward zero.
    return (np.asarray(args["x"]).astype(_dtype(_str(args, "dtype"))),)


def _gelu_exact(x: np.ndarray) -> np.ndarray:
    """0.5 * x * (1 + erf(x / sqrt(2))) in float64, rounded once to float32; block by block
    (the float64 temporaries of the whole tensor cost more than the arithmetic)."""
    out = np.empty(x.shape, np.float32)
    flat, res = x.reshape(-1), out.reshape(-1)
    scratch = np.empty((8, min(flat.size, _BLOCK)), np.float64)
    for start in range(0, flat.size, _BLOCK):
        block = flat[start:start + _BLOCK]
        x64, u, erf = scratch[:3, :block.size]
        x64[...] = block
        np.divide(x64, math.sqrt(2), out=u)
        _erf64_block(u, erf, scratch[3:, :block.size])
        np.add(1, erf, out=erf)
        np.multiply(0.5, x64, out=x64)
        np.multiply(x64, erf, out=x64)
        res[start:start + _BLOCK] = x64
    return out


@register("gelu")
def gelu(args: Args) -> tuple[np.ndarray, ...]:
    mode = _str(args, "mode", "EXACT")
    x = _f32(args["x"])
    if mode == "EXACT":
        return (_gelu_exact(x),)
    if mode == "TANH_APPROXIMATION":
        inner = np.float32(math.sqrt(2 / math.pi)) * (x + np.float32(0.044715) * x * x * x)
        return (np.float32(0.5) * x * (1 + np.tanh(inner)),)
    if mode == "SIGMOID_APPROXIMATION":
        return (x * _sigmoid(np.float32(1.702) * x),)
    raise ValueError(f"gelu: unknown mode {mode!r}")


@register("leaky_relu")
def leaky_relu(args: Args) -> tuple[np.ndarray, ...]:
    x = _f32(args["x"])
    return (np.where(x < 0, x * _float(args, "alpha"), x),)


@register("elu")
def elu(args: Args) -> tuple[np.ndarray, ...]:
    x = _f32(args["x"])
    return (np.where(x > 0, x, _float(args, "alpha") * np.expm1(np.minimum(x, 0))),)


@register("thresholded_relu")
def thresholded_relu(args: Args) -> tuple[np.ndarray, ...]:
    x = _f32(args["x"])
    return (np.where(x >= _float(args, "alpha"), x, np.float32(0)),)


@register("clamped_relu")
def clamped_relu(args: Args) -> tuple[np.ndarray, ...]:
    x = _f32(args["x"])
    alpha, beta = _float(args, "alpha"), _float(args, "beta")
    return (np.minimum(np.where(x >= 0, x, alpha * x), beta),)


@register("linear_activation")
def linear_activation(args: Args) -> tuple[np.ndarray, ...]:
    return (_float(args, "alpha") * _f32(args["x"]) + _float(args, "beta"),)


@register("scaled_tanh")
def scaled_tanh(args: Args) -> tuple[np.ndarray, ...]:
    return (_float(args, "alpha") * np.tanh(_f32(args["x"]) * _float(args, "beta")),)


@register("sigmoid_hard")
def sigmoid_hard(args: Args) -> tuple[np.ndarray, ...]:
    y = _float(args, "alpha") * _f32(args["x"]) + _float(args, "beta")
    return (np.minimum(np.maximum(y, np.float32(0)), np.float32(1)),)


@register("prelu")
def prelu(args: Args) -> tuple[np.ndarray, ...]:
    x = _f32(args["x"])
    return (np.where(x > 0, x, x * _channel_param(args["alpha"], x.ndim)),)


@register("softplus_parametric")
def softplus_parametric(args: Args) -> tuple[np.ndarray, ...]:
    x = _f32(args["x"])
    alpha = _channel_param(args["alpha"], x.ndim)
    beta = _channel_param(args["beta"], x.ndim)
    return (alpha * _softplus(beta * x),)


@register("softmax")
def softmax(args: Args) -> tuple[np.ndarray, ...]:
    x = _f32(args["x"])
    axis = _int(args, "axis", -1)
    e = np.subtract(x, np.max(x, axis=axis, keepdims=True))
    np.exp(e, out=e)
    np.divide(e, np.sum(e, axis=axis, keepdims=True), out=e)
    return (e,)


# --------------------------------------------------------------------------------------------
# Reductions
# --------------------------------------------------------------------------------------------

def _reduce_axes(args: Args, rank: int) -> tuple[int, ...] | None:
    axes = _ints(args, "axes")
    return None if axes is None else tuple(_axis(a, rank) for a in axes)


def _log_sum_exp(x: np.ndarray, axes: tuple[int, ...] | None, keep: bool) -> np.ndarray:
    m = np.max(x, axis=axes, keepdims=True)
    m = np.where(np.isfinite(m), m, np.float32(0))
    s = np.log(np.sum(np.exp(x - m), axis=axes, keepdims=keep))
    return s + (m if keep else np.squeeze(m, axis=axes))


_REDUCE: dict[str, tuple[Callable[..., np.ndarray], bool]] = {
    # name: (fn(x, axes, keep), float math)
    "reduce_sum": (lambda x, a, k: np.sum(x, axis=a, keepdims=k), False),
    "reduce_prod": (lambda x, a, k: np.prod(x, axis=a, keepdims=k), False),
    "reduce_max": (lambda x, a, k: np.max(x, axis=a, keepdims=k), False),
    "reduce_min": (lambda x, a, k: np.min(x, axis=a, keepdims=k), False),
    "reduce_mean": (lambda x, a, k: np.mean(x, axis=a, keepdims=k), True),
    "reduce_l1_norm": (lambda x, a, k: np.sum(np.abs(x), axis=a, keepdims=k), False),
    "reduce_sum_square": (lambda x, a, k: np.sum(x * x, axis=a, keepdims=k), False),
    "reduce_l2_norm": (lambda x, a, k: np.sqrt(np.sum(x * x, axis=a, keepdims=k)), True),
    "reduce_log_sum": (lambda x, a, k: np.log(np.sum(x, axis=a, keepdims=k)), True),
    "reduce_log_sum_exp": (_log_sum_exp, True),
}


def _reduce_kernel(fn: Callable[..., np.ndarray], float_math: bool) -> Kernel:
    def kernel(args: Args) -> tuple[np.ndarray, ...]:
        x = np.asarray(args["x"])
        axes = _reduce_axes(args, x.ndim)
        keep = _bool(args, "keep_dims", False)
        result = np.asarray(fn(_f32(x) if float_math else _num(x), axes, keep))
        if x.dtype.kind in "iu":  # value_inference casts back to the input type
            result = result.astype(x.dtype)
        return (result,)

    return kernel


for _name, (_fn, _float_math) in _REDUCE.items():
    register(_name)(_reduce_kernel(_fn, _float_math))


def _arg_reduce(fn: Callable[..., np.ndarray]) -> Kernel:
    def kernel(args: Args) -> tuple[np.ndarray, ...]:
        x = _num(args["x"])
        axis = _axis(_int(args, "axis", -1), x.ndim)
        result = fn(x, axis=axis)
        if _bool(args, "keep_dims", False):
            result = np.expand_dims(result, axis)
        return (np.asarray(result).astype(_dtype(_str(args, "output_dtype", "int32"))),)

    return kernel


register("reduce_argmax")(_arg_reduce(np.argmax))
register("reduce_argmin")(_arg_reduce(np.argmin))


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

def _normalize(x: np.ndarray, axes: tuple[int, ...], eps: np.float32) -> np.ndarray:
    centred = x - np.mean(x, axis=axes, keepdims=True)
    var = np.mean(centred * centred, axis=axes, keepdims=True)
    np.divide(centred, np.sqrt(var + eps), out=centred)
    return centred


@register("layer_norm")
def layer_norm(args: Args) -> tuple[np.ndarray, ...]:
    x = _f32(args["x"])
    axes = _reduce_axes(args, x.ndim)
    axes = tuple(range(x.ndim)) if axes is None else tuple(sorted(axes))
    y = _normalize(x, axes, _float(args, "epsilon", 1e-5))
    param_shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    if args.get("gamma") is not None:
        np.multiply(y, _f32(args["gamma"]).reshape(param_shape), out=y)
    if args.get("beta") is not None:
        np.add(y, _f32(args["beta"]).reshape(param_shape), out=y)
    return (y,)


def _scale_shift(y: np.ndarray, args: Args) -> np.ndarray:
    if args.get("gamma") is not None:
        y = y * _channel_param(args["gamma"], y.ndim)
    if args.get("beta") is not None:
        y = y + _channel_param(args["beta"], y.ndim)
    return y


@register("batch_norm")
def batch_norm(args: Args) -> tuple[np.ndarray, ...]:
    x = _f32(args["x"])
    mean = _channel_param(args["mean"], x.ndim)
    var = _channel_param(args["variance"], x.ndim)
    y = (x - mean) / np.sqrt(var + _float(args, "epsilon", 1e-5))
    return (_scale_shift(y, args),)


@register("instance_norm")
def instance_norm(args: Args) -> tuple[np.ndarray, ...]:
    x = _f32(args["x"])
    y = _normalize(x, tuple(range(2, x.ndim)), _float(args, "epsilon", 1e-5))
    return (_scale_shift(y, args),)


@register("l2_norm")
def l2_norm(args: Args) -> tuple[np.ndarray, ...]:
    """x / sqrt(sum(x^2) + epsilon) over the last three axes (leading axes are batch)."""
    x = _f32(args["x"])
    if x.ndim < 3:
        raise ValueError(f"l2_norm needs rank >= 3, got {x.ndim}")
    axes = (x.ndim - 3, x.ndim - 2, x.ndim - 1)
    square_sum = np.sum(x * x, axis=axes, keepdims=True)
    return (x / np.sqrt(square_sum + _float(args, "epsilon", 1e-6)),)


# --------------------------------------------------------------------------------------------
# Linear algebra and attention
# --------------------------------------------------------------------------------------------

@register("linear")
def linear(args: Args) -> tuple[np.ndarray, ...]:
    y = np.matmul(_f32(args["x"]), _f32(args["weight"]).T)
    if args.get("bias") is not None:
        y = y + _f32(args["bias"])  # broadcasting may widen y: not in place
    return (y,)


def _swap_last(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2) if a.ndim >= 2 else a


def _blas_ready(a: np.ndarray) -> np.ndarray:
    """A stack of matrices NumPy hands to BLAS: views with other strides (a transposed
    [heads, seq, dim] of attention) fall back to NumPy's own loop, 50 times slower."""
    if a.ndim <= 2 or a.flags.c_contiguous or a.dtype.kind != "f":
        return a
    return np.ascontiguousarray(a)


@register("matmul")
def matmul(args: Args) -> tuple[np.ndarray, ...]:
    x, y = _num(args["x"]), _num(args["y"])
    if x.dtype != y.dtype:  # iOS17: one side may be a differently typed constant
        x, y = _f32(x), _f32(y)
    if _bool(args, "transpose_x", False):
        x = _swap_last(x)
    if _bool(args, "transpose_y", False):
        y = _swap_last(y)
    return (np.asarray(np.matmul(_blas_ready(x), _blas_ready(y))),)


@register("einsum")
def einsum(args: Args) -> tuple[np.ndarray, ...]:
    """Any two-operand einsum; labels of size 1 broadcast, as in the definition's
    value_inference."""
    equation = _str(args, "equation").replace(" ", "")
    operands = [_f32(v) for v in args["values"]]
    inputs = equation.split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for labels, operand in zip(inputs, operands, strict=True):
        for label, size in zip(labels, operand.shape, strict=True):
            sizes[label] = max(sizes.get(label, 1), size)
    operands = [np.broadcast_to(op, tuple(sizes[c] for c in labels))
                for labels, op in zip(inputs, operands, strict=True)]
    return (np.einsum(equation, *operands, optimize=True),)


def _conv_pads(args: Args, spatial: tuple[int, ...], kernel: tuple[int, ...],
               strides: list[int], dilations: list[int]) -> list[tuple[int, int]]:
    pad_type = _str(args, "pad_type", "valid").lower()
    n = len(spatial)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        pad = _ints(args, "pad") or [0] * (2 * n)
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    if pad_type in ("same", "same_lower"):
        pads = []
        for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
            effective = (k - 1) * d + 1
            total = max(0, (math.ceil(size / s) - 1) * s + effective - size)
            small = total // 2  # "same": extra padding after; "same_lower": before
            pads.append((small, total - small) if pad_type == "same" else (total - small, small))
        return pads
    raise ValueError(f"conv: unknown pad_type {pad_type!r}")


@register("conv")
def conv(args: Args) -> tuple[np.ndarray, ...]:
    """N-d convolution, x [N, C_in, *D], weight [C_out, C_in/groups, *K], as windows of the
    padded input times the weights (one batched matmul per group)."""
    x, w = _f32(args["x"]), _f32(args["weight"])
    n, c_in = x.shape[:2]
    c_out, kernel = w.shape[0], w.shape[2:]
    nd = len(kernel)
    strides = _ints(args, "strides") or [1] * nd
    dilations = _ints(args, "dilations") or [1] * nd
    groups = _int(args, "groups", 1)
    pads = _conv_pads(args, x.shape[2:], kernel, strides, dilations)
    x = np.pad(x, [(0, 0), (0, 0)] + pads)
    effective = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True))
    windows = sliding_window_view(x, effective, axis=tuple(range(2, 2 + nd)))
    windows = windows[(slice(None), slice(None))
                      + tuple(slice(None, None, s) for s in strides)
                      + tuple(slice(None, None, d) for d in dilations)]
    out_spatial = windows.shape[2:2 + nd]
    positions = math.prod(out_spatial)
    # [N, G, C_in/G, *out, *K] -> [N, G, positions, C_in/G * prod(K)]
    windows = windows.reshape((n, groups, c_in // groups) + out_spatial + kernel)
    order = (0, 1) + tuple(range(3, 3 + nd)) + (2,) + tuple(range(3 + nd, 3 + 2 * nd))
    cols = windows.transpose(order).reshape(n, groups, positions, -1)
    wg = w.reshape(groups, c_out // groups, -1).transpose(0, 2, 1)  # [G, C_in/G*prod(K), M]
    y = np.matmul(cols, wg)  # [N, G, positions, M]
    y = y.transpose(0, 1, 3, 2).reshape((n, c_out) + out_spatial)
    if args.get("bias") is not None:
        y = y + _channel_param(args["bias"], y.ndim)
    return (y,)


def _pool_windows(args: Args, x: np.ndarray, pad_value: float) -> tuple[np.ndarray, np.ndarray]:
    """Pooling windows of ``x`` (padded with ``pad_value``; window axes last) and the
    matching windows of a 0/1 mask of what counts in an average (the input, plus the
    padding unless ``exclude_padding_from_average``; never the ceil_mode overhang)."""
    nd = x.ndim - 2
    spatial = x.shape[2:]
    kernel = tuple(_ints(args, "kernel_sizes"))
    strides = _ints(args, "strides") or [1] * nd
    pads = _conv_pads(args, spatial, kernel, strides, [1] * nd)
    overhang = [0] * nd
    if _bool(args, "ceil_mode", False):  # as coremltools' spatial_dimensions_out_shape
        for i, (size, k, s, (before, after)) in enumerate(zip(spatial, kernel, strides, pads)):
            total = before + after
            out = (size + total - k + s - 1) // s + 1
            if total > 0 and (out - 1) * s >= size + total / 2:
                out -= 1
            overhang[i] = max(0, (out - 1) * s + k - size - total)
    exclude = _bool(args, "exclude_padding_from_average", False)
    counted = np.ones((1, 1) + spatial, np.float32)
    counted = np.pad(counted, [(0, 0), (0, 0)] + pads, constant_values=0 if exclude else 1)
    layout = [(0, 0), (0, 0)] + [(0, extra) for extra in overhang]
    counted = np.pad(counted, layout)
    x = np.pad(x, [(0, 0), (0, 0)] + pads, constant_values=pad_value)
    x = np.pad(x, layout, constant_values=pad_value)
    picks = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
    axes = tuple(range(2, 2 + nd))
    return (sliding_window_view(x, kernel, axis=axes)[picks],
            sliding_window_view(counted, kernel, axis=axes)[picks])


def _window_axes(x: np.ndarray) -> tuple[int, ...]:
    nd = x.ndim - 2
    return tuple(range(-nd, 0))


@register("max_pool")
def max_pool(args: Args) -> tuple[np.ndarray, ...]:
    x = _f32(args["x"])
    windows, _ = _pool_windows(args, x, -np.inf)
    return (np.max(windows, axis=_window_axes(x)),)


@register("avg_pool")
def avg_pool(args: Args) -> tuple[np.ndarray, ...]:
    x = _f32(args["x"])
    windows, counted = _pool_windows(args, x, 0.0)
    axes = _window_axes(x)
    return (np.sum(windows, axis=axes) / np.sum(counted, axis=axes),)


@register("l2_pool")
def l2_pool(args: Args) -> tuple[np.ndarray, ...]:
    x = _f32(args["x"])
    windows, _ = _pool_windows(args, x * x, 0.0)
    return (np.sqrt(np.sum(windows, axis=_window_axes(x))),)


@register("scaled_dot_product_attention")
def scaled_dot_product_attention(args: Args) -> tuple[np.ndarray, ...]:
    q, k, v = _f32(args["query"]), _f32(args["key"]), _f32(args["value"])
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) * np.float32(1 / math.sqrt(q.shape[-1]))
    mask = args.get("attn_mask")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype == np.bool_:
            scores = np.where(mask, scores, np.float32(-np.inf))
        else:
            scores = scores + _f32(mask)
    e = np.exp(scores - np.max(scores, axis=-1, keepdims=True))
    weights = e / np.sum(e, axis=-1, keepdims=True)
    return (np.matmul(weights, v),)


# --------------------------------------------------------------------------------------------
# Shapes, slicing and copying
# --------------------------------------------------------------------------------------------

@register("reshape")
def reshape(args: Args) -> tuple[np.ndarray, ...]:
    """``shape`` may hold one -1 and zeros; a 0 copies the dimension of ``x`` counted from
    the right (iOS17; the same as iOS15's rule when ranks agree), 1 beyond ``x``'s rank."""
    x = np.asarray(args["x"])
    shape = _ints(args, "shape") or []
    if 0 in shape:
        rev_in = x.shape[::-1]
        rev = shape[::-1]
        rev = [(rev_in[i] if i < len(rev_in) else 1) if s == 0 else s for i, s in enumerate(rev)]
        shape = rev[::-1]
    return (x.reshape(shape),)


@register("transpose")
def transpose(args: Args) -> tuple[np.ndarray, ...]:
    return (np.transpose(args["x"], _ints(args, "perm")),)


@register("expand_dims")
def expand_dims(args: Args) -> tuple[np.ndarray, ...]:
    x = np.asarray(args["x"])
    axes = _ints(args, "axes") or []
    out_rank = x.ndim + len(axes)
    return (np.expand_dims(x, tuple(_axis(a, out_rank) for a in axes)),)


@register("squeeze")
def squeeze(args: Args) -> tuple[np.ndarray, ...]:
    """Axes of size other than 1 are left alone (PyTorch's rule, as the definition says)."""
    x = np.asarray(args["x"])
    axes = _ints(args, "axes")
    if axes is None:
        return (np.squeeze(x),)
    axes = {_axis(a, x.ndim) for a in axes}
    return (np.squeeze(x, axis=tuple(a for a in axes if x.shape[a] == 1)),)


@register("concat")
def concat(args: Args) -> tuple[np.ndarray, ...]:
    values = [np.asarray(v) for v in args["values"]]
    axis = _int(args, "axis")
    if all(v.ndim == 0 for v in values):
        return (np.stack(values),)
    if _bool(args, "interleave", False):
        axis = _axis(axis, values[0].ndim)
        stacked = np.stack(values, axis=axis + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return (stacked.reshape(shape),)
    return (np.concatenate(values, axis=axis),)


@register("stack")
def stack(args: Args) -> tuple[np.ndarray, ...]:
    return (np.stack([np.asarray(v) for v in args["values"]], axis=_int(args, "axis")),)


@register("split")
def split(args: Args) -> tuple[np.ndarray, ...]:
    x = np.asarray(args["x"])
    axis = _axis(_int(args, "axis"), x.ndim)
    sizes = _ints(args, "split_sizes")
    if sizes is None:
        parts = _int(args, "num_splits")
        if x.shape[axis] % parts:
            raise ValueError(f"split: {parts} does not divide dimension {x.shape[axis]}")
        sizes = [x.shape[axis] // parts] * parts
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


_SQUEEZE_STRIDE = np.iinfo(np.int32).max


def _index_slices(args: Args, rank: int) -> tuple[tuple[slice, ...], list[int]]:
    """The numpy slices of slice_by_index / slice_update, and the axes squeeze_mask drops."""
    begin = _ints(args, "begin") or [0] * rank
    end = _ints(args, "end") or [0] * rank
    stride = _ints(args, "stride") or [1] * rank
    begin_mask = _bools(args, "begin_mask", rank)
    end_mask = _bools(args, "end_mask", rank)
    squeeze_mask = _bools(args, "squeeze_mask", rank)
    slices, squeezed = [], []
    for i in range(rank):
        b = None if begin_mask[i] else begin[i]
        e = None if end_mask[i] else end[i]
        if squeeze_mask[i]:  # one element at begin (coremltools' "infinite stride")
            slices.append(slice(b, None, _SQUEEZE_STRIDE))
            squeezed.append(i)
        else:
            slices.append(slice(b, e, stride[i]))
    return tuple(slices), squeezed


@register("slice_by_index")
def slice_by_index(args: Args) -> tuple[np.ndarray, ...]:
    x = np.asarray(args["x"])
    slices, squeezed = _index_slices(args, x.ndim)
    return (np.squeeze(x[slices], axis=tuple(squeezed)),)


@register("slice_update")
def slice_update(args: Args) -> tuple[np.ndarray, ...]:
    x = np.array(args["x"], copy=True)
    slices, _ = _index_slices(args, x.ndim)
    x[slices] = np.asarray(args["update"]).reshape(x[slices].shape)
    return (x,)


class State:
    """A state the program reads (``read_state``) and writes (``coreml_update_state``), held by
    the session between runs: a tensor of the state's declared type (Core ML: float16)."""

    def __init__(self, dtype: str, shape: tuple[int | None, ...]):
        if any(d is None for d in shape):
            raise ValueError(f"a state of unknown shape {shape}")
        self.value = np.zeros(shape, dtype)

    def write(self, value: Any) -> None:
        """``value`` into the state, rounded to its type; a shape other than the state's is
        refused (Core ML's states are fixed)."""
        value = np.asarray(value)
        if value.shape != self.value.shape:
            raise ValueError(f"a state of shape {self.value.shape} cannot take {value.shape}")
        self.value[...] = value.astype(self.value.dtype)


@register("read_state")
def read_state(args: Args) -> tuple[np.ndarray, ...]:
    """The state's current value (a copy: later writes do not change what was read)."""
    return (args["input"].value.copy(),)


@register("write_state")
def write_state(args: Args) -> tuple[np.ndarray, ...]:
    """``data`` written into the state ``input``; no result. A saved program holds this op:
    coremltools lowers ``coreml_update_state`` to write_state (+ read_state where the value
    is used again)."""
    args["input"].write(args["data"])
    return ()


@register("coreml_update_state")
def coreml_update_state(args: Args) -> tuple[np.ndarray, ...]:
    """``value`` written into ``state``; returns what the state now holds (coremltools'
    in-memory form of write_state + read_state)."""
    state = args["state"]
    state.write(args["value"])
    return (state.value.copy(),)


@register("slice_by_size")
def slice_by_size(args: Args) -> tuple[np.ndarray, ...]:
    x = np.asarray(args["x"])
    begin, size = _ints(args, "begin"), _ints(args, "size")
    slices = []
    for dim, b, s in zip(x.shape, begin, size, strict=True):
        b = b + dim if b < 0 else b
        slices.append(slice(b, None) if s == -1 else slice(b, b + s))
    return (x[tuple(slices)],)


def _wrap_indices(indices: Any, dims: Any) -> np.ndarray:
    """Indices as intp, negative ones counted from the end (iOS15/16; iOS17 calls them out
    of range, so the wrap changes nothing defined there)."""
    idx = np.asarray(indices).astype(np.intp)
    return np.where(idx < 0, idx + dims, idx)


@register("gather")
def gather(args: Args) -> tuple[np.ndarray, ...]:
    x = np.asarray(args["x"])
    axis = _axis(_int(args, "axis", 0), x.ndim)
    b = _int(args, "batch_dims", 0)
    idx = _wrap_indices(args["indices"], x.shape[axis])
    if b == 0:
        return (np.take(x, idx, axis=axis),)
    # Batch dims: flatten them to one, gather per batch with a broadcast batch index.
    batch_shape, nb = x.shape[:b], math.prod(x.shape[:b])
    xm = np.moveaxis(x.reshape((nb,) + x.shape[b:]), axis - b + 1, 1)  # [B, A, pre, post]
    ir = idx.reshape((nb,) + idx.shape[b:])
    batch = np.arange(nb).reshape((nb,) + (1,) * (ir.ndim - 1))
    g = xm[batch, ir]  # [B, I..., pre..., post...]
    ni, npre = ir.ndim - 1, axis - b
    perm = ([0] + list(range(1 + ni, 1 + ni + npre)) + list(range(1, 1 + ni))
            + list(range(1 + ni + npre, g.ndim)))
    g = g.transpose(perm)
    return (g.reshape(batch_shape + g.shape[1:]),)


@register("gather_nd")
def gather_nd(args: Args) -> tuple[np.ndarray, ...]:
    x = np.asarray(args["x"])
    b = _int(args, "batch_dims", 0)
    indices = np.asarray(args["indices"])
    depth = indices.shape[-1]
    nb = math.prod(x.shape[:b])
    xr = x.reshape((nb,) + x.shape[b:])
    idx = _wrap_indices(indices, np.array(x.shape[b:b + depth], dtype=np.intp))
    idx = idx.reshape(nb, -1, depth)
    g = xr[(np.arange(nb)[:, None],) + tuple(idx[..., i] for i in range(depth))]
    return (g.reshape(indices.shape[:-1] + x.shape[b + depth:]),)


@register("gather_along_axis")
def gather_along_axis(args: Args) -> tuple[np.ndarray, ...]:
    x = np.asarray(args["x"])
    axis = _axis(_int(args, "axis", 0), x.ndim)
    idx = _wrap_indices(args["indices"], x.shape[axis])
    return (np.take_along_axis(x, idx, axis=axis),)


_SCATTER_UFUNCS = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
                   "max": np.maximum, "min": np.minimum}


def _scatter_into(data: np.ndarray, index: Any, updates: np.ndarray, mode: str) -> np.ndarray:
    if mode == "update":
        data[index] = updates
    elif mode in _SCATTER_UFUNCS:
        _SCATTER_UFUNCS[mode].at(data, index, updates.astype(data.dtype))
    else:
        raise ValueError(f"scatter: unknown mode {mode!r}")
    return data


@register("scatter")
def scatter(args: Args) -> tuple[np.ndarray, ...]:
    data = np.array(_num(args["data"]), copy=True)
    axis = _axis(_int(args, "axis", 0), data.ndim)
    idx = _wrap_indices(args["indices"], data.shape[axis])
    moved = np.moveaxis(data, axis, 0)  # a view: writes land in data
    updates = np.moveaxis(_num(args["updates"]), list(range(axis, axis + idx.ndim)),
                          list(range(idx.ndim)))
    _scatter_into(moved, idx, updates, _str(args, "mode", "add"))
    return (data,)


def _along_axis_index(idx: np.ndarray, axis: int) -> tuple[np.ndarray, ...]:
    grids = list(np.ogrid[tuple(slice(0, n) for n in idx.shape)])
    grids[axis] = idx
    return tuple(grids)


@register("scatter_along_axis")
def scatter_along_axis(args: Args) -> tuple[np.ndarray, ...]:
    data = np.array(_num(args["data"]), copy=True)
    axis = _axis(_int(args, "axis", 0), data.ndim)
    idx = _wrap_indices(args["indices"], data.shape[axis])
    index = _along_axis_index(idx, axis)
    _scatter_into(data, index, _num(args["updates"]), _str(args, "mode", "add"))
    return (data,)


@register("scatter_nd")
def scatter_nd(args: Args) -> tuple[np.ndarray, ...]:
    data = np.array(_num(args["data"]), copy=True)
    indices = np.asarray(args["indices"])
    depth = indices.shape[-1]
    idx = _wrap_indices(indices, np.array(data.shape[:depth], dtype=np.intp))
    index = tuple(idx[..., i] for i in range(depth))
    _scatter_into(data, index, _num(args["updates"]), _str(args, "mode", "add"))
    return (data,)


@register("select")
def select(args: Args) -> tuple[np.ndarray, ...]:
    a, b = _num(args["a"]), _num(args["b"])
    if a.dtype != b.dtype:
        a, b = _f32(a), _f32(b)
    return (np.where(np.asarray(args["cond"]).astype(bool), a, b),)


@register("tile")
def tile(args: Args) -> tuple[np.ndarray, ...]:
    return (np.tile(args["x"], _ints(args, "reps")),)


@register("pad")
def pad(args: Args) -> tuple[np.ndarray, ...]:
    """``pad`` = [before, after] pairs for the last len(pad)/2 axes."""
    x = np.asarray(args["x"])
    pads = _ints(args, "pad") or []
    pairs = [(0, 0)] * (x.ndim - len(pads) // 2)
    pairs += [(pads[2 * i], pads[2 * i + 1]) for i in range(len(pads) // 2)]
    mode = _str(args, "mode", "constant")
    if mode == "constant":
        value = args.get("constant_val")
        value = 0 if value is None else np.asarray(value).astype(x.dtype)
        return (np.pad(x, pairs, mode="constant", constant_values=value),)
    if mode in ("reflect", "replicate"):
        return (np.pad(x, pairs, mode="reflect" if mode == "reflect" else "edge"),)
    raise ValueError(f"pad: unknown mode {mode!r}")


def _fill_value(args: Args) -> np.ndarray:
    value = args.get("value")
    return np.float32(0) if value is None else _num(value)


@register("fill")
def fill(args: Args) -> tuple[np.ndarray, ...]:
    return (np.full(tuple(_ints(args, "shape")), _fill_value(args)),)


@register("fill_like")
def fill_like(args: Args) -> tuple[np.ndarray, ...]:
    return (np.full(np.shape(args["ref_tensor"]), _fill_value(args)),)


@register("shape")
def shape(args: Args) -> tuple[np.ndarray, ...]:
    return (np.array(np.shape(args["x"]), dtype=np.int32),)


@register("range_1d")
def range_1d(args: Args) -> tuple[np.ndarray, ...]:
    start = np.asarray(args["start"])
    if start.dtype.kind in "iu":
        return (np.arange(_int(args, "start"), _int(args, "end"), _int(args, "step"),
                          dtype=np.int32),)
    values = np.arange(float(start), float(np.asarray(args["end"])),
                       float(np.asarray(args["step"])))
    return (values.astype(np.float32),)


@register("band_part")
def band_part(args: Args) -> tuple[np.ndarray, ...]:
    x = np.asarray(args["x"])
    lower, upper = _int(args, "lower", -1), _int(args, "upper", -1)
    rows = np.arange(x.shape[-2])[:, None]
    cols = np.arange(x.shape[-1])[None, :]
    keep = ((lower < 0) | (rows - cols <= lower)) & ((upper < 0) | (cols - rows <= upper))
    return (np.where(keep, x, np.zeros((), x.dtype)),)


@register("cumsum")
def cumsum(args: Args) -> tuple[np.ndarray, ...]:
    x = _num(args["x"])
    axis = _axis(_int(args, "axis", 0), x.ndim)
    reverse = _bool(args, "reverse", False)
    if reverse:
        x = np.flip(x, axis)
    y = np.cumsum(x, axis=axis, dtype=x.dtype)
    if _bool(args, "exclusive", False):
        head = np.zeros_like(np.take(y, [0], axis=axis))
        y = np.concatenate([head, np.delete(y, -1, axis=axis)], axis=axis)
    return (np.flip(y, axis) if reverse else y,)


@register("one_hot")
def one_hot(args: Args) -> tuple[np.ndarray, ...]:
    indices = np.asarray(args["indices"])
    depth = _int(args, "one_hot_vector_size")
    axis = _int(args, "axis", -1)
    axis = indices.ndim + axis + 1 if axis < 0 else axis
    on = np.asarray(args["on_value"]) if args.get("on_value") is not None else np.int32(1)
    off = np.asarray(args["off_value"]) if args.get("off_value") is not None else np.int32(0)
    hot = np.expand_dims(indices, axis) == np.arange(depth).reshape(
        (depth,) + (1,) * (indices.ndim - axis))
    return (np.where(hot, on, off).astype(np.result_type(on, off)),)


def _sort_order(x: np.ndarray, axis: int, ascending: bool) -> np.ndarray:
    """Stable argsort; descending sorts ``-x`` (ties keep index order)."""
    if ascending:
        return np.argsort(x, axis=axis, kind="stable")
    key = -x.astype(np.int64) if x.dtype.kind in "iub" else -x
    return np.argsort(key, axis=axis, kind="stable")


@register("argsort")
def argsort(args: Args) -> tuple[np.ndarray, ...]:
    x = _num(args["x"])
    order = _sort_order(x, _int(args, "axis", -1), _bool(args, "ascending", False))
    return (order.astype(np.int32),)


@register("topk")
def topk(args: Args) -> tuple[np.ndarray, ...]:
    """Values and indices of the k largest (smallest with ``ascending``), sorted; iOS16
    ``return_indices=False`` gives the values alone, iOS17 ``k=-1`` takes all."""
    x = _num(args["x"])
    axis = _axis(_int(args, "axis", -1), x.ndim)
    k = _int(args, "k", 1)
    k = x.shape[axis] if k == -1 else k
    order = _sort_order(x, axis, _bool(args, "ascending", False))
    indices = np.take(order, np.arange(k), axis=axis)
    values = np.take_along_axis(x, indices, axis=axis)
    if not _bool(args, "return_indices", True):
        return (values,)
    return values, indices.astype(_dtype(_str(args, "output_indices_dtype", "int32")))


@register("flatten2d")
def flatten2d(args: Args) -> tuple[np.ndarray, ...]:
    x = np.asarray(args["x"])
    axis = _int(args, "axis", 1)
    return (x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:])),)


@register("reverse")
def reverse(args: Args) -> tuple[np.ndarray, ...]:
    axes = _ints(args, "axes")
    return (np.flip(args["x"], axis=None if axes is None else tuple(axes)),)


@register("non_zero")
def non_zero(args: Args) -> tuple[np.ndarray, ...]:
    return (np.transpose(np.nonzero(args["x"])).astype(np.int32),)


@register("sliding_windows")
def sliding_windows(args: Args) -> tuple[np.ndarray, ...]:
    x = np.asarray(args["x"])
    axis = _axis(_int(args, "axis"), x.ndim)
    size, stride = _int(args, "size"), _int(args, "stride", 1)
    windows = sliding_window_view(x, size, axis=axis)  # window axis last
    windows = np.take(windows, np.arange(0, windows.shape[axis], stride), axis=axis)
    return (np.moveaxis(windows, -1, axis + 1),)


def _scalars(value: Any) -> list[Any]:
    """A tuple of scalars, given as a list of 0-d arrays or as one array."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [v.item() for item in values for v in np.asarray(item).reshape(-1)]


@register("reshape_like")
def reshape_like(args: Args) -> tuple[np.ndarray, ...]:
    refs = args["ref_tensors"]
    refs = list(refs) if isinstance(refs, (list, tuple)) else [refs]
    shape: list[int] = []
    for ref, begin, end, end_mask in zip(refs, _scalars(args["begins"]), _scalars(args["ends"]),
                                         _scalars(args["end_masks"]), strict=True):
        dims = np.shape(ref)
        shape += dims[int(begin):] if end_mask else dims[int(begin):int(end)]
    return (np.asarray(args["x"]).reshape(shape),)


@register("pixel_shuffle")
def pixel_shuffle(args: Args) -> tuple[np.ndarray, ...]:
    x = np.asarray(args["x"])
    f = _int(args, "upscale_factor")
    n, c, h, w = x.shape
    y = x.reshape(n, c // (f * f), f, f, h, w).transpose(0, 1, 4, 2, 5, 3)
    return (y.reshape(n, c // (f * f), h * f, w * f),)


@register("pixel_unshuffle")
def pixel_unshuffle(args: Args) -> tuple[np.ndarray, ...]:
    x = np.asarray(args["x"])
    f = _int(args, "downscale_factor")
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // f, f, w // f, f).transpose(0, 1, 3, 5, 2, 4)
    return (y.reshape(n, c * f * f, h // f, w // f),)


# --------------------------------------------------------------------------------------------
# Quantisation and weight decompression (constexpr_*)
# --------------------------------------------------------------------------------------------

def _per_axis(param: Any, rank: int, axis: int | None) -> np.ndarray:
    """A scalar or an [axis]-vector quantisation parameter, broadcastable to the data."""
    p = _f32(param)
    if p.ndim == 0 or p.ndim == rank:
        return p
    shape = [1] * rank
    shape[_axis(axis or 0, rank)] = -1
    return p.reshape(shape)


@register("constexpr_affine_dequantize")
def constexpr_affine_dequantize(args: Args) -> tuple[np.ndarray, ...]:
    """iOS16: scale * (quantized_data - zero_point), scale / zero_point scalar or along axis."""
    q = np.asarray(args["quantized_data"])
    axis = _int(args, "axis", 0)
    zero = _per_axis(args["zero_point"], q.ndim, axis)
    return ((_f32(q) - zero) * _per_axis(args["scale"], q.ndim, axis),)


@register("dequantize")
def dequantize(args: Args) -> tuple[np.ndarray, ...]:
    """iOS17: scale * (input - zero_point)."""
    q = np.asarray(args["input"])
    axis = _int(args, "axis", 0)
    y = _f32(q)
    if args.get("zero_point") is not None:
        y = y - _per_axis(args["zero_point"], q.ndim, axis)
    return (y * _per_axis(args["scale"], q.ndim, axis),)


@register("quantize")
def quantize(args: Args) -> tuple[np.ndarray, ...]:
    """iOS17: clip(round_half_even(input / scale) + zero_point) into int8 / uint8."""
    x = _f32(args["input"])
    axis = _int(args, "axis", 0)
    dtype = _dtype(_str(args, "output_dtype"))
    q = np.round(x / _per_axis(args["scale"], x.ndim, axis))
    if args.get("zero_point") is not None:
        q = q + _per_axis(args["zero_point"], x.ndim, axis)
    info = np.iinfo(dtype)
    return (np.clip(q, info.min, info.max).astype(dtype),)


@register("constexpr_cast")
def constexpr_cast(args: Args) -> tuple[np.ndarray, ...]:
    return (np.asarray(args["source_val"]).astype(_dtype(_str(args, "output_dtype"))),)


def _blocked(shape: tuple[int, ...], blocks: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """Shapes that split each axis of ``shape`` into (count, block) for per-block parameters:
    the data's ``[n0, b0, n1, b1, ...]`` and the parameters' ``[n0, 1, n1, 1, ...]``."""
    data_shape, param_shape = [], []
    for size, count in zip(shape, blocks, strict=True):
        data_shape += [count, size // count]
        param_shape += [count, 1]
    return data_shape, param_shape


def _blockwise_shift_scale(data: np.ndarray, scale: Any, offset: Any) -> np.ndarray:
    scale = _f32(scale)
    data_shape, param_shape = _blocked(data.shape, scale.shape)
    y = _f32(data).reshape(data_shape)
    if offset is not None:
        y = y - _f32(offset).reshape(param_shape)
    return (y * scale.reshape(param_shape)).reshape(data.shape)


@register("constexpr_blockwise_shift_scale")
def constexpr_blockwise_shift_scale(args: Args) -> tuple[np.ndarray, ...]:
    """iOS18: scale * (data - offset), one scale / offset per block; block size along each
    axis is data.shape / scale.shape."""
    data = np.asarray(args["data"])
    return (_blockwise_shift_scale(data, args["scale"], args.get("offset")),)


def _unpack_bits(packed: Any, nbits: int, count: int) -> np.ndarray:
    """``count`` unsigned ``nbits``-bit values packed LSB first, byte after byte (an element
    may straddle two bytes: its low bits end one byte, its high bits start the next)."""
    bits = np.unpackbits(np.asarray(packed).astype(np.uint8), bitorder="little",
                         count=count * nbits)
    return np.packbits(bits.reshape(count, nbits), axis=-1, bitorder="little").reshape(count)


def _lut_to_dense(indices: np.ndarray, lut: np.ndarray, vector_axis: int | None) -> np.ndarray:
    """iOS18 palettisation: lut [*groups, 2^nbits, V] holds one table per block of indices;
    each index picks a V-vector laid out along ``vector_axis``."""
    rank = indices.ndim
    palettes, vector = lut.shape[-2:]
    index_shape, table_shape = _blocked(indices.shape, lut.shape[:rank])
    idx = indices.reshape(index_shape)[..., None, None]
    tables = lut.reshape(table_shape + [palettes, vector])
    out = np.take_along_axis(tables, idx, axis=-2)[..., 0, :]
    out = out.reshape(indices.shape + (vector,))
    if vector == 1:
        return out[..., 0]
    axis = _axis(int(vector_axis), rank)
    out = np.moveaxis(out, -1, axis + 1)
    shape = list(indices.shape)
    shape[axis] *= vector
    return out.reshape(shape)


@register("constexpr_lut_to_dense")
def constexpr_lut_to_dense(args: Args) -> tuple[np.ndarray, ...]:
    """iOS16: ``indices`` is a flat uint8 buffer of packed log2(len(lut))-bit indices and
    ``shape`` the output shape. iOS18: ``indices`` is the (unpacked) index tensor and ``lut``
    has rank rank(indices) + 2 (see ``_lut_to_dense``)."""
    lut = np.asarray(args["lut"])
    if args.get("shape") is not None:
        out_shape = tuple(_ints(args, "shape"))
        nbits = int(round(math.log2(lut.size)))
        flat = _unpack_bits(args["indices"], nbits, math.prod(out_shape))
        return (lut.reshape(-1)[flat].reshape(out_shape),)
    vector_axis = args.get("vector_axis")
    return (_lut_to_dense(np.asarray(args["indices"]), lut,
                          None if vector_axis is None else int(np.asarray(vector_axis))),)


def _sparse_to_dense(nonzero: np.ndarray, mask: np.ndarray) -> np.ndarray:
    dense = np.zeros(mask.shape, dtype=nonzero.dtype)
    dense[mask != 0] = nonzero
    return dense


@register("constexpr_sparse_to_dense")
def constexpr_sparse_to_dense(args: Args) -> tuple[np.ndarray, ...]:
    """iOS16: ``mask`` is a flat uint8 bitmask (LSB first) over the ``shape`` elements;
    iOS18: ``mask`` is a 0/1 tensor of the output's shape. Set bits take ``nonzero_data``
    in row-major order, the rest is zero."""
    nonzero = np.asarray(args["nonzero_data"])
    mask = np.asarray(args["mask"])
    if args.get("shape") is not None:
        out_shape = tuple(_ints(args, "shape"))
        bits = np.unpackbits(mask.astype(np.uint8), bitorder="little",
                             count=math.prod(out_shape))
        mask = bits.reshape(out_shape)
    return (_sparse_to_dense(nonzero, mask),)


@register("constexpr_lut_to_sparse")
def constexpr_lut_to_sparse(args: Args) -> tuple[np.ndarray, ...]:
    """iOS18: palettised sparse data -> (mask, nonzero values); vector palettisation
    widens the mask along ``vector_axis``."""
    mask = np.asarray(args["indices_mask"])
    lut = np.asarray(args["lut"])
    vector_axis = args.get("vector_axis")
    vector_axis = None if vector_axis is None else int(np.asarray(vector_axis))
    indices = _sparse_to_dense(np.asarray(args["indices_nonzero_data"]), mask)
    dense = _lut_to_dense(indices, lut, vector_axis)
    if vector_axis is not None:
        mask = np.repeat(mask, lut.shape[-1], axis=vector_axis)
    return mask, dense[mask != 0]


@register("constexpr_sparse_blockwise_shift_scale")
def constexpr_sparse_blockwise_shift_scale(args: Args) -> tuple[np.ndarray, ...]:
    """iOS18: sparse quantised data -> (mask, dequantised nonzero values)."""
    mask = np.asarray(args["data_mask"])
    data = _sparse_to_dense(np.asarray(args["nonzero_data"]), mask)
    dense = _blockwise_shift_scale(data, args["scale"], args.get("offset"))
    return mask, dense[mask != 0]


WIDENED_PARAMS.update({name: frozenset(params) for name, params in {
    "matmul": ("x", "y"), "linear": ("x", "weight", "bias"), "layer_norm": ("x", "gamma", "beta"),
    "batch_norm": ("x", "mean", "variance", "gamma", "beta"),
    "instance_norm": ("x", "gamma", "beta"), "conv": ("x", "weight", "bias"), "select": ("a", "b"),
    "scaled_dot_product_attention": ("query", "key", "value", "attn_mask"),
}.items()})

del _name, _fn, _float_math
