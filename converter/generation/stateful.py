"""The decode step with its KV cache inside: a runtime that holds state between runs (Core ML
from iOS18 / macOS15) keeps the cache, the host feeds only the token.

The module wraps the explicit-cache step of mtconvert.generation.step, so the math is the
step's own: each layer's cache is a registered float16 buffer named like the step's cache input
(``past_key_<i>`` / ``past_value_<i>`` [1, kv_heads, MAX, head_dim]); a run reads the buffers
(widened to float32), runs the step on them, and writes this step's K/V into the token's slot
(slot ``p`` holds position ``p``, as the host loop writes it) with a one-hot ``where`` on
``position_ids``, in place. Inputs: ``input_ids``, ``position_ids``, ``attention_mask`` (the
step's); outputs: the step's (logits and this step's K/V).

The buffers are float16 because Core ML states are ("State only support fp16 dtype");
compute may stay float32 (coremltools casts at read_state / coreml_update_state). Against the
explicit step with a float32 host cache, the only difference is that rounding of the cached
K/V; against the explicit step fed a float16-rounded cache it is exact (``cross_check``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from mtconvert.generation.step import Geometry

DTYPE = "float16"  # Core ML states hold float16 only
ITEMSIZE = 2


def cache_names(geo: Geometry) -> list[str]:
    """The cache inputs of the explicit step, which name the buffers (and the states)."""
    return [n for n in geo.input_names() if n.startswith("past_")]


def build(step_module: Any, geo: Geometry) -> Any:
    """The stateful module around ``step_module`` (an explicit-cache step of ``geo``)."""
    import torch
    from torch import nn

    names = cache_names(geo)
    slots = geo.max_cache

    class StatefulStep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.step = step_module
            for name in names:
                self.register_buffer(name, torch.zeros(geo.cache_shape(), dtype=torch.float16))

        def forward(self, input_ids, position_ids, attention_mask):
            past = [getattr(self, n).float() for n in names]
            out = self.step(input_ids, position_ids, attention_mask, *past)
            slot = torch.arange(slots).reshape(1, 1, slots, 1) == position_ids.reshape(1, 1, 1, 1)
            for name in names:
                cache = getattr(self, name)
                new = out[name.replace("past_", "present_")].to(torch.float16)
                cache.copy_(torch.where(slot, new, cache))
            return out

    return StatefulStep().eval()


def reset(module: Any) -> None:
    """Every cache buffer back to zeros (a new sequence)."""
    for buf in module.buffers():
        if buf.dtype.is_floating_point and buf.dtype.itemsize == ITEMSIZE:
            buf.zero_()


def cross_check(stateful_module: Any, step_module: Any, geo: Geometry,
                tokens: tuple[int, ...]) -> dict[str, float]:
    """Step ``tokens`` through the stateful module and through the explicit step fed a host
    cache, once rounded to float16 as the state holds it and once in float32: the largest
    logit difference to each (the first is 0 when the two are the same math)."""
    import torch

    from mtconvert.generation.loop import decode

    def eager(module: Any, names: list[str] | None) -> Any:
        def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            args = [feeds[n] for n in names or list(feeds)]
            with torch.inference_mode():
                out = module(*(torch.from_numpy(a) for a in args))
            return {k: v.numpy() for k, v in out.items()}
        return run

    def rounded(run: Any) -> Any:  # the host cache as a float16 state holds it
        return lambda feeds: run({k: v.astype(np.float16).astype(np.float32)
                                  if k.startswith("past_") else v for k, v in feeds.items()})

    reset(stateful_module)
    mine = decode(eager(stateful_module, ["input_ids", "position_ids", "attention_mask"]),
                  geo, tokens[:1], len(tokens) - 1, forced=tokens[1:], host_cache=False)
    reset(stateful_module)
    explicit = eager(step_module, None)
    fp16 = decode(rounded(explicit), geo, tokens[:1], len(tokens) - 1, forced=tokens[1:])
    fp32 = decode(explicit, geo, tokens[:1], len(tokens) - 1, forced=tokens[1:])
    return {"vs_float16_cache": float(np.abs(mine.logits - fp16.logits).max()),
            "vs_float32_cache": float(np.abs(mine.logits - fp32.logits).max())}
