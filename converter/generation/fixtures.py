"""Tiny random-weight models saved as Hugging Face folders, for tests, benchmarks and the
README: no hub download. Decoder-only (gpt2, llama, qwen2, mistral) and encoder-decoder (t5,
bart, marian, whisper: 2 layers, d_model 32). "Trained-like": embeddings, the LM head (and
T5's relative position bias) drawn with a larger spread, so logits and attention are far from
uniform and greedy decoding is not a coin toss."""
from __future__ import annotations

from pathlib import Path


def tiny_folder(kind: str, path: Path, *, seed: int = 0, vocab: int = 300) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=vocab,
                                           n_positions=128, bos_token_id=0, eos_token_id=0,
                                           tie_word_embeddings=False))
    elif kind in SEQ2SEQ:
        model = SEQ2SEQ[kind](vocab)
    elif kind in LLAMA_LIKE:
        config_cls, model_cls = LLAMA_LIKE[kind]()
        model = model_cls(config_cls(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=vocab, max_position_embeddings=128,
            bos_token_id=0, eos_token_id=0, tie_word_embeddings=False))
    else:
        raise ValueError(f"no tiny fixture {kind!r}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("wte", "embed_tokens", "lm_head", "shared", "proj_out",
                                       "relative_attention_bias")):
                p.normal_(0.0, 0.7)
        if kind in SPREAD:  # BART, Marian, Whisper: every other matrix at a trained-like
            # spread (their init_std of 0.02 leaves the encoder's mark on the logits ~0.01)
            for name, p in model.named_parameters():
                if p.dim() >= 2 and not any(k in name for k in (
                        "embed_tokens", "lm_head", "shared", "proj_out", "embed_positions")):
                    p.normal_(0.0, SPREAD[kind])
        if kind in SEQ2SEQ:
            _sharpen_attention(model)
    model.eval().save_pretrained(str(path))
    return path


def _llama() -> tuple:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaConfig, LlamaForCausalLM


def _qwen2() -> tuple:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2Config, Qwen2ForCausalLM


def _mistral() -> tuple:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralConfig, MistralForCausalLM


LLAMA_LIKE = {"llama": _llama, "qwen2": _qwen2, "mistral": _mistral}


def _sharpen_attention(model) -> None:
    """Query and key maps with a trained-like spread: attention (self and cross) far from
    uniform, so the encoder input and the cache both steer the decode."""
    for name, p in model.named_parameters():
        if p.dim() == 2 and any(name.endswith(k) for k in ("q_proj.weight", "k_proj.weight",
                                                           ".q.weight", ".k.weight")):
            p.normal_(0.0, 0.4)
        elif name.endswith((".o.weight", ".wo.weight")):  # T5: unscaled, pre-LN residuals
            p.normal_(0.0, 0.5)
        elif name == "shared.weight":  # T5's embedding must not drown its residual stream
            p.normal_(0.0, 0.3)


SPREAD = {"bart": 0.1, "marian": 0.08, "whisper": 0.15}

SMALL = {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
         "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64}


def _t5(vocab: int):
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(
        vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        tie_word_embeddings=False))


def _bart(vocab: int):
    from transformers import BartConfig, BartForConditionalGeneration

    return BartForConditionalGeneration(BartConfig(
        vocab_size=vocab, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
        tie_word_embeddings=False, **SMALL))


def _marian(vocab: int):
    from transformers import MarianConfig, MarianMTModel

    return MarianMTModel(MarianConfig(
        vocab_size=vocab, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, forced_eos_token_id=None, tie_word_embeddings=False,
        **SMALL))


def _whisper(vocab: int):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    return WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=vocab, num_mel_bins=16, max_source_positions=16, max_target_positions=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=[], begin_suppress_tokens=[], tie_word_embeddings=False, **SMALL))


SEQ2SEQ = {"t5": _t5, "bart": _bart, "marian": _marian, "whisper": _whisper}
