"""Encoder-decoder models as two static graphs built from the model's own weights: the
**encoder** graph (the encoder input → every decoder layer's cross-attention K/V, computed once)
and the **decoder-with-past** step graph (one token, the self-attention KV cache as explicit
fixed-length inputs like the decoder-only step in mtconvert.generation.step, the cross K/V as
inputs). No Cache objects, no scatter, no data-dependent shapes.

Encoder graph: ``input_ids`` [1, S] int64 (T5, BART, Marian) or ``input_features``
[1, mel, 2·max_source_positions] float32 (Whisper) → ``cross_key_<i>`` / ``cross_value_<i>``
[1, heads, S_enc, head_dim]. Step graph: ``input_ids``, ``position_ids``, ``attention_mask``,
``past_key_<i>`` / ``past_value_<i>`` (as the decoder-only step), then ``cross_key_<i>`` /
``cross_value_<i>`` → ``logits`` and ``present_key_<i>`` / ``present_value_<i>``.

Families: T5 (relative position bias, RMS norm, unscaled attention), BART / Marian (learned or
sinusoidal positions, post-LN), Whisper (convolutional front end, pre-LN)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from mtconvert.generation.step import MASK_FILL, Geometry, _attend, _named

TEXT2TEXT = ("t5", "bart", "marian")
SPEECH = ("whisper",)
SUPPORTED = (*TEXT2TEXT, *SPEECH)


@dataclass
class Block:
    """One layer, whatever the family: linear maps, norms and the feed-forward."""

    q: Any
    k: Any
    v: Any
    o: Any
    ln: Any
    ff: Callable[[Any], Any]
    ff_ln: Any
    cq: Any = None  # cross-attention (decoder layers)
    ck: Any = None
    cv: Any = None
    co: Any = None
    cln: Any = None


@dataclass
class Parts:
    """A family's model in one layout both graphs are written against."""

    heads: int
    head_dim: int
    scale: float  # applied to q·kᵀ
    pre_ln: bool
    enc: list[Block]
    dec: list[Block]
    embed_encoder: Callable[[Any], Any]  # encoder input -> [1, S, d]
    enc_final: Callable[[Any], Any]
    embed_decoder: Callable[[Any, Any], Any]  # (input_ids, position_ids) -> [1, 1, d]
    dec_final: Callable[[Any], Any]
    head: Callable[[Any], Any]  # [1, 1, d] -> logits
    vocab: int
    modules: list[Any]  # every nn.Module the callables use (kept as submodules)
    enc_bias: Any = None  # T5: [1, H, S, S] relative position bias of the encoder
    dec_bias: Any = None  # T5: [MAX + 1, H·(MAX + 1)] decoder bias by query position


def parts(model: Any, max_cache: int, enc_len: int) -> Parts:
    kind = model.config.model_type
    if kind == "t5":
        return _t5(model, max_cache, enc_len)
    if kind in ("bart", "marian", "whisper"):
        return _bart_like(model, kind)
    raise ValueError(f"no encoder-decoder builder for model_type {kind!r}")


def build(model: Any, max_cache: int, enc_len: int) -> tuple[Any, Any, Geometry]:
    """(the encoder module, the decoder-with-past step module, the step's geometry)."""
    p = parts(model, max_cache, enc_len)
    geo = Geometry(len(p.dec), p.heads, p.head_dim, p.vocab, max_cache)
    return _Encoder(p).eval(), _Step(p, max_cache).eval(), geo


def _split(torch: Any, x: Any, lin: Any, heads: int, head_dim: int) -> Any:
    return lin(x).reshape(1, -1, heads, head_dim).transpose(1, 2)


def _full_attend(torch: Any, q: Any, k: Any, v: Any, bias: Any, scale: float) -> Any:
    scores = torch.matmul(q * scale, k.transpose(2, 3))
    if bias is not None:
        scores = scores + bias
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [1, H, T, D]
    return out.transpose(1, 2).reshape(1, q.shape[2], q.shape[1] * q.shape[3])


def _sublayer(x: Any, ln: Any, fn: Callable[[Any], Any], pre: bool) -> Any:
    return x + fn(ln(x)) if pre else ln(x + fn(x))


def _holder(p: Parts) -> Any:
    from torch import nn

    return nn.ModuleList([m for m in p.modules if m is not None])


