"""Seeded, meaningful validation inputs for Transformers.

Token ids stay inside the vocabulary, attention masks have real trailing padding, position ids
count up, floats are normal noise. Roles come from the input's name and dtype; the caller may
give the exclusive upper bound of integer inputs (the embedding table's size).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROLES = ("ids", "mask", "token_type", "position", "int", "float", "bool")
UNBOUNDED_INT_HIGH = 2  # integer inputs with no known table get values in [0, 2)
MAX_ELEMENTS = 1 << 26  # per input: 64 Mi elements (512 MiB of int64) is no validation input


class InputError(ValueError):
    """Inputs cannot be generated, or the user's inputs do not fit the model."""


@dataclass(frozen=True)
class InputRequest:
    name: str
    shape: tuple[int, ...]
    dtype: str
    role: str
    high: int | None = None  # exclusive upper bound for integer roles

    def describe(self) -> str:
        if self.role in ("ids", "token_type", "position", "int"):
            high = self.high if self.high is not None else UNBOUNDED_INT_HIGH
            return f"{self.role}: integers in [0, {high})"
        if self.role == "mask":
            return "mask: ones with trailing zero padding"
        return f"{self.role}: standard normal" if self.role == "float" else self.role


def guess_role(name: str, dtype: str) -> str:
    """The role of an input from its name and dtype."""
    kind = np.dtype(dtype).kind if dtype != "bfloat16" else "f"
    lname = name.lower()
    if "mask" in lname and kind in "iub":
        return "mask"
    if kind == "b":
        return "bool"
    if kind == "f":
        return "float"
    if kind not in "iu":
        raise InputError(f"cannot generate values for input {name!r} of type {dtype}; "
                         "supply them with --inputs FILE.npz")
    if "token_type" in lname or "segment" in lname:
        return "token_type"
    if "position" in lname:
        return "position"
    if "ids" in lname or "token" in lname or "input" in lname:
        return "ids"
    return "int"


def generate(requests: list[InputRequest], seed: int = 0) -> dict[str, np.ndarray]:
    """One array per request; the same seed always gives the same arrays."""
    rng = np.random.default_rng(seed)
    feeds = {r.name: _generate_one(r, rng) for r in requests}
    _pad_ids_under_masks(requests, feeds)
    return feeds


def _generate_one(r: InputRequest, rng: np.random.Generator) -> np.ndarray:
    if any(d <= 0 for d in r.shape):
        raise InputError(f"input {r.name!r} has an empty shape {r.shape}")
    if int(np.prod(r.shape, dtype=np.float64)) > MAX_ELEMENTS:
        raise InputError(f"input {r.name!r} of shape {r.shape} is too large to generate "
                         f"(over {MAX_ELEMENTS} elements); give a smaller --input-shape")
    if r.role == "float":
        return rng.standard_normal(r.shape).astype(r.dtype)
    if r.role == "mask":
        return _padding_mask(r.shape, rng).astype(r.dtype)
    if r.role == "bool":
        return rng.integers(0, 2, size=r.shape).astype(bool)
    high = r.high if r.high is not None else UNBOUNDED_INT_HIGH
    if high <= 0:
        raise InputError(f"input {r.name!r}: integer range [0, {high}) is empty")
    if r.role == "position":
        length = r.shape[-1] if r.shape else 1
        return np.broadcast_to(np.arange(length) % high, r.shape).astype(r.dtype).copy()
    if r.role == "token_type":
        return _segments(r.shape, min(high, 2)).astype(r.dtype)
    return rng.integers(0, high, size=r.shape).astype(r.dtype)


def _padding_mask(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Ones, then zeros at the end of the last axis; the first row is always padded."""
    if not shape:
        return np.ones((), dtype=np.int64)
    length = shape[-1]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    lengths = rng.integers(max(1, length // 2), length + 1, size=rows)
    lengths[0] = max(1, length - max(1, length // 4))
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    return mask.reshape(shape)


def _segments(shape: tuple[int, ...], kinds: int) -> np.ndarray:
    length = shape[-1] if shape else 1
    row = (np.arange(length) >= length // 2).astype(np.int64) if kinds > 1 else np.zeros(length)
    return np.broadcast_to(row, shape).copy()


def _pad_ids_under_masks(requests: list[InputRequest], feeds: dict[str, np.ndarray]) -> None:
    """Token ids under a zero of a same-shaped mask become 0, as a tokenizer's padding would."""
    masks = [feeds[r.name] for r in requests if r.role == "mask"]
    for r in requests:
        if r.role != "ids":
            continue
        for m in masks:
            if m.shape == feeds[r.name].shape:
                feeds[r.name] = np.where(m == 0, 0, feeds[r.name]).astype(r.dtype)
                break


def check_user_feeds(feeds: dict[str, np.ndarray], expected: dict[str, tuple[str, tuple]]) -> None:
    """expected maps name -> (dtype, shape with None for free axes). Raises InputError."""
    missing = sorted(set(expected) - set(feeds))
    if missing:
        raise InputError(f"inputs file lacks {', '.join(missing)} (has {', '.join(sorted(feeds))})")
    for name, (dtype, shape) in expected.items():
        arr = feeds[name]
        if len(arr.shape) != len(shape) or any(
                s is not None and s != a for s, a in zip(shape, arr.shape, strict=True)):
            raise InputError(f"input {name!r}: shape {tuple(arr.shape)} does not fit {shape}")
        if np.dtype(arr.dtype).kind != np.dtype(dtype).kind:
            raise InputError(f"input {name!r}: dtype {arr.dtype} does not fit {dtype}")
