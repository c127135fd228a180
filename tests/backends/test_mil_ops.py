"""The NumPy MIL kernels (``mtconvert.backends.coreml.ops``) against independent references.

Each op is checked against PyTorch's functional ops or a NumPy formula written here, and,
where the coremltools op definition has one, against coremltools' own ``value_inference``
(``materialized_val_inference`` for the weight-decompression ``constexpr_*`` ops, whose bit
packing comes from coremltools' own helpers). Float32 results must agree to 1e-6.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtconvert.backends.coreml import ops
from mtconvert.backends.coreml._ct import coremltools

ct = coremltools()
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import Function, types  # noqa: E402
from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry  # noqa: E402
from coremltools.optimize import _utils as ct_opt  # noqa: E402

iOS15, iOS16, iOS17, iOS18 = ct.target.iOS15, ct.target.iOS16, ct.target.iOS17, ct.target.iOS18
f32 = np.float32


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _arg(value: Any) -> Any:
    """A builder-style argument as the interpreter hands it over: Python scalars become 0-d
    arrays, lists of numbers int32 / bool vectors, lists of arrays stay lists."""
    if isinstance(value, (bool, np.bool_)):
        return np.array(value)
    if isinstance(value, int):
        return np.array(value, np.int32)
    if isinstance(value, float):
        return np.array(value, f32)
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, np.ndarray) for v in value):
            return list(value)
        if value and all(isinstance(v, (bool, np.bool_)) for v in value):
            return np.array(value, bool)
        return np.array(value, np.int32)
    return value


def run(op_type: str, **params: Any) -> tuple[np.ndarray, ...]:
    out = ops.OPS[op_type]({k: _arg(v) for k, v in params.items()})
    assert isinstance(out, tuple) and all(isinstance(o, np.ndarray) for o in out)
    return out


def run1(op_type: str, **params: Any) -> np.ndarray:
    (out,) = run(op_type, **params)
    return out


def mil(op_type: str, opset: Any = iOS17, **params: Any) -> list[Any]:
    """coremltools' value_inference for the op built from these constant inputs (None for
    an output it cannot infer)."""
    with Function({}, opset_version=opset):
        out = getattr(mb, op_type)(**params)
    return [v.val for v in (out if isinstance(out, (list, tuple)) else [out])]


def mil1(op_type: str, opset: Any = iOS17, **params: Any) -> np.ndarray:
    (val,) = mil(op_type, opset, **params)
    assert val is not None, f"coremltools infers no value for {op_type}"
    return np.asarray(val)


def materialized(op_type: str, opset: Any, **params: Any) -> tuple[np.ndarray, ...]:
    """coremltools' decompression of a constexpr op built from these inputs."""
    with Function({}, opset_version=opset):
        out = getattr(mb, op_type)(**params)
    op = (out[0] if isinstance(out, (list, tuple)) else out).op
    val = op.materialized_val_inference()
    return tuple(val) if isinstance(val, tuple) else (val,)


def close(actual: np.ndarray, expected: Any) -> None:
    if isinstance(expected, torch.Tensor):
        expected = expected.detach().numpy()
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)


def same(actual: np.ndarray, expected: Any, dtype: Any = None) -> None:
    if isinstance(expected, torch.Tensor):
        expected = expected.numpy()
    np.testing.assert_array_equal(actual, np.asarray(expected))
    assert actual.shape == np.shape(expected)
    if dtype is not None:
        assert actual.dtype == dtype, actual.dtype


def T(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

def test_missing_names_unknown_ops_and_ignores_const():
    assert ops.missing(["add", "const", "frobnicate", "layer_norm", "frobnicate", "aaa_op"]) \
        == ["aaa_op", "frobnicate"]
    assert ops.missing(["const"]) == []
    assert "const" not in ops.OPS


# what coremltools' MIL backend writes into a saved program in place of a dialect op
# (coremltools/converters/mil/backend/mil/load.py: coreml_update_state -> write_state + read_state)
SAVED_ONLY = {"write_state"}


def test_every_kernel_is_a_coremltools_op():
    known = set(SSAOpRegistry.core_ops) | set(SSAOpRegistry.dialect_ops) | SAVED_ONLY
    assert set(ops.OPS) <= known


def test_ops_module_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, mtconvert.backends.coreml.ops as o; "
            "print(sorted(m for m in ('torch', 'coremltools', 'tensorflow', 'scipy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------
# Elementwise binary
# --------------------------------------------------------------------------------------------

ARITHMETIC = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "real_div": torch.div,
              "floor_div": torch.floor_divide, "mod": torch.remainder, "pow": torch.pow,
              "maximum": torch.maximum, "minimum": torch.minimum}
COMPARISON = {"equal": torch.eq, "not_equal": torch.ne, "less": torch.lt,
              "less_equal": torch.le, "greater": torch.gt, "greater_equal": torch.ge}
BROADCAST = [((2, 3, 4), (2, 3, 4)), ((2, 3, 4), (4,)), ((3, 1), (1, 5)), ((), (2, 3)),
             ((2, 1, 4), (3, 1))]


@pytest.mark.parametrize("shapes", BROADCAST, ids=str)
@pytest.mark.parametrize("op", ARITHMETIC)
def test_arithmetic_float(op, shapes, rng):
    x = rng.uniform(0.5, 3, shapes[0]).astype(f32)  # positive bases keep pow real
    y = rng.uniform(0.5, 3, shapes[1]).astype(f32) * rng.choice([-1, 1], shapes[1]).astype(f32)
    out = run1(op, x=x, y=y)
    assert out.dtype == f32
    close(out, ARITHMETIC[op](T(x), T(y)))
    close(out, mil1(op, x=x, y=y))


@pytest.mark.parametrize("op", ["add", "sub", "mul", "floor_div", "mod", "maximum", "minimum",
                                "pow"])
def test_arithmetic_int32(op, rng):
    x = rng.integers(-20, 20, (3, 4)).astype(np.int32)
    y = rng.choice([-5, -3, -1, 1, 2, 4, 7], (4,)).astype(np.int32)
    if op == "pow":
        x, y = rng.integers(-3, 4, (3, 4)).astype(np.int32), rng.integers(0, 5, (4,)).astype(
            np.int32)
    out = run1(op, x=x, y=y)
    same(out, ARITHMETIC[op](T(x), T(y)), np.int32)
    same(out, mil1(op, x=x, y=y))


@pytest.mark.parametrize("shapes", BROADCAST, ids=str)
@pytest.mark.parametrize("op", COMPARISON)
def test_comparison(op, shapes, rng):
    x = rng.integers(0, 3, shapes[0]).astype(f32)  # small integers: many ties
    y = rng.integers(0, 3, shapes[1]).astype(f32)
    out = run1(op, x=x, y=y)
    same(out, COMPARISON[op](T(x), T(y)), np.bool_)
    same(out, mil1(op, x=x, y=y))


@pytest.mark.parametrize("op", ["logical_and", "logical_or", "logical_xor"])
def test_logical_binary(op, rng):
    x, y = rng.random((3, 4)) < 0.5, rng.random((4,)) < 0.5
    out = run1(op, x=x, y=y)
    same(out, getattr(torch, op)(T(x), T(y)), np.bool_)
    same(out, mil1(op, x=x, y=y))


def test_logical_not(rng):
    x = rng.random((3, 4)) < 0.5
    same(run1("logical_not", x=x), ~x, np.bool_)
    same(run1("logical_not", x=x), mil1("logical_not", x=x))


def test_floating_point_exceptions_are_silent():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same(run1("exp", x=np.array([1000.0], f32)), np.array([np.inf], f32))
        same(run1("real_div", x=np.array([0.0, 1.0], f32), y=np.zeros(2, f32))[1:],
             np.array([np.inf], f32))
        assert np.isnan(run1("real_div", x=np.zeros(1, f32), y=np.zeros(1, f32))).all()
        same(run1("log", x=np.zeros(1, np.float16)), np.array([-np.inf], f32))


def test_float16_inputs_compute_in_float32(rng):
    x = rng.normal(size=(4, 5)).astype(np.float16)
    y = rng.normal(size=(5,)).astype(np.float16)
    out = run1("mul", x=x, y=y)
    assert out.dtype == f32
    close(out, x.astype(f32) * y.astype(f32))


# --------------------------------------------------------------------------------------------
# Elementwise unary and activations
# --------------------------------------------------------------------------------------------

UNARY = {  # op: (torch reference, input range)
    "abs": (torch.abs, 3), "exp": (torch.exp, 5), "exp2": (torch.exp2, 5),
    "sqrt": (torch.sqrt, None), "square": (torch.square, 3), "sign": (torch.sign, 3),
    "ceil": (torch.ceil, 3), "floor": (torch.floor, 3), "sin": (torch.sin, 4),
    "cos": (torch.cos, 4), "tan": (torch.tan, 1.4), "tanh": (torch.tanh, 4),
    "sinh": (torch.sinh, 4), "cosh": (torch.cosh, 4), "asin": (torch.asin, 0.99),
    "acos": (torch.acos, 0.99), "atan": (torch.atan, 4), "atanh": (torch.atanh, 0.95),
    "erf": (torch.erf, 4), "sigmoid": (torch.sigmoid, 8), "relu": (torch.relu, 3),
    "relu6": (F.relu6, 8), "silu": (F.silu, 6), "softplus": (F.softplus, 6),
    "softsign": (F.softsign, 4),
}
NO_VALUE_INFERENCE = {"silu"}