class _Encoder:  # a factory: torch is imported lazily
    def __new__(cls, p: Parts) -> Any:
        import torch
        from torch import nn

        class Encoder(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.held = _holder(p)
                self.enc_bias = _frozen(p.enc_bias)

            def forward(self, encoder_input):
                x = p.embed_encoder(encoder_input)
                h, d = p.heads, p.head_dim
                for b in p.enc:
                    def attn(t, b=b):
                        q, k, v = (_split(torch, t, lin, h, d) for lin in (b.q, b.k, b.v))
                        return b.o(_full_attend(torch, q, k, v, self.enc_bias, p.scale))
                    x = _sublayer(x, b.ln, attn, p.pre_ln)
                    x = _sublayer(x, b.ff_ln, b.ff, p.pre_ln)
                x = p.enc_final(x)
                out = {}
                for i, b in enumerate(p.dec):
                    out[f"cross_key_{i}"] = _split(torch, x, b.ck, h, d)
                    out[f"cross_value_{i}"] = _split(torch, x, b.cv, h, d)
                return out

        return Encoder()


class _Step:
    def __new__(cls, p: Parts, max_cache: int) -> Any:
        import torch
        from torch import nn

        layers, h, d = len(p.dec), p.heads, p.head_dim

        class Seq2SeqStep(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.held = _holder(p)
                self.rel = (nn.Embedding.from_pretrained(p.dec_bias, freeze=True)
                            if p.dec_bias is not None else None)

            def forward(self, input_ids, position_ids, attention_mask, *rest):
                past, cross = rest[:2 * layers], rest[2 * layers:]
                bias = ((1.0 - attention_mask) * MASK_FILL).reshape(1, 1, 1, max_cache + 1)
                if self.rel is not None:
                    bias = bias + self.rel(position_ids).reshape(1, h, 1, max_cache + 1)
                x = p.embed_decoder(input_ids, position_ids)
                presents = []
                for i, b in enumerate(p.dec):
                    kv: list[Any] = []

                    def self_attn(t, b=b, i=i, kv=kv):
                        q, k, v = (_split(torch, t, lin, h, d) for lin in (b.q, b.k, b.v))
                        kv += [k, v]
                        a = _attend(torch, q, k, v, past[2 * i], past[2 * i + 1], bias, h, d,
                                    scale=p.scale)
                        return b.o(a)

                    def cross_attn(t, b=b, i=i):
                        q = _split(torch, t, b.cq, h, d)
                        return b.co(_full_attend(torch, q, cross[2 * i], cross[2 * i + 1], None,
                                                 p.scale))

                    x = _sublayer(x, b.ln, self_attn, p.pre_ln)
                    x = _sublayer(x, b.cln, cross_attn, p.pre_ln)
                    x = _sublayer(x, b.ff_ln, b.ff, p.pre_ln)
                    presents += kv
                return _named(p.head(p.dec_final(x)), presents)

        return Seq2SeqStep()


def _identity(x: Any) -> Any:
    return x


def _params(*ts: Any) -> list[Any]:
    """Frozen parameters as a module the graphs hold (so they are the module's own)."""
    import torch

    kept = [t for t in ts if t is not None]
    return [torch.nn.ParameterList(kept)] if kept else []


def _frozen(t: Any) -> Any:
    """A constant tensor as a frozen parameter of the module (not a buffer, not a closure
    constant: the in-process torch.export of one target must leave it usable by the next)."""
    import torch

    return None if t is None else torch.nn.Parameter(t.detach().float().clone(),
                                                     requires_grad=False)


# --- families ------------------------------------------------------------------------------------
def _t5(model: Any, max_cache: int, enc_len: int) -> Parts:
    import torch

    cfg = model.config
    enc, dec = model.encoder, model.decoder

    def blocks(stack: Any, cross: bool) -> list[Block]:
        out = []
        for blk in stack.block:
            sa, ff = blk.layer[0], blk.layer[-1]
            b = Block(sa.SelfAttention.q, sa.SelfAttention.k, sa.SelfAttention.v,
                      sa.SelfAttention.o, sa.layer_norm, ff.DenseReluDense, ff.layer_norm)
            if cross:
                ca = blk.layer[1]
                b.cq, b.ck, b.cv, b.co = (ca.EncDecAttention.q, ca.EncDecAttention.k,
                                          ca.EncDecAttention.v, ca.EncDecAttention.o)
                b.cln = ca.layer_norm
            out.append(b)
        return out

    with torch.no_grad():
        enc_bias = enc.block[0].layer[0].SelfAttention.compute_bias(enc_len, enc_len).float()
        full = dec.block[0].layer[0].SelfAttention.compute_bias(max_cache + 1, max_cache + 1)[0]
        own = torch.diagonal(full, dim1=1, dim2=2).unsqueeze(-1)  # [H, Q, 1]: relative 0
        table = torch.cat([full[:, :, :max_cache], own], dim=-1)  # [H, Q, MAX + 1]
        table = table.permute(1, 0, 2).reshape(max_cache + 1, -1).float().contiguous()
    scale_out = getattr(cfg, "scale_decoder_outputs", cfg.tie_word_embeddings)
    d_model = cfg.d_model

    def head(x: Any) -> Any:
        return model.lm_head(x * (d_model ** -0.5) if scale_out else x)

    return Parts(
        heads=cfg.num_heads, head_dim=cfg.d_kv, scale=1.0, pre_ln=True,
        enc=blocks(enc, False), dec=blocks(dec, True),
        embed_encoder=enc.embed_tokens, enc_final=enc.final_layer_norm,
        embed_decoder=lambda ids, _pos: dec.embed_tokens(ids), dec_final=dec.final_layer_norm,
        head=head, vocab=cfg.vocab_size, modules=[enc, dec, model.lm_head],
        enc_bias=enc_bias, dec_bias=table)


def _bart_like(model: Any, kind: str) -> Parts:
    """BART and Marian (post-LN; BART's embedding scale lives in its embedding module, Marian
    multiplies; BART's learned positions start at offset 2) and Whisper (pre-LN, conv front
    end, learned decoder positions)."""
    import torch

    cfg = model.config
    core = model.model
    enc, dec = core.encoder, core.decoder
    heads = cfg.decoder_attention_heads
    if cfg.encoder_attention_heads != heads or cfg.encoder_ffn_dim is None:
        raise ValueError("encoder and decoder with different head counts have no builder")
    head_dim = cfg.d_model // heads

    def blocks(layers: Any, cross: bool) -> list[Block]:
        out = []
        for ly in layers:
            sa = ly.self_attn
            b = Block(sa.q_proj, sa.k_proj, sa.v_proj, sa.out_proj, ly.self_attn_layer_norm,
                      lambda t, ly=ly: ly.fc2(ly.activation_fn(ly.fc1(t))), ly.final_layer_norm)
            if cross:
                ca = ly.encoder_attn
                b.cq, b.ck, b.cv, b.co = ca.q_proj, ca.k_proj, ca.v_proj, ca.out_proj
                b.cln = ly.encoder_attn_layer_norm
            out.append(b)
        return out

    def table(emb: Any) -> Any:
        offset = getattr(emb, "offset", 0)
        return torch.nn.Embedding.from_pretrained(emb.weight[offset:].detach().float().clone(),
                                                  freeze=True)

    dec_pos = table(dec.embed_positions)
    mult = getattr(dec, "embed_scale", 1.0) if kind == "marian" else 1.0
    dec_ln = getattr(dec, "layernorm_embedding", None)
    enc_ln = getattr(enc, "layernorm_embedding", None)

    def embed_decoder(ids: Any, pos: Any) -> Any:
        x = dec.embed_tokens(ids) * mult + dec_pos(pos)
        return dec_ln(x) if dec_ln is not None else x

    if kind == "whisper":
        enc_pos = _frozen(enc.embed_positions.weight)

        def embed_encoder(feats: Any) -> Any:
            x = torch.nn.functional.gelu(enc.conv1(feats))
            x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
            return x + enc_pos[: x.shape[1]]
    else:
        enc_pos_emb = table(enc.embed_positions)
        enc_mult = getattr(enc, "embed_scale", 1.0) if kind == "marian" else 1.0

        def embed_encoder(ids: Any) -> Any:
            positions = torch.arange(ids.shape[1]).unsqueeze(0)
            x = enc.embed_tokens(ids) * enc_mult + enc_pos_emb(positions)
            return enc_ln(x) if enc_ln is not None else x

    pre = kind == "whisper"
    bias = _frozen(getattr(model, "final_logits_bias", None))
    lm = model.proj_out if kind == "whisper" else model.lm_head

    def head(x: Any) -> Any:
        return lm(x) + bias if bias is not None else lm(x)

    return Parts(
        heads=heads, head_dim=head_dim, scale=head_dim ** -0.5, pre_ln=pre,
        enc=blocks(enc.layers, False), dec=blocks(dec.layers, True),
        embed_encoder=embed_encoder, enc_final=enc.layer_norm if pre else _identity,
        embed_decoder=embed_decoder, dec_final=dec.layer_norm if pre else _identity,
        head=head, vocab=cfg.vocab_size,
        modules=[enc, dec, lm, dec_pos, *(_params(enc_pos if pre else None, bias))])
