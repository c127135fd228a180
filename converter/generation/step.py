"""The decode-step module: one token through a decoder-only model with an explicit, fixed-size
KV cache, written with static shapes, no scatter and no Cache objects, so that one ONNX graph
runs on every target.

Inputs: ``input_ids`` [1, 1] int64, ``position_ids`` [1, 1] int64, ``attention_mask``
[1, MAX + 1] float32 (1: a valid past slot, or the current token in the last slot; 0: empty),
``past_key_<i>`` / ``past_value_<i>`` [1, kv_heads, MAX, head_dim]. Outputs: ``logits``
[1, 1, vocab] and this step's ``present_key_<i>`` / ``present_value_<i>``
[1, kv_heads, 1, head_dim] (keys after the rotary embedding, as Hugging Face caches them); the
host writes them into the cache at the token's slot. Attention is order-free over the slots
(positions enter through the embeddings), so slot ``p`` holds position ``p``.

The module is built from a Hugging Face model's own weights (GPT-2; Llama-style: RoPE,
RMSNorm, grouped-query attention); an architecture without a builder here is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MASK_FILL = -30000.0  # fits fp16; exp() of it is 0 in every precision


@dataclass(frozen=True)
class Geometry:
    """What the host loop needs to know of the step graph."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_cache: int

    def cache_shape(self) -> tuple[int, int, int, int]:
        return (1, self.kv_heads, self.max_cache, self.head_dim)

    def cache_bytes(self, itemsize: int = 4) -> int:
        """Bytes of the whole KV cache (keys and values of every layer) at max_cache."""
        return 2 * self.layers * self.kv_heads * self.max_cache * self.head_dim * itemsize

    def input_names(self) -> list[str]:
        return ["input_ids", "position_ids", "attention_mask",
                *(f"past_{kv}_{i}" for i in range(self.layers) for kv in ("key", "value"))]

    def output_names(self) -> list[str]:
        return ["logits",
                *(f"present_{kv}_{i}" for i in range(self.layers) for kv in ("key", "value"))]


def _attend(torch: Any, q: Any, k: Any, v: Any, past_k: Any, past_v: Any, bias: Any,
            kv_heads: int, head_dim: int, scale: float | None = None) -> Any:
    """q [1, H, 1, D]; k, v [1, KV, 1, D]; past [1, KV, MAX, D]; bias [1, 1, 1, MAX + 1].
    Grouped-query attention without repeating the cache: q as [1, KV, group, D]. The past and
    the current token are scored apart and only the scores are joined (a graph input is never
    concatenated with a computed tensor: onnx2tf gives the two different layouts). ``scale``
    multiplies q·kᵀ (default 1/sqrt(head_dim)); ``bias`` may be per head [1, H, 1, MAX + 1]."""
    heads = q.shape[1]
    group = heads // kv_heads
    max_cache = past_k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    qg = q.reshape(1, kv_heads, group, head_dim) * scale
    past_scores = torch.matmul(qg, past_k.transpose(2, 3))  # [1, KV, group, MAX]
    own_score = torch.matmul(qg, k.transpose(2, 3))  # [1, KV, group, 1]
    probs = torch.softmax(torch.cat([past_scores, own_score], dim=-1) + bias, dim=-1)
    past_probs, own_prob = probs[..., :max_cache], probs[..., max_cache:]
    out = torch.matmul(past_probs, past_v) + torch.matmul(own_prob, v)
    return out.reshape(1, 1, heads * head_dim)