@pytest.mark.parametrize("op", UNARY)
def test_unary(op, rng):
    fn, scale = UNARY[op]
    x = (rng.uniform(0.01, 9, (3, 17)) if scale is None
         else rng.uniform(-scale, scale, (3, 17))).astype(f32)
    out = run1(op, x=x)
    assert out.dtype == f32
    close(out, fn(T(x)))
    if op in NO_VALUE_INFERENCE:
        assert mil(op, x=x) == [None]
    else:
        close(out, mil1(op, x=x))


@pytest.mark.parametrize("op", ["sigmoid", "softplus", "silu", "tanh", "erf"])
def test_unary_saturates_without_nan(op):
    x = np.array([-1e4, -100, -30, -1e-3, 0, 1e-3, 30, 100, 1e4], f32)
    out = run1(op, x=x)
    assert np.isfinite(out).all()
    close(out, UNARY[op][0](T(x)))


def test_erf_is_accurate_to_1e_11():
    x = np.linspace(-8, 8, 160_001)
    exact = np.vectorize(math.erf)(x)
    assert np.max(np.abs(ops._erf64(x) - exact)) < 1e-11
    x32 = x.astype(f32)
    exact32 = np.vectorize(math.erf)(x32.astype(np.float64))
    assert np.max(np.abs(run1("erf", x=x32) - exact32)) < 6e-8  # float32 rounding only


@pytest.mark.parametrize("op", ["abs", "sign", "square"])
def test_unary_int32_keeps_int32(op, rng):
    x = rng.integers(-9, 9, (4, 5)).astype(np.int32)
    out = run1(op, x=x)
    same(out, UNARY[op][0](T(x)), np.int32)
    same(out, mil1(op, x=x))


def test_round_is_half_to_even():
    x = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, -3.7], f32)
    out = run1("round", x=x)
    same(out, np.array([-2, -2, -0, 0, 2, 2, 0, -4], f32))
    same(out, torch.round(T(x)))
    same(out, mil1("round", x=x))


@pytest.mark.parametrize("op,formula,default", [
    ("log", lambda x, e: np.log(x + e), 1e-45),
    ("rsqrt", lambda x, e: 1 / np.sqrt(x + e), 1e-12),
    ("inverse", lambda x, e: 1 / (x + e), 1e-4),
])
def test_epsilon_ops(op, formula, default, rng):
    x = rng.uniform(0.1, 5, (3, 4)).astype(f32)
    close(run1(op, x=x, epsilon=0.5), formula(x.astype(np.float64), 0.5))
    close(run1(op, x=x, epsilon=0.5), mil1(op, x=x, epsilon=0.5))
    close(run1(op, x=x), formula(x.astype(np.float64), np.float64(f32(default))))
    close(run1(op, x=x), mil1(op, x=x))


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # coremltools' log(0)
def test_default_epsilon_takes_the_input_type():
    """log's 1e-45 is a float32 denormal but 0 in float16 (the definition makes the default
    in the type of x)."""
    zero32, zero16 = np.zeros(2, f32), np.zeros(2, np.float16)
    close(run1("log", x=zero32), np.log(np.full(2, f32(1e-45), np.float64)))
    close(run1("log", x=zero32), mil1("log", x=zero32))
    same(run1("log", x=zero16), np.full(2, -np.inf, f32))
    same(run1("log", x=zero16), mil1("log", x=zero16))
    same(run1("inverse", x=zero16).astype(np.float16), mil1("inverse", x=zero16))  # 1/fp16(1e-4)


def test_clip_and_threshold(rng):
    x = rng.uniform(-3, 3, (4, 6)).astype(f32)
    close(run1("clip", x=x, alpha=-1.0, beta=0.5), torch.clamp(T(x), -1.0, 0.5))
    close(run1("clip", x=x, alpha=-1.0, beta=0.5), mil1("clip", x=x, alpha=-1.0, beta=0.5))
    close(run1("threshold", x=x, alpha=0.3), torch.clamp(T(x), min=0.3))
    close(run1("threshold", x=x, alpha=0.3), mil1("threshold", x=x, alpha=0.3))
    xi = rng.integers(-5, 5, (7,)).astype(np.int32)
    same(run1("threshold", x=xi, alpha=np.int32(1)), np.maximum(xi, 1), np.int32)


@pytest.mark.parametrize("x,dtype,expected", [
    (np.array([-1.7, -0.5, 0.5, 1.7, 2.9], f32), "int32", np.array([-1, 0, 0, 1, 2], np.int32)),
    (np.array([-1.7, 0.0, 0.25], f32), "bool", np.array([True, False, True])),
    (np.array([0.1, 65504.0, 1 / 3], f32), "fp16", np.array([0.1, 65504.0, 1 / 3], np.float16)),
    (np.array([3, -2, 0], np.int32), "fp32", np.array([3, -2, 0], f32)),
    (np.array([3, -2, 0], np.int32), "bool", np.array([True, True, False])),
    (np.array([True, False]), "fp32", np.array([1, 0], f32)),
    (np.array([-1.7, 200.9, 3.2], f32), "uint8", np.array([255, 200, 3], np.uint8)),
    (np.array([-1.7, 100.9, 3.2], f32), "int8", np.array([-1, 100, 3], np.int8)),
])
def test_cast(x, dtype, expected):
    out = run1("cast", x=x, dtype=dtype)
    same(out, expected, expected.dtype)
    same(out, mil1("cast", iOS17, x=x, dtype=dtype))


@pytest.mark.parametrize("mode,reference", [
    (None, lambda x: F.gelu(x)),
    ("EXACT", lambda x: F.gelu(x)),
    ("TANH_APPROXIMATION", lambda x: F.gelu(x, approximate="tanh")),
    ("SIGMOID_APPROXIMATION", lambda x: x * torch.sigmoid(1.702 * x)),
])
def test_gelu(mode, reference, rng):
    x = rng.uniform(-6, 6, (5, 33)).astype(f32)
    params = {} if mode is None else {"mode": mode}
    out = run1("gelu", x=x, **params)
    close(out, reference(T(x)))
    close(out, mil1("gelu", x=x, **params))


ACTIVATIONS = [  # op, params, reference
    ("leaky_relu", {"alpha": 0.1}, lambda x: F.leaky_relu(x, 0.1)),
    ("elu", {"alpha": 1.3}, lambda x: F.elu(x, 1.3)),
    ("thresholded_relu", {"alpha": 0.5}, lambda x: torch.where(x >= 0.5, x, 0.0)),
    ("clamped_relu", {"alpha": 0.2, "beta": 1.5},
     lambda x: torch.minimum(torch.where(x >= 0, x, 0.2 * x), torch.tensor(1.5))),
    ("linear_activation", {"alpha": 1.5, "beta": -0.25}, lambda x: 1.5 * x - 0.25),
    ("scaled_tanh", {"alpha": 1.7, "beta": 0.6}, lambda x: 1.7 * torch.tanh(0.6 * x)),
    ("sigmoid_hard", {"alpha": 1 / 6, "beta": 0.5}, F.hardsigmoid),
]


@pytest.mark.parametrize("op,params,reference", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_parametric_activation(op, params, reference, rng):
    x = rng.uniform(-4, 4, (3, 21)).astype(f32)
    out = run1(op, x=x, **params)
    close(out, reference(T(x)))
    close(out, mil1(op, x=x, **params))


def test_prelu_and_softplus_parametric(rng):
    x = rng.uniform(-4, 4, (2, 3, 4, 5)).astype(f32)
    alpha = rng.uniform(0.1, 0.9, 3).astype(f32)
    beta = rng.uniform(0.5, 2, 3).astype(f32)
    out = run1("prelu", x=x, alpha=alpha)
    close(out, F.prelu(T(x), T(alpha)))
    close(out, mil1("prelu", x=x, alpha=alpha))
    out = run1("softplus_parametric", x=x, alpha=alpha, beta=beta)
    a, b = alpha.reshape(1, 3, 1, 1), beta.reshape(1, 3, 1, 1)
    close(out, a * np.log1p(np.exp(b * x.astype(np.float64))))
    close(out, mil1("softplus_parametric", x=x, alpha=alpha, beta=beta))


@pytest.mark.parametrize("axis", [None, -1, 0, 1])
def test_softmax(axis, rng):
    x = rng.normal(0, 4, (3, 4, 5)).astype(f32)
    params = {} if axis is None else {"axis": axis}
    out = run1("softmax", x=x, **params)
    close(out, torch.softmax(T(x), dim=-1 if axis is None else axis))
    close(out, mil1("softmax", x=x, **params))


# --------------------------------------------------------------------------------------------
# Reductions
# --------------------------------------------------------------------------------------------

def _dims(axes: list[int] | None, rank: int) -> tuple[int, ...]:
    return tuple(range(rank)) if axes is None else tuple(axes)


REDUCTIONS = {
    "reduce_sum": lambda x, d, k: torch.sum(x, d, keepdim=k),
    "reduce_prod": lambda x, d, k: np.prod(x.numpy(), axis=d, keepdims=k),
    "reduce_max": lambda x, d, k: torch.amax(x, d, keepdim=k),
    "reduce_min": lambda x, d, k: torch.amin(x, d, keepdim=k),
    "reduce_mean": lambda x, d, k: torch.mean(x, d, keepdim=k),
    "reduce_l1_norm": lambda x, d, k: torch.linalg.vector_norm(x, 1, d, keepdim=k),
    "reduce_l2_norm": lambda x, d, k: torch.linalg.vector_norm(x, 2, d, keepdim=k),
    "reduce_sum_square": lambda x, d, k: torch.sum(x * x, d, keepdim=k),
    "reduce_log_sum": lambda x, d, k: torch.log(torch.sum(x, d, keepdim=k)),
    "reduce_log_sum_exp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}


@pytest.mark.parametrize("keep_dims", [False, True])
@pytest.mark.parametrize("axes", [None, [1], [0, -1]], ids=str)
@pytest.mark.parametrize("op", REDUCTIONS)
def test_reduction(op, axes, keep_dims, rng):
    x = rng.uniform(0.5, 1.5, (3, 4, 5)).astype(f32)  # positive: log_sum stays real
    params = {"keep_dims": keep_dims} if axes is None else {"axes": axes, "keep_dims": keep_dims}
    out = run1(op, x=x, **params)
    expected = REDUCTIONS[op](T(x).double(), _dims(axes, 3), keep_dims)
    close(out, expected)
    close(out, mil1(op, x=x, **params))


def test_reduction_defaults_reduce_everything(rng):
    x = rng.normal(size=(2, 3)).astype(f32)
    out = run1("reduce_sum", x=x)
    assert out.shape == ()
    close(out, x.astype(np.float64).sum())


def test_reduce_sum_int32_stays_int32(rng):
    x = rng.integers(-100, 100, (3, 4)).astype(np.int32)
    out = run1("reduce_sum", x=x, axes=[1])
    same(out, x.sum(axis=1), np.int32)
    same(out, mil1("reduce_sum", x=x, axes=[1]))


@pytest.mark.parametrize("keep_dims", [False, True])
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
@pytest.mark.parametrize("op", ["reduce_argmax", "reduce_argmin"])
def test_arg_reduction(op, axis, keep_dims, rng):
    x = rng.normal(size=(3, 4, 5)).astype(f32)
    params = {"keep_dims": keep_dims} if axis is None else {"axis": axis, "keep_dims": keep_dims}
    out = run1(op, x=x, **params)
    fn = torch.argmax if op == "reduce_argmax" else torch.argmin
    same(out, fn(T(x), dim=-1 if axis is None else axis, keepdim=keep_dims), np.int32)
    same(out, mil1(op, x=x, **params))


def test_arg_reduction_output_dtype_uint16(rng):
    x = rng.normal(size=(3, 7)).astype(f32)
    out = run1("reduce_argmax", x=x, output_dtype="uint16")
    same(out, np.argmax(x, axis=-1).astype(np.uint16), np.uint16)
    same(out, mil1("reduce_argmax", iOS17, x=x, output_dtype="uint16"))


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("axes", [[-1], [2, 3], [-2, -1]], ids=str)
def test_layer_norm_trailing_axes(axes, affine, rng):
    x = rng.normal(1, 3, (2, 3, 4, 8)).astype(f32)
    shape = (4, 8) if len(axes) == 2 else (8,)
    gamma = rng.normal(size=shape).astype(f32)
    beta = rng.normal(size=shape).astype(f32)
    params = {"axes": axes, "epsilon": 1e-3}
    if affine:
        params |= {"gamma": gamma, "beta": beta}
    out = run1("layer_norm", x=x, **params)
    close(out, F.layer_norm(T(x), shape, T(gamma) if affine else None,
                            T(beta) if affine else None, 1e-3))
    close(out, mil1("layer_norm", x=x, **params))


def test_layer_norm_defaults_and_inner_axes(rng):
    x = rng.normal(0, 2, (3, 5, 4)).astype(f32)
    # (coremltools cannot build layer_norm without axes: "Cannot add const range(0, 3)")
    close(run1("layer_norm", x=x), F.layer_norm(T(x), x.shape, eps=1e-5))
    gamma, beta = rng.normal(size=5).astype(f32), rng.normal(size=5).astype(f32)
    out = run1("layer_norm", x=x, axes=[1], gamma=gamma, beta=beta)
    x64 = x.astype(np.float64)
    mean, var = x64.mean(1, keepdims=True), x64.var(1, keepdims=True)
    close(out, (x64 - mean) / np.sqrt(var + 1e-5) * gamma[:, None] + beta[:, None])
    close(out, mil1("layer_norm", x=x, axes=[1], gamma=gamma, beta=beta))


@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 3, 4, 5), (1, 3, 2, 4, 5)], ids=str)
def test_batch_norm(shape, rng):
    x = rng.normal(size=shape).astype(f32)
    mean, var = rng.normal(size=3).astype(f32), rng.uniform(0.5, 2, 3).astype(f32)
    gamma, beta = rng.normal(size=3).astype(f32), rng.normal(size=3).astype(f32)
    out = run1("batch_norm", x=x, mean=mean, variance=var, gamma=gamma, beta=beta, epsilon=1e-3)
    close(out, F.batch_norm(T(x), T(mean), T(var), T(gamma), T(beta), False, eps=1e-3))
    close(run1("batch_norm", x=x, mean=mean, variance=var),
          F.batch_norm(T(x), T(mean), T(var), eps=1e-5))


@pytest.mark.parametrize("shape", [(2, 3, 7), (2, 3, 4, 5)], ids=str)
def test_instance_norm(shape, rng):
    x = rng.normal(1, 2, shape).astype(f32)
    gamma, beta = rng.normal(size=3).astype(f32), rng.normal(size=3).astype(f32)
    close(run1("instance_norm", x=x, gamma=gamma, beta=beta, epsilon=1e-4),
          F.instance_norm(T(x), weight=T(gamma), bias=T(beta), eps=1e-4))
    close(run1("instance_norm", x=x), F.instance_norm(T(x), eps=1e-5))


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 4, 5)], ids=str)
def test_l2_norm(shape, rng):
    x = rng.normal(size=shape).astype(f32)
    x64 = x.astype(np.float64)
    norm = np.sqrt((x64 ** 2).sum(axis=(-3, -2, -1), keepdims=True) + 1e-6)
    close(run1("l2_norm", x=x), x64 / norm)
    close(run1("l2_norm", x=x), mil1("l2_norm", x=x))
    close(run1("l2_norm", x=x, epsilon=0.5), mil1("l2_norm", x=x, epsilon=0.5))


# --------------------------------------------------------------------------------------------
# Linear algebra and attention
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_shape", [(7,), (3, 7), (2, 3, 7)], ids=str)
def test_linear(x_shape, rng):
    x = rng.normal(size=x_shape).astype(f32)
    w, b = rng.normal(size=(5, 7)).astype(f32), rng.normal(size=5).astype(f32)
    out = run1("linear", x=x, weight=w, bias=b)
    close(out, F.linear(T(x).double(), T(w).double(), T(b).double()))
    close(out, mil1("linear", x=x, weight=w, bias=b))
    close(run1("linear", x=x, weight=w), F.linear(T(x).double(), T(w).double()))


MATMUL_SHAPES = [((4, 3), (3, 2)), ((10, 4, 3), (5, 10, 3, 2)), ((2, 1, 4, 3), (3, 3, 2)),
                 ((3,), (2, 3, 4)), ((2, 4, 3), (3,))]
MATMUL_CASES = [(xs, ys, tx, ty) for xs, ys in MATMUL_SHAPES for tx in (False, True)
                for ty in (False, True)
                if not (tx and len(xs) == 1) and not (ty and len(ys) == 1)]  # 1-D: no transpose


@pytest.mark.parametrize("x_shape,y_shape,tx,ty", MATMUL_CASES, ids=str)
def test_matmul(x_shape, y_shape, tx, ty, rng):
    xs, ys = list(x_shape), list(y_shape)
    if tx:
        xs[-1], xs[-2] = xs[-2], xs[-1]
    if ty:
        ys[-1], ys[-2] = ys[-2], ys[-1]
    x, y = rng.normal(size=xs).astype(f32), rng.normal(size=ys).astype(f32)
    params = {"transpose_x": tx, "transpose_y": ty}
    xt = T(x).double().transpose(-1, -2) if tx else T(x).double()
    yt = T(y).double().transpose(-1, -2) if ty else T(y).double()
    out = run1("matmul", x=x, y=y, **params)
    close(out, torch.matmul(xt, yt))
    if y.ndim > 1:  # coremltools' type inference fails on a 1-D y (IndexError)
        close(out, mil1("matmul", x=x, y=y, **params))


def test_matmul_int32(rng):
    x, y = rng.integers(-5, 5, (2, 3)).astype(np.int32), rng.integers(-5, 5, (3, 4)).astype(
        np.int32)
    same(run1("matmul", x=x, y=y), x @ y, np.int32)