def _named(logits: Any, presents: list[Any]) -> dict[str, Any]:
    out = {"logits": logits}
    for i in range(len(presents) // 2):
        out[f"present_key_{i}"], out[f"present_value_{i}"] = presents[2 * i], presents[2 * i + 1]
    return out


def build(model: Any, max_cache: int) -> tuple[Any, Geometry]:
    """(the step module, its geometry) for a Hugging Face causal LM, by its model_type."""
    kind = getattr(model.config, "model_type", None)
    if kind == "gpt2":
        return _gpt2(model, max_cache)
    if kind in LLAMA_LIKE:
        return _llama(model, max_cache)
    raise ValueError(f"no decode-step builder for model_type {kind!r}")


# Llama's layout (RoPE, RMSNorm, grouped-query attention, gated MLP); Qwen2 adds q/k/v biases
# (nn.Linear's own), Mistral a sliding window (cache_length refuses a cache wider than it)
LLAMA_LIKE = ("llama", "qwen2", "mistral")
SUPPORTED = ("gpt2", *LLAMA_LIKE)


def _gpt2(model: Any, max_cache: int) -> tuple[Any, Geometry]:
    import torch
    from torch import nn

    cfg = model.config
    heads, hidden = cfg.n_head, cfg.n_embd
    geo = Geometry(cfg.n_layer, heads, hidden // heads, cfg.vocab_size, max_cache)
    act = _activation(cfg.activation_function)

    class GPT2Step(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.t = model.transformer
            self.lm_head = model.lm_head

        def forward(self, input_ids, position_ids, attention_mask, *past):
            bias = ((1.0 - attention_mask) * MASK_FILL).reshape(1, 1, 1, max_cache + 1)
            x = self.t.wte(input_ids) + self.t.wpe(position_ids)
            presents = []
            for i, block in enumerate(self.t.h):
                h = block.ln_1(x)
                qkv = block.attn.c_attn(h)
                q, k, v = qkv.split(hidden, dim=2)
                q, k, v = (t.reshape(1, 1, heads, geo.head_dim).transpose(1, 2) for t in (q, k, v))
                a = _attend(torch, q, k, v, past[2 * i], past[2 * i + 1], bias, heads,
                            geo.head_dim)
                x = x + block.attn.c_proj(a)
                h = block.ln_2(x)
                x = x + block.mlp.c_proj(act(block.mlp.c_fc(h)))
                presents += [k, v]
            return _named(self.lm_head(self.t.ln_f(x)), presents)

    _refuse_gpt2_variants(cfg)
    return GPT2Step().eval(), geo


def _refuse_gpt2_variants(cfg: Any) -> None:
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(
            cfg, "reorder_and_upcast_attn", False) or not getattr(cfg, "scale_attn_weights", True):
        raise ValueError("GPT-2 attention variants (scale_attn_by_inverse_layer_idx, "
                         "reorder_and_upcast_attn, unscaled attention) have no step builder")


def _activation(name: str) -> Any:
    import torch

    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: torch.nn.functional.gelu(x, approximate="tanh")
    if name == "gelu":
        return torch.nn.functional.gelu
    if name in ("silu", "swish"):
        return torch.nn.functional.silu
    if name == "relu":
        return torch.relu
    raise ValueError(f"activation {name!r} has no step builder")


def _rope_table(model: Any, positions: int) -> tuple[Any, Any]:
    """cos, sin [positions, head_dim] from the model's own rotary embedding (so its scaling
    type, whatever it is, is the model's)."""
    import torch

    rotary = model.model.rotary_emb
    pos = torch.arange(positions).unsqueeze(0)
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, pos)
    return cos[0].float(), sin[0].float()


def _llama(model: Any, max_cache: int) -> tuple[Any, Geometry]:
    import torch
    from torch import nn

    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type") in ("dynamic", "longrope"):
        raise ValueError(f"rope_type {rope['rope_type']!r} depends on the sequence length; "
                         "the step graph's fixed rotary table cannot follow it")
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    geo = Geometry(cfg.num_hidden_layers, kv, head_dim, cfg.vocab_size, max_cache)
    act = _activation(cfg.hidden_act)
    cos, sin = _rope_table(model, max_cache + 1)
    half = head_dim // 2

    def rotate(x, c, s):
        x1, x2 = x[..., :half], x[..., half:]
        return x * c + torch.cat([-x2, x1], dim=-1) * s

    def rms(norm, x):
        var = (x * x).mean(-1, keepdim=True)
        return norm.weight * (x * torch.rsqrt(var + norm.variance_epsilon))

    class LlamaStep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model.model
            self.lm_head = model.lm_head
            self.cos = nn.Embedding.from_pretrained(cos, freeze=True)
            self.sin = nn.Embedding.from_pretrained(sin, freeze=True)

        def forward(self, input_ids, position_ids, attention_mask, *past):
            bias = ((1.0 - attention_mask) * MASK_FILL).reshape(1, 1, 1, max_cache + 1)
            c = self.cos(position_ids).reshape(1, 1, 1, head_dim)
            s = self.sin(position_ids).reshape(1, 1, 1, head_dim)
            x = self.m.embed_tokens(input_ids)
            presents = []
            for i, layer in enumerate(self.m.layers):
                at = layer.self_attn
                h = rms(layer.input_layernorm, x)
                q = at.q_proj(h).reshape(1, 1, heads, head_dim).transpose(1, 2)
                k = at.k_proj(h).reshape(1, 1, kv, head_dim).transpose(1, 2)
                v = at.v_proj(h).reshape(1, 1, kv, head_dim).transpose(1, 2)
                q, k = rotate(q, c, s), rotate(k, c, s)
                a = _attend(torch, q, k, v, past[2 * i], past[2 * i + 1], bias, kv, head_dim)
                x = x + at.o_proj(a)
                h = rms(layer.post_attention_layernorm, x)
                x = x + layer.mlp.down_proj(act(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h))
                presents += [k, v]
            return _named(self.lm_head(rms(self.m.norm, x)), presents)

    return LlamaStep().eval(), geo