@pytest.mark.parametrize("equation,shapes", [
    ("nchw,nwhu->nchu", ((2, 3, 4, 5), (2, 5, 4, 6))),
    ("nchw,nwhu->nchu", ((1, 3, 4, 5), (2, 5, 1, 6))),  # batch and H broadcast
    ("chw,whr->chr", ((3, 4, 5), (5, 4, 2))),
    ("abc,cd->abd", ((2, 3, 4), (4, 5))),
    ("bhqd,bhkd->bhqk", ((2, 3, 4, 8), (2, 3, 5, 8))),
], ids=str)
def test_einsum(equation, shapes, rng):
    a, b = (rng.normal(size=s).astype(f32) for s in shapes)
    out = run1("einsum", values=[a, b], equation=equation)
    ta, tb = T(a).double(), T(b).double()
    if equation.startswith("nchw"):
        size = np.broadcast_shapes(a.shape[:1] + a.shape[2:3], b.shape[:1] + b.shape[2:3])
        ta = ta.expand(size[0], a.shape[1], size[1], a.shape[3])
        tb = tb.expand(size[0], b.shape[1], size[1], b.shape[3])
    close(out, torch.einsum(equation, ta, tb))
    if equation in ("nchw,nwhu->nchu", "chw,whr->chr"):  # the equations MIL supports
        close(out, mil1("einsum", values=[a, b], equation=equation))


def _reference_pads(pad_type, spatial, kernel, strides, dilations, pad):
    """Paddings per the MIL conv definition: "same" makes out = ceil(in / stride), with
    the odd pixel after ("same") or before ("same_lower")."""
    if pad_type == "valid":
        return [(0, 0)] * len(spatial)
    if pad_type == "custom":
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(len(spatial))]
    pads = []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        pads.append((total // 2, total - total // 2) if pad_type == "same"
                    else (total - total // 2, total // 2))
    return pads


CONV_CASES = [  # x, weight, strides, dilations, groups, pad_type, pad
    ((2, 4, 9), (6, 4, 3), [1], [1], 1, "valid", None),
    ((2, 4, 10), (6, 2, 4), [2], [1], 2, "same", None),
    ((1, 4, 11), (4, 1, 3), [1], [2], 4, "custom", [2, 1]),
    ((2, 3, 8, 9), (5, 3, 3, 3), [1, 1], [1, 1], 1, "valid", None),
    ((2, 4, 9, 8), (6, 2, 3, 2), [2, 1], [1, 2], 2, "same", None),
    ((1, 4, 9, 8), (6, 4, 2, 2), [1, 1], [1, 1], 1, "same_lower", None),
    ((1, 4, 10, 7), (6, 4, 4, 3), [3, 2], [1, 1], 1, "same_lower", None),
    ((1, 4, 7, 7), (8, 4, 3, 3), [2, 2], [1, 1], 1, "custom", [1, 2, 0, 1]),
    ((1, 3, 32, 32), (8, 3, 16, 16), [16, 16], [1, 1], 1, "valid", None),  # ViT patches
    ((1, 2, 5, 6, 7), (3, 2, 2, 3, 2), [1, 2, 1], [1, 1, 2], 1, "same", None),
]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{len(c[0]) - 2}d-{c[5]}-{c[2]}")
def test_conv(case, bias, rng):
    x_shape, w_shape, strides, dilations, groups, pad_type, pad = case
    # integer values: every float32 sum is exact, so any difference is an indexing error
    x = rng.integers(-4, 5, x_shape).astype(f32)
    w = rng.integers(-4, 5, w_shape).astype(f32)
    b = rng.integers(-4, 5, w_shape[0]).astype(f32)
    params = {"strides": strides, "dilations": dilations, "groups": groups, "pad_type": pad_type}
    if pad is not None:
        params["pad"] = pad
    if bias:
        params["bias"] = b
    out = run1("conv", x=x, weight=w, **params)
    pads = _reference_pads(pad_type, x_shape[2:], w_shape[2:], strides, dilations, pad)
    torch_pad = [p for pair in reversed(pads) for p in pair]  # F.pad: last axis first
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[len(x_shape)]
    expected = conv(F.pad(T(x).double(), torch_pad), T(w).double(),
                    T(b).double() if bias else None, stride=strides, dilation=dilations,
                    groups=groups)
    close(out, expected)
    with Function({}, opset_version=iOS17):  # no value_inference: the declared shape
        assert mb.conv(x=x, weight=w, **params).shape == out.shape


@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
def test_conv_same_matches_torch_same_padding(rng):
    """Stride 1, even kernel: torch's padding="same" puts the odd pixel after, as MIL's."""
    x, w = rng.normal(size=(1, 3, 8, 7)).astype(f32), rng.normal(size=(4, 3, 4, 2)).astype(f32)
    close(run1("conv", x=x, weight=w, pad_type="same"),
          F.conv2d(T(x).double(), T(w).double(), padding="same"))


def test_conv_defaults_to_valid(rng):
    x, w = rng.normal(size=(1, 2, 6)).astype(f32), rng.normal(size=(3, 2, 3)).astype(f32)
    close(run1("conv", x=x, weight=w), F.conv1d(T(x).double(), T(w).double()))


POOL_CASES = [  # x, kernel, strides, pad_type, pad, ceil_mode
    ((2, 3, 9), [3], [2], "valid", None, False),
    ((2, 3, 9), [3], [2], "custom", [1, 1], True),
    ((1, 2, 7, 8), [3, 2], [2, 1], "valid", None, False),
    ((1, 2, 7, 8), [3, 3], [2, 2], "custom", [1, 1, 1, 1], False),
    ((1, 2, 7, 8), [3, 2], [2, 2], "custom", [1, 1, 0, 0], True),
    ((1, 2, 6, 7), [2, 2], [2, 2], "valid", None, True),
    ((1, 2, 4, 5, 6), [2, 3, 2], [2, 1, 2], "valid", None, False),
]


def _torch_pool(kind, x, kernel, strides, pad, ceil_mode, count_include_pad=True):
    nd = x.ndim - 2
    padding = [0] * nd if pad is None else pad[::2]
    if kind == "max_pool":
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
        return fn(x, kernel, strides, padding, ceil_mode=ceil_mode)
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    return fn(x, kernel, strides, padding, ceil_mode=ceil_mode,
              count_include_pad=count_include_pad)


@pytest.mark.parametrize("kind", ["max_pool", "avg_pool"])
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: f"{len(c[0]) - 2}d-{c[3]}-ceil{c[5]}")
def test_pool(kind, case, rng):
    x_shape, kernel, strides, pad_type, pad, ceil_mode = case
    x = rng.normal(size=x_shape).astype(f32)
    params = {"kernel_sizes": kernel, "strides": strides, "pad_type": pad_type,
              "ceil_mode": ceil_mode} | ({"pad": pad} if pad is not None else {})
    out = run1(kind, x=x, **params)
    close(out, _torch_pool(kind, T(x).double(), kernel, strides, pad, ceil_mode))
    with Function({}, opset_version=iOS17):  # no value_inference: the declared shape
        assert getattr(mb, kind)(x=x, **params).shape == out.shape
    if kind == "avg_pool":
        out = run1(kind, x=x, exclude_padding_from_average=True, **params)
        close(out, _torch_pool(kind, T(x).double(), kernel, strides, pad, ceil_mode, False))


@pytest.mark.parametrize("pad_type", ["same", "same_lower"])
def test_pool_same_padding(pad_type, rng):
    x = rng.normal(size=(1, 2, 7, 6)).astype(f32)
    params = {"kernel_sizes": [2, 3], "strides": [2, 2], "pad_type": pad_type}
    pads = _reference_pads(pad_type, (7, 6), (2, 3), (2, 2), (1, 1), None)
    torch_pad = [p for pair in reversed(pads) for p in pair]
    padded_max = F.pad(T(x).double(), torch_pad, value=-math.inf)
    close(run1("max_pool", x=x, **params), F.max_pool2d(padded_max, [2, 3], [2, 2]))
    close(run1("avg_pool", x=x, **params),
          F.avg_pool2d(F.pad(T(x).double(), torch_pad), [2, 3], [2, 2]))
    with Function({}, opset_version=iOS17):
        assert mb.max_pool(x=x, **params).shape == (1, 2, 4, 3)


def test_l2_pool(rng):
    x = rng.normal(size=(2, 3, 7, 8)).astype(f32)
    out = run1("l2_pool", x=x, kernel_sizes=[3, 2], strides=[2, 2], pad_type="valid")
    close(out, F.lp_pool2d(T(x).double(), 2, [3, 2], [2, 2]))


@pytest.mark.parametrize("mask", [None, "bool", "float", "bool-broadcast"])
def test_scaled_dot_product_attention(mask, rng):
    q = rng.normal(size=(2, 3, 5, 8)).astype(f32)
    k = rng.normal(size=(2, 3, 6, 8)).astype(f32)
    v = rng.normal(size=(2, 3, 6, 4)).astype(f32)
    params: dict[str, Any] = {"query": q, "key": k, "value": v}
    if mask == "bool":
        m = rng.random((2, 3, 5, 6)) < 0.7
        m[..., 0] = True  # no fully masked row
        params["attn_mask"] = m
    elif mask == "float":
        params["attn_mask"] = rng.normal(0, 3, (2, 3, 5, 6)).astype(f32)
    elif mask == "bool-broadcast":
        m = rng.random((5, 6)) < 0.6
        m[:, 0] = True
        params["attn_mask"] = m
    out = run1("scaled_dot_product_attention", **params)
    tm = params.get("attn_mask")
    close(out, F.scaled_dot_product_attention(T(q).double(), T(k).double(), T(v).double(),
                                              attn_mask=None if tm is None else (
                                                  T(tm) if tm.dtype == bool else
                                                  T(tm).double())))
    if mask != "bool-broadcast":  # value_inference adds the mask in place: no broadcasting
        close(out, mil1("scaled_dot_product_attention", iOS18, **params))


# --------------------------------------------------------------------------------------------
# Shapes, slicing and copying
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opset", [iOS15, iOS17], ids=["iOS15", "iOS17"])
@pytest.mark.parametrize("shape", [[6, -1], [0, 12], [2, 0, -1], [-1], [3, 2, 2, 2]], ids=str)
def test_reshape(shape, opset, rng):
    x = rng.normal(size=(2, 12, 2)).astype(f32)[:, :, 0] if shape == [0, 12] else \
        rng.normal(size=(2, 3, 4)).astype(f32)
    out = run1("reshape", x=x, shape=shape)
    expected = x.reshape([x.shape[i] if s == 0 else s for i, s in enumerate(shape)])
    same(out, expected)
    same(out, mil1("reshape", opset, x=x, shape=shape))


def test_reshape_iOS17_zero_counts_from_the_right(rng):
    x = rng.normal(size=(2, 50)).astype(f32)
    out = run1("reshape", x=x, shape=[1, 0, -1, 0])  # the definition's own example
    same(out, x.reshape(1, 1, 2, 50))
    same(out, mil1("reshape", iOS17, x=x, shape=[1, 0, -1, 0]))


def test_transpose_expand_dims_squeeze(rng):
    x = rng.normal(size=(2, 1, 3, 1)).astype(f32)
    same(run1("transpose", x=x, perm=[3, 0, 2, 1]), T(x).permute(3, 0, 2, 1))
    same(run1("transpose", x=x, perm=[3, 0, 2, 1]), mil1("transpose", x=x, perm=[3, 0, 2, 1]))
    for axes in ([0], [-1], [0, 2], [-1, -6, 2]):
        out = run1("expand_dims", x=x, axes=axes)
        same(out, mil1("expand_dims", x=x, axes=axes))
    same(run1("expand_dims", x=x, axes=[-1, 0]), x[None, ..., None])
    same(run1("squeeze", x=x), T(x).squeeze())
    same(run1("squeeze", x=x), mil1("squeeze", x=x))
    same(run1("squeeze", x=x, axes=[-1]), mil1("squeeze", x=x, axes=[-1]))
    # axes of size != 1 are ignored (PyTorch rule; coremltools' value_inference raises here)
    same(run1("squeeze", x=x, axes=[0, 1, 3]), T(x).squeeze((0, 1, 3)))
    scalar = run1("squeeze", x=np.ones((1, 1), f32))
    assert scalar.shape == ()


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concat_and_stack(axis, rng):
    a, b = rng.normal(size=(2, 3, 4)).astype(f32), rng.normal(size=(2, 3, 4)).astype(f32)
    c = rng.normal(size=(2, 3, 4)).astype(f32)
    out = run1("concat", values=[a, b, c], axis=axis)
    same(out, torch.cat([T(a), T(b), T(c)], dim=axis))
    same(out, mil1("concat", values=[a, b, c], axis=axis))
    out = run1("stack", values=[a, b, c], axis=axis)
    same(out, torch.stack([T(a), T(b), T(c)], dim=axis))
    same(out, mil1("stack", values=[a, b, c], axis=axis))


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concat_interleave(axis, rng):
    """The definition's example; coremltools' value_inference ignores ``interleave``, so the
    reference is the documented layout."""
    a, b = rng.normal(size=(3, 2)).astype(f32), rng.normal(size=(3, 2)).astype(f32)
    out = run1("concat", values=[a, b], axis=axis, interleave=True)
    ax = axis % 2
    expected = torch.stack([T(a), T(b)], dim=ax + 1).flatten(ax, ax + 1)
    same(out, expected)
    if ax == 0:
        same(out, np.stack([a[0], b[0], a[1], b[1], a[2], b[2]]))


def test_concat_mixed_sizes_and_scalars(rng):
    a, b = rng.normal(size=(2, 1)).astype(f32), rng.normal(size=(2, 3)).astype(f32)
    same(run1("concat", values=[a, b], axis=1), np.concatenate([a, b], axis=1))
    ints = [np.array(3, np.int32), np.array(5, np.int32)]
    same(run1("concat", values=ints, axis=0), np.array([3, 5], np.int32), np.int32)


@pytest.mark.parametrize("params", [{"num_splits": 3, "axis": 1},
                                    {"split_sizes": [1, 4, 1], "axis": -2},
                                    {"num_splits": 1, "axis": 0},
                                    {"split_sizes": [2, 1], "num_splits": 2, "axis": 2}], ids=str)
def test_split(params, rng):
    x = rng.normal(size=(2, 6, 3)).astype(f32)
    out = run("split", x=x, **params)
    sizes = params.get("split_sizes") or x.shape[params["axis"]] // params["num_splits"]
    for o, e in zip(out, torch.split(T(x), sizes, dim=params["axis"]), strict=True):
        same(o, e)
    for o, e in zip(out, mil("split", x=x, **params), strict=True):
        same(o, e)


SLICES = [  # begin, end, stride, begin_mask, end_mask, squeeze_mask, numpy index
    ([0, 1, 0], [2, 3, 5], None, None, None, None, np.s_[0:2, 1:3, 0:5]),
    ([1, -3, 4], [2, 0, 0], [1, 1, -2], None, [False, True, True], None, np.s_[1:2, -3:, 4::-2]),
    ([0, 0, 1], [0, 0, -1], [1, 2, 1], [True, True, False], [True, True, False], None,
     np.s_[:, ::2, 1:-1]),
    ([1, 0, -1], [2, 0, 0], None, [False, True, False], [False, True, True],
     [True, False, True], np.s_[1, :, -1]),
    ([0, 2, 0], [0, 0, 5], [1, -1, 2], [True, False, False], [True, True, False], None,
     np.s_[:, 2::-1, 0:5:2]),
]


@pytest.mark.parametrize("case", SLICES, ids=lambda c: str(c[-1]))
def test_slice_by_index(case, rng):
    begin, end, stride, begin_mask, end_mask, squeeze_mask, index = case
    x = rng.normal(size=(2, 4, 5)).astype(f32)
    params = {"begin": begin, "end": end}
    for name, value in (("stride", stride), ("begin_mask", begin_mask),
                        ("end_mask", end_mask), ("squeeze_mask", squeeze_mask)):
        if value is not None:
            params[name] = value
    out = run1("slice_by_index", x=x, **params)
    same(out, x[index])
    same(out, mil1("slice_by_index", x=x, **params))


def test_slice_update(rng):
    x = rng.normal(size=(3, 4, 5)).astype(f32)
    update = rng.normal(size=(2, 5)).astype(f32)
    params = {"begin": [1, 0, 0], "end": [3, 2, 5], "stride": [1, 2, 1],
              "squeeze_mask": [False, False, False]}
    expected = x.copy()
    expected[1:3, 0:2:2, :] = update.reshape(2, 1, 5)
    before = x.copy()
    out = run1("slice_update", x=x, update=update.reshape(2, 1, 5), **params)
    same(out, expected)
    same(x, before)  # the input is not written
    same(out, mil1("slice_update", iOS18, x=x, update=update.reshape(2, 1, 5), **params))
    out = run1("slice_update", x=x, update=update[0], begin=[2, 1, 0], end=[3, 2, 5],
               squeeze_mask=[True, True, False])
    expected = x.copy()
    expected[2, 1, :] = update[0]
    same(out, expected)
    assert not np.array_equal(out, x)  # a copy was written, not the input


@pytest.mark.parametrize("begin,size,index", [
    ([0, 1, 2], [2, 2, 3], np.s_[0:2, 1:3, 2:5]),
    ([1, -3, 0], [-1, 2, -1], np.s_[1:, 1:3, 0:]),
], ids=str)
def test_slice_by_size(begin, size, index, rng):
    x = rng.normal(size=(2, 4, 5)).astype(f32)
    out = run1("slice_by_size", x=x, begin=begin, size=size)
    same(out, x[index])
    same(out, mil1("slice_by_size", x=x, begin=begin, size=size))


def _gather_reference(x, idx, axis, batch_dims):
    if batch_dims == 0:
        return np.take(x, idx, axis=axis)  # numpy counts negative indices from the end
    return np.stack([_gather_reference(xi, ii, axis - 1, batch_dims - 1)
                     for xi, ii in zip(x, idx, strict=True)])


@pytest.mark.parametrize("axis,indices,batch_dims", [
    (0, np.array([1, 0, -1, -2], np.int32), 0),
    (1, np.array([[0, -3], [2, 1]], np.int32), 0),
    (-1, np.array(-2, np.int32), 0),
    (2, np.array([[3, 0, -1], [1, 1, 2]], np.int32), 1),
    (1, np.array([[1, 0], [0, 2]], np.int32), 1),
    (2, np.array([[[0, 3], [1, 1], [2, -4]], [[3, 3], [0, 1], [2, 0]]], np.int32), 2),
], ids=str)
def test_gather(axis, indices, batch_dims, rng):
    x = rng.normal(size=(2, 3, 4)).astype(f32)
    params = {"axis": axis} | ({"batch_dims": batch_dims} if batch_dims else {})
    out = run1("gather", x=x, indices=indices, **params)
    same(out, _gather_reference(x, indices, axis % 3, batch_dims))
    same(out, mil1("gather", iOS16, x=x, indices=indices, **params))
    if batch_dims == 0 and indices.ndim == 1:
        same(out, torch.index_select(T(x), axis, T(indices % x.shape[axis]).long()))


def _gather_nd_reference(x, idx, batch_dims):
    if batch_dims:
        return np.stack([_gather_nd_reference(xi, ii, batch_dims - 1)
                         for xi, ii in zip(x, idx, strict=True)])
    rows = [x[tuple(i)] for i in idx.reshape(-1, idx.shape[-1])]
    return np.array(rows).reshape(idx.shape[:-1] + x.shape[idx.shape[-1]:])


@pytest.mark.parametrize("indices,batch_dims", [
    (np.array([[1, 2], [0, -1], [1, 0]], np.int32), 0),
    (np.array([[[1], [0]], [[0], [1]]], np.int32), 0),
    (np.array([[1, 2, 3], [0, 0, 0]], np.int32), 0),
    (np.array([[[2, 3], [0, 1]], [[1, 1], [2, 0]]], np.int32), 1),
    (np.array([[2], [0]], np.int32), 1),
], ids=lambda v: str(getattr(v, "shape", v)))
def test_gather_nd(indices, batch_dims, rng):
    x = rng.normal(size=(2, 3, 4)).astype(f32)
    params = {"batch_dims": batch_dims} if batch_dims else {}
    out = run1("gather_nd", x=x, indices=indices, **params)
    same(out, _gather_nd_reference(x, indices, batch_dims))


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_along_axis(axis, rng):
    x = rng.normal(size=(3, 4, 5)).astype(f32)
    shape = list(x.shape)
    shape[axis] = 6
    indices = rng.integers(0, x.shape[axis], shape).astype(np.int32)
    out = run1("gather_along_axis", x=x, indices=indices, axis=axis)
    same(out, torch.gather(T(x), axis, T(indices).long()))
    same(out, mil1("gather_along_axis", x=x, indices=indices, axis=axis))
    negative = indices - x.shape[axis]
    same(run1("gather_along_axis", x=x, indices=negative, axis=axis), out)


@pytest.mark.parametrize("mode", ["update", "add", "sub", "mul", "div", "max", "min"])
def test_scatter_family(mode, rng):
    data = rng.uniform(1, 2, (4, 3)).astype(f32)
    indices = np.array([2, 0], np.int32)
    updates = rng.uniform(1, 2, (4, 2)).astype(f32)
    apply = {"update": lambda a, u: u, "add": np.add, "sub": np.subtract, "mul": np.multiply,
             "div": np.divide, "max": np.maximum, "min": np.minimum}[mode]
    expected = data.copy()
    for j, i in enumerate(indices):  # along axis 1
        expected[:, i] = apply(expected[:, i], updates[:, j])
    before = data.copy()
    close(run1("scatter", data=data, indices=indices, updates=updates, axis=1, mode=mode),
          expected)
    same(data, before)  # the input is not written
    # scatter_along_axis: indices and updates shaped like data, along axis 0
    idx = np.array([[3, 1, 0], [0, 2, 1]], np.int32)
    upd = rng.uniform(1, 2, (2, 3)).astype(f32)
    expected = data.copy()
    for r in range(2):
        for c in range(3):
            expected[idx[r, c], c] = apply(expected[idx[r, c], c], upd[r, c])
    close(run1("scatter_along_axis", data=data, indices=idx, updates=upd, axis=0, mode=mode),
          expected)
    # scatter_nd: whole rows and single elements
    nd_idx = np.array([[1, 2], [3, 0]], np.int32)
    nd_upd = rng.uniform(1, 2, (2,)).astype(f32)
    expected = data.copy()
    for (r, c), u in zip(nd_idx, nd_upd, strict=True):
        expected[r, c] = apply(expected[r, c], u)
    close(run1("scatter_nd", data=data, indices=nd_idx, updates=nd_upd, mode=mode), expected)


def test_scatter_default_mode_adds_duplicates(rng):
    data = np.zeros((3, 2), f32)
    updates = np.ones((3, 2), f32)
    out = run1("scatter", data=data, indices=np.array([1, 1, 0], np.int32), updates=updates)
    same(out, T(data).index_add(0, torch.tensor([1, 1, 0]), T(updates)))
    out = run1("scatter_nd", data=data, indices=np.array([[2], [2]], np.int32),
               updates=np.ones((2, 2), f32))
    same(out, np.array([[0, 0], [0, 0], [2, 2]], f32))
    idx = np.array([[0, 0], [0, 0]], np.int32)
    out = run1("scatter_along_axis", data=np.zeros((2, 2), f32), indices=idx,
               updates=np.ones((2, 2), f32))
    same(out, T(np.zeros((2, 2), f32)).scatter_add(0, T(idx).long(), torch.ones(2, 2)))


def test_select(rng):
    cond = rng.random((3, 1)) < 0.5
    a, b = rng.normal(size=(3, 4)).astype(f32), rng.normal(size=(4,)).astype(f32)
    out = run1("select", cond=cond, a=a, b=b)
    same(out, torch.where(T(cond), T(a), T(b)))
    same(out, mil1("select", cond=cond, a=a, b=b))


def test_tile_reverse_flatten(rng):
    x = rng.normal(size=(2, 3, 4)).astype(f32)
    same(run1("tile", x=x, reps=[2, 1, 3]), T(x).tile(2, 1, 3))
    same(run1("tile", x=x, reps=[2, 1, 3]), mil1("tile", x=x, reps=[2, 1, 3]))
    same(run1("reverse", x=x, axes=[0, -1]), T(x).flip(0, -1))
    same(run1("reverse", x=x, axes=[0, -1]), mil1("reverse", x=x, axes=[0, -1]))
    same(run1("reverse", x=x), T(x).flip(0, 1, 2))
    same(run1("reverse", x=x), mil1("reverse", x=x))
    for axis in (None, 2, -1):
        params = {} if axis is None else {"axis": axis}
        out = run1("flatten2d", x=x, **params)
        same(out, mil1("flatten2d", x=x, **params))
    same(run1("flatten2d", x=x, axis=-1), x.reshape(6, 4))
    same(run1("flatten2d", x=x, axis=0), x.reshape(1, 24))  # coremltools: np.prod([]) = 1.0
    same(run1("identity", x=x), x)


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate"])
@pytest.mark.parametrize("pad", [[1, 2], [0, 1, 2, 0], [1, 1, 2, 1, 0, 2]], ids=str)
def test_pad(mode, pad, rng):
    x = rng.normal(size=(3, 4, 5)).astype(f32)
    params = {"pad": pad, "mode": mode} | ({"constant_val": 2.5} if mode == "constant" else {})
    out = run1("pad", x=x, **params)
    tx = T(x)[None] if len(pad) == 6 and mode != "constant" else T(x)  # torch wants a batch
    expected = F.pad(tx, list(np.array(pad).reshape(-1, 2)[::-1].reshape(-1)), mode=mode,
                     value=2.5 if mode == "constant" else None)
    same(out, expected[0] if tx.ndim == 4 else expected)
    same(out, mil1("pad", x=x, **params))


def test_pad_defaults_to_zero_constant(rng):
    x = rng.normal(size=(2, 3)).astype(f32)
    same(run1("pad", x=x, pad=[1, 0]), np.pad(x, [(0, 0), (1, 0)]))


def test_fill_fill_like_shape():
    out = run1("fill", shape=np.array([2, 3], np.int32), value=1.5)
    same(out, np.full((2, 3), 1.5, f32), f32)
    same(out, mil1("fill", shape=np.array([2, 3], np.int32), value=1.5))
    same(run1("fill", shape=np.array([2], np.int32)), np.zeros(2, f32), f32)
    ref = np.zeros((4, 1, 2), np.float16)
    out = run1("fill_like", ref_tensor=ref, value=np.int32(7))
    same(out, np.full((4, 1, 2), 7, np.int32), np.int32)
    same(out, mil1("fill_like", ref_tensor=ref, value=np.int32(7)))
    out = run1("shape", x=ref)
    same(out, np.array([4, 1, 2], np.int32), np.int32)
    same(out, mil1("shape", x=ref))


@pytest.mark.parametrize("start,end,step", [(0, 10, 3), (5, -3, -2), (0.5, 3.0, 0.5),
                                            (-1.0, 1.0, 0.25)])
def test_range_1d(start, end, step):
    kind = np.int32 if isinstance(start, int) else f32
    args = {"start": kind(start), "end": kind(end), "step": kind(step)}
    out = run1("range_1d", **args)
    same(out, torch.arange(start, end, step).numpy().astype(kind), kind)
    same(out, mil1("range_1d", **args))


@pytest.mark.parametrize("lower,upper", [(-1, -1), (0, -1), (-1, 0), (0, 0), (1, 2), (2, 0)])
def test_band_part(lower, upper, rng):
    x = rng.normal(size=(2, 4, 5)).astype(f32)
    out = run1("band_part", x=x, lower=lower, upper=upper)
    m, n = np.arange(4)[:, None], np.arange(5)[None, :]
    keep = ((lower < 0) | (m - n <= lower)) & ((upper < 0) | (n - m <= upper))
    same(out, x * keep)
    same(out, mil1("band_part", x=x, lower=lower, upper=upper))
    if (lower, upper) == (-1, 0):
        same(out, torch.tril(T(x)))
    if (lower, upper) == (0, -1):
        same(out, torch.triu(T(x)))


@pytest.mark.parametrize("exclusive", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_cumsum(axis, exclusive, reverse, rng):
    x = rng.integers(-5, 5, (3, 4)).astype(f32)  # small integers: sums are exact
    params = {"axis": axis, "exclusive": exclusive, "reverse": reverse}
    out = run1("cumsum", x=x, **params)
    tx = T(x).flip(axis) if reverse else T(x)
    expected = torch.cumsum(tx, axis) - (tx if exclusive else 0)
    same(out, expected.flip(axis) if reverse else expected)
    if not exclusive:  # coremltools' value_inference raises for exclusive=True
        same(out, mil1("cumsum", x=x, **params))
    xi = T(x.astype(np.int32))
    ti = xi.flip(axis) if reverse else xi
    expected = (torch.cumsum(ti, axis) - (ti if exclusive else 0)).int()
    same(run1("cumsum", x=xi.numpy(), **params), expected.flip(axis) if reverse else expected,
         np.int32)


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_one_hot(axis):
    indices = np.array([[0, 3, 1], [2, 2, 0]], np.int32)
    out = run1("one_hot", indices=indices, one_hot_vector_size=4, axis=axis)
    expected = torch.movedim(F.one_hot(T(indices).long(), 4), -1, axis).numpy().astype(np.int32)
    same(out, expected, np.int32)
    out = run1("one_hot", indices=indices, one_hot_vector_size=4, axis=axis, on_value=2.5,
               off_value=-1.0)
    same(out, np.where(expected == 1, 2.5, -1.0).astype(f32), f32)


@pytest.mark.parametrize("ascending", [False, True])
@pytest.mark.parametrize("axis", [-1, 0])
def test_topk_and_argsort(axis, ascending, rng):
    x = rng.permutation(60).reshape(5, 12).astype(f32)  # distinct values: one right order
    values, indices = run("topk", x=x, k=3, axis=axis, ascending=ascending)
    tv, ti = torch.topk(T(x), 3, dim=axis, largest=not ascending)
    same(values, tv)
    same(indices, ti.int(), np.int32)
    mv, mi = mil("topk", x=x, k=3, axis=axis, ascending=ascending)
    same(values, mv)
    same(indices, mi)
    order = run1("argsort", x=x, axis=axis, ascending=ascending)
    same(order, torch.argsort(T(x), dim=axis, descending=not ascending).int(), np.int32)
    same(order, mil1("argsort", x=x, axis=axis, ascending=ascending))


def test_topk_variants(rng):
    x = rng.permutation(20).reshape(4, 5).astype(f32)
    values, indices = run("topk", x=x)  # k=1, last axis, largest
    same(values, x.max(axis=-1, keepdims=True))
    (only_values,) = run("topk", x=x, k=2, return_indices=False)
    same(only_values, mil1("topk", iOS16, x=x, k=2, return_indices=False))
    values, indices = run("topk", x=x, k=-1, output_indices_dtype="uint16")
    same(values, -np.sort(-x, axis=-1))
    assert indices.dtype == np.uint16
    xi = x.astype(np.int32)
    same(run("topk", x=xi, k=2)[0], torch.topk(T(xi), 2)[0], np.int32)


def test_argsort_ties_are_stable():
    x = np.array([1, 3, 1, 3, 2], f32)
    same(run1("argsort", x=x), np.array([1, 3, 4, 0, 2], np.int32))
    same(run1("argsort", x=x, ascending=True), np.array([0, 2, 4, 1, 3], np.int32))


def test_non_zero(rng):
    x = (rng.random((3, 4)) < 0.4).astype(f32)
    out = run1("non_zero", x=x)
    same(out, torch.nonzero(T(x)).int(), np.int32)
    same(out, mil1("non_zero", x=x))


@pytest.mark.parametrize("axis,size,stride", [(1, 3, 1), (-1, 2, 2), (0, 2, 1), (1, 4, 3)])
def test_sliding_windows(axis, size, stride, rng):
    x = rng.normal(size=(3, 7, 5)).astype(f32)
    out = run1("sliding_windows", x=x, axis=axis, size=size, stride=stride)
    unfolded = T(x).unfold(axis, size, stride)  # windows last
    same(out, torch.movedim(unfolded, -1, axis % 3 + 1))


def test_reshape_like(rng):
    refs = [np.zeros((2, 3, 4), f32), np.zeros((1, 5, 6), f32)]
    tuples = {"begins": [np.array(0, np.int32), np.array(1, np.int32)],
              "ends": [np.array(2, np.int32), np.array(0, np.int32)],
              "end_masks": [np.array(False), np.array(True)]}
    x = rng.normal(size=(6, 30)).astype(f32)
    out = run1("reshape_like", x=x, ref_tensors=refs, **tuples)
    same(out, x.reshape(2, 3, 5, 6))  # the definition's example
    with Function({}, opset_version=iOS16):  # no value_inference: the declared shape
        assert mb.reshape_like(x=x, ref_tensors=refs, **tuples).shape == out.shape
    flat = {k: np.array([v.item() for v in vs]) for k, vs in tuples.items()}
    same(run1("reshape_like", x=x, ref_tensors=refs, **flat), out)


def test_pixel_shuffle_and_unshuffle(rng):
    x = rng.normal(size=(2, 12, 3, 4)).astype(f32)
    out = run1("pixel_shuffle", x=x, upscale_factor=2)
    same(out, F.pixel_shuffle(T(x), 2))
    back = run1("pixel_unshuffle", x=out, downscale_factor=np.uint32(2))
    same(back, F.pixel_unshuffle(T(out), 2))
    same(back, x)


# --------------------------------------------------------------------------------------------
# Quantisation and weight decompression
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
@pytest.mark.parametrize("axis,per_channel", [(0, False), (0, True), (1, True), (-1, True)])
def test_constexpr_affine_dequantize(dtype, axis, per_channel, rng):
    info = np.iinfo(dtype)
    q = rng.integers(info.min, info.max + 1, (4, 6, 3)).astype(dtype)
    n = q.shape[axis]
    scale = rng.uniform(0.01, 0.2, n if per_channel else ()).astype(f32)
    zero = rng.integers(info.min, info.max + 1, n if per_channel else ()).astype(dtype)
    out = run1("constexpr_affine_dequantize", quantized_data=q, zero_point=zero, scale=scale,
               axis=axis)
    shape = [1, 1, 1]
    shape[axis] = -1
    s, z = (scale.reshape(shape), zero.reshape(shape)) if per_channel else (scale, zero)
    close(out, (q.astype(np.float64) - z.astype(np.float64)) * s)
    (decompressed,) = materialized("constexpr_affine_dequantize", iOS16, quantized_data=q,
                                   zero_point=zero, scale=scale, axis=np.int32(axis))
    close(out, decompressed)


def test_constexpr_affine_dequantize_float_zero_point(rng):
    q = rng.integers(-128, 128, (3, 5)).astype(np.int8)
    zero, scale = rng.normal(size=5).astype(f32), rng.uniform(0.1, 1, 5).astype(f32)
    out = run1("constexpr_affine_dequantize", quantized_data=q, zero_point=zero, scale=scale,
               axis=1)
    (decompressed,) = materialized("constexpr_affine_dequantize", iOS16, quantized_data=q,
                                   zero_point=zero, scale=scale, axis=np.int32(1))
    close(out, decompressed)


@pytest.mark.parametrize("data_kind", ["int8", "uint8", "int4", "uint4"])
@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("scale_shape", [(1, 1), (4, 1), (1, 3), (2, 6)], ids=str)
def test_constexpr_blockwise_shift_scale(data_kind, offset, scale_shape, rng):
    bits, signed = int(data_kind[-1]), data_kind.startswith("int")
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2 ** bits)
    dtype = types.type_mapping.string_to_nptype(data_kind)
    data = rng.integers(low, high, (4, 12)).astype(dtype)
    scale = rng.uniform(0.01, 0.5, scale_shape).astype(f32)
    off = rng.integers(low, high, scale_shape).astype(dtype) if offset else None
    params = {"data": data, "scale": scale} | ({"offset": off} if offset else {})
    # the interpreter hands sub-byte values over unpacked in (u)int8
    plain = {k: (np.asarray(v, np.int8 if signed else np.uint8) if k != "scale" else v)
             for k, v in params.items()}
    out = run1("constexpr_blockwise_shift_scale", **plain)
    block = (4 // scale_shape[0], 12 // scale_shape[1])
    big_scale = np.kron(scale.astype(np.float64), np.ones(block))
    big_off = np.kron(off.astype(np.float64), np.ones(block)) if offset else 0
    close(out, (data.astype(np.float64) - big_off) * big_scale)
    close(out, materialized("constexpr_blockwise_shift_scale", iOS18, **params)[0])


def test_constexpr_blockwise_shift_scale_fp16_scale(rng):
    """fp16 scales: coremltools computes in fp16, the kernel in fp32; once rounded to the
    declared fp16 output both give the same bits (the fp32 product of two fp16 values is
    exact)."""
    data = rng.integers(-128, 128, (8, 16)).astype(np.int8)
    scale = rng.uniform(0.001, 0.1, (2, 4)).astype(np.float16)
    off = rng.integers(-128, 128, (2, 4)).astype(np.int8)
    out = run1("constexpr_blockwise_shift_scale", data=data, scale=scale, offset=off)
    (ref,) = materialized("constexpr_blockwise_shift_scale", iOS18, data=data, scale=scale,
                          offset=off)
    assert ref.dtype == np.float16
    same(out.astype(np.float16), ref)


@pytest.mark.parametrize("nbits", [1, 2, 4, 6, 8])
@pytest.mark.parametrize("lut_dtype", [f32, np.int8])
def test_constexpr_lut_to_dense_ios16(nbits, lut_dtype, rng):
    shape = (3, 7, 5)  # 105 elements: packed indices straddle bytes for 6 bits
    indices = rng.integers(0, 2 ** nbits, shape).astype(np.uint8)
    lut = (rng.normal(size=2 ** nbits).astype(f32) if lut_dtype == f32
           else rng.integers(-128, 128, 2 ** nbits).astype(np.int8))
    packed = ct_opt.pack_elements_into_bits(indices, nbits)  # coremltools' own packing
    assert packed.size == math.ceil(nbits * indices.size / 8)
    out = run1("constexpr_lut_to_dense", indices=packed, lut=lut,
               shape=np.array(shape, np.uint32))
    same(out, lut[indices])
    (decompressed,) = materialized("constexpr_lut_to_dense", iOS16, indices=packed, lut=lut,
                                   shape=np.array(shape, np.uint32))
    same(out, decompressed)


def test_lut_bit_order_is_lsb_first():
    """The definition's example: nbits=2, five elements in two bytes."""
    packed = np.array([0b01_10_11_00, 0b00_00_00_11], np.uint8)
    out = run1("constexpr_lut_to_dense", indices=packed, lut=np.arange(4, dtype=f32) * 10,
               shape=np.array([5], np.uint32))
    same(out, np.array([0, 30, 20, 10, 30], f32))


def _lut18_reference(indices, lut, vector_axis):
    """Element by element: the table of an index's block, the vector laid along vector_axis."""
    rank = indices.ndim
    vector = lut.shape[-1]
    out_shape = list(indices.shape)
    if vector > 1:
        out_shape[vector_axis] *= vector
    out = np.zeros(out_shape, lut.dtype)
    blocks = [s // g for s, g in zip(indices.shape, lut.shape[:rank])]
    for pos in np.ndindex(*indices.shape):
        table = lut[tuple(p // b for p, b in zip(pos, blocks))]
        entry = table[indices[pos]]
        for v in range(vector):
            target = list(pos)
            if vector > 1:
                target[vector_axis] = pos[vector_axis] * vector + v
            out[tuple(target)] = entry[v]
    return out


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("groups,vector,vector_axis", [
    ((1, 1), 1, None), ((2, 1), 1, None), ((2, 3), 1, None), ((1, 1), 3, 0), ((2, 1), 2, 1),
    ((1, 3), 2, -1),
], ids=str)
def test_constexpr_lut_to_dense_ios18(nbits, groups, vector, vector_axis, rng):
    dtype = types.type_mapping.string_to_nptype(f"uint{nbits}")
    indices = rng.integers(0, 2 ** nbits, (4, 6)).astype(dtype)
    lut = rng.normal(size=groups + (2 ** nbits, vector)).astype(f32)
    params = {"indices": indices, "lut": lut}
    if vector_axis is not None:
        params["vector_axis"] = np.int32(vector_axis)
    out = run1("constexpr_lut_to_dense", **{**params, "indices": np.asarray(indices, np.uint8)})
    same(out, _lut18_reference(np.asarray(indices, np.uint8), lut,
                               None if vector_axis is None else vector_axis % 2))
    same(out, materialized("constexpr_lut_to_dense", iOS18, **params)[0])


@pytest.mark.parametrize("dtype", [f32, np.float16, np.int8])
def test_constexpr_sparse_to_dense(dtype, rng):
    shape = (3, 7, 5)
    mask = rng.random(shape) < 0.4
    nonzero = rng.normal(size=int(mask.sum())).astype(dtype) if dtype != np.int8 else \
        rng.integers(-128, 128, int(mask.sum())).astype(dtype)
    expected = np.zeros(shape, dtype)
    expected[mask] = nonzero
    # iOS16: the mask packed into bytes by coremltools' own conversion
    ios16 = ct_opt.ios18_sparse_params_to_ios16(
        ct_opt.SparseParams(nonzero_data=nonzero, mask=mask.astype(types.np_uint1_dtype)))
    out = run1("constexpr_sparse_to_dense", nonzero_data=ios16.nonzero_data, mask=ios16.mask,
               shape=np.array(ios16.shape, np.uint32))
    same(out, expected)
    same(out, materialized("constexpr_sparse_to_dense", iOS16, nonzero_data=ios16.nonzero_data,
                           mask=ios16.mask, shape=np.array(ios16.shape, np.uint32))[0])
    # iOS18: a 0/1 mask of the output's shape
    uint1_mask = mask.astype(types.np_uint1_dtype)
    out = run1("constexpr_sparse_to_dense", nonzero_data=nonzero,
               mask=np.asarray(uint1_mask, np.uint8))
    same(out, expected)
    same(out, materialized("constexpr_sparse_to_dense", iOS18, nonzero_data=nonzero,
                           mask=uint1_mask)[0])


@pytest.mark.parametrize("vector,vector_axis", [(1, None), (2, 0), (3, 1)])
def test_constexpr_lut_to_sparse(vector, vector_axis, rng):
    mask = (rng.random((4, 6)) < 0.5).astype(types.np_uint1_dtype)
    nnz = int(np.asarray(mask, np.uint8).sum())
    indices = rng.integers(0, 4, nnz).astype(types.np_uint2_dtype)
    lut = rng.normal(size=(2, 1, 4, vector)).astype(f32)
    params = {"indices_mask": mask, "indices_nonzero_data": indices, "lut": lut}
    if vector_axis is not None:
        params["vector_axis"] = np.int32(vector_axis)
    out_mask, out_values = run("constexpr_lut_to_sparse", **{
        **params, "indices_mask": np.asarray(mask, np.uint8),
        "indices_nonzero_data": np.asarray(indices, np.uint8)})
    ref_mask, ref_values = materialized("constexpr_lut_to_sparse", iOS18, **params)
    same(out_mask, np.asarray(ref_mask, np.uint8))
    same(out_values, ref_values)
    dense = np.zeros((4, 6), np.uint8)
    dense[np.asarray(mask, bool)] = np.asarray(indices, np.uint8)
    full = _lut18_reference(dense, lut, vector_axis)
    same(out_values, full[out_mask != 0])


def test_constexpr_sparse_blockwise_shift_scale(rng):
    mask = (rng.random((4, 6)) < 0.5).astype(types.np_uint1_dtype)
    nnz = int(np.asarray(mask, np.uint8).sum())
    data = rng.integers(-128, 128, nnz).astype(np.int8)
    scale = rng.uniform(0.1, 1, (1, 3)).astype(f32)
    offset = rng.integers(-5, 5, (1, 3)).astype(np.int8)
    out_mask, out_values = run("constexpr_sparse_blockwise_shift_scale",
                               data_mask=np.asarray(mask, np.uint8), nonzero_data=data,
                               scale=scale, offset=offset)
    ref_mask, ref_values = materialized("constexpr_sparse_blockwise_shift_scale", iOS18,
                                        data_mask=mask, nonzero_data=data, scale=scale,
                                        offset=offset)
    same(out_mask, np.asarray(ref_mask, np.uint8))
    close(out_values, ref_values)
    dense = np.zeros((4, 6))
    dense[np.asarray(mask, bool)] = data
    expected = (dense - np.repeat(offset, 2, axis=1)) * np.repeat(scale, 2, axis=1)
    close(out_values, expected[np.asarray(mask, bool)])


@pytest.mark.parametrize("opset", [iOS16, iOS18], ids=["iOS16", "iOS18"])
def test_constexpr_cast(opset, rng):
    x = rng.normal(size=(3, 4)).astype(np.float16)
    out = run1("constexpr_cast", source_val=x, output_dtype="fp32")
    same(out, x.astype(f32), f32)
    same(out, materialized("constexpr_cast", opset, source_val=x, output_dtype="fp32")[0])


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_quantize_dequantize(dtype, per_channel, rng):
    x = rng.normal(0, 3, (4, 5)).astype(f32)
    npt = np.int8 if dtype == "int8" else np.uint8
    scale = rng.uniform(0.02, 0.05, 5 if per_channel else ()).astype(f32)
    zero = np.full(5 if per_channel else (), 3 if dtype == "int8" else 128, npt)
    axis = {"axis": 1} if per_channel else {}
    q = run1("quantize", input=x, scale=scale, zero_point=zero, output_dtype=dtype, **axis)
    info = np.iinfo(npt)
    expected = np.clip(np.round(x / scale) + zero.astype(np.float64), info.min, info.max)
    same(q, expected.astype(npt), npt)
    same(q, mil1("quantize", iOS17, input=x, scale=scale, zero_point=zero, output_dtype=dtype,
                 **axis))
    out = run1("dequantize", input=q, scale=scale, zero_point=zero, **axis)
    close(out, (q.astype(np.float64) - zero) * scale)
    with Function({}, opset_version=iOS17):
        v = mb.dequantize(input=q, scale=scale, zero_point=zero, **axis)
        close(out, v.op.materialized_val_inference())
